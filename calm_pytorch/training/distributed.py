from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel

from calm_pytorch.helpers import exists

# torch.distributed, as launched by torchrun: it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
# and MASTER_PORT for every process. Without them (a plain `python train.py`) training runs in
# one process and nothing here communicates.

@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')
    initialized_here: bool = False  # this process group was started by us, and is ours to end

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op = dist.ReduceOp.SUM)
        return tensor

    def all_gather_objects(self, obj) -> list:
        if not self.enabled:
            return [obj]

        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def close(self):
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()
            self.initialized_here = False

def default_device(local_rank: int) -> torch.device:
    return torch.device('cuda', local_rank) if torch.cuda.is_available() else torch.device('cpu')

def setup_distributed(device: str | torch.device | None = None, backend: str | None = None) -> Distributed:
    """Joins the process group torchrun describes (or the one already initialised), choosing nccl
    for GPUs and gloo for CPUs unless a backend is given. One process alone gets a no-op `Distributed`."""

    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    device = torch.device(device) if exists(device) else default_device(local_rank)

    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', local_rank)

    if device.type == 'cuda':
        torch.cuda.set_device(device)  # nccl and all_gather_object use the current device

    initialized_here = False

    if not dist.is_initialized():
        if int(os.environ.get('WORLD_SIZE', 1)) <= 1:
            return Distributed(device = device)

        backend = backend or ('nccl' if device.type == 'cuda' else 'gloo')
        dist.init_process_group(backend = backend)
        initialized_here = True

    return Distributed(
        rank = dist.get_rank(),
        world_size = dist.get_world_size(),
        local_rank = local_rank,
        device = device,
        initialized_here = initialized_here
    )

def wrap_for_ddp(calm: Module, distributed: Distributed, find_unused_parameters: bool = False) -> Module:
    """DistributedDataParallel around the whole CALM, so that its forward (which runs the
    cross-attentions from hooks inside the anchor) is the one DDP watches. Only the trainable
    composition weights take part: they are broadcast from rank 0 at the start and all-reduced
    every step. The frozen models' parameters and buffers are listed as ignored, so they are
    neither broadcast (each process loads its own copy) nor synchronised every forward."""

    if not distributed.enabled:
        return calm

    ignored = [name for name, param in calm.named_parameters() if not param.requires_grad]
    ignored += [name for name, _ in calm.named_buffers() if not name.startswith('cross_attns.')]

    # the documented way to exclude parameters and buffers from DDP (still underscored in torch 2.13)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(calm, ignored)

    return DistributedDataParallel(
        calm,
        device_ids = [distributed.device.index] if distributed.device.type == 'cuda' else None,
        find_unused_parameters = find_unused_parameters
    )
