from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.nn import Module

from calm_pytorch.composition.contexts import augment_contexts
from calm_pytorch.composition.injection import AugmentContext
from calm_pytorch.composition.inputs import check_materialised, check_usable
from calm_pytorch.composition.protocol import Composition
from calm_pytorch.generation.kv_buffers import fixed_memory
from calm_pytorch.helpers import PerThread, exists

# the anchor's own forward and generate(), composed in context mode: the augments run once on
# their prompts, and every anchor call inside the `with` block cross-attends to what they recorded.
# generate() may run the anchor on more rows than there are prompts (beams, num_return_sequences):
# it expands each example into consecutive rows, so the context rows are repeated the same way,
# once per batch size seen, not once per token. Calls without gradients read each
# cross-attention's keys and values of the contexts, projected at the call that starts a cache (a
# generation's prompt) and read by the calls that continue it, as `calm.generate` projects them
# once per call: weights changed between generations, by whatever means, are read. Calls with
# gradients read the contexts themselves, so that the projections get their gradients

def expand_context(context: AugmentContext, times: int) -> AugmentContext:
    return AugmentContext(
        hiddens = {key: hidden.repeat_interleave(times, dim = 0) for key, hidden in context.hiddens.items()},
        mask = context.mask.repeat_interleave(times, dim = 0) if exists(context.mask) else None,
        causal = context.causal
    )

def call_batch_size(args: tuple, kwargs: dict) -> int | None:
    # transformers models are called with keywords, x-transformers and plain modules positionally
    for key in ('input_ids', 'inputs_embeds'):
        if isinstance(kwargs.get(key), Tensor):
            return kwargs[key].shape[0]

    first = next((arg for arg in args if isinstance(arg, Tensor)), None)
    return first.shape[0] if exists(first) else None

def continues_a_cache(kwargs: dict, key: str | None) -> bool:
    # a transformers cache holding positions (or a legacy tuple of layers) under the model's keyword
    cache = kwargs.get(key) if exists(key) else None

    if not exists(cache):
        return False

    length = cache.get_seq_length() if callable(getattr(cache, 'get_seq_length', None)) else len(cache)
    return length > 0

class ThreadRole(PerThread):
    """Whether the calling thread is composed by one `composed(...)` block: None until its first
    anchor call decides it, then True or False for the thread's life (the opener: True until exit)."""

    def __init__(self):
        self.composed: bool | None = None
        self.started_inside = False

