from __future__ import annotations

import pytest
import torch
from hf_models import DECODERS, ENCODERS, gpt2, llama

from calm_pytorch import CALM, AugmentParams

ATTN = dict(heads = 2, dim_head = 16)

# greedy decoding of 6 new tokens, never stopping early (no eos), so rows compare position by position
GREEDY = dict(max_new_tokens = 6, do_sample = False, eos_token_id = None, pad_token_id = 0)

INPUT_IDS = torch.randint(3, 100, (2, 5), generator = torch.Generator().manual_seed(0))

@pytest.fixture
def setup():
    anchor = llama(depth = 2).eval()
    before_wrapping = anchor.generate(INPUT_IDS, **GREEDY)

    augment = ENCODERS['bert'].build()
    calm = CALM(anchor, AugmentParams(model = augment, connections = ((1, 1), (2, 2))), attn_kwargs = ATTN)

    with torch.no_grad():
        for cross_attn in calm.cross_attns[0]:
            cross_attn.to_out.weight.normal_(std = 2.)

    document = torch.randint(3, 100, (2, 7))
    document_mask = torch.ones_like(document, dtype = torch.bool)
    document_mask[1, 4:] = False
    return calm, anchor, INPUT_IDS, document, document_mask, before_wrapping

def test_cached_and_uncached_greedy_agree_and_differ_from_the_plain_anchor(setup):
    calm, anchor, input_ids, document, document_mask, before = setup

    with calm.composed(document, document_mask) as composed:
        assert composed is anchor
        cached = anchor.generate(input_ids, use_cache = True, **GREEDY)
        uncached = anchor.generate(input_ids, use_cache = False, **GREEDY)

    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, before)

    # after the context, the anchor generates exactly what it did before wrapping
    assert torch.equal(anchor.generate(input_ids, **GREEDY), before)
    assert calm.injector.call.contexts is None

def test_composed_generation_matches_the_composed_forward(setup):
    calm, anchor, input_ids, document, document_mask, _ = setup

    with calm.composed(document, document_mask):
        out = anchor.generate(input_ids, **GREEDY)

    # every greedy token is the argmax of the CALM forward over the tokens before it
    logits = calm(out[:, :-1], prompt = document, prompt_mask = document_mask, return_loss = False)
    assert torch.equal(logits[:, input_ids.shape[-1] - 1:].argmax(dim = -1), out[:, input_ids.shape[-1]:])

def test_beams_and_several_sequences_match_each_example_alone(setup):
    calm, anchor, input_ids, document, document_mask, _ = setup
    beams = dict(GREEDY, num_beams = 3, num_return_sequences = 2)

    with calm.composed(document, document_mask):
        together = anchor.generate(input_ids, **beams)
        sampled = anchor.generate(input_ids, max_new_tokens = 4, do_sample = True, top_k = 20, num_return_sequences = 2, pad_token_id = 0)

    assert together.shape == (4, 11) and sampled.shape == (4, 9)

    for index in range(2):
        with calm.composed(document[index:index + 1], document_mask[index:index + 1]):
            alone = anchor.generate(input_ids[index:index + 1], **beams)

        assert torch.equal(together[2 * index:2 * index + 2], alone)

def test_composed_exits_cleanly_on_an_exception(setup):
    calm, anchor, input_ids, document, document_mask, _ = setup
    before = anchor(input_ids).logits

    with pytest.raises(RuntimeError, match = 'inside'):
        with calm.composed(document, document_mask):
            assert not torch.equal(anchor(input_ids).logits, before)
            raise RuntimeError('inside')

    assert torch.equal(anchor(input_ids).logits, before)
    assert len(anchor._forward_pre_hooks) == 0

    # a batch that is not a multiple of the prompts' batch is an error, and leaves nothing behind
    with pytest.raises(ValueError, match = r'batch size 3 inside `composed\(...\)`, whose prompts have batch size 2'):
        with calm.composed(document, document_mask):
            anchor(torch.randint(3, 100, (3, 5)))

    assert torch.equal(anchor(input_ids).logits, before)

