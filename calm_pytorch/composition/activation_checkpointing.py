from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
from torch.nn import Module
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from calm_pytorch.composition.inputs import check_usable
from calm_pytorch.composition.protocol import Composition

# activation (gradient) checkpointing of the frozen anchor's blocks.
#
# The frozen anchor runs in eval mode, so the checkpointing of transformers layers (which asks
# `self.training`) never fires; and the composition only needs activations of the blocks its
# gradient flows through: those above the first connected anchor layer (and that layer when its
# delta goes to its input). Below, nothing requires grad, so autograd saves nothing there already.
#
# A checkpointed block's `forward` is replaced on the instance, not its `__call__`: the hooks of
# the block (our injection and recording hooks, HF's output_hidden_states, FSDP2's unshard) stay
# outside the checkpoint and run once. The cross-attention delta is added by a hook on the
# block's output (or input), so it is computed in the forward only, from the per-call context of
# that forward; the recompute during backward, after that context is gone, replays the frozen
# block alone, which needs no context.

# HF layers built with a cache write to it; a second write in the recompute would change the
# shapes, so (like transformers' own checkpointing) a checkpointed call runs without it
CACHE_KWARGS = ('cache', 'past_key_values', 'past_key_value', 'layer_past')  # 'cache': transformers >= 5.25

def is_cache(value: Any) -> bool:
    # a transformers Cache, passed by keyword or by position (GPT-2's blocks take it second)
    return any(cls.__name__ == 'Cache' and cls.__module__.startswith('transformers') for cls in type(value).__mro__)

def requiring_grad(args: tuple) -> tuple:
    # reentrant checkpointing gives the parameters of a block gradients only when one of its inputs
    # requires grad, which none does below the first connected layer (LoRA weights there). The
    # first floating input, which has no history to lose, is made to
    index = next((index for index, arg in enumerate(args) if isinstance(arg, torch.Tensor) and arg.is_floating_point()), None)

    if index is None:
        raise ValueError('reentrant checkpointing (use_reentrant = True) of a block with trainable parameters needs a floating input tensor passed by position; use the default use_reentrant = False')

    return (*args[:index], args[index].detach().requires_grad_(), *args[index + 1:])

def needs_gradients(module: Module, args: tuple, kwargs: dict) -> bool:
    tensors = [*args, *kwargs.values()]
    return any(getattr(tensor, 'requires_grad', False) for tensor in tensors) or any(param.requires_grad for param in module.parameters())

class CheckpointedForward:
    """Set as a block's `forward`: checkpoints the block's own forward whenever a gradient will
    flow through it (grad mode on, and an input or a parameter requiring grad); otherwise calls it
    plainly (no_grad, generation, blocks below the composition). An object rather than a closure,
    so that `copy.deepcopy` rebinds it to the copied block."""

    def __init__(self, module: Module, checkpoint_fn):
        self.module = module
        self.forward = module.forward  # as it was: the class's method, or what another library set on the instance
        self.replaced_own = 'forward' in module.__dict__
        self.checkpoint_fn = checkpoint_fn

    def __call__(self, *args, **kwargs) -> Any:
        if not torch.is_grad_enabled() or not needs_gradients(self.module, args, kwargs):
            return self.forward(*args, **kwargs)

        args = tuple(None if is_cache(arg) else arg for arg in args)
        kwargs = {key: None if key in CACHE_KWARGS or is_cache(value) else value for key, value in kwargs.items()}

        if self.checkpoint_fn.reentrant and not any(getattr(arg, 'requires_grad', False) for arg in args):
            args = requiring_grad(args)

        if 'use_cache' in kwargs:
            kwargs['use_cache'] = False

        # keywords bound here rather than passed through: reentrant checkpointing takes positional inputs only
        return self.checkpoint_fn(partial(self.forward, **kwargs), *args)

