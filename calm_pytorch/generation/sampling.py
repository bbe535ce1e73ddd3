from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from calm_pytorch.helpers import exists

def top_k_filter(logits: Tensor, k: int) -> Tensor:
    # keep the k most likely tokens (ties with the k-th are kept too)
    k = min(k, logits.shape[-1])
    kth = logits.topk(k, dim = -1).values[..., -1:]
    return logits.masked_fill(logits < kth, float('-inf'))

def top_p_filter(logits: Tensor, p: float) -> Tensor:
    # keep the smallest set of most likely tokens whose probabilities sum to at least p
    sorted_logits, indices = logits.sort(dim = -1, descending = True)
    sorted_probs = sorted_logits.softmax(dim = -1)
    drop_sorted = (sorted_probs.cumsum(dim = -1) - sorted_probs) >= p   # the mass before a token already reaches p
    drop = torch.zeros_like(drop_sorted).scatter(-1, indices, drop_sorted)
    return logits.masked_fill(drop, float('-inf'))

def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    # keep tokens at least min_p times as likely as the most likely one
    probs = logits.softmax(dim = -1)
    limit = probs.amax(dim = -1, keepdim = True) * min_p
    return logits.masked_fill(probs < limit, float('-inf'))

def checked_filter_output(filtered, logits: Tensor) -> Tensor:
    # what a user's function returns picks the tokens: a row of another shape would be broadcast
    # to every row or give ids outside the vocabulary, and a row with no possible token would be
    # greedy's silent id 0 (a nan, greedy's pick). Two reductions and one device sync per step,
    # only with a filter_fn
    if not isinstance(filtered, Tensor) or filtered.shape != logits.shape or not filtered.dtype.is_floating_point:
        got = f'{type(filtered).__name__} of shape {tuple(filtered.shape)} and dtype {filtered.dtype}' if isinstance(filtered, Tensor) else type(filtered).__name__
        raise ValueError(f'`filter_fn` must return float logits of the shape it was given, {tuple(logits.shape)} (batch, vocabulary); got {got}')

    unsound = filtered.isnan().any(dim = -1) | (filtered == float('-inf')).all(dim = -1)
    if bool(unsound.any()):
        rows = unsound.nonzero().flatten().tolist()
        raise ValueError(f'`filter_fn` returned logits with a nan, or with every token at -inf, in row(s) {rows}: no token can be chosen there')

    return filtered

def check_sampling(temperature: float, top_k: int | None, top_p: float | None, min_p: float | None):
    # a bool is an int to Python, but `temperature = True` or `top_k = True` is a mistake
    for name, value in dict(temperature = temperature, top_k = top_k, top_p = top_p, min_p = min_p).items():
        if isinstance(value, bool):
            raise TypeError(f'`{name}` must be a number, got {value!r}')

    # nan passes every comparison, and inf flattens the distribution to nan probabilities
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f'`temperature` must be a finite number >= 0 (0 is greedy), got {temperature}')

    if exists(top_k) and top_k < 1:
        raise ValueError(f'`top_k` must be at least 1, got {top_k}')

    if exists(top_p) and not 0. < top_p <= 1.:
        raise ValueError(f'`top_p` must be in (0, 1], got {top_p}')

    if exists(min_p) and not 0. <= min_p <= 1.:
        raise ValueError(f'`min_p` must be in [0, 1], got {min_p}')

# logits / temperature overflow float32 (3.4e38) only at a tiny temperature (at 1e-20, a logit
# over 3.4e18 would): rows are checked for it below this bound only, sparing every sampling step
TINY_TEMPERATURE = 1e-20

def sample(
    logits: Tensor,
    *,
    temperature: float = 1.,
    filter_fn: Callable[[Tensor], Tensor] | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None
) -> Tensor:
    """(b, v) logits of the next position -> (b,) token ids.

    The logits are divided by `temperature` first (so top_p and min_p see the tempered
    distribution), then `filter_fn`, `top_k`, `top_p` and `min_p` are applied in that order.
    `temperature = 0` is greedy: the argmax of the filtered logits."""

    greedy = temperature == 0.
    logits = logits.float()

    if not greedy:
        tempered = logits / temperature

        if temperature < TINY_TEMPERATURE:
            # a row may overflow (its largest logits to inf, or all of them to -inf: nan
            # probabilities); such a row takes the limit the temperature tends to, its largest
            # logits, ties drawn evenly
            overflowed = ~tempered.amax(dim = -1, keepdim = True).isfinite()
            largest = logits == logits.amax(dim = -1, keepdim = True)
            tempered = torch.where(overflowed, torch.zeros_like(logits).masked_fill(~largest, float('-inf')), tempered)

        logits = tempered

    if exists(filter_fn):
        logits = checked_filter_output(filter_fn(logits), logits)

    if exists(top_k):
        logits = top_k_filter(logits, top_k)

    if exists(top_p):
        logits = top_p_filter(logits, top_p)

    if exists(min_p):
        logits = min_p_filter(logits, min_p)

    if greedy:
        return logits.argmax(dim = -1)

    return torch.multinomial(logits.softmax(dim = -1), 1).squeeze(-1)
