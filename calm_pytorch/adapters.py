from __future__ import annotations

import inspect
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module

from calm_pytorch.helpers import exists
from calm_pytorch.names import is_named, resolve_blocks
from calm_pytorch.params import HiddenPosition
from calm_pytorch.sites import Site, register_read_hook
from calm_pytorch.trainable import peft_base_model

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

class ModelAdapter:
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
        self.max_seq_len = None
        self.vocab_size = None  # known for x-transformers and transformers models: then token ids are checked

        if returns_hiddens:
            self.layers = None
            return

        if exists(extract_blocks_fn):
            blocks = extract_blocks_fn(model)

        if exists(blocks) and is_named(blocks):
            blocks = resolve_blocks(model, blocks, name = name)

        if exists(blocks):
            self.layers = self.layers_from_blocks(blocks)
        else:
            self.layers = self.find_layers()

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

    def check_length(self, inputs: Tensor, arg_name: str):
        if exists(self.max_seq_len) and inputs.shape[-1] > self.max_seq_len:
            raise ValueError(f'`{arg_name}` has length {inputs.shape[-1]}, but {self.name} takes at most {self.max_seq_len} positions (its max_seq_len)')

    # probing with dummy inputs

    def probe(self, sites: Sequence[Site], inputs: Tensor | None = None) -> ProbeResult:
        """Runs the model once with read hooks on `sites`: which fired in what order, at what width."""

        result = ProbeResult()

        def record(key, hidden):
            result.firing.append(key)
            result.dims[key] = hidden.shape[-1]

        unique = {site.key: site for site in sites}
        handles = [register_read_hook(site, lambda hidden, key = key: record(key, hidden)) for key, site in unique.items()]

        try:
            with torch.no_grad():
                self(inputs if exists(inputs) else self.dummy_input())
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

    def is_causal(self, sites: Sequence[Site]) -> bool:
        """A perturbation probe: does changing the last token change hidden states before it?"""

        tokens = self.dummy_input(seq_len = 3)
        perturbed = tokens.clone()
        perturbed[:, -1] = 1

        # in eval mode: dropout would make two runs differ at every position
        training = self.model.training
        self.model.eval()

        try:
            before, after = self.hiddens_at(sites, tokens), self.hiddens_at(sites, perturbed)
        finally:
            self.model.train(training)

        for key, hiddens in before.items():
            for hidden, other in zip(hiddens, after[key]):
                if not torch.allclose(hidden[:, :-1], other[:, :-1], atol = 1e-5, rtol = 1e-4):
                    return False

        return True

@dataclass
class DecodeState:
    """One model's cache during one `generate` call. Anchor and augments each have their own."""
    cache: Any = None  # x-transformers LayerIntermediates or an HF Cache; None before the first step
    length: int = 0    # positions already in the cache
    rollback: bool = False  # the cache may be cropped (`ModelAdapter.crop`)

def left_pad_offsets(mask: Tensor | None) -> Tensor | None:
    # (b, n) left-padded mask -> (b,) index of each row's first real token; None without padding
    if not exists(mask) or bool(mask.all()):
        return None

    return (~mask).sum(dim = -1)

def find_mask_kwarg(model: Module) -> str | None:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None

    return next((name for name in ('mask', 'attention_mask') if name in params), None)

