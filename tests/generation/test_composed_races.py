from __future__ import annotations

import _thread
import inspect
import sys
import threading

import pytest
import torch
import transformers
from hf_models import ENCODERS, LLAMA_LIKE

from calm_pytorch import CALM, AugmentParams
from calm_pytorch.composition.injection import AnchorInjector
from calm_pytorch.generation.composed_anchor import ContextsForBatch

# a `composed(...)` block decides from its hooks which threads it composes, while other threads
# call the anchor, open blocks and close them. Each test holds one thread at an exact line of those
# hooks (sys.settrace) while another acts, the interleavings a busy server meets by chance: every
# call must read the plain anchor or the composed one whole, and leave its thread and the anchor
# as they were

class HoldAt:
    """A tracer for one thread (sys.settrace): holds it at the `nth` time it reaches the line of
    `function` (or of a comprehension inside it) that holds `text`, until `release` is set."""

    def __init__(self, function, text: str, nth: int = 1):
        lines, first = inspect.getsourcelines(function)
        self.line = first + next(index for index, line in enumerate(lines) if text in line)
        self.name, self.left = function.__qualname__, nth
        self.held, self.release = threading.Event(), threading.Event()

    def __call__(self, frame, event, arg):
        return self.on_line if frame.f_code.co_qualname.startswith(self.name) else None

    def on_line(self, frame, event, arg):
        if event == 'line' and frame.f_lineno == self.line:
            self.left -= 1
            if self.left == 0:
                self.held.set()
                assert self.release.wait(timeout = 60)
        return self.on_line

def traced(hold: HoldAt, call):
    sys.settrace(hold)
    try:
        return call()
    finally:
        sys.settrace(None)

def started(target) -> threading.Thread:
    thread = threading.Thread(target = target)
    thread.start()
    return thread

def block_held_open(calm, document, start: threading.Event, opened: threading.Event, close: threading.Event):
    """A thread's body: once `start` is set, opens a block, sets `opened`, and exits when `close` is set."""

    def run():
        assert start.wait(timeout = 60)
        with calm.composed(document):
            opened.set()
            assert close.wait(timeout = 60)

    return run

def no_hooks(anchor) -> bool:
    return len(anchor._forward_pre_hooks) == 0 and len(anchor._forward_hooks) == 0

@pytest.fixture(scope = 'module')
def setup():
    torch.manual_seed(0)
    anchor = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_LIKE, num_key_value_heads = 1)).eval()
    calm = CALM(anchor, AugmentParams(model = ENCODERS['bert'].build(), connections = ((1, 1), (2, 2))), attn_kwargs = dict(heads = 2, dim_head = 16))

    with torch.no_grad():
        for param in calm.cross_attns.parameters():
            param.normal_(std = 0.5)

    input_ids, document = torch.randint(3, 100, (1, 5)), torch.randint(3, 100, (1, 7))
    plain = anchor(input_ids).logits.detach()

    with calm.composed(document) as composed:
        composed_logits = composed(input_ids).logits.detach()

    assert not torch.equal(plain, composed_logits)
    return calm, anchor, input_ids, document, plain, composed_logits

def test_a_thread_running_before_the_block_calls_the_anchor_as_it_closes(setup):
    # its pre-hook reads that the block is open, and is held before it reads which threads were
    # running before; the opener then closes the block. Claimed as started inside, the thread
    # would read composed logits and keep the contexts, its after-hook gone with the hooks (CI hit this)
    calm, anchor, input_ids, document, plain, _ = setup
    hold = HoldAt(ContextsForBatch.started_in_block, 'running_before')
    both_running, opened, close, seen = threading.Event(), threading.Event(), threading.Event(), {}

    def caller():
        assert opened.wait(timeout = 60)
        seen['logits'] = traced(hold, lambda: anchor(input_ids).logits)
        seen['contexts'] = calm.injector.call.contexts

    threads = [started(block_held_open(calm, document, both_running, opened, close)), started(caller)]
    both_running.set()
    assert hold.held.wait(timeout = 60)
    close.set()
    threads[0].join(timeout = 1)  # the block closes here, unless closing waits for the caller's decision
    hold.release.set()

    for thread in threads:
        thread.join()

    assert torch.equal(seen['logits'], plain) and seen['contexts'] is None
    assert no_hooks(anchor)

