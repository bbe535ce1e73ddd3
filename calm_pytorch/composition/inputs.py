from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from itertools import chain
from functools import wraps
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module

from calm_pytorch.composition.loss import IGNORE
from calm_pytorch.helpers import exists

# checks of what a user hands a composition, each error naming the argument, what was given and
# what was expected

def check_usable(calm):
    if calm.hooks_removed:
        raise RuntimeError('this CALM had its hooks removed with `remove_hooks()`; build a new CALM to compose the models again')

def check_materialised(calm, use: str):
    # the big-model workflow builds on `meta` (shapes only) and materialises later: deep inside,
    # a model there fails on its first value (a probe's `.item()`, a copy to the prompt's device)
    parts = [('the anchor', calm.anchor), *((f'augment {index}', model) for index, model in enumerate(calm.augments)), ('the composition', calm.cross_attns)]
    on_meta = [name for name, module in parts if getattr(next(chain(module.parameters(), module.buffers()), None), 'is_meta', False)]

    if len(on_meta) > 0:
        raise RuntimeError(
            f'{use} needs weights, but {", ".join(on_meta)} {"is" if len(on_meta) == 1 else "are"} on the meta device (shapes only): '
            'materialise first (`calm.to_empty(device = ...)`, then load each model\'s weights and the composition\'s, '
            'or `calm.init_composition_weights()`; docs/gradient_checkpointing.md shows the steps)'
        )

def check_causal_anchor(calm, use: str):
    """Next-token training and generation need an anchor whose output at a position depends only on
    the tokens up to it. Probed at construction (at first use for an anchor built on `meta`)."""

    # a CALM pickled by 0.1.0 has no record: probed here
    if getattr(calm, 'anchor_is_causal', None) is None:
        calm.anchor_is_causal = calm.anchor_adapter.logits_are_causal()

    if calm.anchor_is_causal is None:
        raise ValueError(
            f'the anchor ({type(calm.anchor).__name__}) gives NaN or inf logits on a 3-token probe, so whether it is causal cannot be told: '
            'it overflows (a float16 model? load it in bfloat16 or float32)'
        )

    if not calm.anchor_is_causal:
        raise ValueError(
            f'the anchor ({type(calm.anchor).__name__}) is not causal: its output at a position depends on later tokens '
            f'(a bidirectional encoder, such as BERT or an x-transformers Encoder), so {use} would see the token it predicts. '
            'Use a causal decoder as the anchor; a bidirectional model can be an augment that reads its own input (`prompt=`)'
        )

def check_tokens(tokens: Tensor, name: str, min_len: int = 1) -> Tensor:
    """Token ids of any integer dtype (int32 from a tokenizer, uint8 / int16 from a compact dataset)
    come back as torch.long, which embeddings and the loss take."""

    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f'`{name}` must hold integer token ids (e.g. torch.long), got dtype {tokens.dtype}')

    if tokens.ndim != 2:
        raise ValueError(f'`{name}` must have shape (batch, seq_len), got {tuple(tokens.shape)}')

    if tokens.shape[1] < min_len:
        why = ' (a loss needs 2: inputs and next-token labels)' if min_len == 2 else ''
        raise ValueError(f'`{name}` must have at least {min_len} token(s){why}, got shape {tuple(tokens.shape)}')

    return tokens.long()

def check_mask(mask: Tensor, like: Tensor, name: str, like_name: str) -> Tensor:
    if mask.shape != like.shape:
        raise ValueError(f'`{name}` must have the shape of `{like_name}` {tuple(like.shape)}, got {tuple(mask.shape)}')

    if mask.dtype.is_floating_point:
        raise TypeError(f'`{name}` must be a bool tensor (True for real tokens), got dtype {mask.dtype}')

    return mask.bool()

def check_labels(labels: Tensor, like: Tensor, like_name: str, vocab_size: int | None = None) -> Tensor:
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f'`labels` must hold integer token ids (-100 where ignored), got dtype {labels.dtype}')

    if labels.shape != like.shape:
        raise ValueError(
            f'`labels` must have the shape of `{like_name}` {tuple(like.shape)}, got {tuple(labels.shape)}: '
            'they are aligned with the tokens, not shifted (the shift to next-token targets happens inside)'
        )

    labels = labels.long()

    # the loss's own error would name no argument (and on a GPU is a device-side assert)
    if exists(vocab_size) and not torch.compiler.is_compiling():
        outside = (labels != IGNORE) & ((labels < 0) | (labels >= vocab_size))
        if bool(outside.any()):
            raise ValueError(f'`labels` hold ids outside the anchor\'s vocabulary of {vocab_size}: {sorted(set(labels[outside].tolist()))[:8]}; -100 marks positions without a loss')

    return labels

def per_augment(value, num_augments: int, name: str) -> list:
    if not isinstance(value, (list, tuple)):
        return [value] * num_augments

    if len(value) != num_augments:
        raise ValueError(f'`{name}` holds {len(value)} entries but there are {num_augments} augments; pass one per augment, or a single tensor for all')

    return list(value)

# a newcomer's mistakes at construction, answered in one line before the type check's long report

MODEL_ARGUMENTS = ('anchor_llm', 'augment_llms', 'augment_llm')

def explain_arguments(init: Callable) -> Callable:
    """Wraps CALM's constructor (outside its type check): a hub id or a tokenizer where a model
    belongs, or a dtype written as a string, gets a message that says the fix."""

    signature = inspect.signature(init)

    @wraps(init)
    def inner(*args, **kwargs):
        arguments = signature.bind_partial(*args, **kwargs).arguments

        for name in MODEL_ARGUMENTS:
            value = arguments.get(name)
            values = list(value) if isinstance(value, (list, tuple)) else [value]

            for index, one in enumerate(values):
                check_model(one, name if values == [value] else f'{name}[{index}]')

        check_composition_dtype(arguments.get('composition_dtype', torch.float32))
        return init(*args, **kwargs)

    return inner

def check_model(value: Any, name: str):
    if isinstance(value, (str, os.PathLike)):
        raise TypeError(
            f'`{name}` is {str(value)!r}, a name or path: CALM composes models already loaded. '
            f'Load it first, e.g. transformers.AutoModelForCausalLM.from_pretrained({str(value)!r}), and pass the model'
        )

    if not isinstance(value, Module) and any(callable(getattr(value, method, None)) for method in ('encode', 'decode', 'encode_batch', 'batch_decode')):
        raise TypeError(
            f'`{name}` is a tokenizer ({type(value).__name__}), where a model is expected. Pass the model '
            '(e.g. transformers.AutoModelForCausalLM.from_pretrained(...)); a tokenizer goes to '
            '`CALM(..., anchor_tokenizer=...)` or `AugmentParams(model=..., tokenizer=...)`'
        )

DTYPE_NAMES = {'bf16': 'bfloat16', 'bfloat16': 'bfloat16', 'fp16': 'float16', 'float16': 'float16', 'half': 'float16', 'fp32': 'float32', 'float32': 'float32', 'float': 'float32'}

def check_composition_dtype(value: Any):
    if isinstance(value, str) and value != 'anchor':
        fix = f'torch.{DTYPE_NAMES[value.lower()]}' if value.lower() in DTYPE_NAMES else 'a floating point torch.dtype, e.g. torch.bfloat16'
        raise TypeError(f"`composition_dtype` is the string {value!r}; it takes a torch.dtype or 'anchor': write composition_dtype = {fix}")
