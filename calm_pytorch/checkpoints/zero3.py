from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext

import torch
from torch import Tensor
from torch.nn import Module

# DeepSpeed ZeRO-3 partitions every parameter across the processes: outside its own forward and
# backward a parameter is an empty (0,) tensor, its true shape in `ds_shape`. A checkpoint read
# from such tensors is a file of empty tensors and a fingerprint of nothing. Here the composition
# weights are gathered whole for the save, and each frozen tensor is gathered alone for its
# fingerprint sample (a few elements kept, the whole model never held at once). Gathering is a
# collective: under ZeRO-3 every process calls `calm.save`, and the first one writes the file.
# DeepSpeed is imported only when a partitioned parameter is met.

def is_partitioned(tensor: Tensor) -> bool:
    return hasattr(tensor, 'ds_id') and hasattr(tensor, 'ds_shape')

def partitioned(tensors: Iterable[Tensor]) -> list[Tensor]:
    return [tensor for tensor in tensors if is_partitioned(tensor)]

def any_partitioned(module: Module) -> bool:
    return any(is_partitioned(param) for param in module.parameters())

def full_shape(tensor: Tensor) -> tuple[int, ...]:
    return tuple(tensor.ds_shape) if is_partitioned(tensor) else tuple(tensor.shape)

def full_numel(tensor: Tensor) -> int:
    return tensor.ds_numel if is_partitioned(tensor) else tensor.numel()

def gathered(params: Iterable[Tensor]):
    """A context in which the given ZeRO-3 parameters are whole (read-only: changes are dropped on
    exit); nothing happens to parameters that are not partitioned."""

    params = partitioned(params)

    if len(params) == 0:
        return nullcontext()

    from deepspeed.runtime.zero.partition_parameters import GatheredParameters
    return GatheredParameters(params, modifier_rank = None)

def writes_the_file(module: Module) -> bool:
    """Under ZeRO-3 only the first process writes what all of them gathered."""

    if not any_partitioned(module) or not torch.distributed.is_initialized():
        return True

    return torch.distributed.get_rank() == 0

def refuse_partitioned_load(module: Module, path):
    if any_partitioned(module):
        raise RuntimeError(
            f'cannot load {path} into a composition whose weights DeepSpeed ZeRO-3 has partitioned: its optimizer keeps '
            'its own copy of them, which the next step would write back. Load the composition before training starts '
            '(calm.load(...), then the Trainer), or resume with the Trainer\'s DeepSpeed checkpoint (resume_from_checkpoint)'
        )
