from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from itertools import chain

import torch
from torch import Tensor
from torch.nn import Module

from calm_pytorch.helpers import exists

# dtypes and devices. Each frozen model keeps its own precision (fp32, bf16, fp16) and device;
# inputs are moved (and float inputs cast) to the model that reads them, the cross-attention casts
# what it reads into its own dtype, and its delta goes back in the dtype of the anchor's hidden state

def floating_dtype(module: Module) -> torch.dtype | None:
    """The dtype of the module's first floating point parameter or buffer."""
    tensors = chain(module.parameters(), module.buffers())
    return next((tensor.dtype for tensor in tensors if tensor.is_floating_point()), None)

def model_device(module: Module) -> torch.device | None:
    tensor = next(chain(module.parameters(), module.buffers()), None)
    return tensor.device if exists(tensor) else None

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

# models built on the `meta` device (no memory, no values), the big-model workflow: build on meta,
# `calm.to_empty(device = ...)`, load the frozen models' weights, then load a composition checkpoint
# or re-initialise the composition (`calm.init_composition_weights()`). The constructor's probes
# only need shapes and run on meta tensors; the causality probe compares values, so on meta it
# waits for the first aligned call (when the weights are real)

def on_meta(module: Module) -> bool:
    return any(tensor.is_meta for tensor in chain(module.parameters(), module.buffers()))

def shapes_only(module: Module) -> AbstractContextManager:
    """Where a shape probe of `module` runs: for a model on `meta`, under a fake tensor mode, so
    that a library that checks values (transformers' padding and packed-sequence checks, which call
    `.item()`) sees a traced input and skips them, as it does under torch.compile."""

    if not on_meta(module):
        return nullcontext()

    from torch._subclasses.fake_tensor import FakeTensorMode
    return FakeTensorMode(allow_non_fake_inputs = True)
