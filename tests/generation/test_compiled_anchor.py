from __future__ import annotations

import inspect
import threading

import pytest
import torch
from hf_models import ENCODERS, llama
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import LlamaForCausalLM

from calm_pytorch import CALM, AugmentParams

# a compiled anchor inside `composed(...)`: the injection must not hand torch.compile a value that
# changes per call (it recompiled at every step until the limit: an error with fullgraph = True, a
# silent fall back to eager without). More steps than torch's recompile limit (8) show it.
# The backend is 'eager': the recompiles are decided by dynamo's guards, whichever backend compiles
# the graphs, and inductor's C++ build takes minutes on a CPU

STEPS = 9

@pytest.fixture
def setup():
    torch.manual_seed(0)
    torch._dynamo.reset()
    anchor = llama(depth = 2).eval()
    calm = CALM(anchor, AugmentParams(model = ENCODERS['bert'].build(), connections = ((1, 1), (2, 2))), attn_kwargs = dict(heads = 2, dim_head = 16))

    with torch.no_grad():
        for param in calm.cross_attns.parameters():
            param.normal_(std = 0.5)

    yield calm, anchor, torch.randint(3, 100, (2, 5)), torch.randint(3, 100, (2, 7))
    torch._dynamo.reset()

# the cache's keyword: `cache` since transformers 5.24, `past_key_values` before
CACHE = 'cache' if 'cache' in inspect.signature(LlamaForCausalLM.forward).parameters else 'past_key_values'

@torch.no_grad()
def greedy(model, input_ids, steps = STEPS):
    cache, tokens, all_logits = None, input_ids, []

    for _ in range(steps):
        output = model(input_ids = tokens, use_cache = True, **({CACHE: cache} if cache is not None else {}))
        cache, logits = output[CACHE], output.logits[:, -1]
        tokens = logits.argmax(dim = -1, keepdim = True)
        all_logits.append(logits)

    return torch.stack(all_logits, dim = 1)

def test_a_compiled_anchor_decodes_composed_compiling_once_per_shape(setup):
    calm, anchor, input_ids, document = setup
    counter = CompileCounterWithBackend('eager')

    with calm.composed(document) as composed:
        eager = greedy(composed, input_ids)
        compiled = torch.compile(composed, backend = counter, fullgraph = True)
        logits = greedy(compiled, input_ids)
        graphs = counter.frame_count

        # a second generation, with new caches, compiles nothing
        assert torch.equal(greedy(compiled, input_ids), logits)
        assert counter.frame_count == graphs

    # as the plain anchor: the prompt, the first step, then one graph for any cache length (a
    # graph per step would reach torch's limit of 8 recompiles, an error with fullgraph = True)
    assert graphs <= 4
    assert torch.equal(logits, eager)
    assert not torch.equal(logits, greedy(anchor, input_ids))

@pytest.mark.parametrize('compiled_model', ['anchor', 'augment'])
def test_calm_generate_with_hugging_face_s_compiled_forward_compiles_once_per_shape(compiled_model):
    # `model.forward = torch.compile(model.forward)` is how transformers documents compiling for
    # generation; calm.generate then decodes through the compiled forward, whose cache must be
    # traceable (the reserved room's bookkeeping is not: it concatenates there), and an augment
    # compiled alone runs to its end (stopping it early would leave its graph by an exception)
    torch.manual_seed(0)
    torch._dynamo.reset()
    anchor, augment = llama(depth = 2).eval(), llama(depth = 2).eval()
    calm = CALM(anchor, AugmentParams(model = augment, connections = ((1, 1), (2, 2))), attn_kwargs = dict(heads = 2, dim_head = 16))

    with torch.no_grad():
        for param in calm.cross_attns.parameters():
            param.normal_(std = 0.5)

    prompt = torch.randint(3, 100, (2, 5))
    eager = calm.generate(prompt, max_new_tokens = STEPS + 1, temperature = 0.)
    own = anchor.generate(prompt, attention_mask = torch.ones_like(prompt), max_new_tokens = STEPS + 1, do_sample = False, eos_token_id = None)
    assert not torch.equal(eager, own[:, 5:])  # the composition changes the tokens

    counter = CompileCounterWithBackend('eager')
    model = anchor if compiled_model == 'anchor' else augment
    model.forward = torch.compile(model.forward, backend = counter, fullgraph = True)

    try:
        compiled = calm.generate(prompt, max_new_tokens = STEPS + 1, temperature = 0.)
        graphs = counter.frame_count
        again = calm.generate(prompt, max_new_tokens = STEPS + 1, temperature = 0.)
    finally:
        torch._dynamo.reset()

    assert torch.equal(compiled, eager) and torch.equal(again, eager)
    assert graphs <= 4 and counter.frame_count == graphs  # the prompt, the first step, then any length

def test_a_compiled_anchor_in_a_second_block_while_a_thread_of_the_first_lives(setup):
    # a thread started inside a block keeps its hooks on the anchor while it lives (torch.compile
    # itself may start one, such as tqdm's monitor); the next block's compiled calls go through
    # those hooks too, which must not hand dynamo their check for ended threads (a lock)
    calm, anchor, input_ids, document = setup
    counter = CompileCounterWithBackend('eager')
    compiled = torch.compile(anchor, backend = counter, fullgraph = True)
    release = threading.Event()

    with calm.composed(document) as composed:
        eager = greedy(composed, input_ids)
        lingering = threading.Thread(target = release.wait)
        lingering.start()

    try:
        graphs = []

        for _ in range(2):
            with calm.composed(document):
                assert torch.equal(greedy(compiled, input_ids), eager)

            graphs.append(counter.frame_count)
    finally:
        release.set()
        lingering.join()

    assert graphs[0] <= 4 and graphs[1] == graphs[0]  # the next block compiles nothing more

    greedy(anchor, input_ids)  # an eager call once the thread has ended removes the first block's hooks
    assert len(anchor._forward_pre_hooks) == 0 and len(anchor._forward_hooks) == 0
