from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import decoder, tokens
from hf_models import gpt2, llama

from calm_pytorch import CALM, AugmentParams

# one composition serving several threads: per-call state (contexts, recordings, the positions a
# segment has reached) is per thread, so concurrent calls give exactly the sequential results

ROUNDS = 20
GREEDY_HF = dict(max_new_tokens = 4, do_sample = False, eos_token_id = None, pad_token_id = 0)

@pytest.fixture(autouse = True)
def frequent_thread_switches():
    # switch threads every 0.1 ms instead of 5 ms, so that calls interleave inside the hooks
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(interval)

def random_composition(anchor, augments) -> CALM:
    calm = CALM(anchor, augments, attn_kwargs = dict(heads = 2, dim_head = 16))

    # non-zero deltas: a context crossed between threads must change the output
    with torch.no_grad():
        for param in calm.cross_attns.parameters():
            param.normal_(std = 0.5)

    return calm

def run_together(calls: list[Callable[[], object]], rounds: int = ROUNDS) -> list[list]:
    """Runs the calls at once, one per thread, released together by a barrier, `rounds` times;
    returns the results of each round."""

    results = []

    with ThreadPoolExecutor(len(calls)) as pool:
        for _ in range(rounds):
            barrier = threading.Barrier(len(calls))

            def released(call):
                barrier.wait()
                return call()

            futures = [pool.submit(released, call) for call in calls]
            results.append([future.result() for future in futures])

    return results

def assert_same_as_sequential(calls: list[Callable[[], object]]):
    expected = [call() for call in calls]

    for outputs in run_together(calls):
        for output, reference in zip(outputs, expected):
            assert torch.equal(output, reference)

def test_x_transformers_calls_from_four_threads_match_sequential_calls():
    torch.manual_seed(0)
    calm = random_composition(decoder(dim = 32, depth = 2), [decoder(dim = 24, depth = 2), decoder(dim = 16, depth = 2)])
    calm.eval()

    # different inputs per thread; aligned and context mode at once, both augments in each call
    seqs = [tokens(length = 12) for _ in range(4)]
    prompts = [tokens(length = 8) for _ in range(4)]
    prompt_mask = torch.ones(2, 8, dtype = torch.bool)
    prompt_mask[1, 5:] = False

    calls = [
        lambda: calm(seqs[0], return_loss = False),
        lambda: calm(seqs[1], prompt = [None, prompts[1]], prompt_mask = [None, prompt_mask], return_loss = False),
        lambda: calm(seqs[2], prompt = prompts[2]).detach(),
        lambda: calm(seqs[3], prompt = [prompts[3], None], return_loss = False),
    ]
    assert_same_as_sequential(calls)

    generations = [
        lambda: calm.generate(seqs[0][:, :4], max_new_tokens = 5, temperature = 0.),
        lambda: calm.generate(seqs[1][:, :4], max_new_tokens = 5, temperature = 0., use_cache = False),
        lambda: calm.generate(seqs[2][:, :4], max_new_tokens = 5, temperature = 0., prompt = [None, prompts[2]], prompt_mask = [None, prompt_mask]),
        lambda: calm.generate(seqs[3][:, :4], max_new_tokens = 5, temperature = 0., prompt = prompts[3], use_cache = False),
    ]
    assert_same_as_sequential(generations)

def test_hf_forward_generate_and_composed_generate_from_four_threads_match_sequential_calls():
    torch.manual_seed(0)
    anchor = llama(depth = 2).eval()
    calm = random_composition(anchor, AugmentParams(model = gpt2(depth = 2), connections = ((1, 1), (2, 2))))

    seqs = [torch.randint(3, 100, (2, 6)) for _ in range(4)]
    documents = [torch.randint(3, 100, (2, 7)) for _ in range(4)]

    def composed_generate(input_ids, document):
        with calm.composed(document) as composed:
            return composed.generate(input_ids, **GREEDY_HF)

    calls = [
        lambda: calm(seqs[0], return_loss = False),
        lambda: calm.generate(seqs[1], max_new_tokens = 4, temperature = 0., prompt = documents[1]),
        lambda: composed_generate(seqs[2], documents[2]),
        lambda: composed_generate(seqs[3], documents[3]),
    ]
    assert_same_as_sequential(calls)

def test_the_anchor_called_directly_in_another_thread_stays_plain():
    # hooks are guests: while other threads run composed calls (a CALM forward, or an open
    # `composed(...)` block), a thread calling the anchor or the augment itself gets its plain output
    torch.manual_seed(0)
    anchor, augment = llama(depth = 2).eval(), gpt2(depth = 2).eval()
    calm = random_composition(anchor, AugmentParams(model = augment, connections = ((1, 1), (2, 2))))

    seq, document = torch.randint(3, 100, (2, 6)), torch.randint(3, 100, (2, 7))
    plain, plain_augment = anchor(seq).logits, augment(document).logits
    plain_generated = anchor.generate(seq, **GREEDY_HF)

    def composed_forward():
        with calm.composed(document) as composed:
            return composed(seq).logits

    calls = [
        lambda: anchor(seq).logits,
        lambda: anchor.generate(seq, **GREEDY_HF),
        lambda: augment(document).logits,
        lambda: calm(seq, prompt = document, return_loss = False),
        composed_forward,
    ]

    for direct, direct_generated, direct_augment, composed_logits, composed_block_logits in run_together(calls):
        assert torch.equal(direct, plain)
        assert torch.equal(direct_generated, plain_generated)
        assert torch.equal(direct_augment, plain_augment)
        assert not torch.equal(composed_logits, plain)
        assert torch.equal(composed_block_logits, composed_logits)
