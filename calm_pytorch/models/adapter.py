from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module

from calm_pytorch.helpers import exists
from calm_pytorch.models.block_names import is_named, resolve_blocks
from calm_pytorch.models.precision import shapes_only
from calm_pytorch.models.sites import HiddenPosition, Site, register_read_hook

# an adapter knows one model's calling conventions and where its layers are:
# how to call it with inputs and a padding mask, where its logits are, and the sites
# (input and output) of each of its layers, in execution order

@dataclass
class Layer:
    input: Site
    output: Site

    def site(self, position: HiddenPosition) -> Site:
        return self.input if position == 'input' else self.output

@dataclass
class ProbeResult:
    firing: list[tuple[int, str]] = field(default_factory = list)   # site keys in the order they fired
    dims: dict[tuple[int, str], int] = field(default_factory = dict)  # site key -> hidden width
    shapes: dict[tuple[int, str], tuple[int, ...]] = field(default_factory = dict)  # site key -> hidden shape

class ModelAdapter:
    # the length the model was configured for (`max_position_embeddings`); a class default, so
    # that adapters pickled by 0.1.0, which had none, read it too
    configured_len: int | None = None

    def __init__(
        self,
        model: Module,
        *,
        name: str,
        blocks: Sequence[Module] | None = None,
        extract_blocks_fn: Callable[[Module], Sequence[Module]] | None = None,
        mask_kwarg: str | None = None,
        input_shape: tuple[int, ...] | None = None,
        returns_hiddens: bool = False,
        logits_fn: Callable[[Any], Tensor] | None = None
    ):
        self.model = model
        self.name = name
        self.logits_fn = logits_fn
        self.input_shape = input_shape
        self.returns_hiddens = returns_hiddens
        self.mask_kwarg = mask_kwarg if exists(mask_kwarg) else find_mask_kwarg(model)
        self.max_seq_len = None     # a hard limit: positions past it fail (learned absolute positions)
        self.vocab_size = None  # known for x-transformers and transformers models: then token ids are checked

        if returns_hiddens:
            self.layers = None
            return

        check_not_a_compile_wrapper(model, name)

        if exists(extract_blocks_fn):
            blocks = extract_blocks_fn(model)

        if exists(blocks) and is_named(blocks):
            blocks = resolve_blocks(model, blocks, name = name)

        if exists(blocks):
            self.layers = self.layers_from_blocks(blocks)
        else:
            self.layers = self.find_layers()

        check_hooked_modules_not_compiled(model, name, [site.module for layer in self.layers for site in (layer.input, layer.output)])
        self.layers = self.in_execution_order(self.layers)

    # finding layers

    def layers_from_blocks(self, blocks: Sequence[Module]) -> list[Layer]:
        blocks = list(blocks)
        hint = 'the blocks, e.g. `transformer_blocks=model.layers` or `extract_blocks_fn=lambda model: model.layers`'

        if len(blocks) == 0 or not all(isinstance(block, Module) for block in blocks):
            raise TypeError(f'the transformer blocks of {self.name} must be a non-empty sequence of nn.Module, got {blocks!r}; pass {hint}')

        if len({id(block) for block in blocks}) != len(blocks):
            raise ValueError(f'the transformer blocks of {self.name} list one module twice')

        own_modules = {id(module) for module in self.model.modules()}
        if not all(id(block) in own_modules for block in blocks):
            raise ValueError(f'the transformer blocks given for {self.name} are not submodules of it')

        return [Layer(Site(block, 'input'), Site(block, 'output')) for block in blocks]

    def find_layers(self) -> list[Layer]:
        raise ValueError(
            f'could not find the transformer blocks of {self.name} ({type(self.model).__name__}). '
            f'Pass them explicitly: `transformer_blocks=[...]` in AugmentParams for an augment or `anchor_transformer_blocks=[...]` for the anchor, '
            f'or a function returning them: `extract_blocks_fn=lambda model: model.layers` (`anchor_extract_blocks_fn=` for the anchor)'
        )

    def in_execution_order(self, layers: list[Layer]) -> list[Layer]:
        # blocks may be given in any order: one dummy forward tells the order they run in
        probe = self.probe([layer.output for layer in layers])
        first_firing = {key: index for index, key in reversed(list(enumerate(probe.firing)))}

        never_ran = [index for index, layer in enumerate(layers) if layer.output.key not in first_firing]
        if len(never_ran) > 0:
            names = ', '.join(type(layers[index].output.module).__name__ for index in never_ran)
            raise ValueError(f'{len(never_ran)} of the {len(layers)} blocks given for {self.name} never ran in a forward pass ({names}); pass only blocks the model calls')

        return sorted(layers, key = lambda layer: first_firing[layer.output.key])

    def checkpoint_units(self) -> list[list[Module]]:
        """Per layer, the modules whose `forward` activation checkpointing wraps: the block itself
        (its hooks, on `__call__`, stay outside the checkpoint)."""
        return [[layer.output.module] for layer in self.layers]

    # calling the model

    def dummy_input(self, seq_len: int = 2) -> Tensor:
        param = next(self.model.parameters(), None)
        device = param.device if exists(param) else torch.device('cpu')

        if exists(self.input_shape):
            float_params = [p for p in self.model.parameters() if p.is_floating_point()]
            dtype = float_params[0].dtype if len(float_params) > 0 else torch.float32
            return torch.zeros((1, *self.input_shape), device = device, dtype = dtype)

        return torch.zeros((1, seq_len), device = device, dtype = torch.long)

    def __call__(self, inputs: Tensor, mask: Tensor | None = None, **kwargs) -> Any:
        if exists(mask) and exists(self.mask_kwarg):
            kwargs[self.mask_kwarg] = mask

        return self.model(inputs, **kwargs)

    def logits(self, output: Any) -> Tensor:
        if exists(self.logits_fn):
            logits = self.logits_fn(output)

            if not isinstance(logits, Tensor):
                raise TypeError(f'the logits_fn of {self.name} must return the logits tensor, got {type(logits).__name__} from an output of type {type(output).__name__}')

            return logits

        if isinstance(output, Tensor):
            return output

        if isinstance(getattr(output, 'logits', None), Tensor):
            return output.logits

        if isinstance(output, (tuple, list)) and len(output) > 0 and isinstance(output[0], Tensor):
            return output[0]

        raise TypeError(f'could not find logits in the output of {self.name} ({type(output).__name__}); expected a tensor, an object with `.logits`, or a tuple starting with the logits. Pass a function picking them, e.g. `anchor_logits_fn=lambda output: output[1]`')

    def check_token_ids(self, tokens: Tensor, arg_name: str, mask: Tensor | None = None):
        """An id outside the embedding table is a bare IndexError on CPU and a device-side assert
        on CUDA: name it. One min / max reduction and one device sync per input; skipped under
        torch.compile, where reading the values would break the graph. `mask`: only its True
        positions are checked (positions that are never read, as the padding of a generate prompt)."""

        if not exists(self.vocab_size) or tokens.numel() == 0 or torch.compiler.is_compiling():
            return

        if exists(mask):
            tokens = tokens.masked_fill(~mask, 0)

        low, high = torch.stack(tokens.aminmax()).tolist()

        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f'`{arg_name}` holds the token id {bad}, outside the vocabulary of {self.name} ({type(self.model).__name__}), '
                f'whose {self.vocab_size} tokens have ids 0 to {self.vocab_size - 1}; were the ids made by another tokenizer, or padded with a negative id?'
            )

    def check_length(self, inputs: Tensor | int, arg_name: str, *, generating: bool = False):
        """inputs: a tensor or its length. A generation must also fit the configured length:
        its buffers are allocated for the whole length before the first step."""

        length = inputs if isinstance(inputs, int) else inputs.shape[-1]

        if exists(self.max_seq_len) and length > self.max_seq_len:
            raise ValueError(f'`{arg_name}` has length {length}, but {self.name} takes at most {self.max_seq_len} positions (its max_seq_len)')

        if generating and exists(self.configured_len) and length > self.configured_len:
            raise ValueError(
                f'`{arg_name}` has length {length}, but {self.name} was configured for at most {self.configured_len} positions; '
                'ask for fewer new tokens, or raise the length in its config if the model takes longer inputs (e.g. with RoPE scaling)'
            )

    # probing with dummy inputs

    def dry_run(self, inputs: Tensor | None = None) -> Any:
        """One forward on dummy inputs that leaves the frozen model as it was: without gradients
        and in eval mode (see `evaluating`)."""

        with torch.no_grad(), evaluating(self.model):
            return self(inputs if exists(inputs) else self.dummy_input())

    def probe(self, sites: Sequence[Site], inputs: Tensor | None = None) -> ProbeResult:
        """Runs the model once with read hooks on `sites`: which fired in what order, at what width."""

        result = ProbeResult()

        def record(key, hidden):
            result.firing.append(key)
            result.dims[key], result.shapes[key] = hidden.shape[-1], tuple(hidden.shape)

        unique = {site.key: site for site in sites}
        handles = [register_read_hook(site, lambda hidden, key = key: record(key, hidden)) for key, site in unique.items()]

        try:
            with shapes_only(self.model):
                self.dry_run(inputs)
        finally:
            for handle in handles:
                handle.remove()

        return result

    def hiddens_at(self, sites: Sequence[Site], inputs: Tensor) -> dict[tuple[int, str], list[Tensor]]:
        hiddens = defaultdict(list)
        unique = {site.key: site for site in sites}
        handles = [register_read_hook(site, lambda hidden, key = key: hiddens[key].append(hidden)) for key, site in unique.items()]

        try:
            with torch.no_grad():
                output = self(inputs)
        finally:
            for handle in handles:
                handle.remove()

        if self.returns_hiddens:
            return {(index, 'output'): [hidden] for index, hidden in enumerate(output)}

        return hiddens

    # incremental decoding: `decode` is the one interface generation uses for anchors and aligned
    # augments. It is given the whole (left-padded) sequence so far and feeds the model only the
    # positions its cache has not seen; a model without a cache recomputes everything

    @property
    def can_cache(self) -> bool:
        return False

    @property
    def why_no_cache(self) -> str | None:
        """None for a model that decodes incrementally, else the reason it recomputes."""
        return None if self.can_cache else 'calm_pytorch knows no cache interface of a custom module, so it calls it on the whole sequence'

    @property
    def decodes_with_gaps(self) -> bool:
        """Whether `decode` gives every real token the result it would have alone when the mask
        has masked positions anywhere, between real tokens too (several rows of text, each
        re-tokenized at its own places, then share one cache: generation/text_stream.py)."""
        return False

    def decode(self, tokens: Tensor, mask: Tensor | None, state: DecodeState | None) -> Any:
        """tokens: (b, n) the sequence so far, left-padded; mask: (b, n) True for real tokens.
        state:  None recomputes the whole sequence; a DecodeState is updated in place (even when
                a recorder stops the forward early) and only its unseen positions are computed.
        Returns the model output for the computed positions: all n, or n - state.length."""

        return self(tokens, mask if exists(mask) and not bool(mask.all()) else None)

    def crop(self, state: DecodeState, length: int):
        """Rolls a decode state back to its first `length` positions (a model without a cache
        recomputes everything anyway)."""

        state.length = min(state.length, length)

    def perturbed_inputs(self) -> tuple[Tensor, Tensor]:
        # three positions, and the same three with the last one changed
        tokens = self.dummy_input(seq_len = 3)
        perturbed = tokens.clone()
        perturbed[:, -1] = 1
        return tokens, perturbed

    def is_causal(self, sites: Sequence[Site]) -> bool | None:
        """A perturbation probe: does changing the last token change hidden states before it?
        None when the model overflows on the probe (NaN or inf): that cannot be told."""

        tokens, perturbed = self.perturbed_inputs()

        with evaluating(self.model):
            before, after = self.hiddens_at(sites, tokens), self.hiddens_at(sites, perturbed)

        if not all(bool(hidden.isfinite().all()) for hiddens in (*before.values(), *after.values()) for hidden in hiddens):
            return None

        for key, hiddens in before.items():
            for hidden, other in zip(hiddens, after[key]):
                if not torch.allclose(hidden[:, :-1], other[:, :-1], atol = 1e-5, rtol = 1e-4):
                    return False

        return True

    def logits_are_causal(self, strict: bool = True) -> bool | None:
        """The same probe on the logits: does the output at a position depend on later tokens (a
        bidirectional encoder such as BERT's)? None when the model overflows on the probe (NaN or
        inf logits); not strict, also where the logits cannot be found (an output that needs a
        `logits_fn`), instead of that error."""

        tokens, perturbed = self.perturbed_inputs()

        try:
            with evaluating(self.model), torch.no_grad():
                before, after = (self.logits(self(inputs)) for inputs in (tokens, perturbed))
        except TypeError:
            if strict:
                raise
            return None

        if not bool(before.isfinite().all() and after.isfinite().all()):
            return None

        return torch.allclose(before[:, :-1].float(), after[:, :-1].float(), atol = 1e-5, rtol = 1e-4)

