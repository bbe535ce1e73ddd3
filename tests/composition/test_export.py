from __future__ import annotations

import pytest
import torch

import hf_models
from calm_pytorch import CALM, AugmentParams
from conftest import decoder, tokens

# torch.export of a composition: the exported program computes what the eager one does. The
# augment's forward is normally stopped after its deepest connected layer by an exception, which
# export's default (non-strict) tracer cannot unwind through; while exporting it runs to its end

def composition() -> CALM:
    torch.manual_seed(0)
    calm = CALM(decoder(dim = 32, depth = 2), AugmentParams(model = decoder(dim = 24, depth = 8), connections = ((4, 1), (6, 2))), attn_kwargs = dict(heads = 2, dim_head = 16))

    # random output projections, so that the deltas are non-zero
    with torch.no_grad():
        for param in calm.cross_attns.parameters():
            param.normal_(std = 0.2)

    return calm.eval()

def context_inputs() -> dict:
    prompt_mask = torch.ones(2, 10, dtype = torch.bool)
    prompt_mask[0, 6:] = False
    return dict(prompt = tokens(length = 10), prompt_mask = prompt_mask)

@pytest.mark.parametrize('strict', [False, True])
@pytest.mark.parametrize('mode', ['aligned', 'context'])
def test_exported_composition_matches_eager(mode, strict):
    calm = composition()
    context = context_inputs() if mode == 'context' else {}

    exported = torch.export.export(calm, (tokens(),), dict(return_loss = False, **context), strict = strict)

    # new tokens of the same shapes: the program computes, it did not record one answer
    seq = tokens()
    context = {key: value.clone() for key, value in context.items()}
    if mode == 'context':
        context['prompt'] = tokens(length = 10)

    with torch.no_grad():
        expected = calm(seq, return_loss = False, **context)
        logits = exported.module()(seq, return_loss = False, **context)

    torch.testing.assert_close(logits, expected, atol = 1e-6, rtol = 0)

    # the deltas are in the exported program: without them the logits are the anchor's alone
    assert not torch.allclose(logits, calm.anchor(seq), atol = 1e-3)

def test_the_augment_still_stops_early_outside_export():
    calm = composition()
    called = []
    calm.augments[0].attn_layers.layers[-1][1].register_forward_hook(lambda *args: called.append(True))

    exported = torch.export.export(calm, (tokens(),), dict(return_loss = False))
    assert len(called) == 1  # export ran the augment to its end, once

    calm(tokens(), return_loss = False)
    exported.module()(tokens(), return_loss = False)
    assert len(called) == 1

def test_aligned_mode_exports_and_compiles_for_any_sequence_length():
    # the checks of the augment's hidden states compare symbolic sizes without pinning them
    from torch._dynamo.utils import counters
    from torch.export import Dim

    torch.manual_seed(0)
    calm = CALM(hf_models.llama(), AugmentParams(model = hf_models.llama(dim = 24), connections = ((1, 1), (2, 2))), attn_kwargs = dict(heads = 2, dim_head = 16)).eval()
    seq = torch.randint(3, 128, (2, 12))

    exported = torch.export.export(calm, (seq,), dict(return_loss = False), dynamic_shapes = ({1: Dim('n', min = 2, max = 60)}, None))
    longer = torch.randint(3, 128, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(longer, return_loss = False), calm(longer, return_loss = False), atol = 1e-6, rtol = 0)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(calm)
    with torch.no_grad():
        for length in range(10, 15):
            compiled(torch.randint(3, 128, (2, length)), return_loss = False)

    assert counters['stats']['unique_graphs'] <= 2  # one static, one dynamic: not one per length
