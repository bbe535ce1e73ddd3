from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.nn import Module

from calm_pytorch.composition.contexts import augment_contexts
from calm_pytorch.composition.injection import AugmentContext
from calm_pytorch.composition.inputs import check_usable
from calm_pytorch.composition.protocol import Composition
from calm_pytorch.helpers import exists

# the anchor's own forward and generate(), composed in context mode: the augments run once on
# their prompts, and every anchor call inside the `with` block cross-attends to what they recorded.
# generate() may run the anchor on more rows than there are prompts (beams, num_return_sequences):
# it expands each example into consecutive rows, so the context rows are repeated the same way,
# once per batch size seen, not once per token

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

class ContextsForBatch:
    """Forward pre-hook on the anchor: before each call in the thread that opened the block, hands
    the injector the contexts expanded to the call's batch size. A hook object, not a closure, like
    every hook of the package."""

    def __init__(self, calm: Composition, contexts: list[AugmentContext]):
        self.injector = calm.injector
        self.thread = threading.get_ident()
        self.batch = next(iter(contexts[0].hiddens.values())).shape[0]
        self.by_batch = {self.batch: contexts}

    def owns(self, contexts) -> bool:
        return any(contexts is own for own in self.by_batch.values())

    def for_batch(self, batch: int) -> list[AugmentContext]:
        if batch not in self.by_batch:
            if batch % self.batch != 0:
                raise ValueError(
                    f'the anchor was called with batch size {batch} inside `composed(...)`, whose prompts have batch size {self.batch}; '
                    f'the anchor\'s batch must be a multiple of it (each example repeated, e.g. for beams or num_return_sequences)'
                )

            self.by_batch[batch] = [expand_context(context, batch // self.batch) for context in self.by_batch[self.batch]]

        return self.by_batch[batch]

    def __call__(self, module: Module, args: tuple, kwargs: dict | None = None):
        # the anchor called by another thread meanwhile is not composed by this block. That thread
        # may meet this hook half registered or half removed, when torch calls it without kwargs
        if threading.get_ident() != self.thread:
            return None

        call = self.injector.call

        # a CALM forward inside the block sets its own contexts: leave them alone
        if exists(call.contexts) and not self.owns(call.contexts):
            return None

        batch = call_batch_size(args, kwargs)
        call.contexts = self.for_batch(batch if exists(batch) else self.batch)
        return None

@contextmanager
def composed_anchor(
    calm: Composition,
    prompt: Tensor | Sequence[Tensor | None] | None,
    prompt_mask: Tensor | Sequence[Tensor | None] | None = None
) -> Iterator[Module]:
    check_usable(calm)

    call = calm.injector.call

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
    handle = calm.anchor_adapter.model.register_forward_pre_hook(set_contexts, with_kwargs = True, prepend = True)
    call.contexts = contexts

    try:
        yield calm.anchor
    finally:
        handle.remove()
        call.contexts = None
