from __future__ import annotations

import pytest
import torch
import transformers
from hf_models import LLAMA_LIKE

from calm_pytorch import CALM, AugmentParams, CompositionMismatchError

# the identity a checkpoint records of the frozen models: what defines each model, nothing that
# changes with use

ATTN = dict(heads = 2, dim_head = 16)

def dynamic_rope_llama(seed: int):
    # dynamic RoPE grows its non-persistent `inv_freq` buffer once it reads past 16 positions
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**LLAMA_LIKE, 'max_position_embeddings': 16}, num_key_value_heads = 1, rope_parameters = dict(rope_type = 'dynamic', factor = 2., rope_theta = 10000.))
    return transformers.LlamaForCausalLM(config).eval()

def compose(seed: int) -> CALM:
    calm = CALM(dynamic_rope_llama(seed), AugmentParams(model = dynamic_rope_llama(seed + 1), connect_every_num_layers = 1), attn_kwargs = ATTN)

    with torch.no_grad():
        for param in calm.cross_attns.parameters():
            param.normal_(std = 0.1)

    return calm

def test_state_that_changes_with_use_is_not_part_of_the_identity(tmp_path):
    used = compose(seed = 0)
    inv_freq = used.anchor.model.rotary_emb.inv_freq.clone()

    with torch.no_grad():
        used(torch.randint(0, 128, (1, 40)), return_loss = False)

    assert not torch.equal(used.anchor.model.rotary_emb.inv_freq, inv_freq)  # the buffer did change
    path = used.save(tmp_path / 'composition.safetensors')

    # the very models the composition was saved with, freshly built: loads
    fresh = compose(seed = 0)
    fresh.load(path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.cross_attns.parameters(), used.cross_attns.parameters()))

    # other weights are still told apart
    with pytest.raises(CompositionMismatchError, match = 'weights differ'):
        compose(seed = 5).load(path)

# the file

def test_the_same_composition_saves_to_byte_identical_files(tmp_path):
    calm = compose(seed = 0)
    files = [calm.save(tmp_path / f'composition_{index}.safetensors').read_bytes() for index in range(6)]

    assert all(raw == files[0] for raw in files)
    loaded = compose(seed = 3)
    loaded.load(tmp_path / 'composition_5.safetensors', strict_models = False)
    assert all(torch.equal(a, b) for a, b in zip(loaded.cross_attns.parameters(), calm.cross_attns.parameters()))
