from __future__ import annotations

import torch
from torch import Tensor

from calm_pytorch.helpers import exists

# projected keys and values (b, h, j, d) of one cross-attention during generation, grown as the
# augment reads more positions: one length for the batch (KVBuffer), or one per row (RowKeysValues)

class KVBuffer:
    """Projected keys and values (b, h, j, d) of one cross-attention in aligned mode, written into
    storage allocated once for the whole generation instead of concatenated every step."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.length = 0
        self.k = self.v = None

    def append(self, k: Tensor, v: Tensor):
        n = k.shape[-2]

        if not exists(self.k):
            b, h, _, d = k.shape
            self.k = k.new_empty((b, h, self.capacity, d))
            self.v = v.new_empty((b, h, self.capacity, d))

        self.k[:, :, self.length:self.length + n] = k
        self.v[:, :, self.length:self.length + n] = v
        self.length += n

    def view(self) -> tuple[Tensor, Tensor]:
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

class RowKeysValues:
    """Projected keys and values (b, h, j, d) of one cross-attention, a length per row. Unused
    slots hold zeros: a masked key gets zero weight, and 0 * NaN would still be NaN."""

    def __init__(self, batch: int, heads: int, dim_head: int, like: Tensor):
        # allocated up front: until a row's text commits a token, every row may have none (the view
        # is then one masked slot)
        self.lengths = [0] * batch
        self.k, self.v = (like.new_zeros((batch, heads, 16, dim_head)) for _ in range(2))

    def write(self, row: int, start: int, k: Tensor, v: Tensor):
        end = start + k.shape[-2]

        if end > self.k.shape[-2]:
            grow = max(end, 2 * self.k.shape[-2]) - self.k.shape[-2]
            self.k, self.v = (torch.cat((t, t.new_zeros((*t.shape[:2], grow, t.shape[-1]))), dim = -2) for t in (self.k, self.v))

        self.k[row, :, start:end] = k[0]
        self.v[row, :, start:end] = v[0]
        self.lengths[row] = end

    def view(self) -> tuple[Tensor, Tensor]:
        length = max([1, *self.lengths])
        return self.k[:, :, :length], self.v[:, :, :length]
