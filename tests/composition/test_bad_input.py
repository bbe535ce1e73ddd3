from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import MAX_SEQ_LEN, NUM_TOKENS, decoder, tokens
from torch import nn
from x_transformers import Decoder, TransformerWrapper

from calm_pytorch import CALM, AugmentParams

def randomize(calm):
    for blocks in calm.cross_attns:
        for block in blocks:
            nn.init.normal_(block.to_out.weight, std = 0.5)
    return calm

# NaN and inf in a context

class Patches(nn.Module):
    # an image encoder: (b, 4, 2, 2) -> 4 positions of 4 channels
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
        self.register_buffer('scale', torch.ones(()))

    def forward(self, images):
        x = images.flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x).tanh() * self.scale
        return x

def image_augment():
    model = Patches()
    return model, AugmentParams(model = model, transformer_blocks = model.blocks, input_shape = (4, 2, 2))

@pytest.mark.parametrize('bad', (float('nan'), float('inf')))
def test_nan_or_inf_in_a_float_context_is_an_error(anchor, bad):
    _, params = image_augment()
    calm = CALM(anchor, params)
    image = torch.randn(2, 4, 2, 2)
    image[1, 2, 0, 1] = bad

    counts = '1 NaN and 0 inf' if bad != bad else '0 NaN and 1 inf'
    with pytest.raises(ValueError, match = rf'`prompt` holds {counts} values; the composition would spread them'):
        calm(tokens(), prompt = image)

    with pytest.raises(ValueError, match = r'`prompt\[0\]` holds'):
        calm(tokens(), prompt = [image])

def test_an_augment_that_overflows_is_named(anchor):
    model, params = image_augment()
    calm = CALM(anchor, params)
    model.scale.fill_(float('inf'))

    with pytest.raises(ValueError, match = r'augment 0 produced NaN or inf hidden states at layer\(s\) \[2\].*fp16'):
        calm(tokens(), prompt = torch.randn(2, 4, 2, 2))

def overflowing(model):
    # an fp16 model whose activations overflow from its second layer on
    model = model.half()
    with torch.no_grad():
        for param in model.attn_layers.layers[1][1].parameters():  # the first feedforward
            param.fill_(6e4)
    return model

def test_a_model_that_overflows_on_the_causality_probe_is_not_called_bidirectional(anchor):
    # NaN compares unequal: the probe read an overflow as "depends on later tokens"
    calm = CALM(anchor, overflowing(decoder(dim = 24)))
    assert calm.augment_is_causal == [None]

    with pytest.raises(ValueError, match = r'augment 0 \(TransformerWrapper\) produced NaN or inf hidden states on a 3-token probe.*overflows'):
        calm(tokens())

    with pytest.raises(ValueError, match = r'augment 0 .* produced NaN or inf hidden states on a 3-token probe'):
        calm.generate(tokens(length = 4), 8)

    calm = CALM(overflowing(decoder(dim = 32)), decoder(dim = 24))
    with pytest.raises(ValueError, match = r'the anchor \(TransformerWrapper\) gives NaN or inf logits on a 3-token probe.*overflows'):
        calm(tokens())

class NaNAtPadding(nn.Module):
    # a model whose hidden states are NaN at padded positions (as some attention kernels give for
    # fully masked rows): the composition must not let them through
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(NUM_TOKENS, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])

    def forward(self, x, mask = None):
        x = self.emb(x)
        if mask is not None:
            x = x.masked_fill(~mask[..., None], float('nan'))
        for block in self.blocks:
            x = block(x)
        return x

def test_nan_at_padded_context_positions_does_not_spread(anchor):
    model = NaNAtPadding()
    calm = randomize(CALM(anchor, AugmentParams(model = model, transformer_blocks = model.blocks)))
    seq, prompt = tokens(), tokens(length = 6)

    logits = calm(seq, prompt = prompt, return_loss = False)

    padded = F.pad(prompt, (0, 3))
    padded_mask = F.pad(torch.ones_like(prompt, dtype = torch.bool), (0, 3), value = False)
    padded_logits = calm(seq, prompt = padded, prompt_mask = padded_mask, return_loss = False)

    assert torch.isfinite(padded_logits).all()
    assert torch.allclose(padded_logits, logits, atol = 1e-5)

# contexts in another dtype

def test_token_context_in_another_integer_dtype(anchor, augment):
    calm = randomize(CALM(anchor, augment))
    seq, prompt = tokens(), tokens(length = 6)
    mask = torch.ones_like(prompt, dtype = torch.bool)
    mask[0, 4:] = False

    expected = calm(seq, prompt = prompt, prompt_mask = mask, return_loss = False)
    assert torch.equal(calm(seq, prompt = prompt.int(), prompt_mask = mask.long(), return_loss = False), expected)