class ContextsForBatch:
    """Forward pre-hook on the anchor: before each call of a thread the block composes, hands the
    injector the contexts expanded to the call's batch size. A hook object, not a closure, like
    every hook of the package.

    The block composes the thread that opened it, while it is open, and every thread started while
    it is open (a streamer's `generate` thread), for as long as that thread runs: a thread reading
    the plain anchor halfway through its generation would be a silent wrong result. Threads that
    were running before the block opened keep the plain anchor. The hooks go once the block has
    closed and the threads started inside it have ended."""

    def __init__(self, calm: Composition, contexts: list[AugmentContext]):
        self.calm = calm
        self.cache_key = getattr(calm.anchor_adapter, 'cache_kwarg', None)
        self.injector = calm.injector
        self.batch = next(iter(contexts[0].hiddens.values())).shape[0]
        self.by_batch = {self.batch: contexts}
        # per batch, the memories; a list is refreshed in place, so whichever thread holds it still
        # holds the block's own
        self.memories: dict[int, list[AugmentContext]] = {}
        self.role = ThreadRole()
        self.role.composed = True  # the opener
        self.opener = threading.current_thread()
        self.running_before = set(threading.enumerate())
        self.started_inside: set[threading.Thread] | None = None  # known once the block closes
        self.closed = False
        self.handles: list = []
        # a thread's first call decides whether it was started inside while the block may be closing:
        # the decision and the close's list of those threads are taken one at a time
        self.lock = threading.Lock()

    def __getstate__(self):
        # threads cannot be copied or pickled, nor are they the model's: a copy of the anchor made
        # inside the block (deepcopy, pickle) composes no thread
        state = {**vars(self), 'calm': None, 'memories': {}, 'opener': None, 'running_before': set(), 'started_inside': set()}
        del state['lock']
        return state

    def __setstate__(self, state: dict):
        vars(self).update(state, lock = threading.Lock())

    def owns(self, contexts) -> bool:
        return any(contexts is own for own in (*self.by_batch.values(), *self.memories.values()))

    def for_batch(self, batch: int, continues: bool = False) -> list[AugmentContext]:
        """continues: the call continues a cache (a generation's step after its prompt)."""
        contexts = self.hiddens_for_batch(batch)

        # a compiled anchor reads the contexts as they are (whether the memories are fresh is
        # Python state torch.compile would have to guard on); keys and values projected once are
        # the same numbers, so compiled and eager calls agree exactly
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or not exists(self.calm):
            return contexts

        memories = self.memories.setdefault(batch, [])

        if not continues or len(memories) == 0:
            memories[:] = [fixed_memory(self.calm, index, context, fold = False) for index, context in enumerate(contexts)]

        return memories

    def hiddens_for_batch(self, batch: int) -> list[AugmentContext]:
        if batch not in self.by_batch:
            if batch % self.batch != 0:
                raise ValueError(
                    f'the anchor was called with batch size {batch} inside `composed(...)`, whose prompts have batch size {self.batch}; '
                    f'the anchor\'s batch must be a multiple of it (each example repeated, e.g. for beams or num_return_sequences)'
                )

            # two threads of the block may both get here: both must hold the list that is kept
            # (the after-hook recognises the block's contexts by identity)
            return self.by_batch.setdefault(batch, [expand_context(context, batch // self.batch) for context in self.by_batch[self.batch]])

        return self.by_batch[batch]

    def started_in_block(self, thread: threading.Thread) -> bool:
        if exists(self.started_inside):
            return thread in self.started_inside

        # a thread Python's `threading` did not start (a C library's) is listed only from its first
        # `current_thread()`, so when it started is unknown: it reads the plain anchor
        foreign = isinstance(thread, threading._DummyThread)
        return thread is not self.opener and thread not in self.running_before and not foreign

    def claims(self, module: Module, thread: threading.Thread) -> bool:
        with self.lock:
            if not self.started_in_block(thread):
                return False

        # a copy taken at once: the dict changes whenever a block of another thread opens or closes
        hooks = list(module._forward_pre_hooks.values())
        others = [hook for hook in hooks if isinstance(hook, ContextsForBatch) and hook is not self]
        if any(other.started_in_block(thread) for other in others):
            raise RuntimeError(
                f'thread {thread.name!r} called the anchor and was started while `composed(...)` blocks were open in several threads '
                f'({self.opener.name!r} and {", ".join(repr(other.opener.name) for other in others)}): which composition it reads is ambiguous. '
                'Start it while only one block is open, or open the block in the thread that calls the anchor'
            )

        return True

    def __call__(self, module: Module, args: tuple, kwargs: dict | None = None):
        role = self.role

        if self.closed and role.composed and not role.started_inside:
            self.reset_opener()

        if role.composed is None:
            role.composed = role.started_inside = self.claims(module, threading.current_thread())

        if not role.composed:
            # whether those threads have ended reads their locks, which torch.compile cannot
            # trace: a compiled call leaves the check to the next eager one
            if exists(self.started_inside) and not torch.compiler.is_compiling():
                self.release_if_done()
            return None

        call = self.injector.call

        # a CALM forward inside the block sets its own contexts: leave them alone. (Torch may call
        # a hook that is being removed by another thread without kwargs)
        if exists(call.contexts) and not self.owns(call.contexts):
            return None

        batch = call_batch_size(args, kwargs or {})
        call.contexts = self.for_batch(batch if exists(batch) else self.batch, continues_a_cache(kwargs or {}, self.cache_key))
        return None

    def after(self, module: Module, args: tuple, output):
        # a thread started inside the block holds the contexts for one call at a time: its own
        # CALM forwards and `composed(...)` blocks find them unset. The opener goes back to the
        # block's own contexts, so that every call starts from the same state whichever the last
        # one read (a compiled anchor's guards check it)
        call = self.injector.call
        if exists(call.contexts) and self.owns(call.contexts):
            call.contexts = None if self.role.started_inside else self.by_batch[self.batch]

    def close(self):
        # on exit: the opener is plain again; threads started inside keep the composition. The
        # opener's state is its thread's own: a block exited by another thread (an ExitStack
        # handed over) resets it at the opener's next anchor call or `composed(...)`, and keeps
        # the hooks until then
        by_opener = threading.current_thread() is self.opener

        # other threads read this state while it changes, so each attribute is replaced whole,
        # never changed in place, and `closed` is set last: a thread that finds the block closed
        # finds its list of threads too. `running_before` stays as it was, for the checks of other
        # blocks' claims, which read it without this block's lock
        with self.lock:
            started_inside = {thread for thread in threading.enumerate() if self.started_in_block(thread)}

            if by_opener:
                self.role.composed = False
                self.injector.call.contexts = None
            else:
                started_inside.add(self.opener)

            self.started_inside = started_inside
            self.closed = True

        self.release_if_done()

    def reset_opener(self):
        # in the opener, once another thread has exited its block
        self.role.composed = False
        call = self.injector.call

        if exists(call.contexts) and self.owns(call.contexts):
            call.contexts = None

        self.started_inside = self.started_inside - {self.opener}

    def release_if_done(self):
        if not any(thread.is_alive() for thread in self.started_inside):
            # any thread may get here (the closer, a later anchor call): popping hands each handle
            # to one of them, where two removing the same handle may both find it and one fail
            while self.handles:
                try:
                    handle = self.handles.pop()
                except IndexError:
                    break
                handle.remove()

@contextmanager
def composed_anchor(
    calm: Composition,
    prompt: Tensor | Sequence[Tensor | None] | None,
    prompt_mask: Tensor | Sequence[Tensor | None] | None = None
) -> Iterator[Module]:
    check_usable(calm)
    check_materialised(calm, '`composed(...)`')

    call = calm.injector.call
    model = calm.anchor_adapter.model

    for hook in list(model._forward_pre_hooks.values()):
        if isinstance(hook, ContextsForBatch) and hook.closed and hook.opener is threading.current_thread():
            hook.reset_opener()  # its block was exited by another thread

    if exists(call.contexts):
        raise RuntimeError('the anchor is already composed: `composed(...)` blocks cannot be nested or entered during a CALM forward')

    if not exists(prompt):
        raise TypeError(
            '`composed()` was given no prompt; it composes the anchor with augments that read their own input (context mode): '
            '`with calm.composed(prompt = document) as anchor: anchor.generate(...)`. For augments reading the tokens being '
            'generated (aligned mode), use `calm.generate(prompt, ...)`'
        )

    prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * len(calm.augments)

    if len(prompts) != len(calm.augments) or not all(isinstance(one, Tensor) for one in prompts):
        given = [type(one).__name__ for one in prompts]
        raise ValueError(
            f'`composed(prompt=...)` needs a tensor prompt for each of the {len(calm.augments)} augments (context mode only), got {given}; '
            'for aligned mode (the augment reading the anchor\'s own tokens) call the CALM itself'
        )

    # the prompts' batch is the reference: every prompt must share it
    reference = torch.empty((prompts[0].shape[0], 0), dtype = torch.long, device = prompts[0].device)

    with torch.no_grad():
        contexts = augment_contexts(calm, reference, None, prompts, prompt_mask)

    set_contexts = ContextsForBatch(calm, contexts)
    # on the model the adapter calls: a PEFT wrapper's generate() calls its base model, not itself
    set_contexts.handles = [
        model.register_forward_pre_hook(set_contexts, with_kwargs = True, prepend = True),
        model.register_forward_hook(set_contexts.after, always_call = True)
    ]
    call.contexts = contexts

    try:
        yield calm.anchor
    finally:
        set_contexts.close()