class XTransformersAdapter(ModelAdapter):
    """x-transformers TransformerWrapper (Decoder or Encoder). Its layer list alternates attention
    and feedforward sublayers, each a (norms, branch, residual) triple: a block ends with the
    residual of its feedforward, and the input of block 1 is the input of `attn_layers`."""

    @staticmethod
    def matches(model: Module) -> bool:
        from x_transformers.x_transformers import AttentionLayers
        return isinstance(getattr(model, 'attn_layers', None), AttentionLayers)

    def __init__(self, model: Module, **kwargs):
        super().__init__(model, **kwargs)

        from x_transformers.x_transformers import AbsolutePositionalEmbedding

        if isinstance(getattr(model, 'pos_emb', None), AbsolutePositionalEmbedding):
            self.max_seq_len = model.max_seq_len

        # a ContinuousTransformerWrapper reads vectors and has no vocabulary
        num_tokens = getattr(model, 'num_tokens', None)
        self.vocab_size = num_tokens if isinstance(num_tokens, int) and not exists(self.input_shape) else None

    @property
    def can_cache(self) -> bool:
        return bool(getattr(self.model, 'can_cache_kv', False))

    def decode(self, tokens: Tensor, mask: Tensor | None, state: DecodeState | None) -> Any:
        # left padding goes in as `seq_start_pos`, as in x-transformers' own generate: positions
        # are shifted so each row starts at 0, and the padded keys are masked
        seq_start_pos = left_pad_offsets(mask)

        if not exists(state) or not self.can_cache:
            return self.model(tokens, seq_start_pos = seq_start_pos)

        from x_transformers.x_transformers import LayerIntermediates

        # the cache is collected from the attention modules as they run instead of taken from the
        # return value, which a recorder that stops the forward early never lets us see. Layers
        # above the stop never run, now or at any later step, so their missing cache is never read
        attn_layers = self.model.attn_layers
        attentions = [attn_layers.layers[i][1] for i, layer_type in enumerate(attn_layers.layer_types) if layer_type == 'a']
        captured = []
        thread = threading.get_ident()

        def capture(module, args, output):
            # the attention modules are shared: another thread decoding meanwhile keeps its own cache
            if threading.get_ident() != thread:
                return

            output[1].layer_type = 'a'
            captured.append(output[1])

        start = state.length
        handles = [attention.register_forward_hook(capture) for attention in dict.fromkeys(attentions)]

        try:
            return self.model(
                tokens[:, start:],
                cache = state.cache,
                seq_start_pos = seq_start_pos,
                input_not_include_cache = True  # only new positions go in, so hooks see only them
            )
        finally:
            for handle in handles:
                handle.remove()

            state.cache = LayerIntermediates(attn_intermediates = captured, cache_length = tokens.shape[-1])
            state.length = tokens.shape[-1]

    def crop(self, state: DecodeState, length: int):
        if not exists(state.cache) or length == 0:
            state.cache, state.length = None, 0
            return

        # each attention layer caches keys and values (b, h, n, d)
        for intermediate in state.cache.attn_intermediates:
            intermediate.cached_kv = tuple(t[..., :length, :] for t in intermediate.cached_kv)

        state.cache.cache_length = state.length = min(state.length, length)

    def find_layers(self) -> list[Layer]:
        attn_layers = self.model.attn_layers
        order = attn_layers.layers_execute_order
        layer_types = [attn_layers.layer_types[i] for i in order]
        residuals = [attn_layers.layers[i][2] for i in order]

        # a block ends after each feedforward; a stack without feedforwards has one block per sublayer

        ends = [i for i, layer_type in enumerate(layer_types) if layer_type == 'f'] or list(range(len(layer_types)))

        outputs = [Site(residuals[end], 'output') for end in ends]
        inputs = [Site(attn_layers, 'input'), *outputs[:-1]]

        # a layer's computation is the branches (attention, feedforward) of its sublayers; the
        # residual modules carrying our hooks stay outside them
        branches = [attn_layers.layers[i][1] for i in order]
        starts = [0, *(end + 1 for end in ends[:-1])]
        self.branches = {output.key: branches[start:end + 1] for output, start, end in zip(outputs, starts, ends)}

        return [Layer(input, output) for input, output in zip(inputs, outputs)]

    def checkpoint_units(self) -> list[list[Module]]:
        branches = getattr(self, 'branches', {})
        return [branches.get(layer.output.key, [layer.output.module]) for layer in self.layers]

def vocab_mismatch(anchor: ModelAdapter, augment: ModelAdapter, index: int, same_tokenizer: bool) -> str | None:
    """The error an aligned call of augment `index` must raise when both vocabularies are known and
    differ, or None. Recorded at construction rather than raised there: the same augment may
    be used in context mode (with a prompt of its own tokens), where its vocabulary is its own business."""

    if same_tokenizer or not exists(anchor.vocab_size) or not exists(augment.vocab_size) or anchor.vocab_size == augment.vocab_size:
        return None

    return (
        f'augment {index} ({type(augment.model).__name__}) has a vocabulary of {augment.vocab_size} tokens, the anchor ({type(anchor.model).__name__}) {anchor.vocab_size}. '
        "In aligned mode (no prompt) the augment reads the anchor's token ids, which means one tokenizer for both. "
        'Give the augment the text in its own tokens as `prompt=` (context mode); or, to have it read the same text tokenized its own way, '
        'give both tokenizers: AugmentParams(tokenizer = augment_tokenizer) and CALM(..., anchor_tokenizer = anchor_tokenizer) (docs/tokenizers.md); '
        'or, if both do share one tokenizer and only their embedding tables are padded to different sizes, say so with AugmentParams(same_tokenizer = True)'
    )

def make_adapter(model: Module, *, role: str = 'augment', **kwargs) -> ModelAdapter:
    # role ('anchor' or 'augment') matters to transformers models only: an augment's padding
    # mask also gives its position ids, and an encoder-decoder can only be an augment
    from calm_pytorch.hf import HFAdapter

    # a PEFT-wrapped model is wired like its base model
    model = peft_base_model(model)

    if HFAdapter.matches(model):
        return HFAdapter(model, role = role, **kwargs)

    adapter_class = XTransformersAdapter if XTransformersAdapter.matches(model) else ModelAdapter
    return adapter_class(model, **kwargs)
