from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from functools import wraps
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module

from calm_pytorch.composition.inputs import check_causal_anchor, check_materialised, check_usable, per_augment
from calm_pytorch.generation.composed_anchor import composed_anchor
from calm_pytorch.generation.decoding import generate
from calm_pytorch.generation.prompts import check_eos_id, check_total_length, new_token_count, prepare_prompt, renamed_arguments
from calm_pytorch.generation.sampling import check_sampling
from calm_pytorch.helpers import exists, typecheck

def ends_its_streamer(generate: Callable) -> Callable:
    """`generate` calls its streamer's `end()` however it returns, even when an argument is refused
    before the first token (the type check included, which runs before its body): a reader in
    another thread then never waits forever."""

    @wraps(generate)
    def inner(*args, streamer: Any = None, **kwargs):
        try:
            return generate(*args, streamer = streamer, **kwargs)
        finally:
            if callable(getattr(streamer, 'end', None)):
                streamer.end()

    return inner

class GenerationMixin:
    """Mixin giving CALM its two ways to generate: its own decoding loop (`generate`), and the
    anchor's own `generate()` composed (`composed`)."""

    @ends_its_streamer
    @torch.no_grad()
    @typecheck
    def generate(
        self,
        seq: Tensor | Sequence[Tensor] | None = None,
        seq_len: int | None = None,
        *,
        max_new_tokens: int | None = None,
        mask: Tensor | None = None,
        prompt: Tensor | Sequence[Tensor | None] | None = None,
        prompt_mask: Tensor | Sequence[Tensor | None] | None = None,
        augment_prompt: Tensor | Sequence[Tensor | None] | None = None,
        augment_prompt_mask: Tensor | Sequence[Tensor | None] | None = None,
        temperature: float = 1.,
        filter_fn: Callable[[Tensor], Tensor] | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        use_cache: bool = True,
        show_progress: bool | None = None,
        streamer: Any = None
    ) -> Tensor:
        """Continues `seq` through the composition; returns the new tokens (b, n_new). The names are
        those of the forward: `seq` and `mask` are the anchor's, `prompt` and `prompt_mask` the augments'.

        seq:                 (b, n) the anchor's token ids, or a list of 1-d sequences of different
                             lengths (left-padded here)
        seq_len:             total length, `seq` included; or give `max_new_tokens` (exactly one)
        mask:                (b, n) True for real tokens of a left-padded `seq`
        prompt:              context mode: the augments' input (one, or one per augment; None there
                             means aligned). Without it every augment reads the sequence being
                             generated (aligned mode)
        prompt_mask:         (b, m) True for real positions of `prompt` (right-padded)
        augment_prompt, augment_prompt_mask: the names of 0.1.0 for `prompt` and `prompt_mask`,
                             when `prompt` and `prompt_mask` were the anchor's; deprecated (a
                             FutureWarning), removed in the next minor version
        temperature:         divides the logits; 0 is greedy
        filter_fn, top_k, top_p, min_p: applied to the tempered logits in that order
                             (see `calm_pytorch.generation.sampling.sample`)
        eos_id:              a row ends at its first `eos_id`; `pad_id` follows it, and generation
                             stops once every row has ended
        pad_id:              fills rows after their eos (default: the CALM's pad_id, or 0 if negative)
        use_cache:           decode one token per step with KV caches (anchor and each aligned
                             augment separately, context keys and values projected once);
                             False recomputes the whole composition every step (for checking)
        show_progress:       a progress bar; None shows it for 256 new tokens or more on a terminal
        streamer:            a Hugging Face streamer (`TextStreamer`, `TextIteratorStreamer`) or any
                             object with `put` and `end`: `put(prompt)`, then `put(tokens)` (b,) at
                             each step (pad_id for ended rows), then `end()`"""

        check_usable(self)
        check_materialised(self, '`calm.generate`')
        seq, mask, augment_prompt, augment_prompt_mask = renamed_arguments(seq, mask, prompt, prompt_mask, augment_prompt, augment_prompt_mask)
        check_causal_anchor(self, 'generation')
        prompt, prompt_mask = prepare_prompt(self, seq, mask)
        num_new = new_token_count(prompt.shape[-1], seq_len, max_new_tokens)
        check_sampling(temperature, top_k, top_p, min_p)
        check_eos_id(self, eos_id)

        num_augments = len(self.augments)
        augment_prompts = per_augment(augment_prompt, num_augments, 'prompt')
        augment_prompt_masks = per_augment(augment_prompt_mask, num_augments, 'prompt_mask')
        check_total_length(self, prompt.shape[-1] + num_new, augment_prompts)

        if exists(streamer) and not (callable(getattr(streamer, 'put', None)) and callable(getattr(streamer, 'end', None))):
            raise TypeError(f'`streamer` must have `put(tokens)` and `end()` methods, as Hugging Face\'s streamers do; got {type(streamer).__name__}')

        return generate(
            self,
            prompt,
            prompt_mask,
            num_new,
            augment_prompts = augment_prompts,
            augment_prompt_masks = augment_prompt_masks,
            temperature = temperature,
            filter_fn = filter_fn,
            top_k = top_k,
            top_p = top_p,
            min_p = min_p,
            eos_id = eos_id,
            pad_id = pad_id if exists(pad_id) else max(self.pad_id, 0),
            use_cache = use_cache,
            show_progress = show_progress,
            streamer = streamer
        )

    @typecheck
    def composed(
        self,
        prompt: Tensor | Sequence[Tensor | None] | None = None,
        prompt_mask: Tensor | Sequence[Tensor | None] | None = None
    ) -> AbstractContextManager[Module]:
        """A context in which the anchor itself is composed (context mode): the augments read
        `prompt` once, and every anchor call inside, its own `generate()` included (cache, beams,
        sampling, num_return_sequences), cross-attends to them. Yields the anchor; on exit, even by
        an exception, the anchor is plain again.

            with calm.composed(prompt = document, prompt_mask = document_mask) as anchor:
                out = anchor.generate(input_ids, max_new_tokens = 20)"""

        return composed_anchor(self, prompt, prompt_mask)
