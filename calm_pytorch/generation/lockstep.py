from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn import Module

from calm_pytorch.composition.protocol import Composition
from calm_pytorch.helpers import exists

# generation with sharded models (FSDP): each forward gathers every block's weights from all the
# processes, so every process must run the same forwards of each model in the same order, even
# where their prompts make them diverge. What diverges is agreed first, by a small all-reduce:
# when to stop (only once every process's rows have ended: a process whose rows have ended goes
# on decoding, as an ended row does), and how many forwards an augment read across tokenizers runs
# in a step (its re-read depends on the text; the others run idle forwards). Settings that fix the
# forwards (the number of steps, use_cache) must be the same everywhere: checked once per call

def sharded_group(models: list[Module]):
    """The process group of the first sharded model (its weights are DTensors), or None."""

    if not (dist.is_available() and dist.is_initialized()):
        return None

    for model in models:
        for param in model.parameters():
            mesh = getattr(param, 'device_mesh', None)
            if exists(mesh):
                return mesh.get_group()

    return None

class Lockstep:
    """What the processes sharing the sharded models of one `generate` call agree on; without
    sharded models every answer is the process's own."""

    def __init__(self, calm: Composition):
        self.group = sharded_group([calm.anchor, *calm.augments])
        self.device = None

        if exists(self.group):
            # gloo reduces CPU tensors, nccl the current GPU's
            self.device = torch.device('cuda', torch.cuda.current_device()) if dist.get_backend(self.group) == 'nccl' else torch.device('cpu')

    @property
    def enabled(self) -> bool:
        return exists(self.group)

    def most(self, count: int) -> int:
        if not self.enabled:
            return count

        total = torch.tensor([count], device = self.device)
        dist.all_reduce(total, op = dist.ReduceOp.MAX, group = self.group)
        return int(total.item())

    def all_done(self, done: bool) -> bool:
        return self.most(int(not done)) == 0

    def check_same(self, **values: int):
        """Refuses, on every process at once, settings that change which forwards run."""

        if not self.enabled:
            return

        # the largest and the smallest of each, in one all-reduce
        extremes = torch.tensor([sign * value for value in values.values() for sign in (1, -1)], device = self.device)
        dist.all_reduce(extremes, op = dist.ReduceOp.MAX, group = self.group)

        for index, (name, value) in enumerate(values.items()):
            largest, smallest = int(extremes[2 * index].item()), -int(extremes[2 * index + 1].item())

            if largest != smallest:
                raise ValueError(
                    f'{name} differs between the processes sharing the sharded (FSDP) models: from {smallest} to {largest} (this process: {value}); '
                    'every process runs each step\'s forwards together, so give every process the same'
                )
