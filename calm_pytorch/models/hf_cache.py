from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from calm_pytorch.helpers import exists

# The cache a transformers model decodes with inside `calm.generate`: transformers' own
# `DynamicCache`, whose full-attention layers write each step's keys and values into room reserved
# ahead instead of concatenating. A concatenation copies the layer's whole cache at every step:
# on the benchmark's Llama at batch 8 that is up to a tenth of the anchor's decoding time.
# Imported only when a transformers model decodes (hf_adapter.py), so transformers stays optional.

SLACK = 256  # positions a new room holds past the need at least: most generations fit their first

def new_cache(config: Any, rollback: bool, capacity: int | None = None) -> DynamicCache:
    """A `DynamicCache` for `config`. `capacity`: the positions it is expected to hold, a hint it
    grows past; None where unknown."""

    # with the config, sliding-window layers get their own (bounded) cache layers, and keep them
    cache = DynamicCache(config = config)
    cache.layers = [ReservedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]

    if rollback:
        # sliding-window layers keep what `crop` may roll back to
        cache.activate_past_recording()

    return cache

class ReservedLayer(DynamicLayer):
    """A full-attention `DynamicLayer` whose keys and values are views of the front of a larger
    buffer, the room. An update writes the new positions behind them in place; a full room is
    replaced by one twice as large, up to the capacity hint first. Everything else (crop, beam
    reorder, batch select, offload) is transformers' own, on the views: a crop keeps a front view,
    and a method that replaces the tensors makes the next update copy them into a new room."""

    _layer_type = None  # registers under no layer type: transformers' own caches never build it

    def __init__(self, capacity: int | None = None):
        super().__init__()
        self.capacity = capacity
        self.room: tuple[Tensor, Tensor] | None = None
        self.reservations = 0  # rooms allocated: tests count the work

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        # writing in place would break the graph of a backward pass through earlier steps; and
        # torch.compile cannot trace the room's bookkeeping (it compares data pointers): a
        # compiled forward concatenates, as transformers' own layer does
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad)):
            return super().update(key_states, value_states, *args, **kwargs)

        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)

        length = self.get_seq_length()
        end = length + key_states.shape[-2]

        if not self.holds(key_states, value_states, end):
            self.reserve(key_states, value_states, end)

        # narrow, not indexing: this runs once per layer per generated token
        for room, states in zip(self.room, (key_states, value_states)):
            room.narrow(2, length, end - length).copy_(states)

        self.keys, self.values = (room.narrow(2, 0, end) for room in self.room)
        return self.keys, self.values

    def holds(self, key_states: Tensor, value_states: Tensor, end: int) -> bool:
        # the room fits `end` positions of such states, and the cached ones are its front
        if not exists(self.room) or end > self.room[0].shape[-2]:
            return False

        for room, states, cached in zip(self.room, (key_states, value_states), (self.keys, self.values)):
            if (room.shape[:2], room.shape[-1], room.dtype, room.device) != (states.shape[:2], states.shape[-1], states.dtype, states.device):
                return False

            # a crop keeps a front view of the room; a reorder, a select or an offload does not
            if cached.numel() > 0 and (cached.data_ptr(), cached.shape[:2], cached.stride()) != (room.data_ptr(), room.shape[:2], room.stride()):
                return False

        return True

    def reserve(self, key_states: Tensor, value_states: Tensor, end: int):
        # twice the need or the room held (and SLACK past the need at least), but no more than
        # the hint while it suffices: a large max_new_tokens that an eos ends early never
        # reserves its whole length
        held = max(end, self.room[0].shape[-2] if exists(self.room) else 0)
        grown = max(2 * held, end + SLACK)
        size = min(grown, self.capacity) if exists(self.capacity) and end <= self.capacity else grown
        length = self.get_seq_length()

        room = []
        for states, cached in zip((key_states, value_states), (self.keys, self.values)):
            tensor = states.new_empty((*states.shape[:2], size, states.shape[-1]))
            if length > 0:
                tensor[:, :, :length].copy_(cached)
            room.append(tensor)

        self.room = tuple(room)
        self.reservations += 1
