from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from conftest import NUM_TOKENS, TupleModel, decoder, encoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from segment_model import SegmentLM
from torch import nn

from calm_pytorch import CALM, AugmentParams

# the contract of DESIGN.md, checked on random small compositions: x-transformers decoders and
# encoders, models with tuple-returning blocks and segment-recurrent models, as anchor or augment,
# in aligned and context mode, with random widths, depths, connections, batches, lengths and padding

# few examples keep the suite fast; CALM_PROPERTY_EXAMPLES=500 searches deeper
MAX_EXAMPLES = int(os.environ.get('CALM_PROPERTY_EXAMPLES', 25))

@dataclass
class Augment:
    kind: str         # 'decoder' | 'encoder' | 'tuple' | 'segment'
    dim: int
    depth: int
    mode: str         # 'aligned' | 'context' | 'final_state' (context mode, segment models only)
    connections: tuple | None
    segment_len: int

@dataclass
class Case:
    seed: int
    anchor_kind: str  # 'decoder' | 'segment'
    anchor_dim: int
    anchor_depth: int
    anchor_position: str
    augments: list
    batch: int
    seq_len: int
    context_len: int
    context_lens: list  # real length of each row's context, right-padded to context_len
    perturb_at: int

@st.composite
def augments(draw, anchor_depth: int):
    kind = draw(st.sampled_from(('decoder', 'encoder', 'tuple', 'segment')))
    depth = draw(st.integers(1, 4))

    modes = {'encoder': ('context',), 'segment': ('aligned', 'context', 'final_state')}.get(kind, ('aligned', 'context'))
    mode = draw(st.sampled_from(modes))

    pairs = st.tuples(st.integers(1, depth), st.integers(1, anchor_depth))
    connections = draw(st.none() | st.lists(pairs, min_size = 1, max_size = 3, unique = True).map(tuple))

    return Augment(kind, draw(st.sampled_from((8, 16, 24))), depth, mode, connections, draw(st.integers(2, 4)))

@st.composite
def cases(draw):
    anchor_depth = draw(st.integers(1, 4))
    batch = draw(st.integers(1, 3))
    seq_len = draw(st.integers(2, 10))
    context_len = draw(st.integers(1, 8))

    return Case(
        seed = draw(st.integers(0, 2 ** 16)),
        anchor_kind = draw(st.sampled_from(('decoder', 'segment'))),
        anchor_dim = draw(st.sampled_from((16, 32))),
        anchor_depth = anchor_depth,
        anchor_position = draw(st.sampled_from(('input', 'output'))),
        augments = draw(st.lists(augments(anchor_depth), min_size = 1, max_size = 2)),
        batch = batch,
        seq_len = seq_len,
        context_len = context_len,
        context_lens = draw(st.lists(st.integers(1, context_len), min_size = batch, max_size = batch)),
        perturb_at = draw(st.integers(1, seq_len - 1))
    )

def build_anchor(case: Case):
    if case.anchor_kind == 'segment':
        model = SegmentLM(dim = case.anchor_dim, depth = case.anchor_depth, segment_len = 3)
        return model, dict(anchor_transformer_blocks = model.blocks), lambda seq: model(seq)[0]

    model = decoder(dim = case.anchor_dim, depth = case.anchor_depth)
    return model, dict(), model

def build_augment(augment: Augment) -> AugmentParams:
    kwargs = dict(connections = augment.connections)

    if augment.kind in ('decoder', 'encoder'):
        build = decoder if augment.kind == 'decoder' else encoder
        return AugmentParams(model = build(dim = augment.dim, depth = augment.depth), **kwargs)

    if augment.kind == 'tuple':
        model = TupleModel(dim = augment.dim, depth = augment.depth)
    else:
        model = SegmentLM(dim = augment.dim, depth = augment.depth, segment_len = augment.segment_len)

    if augment.mode == 'final_state':
        kwargs.update(recurrent_context = 'final_state')

    return AugmentParams(model = model, transformer_blocks = model.blocks, **kwargs)

def hook_counts(model):
    return [(len(module._forward_hooks), len(module._forward_pre_hooks)) for module in model.modules()]

def snapshot(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}

def is_context(augment: Augment) -> bool:
    return augment.mode != 'aligned'

@settings(max_examples = MAX_EXAMPLES, deadline = None, suppress_health_check = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case = cases())
def test_contract_holds_for_random_compositions(case: Case):
    torch.manual_seed(case.seed)

    anchor, anchor_kwargs, anchor_logits = build_anchor(case)
    params = [build_augment(augment) for augment in case.augments]
    models = [anchor, *(p.model for p in params)]
    hooks_before = [hook_counts(model) for model in models]

    calm = CALM(anchor, params, anchor_hidden_position = case.anchor_position, attn_kwargs = dict(heads = 2, dim_head = 8), **anchor_kwargs)
    calm.eval()

    # inputs: seq for the anchor, a right-padded context for each augment in context mode

    seq = torch.randint(0, NUM_TOKENS, (case.batch, case.seq_len))
    context_mask = torch.arange(case.context_len)[None, :] < torch.tensor(case.context_lens)[:, None]

    prompts = [torch.randint(0, NUM_TOKENS, (case.batch, case.context_len)) if is_context(augment) else None for augment in case.augments]
    masks = [context_mask if prompt is not None else None for prompt in prompts]

    def run(seq, prompts = prompts, masks = masks):
        return calm(seq, prompt = prompts, prompt_mask = masks, return_loss = False)

    # identity at init

    with torch.no_grad():
        expected = anchor_logits(seq)
        assert torch.equal(run(seq), expected)

    # a random (not constant) delta from every cross-attention

    for blocks in calm.cross_attns:
        for block in blocks:
            nn.init.normal_(block.to_out.weight, std = 0.3)

    with torch.no_grad():
        logits = run(seq)

    assert torch.isfinite(logits).all()
    assert logits.shape == expected.shape

    # causality: changing the token at position j never changes the logits before j
    # (context augments read their own prompt, which stays the same)

    with torch.no_grad():
        changed = seq.clone()
        changed[:, case.perturb_at] = (changed[:, case.perturb_at] + 1) % NUM_TOKENS
        j = case.perturb_at
        assert torch.allclose(run(changed)[:, :j], logits[:, :j], atol = 1e-5)

    # padding invariance: each row with its context cut to its real length gives the same logits

    if any(is_context(augment) for augment in case.augments):
        with torch.no_grad():
            for row, length in enumerate(case.context_lens):
                row_prompts = [prompt[row:row + 1, :length] if prompt is not None else None for prompt in prompts]
                row_logits = run(seq[row:row + 1], row_prompts, [None] * len(prompts))
                assert torch.allclose(row_logits, logits[row:row + 1], atol = 1e-4)

    # a training step changes the composition and nothing of the frozen models

    saved = [snapshot(model) for model in models]
    optim = torch.optim.SGD(calm.parameters(), lr = 0.1)
    calm.train()

    loss = calm(seq, prompt = prompts, prompt_mask = masks)
    assert torch.isfinite(loss)
    loss.backward()
    optim.step()

    for model, state in zip(models, saved):
        assert all(torch.equal(tensor, model.state_dict()[name]) for name, tensor in state.items())
        assert all(param.grad is None for param in model.parameters())

    assert all(param.grad is not None for param in calm.cross_attns.parameters())

    # no hook left behind

    calm.remove_hooks()
    assert [hook_counts(model) for model in models] == hooks_before
