from __future__ import annotations

import pytest
import torch
from conftest import decoder, tokens
from torch import nn

from calm_pytorch import CALM, CrossAttentionBlock
from calm_pytorch.composition.cross_attention import ContextMemory

# a decoding step may attend over the normalised augment states with the key and value projections
# folded into the query and output projections (`step_folded`): the same attention, fewer numbers read

def random_block(dim = 32, dim_context = 12, heads = 4, dim_head = 16) -> CrossAttentionBlock:
    torch.manual_seed(0)
    block = CrossAttentionBlock(dim, dim_context, heads = heads, dim_head = dim_head)

    # every weight random, f_proj's bias and the layer norms' too: the algebra must hold for all of them
    for param in block.parameters():
        nn.init.normal_(param, std = 0.5)

    return block.eval()

@pytest.mark.parametrize('pattern', ['none', 'padding', 'no key', 'visible'])
def test_a_folded_step_equals_attention_over_keys_and_values(pattern):
    block = random_block()
    b, j = 3, 9
    x, context = torch.randn(b, 1, 32), torch.randn(b, j, 12)
    kwargs = {}

    if pattern in ('padding', 'no key'):
        mask = torch.ones(b, j, dtype = torch.bool)
        mask[1, :4] = False
        if pattern == 'no key':
            mask[2] = False  # this row sees nothing: its delta is zero
        kwargs = dict(mask = mask)

    if pattern == 'visible':
        kwargs = dict(visible = torch.rand(b, 1, j) > 0.5)

    folded = block.fold()
    memory = ContextMemory(block.remember(context, folded), folded)

    # per position the memory holds the normalised state (c numbers), not a key and a value (2 h d)
    assert [tuple(t.shape) for t in memory.states] == [(b, 1, j, 12)]

    with torch.no_grad():
        expected = block(x, context, **kwargs)
        got = block(x, memory = memory, **kwargs)

    assert torch.allclose(got, expected, atol = 1e-5, rtol = 1e-4)
    assert expected.abs().max() > 1.  # the block is far from adding nothing

    if pattern == 'no key':
        assert torch.equal(got[2], torch.zeros_like(got[2]))

def test_many_queries_over_a_folded_memory_project_keys_and_values():
    # the prompt of a generation reads the same memory the steps read, with the usual attention
    block = random_block()
    x, context = torch.randn(2, 5, 32), torch.randn(2, 7, 12)
    folded = block.fold()

    with torch.no_grad():
        expected = block(x, context, causal = True)
        got = block(x, memory = ContextMemory(block.remember(context, folded), folded), causal = True)

    assert torch.allclose(got, expected, atol = 1e-5, rtol = 1e-4)

def test_folding_is_chosen_only_where_a_step_reads_fewer_numbers():
    # numbers read per step: 2 keys c + 2 dim h c folded against 2 keys h d + 2 dim h d
    narrow = random_block(dim_context = 24, heads = 4, dim_head = 16)  # d = 16 < c = 24 < h d = 64: from 26 keys on
    assert narrow.fold_for(25) is None
    assert narrow.fold_for(26) is not None

    narrower = random_block(dim_context = 12, heads = 4, dim_head = 16)  # c < d: always
    assert narrower.fold_for(1) is not None

    wide = random_block(dim_context = 64, heads = 4, dim_head = 16)  # c = h d: never pays
    assert wide.fold_for(10 ** 6) is None

    memory = wide.remember(torch.randn(2, 5, 64), wide.fold_for(10 ** 6))
    assert [tuple(t.shape) for t in memory] == [(2, 4, 5, 16)] * 2  # keys and values

def test_folding_counts_what_remembering_a_new_position_reads():
    # aligned mode remembers each step's new positions: kept as keys and values, through the
    # context and key-value projections (c dim + dim 2 h d more numbers a step), folded through
    # the norm alone. The benchmark's shape (dim 256, c 128, 8 heads of 64) at batch 1 with
    # 320 positions: 606,208 numbers folded, 589,824 plain, 884,736 plain and appending
    block = random_block(dim = 256, dim_context = 128, heads = 8, dim_head = 64)
    assert block.fold_for(320) is None
    assert block.fold_for(320, appending = True) is not None

    wide = random_block(dim_context = 64, heads = 4, dim_head = 16)  # c = h d: never pays
    assert wide.fold_for(10 ** 6, appending = True) is None

@pytest.mark.parametrize('mode', ['aligned', 'context'])
def test_generation_folds_and_reads_each_position_once(monkeypatch, mode):
    torch.manual_seed(0)
    calm = CALM(decoder(dim = 32, depth = 2), decoder(dim = 16, depth = 4)).eval()
    for param in calm.cross_attns.parameters():
        nn.init.normal_(param, std = 0.3)

    prompt = tokens(4, 12)
    kwargs = dict(prompt = tokens(4, 16)) if mode == 'context' else {}
    num_blocks = sum(len(blocks) for blocks in calm.cross_attns)

    folded_steps, projected = [], []
    step_folded, keys_values_of = CrossAttentionBlock.step_folded, CrossAttentionBlock.keys_values_of
    monkeypatch.setattr(CrossAttentionBlock, 'step_folded', lambda self, *args: folded_steps.append(1) or step_folded(self, *args))
    monkeypatch.setattr(CrossAttentionBlock, 'keys_values_of', lambda self, states: projected.append(states.shape[-2]) or keys_values_of(self, states))

    folded = calm.generate(prompt, max_new_tokens = 6, temperature = 0., **kwargs)

    # the prompt's call projects its keys and values once per block; every later step attends folded
    assert projected == [prompt.shape[-1] if mode == 'aligned' else 16] * num_blocks
    assert len(folded_steps) == 5 * num_blocks

    monkeypatch.setattr(CrossAttentionBlock, 'fold_for', lambda self, keys, **kwargs: None)
    plain = calm.generate(prompt, max_new_tokens = 6, temperature = 0., **kwargs)
    assert torch.equal(folded, plain)