@contextmanager
def evaluating(model: Module):
    # every probe runs in eval mode: dropout would make two runs of the causality probes differ at
    # every position, and a batch norm in training mode would fold the dummy inputs into the frozen
    # model's running statistics. Each submodule gets its own mode back (a model may mix them)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()

    try:
        yield
    finally:
        for module, training in modes:
            module.training = training

@dataclass
class DecodeState:
    """One model's cache during one `generate` call. Anchor and augments each have their own."""
    cache: Any = None  # x-transformers LayerIntermediates or an HF Cache; None before the first step
    length: int = 0    # positions already in the cache
    rollback: bool = False  # the cache may be cropped (`ModelAdapter.crop`)
    capacity: int | None = None  # the positions the cache is expected to hold, where known: room is reserved for them

def left_pad_offsets(mask: Tensor | None) -> Tensor | None:
    # (b, n) left-padded mask -> (b,) index of each row's first real token; None without padding
    if not exists(mask) or bool(mask.all()):
        return None

    return (~mask).sum(dim = -1)

# torch.compile does not guard on a module's hooks: code it compiled before the CALM hooked the
# model runs on without them (the constructor's probes then see nothing, or a composed call reads
# the plain model). Compiling after the CALM is built works (docs/generation.md)
COMPILE_AFTER = 'Build the CALM over the uncompiled model, then compile, e.g. `anchor.forward = torch.compile(anchor.forward)` after `CALM(...)`'

