from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from calm_pytorch.helpers import exists
from calm_pytorch.loss import IGNORE, mean_token_loss

if TYPE_CHECKING:
    from calm_pytorch.calm import CALM

# CALM called with Hugging Face's names (`input_ids`, `attention_mask`, `labels`) behaves as a
# transformers causal LM, so that `Trainer`, Accelerate loops and HF-style datasets work unchanged:
# the anchor reads all of `input_ids`, the labels are aligned with the tokens and shifted here,
# -100 marks an ignored label (whatever the attention mask says), and the output is a dict with
# `.loss` and `.logits`, as `Trainer.compute_loss` reads it (`outputs["loss"]` or `outputs[0]`).
# transformers itself is not needed on this path.

class CALMOutput(dict):
    """The output of CALM called with `input_ids`: `loss` (a scalar, present when `labels` were
    given) and `logits` (b, n, num_tokens). Like transformers' `ModelOutput`: a dict without the
    entries that are None, read by key, by attribute (`.loss` is None when absent) or by position
    (`output[0]` is the loss when there is one, else the logits)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

        # as ModelOutput: an absent value is not an entry, so positions skip it
        for key in [key for key, value in self.items() if value is None]:
            del self[key]

    @property
    def loss(self) -> Tensor | None:
        return self.get('loss')

    @property
    def logits(self) -> Tensor | None:
        return self.get('logits')

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]

        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        return tuple(self.values())

def check_labels(labels: Tensor, like: Tensor, like_name: str):
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f'`labels` must hold integer token ids (-100 where ignored), got dtype {labels.dtype}')

    if labels.shape != like.shape:
        raise ValueError(
            f'`labels` must have the shape of `{like_name}` {tuple(like.shape)}, got {tuple(labels.shape)}: '
            'they are aligned with the tokens, not shifted (the shift to next-token targets happens inside)'
        )

def token_loss(logits: Tensor, targets: Tensor, num_items: Tensor | int | None = None) -> Tensor:
    """The mean cross-entropy over the targets that are not IGNORE (see `mean_token_loss`), or
    their sum divided by `num_items`: Trainer's count over every micro-batch of a gradient
    accumulation step, so that every token of the step weighs the same."""

    loss = mean_token_loss(logits, targets)

    if not exists(num_items):
        return loss

    return loss * (targets != IGNORE).sum().clamp(min = 1) / num_items

def hf_forward(
    calm: CALM,
    seq: Tensor | None,
    mask: Tensor | None,
    input_ids: Tensor | None,
    attention_mask: Tensor | None,
    labels: Tensor | None,
    anchor_kwargs: dict[str, Any],
    **calm_kwargs
) -> CALMOutput:
    """CALM's forward called with `input_ids` (see the module comment). `calm_kwargs` are CALM's own
    keywords (`prompt`, `prompt_mask`); `anchor_kwargs` go to the anchor."""

    if exists(seq) or exists(mask):
        raise TypeError(
            'pass the tokens either as `seq` (with `mask`; CALM returns the loss) or as `input_ids` '
            '(with `attention_mask`; CALM returns an output with .loss and .logits, as a transformers model), not both'
        )

    # Trainer passes its token count when the forward takes **kwargs (see `token_loss`)
    num_items = anchor_kwargs.pop('num_items_in_batch', None)

    anchor_kwargs.pop('return_dict', None)  # always a dict

    if exists(labels):
        check_labels(labels, input_ids, 'input_ids')

    logits = calm.forward(input_ids, mask = attention_mask, return_loss = False, **calm_kwargs, **anchor_kwargs)

    loss = None

    if exists(labels):
        # position i predicts the token at i + 1
        loss = token_loss(logits[:, :-1], labels[:, 1:].to(logits.device), num_items)

    return CALMOutput(loss = loss, logits = logits)
