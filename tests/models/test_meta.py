from __future__ import annotations

import pytest
import torch

import hf_models
from calm_pytorch import CALM, AugmentParams
from conftest import decoder, encoder, tokens

# a composition built over models on the `meta` device, then materialised: `to_empty`, the frozen
# weights loaded, and the composition re-initialised or loaded from a checkpoint, equals one
# built the usual way

ANCHORS = dict(
    x_transformers = lambda: decoder(dim = 32, depth = 4),
    hf_llama = lambda: hf_models.llama(depth = 4),
)

def build(anchor_name: str, augment = lambda: decoder(dim = 24, depth = 8), seed: int = 0) -> tuple:
    torch.manual_seed(seed)
    return ANCHORS[anchor_name](), augment()

def compose(anchor, augment) -> CALM:
    return CALM(anchor, AugmentParams(model = augment, same_tokenizer = True), attn_kwargs = dict(heads = 2, dim_head = 16))

def load_frozen(model, real):
    # the weights, and the buffers a state dict leaves out (rotary tables), which a model's own
    # loader computes (transformers' from_pretrained does); `to_empty` untied tied embeddings,
    # which from_pretrained ties again
    if hasattr(model, 'tie_weights'):
        model.tie_weights()

    model.load_state_dict(real.state_dict())
    with torch.no_grad():
        for buffer, real_buffer in zip(model.buffers(), real.buffers()):
            buffer.copy_(real_buffer)

def materialised(anchor_name: str, augment = lambda: decoder(dim = 24, depth = 8)) -> tuple[CALM, CALM]:
    """(a CALM built on meta and materialised, the same CALM built on real models)."""
    real_anchor, real_augment = build(anchor_name, augment)

    with torch.device('meta'):
        anchor, meta_augment = build(anchor_name, augment)

    calm = compose(anchor, meta_augment)
    assert calm.cross_attns[0][0].to_q.weight.is_meta

    calm.to_empty(device = 'cpu')
    load_frozen(calm.anchor, real_anchor)
    load_frozen(calm.augments[0], real_augment)
    return calm, compose(real_anchor, real_augment)

@pytest.mark.parametrize('anchor_name', ANCHORS)
def test_meta_built_composition_reinitialised_is_the_identity(anchor_name):
    calm, reference = materialised(anchor_name)
    calm.init_composition_weights()
    assert all(torch.equal(block.to_out.weight, torch.zeros_like(block.to_out.weight)) for blocks in calm.cross_attns for block in blocks)

    seq = tokens() % 128
    logits = calm(seq, return_loss = False)
    assert torch.equal(logits, reference(seq, return_loss = False))
    assert torch.equal(logits, reference.anchor_adapter.logits(reference.anchor(seq)))

    # and it trains: gradients reach the composition, the frozen models stay frozen
    calm(seq).backward()
    assert calm.cross_attns[0][0].to_out.weight.grad.abs().sum() > 0
    assert all(param.grad is None for param in calm.anchor.parameters())

@pytest.mark.parametrize('anchor_name', ANCHORS)
def test_meta_built_composition_loads_a_checkpoint(anchor_name, tmp_path):
    calm, source = materialised(anchor_name)

    # a trained composition over the same models
    with torch.no_grad():
        for param in source.cross_attns.parameters():
            param.normal_(std = 0.2)

    path = source.save(tmp_path / 'composition.safetensors')
    calm.load(path)

    seq, prompt = tokens() % 128, tokens(length = 10)
    assert torch.equal(calm(seq, return_loss = False), source(seq, return_loss = False))
    assert torch.equal(calm(seq, prompt = prompt, return_loss = False), source(seq, prompt = prompt, return_loss = False))

def test_a_meta_augment_is_probed_for_causality_at_its_first_aligned_call():
    calm, _ = materialised('x_transformers', augment = lambda: encoder(dim = 24, depth = 4))
    calm.init_composition_weights()
    assert calm.augment_is_causal == [None]

    with pytest.raises(ValueError, match = 'not causal'):
        calm(tokens())

    assert calm.augment_is_causal == [False]
    calm(tokens(), prompt = tokens(length = 10))  # context mode is fine

# transformers decoders on both sides: their forward checks values (padding in the ids, packed
# sequences in the positions), which the construction's shape probes must not reach on meta

HF_AUGMENTS = dict(
    hf_llama = lambda: hf_models.llama(dim = 24, depth = 4),
    hf_gpt2 = lambda: hf_models.gpt2(dim = 24, depth = 4),
)

@pytest.mark.parametrize('augment', HF_AUGMENTS)
def test_transformers_decoders_on_both_sides_built_on_meta(augment, tmp_path):
    calm, source = materialised('hf_llama', augment = HF_AUGMENTS[augment])
    assert calm.connections == source.connections

    with torch.no_grad():
        for param in source.cross_attns.parameters():
            param.normal_(std = 0.2)

    calm.load(source.save(tmp_path / 'composition.safetensors'))

    seq = tokens() % 128
    assert torch.equal(calm(seq, return_loss = False), source(seq, return_loss = False))
    assert torch.equal(calm.generate(seq[:, :6], max_new_tokens = 4, temperature = 0.), source.generate(seq[:, :6], max_new_tokens = 4, temperature = 0.))
    assert calm.augment_is_causal == [True] and calm.anchor_is_causal

@pytest.mark.parametrize('anchor_name', ANCHORS)
def test_decoding_on_meta_is_refused_until_materialised(anchor_name):
    # a probe's `.item()` or a copy out of meta failed deep inside; the error now names what is
    # still on meta and the steps, and the same calls work once materialised
    with torch.device('meta'):
        anchor, augment = build(anchor_name)

    calm = compose(anchor, augment)
    seq = tokens(length = 6).clamp(max = 127)  # within both anchors' vocabularies
    calls = dict(generate = lambda: calm.generate(seq, max_new_tokens = 2, temperature = 0.), composed = lambda: calm.composed(seq).__enter__())

    for name, call in calls.items():
        with pytest.raises(RuntimeError, match = 'the anchor, augment 0, the composition are on the meta device'):
            call()

    calm.to_empty(device = 'cpu')
    calm.init_composition_weights()
    real_anchor, real_augment = build(anchor_name)
    load_frozen(calm.anchor, real_anchor)
    load_frozen(calm.augments[0], real_augment)

    generated = calm.generate(seq, max_new_tokens = 2, temperature = 0.)
    assert torch.equal(generated, compose(real_anchor, real_augment).generate(seq, max_new_tokens = 2, temperature = 0.))

    calm.augments[0].to('meta')
    with pytest.raises(RuntimeError, match = r'^`calm.generate` needs weights, but augment 0 is on the meta device'):
        calm.generate(seq, max_new_tokens = 2, temperature = 0.)
