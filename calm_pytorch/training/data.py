from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from itertools import islice
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler, IterableDataset, get_worker_info

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

class DataError(ValueError):
    """A column of the dataset does not hold what FineTuner can train on."""

# Hugging Face's names for CALM's keywords
NAMES = dict(input_ids = 'seq', attention_mask = 'mask')

def named(batch: Mapping, where: str = 'the batch') -> dict[str, Any]:
    batch = dict(batch)

    for hf_name, name in NAMES.items():
        if hf_name in batch and name in batch:
            raise DataError(f'{where} has both {hf_name!r} and {name!r}, two names for one thing (CALM\'s {name!r}); keep one column')

        if hf_name in batch:
            batch[name] = batch.pop(hf_name)

    return batch

def as_kwargs(batch, batch_keys: Sequence[str] | None) -> dict:
    """A batch (or a row) as keyword arguments of the loss: a dict as is, a tuple named by
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

# Hugging Face datasets. Formats whose rows FineTuner reads: python (the default), torch, numpy,
# pandas; others (arrow tables, polars, jax, tf) are read as python rows instead

READABLE_FORMATS = (None, 'python', 'torch', 'numpy', 'np', 'pandas')

def readable_rows(dataset):
    datasets = sys.modules.get('datasets')

    if not exists(datasets) or not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        return dataset

    if isinstance(dataset, datasets.Dataset):
        if dataset.format['type'] in READABLE_FORMATS:
            return dataset

        return dataset.with_format(None, columns = dataset.format['columns'], output_all_columns = dataset.format['output_all_columns'])

    formatting = getattr(dataset, '_formatting', None)
    return dataset if getattr(formatting, 'format_type', None) in READABLE_FORMATS else dataset.with_format(None)

# streams: an IterableDataset has no length and no random access. Each process reads its own
# share (a Hugging Face IterableDataset split by `split_dataset_by_node`, any other every
# world_size-th item), in the stream's own order: shuffle it yourself (`dataset.shuffle(seed, buffer_size)`)

class StreamShard(IterableDataset):
    """Every `world_size`-th item of a stream, from `rank` on; with DataLoader workers, each worker
    takes every (world_size * num_workers)-th."""

    def __init__(self, dataset: IterableDataset, rank: int, world_size: int):
        self.dataset = dataset
        self.rank = rank
        self.world_size = world_size

    def set_epoch(self, epoch: int):
        if hasattr(self.dataset, 'set_epoch'):
            self.dataset.set_epoch(epoch)

    def __iter__(self):
        worker = get_worker_info()
        num_workers, worker_id = (worker.num_workers, worker.id) if exists(worker) else (1, 0)
        return islice(iter(self.dataset), self.rank * num_workers + worker_id, None, self.world_size * num_workers)

def shard_stream(dataset: IterableDataset, rank: int, world_size: int) -> IterableDataset:
    datasets = sys.modules.get('datasets')

    if exists(datasets) and isinstance(dataset, datasets.IterableDataset):
        from datasets.distributed import split_dataset_by_node
        return split_dataset_by_node(dataset, rank = rank, world_size = world_size) if world_size > 1 else dataset

    return StreamShard(dataset, rank, world_size) if world_size > 1 else dataset
