from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from calm_pytorch.helpers import exists

# sampling filters on logits (b, num_tokens); each keeps the most likely tokens and sets the rest to -inf

def top_k_filter(logits: Tensor, k: int) -> Tensor:
    k = min(k, logits.shape[-1])
    kth = logits.topk(k, dim = -1).values[..., -1:]
    return logits.masked_fill(logits < kth, float('-inf'))

def top_p_filter(logits: Tensor, p: float) -> Tensor:
    # keep the smallest set of tokens whose probabilities sum to at least p
    sorted_logits, indices = logits.sort(dim = -1, descending = True)
    cum_probs = sorted_logits.softmax(dim = -1).cumsum(dim = -1)
    drop_sorted = (cum_probs - sorted_logits.softmax(dim = -1)) >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, indices, drop_sorted)
    return logits.masked_fill(drop, float('-inf'))

def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    # keep tokens at least min_p times as likely as the most likely one
    probs = logits.softmax(dim = -1)
    limit = probs.amax(dim = -1, keepdim = True) * min_p
    return logits.masked_fill(probs < limit, float('-inf'))

def sample(
    logits: Tensor,
    *,
    temperature: float = 1.,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None
) -> Tensor:
    """(b, num_tokens) logits of the next position -> (b,) token ids. temperature 0 is greedy."""

    if temperature == 0.:
        return logits.argmax(dim = -1)

    logits = logits.float() / temperature

    if exists(top_k):
        logits = top_k_filter(logits, top_k)

    if exists(top_p):
        logits = top_p_filter(logits, top_p)

    if exists(min_p):
        logits = min_p_filter(logits, min_p)

    return torch.multinomial(F.softmax(logits, dim = -1), 1).squeeze(-1)
