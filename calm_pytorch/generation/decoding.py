from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from calm_pytorch.composition.contexts import augment_context, check_aligned, check_one_per_token, check_padding_is_masked
from calm_pytorch.composition.cross_attention import CrossAttentionBlock
from calm_pytorch.composition.injection import AugmentContext
from calm_pytorch.composition.protocol import Composition
from calm_pytorch.generation.kv_buffers import KVBuffer, fixed_memory
from calm_pytorch.generation.lockstep import Lockstep
from calm_pytorch.generation.sampling import sample
from calm_pytorch.generation.text_stream import text_stream
from calm_pytorch.helpers import exists, warn_user
from calm_pytorch.models.adapter import DecodeState, ModelAdapter

# axes
# b - batch
# h - heads
# n - positions of the sequence being generated (prompt included)
# j - augment (key / value) positions
# d - feature dimension
# v - vocabulary

# one generate call: the state it keeps (ComposedDecoder), and the loop (generate)

def warn_once_if_recomputing(adapter: ModelAdapter):
    # cached and recomputed decoding give the same tokens, so a model that silently lost its cache
    # would only be slow: say so, once per model
    reason = adapter.why_no_cache

    if not exists(reason) or getattr(adapter, 'warned_recomputing', False):
        return

    adapter.warned_recomputing = True
    warn_user(
        f'{adapter.name} ({type(adapter.model).__name__}) cannot decode incrementally: {reason}. '
        'generate recomputes its whole sequence at every step (same tokens, more work)'
    )

class ComposedDecoder:
    """The state of one `generate` call: a cache for the anchor, a separate cache for each aligned
    augment, and the keys and values each cross-attention reads.

    context mode: the augment runs once on its prompt; each cross-attention projects that context
                  to keys and values once.
    aligned mode: the augment decodes the new positions with its own cache; their hidden states are
                  projected and appended, and the anchor's new position sees augment positions up to
                  itself.
    Without cache every step recomputes the whole composition, augments included."""

    def __init__(
        self,
        calm: Composition,
        tokens: Tensor,
        mask: Tensor | None,
        prompts: list,
        prompt_masks: list,
        capacity: int,
        use_cache: bool
    ):
        self.calm = calm
        self.use_cache = use_cache
        self.prompts = prompts
        self.prompt_masks = prompt_masks
        self.aligned = [not exists(prompt) for prompt in prompts]

        self.anchor_state = DecodeState(capacity = capacity) if use_cache else None
        self.augment_states = [DecodeState(capacity = capacity) if use_cache and aligned else None for aligned in self.aligned]
        self.buffers: list[dict[CrossAttentionBlock, KVBuffer]] = [
            {block: KVBuffer(block, capacity, tokens.shape[0]) for block in calm.cross_attns[index]} if use_cache and aligned else {}
            for index, aligned in enumerate(self.aligned)
        ]

        self.fixed: list[AugmentContext | None] = [None] * len(prompts)
        self.lockstep = Lockstep(calm)

        if use_cache:
            warn_once_if_recomputing(calm.anchor_adapter)

            for index, aligned in enumerate(self.aligned):
                if aligned:
                    warn_once_if_recomputing(calm.augment_adapters[index])

        # augments aligned across tokenizers keep per-row caches once the anchor decodes one token a step
        self.streams = [
            text_stream(calm, index, tokens.shape[0], capacity, self.lockstep) if aligned and exists(calm.augment_texts[index]) and use_cache and calm.anchor_adapter.can_cache else None
            for index, aligned in enumerate(self.aligned)
        ]

        for index, aligned in enumerate(self.aligned):
            arg = f'prompt[{index}]' if len(prompts) > 1 else 'prompt'

            if aligned:
                if exists(prompt_masks[index]):
                    raise ValueError(f'a prompt_mask was given for augment {index} but no prompt; pass the prompt too, or leave the mask out for aligned mode')

                check_aligned(calm, index)

                if not exists(calm.augment_texts[index]):  # else it reads its own tokens
                    check_padding_is_masked(calm, index, mask, 'mask')

                continue

            context = augment_context(calm, index, tokens, mask, prompts[index], prompt_masks[index], arg)

            if use_cache:
                # the context never changes during generation: projected once per call
                context = fixed_memory(calm, index, context)

            self.fixed[index] = context

    def blocks(self, index: int):
        return zip(self.calm.cross_attns[index], self.calm.augment_keys[index])

    def context(self, index: int, tokens: Tensor, mask: Tensor | None) -> AugmentContext:
        calm = self.calm

        if not self.aligned[index]:
            if exists(self.fixed[index]):
                return self.fixed[index]

            # the plain path reruns the augment on its prompt
            return augment_context(calm, index, tokens, mask, self.prompts[index], self.prompt_masks[index])

        if exists(calm.augment_texts[index]):
            # without cache, every step reads as the forward does
            stream = self.streams[index]
            if not exists(stream):
                return augment_context(calm, index, tokens, mask, None, None)

            return stream.context(tokens, mask) if self.anchor_state.length > 0 else stream.first(tokens, mask)

        adapter, recorder, state = calm.augment_adapters[index], calm.recorders[index], self.augment_states[index]

        # the positions this call computes: the recorder stops the augment once they are recorded
        # (a segment-recurrent augment records them over several calls of each block)
        cached = exists(state) and adapter.can_cache
        expected_len = tokens.shape[-1] - (state.length if cached else 0)
        hiddens = recorder(lambda: adapter.decode(tokens, mask, state), expected_len)
        check_one_per_token(hiddens, expected_len, index)

        if not self.use_cache:
            return AugmentContext(hiddens, mask, causal = True)

        # project only the positions not yet in the buffers: the hidden states hold the new
        # positions (cached augment) or the whole sequence (an augment that recomputes)
        n = tokens.shape[-1]

        for block, key in self.blocks(index):
            buffer = self.buffers[index][block]
            new = hiddens[key][:, -(n - buffer.length):]  # (b, j_new, dim_augment)
            buffer.append(new)

        memory = {block: self.buffers[index][block].view() for block, _ in self.blocks(index)}
        return AugmentContext({}, mask, causal = True, memory = memory)

    def step(self, tokens: Tensor, mask: Tensor | None) -> Tensor:
        """tokens (b, n), mask (b, n) or None -> logits (b, v) of the next token."""

        contexts = [self.context(index, tokens, mask) for index in range(len(self.aligned))]

        # an anchor that recomputes reads the whole sequence, maybe over several calls per block
        # (a segment-recurrent one): the injector then needs the length to place each call
        anchor = self.calm.anchor_adapter
        query_len = None if self.use_cache and anchor.can_cache else tokens.shape[-1]

        with self.calm.injector.composed(contexts, query_len = query_len):
            output = anchor.decode(tokens, mask, self.anchor_state)

        return self.calm.anchor_adapter.logits(output)[:, -1]

@torch.no_grad()
def generate(
    calm: Composition,
    prompt: Tensor,
    prompt_mask: Tensor | None,
    num_new: int,
    *,
    augment_prompts: list,
    augment_prompt_masks: list,
    temperature: float,
    filter_fn: Callable[[Tensor], Tensor] | None,
    top_k: int | None,
    top_p: float | None,
    min_p: float | None,
    eos_id: int | None,
    pad_id: int,
    use_cache: bool,
    show_progress: bool | None,
    streamer = None
) -> Tensor:
    """The loop behind `CALM.generate`; arguments are checked there. Returns (b, num_new).
    streamer: Hugging Face's protocol, `put` the prompt then each new token (b,); `end` is the caller's"""

    batch, prompt_len = prompt.shape
    total = prompt_len + num_new

    # no row to continue: transformers models refuse a batch of none. With sharded models every
    # process runs the same forwards, rows or not
    if batch == 0 and not Lockstep(calm).enabled:
        return prompt.new_full((0, num_new), pad_id)

    # the sequence and its mask are allocated once; step t reads the first prompt_len + t positions.
    # Padded positions are fed a valid token id (they are masked everywhere)

    seq = F.pad(prompt.masked_fill(~prompt_mask, 0) if exists(prompt_mask) else prompt, (0, num_new), value = 0)
    seq_mask = F.pad(prompt_mask, (0, num_new), value = True) if exists(prompt_mask) else None

    decoder = ComposedDecoder(calm, prompt, prompt_mask, augment_prompts, augment_prompt_masks, total, use_cache)
    decoder.lockstep.check_same(max_new_tokens = num_new, use_cache = int(use_cache))

    done = torch.zeros(batch, dtype = torch.bool, device = prompt.device)

    if exists(streamer):
        streamer.put(prompt.cpu())

    # a bar for long generations; None leaves tqdm to hide it where stderr is not a terminal
    disable = not show_progress if exists(show_progress) else (True if num_new < 256 else None)
    length = prompt_len

    for _ in tqdm(range(num_new), desc = 'generating', unit = 'tok', disable = disable, leave = False):
        tokens = seq[:, :length]
        mask = seq_mask[:, :length] if exists(seq_mask) else None

        logits = decoder.step(tokens, mask)
        token = sample(logits, temperature = temperature, filter_fn = filter_fn, top_k = top_k, top_p = top_p, min_p = min_p)

        # rows that are done keep decoding (their tokens are replaced by pad_id at the end), so
        # every row is always fed a token id of the model's vocabulary
        seq[:, length] = token
        length += 1

        if exists(streamer):
            # the tokens returned: pad_id for rows that ended before
            streamer.put(token.masked_fill(done, pad_id).cpu())

        if exists(eos_id):
            done = done | (token == eos_id)

        # with sharded models, only once every process's rows have ended
        if decoder.lockstep.all_done(exists(eos_id) and bool(done.all())):
            break

    new = seq[:, prompt_len:length]

    if exists(eos_id):
        # pad_id after each row's first eos
        after_eos = F.pad((new == eos_id).cumsum(dim = -1)[:, :-1], (1, 0), value = 0) > 0
        new = new.masked_fill(after_eos, pad_id)

    return F.pad(new, (0, num_new - new.shape[-1]), value = pad_id)
