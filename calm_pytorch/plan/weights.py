from __future__ import annotations

import functools
import math
from typing import Literal

import torch
from torch import Tensor
from torch.nn import Linear, Module

# bytes of weights one process holds, counted on meta models: in their dtype, with the Linear
# weights quantized, or sharded over processes as FSDP2 shards them

Quantization = Literal['int8', '4bit']

@functools.cache
def int8_per_channel() -> int:
    """Bytes per output channel besides the int8 weight, as the installed torchao's
    Int8WeightOnlyConfig lays them out: measured on a small Linear, since its layout changed
    across releases (0.18: a float32 scale and an int8 zero point; 0.17: the zero point in int64).
    Without torchao, the 0.18 layout."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return 4 + 1

    rows, columns = 32, 64
    module = torch.nn.Sequential(Linear(columns, rows, bias = False))
    quantize_(module, Int8WeightOnlyConfig())
    return (subclass_bytes(module[0].weight) - rows * columns) // rows

def subclass_bytes(tensor: Tensor) -> int:
    # the plain tensors a tensor subclass is made of (`__tensor_flatten__`), nested or not
    if not hasattr(tensor, '__tensor_flatten__'):
        return tensor.numel() * tensor.element_size()

    names, _ = tensor.__tensor_flatten__()
    return sum(subclass_bytes(getattr(tensor, name)) for name in names)

# bitsandbytes NF4 with double quantization (the QLoRA setting of docs/scaling.md): 4 bits per
# weight, an 8-bit absmax per block of 64 and a float32 absmax per 256 of those blocks
NF4_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)

def tensor_bytes(tensor: Tensor, processes: int = 1) -> int:
    """Bytes of `tensor`, or of one process's shard of it: FSDP2 splits dim 0 into `processes`
    equal parts, the last padded."""
    if processes == 1 or tensor.dim() == 0:
        return tensor.numel() * tensor.element_size()

    rows = math.ceil(tensor.shape[0] / processes)
    return rows * math.prod(tensor.shape[1:]) * tensor.element_size()

def quantized_linears(model: Module, quantization: Quantization | None) -> list[Linear]:
    """The Linear layers whose weights the quantization replaces: every one for torchao's int8
    (the head too: tied to the embedding, it becomes an int8 copy beside it); for bitsandbytes'
    4-bit every one but the output head, which transformers keeps in its dtype."""
    if quantization is None:
        return []

    linears = [module for module in model.modules() if isinstance(module, Linear)]

    if quantization == '4bit':
        head = model.get_output_embeddings() if hasattr(model, 'get_output_embeddings') else None
        linears = [module for module in linears if module is not head]

    return linears

def quantized_bytes(linear: Linear, quantization: Quantization) -> int:
    if quantization == 'int8':
        return linear.weight.numel() + linear.out_features * int8_per_channel()

    return math.ceil(linear.weight.numel() * NF4_PER_WEIGHT)

def frozen_bytes(model: Module, quantization: Quantization | None = None, processes: int = 1) -> int:
    """What one process holds of a frozen model: its parameters and buffers (a tied weight once),
    the quantized Linear weights as their quantized data, and with `processes > 1` each
    parameter's shard (buffers stay whole, as under FSDP2)."""
    if quantization is not None and processes > 1:
        raise ValueError(f'a plan for quantized ({quantization}) frozen models sharded over {processes} processes: this library has never sharded quantized models (docs/scaling.md); plan one or the other')

    linears = quantized_linears(model, quantization)
    replaced = {id(linear.weight) for linear in linears}

    # a weight held by another module besides a quantized Linear (a tied embedding) stays as it was
    kept = {
        id(param): param
        for module in model.modules()
        for name, param in module.named_parameters(recurse = False)
        if id(param) not in replaced or not (isinstance(module, Linear) and name == 'weight')
    }

    total = sum(tensor_bytes(param, processes) for param in kept.values())
    total += sum(quantized_bytes(linear, quantization) for linear in linears)
    total += sum(buffer.numel() * buffer.element_size() for buffer in {id(buffer): buffer for buffer in model.buffers()}.values())
    return total

def linear_numel(modules: list[Module]) -> int:
    return sum(module.weight.numel() for block in modules for module in block.modules() if isinstance(module, Linear))

def trainable(module: Module) -> tuple[int, int]:
    """(parameters, bytes) of what `module` trains."""
    params = [param for param in module.parameters() if param.requires_grad]
    return sum(param.numel() for param in params), sum(param.numel() * param.element_size() for param in params)

def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype = dtype).element_size()
