from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel

from calm_pytorch.helpers import exists

IGNORE = -100

def shift_for_next_token(seq: Tensor, mask: Tensor | None, pad_id: int) -> tuple[Tensor, Tensor | None, Tensor]:
    """seq (b, n) -> the anchor's inputs (b, n - 1), their mask, and the next-token labels
    (b, n - 1), IGNORE where the label is masked or equal to `pad_id`, or is predicted from a
    masked position."""

    inputs, labels = seq[:, :-1], seq[:, 1:]

    if exists(mask):
        mask = mask.bool()
        # a left-padded row's first token would be predicted from padding: alone, it is predicted
        # from nothing and has no label
        labels = labels.masked_fill(~(mask[:, 1:] & mask[:, :-1]), IGNORE)
        mask = mask[:, :-1]

    return inputs, mask, labels.masked_fill(labels == pad_id, IGNORE)

def mean_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of logits (b, n, c) against labels (b, n), averaged over the labels that are
    not IGNORE. A batch without any (all masked, all padding, or empty) gives 0, not the 0 / 0 =
    NaN of a mean: still connected to the graph, so backward runs and every gradient is zero."""

    # in float32, as transformers computes its models' loss: a log-softmax over the vocabulary in
    # bfloat16 keeps about 3 digits. Classes last and positions flattened: cross_entropy over a
    # (b, c, n) view is twice as slow on CPU
    loss = F.cross_entropy(rearrange(logits.float(), 'b n c -> (b n) c'), rearrange(labels, 'b n -> (b n)'), ignore_index = IGNORE, reduction = 'sum')
    return loss / (labels != IGNORE).sum().clamp(min = 1)

def token_loss(logits: Tensor, targets: Tensor, num_items: Tensor | int | None = None) -> Tensor:
    """The mean cross-entropy over the targets that are not IGNORE (see `mean_token_loss`), or
    their sum divided by `num_items`: Trainer's count over every micro-batch of a gradient
    accumulation step, so that every token of the step weighs the same."""

    loss = mean_token_loss(logits, targets)

    if not exists(num_items):
        return loss

    return loss * (targets != IGNORE).sum().clamp(min = 1) / num_items

def next_token_loss(model: Module, batch: dict) -> tuple[Tensor, Tensor]:
    """The anchor's next-token cross-entropy *summed* over the predicted tokens, and their count.

    CALM's own loss is a mean per call; a sum and a count let the trainer weight every token of a
    step equally, however they fall into micro-batches, processes and padding. The labels follow
    CALM's forward: `seq` shifted by one, masked positions and `pad_id` ignored.

    model: the CALM, or the DistributedDataParallel around it (its forward must be the one called)
    batch: `seq` (b, n), optionally `mask` (b, n), `labels` (b, n; as in CALM's forward: -100 where no
           loss is wanted) and anything else CALM's forward takes (`prompt`, ...)"""

    calm = model.module if isinstance(model, DistributedDataParallel) else model
    batch = dict(batch)
    seq, mask, labels = batch.pop('seq'), batch.pop('mask', None), batch.pop('labels', None)

    inputs, mask, labels = shift_labels(seq, mask, labels) if exists(labels) else shift_for_next_token(seq, mask, calm.pad_id)
    logits = model(inputs, mask = mask, return_loss = False, **batch)

    loss = F.cross_entropy(rearrange(logits.float(), 'b n c -> b c n'), labels, ignore_index = IGNORE, reduction = 'sum')
    return loss, (labels != IGNORE).sum()

def shift_labels(seq: Tensor, mask: Tensor | None, labels: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
    """Like `shift_for_next_token`, with labels given as in Hugging Face: (b, n) aligned with `seq`,
    IGNORE (-100) where no loss is wanted. They alone say which tokens are predicted: `mask` and
    `pad_id` only shape the anchor's input (an answer-only loss keeps the question in `mask`)."""

    return seq[:, :-1], mask[:, :-1] if exists(mask) else None, labels[:, 1:]
