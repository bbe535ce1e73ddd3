from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module

from calm_pytorch.checkpoints.zero3 import full_shape, gathered, is_partitioned


# the identity of a frozen model, saved with a composition checkpoint so that loading it over other
# models is an error rather than a silent mismatch: the cross-attention learned to read one
# augment's hidden states into one anchor, and other weights of the same shapes mean nothing to it.
#
# The weights are fingerprinted by a fixed sample of each tensor (SAMPLES elements at evenly
# spaced positions), never a full pass: the cost grows with the number of tensors, not their size
# (a few hundred tensors for a 7B model). Tensors whose values cannot be read cheaply (on the meta
# device, or tensor subclasses: quantized weights, DTensor shards) count by name, shape and dtype only.

SAMPLES = 16
DIGEST_CHARS = 16  # 64 bits of sha256: telling models apart, not resisting forgery

def readable(tensor: Tensor) -> bool:
    return type(tensor) in (Tensor, torch.nn.Parameter) and not tensor.is_meta

def sample(tensor: Tensor) -> Tensor:
    # the same positions for every tensor of a shape; advanced indexing reads only them, even
    # from a non-contiguous tensor
    numel = tensor.numel()
    flat = torch.arange(min(numel, SAMPLES), device = tensor.device)

    if numel > SAMPLES:
        flat = flat * (numel - 1) // (SAMPLES - 1)

    if tensor.ndim == 0:
        return tensor.detach().reshape(1)

    return tensor.detach()[torch.unravel_index(flat, tensor.shape)]

def as_bytes(tensor: Tensor) -> bytes:
    tensor = tensor.cpu().contiguous()
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() > 0 else b''

def class_name(model: Module) -> str:
    # FSDP2's fully_shard swaps a module's class for a generated `FSDP<Class>`: a sharded model is
    # still the model it was (only its parameters become DTensor shards, counted unread)
    fsdp = sys.modules.get('torch.distributed.fsdp')
    fsdp_module = getattr(fsdp, 'FSDPModule', None)

    if isinstance(fsdp_module, type) and isinstance(model, fsdp_module):
        return next((base.__name__ for base in type(model).__bases__ if not issubclass(base, fsdp_module)), type(model).__name__)

    return type(model).__name__

def frozen_tensors(model: Module, skip: Iterable[str] = ()) -> list[tuple[str, Tensor]]:
    # what defines the model: its parameters and persistent buffers, as its state_dict holds them.
    # A non-persistent buffer is state that may change with use (dynamic RoPE's `inv_freq` grows
    # with the longest input read), never loaded from the weights
    skip = set(skip) | non_persistent_buffers(model)
    named = chain(model.named_parameters(), model.named_buffers())
    return sorted((name, tensor) for name, tensor in named if name not in skip)

def non_persistent_buffers(model: Module) -> set[str]:
    return {
        f'{prefix}.{name}' if prefix else name
        for prefix, module in model.named_modules(remove_duplicate = False)
        for name in module._non_persistent_buffers_set
    }

def model_identity(model: Module, *, layers: int, widths: Iterable[int], vocab_size: int | None, skip: Iterable[str] = ()) -> dict[str, Any]:
    """class, layer count, connected widths, vocabulary, and a fingerprint of the weights:
    `tensors` (names and shapes), `dtypes`, `weights` (the sampled values of the readable tensors)
    and how many were `unread`. `skip`: parameters that are trained, not frozen (e.g. LoRA weights)."""

    tensors = frozen_tensors(model, skip)
    structure, weights = hashlib.sha256(), hashlib.sha256()
    samples, unread = [], 0

    for name, tensor in tensors:
        structure.update(f'{name}:{full_shape(tensor)};'.encode())
        weights.update(f'{name}:{tensor.dtype};'.encode())

        if is_partitioned(tensor):
            # DeepSpeed ZeRO-3: whole for as long as it takes to read the sample (zero3.py)
            with gathered([tensor]):
                samples.append(sample(tensor).clone())
        elif readable(tensor):
            samples.append(sample(tensor))
        else:
            unread += 1

    # one transfer per device and dtype: on a GPU, one sync per group rather than one per tensor
    for chunk in concatenated(samples):
        weights.update(as_bytes(chunk))

    return dict(
        model = class_name(model),
        layers = layers,
        widths = sorted(set(widths)),
        vocab_size = vocab_size,
        dtypes = sorted({str(tensor.dtype).removeprefix('torch.') for _, tensor in tensors}),
        tensors = structure.hexdigest()[:DIGEST_CHARS],
        weights = weights.hexdigest()[:DIGEST_CHARS],
        unread = unread
    )

