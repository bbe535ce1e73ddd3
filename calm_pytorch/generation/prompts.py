from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from calm_pytorch.composition.inputs import check_mask, check_tokens
from calm_pytorch.composition.protocol import Composition
from calm_pytorch.helpers import default, exists, warn_user

# the prompts of `generate`, checked before anything runs

def left_pad(prompts: Sequence[Tensor], pad_value: int = 0) -> tuple[Tensor, Tensor]:
    """1-d prompts of different lengths -> (b, n) tokens, left-padded, and their mask (b, n)."""

    if len(prompts) == 0 or any(not isinstance(p, Tensor) or p.ndim != 1 or p.numel() == 0 for p in prompts):
        raise ValueError('a list of sequences must hold non-empty 1-d tensors of token ids')

    length = max(p.shape[0] for p in prompts)
    tokens = torch.stack([F.pad(p, (length - p.shape[0], 0), value = pad_value) for p in prompts])
    mask = torch.stack([F.pad(torch.ones_like(p, dtype = torch.bool), (length - p.shape[0], 0), value = False) for p in prompts])
    return tokens, mask

def check_left_padded(mask: Tensor):
    # real tokens must be right-aligned: the next token is written at the same position for every row
    if mask.shape[-1] > 1 and bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError('`mask` must be left-padded (False before the first real token, True after); right-padded sequences would continue after their padding')

    if not bool(mask[:, -1].all()):
        raise ValueError('`mask` has a row without any real token; every sequence needs at least one')

def prepare_prompt(calm: Composition, prompt: Tensor | Sequence[Tensor], prompt_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """A prompt tensor (b, n) or a list of 1-d prompts -> left-padded tokens and their mask, both
    checked; the mask is None when nothing is padded."""

    if not isinstance(prompt, Tensor):
        if exists(prompt_mask):
            raise ValueError('`mask` is for a padded tensor of sequences; a list of sequences is padded here and needs none')

        prompt, prompt_mask = left_pad(list(prompt))

    prompt = check_tokens(prompt, 'seq')

    if exists(prompt_mask):
        prompt_mask = check_mask(prompt_mask, prompt, 'mask', 'seq')
        check_left_padded(prompt_mask)

        if bool(prompt_mask.all()):
            prompt_mask = None

    calm.anchor_adapter.check_token_ids(prompt, 'seq', prompt_mask)  # padding is never read
    return prompt, prompt_mask

def check_eos_id(calm: Composition, eos_id: int | None):
    # an id the anchor can never write would never end a row: generation would run to its length
    vocab_size = calm.anchor_adapter.vocab_size

    if exists(eos_id) and exists(vocab_size) and not 0 <= eos_id < vocab_size:
        raise ValueError(f'`eos_id` {eos_id} is outside the anchor\'s vocabulary of {vocab_size} tokens (ids 0 to {vocab_size - 1}): no row could ever end with it')

def renamed_arguments(seq, mask, prompt, prompt_mask, augment_prompt, augment_prompt_mask) -> tuple:
    """`generate`'s names agree with the forward's: `seq` / `mask` the anchor's, `prompt` /
    `prompt_mask` the augments'. Until the next minor version the names of 0.1.0 keep working
    (`prompt` / `prompt_mask` the anchor's, `augment_prompt` / `augment_prompt_mask` the augments'),
    with a FutureWarning; a call reads unambiguously as one or the other. Returns the anchor's
    tokens and mask, then the augments' prompt and mask."""

    old_augment_names = exists(augment_prompt) or exists(augment_prompt_mask)
    anchor_tokens_as_prompt = not exists(seq) and exists(prompt)
    anchor_mask_as_prompt_mask = exists(prompt_mask) and not exists(prompt)

    if not (old_augment_names or anchor_tokens_as_prompt or anchor_mask_as_prompt_mask):
        if not exists(seq):
            raise TypeError('`generate` needs the anchor\'s tokens: `calm.generate(seq, max_new_tokens = ...)`')

        return seq, mask, prompt, prompt_mask

    if exists(seq) and exists(prompt) and old_augment_names:
        raise TypeError('`generate` was given `seq` and `prompt` with `augment_prompt`: the anchor\'s tokens are `seq` and the augments\' input `prompt` (`augment_prompt` is its old name)')

    if exists(mask) and exists(prompt_mask) and (anchor_tokens_as_prompt or anchor_mask_as_prompt_mask or old_augment_names):
        raise TypeError('`generate` was given `mask` and `prompt_mask` for the anchor\'s tokens: the anchor\'s mask is `mask`')

    warn_user(
        '`generate`\'s arguments were renamed to agree with the forward\'s: the anchor\'s tokens and mask are `seq` and `mask` '
        '(were `prompt` and `prompt_mask`), the augments\' input and mask `prompt` and `prompt_mask` (were `augment_prompt` and '
        '`augment_prompt_mask`). The old names work until the next minor version',
        FutureWarning
    )

    if anchor_tokens_as_prompt:
        seq, prompt = prompt, None

    return seq, default(mask, prompt_mask), augment_prompt, augment_prompt_mask

def new_token_count(prompt_len: int, seq_len: int | None, max_new_tokens: int | None) -> int:
    if exists(seq_len) == exists(max_new_tokens):
        raise ValueError('pass exactly one of `seq_len` (total length, prompt included) and `max_new_tokens`')

    num_new = max_new_tokens if exists(max_new_tokens) else seq_len - prompt_len

    if num_new < 1:
        raise ValueError(f'nothing to generate: `seq_len`={seq_len} is not longer than the prompt ({prompt_len} tokens)' if exists(seq_len) else f'`max_new_tokens` must be at least 1, got {max_new_tokens}')

    return num_new

def check_total_length(calm: Composition, total: int, augment_prompts: list):
    # every position read must fit the anchor, and each augment reading the sequence; checked on
    # the number, before anything of that length is allocated. The last new token is never read
    # back, so a generation reads one position fewer than it returns (as the anchor's own generate)
    read, name = total - 1, 'prompt + new tokens - 1'
    calm.anchor_adapter.check_length(read, name, generating = True)

    for index, (adapter, aligned_prompt) in enumerate(zip(calm.augment_adapters, augment_prompts)):
        if not exists(aligned_prompt) and not exists(calm.augment_texts[index]):
            adapter.check_length(read, name, generating = True)
