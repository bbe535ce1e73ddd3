from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch.nn import Module

from calm_pytorch.helpers import exists
from calm_pytorch.models.adapter import ModelAdapter
from calm_pytorch.models.xtransformers import XTransformersAdapter
from calm_pytorch.training.distributed import Distributed

# FSDP2 (`fully_shard`) for the frozen models: each process keeps 1/N of every anchor and augment
# weight and gathers one block at a time for its forward (and the anchor's for its backward).
#
#   sharded     every block of the anchor and of each augment (a unit each), then the rest of
#               each model (embeddings, final norm, head) as one unit per model
#   replicated  the composition weights (calm.cross_attns): a few percent of the frozen weights,
#               trained, and read by hooks inside the anchor's forward. Kept whole in every
#               process, their gradients averaged by one all-reduce per step (what DDP does), so
#               that `calm.save`, the optimizer state and resume stay exactly as without FSDP
#
# The CALM's hooks are registered before sharding and keep working: FSDP2 adds its own hooks to
# the same modules (gather before a block's forward, free after it); ours read and write hidden
# states in between. x-transformers hooks sit on residual modules, which hold no weights: there
# the units are the attention and feedforward modules themselves.
#
# One change of behaviour: an augment runs to its end instead of stopping after its deepest
# connected layer. The stop is an exception raised from a block's forward hook, which skips FSDP's
# post-forward: that block and the augment's own root unit would stay gathered (whole weights in
# every process) and their FSDP state stuck in 'forward'. Running to the end costs the augment's
# upper layers and head, without gradients.

Strategy = Literal['ddp', 'fsdp']
STRATEGIES = ('ddp', 'fsdp')

def shard_units(model: Module, adapter: ModelAdapter) -> list[Module]:
    """The modules of one frozen model that become FSDP units of their own, innermost first."""

    if isinstance(adapter, XTransformersAdapter):
        # each layer is a (norms, branch, residual) triple: the branch holds the weights
        candidates = [branch for _, branch, _ in adapter.model.attn_layers.layers]
    elif exists(adapter.layers):
        candidates = [site.module for layer in adapter.layers for site in (layer.input, layer.output)]
    else:
        candidates = []  # a model returning its hidden states: only its root unit

    chosen = {id(module) for module in candidates if module is not model and next(module.parameters(), None) is not None}

    # children before their parents: FSDP2 wants nested units sharded inside out
    return [module for module in reversed(list(model.modules())) if id(module) in chosen]

def is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(tensor, DTensor)

def is_sharded(module: Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)

def refuse_trained_frozen_params(calm: Module, what: str, instead: str):
    trainable = [name for model in ('anchor', 'augments') for name, param in getattr(calm, model).named_parameters(prefix = model) if param.requires_grad]

    if len(trainable) > 0:
        raise ValueError(
            f"{what} shards frozen models only, but these of their parameters are trained: {', '.join(trainable[:5])}"
            f"{' ...' if len(trainable) > 5 else ''}. Train them with {instead}"
        )

def refuse_quantized(calm: Module):
    # FSDP2 splits every weight into shards (aten.split and friends); a quantized weight is a tensor
    # subclass (torchao's Int8Tensor, ...) that implements only the operations of its own forward
    quantized = [
        (name, type(param).__name__) for model in ('anchor', 'augments') for name, param in getattr(calm, model).named_parameters(prefix = model)
        if type(param) not in (torch.Tensor, torch.nn.Parameter) and not is_dtensor(param)
    ]

    if len(quantized) > 0:
        names = ', '.join(f'{name} ({kind})' for name, kind in quantized[:3])
        raise ValueError(
            f"strategy='fsdp' cannot shard quantized weights: {names}{' ...' if len(quantized) > 3 else ''} are tensor subclasses "
            "that FSDP2 cannot split into shards. Train over quantized models with strategy='ddp' (each process holds the "
            "quantized models whole), or shard models that are not quantized"
        )

def shard_frozen_models(calm: Module, distributed: Distributed) -> Module:
    """Shards the anchor and the augments of `calm` over the processes, in place, and makes the
    composition weights equal to rank 0's (as DDP would). Returns `calm`; one process: unchanged."""

    refuse_trained_frozen_params(calm, "strategy='fsdp'", "strategy='ddp'")
    refuse_quantized(calm)

    if not distributed.enabled:
        return calm

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(distributed.device.type, (distributed.world_size,))

    for model, adapter in ((calm.anchor, calm.anchor_adapter), *zip(calm.augments, calm.augment_adapters)):
        if is_sharded(model):
            continue  # a second FineTuner over the same CALM

        for unit in shard_units(model, adapter):
            fully_shard(unit, mesh = mesh)

        # FSDP would keep a root unit gathered after its forward, until its backward frees it;
        # an augment has no backward (nor has the anchor in evaluation and generation)
        fully_shard(model, mesh = mesh, reshard_after_forward = True)

    for recorder in calm.recorders:
        recorder.stop_early = False

    with torch.no_grad():
        for tensor in (*calm.cross_attns.parameters(), *calm.cross_attns.buffers()):
            dist.broadcast(tensor, src = 0)

    return calm

def average_gradients(params: list[torch.Tensor], distributed: Distributed):
    """Averages the gradients of replicated parameters over the processes: one all-reduce of all
    of them flattened together. A missing gradient counts as zero, so that every process sends
    the same number of values."""

    if not distributed.enabled:
        return

    grads = []

    for param in params:
        if not exists(param.grad):
            param.grad = torch.zeros_like(param)
        grads.append(param.grad)

    flat = torch.cat([grad.reshape(-1) for grad in grads])
    dist.all_reduce(flat, op = dist.ReduceOp.SUM)
    flat.div_(distributed.world_size)

    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()

def local_and_global_numel(module: Module) -> tuple[int, int]:
    """(elements this process holds, elements of the whole model) over the parameters of `module`."""

    from torch.distributed.tensor import DTensor

    local = total = 0

    for param in module.parameters():
        local += param.to_local().numel() if isinstance(param, DTensor) else param.numel()
        total += param.numel()

    return local, total
