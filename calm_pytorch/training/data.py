from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import islice
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

from calm_pytorch.helpers import exists

@runtime_checkable
class MapDataset(Protocol):
    """What the trainer can shard: a torch map-style Dataset, a list, a Hugging Face dataset..."""
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Any: ...

class ResumableDistributedSampler(DistributedSampler):
    """A DistributedSampler that can start partway into an epoch: a resumed run sees exactly the
    samples an uninterrupted one would, without loading the skipped ones.

    `start` counts this process's samples to skip in the current epoch; set it with `set_epoch`."""

    start: int = 0

    def set_epoch(self, epoch: int, start: int = 0):
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return max(0, super().__len__() - self.start)

def as_kwargs(batch, batch_keys: Sequence[str] | None) -> dict:
    """A collated batch as keyword arguments of the loss: a dict as is, a tuple named by
    `batch_keys`, a lone tensor as `seq`."""

    if isinstance(batch, Mapping):
        return dict(batch)

    if isinstance(batch, Tensor):
        return dict(seq = batch)

    if isinstance(batch, Sequence):
        if not exists(batch_keys):
            raise ValueError(
                f'the dataset yields tuples of {len(batch)} items; name them with `batch_keys`, '
                "e.g. batch_keys=('seq', 'mask'), or yield dicts"
            )

        if len(batch_keys) != len(batch):
            raise ValueError(f'the dataset yields tuples of {len(batch)} items but batch_keys names {len(batch_keys)}: {tuple(batch_keys)}')

        return dict(zip(batch_keys, batch))

    raise TypeError(f'the dataset must yield dicts, tuples or tensors, got {type(batch).__name__}')

def to_device(value, device: torch.device):
    if isinstance(value, Tensor):
        return value.to(device, non_blocking = True)

    if isinstance(value, Mapping):
        return {key: to_device(item, device) for key, item in value.items()}

    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, device) for item in value)

    return value
