from __future__ import annotations

import torch
from torch import Tensor

from calm_pytorch.composition.cross_attention import ContextMemory, CrossAttentionBlock
from calm_pytorch.composition.injection import AugmentContext
from calm_pytorch.composition.protocol import Composition
from calm_pytorch.helpers import exists

# what decoding keeps of one cross-attention's context (`ContextMemory`: keys and values, or the
# normalised augment states where the block's projections are folded), grown as the augment reads
# more positions: one length for the batch (KVBuffer), or one per row (RowKeysValues)

def fixed_memory(calm: Composition, index: int, context: AugmentContext, fold: bool = True) -> AugmentContext:
    """A context-mode context (augment `index` read its prompt) as its cross-attentions' memory,
    computed once for every call that reads it; `fold = False` keeps keys and values, whose
    attention is the forward's to the last bit."""
    memory = {}

    for block, key in zip(calm.cross_attns[index], calm.augment_keys[index]):
        hiddens = context.hiddens[key]
        folded = block.fold_for(hiddens.shape[0] * hiddens.shape[1]) if fold else None
        memory[block] = ContextMemory(block.remember(hiddens, folded), folded)

    return AugmentContext({}, context.mask, causal = False, memory = memory)

class KVBuffer:
    """One cross-attention's memory in aligned mode, written into storage allocated once for the
    whole generation instead of concatenated every step."""

    def __init__(self, block: CrossAttentionBlock, capacity: int, batch: int):
        self.block, self.capacity = block, capacity
        self.folded = block.fold_for(batch * capacity, appending = True)
        self.length = 0
        self.states = None

    def append(self, hiddens: Tensor):
        """hiddens (b, n, dim_context): the augment's next n positions."""
        states = self.block.remember(hiddens, self.folded)
        n = hiddens.shape[-2]

        if not exists(self.states):
            self.states = tuple(t.new_empty((*t.shape[:2], self.capacity, t.shape[-1])) for t in states)

        for buffer, t in zip(self.states, states):
            buffer[:, :, self.length:self.length + n] = t

        self.length += n

    def view(self) -> ContextMemory:
        return ContextMemory(tuple(t[:, :, :self.length] for t in self.states), self.folded)

class RowKeysValues:
    """One cross-attention's memory, a length per row. Unused slots hold zeros: a masked key gets
    zero weight, and 0 * NaN would still be NaN."""

    def __init__(self, block: CrossAttentionBlock, batch: int, keys: int):
        # allocated up front: until a row's text commits a token, every row may have none (the view
        # is then one masked slot)
        self.block = block
        self.folded = block.fold_for(keys, appending = True)
        self.lengths = [0] * batch
        like = block.to_kv.weight
        self.states = tuple(like.new_zeros((batch, heads, 16, dim)) for heads, dim in block.state_shapes(self.folded))

    def remember(self, hiddens: Tensor) -> tuple[Tensor, ...]:
        return self.block.remember(hiddens, self.folded)

    def write(self, row: int, start: int, states: tuple[Tensor, ...]):
        """states: `remember`'s tensors of one row, (1, h, n, d) each, for its positions from `start` on."""
        end = start + states[0].shape[-2]

        if end > self.states[0].shape[-2]:
            grow = max(end, 2 * self.states[0].shape[-2]) - self.states[0].shape[-2]
            self.states = tuple(torch.cat((t, t.new_zeros((*t.shape[:2], grow, t.shape[-1]))), dim = -2) for t in self.states)

        for buffer, t in zip(self.states, states):
            buffer[row, :, start:end] = t[0]

        self.lengths[row] = end

    def view(self) -> ContextMemory:
        length = max([1, *self.lengths])
        return ContextMemory(tuple(t[:, :, :length] for t in self.states), self.folded)