def test_composed_is_context_mode_only_and_not_nested(setup):
    calm, anchor, input_ids, document, document_mask, _ = setup

    with pytest.raises(ValueError, match = r'needs a tensor prompt for each of the 1 augments'):
        with calm.composed([None]):
            pass

    with calm.composed(document, document_mask):
        with pytest.raises(RuntimeError, match = 'cannot be nested'):
            with calm.composed(document):
                pass

        # a CALM forward inside the block uses its own contexts, and the block's come back after it
        inside = anchor(input_ids).logits
        calm(input_ids, prompt = document[:, :3], return_loss = False)
        assert torch.equal(anchor(input_ids).logits, inside)

def test_generation_with_a_gpt2_anchor_and_a_padded_batch():
    # absolute positions: generate() derives position ids from the left-padded attention mask
    anchor = gpt2(dim = 32, depth = 2)
    calm = CALM(anchor, ENCODERS['t5_encoder'].build(), attn_kwargs = ATTN)

    with torch.no_grad():
        calm.cross_attns[0][0].to_out.weight.normal_()

    input_ids = torch.randint(3, 100, (2, 6))
    attention_mask = torch.ones_like(input_ids)
    input_ids[0, :2], attention_mask[0, :2] = 0, 0
    document = torch.randint(3, 100, (2, 5))

    with calm.composed(document):
        cached = anchor.generate(input_ids, attention_mask = attention_mask, use_cache = True, **GREEDY)
        uncached = anchor.generate(input_ids, attention_mask = attention_mask, use_cache = False, **GREEDY)

    assert torch.equal(cached, uncached)

    # the padded row equals that example generated alone, without padding
    with calm.composed(document[:1]):
        alone = anchor.generate(input_ids[:1, 2:], **GREEDY)

    assert torch.equal(cached[0, 2:], alone[0])

@pytest.mark.parametrize('family', list(DECODERS))
def test_every_decoder_family_generates_composed(family):
    anchor = DECODERS[family].build().eval()
    input_ids, document = torch.randint(3, 100, (2, 4)), torch.randint(3, 100, (2, 6))
    before = anchor.generate(input_ids, **GREEDY)
    plain_logits = anchor(input_ids).logits

    calm = CALM(anchor, AugmentParams(model = ENCODERS['bert'].build(), connections = ((1, 1), (2, 2))), attn_kwargs = ATTN)

    with torch.no_grad():
        for cross_attn in calm.cross_attns[0]:
            cross_attn.to_out.weight.normal_(std = 2.)

    with calm.composed(document):
        cached = anchor.generate(input_ids, use_cache = True, **GREEDY)
        uncached = anchor.generate(input_ids, use_cache = False, **GREEDY)
        beams = anchor.generate(input_ids, num_beams = 2, num_return_sequences = 2, **GREEDY)
        composed_logits = anchor(input_ids).logits

    # (a tiny random model may still pick the same greedy tokens: its logits must differ)
    assert torch.equal(cached, uncached) and not torch.allclose(composed_logits, plain_logits, atol = 1e-4)
    assert beams.shape == (4, 10)
    assert torch.equal(anchor.generate(input_ids, **GREEDY), before)

def test_composed_works_for_any_anchor():
    # not only transformers models: an x-transformers anchor called positionally, with a larger batch
    from conftest import decoder, encoder, tokens

    anchor = decoder()
    calm = CALM(anchor, encoder(), attn_kwargs = ATTN)

    with torch.no_grad():
        calm.cross_attns[0][0].to_out.weight.normal_()

    seq, document = tokens(), tokens(length = 6)
    expected = calm(seq, prompt = document, return_loss = False)

    with calm.composed(document):
        assert torch.allclose(anchor(seq), expected, atol = 1e-6)
        assert torch.allclose(anchor(seq.repeat_interleave(3, dim = 0)), expected.repeat_interleave(3, dim = 0), atol = 1e-5)
