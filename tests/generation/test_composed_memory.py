from __future__ import annotations

import pytest
import torch
from hf_models import ENCODERS, llama

from calm_pytorch import CALM, AugmentParams, CrossAttentionBlock
from calm_pytorch.generation.composed_anchor import ContextsForBatch

# the anchor's own generate() inside `composed(...)`: each cross-attention projects the augments'
# contexts once, not at every step (it projected the whole document at every step before)

GREEDY = dict(max_new_tokens = 6, do_sample = False, eos_token_id = None, pad_token_id = 0, output_scores = True, return_dict_in_generate = True)

@pytest.fixture
def setup():
    torch.manual_seed(0)
    anchor = llama(depth = 2).eval()
    calm = CALM(anchor, AugmentParams(model = ENCODERS['bert'].build(), connections = ((1, 1), (2, 2))))

    with torch.no_grad():
        for param in calm.cross_attns.parameters():
            param.normal_(std = 0.5)

    return calm, anchor, torch.randint(3, 100, (2, 5)), torch.randint(3, 100, (2, 7))

def count_work(monkeypatch) -> dict:
    counts = dict(remembered = 0, projected = 0)
    remember, keys_values_of = CrossAttentionBlock.remember, CrossAttentionBlock.keys_values_of

    def counted_remember(self, context, folded = None):
        counts['remembered'] += 1
        return remember(self, context, folded)

    def counted_projection(self, states):
        counts['projected'] += 1
        return keys_values_of(self, states)

    monkeypatch.setattr(CrossAttentionBlock, 'remember', counted_remember)
    monkeypatch.setattr(CrossAttentionBlock, 'keys_values_of', counted_projection)
    return counts

def test_the_document_is_projected_once_per_generate(setup, monkeypatch):
    calm, anchor, input_ids, document = setup
    blocks = len(calm.cross_attns[0])

    with calm.composed(document):
        reference = anchor.generate(input_ids, **GREEDY)  # not counted

    counts = count_work(monkeypatch)

    with calm.composed(document):
        kept = anchor.generate(input_ids, **GREEDY)

    # once per block, for the prompt's call and the 5 later steps
    assert counts['remembered'] == counts['projected'] == blocks

    # every step recomputing the projections, as before
    monkeypatch.setattr(ContextsForBatch, 'for_batch', lambda self, batch, continues = False: self.hiddens_for_batch(batch))
    counts.update(remembered = 0, projected = 0)

    with calm.composed(document):
        recomputed = anchor.generate(input_ids, **GREEDY)

    assert counts['remembered'] == 6 * blocks

    # keys and values projected once are the numbers projected at every step
    for sequences in (kept.sequences, recomputed.sequences):
        assert torch.equal(sequences, reference.sequences)

    for a, b in zip(kept.scores, recomputed.scores):
        assert torch.equal(a, b)

@pytest.mark.parametrize('how', ['in place', 'through .data'])
def test_a_weight_changed_inside_the_block_is_read(setup, how):
    calm, anchor, input_ids, document = setup
    block = calm.cross_attns[0][0]

    with calm.composed(document):
        anchor.generate(input_ids, **GREEDY)

        if how == 'in place':
            with torch.no_grad():
                block.to_kv.weight.mul_(-3.)  # as an optimizer step changes it
        else:
            block.to_kv.weight.data.mul_(-3.)  # unseen by the weight's version counter

        changed = anchor.generate(input_ids, **GREEDY)

    with calm.composed(document):
        fresh = anchor.generate(input_ids, **GREEDY)

    for a, b in zip(changed.scores, fresh.scores):
        assert torch.equal(a, b)

def test_calls_with_gradients_reach_the_projections(setup):
    calm, anchor, input_ids, document = setup
    block = calm.cross_attns[0][0]

    params = (block.to_kv.weight, block.to_context.weight, block.context_norm.weight)
    grads = []

    # two steps in one block: a memory kept from the first would have no gradients, or a graph
    # already freed by the first backward
    with calm.composed(document):
        for _ in range(2):
            anchor(input_ids).logits.sum().backward()
            grads.append([param.grad.clone() for param in params])

    for first, both in zip(*grads):
        assert first.abs().sum() > 0
        assert torch.allclose(both, 2 * first, atol = 1e-5)
