from __future__ import annotations

import torch
from torch import Tensor

# checks of what a user hands a composition, each error naming the argument, what was given and
# what was expected

def check_usable(calm):
    if calm.hooks_removed:
        raise RuntimeError('this CALM had its hooks removed with `remove_hooks()`; build a new CALM to compose the models again')

def check_causal_anchor(calm, use: str):
    """Next-token training and generation need an anchor whose output at a position depends only on
    the tokens up to it. Probed at construction (at first use for an anchor built on `meta`)."""

    # a CALM pickled by 0.1.0 has no record: probed here
    if getattr(calm, 'anchor_is_causal', None) is None:
        calm.anchor_is_causal = calm.anchor_adapter.logits_are_causal()

    if not calm.anchor_is_causal:
        raise ValueError(
            f'the anchor ({type(calm.anchor).__name__}) is not causal: its output at a position depends on later tokens '
            f'(a bidirectional encoder, such as BERT or an x-transformers Encoder), so {use} would see the token it predicts. '
            'Use a causal decoder as the anchor; a bidirectional model can be an augment that reads its own input (`prompt=`)'
        )

def check_tokens(tokens: Tensor, name: str, min_len: int = 1) -> Tensor:
    """Token ids of any integer dtype (int32 from a tokenizer, uint8 / int16 from a compact dataset)
    come back as torch.long, which embeddings and the loss take."""

    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f'`{name}` must hold integer token ids (e.g. torch.long), got dtype {tokens.dtype}')

    if tokens.ndim != 2:
        raise ValueError(f'`{name}` must have shape (batch, seq_len), got {tuple(tokens.shape)}')

    if tokens.shape[1] < min_len:
        raise ValueError(f'`{name}` must have at least {min_len} token(s) (a loss needs 2: inputs and next-token labels), got shape {tuple(tokens.shape)}')

    return tokens.long()

def check_mask(mask: Tensor, like: Tensor, name: str, like_name: str) -> Tensor:
    if mask.shape != like.shape:
        raise ValueError(f'`{name}` must have the shape of `{like_name}` {tuple(like.shape)}, got {tuple(mask.shape)}')

    if mask.dtype.is_floating_point:
        raise TypeError(f'`{name}` must be a bool tensor (True for real tokens), got dtype {mask.dtype}')

    return mask.bool()

def check_labels(labels: Tensor, like: Tensor, like_name: str) -> Tensor:
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f'`labels` must hold integer token ids (-100 where ignored), got dtype {labels.dtype}')

    if labels.shape != like.shape:
        raise ValueError(
            f'`labels` must have the shape of `{like_name}` {tuple(like.shape)}, got {tuple(labels.shape)}: '
            'they are aligned with the tokens, not shifted (the shift to next-token targets happens inside)'
        )

    return labels.long()

def per_augment(value, num_augments: int, name: str) -> list:
    if not isinstance(value, (list, tuple)):
        return [value] * num_augments

    if len(value) != num_augments:
        raise ValueError(f'`{name}` holds {len(value)} entries but there are {num_augments} augments; pass one per augment, or a single tensor for all')

    return list(value)