def test_a_thread_started_while_the_block_closes_stays_plain(setup):
    # the opener is held inside close(), between listing the threads started inside and storing
    # that list; a thread started then must not be claimed by a block whose hooks are about to go
    calm, anchor, input_ids, document, plain, _ = setup
    hold = HoldAt(ContextsForBatch.close, 'if by_opener')
    opened, seen = threading.Event(), {}

    def opener():
        block = calm.composed(document)
        block.__enter__()
        opened.set()
        traced(hold, lambda: block.__exit__(None, None, None))

    def caller():
        seen['first'] = anchor(input_ids).logits
        seen['contexts'] = calm.injector.call.contexts
        seen['second'] = anchor(input_ids).logits

    closing = started(opener)
    assert opened.wait(timeout = 60) and hold.held.wait(timeout = 60)
    calling = started(caller)
    calling.join(timeout = 1)  # the caller's call runs here, unless it waits for the close
    hold.release.set()
    closing.join()
    calling.join()

    assert torch.equal(seen['first'], plain) and torch.equal(seen['second'], plain)
    assert seen['contexts'] is None and no_hooks(anchor)

def test_the_opener_calls_the_anchor_while_another_thread_exits_its_block(setup):
    # an ExitStack handed to another thread, held inside close(): the opener's call meanwhile must
    # neither fail nor keep the block's hooks on the anchor once the close is done
    calm, anchor, input_ids, document, plain, composed = setup
    block = calm.composed(document)
    block.__enter__()
    hold = HoldAt(ContextsForBatch.close, 'started_inside = {thread')
    exiting = started(lambda: traced(hold, lambda: block.__exit__(None, None, None)))
    assert hold.held.wait(timeout = 60)

    try:
        during = anchor(input_ids).logits  # the block is not closed yet
    finally:
        hold.release.set()
        exiting.join()

    assert torch.equal(during, composed)
    assert torch.equal(anchor(input_ids).logits, plain) and no_hooks(anchor)

def test_a_thread_python_did_not_start_reads_the_plain_anchor(setup):
    # a C library's thread (here `_thread`'s) running before the block, first seen by `threading`
    # inside it: it cannot be known to have started inside, and its thread object never ends
    calm, anchor, input_ids, document, plain, _ = setup
    call, done, seen = threading.Event(), threading.Event(), {}

    def foreign():
        assert call.wait(timeout = 60)
        seen['logits'] = anchor(input_ids).logits
        done.set()

    _thread.start_new_thread(foreign, ())

    with calm.composed(document):
        call.set()
        assert done.wait(timeout = 60)

    assert torch.equal(seen['logits'], plain) and no_hooks(anchor)

def test_two_threads_of_a_block_meet_a_new_batch_size_at_once(setup):
    # the opener and a thread it started call the anchor at batch 2 (a prompt of batch 1, with
    # gradients on): the thread is held where it is about to store the expanded contexts while the
    # opener's call is held mid-forward. Both must hold the same kept list, or the opener's
    # after-hook no longer knows its contexts and leaves them set for its next call
    calm, anchor, input_ids, document, _, composed = setup
    pair = input_ids.expand(2, -1)

    with calm.composed(document) as block:
        expected = block(pair).logits.detach()

    storing = HoldAt(ContextsForBatch.hiddens_for_batch, 'if batch % self.batch != 0')
    mid_forward = HoldAt(AnchorInjector.inject, 'call = self.call')
    seen = {}

    def started_inside():
        seen['thread'] = traced(storing, lambda: anchor(pair).logits.detach())

    def opener():
        with calm.composed(document):
            thread = started(started_inside)
            assert storing.held.wait(timeout = 60)
            seen['opener'] = traced(mid_forward, lambda: anchor(pair).logits.detach())
            seen['next'] = anchor(input_ids).logits.detach()
            thread.join()

    opening = started(opener)
    assert mid_forward.held.wait(timeout = 60)
    storing.release.set()

    while 'thread' not in seen:  # the thread's call ends without the opener's
        assert opening.is_alive()
        threading.Event().wait(0.01)

    mid_forward.release.set()
    opening.join()

    assert torch.equal(seen['thread'], expected) and torch.equal(seen['opener'], expected)
    assert torch.equal(seen['next'], composed)
    assert no_hooks(anchor)

def test_a_thread_started_inside_calls_the_anchor_as_another_block_opens(setup):
    # a streamer's thread, started inside one block, is held while its hook lists the anchor's
    # hooks; another thread then opens a block of its own, changing that dict
    calm, anchor, input_ids, document, _, composed = setup
    hold = HoldAt(ContextsForBatch.claims, 'isinstance(hook, ContextsForBatch)', nth = 2)
    open_other, other_open, close_other, seen = threading.Event(), threading.Event(), threading.Event(), {}

    other = started(block_held_open(calm, document, open_other, other_open, close_other))  # running before the first block: not composed by it

    with calm.composed(document) as block:
        worker = started(lambda: seen.update(logits = traced(hold, lambda: block(input_ids).logits), contexts = calm.injector.call.contexts))
        assert hold.held.wait(timeout = 60)
        open_other.set()
        assert other_open.wait(timeout = 60)
        hold.release.set()
        worker.join()

    close_other.set()
    other.join()

    assert torch.equal(seen['logits'], composed) and seen['contexts'] is None
    assert no_hooks(anchor)
