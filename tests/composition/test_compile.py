from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch._dynamo as dynamo

import calm_pytorch
from calm_pytorch import CALM, AugmentParams
from conftest import decoder, tokens

PACKAGE = Path(calm_pytorch.__file__).resolve().parent

# one small composition that exercises every hook path: an aligned augment stopped early (causal
# cross-attention) and a context augment with padding (masked cross-attention), both feeding one anchor layer

def composition(seed: int = 0) -> tuple[CALM, dict]:
    torch.manual_seed(seed)

    calm = CALM(
        decoder(dim = 32, depth = 2),
        [AugmentParams(model = decoder(dim = 24, depth = 2), connections = ((1, 2),)), AugmentParams(model = decoder(dim = 16, depth = 1))],
        attn_kwargs = dict(heads = 2, dim_head = 16)
    )

    # random output projections, so that the deltas and every gradient are non-zero
    with torch.no_grad():
        for param in calm.cross_attns.parameters():
            param.normal_(std = 0.2)

    prompt_mask = torch.ones(2, 10, dtype = torch.bool)
    prompt_mask[0, 7:] = False
    inputs = dict(seq = tokens(), prompt = [None, tokens(length = 10)], prompt_mask = [None, prompt_mask])
    return calm, inputs

def in_package(filename: str) -> bool:
    # code generated for the package (beartype's wrappers: '<@beartype(calm_pytorch.calm.CALM.forward) ...>') counts as its own
    return PACKAGE in Path(filename).resolve().parents or 'calm_pytorch.' in filename

def breaks_in_package(explanation) -> list[str]:
    # a break's innermost frame is where tracing stopped; every frame below torch.compile(calm)
    # has CALM.forward on its stack, so only the innermost one says whose code broke the graph
    return [
        f'{frame.filename}:{frame.lineno}: {reason.reason}'
        for reason in explanation.break_reasons
        for frame in reason.user_stack[-1:]
        if in_package(frame.filename)
    ]

def test_composition_traces_without_graph_breaks_in_calm_pytorch():
    calm, inputs = composition()
    dynamo.reset()

    # the very first call: nothing may be left to probe lazily inside the compiled region
    explanation = dynamo.explain(calm)(**inputs)

    assert explanation.graph_count >= 1
    assert breaks_in_package(explanation) == []

def test_compiled_training_step_matches_eager():
    calm, inputs = composition()
    compiled_calm, _ = composition()
    dynamo.reset()

    # fullgraph: any graph break anywhere is an error. The eager backend keeps the test fast; the
    # benchmark runs the same composition through inductor
    compiled = torch.compile(compiled_calm, backend = 'eager', fullgraph = True)

    loss = calm(**inputs)
    loss.backward()

    for _ in range(2):  # the second step must reuse the graph, and still be right
        compiled_calm.zero_grad(set_to_none = True)
        compiled_loss = compiled(**inputs)
        compiled_loss.backward()

    assert torch.allclose(loss, compiled_loss, atol = 1e-5)

    for param, compiled_param in zip(calm.cross_attns.parameters(), compiled_calm.cross_attns.parameters()):
        assert compiled_param.grad is not None
        assert torch.allclose(param.grad, compiled_param.grad, atol = 1e-5, rtol = 1e-4)

    assert all(param.grad is None for param in compiled_calm.anchor.parameters())

def test_models_compiled_before_the_composition_is_built_are_refused():
    # torch.compile does not guard on hooks: code compiled before the CALM hooks a model would run
    # on without them (the constructor failed with a bare KeyError, or a composition was skipped)
    def compiled_forward(model):
        model.forward = torch.compile(model.forward, backend = 'eager')
        return model

    def compiled_layers(model):
        model.attn_layers.compile(backend = 'eager')  # the anchor's first site: its input
        return model

    ways = [
        (compiled_forward, "already compiled (the model, by `.forward = torch.compile(...)`)"),
        (compiled_layers, 'already compiled (`attn_layers`, by `.compile()`)'),
        (lambda model: torch.compile(model, backend = 'eager'), 'is a torch.compile wrapper (OptimizedModule)'),
    ]

    for compile_model, message in ways:
        for role in ('anchor_llm', 'augment_llms[0]'):
            anchor, augment = decoder(dim = 32, depth = 2), decoder(dim = 24, depth = 2)
            anchor, augment = (compile_model(anchor), augment) if role == 'anchor_llm' else (anchor, compile_model(augment))

            with pytest.raises(TypeError, match = f'^{re.escape(role)} .*{re.escape(message)}'):
                CALM(anchor, AugmentParams(model = augment), attn_kwargs = dict(heads = 2, dim_head = 16))

    # a module inside a block runs between the hooks: compiled before, it is composed as eager
    torch.manual_seed(0)
    anchor, augment = decoder(dim = 32, depth = 2), decoder(dim = 24, depth = 2)
    eager = CALM(anchor, AugmentParams(model = augment), attn_kwargs = dict(heads = 2, dim_head = 16))
    with torch.no_grad():
        for param in eager.cross_attns.parameters():
            param.normal_(std = 0.3)

    seq = tokens()
    expected = eager(seq, return_loss = False)
    eager.remove_hooks()

    anchor.attn_layers.layers[0].compile(backend = 'eager')  # the first attention, inside block 1
    calm = CALM(anchor, AugmentParams(model = augment), attn_kwargs = dict(heads = 2, dim_head = 16))
    calm.load_state_dict(eager.state_dict())
    assert torch.allclose(calm(seq, return_loss = False), expected, atol = 1e-6)

    dynamo.reset()
