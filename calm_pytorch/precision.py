from __future__ import annotations

from itertools import chain
from typing import Literal

import torch
from torch import Tensor
from torch.nn import Module

from calm_pytorch.helpers import exists

# dtypes and devices. Each frozen model keeps its own precision (fp32, bf16, fp16) and device;
# inputs are moved (and float inputs cast) to the model that reads them, the cross-attention casts
# what it reads into its own dtype, and its delta goes back in the dtype of the anchor's hidden state

CompositionDtype = torch.dtype | Literal['anchor']

def floating_dtype(module: Module) -> torch.dtype | None:
    """The dtype of the module's first floating point parameter or buffer."""
    tensors = chain(module.parameters(), module.buffers())
    return next((tensor.dtype for tensor in tensors if tensor.is_floating_point()), None)

def model_device(module: Module) -> torch.device | None:
    tensor = next(chain(module.parameters(), module.buffers()), None)
    return tensor.device if exists(tensor) else None

def resolve_composition_dtype(composition_dtype: CompositionDtype, anchor: Module) -> torch.dtype:
    if composition_dtype == 'anchor':
        return floating_dtype(anchor) or torch.float32

    if not isinstance(composition_dtype, torch.dtype) or not composition_dtype.is_floating_point:
        raise ValueError(f"`composition_dtype` must be a floating point torch.dtype (e.g. torch.float32) or 'anchor', got {composition_dtype!r}")

    return composition_dtype

def check_finite(tensor: Tensor, what: str):
    # a check needs the values on the host: a graph break under torch.compile, so it is skipped there
    if torch.compiler.is_compiling():
        return

    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        num_nan, num_inf = int(tensor.isnan().sum()), int(tensor.isinf().sum())
        raise ValueError(f'{what} holds {num_nan} NaN and {num_inf} inf values; the composition would spread them to every anchor position that attends to it')

def to_model(inputs: Tensor, model: Module, name: str) -> Tensor:
    """Moves an input to the device of the model that reads it; a float input (an image, an
    embedding) is checked for NaN / inf first, then cast to the model's dtype."""

    device = model_device(model)

    if inputs.is_floating_point():
        check_finite(inputs, f'`{name}`')
        dtype = floating_dtype(model)
        return inputs.to(device = device, dtype = dtype) if exists(dtype) else inputs.to(device = device)

    return inputs.to(device = device) if exists(device) else inputs

def clean_context(hiddens: dict, mask: Tensor | None, what: str) -> dict:
    """Zeroes the padded positions of recorded hidden states (masked keys are never attended to,
    but a NaN there would still reach the output through a zero attention weight: 0 * NaN = NaN),
    then refuses NaN / inf at the real ones."""

    if exists(mask):
        hiddens = {key: hidden.masked_fill(~mask.to(hidden.device)[..., None], 0.) for key, hidden in hiddens.items()}

    if torch.compiler.is_compiling():
        return hiddens  # as in check_finite

    finite = [torch.isfinite(hidden).all() for hidden in hiddens.values()]

    # one reduction and one device sync for all layers
    if len(finite) > 0 and not bool(torch.stack([flag.to(finite[0].device) for flag in finite]).all()):
        layers = [key[0] + 1 for key, flag in zip(hiddens, finite) if not bool(flag)]
        raise ValueError(f'{what} produced NaN or inf hidden states at layer(s) {layers} (1-indexed) for real, unpadded positions; its input was finite, so the augment itself overflowed (an fp16 model? try bfloat16 or float32)')

    return hiddens
