from __future__ import annotations

import pytest
import torch
from conftest import decoder, encoder, tokens
from torch import nn

from calm_pytorch import CALM, AugmentParams

def test_connection_out_of_range(anchor, augment):
    with pytest.raises(ValueError, match = r'augment layer 9 .* valid layers are 1\.\.8'):
        CALM(anchor, AugmentParams(model = augment, connections = ((9, 1),)))

    with pytest.raises(ValueError, match = r'anchor layer 5 .* valid layers are 1\.\.4'):
        CALM(anchor, AugmentParams(model = augment, connections = ((1, 5),)))

def test_connection_of_wrong_type(anchor, augment):
    with pytest.raises(TypeError, match = 'connections'):
        CALM(anchor, AugmentParams(model = augment, connections = (('1', 2),)))

def test_dims_checked_against_the_models(anchor, augment):
    with pytest.raises(ValueError, match = r'dim_anchor=64 .* hidden width is \[32\]'):
        CALM(dim_anchor = 64, dim_augment = 24, anchor_llm = anchor, augment_llm = augment)

    with pytest.raises(ValueError, match = r'dim_augment=32 .* \[\[24\]\]'):
        CALM(dim_anchor = 32, dim_augment = 32, anchor_llm = anchor, augment_llm = augment)

    # the seed README's form, with matching dims
    assert CALM(dim_anchor = 32, dim_augment = 24, anchor_llm = anchor, augment_llm = augment)(tokens()).ndim == 0

@pytest.fixture
def calm(anchor, augment):
    return CALM(anchor, augment)

def test_batch_mismatch_between_seq_and_prompt(calm):
    with pytest.raises(ValueError, match = r'`prompt` has batch size 3 but `seq` has batch size 2'):
        calm(tokens(batch = 2), prompt = tokens(batch = 3))

def test_mask_of_wrong_shape(calm):
    with pytest.raises(ValueError, match = r'`mask` must have the shape of `seq` \(2, 16\), got \(2, 15\)'):
        calm(tokens(), mask = torch.ones(2, 15, dtype = torch.bool))

    with pytest.raises(ValueError, match = r'`prompt_mask` must have the shape of `prompt`'):
        calm(tokens(), prompt = tokens(length = 8), prompt_mask = torch.ones(2, 7, dtype = torch.bool))

def test_float_seq(calm):
    with pytest.raises(TypeError, match = r'`seq` must hold integer token ids .* torch.float32'):
        calm(torch.rand(2, 16))

def test_not_a_tensor(calm):
    with pytest.raises(TypeError, match = 'seq'):
        calm([1, 2, 3])

def test_empty_sequence(calm):
    with pytest.raises(ValueError, match = r'`seq` must have at least 2 token'):
        calm(tokens(length = 1))

    with pytest.raises(ValueError, match = r'`seq` must have at least 1 token'):
        calm(tokens(length = 0), return_loss = False)

def test_model_without_findable_blocks(anchor):
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(256, 8)

        def forward(self, x):
            return self.emb(x)

    with pytest.raises(ValueError, match = r'transformer_blocks=.*extract_blocks_fn='):
        CALM(anchor, Opaque())

    with pytest.raises(ValueError, match = r'anchor_transformer_blocks=.*anchor_extract_blocks_fn='):
        CALM(Opaque(), decoder())

def test_wrong_number_of_prompts(anchor):
    calm = CALM(anchor, [decoder(), decoder()])

    with pytest.raises(ValueError, match = r'`prompt` holds 3 entries but there are 2 augments'):
        calm(tokens(), prompt = [tokens(), tokens(), tokens()])

def test_aligned_mode_refuses_a_bidirectional_augment(anchor):
    calm = CALM(anchor, encoder())

    with pytest.raises(ValueError, match = r'not causal.*`prompt=`'):
        calm(tokens())

    # the same augment reading its own context is fine
    assert torch.isfinite(calm(tokens(), prompt = tokens(length = 8)))

def test_augment_with_image_inputs_needs_a_prompt(anchor):
    class Patches(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(12, 12) for _ in range(4)])

        def forward(self, images):
            x = images.flatten(2).transpose(1, 2)  # (b, 3, 4, 4) -> (b, 16, 3) -> pad to width 12
            x = torch.nn.functional.pad(x, (0, 9))
            for block in self.blocks:
                x = block(x).relu()
            return x

    model = Patches()
    calm = CALM(anchor, AugmentParams(model = model, transformer_blocks = model.blocks, input_shape = (3, 4, 4)))

    with pytest.raises(ValueError, match = r'cannot read `seq`'):
        calm(tokens())

    with pytest.raises(ValueError, match = r'shape \(batch, \*\(3, 4, 4\)\)'):
        calm(tokens(), prompt = torch.randn(2, 3, 8, 8))

    logits = calm(tokens(), prompt = torch.randn(2, 3, 4, 4), return_loss = False)
    assert logits.shape == (2, 16, 256)

def test_bad_hidden_position(anchor, augment):
    with pytest.raises(ValueError, match = 'anchor_hidden_position'):
        CALM(anchor, augment, anchor_hidden_position = ('input', 'output'))

def test_bad_constructor_argument_types(anchor):
    with pytest.raises(TypeError, match = 'augment_llms'):
        CALM(anchor, 'not a model')