def concatenated(samples: list[Tensor]) -> list[Tensor]:
    groups: dict[tuple, list[Tensor]] = {}

    for tensor in samples:
        groups.setdefault((str(tensor.device), str(tensor.dtype)), []).append(tensor.reshape(-1))

    # the order of the groups is the order of their first tensor: fixed for a given model
    return [torch.cat(group) for group in groups.values()]

def composition_identities(calm) -> dict[str, Any]:
    """The identity of the anchor and of each augment of a CALM, as saved with its checkpoint."""

    anchor = model_identity(
        calm.anchor,
        layers = len(calm.anchor_adapter.layers),
        widths = [block.norm.normalized_shape[0] for blocks in calm.cross_attns for block in blocks],
        vocab_size = calm.anchor_adapter.vocab_size,
        skip = calm.trainable_anchor_params  # trained with the composition (LoRA weights), not frozen
    )

    augments = [
        model_identity(
            model,
            layers = num_layers,
            widths = [block.context_norm.normalized_shape[0] for block in blocks],
            vocab_size = adapter.vocab_size
        )
        for model, adapter, num_layers, blocks in zip(calm.augments, calm.augment_adapters, calm.num_augment_layers, calm.cross_attns)
    ]

    return dict(anchor = anchor, augments = augments)

# comparing

def models_differences(saved: dict[str, Any], current: dict[str, Any], cast: bool = False) -> tuple[list[str], list[str]]:
    """(differences, warnings) over the anchor and every augment, each line naming its model.
    cast: the models were loaded in another dtype on purpose; their values then go uncompared (a warning)."""

    named = [('anchor', saved['anchor'], current['anchor'])]
    named += [(f'augment {index}', one, other) for index, (one, other) in enumerate(zip(saved['augments'], current['augments']))]

    differences, warnings = [], []

    for name, one, other in named:
        found, cannot = identity_differences(one, other, cast)
        differences += [f'{name}: {line}' for line in found]
        warnings += [f'{name}: {line}' for line in cannot]

    return differences, warnings

def identity_differences(saved: dict[str, Any], current: dict[str, Any], cast: bool = False) -> tuple[list[str], list[str]]:
    """(differences, warnings): what tells the models apart, and what could not be compared."""

    differences, warnings = [], []

    for field, what in (('model', 'class'), ('layers', 'layer count'), ('widths', 'connected widths'), ('vocab_size', 'vocabulary size')):
        if saved.get(field) != current.get(field):
            differences.append(f'{what} {saved.get(field)!r} in the checkpoint, {current.get(field)!r} here')

    if saved.get('tensors') != current.get('tensors'):
        differences.append('its tensors (names and shapes) differ')
    elif saved.get('dtypes') != current.get('dtypes'):
        (warnings if cast else differences).append(f'its weights are {"/".join(current.get("dtypes", []))} here, {"/".join(saved.get("dtypes", []))} in the checkpoint, so their values cannot be compared')
    elif saved.get('unread') != current.get('unread'):
        warnings.append(f'its weights could not be compared: {saved.get("unread")} tensors were unreadable (meta device, quantized or sharded) when saved, {current.get("unread")} here')
    elif saved.get('weights') != current.get('weights'):
        differences.append(f'its weights differ (fingerprint {saved.get("weights")} in the checkpoint, {current.get("weights")} here): same shapes, other values')

    return differences, warnings
