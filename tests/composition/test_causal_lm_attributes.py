from __future__ import annotations

import sys

import pytest
import torch
import torch.utils._pytree as pytree
from conftest import decoder
from hf_models import gpt2, llama

from calm_pytorch import CALM, AugmentParams, CALMOutput
from calm_pytorch.composition.hf_config import CALMConfig

# what tools that take a transformers causal LM read of the model before calling it: .device,
# .dtype, .config; and the HF-style output as a pytree, so torch.export of calm(input_ids=...) works

def hf_composition() -> CALM:
    torch.manual_seed(0)
    calm = CALM(llama(), AugmentParams(model = gpt2(), connections = ((2, 1), (4, 2))), attn_kwargs = dict(heads = 2, dim_head = 16))

    # random weights, so that the deltas are non-zero
    with torch.no_grad():
        for param in calm.cross_attns.parameters():
            param.normal_(std = 0.2)

    return calm.eval()

def test_device_and_dtype_are_the_anchors():
    calm = hf_composition()
    assert calm.device == calm.anchor.device == torch.device('cpu')
    assert calm.dtype == calm.anchor.dtype == torch.float32

    # a bf16 anchor with an fp32 composition: the logits come in the anchor's dtype
    calm = CALM(llama().to(torch.bfloat16), gpt2(), attn_kwargs = dict(heads = 2, dim_head = 16))
    assert calm.dtype == torch.bfloat16
    assert calm.cross_attns[0][0].to_q.weight.dtype == torch.float32

def test_config_has_the_anchors_text_fields_and_the_wiring():
    calm = hf_composition()
    config, anchor_config = calm.config, calm.anchor.config

    assert isinstance(config, CALMConfig) and config.model_type == 'calm'
    for field in ('vocab_size', 'hidden_size', 'num_hidden_layers', 'max_position_embeddings', 'bos_token_id', 'eos_token_id', 'pad_token_id'):
        assert getattr(config, field) == getattr(anchor_config, field), field

    assert config.is_encoder_decoder is False and config.get_text_config() is config
    assert config.anchor['model_class'] == 'LlamaForCausalLM' and config.augments[0]['model_class'] == 'GPT2LMHeadModel'
    assert config.composition['augments'][0]['connections'] == [[2, 1], [4, 2]]
    assert config.composition['attn_kwargs'] == dict(heads = 2, dim_head = 16)

    # one object: what a tool sets on it (Trainer sets use_cache) stays
    calm.config.use_cache = False
    assert calm.config is config and calm.config.use_cache is False

    # it serializes and reads back as transformers configs do
    again = CALMConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert CALMConfig.from_dict(__import__('json').loads(config.to_json_string())).composition == config.composition

    # nothing of it is module state
    assert not any('config' in name for name in calm.state_dict())

def test_config_of_an_x_transformers_composition():
    calm = CALM(decoder(dim = 32, depth = 4), decoder(dim = 24, depth = 4))
    config = calm.config

    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.max_position_embeddings) == (256, 32, 4, 64)
    assert config.anchor == dict(library = 'x_transformers', model_class = 'TransformerWrapper', source = None, revision = None, dtype = 'float32')

def test_without_transformers_config_says_what_to_install(monkeypatch):
    calm = CALM(decoder(dim = 32, depth = 4), decoder(dim = 24, depth = 4))
    monkeypatch.setitem(sys.modules, 'calm_pytorch.composition.hf_config', None)  # as if transformers were not installed

    # still an AttributeError (a tool's getattr(model, 'config', None) reads "no config"), with the reason
    for name in ('config', 'name_or_path'):
        with pytest.raises(AttributeError, match = r'`calm.config` is a transformers config: install transformers'):
            getattr(calm, name)

    assert getattr(calm, 'config', None) is None
    assert isinstance(calm.cross_attns, torch.nn.ModuleList)  # submodules are found as before

def test_output_is_a_pytree_node():
    output = CALMOutput(loss = torch.tensor(1.), logits = torch.ones(2, 3, 4))
    leaves, spec = pytree.tree_flatten(output)

    assert len(leaves) == 2
    rebuilt = pytree.tree_unflatten([leaf * 2 for leaf in leaves], spec)
    assert isinstance(rebuilt, CALMOutput) and torch.equal(rebuilt.loss, torch.tensor(2.)) and torch.equal(rebuilt.logits, output.logits * 2)

def test_export_of_the_hf_call_matches_eager():
    calm = hf_composition()
    ids = torch.randint(3, 128, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding

    exported = torch.export.export(calm, (), dict(input_ids = ids, attention_mask = mask, labels = ids))

    # other tokens of the same shapes: the program computes, it did not record one answer
    ids = torch.randint(3, 128, (2, 12))

    with torch.no_grad():
        expected = calm(input_ids = ids, attention_mask = mask, labels = ids)
        output = exported.module()(input_ids = ids, attention_mask = mask, labels = ids)

    assert isinstance(output, CALMOutput) and list(output.keys()) == ['loss', 'logits']
    torch.testing.assert_close(output.logits, expected.logits, atol = 1e-6, rtol = 0)
    torch.testing.assert_close(output.loss, expected.loss, atol = 1e-6, rtol = 0)

    # the deltas are in the exported program: without them the logits are the anchor's alone
    assert not torch.allclose(output.logits, calm.anchor(input_ids = ids, attention_mask = mask).logits, atol = 1e-3)