def test_context_of_a_dtype_that_cannot_be_cast_is_refused(anchor, augment):
    calm = CALM(anchor, augment)

    with pytest.raises(TypeError, match = r'`prompt` must hold integer token ids .* got dtype torch.float32'):
        calm(tokens(), prompt = torch.rand(2, 6))

    with pytest.raises(TypeError, match = r'`prompt_mask` must be a bool tensor .* got dtype torch.float32'):
        calm(tokens(), prompt = tokens(length = 6), prompt_mask = torch.ones(2, 6))

# contexts longer than an augment takes

def test_prompt_longer_than_the_augments_max_seq_len(anchor, augment):
    calm = CALM(anchor, [augment, decoder(dim = 16)])

    with pytest.raises(ValueError, match = rf'`prompt` has length 70, but augment_llms\[0\] takes at most {MAX_SEQ_LEN} positions \(its max_seq_len\)'):
        calm(tokens(), prompt = tokens(length = 70))

    with pytest.raises(ValueError, match = rf'`prompt\[1\]` has length 70, but augment_llms\[1\] takes at most {MAX_SEQ_LEN} positions'):
        calm(tokens(), prompt = [None, tokens(length = 70)])

def test_seq_longer_than_an_aligned_augments_max_seq_len(anchor):
    short = TransformerWrapper(num_tokens = NUM_TOKENS, max_seq_len = 8, attn_layers = Decoder(dim = 16, depth = 2, heads = 2, attn_dim_head = 8))
    calm = CALM(anchor, short)

    with pytest.raises(ValueError, match = r'`seq` has length 12, but augment_llms\[0\] takes at most 8 positions'):
        calm(tokens(length = 12), return_loss = False)

    # as a context it may be shorter than seq
    assert torch.isfinite(calm(tokens(length = 12), prompt = tokens(length = 8)))

# connections of the wrong type

@pytest.mark.parametrize('connections, message', [
    ((('1', 2),), r"got the entry \('1', 2\) \(of types str, int\)"),
    (((2.0, 4),), r'got the entry \(2.0, 4\) \(of types float, int\)'),
    (((True, 1),), r'got the entry \(True, 1\) \(of types bool, int\)'),
    (((1, 2, 3),), r'got the entry \(1, 2, 3\)'),
    ((4,), r'got the entry 4 \(a int\)'),
    ({4: 2, 8: 4}, r'got a dict \{4: 2, 8: 4\}; write it as \(\(4, 2\), \(8, 4\)\)'),
    ((4, 2), r'got the single pair \(4, 2\); write it as \(\(4, 2\),\)'),
    ((), r'got \(\)'),
    ('4,2', r"got '4,2'"),
])
def test_connections_of_the_wrong_type(anchor, augment, connections, message):
    with pytest.raises(TypeError, match = r'augment_llms\[0\]\.connections must be a non-empty tuple of \(augment_layer, anchor_layer\) pairs of ints.*' + message):
        CALM(anchor, AugmentParams(model = augment, connections = connections))

def test_numpy_and_torch_integers_are_fine_in_connections(anchor, augment):
    calm = CALM(anchor, AugmentParams(model = augment, connections = ((np.int64(4), torch.tensor(2)), [8, np.int32(4)])))
    assert calm.connections == (((4, 2), (8, 4)),)
    assert all(type(layer) is int for pair in calm.connections[0] for layer in pair)

def test_connections_and_a_spacing_together_are_refused(anchor, augment):
    with pytest.raises(ValueError, match = r'augment_llms\[0\] has both `connections` and `connect_every_num_layers`'):
        CALM(anchor, AugmentParams(model = augment, connections = ((4, 2),), connect_every_num_layers = 2))

# labels and prompts

def test_labels_outside_the_vocabulary_are_named(anchor, augment):
    calm = CALM(anchor, augment)
    seq = tokens()

    for wrong in (NUM_TOKENS, -1):
        labels = seq.clone()
        labels[0, 3] = wrong

        with pytest.raises(ValueError, match = rf"`labels` hold ids outside the anchor's vocabulary of {NUM_TOKENS}: \[{wrong}\]"):
            calm(seq, labels = labels)

        with pytest.raises(ValueError, match = rf'vocabulary of {NUM_TOKENS}: \[{wrong}\]'):
            calm(input_ids = seq, labels = labels)

    ignored = seq.clone()
    ignored[0, 3] = -100
    assert calm(seq, labels = ignored).isfinite()

def test_an_empty_prompt_is_refused_without_speaking_of_a_loss(anchor, augment):
    calm = CALM(anchor, augment)

    with pytest.raises(ValueError, match = r'^`prompt` must have at least 1 token\(s\), got shape \(2, 0\)$'):
        calm(tokens(), prompt = tokens(length = 0))