def check_not_a_compile_wrapper(model: Module, name: str):
    if hasattr(model, '_orig_mod'):
        raise TypeError(f'{name} is a torch.compile wrapper ({type(model).__name__}): pass the module itself (`compiled._orig_mod`). {COMPILE_AFTER}')

def check_hooked_modules_not_compiled(model: Module, name: str, hooked: list[Module]):
    # the modules whose calls carry the composition's hooks (the sites), and those above them;
    # a module compiled inside a block (its MLP) runs between the hooks and is left alone
    paths = {id(module): path for path, module in model.named_modules()}
    watched = set()

    for module in hooked:
        parts = paths[id(module)].split('.') if paths.get(id(module)) else []
        watched.update('.'.join(parts[:index]) for index in range(len(parts) + 1))

    for path, module in model.named_modules():
        if path not in watched:
            continue

        compiled_forward = hasattr(vars(module).get('forward'), '_torchdynamo_orig_callable')

        if compiled_forward or getattr(module, '_compiled_call_impl', None) is not None:
            where = f'`{path}`' if path else 'the model'
            how = '`.forward = torch.compile(...)`' if compiled_forward else '`.compile()`'
            raise TypeError(
                f'{name} is already compiled ({where}, by {how}): torch.compile does not see hooks added after it compiled, '
                f'so the composition would be skipped. {COMPILE_AFTER}'
            )

def find_mask_kwarg(model: Module) -> str | None:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None

    return next((name for name in ('mask', 'attention_mask') if name in params), None)