class CheckpointFunction:
    """torch.utils.checkpoint with the user's keywords (default `use_reentrant=False`), an object
    rather than a closure, so that a CALM with checkpointing is pickled and deep-copied whole."""

    def __init__(self, checkpoint_kwargs: dict | None, offload: bool):
        self.checkpoint_kwargs = dict(checkpoint_kwargs or {})
        self.checkpoint_kwargs.setdefault('use_reentrant', False)
        self.reentrant = bool(self.checkpoint_kwargs['use_reentrant'])
        self.offload = offload

    def __call__(self, function, *args):
        # offload keeps the tensors saved for the recompute in host memory (pinned when a GPU is there)
        saving = torch.autograd.graph.save_on_cpu(pin_memory = torch.cuda.is_available()) if self.offload else nullcontext()

        # no early stop of the recompute: torch stops it by raising an exception from inside the
        # block once the saved tensors are recomputed, and a library that wraps the exceptions of
        # its operations (einx, in x-transformers' masking) turns that into a failed backward.
        # (torch.compile traces the checkpoint as one operation of its own, without that exception)
        early_stop = nullcontext() if torch.compiler.is_compiling() else set_checkpoint_early_stop(False)

        with saving, early_stop:
            return checkpoint(function, *args, **self.checkpoint_kwargs)

checkpoint_function = CheckpointFunction  # its name in 0.1.0, a function with the same arguments

def first_block_with_gradients(calm: Composition) -> int:
    """0-based index of the first anchor layer a gradient flows through: the layer after the first
    connected one when deltas are added to outputs, the connected layer itself for inputs; earlier
    if the user made parameters of a lower block trainable (e.g. LoRA)."""

    first = min(
        anchor_layer - 1 if calm.anchor_positions[anchor_layer - 1] == 'input' else anchor_layer
        for connections in calm.connections
        for _, anchor_layer in connections
    )

    units = calm.anchor_adapter.checkpoint_units()

    trainable = [index for index, modules in enumerate(units) if any(param.requires_grad for module in modules for param in module.parameters())]
    return min([first, *trainable])

def enable_checkpointing(calm: Composition, checkpoint_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False):
    check_usable(calm)

    if not isinstance(every_n_layers, int) or every_n_layers < 1:
        raise ValueError(f'`every_n_layers` must be a positive int (1 checkpoints every block that needs it), got {every_n_layers!r}')

    disable_checkpointing(calm)

    checkpoint_fn = CheckpointFunction(checkpoint_kwargs, offload)
    units = calm.anchor_adapter.checkpoint_units()
    start = first_block_with_gradients(calm)
    wrapped = []

    for index, modules in enumerate(units[start:]):
        if index % every_n_layers != 0:
            continue

        for module in modules:
            own = module.__dict__.get('forward')

            if isinstance(own, CheckpointedForward):
                continue  # checkpointed by another composition over the same anchor: once is enough

            module.forward = CheckpointedForward(module, checkpoint_fn)
            wrapped.append(module)

    calm.checkpointed_modules = wrapped

def disable_checkpointing(calm: Composition):
    for module in calm.checkpointed_modules:
        wrapper = module.__dict__.get('forward')

        if not isinstance(wrapper, CheckpointedForward):
            continue

        # restore what was there: a forward set on the instance by another library, or the class's
        if wrapper.replaced_own:
            module.forward = wrapper.forward
        else:
            del module.forward

    calm.checkpointed_modules = []

class GradientCheckpointing:
    """Mixin giving CALM the activation checkpointing API of transformers 5.23 (which the HF
    Trainer calls with `activation_checkpointing=True`, or `gradient_checkpointing=True`, its
    deprecated alias) and its older `gradient_checkpointing_*` names."""

    supports_gradient_checkpointing = True
    checkpointed_modules: list[Module] | tuple = ()  # the modules whose forward is wrapped now

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False):
        """Checkpoints the frozen anchor's blocks that the composition's gradient flows through
        (at or after the first connected anchor layer): their activations are recomputed in the
        backward instead of kept. The gradients are those without checkpointing.

        activation_checkpointing_kwargs: passed to `torch.utils.checkpoint.checkpoint`
                                         (default `use_reentrant=False`)
        every_n_layers:                  checkpoint only every n-th of those blocks
        offload:                         keep the tensors saved for the recompute in host memory"""

        enable_checkpointing(self, activation_checkpointing_kwargs, every_n_layers, offload)

    def activation_checkpointing_disable(self):
        disable_checkpointing(self)

    @property
    def is_activation_checkpointing(self) -> bool:
        return len(self.checkpointed_modules) > 0

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False):
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, every_n_layers, offload)

    def gradient_checkpointing_disable(self):
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing
