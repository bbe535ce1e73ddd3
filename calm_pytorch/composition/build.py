from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn import Module

from calm_pytorch.composition.inputs import check_model
from calm_pytorch.composition.params import AugmentParams
from calm_pytorch.composition.wiring import Connections, default_connections, validate_connections
from calm_pytorch.helpers import cast_tuple, default, exists
from calm_pytorch.models.adapter import ModelAdapter
from calm_pytorch.models.precision import floating_dtype
from calm_pytorch.models.recurrent import RECURRENT_CONTEXTS, state_widths
from calm_pytorch.models.sites import HiddenPosition, Site

# what CALM's constructor derives from the models before it builds anything: the augments as
# AugmentParams, which layers connect, at which sites, and at what widths (from one dummy forward)

def augment_list(augment_llms, augment_llm) -> list[AugmentParams]:
    """`augment_llms` (or the seed API's `augment_llm`): one augment or a sequence, each an
    AugmentParams or a bare model -> a non-empty list of AugmentParams."""

    if exists(augment_llm) and exists(augment_llms):
        raise TypeError('pass the augmenting models as `augment_llms` or `augment_llm`, not both')

    augment_llms = default(augment_llms, augment_llm)

    if not exists(augment_llms):
        raise TypeError('CALM needs at least one augmenting model: `augment_llms=AugmentParams(model=...)`')

    augments = [augment_llms] if isinstance(augment_llms, (AugmentParams, Module)) else list(augment_llms)

    if len(augments) == 0:
        raise ValueError('`augment_llms` is empty; pass at least one augmenting model')

    augments = [augment if isinstance(augment, AugmentParams) else AugmentParams(model = augment) for augment in augments]

    for index, augment in enumerate(augments):
        check_model(augment.model, f'augment_llms[{index}].model')

        if not isinstance(augment.model, Module):
            raise TypeError(f'`augment_llms[{index}].model` must be a torch.nn.Module, got {type(augment.model).__name__}')

    return augments

@dataclass
class Wiring:
    connections: tuple[Connections, ...]           # per augment: (augment_layer, anchor_layer), 1-indexed
    num_augment_layers: list[int]
    anchor_positions: tuple[HiddenPosition, ...]   # per anchor layer: where its delta is added
    anchor_sites: list[list[Site]]                 # per augment, per connection: the anchor site written
    augment_keys: list[list[tuple[int, HiddenPosition]]]  # ... and the augment layer read (0-based)
    reads_final_state: list[bool]                  # per augment: a segment-recurrent final state instead of hidden states
    widths: list[list[tuple[int, int]]]            # per augment, per connection: (anchor width, augment width)

def derive_wiring(
    anchor: ModelAdapter,
    augments: list[AugmentParams],
    augment_adapters: list[ModelAdapter],
    anchor_hidden_position: HiddenPosition | tuple[HiddenPosition, ...],
    dim_anchor: int | None,
    dim_augment: int | Sequence[int] | None
) -> Wiring:
    """Which augment layer feeds which anchor layer, at which sites and widths. The widths come from
    one dummy forward through each model, at the sites actually used; given dims are checked."""

    for index, augment in enumerate(augments):
        if exists(augment.connections) and exists(augment.connect_every_num_layers):
            raise ValueError(f'augment_llms[{index}] has both `connections` and `connect_every_num_layers`, two ways to say which layers connect; pass one')

    num_anchor_layers = len(anchor.layers)
    anchor_positions = positions_per_layer(anchor_hidden_position, num_anchor_layers, 'anchor_hidden_position')
    num_augment_layers = [count_layers(adapter) for adapter in augment_adapters]

    connections = tuple(
        validate_connections(augment.connections, num_layers, num_anchor_layers, index) if exists(augment.connections)
        else default_connections(num_layers, num_anchor_layers, spacing(augment.connect_every_num_layers, num_layers, index))
        for index, (augment, num_layers) in enumerate(zip(augments, num_augment_layers))
    )

    anchor_sites = [
        [anchor.layers[anchor_layer - 1].site(anchor_positions[anchor_layer - 1]) for _, anchor_layer in pairs]
        for pairs in connections
    ]

    anchor_dims = anchor.probe([site for sites in anchor_sites for site in sites]).dims
    dims_anchor = {anchor_dims[site.key] for sites in anchor_sites for site in sites}

    if exists(dim_anchor) and dims_anchor != {dim_anchor}:
        raise ValueError(f'dim_anchor={dim_anchor} does not match the anchor, whose hidden width is {sorted(dims_anchor)}; leave dim_anchor out to derive it')

    augment_keys = []

    for index, (augment, pairs) in enumerate(zip(augments, connections)):
        positions = positions_per_layer(augment.hidden_position, num_augment_layers[index], f'augment_llms[{index}].hidden_position')
        augment_keys.append([(augment_layer - 1, positions[augment_layer - 1]) for augment_layer, _ in pairs])

        # a model returning its hidden states gives one per layer, with no input or output to choose
        if augment_adapters[index].returns_hiddens and any(position != 'output' for _, position in augment_keys[-1]):
            raise ValueError(
                f"augment_llms[{index}].hidden_position = 'input' needs the blocks, whose inputs are read by hooks: with "
                'model_return_hiddens = True each layer gives the one hidden state the model returns for it'
            )

    # a segment-recurrent augment may offer its final state tokens instead of its hidden states
    reads_final_state = [check_recurrent_context(augment, adapter, keys, index) for index, (augment, adapter, keys) in enumerate(zip(augments, augment_adapters, augment_keys))]

    augment_dims = [
        final_state_widths(adapter, keys) if final_state else augment_widths(adapter, keys)
        for adapter, keys, final_state in zip(augment_adapters, augment_keys, reads_final_state)
    ]

    if exists(dim_augment):
        given = cast_tuple(dim_augment, len(augments))
        derived = [sorted(set(dims.values())) for dims in augment_dims]

        if len(given) != len(augments) or any(dims != [dim] for dim, dims in zip(given, derived)):
            raise ValueError(f'dim_augment={dim_augment} does not match the augments, whose hidden widths are {derived}; leave dim_augment out to derive it')

    widths = [
        [(anchor_dims[site.key], dims[key]) for site, key in zip(sites, keys)]
        for sites, keys, dims in zip(anchor_sites, augment_keys, augment_dims)
    ]

    return Wiring(connections, num_augment_layers, anchor_positions, anchor_sites, augment_keys, reads_final_state, widths)

def spacing(every: int | None, num_layers: int, index: int) -> int:
    """The automatic wiring's spacing: the paper's 4 by default (an augment shallower than that feeds
    its last layer); a spacing given larger than the augment's depth is refused."""

    if not exists(every):
        return 4

    if every > num_layers:
        raise ValueError(
            f'augment_llms[{index}].connect_every_num_layers = {every}, but augment {index} has {num_layers} layers: '
            f'no {every}th layer to connect. Give a spacing of at most {num_layers}, '
            f'or choose the layers: connections = (({num_layers}, anchor_layer),)'
        )

    return every

def positions_per_layer(position, num_layers: int, name: str) -> tuple[HiddenPosition, ...]:
    positions = cast_tuple(position, num_layers)

    if len(positions) != num_layers:
        raise ValueError(f'`{name}` must be one position or one per layer ({num_layers} layers), got {len(positions)}')

    if not all(p in ('input', 'output') for p in positions):
        raise ValueError(f"`{name}` must be 'input' or 'output', got {position!r}")

    return positions

def returned_hiddens(adapter: ModelAdapter) -> list:
    # model_return_hiddens: the model's output is its layers' hidden states, (b, n, d) each
    hiddens = adapter.dry_run()

    if not isinstance(hiddens, (list, tuple)) or len(hiddens) == 0 or not all(isinstance(hidden, Tensor) and hidden.ndim == 3 for hidden in hiddens):
        got = f'a tensor of shape {tuple(hiddens.shape)}' if isinstance(hiddens, Tensor) else type(hiddens).__name__
        raise TypeError(
            f'{adapter.name} was given model_return_hiddens = True, so its output must be a list or tuple of its layers\' '
            f'hidden states, each (batch, positions, width); got {got}. For a transformers model leave the option out: its blocks are found'
        )

    return list(hiddens)

def count_layers(adapter: ModelAdapter) -> int:
    if adapter.returns_hiddens:
        return len(returned_hiddens(adapter))

    return len(adapter.layers)

def augment_widths(adapter: ModelAdapter, keys) -> dict:
    if adapter.returns_hiddens:
        hiddens = returned_hiddens(adapter)
        return {key: hiddens[key[0]].shape[-1] for key in keys}

    sites = {key: adapter.layers[key[0]].site(key[1]) for key in keys}
    probe = adapter.probe(list(sites.values()))

    # the cross-attention reads (batch, positions, width): a feature map (batch, channels, h, w) would be cut wrong
    for (layer, position), site in sites.items():
        shape = probe.shapes[site.key]
        if len(shape) != 3:
            raise ValueError(
                f'layer {layer + 1} of {adapter.name} ({type(site.module).__name__}) gives hidden states of shape {shape} at its {position}, '
                'but the cross-attention reads (batch, positions, width): connect layers that give a sequence, or reshape in a block of yours'
            )

    return {key: probe.dims[site.key] for key, site in sites.items()}

def check_recurrent_context(augment: AugmentParams, adapter: ModelAdapter, keys, index: int) -> bool:
    """True when the augment offers its final state tokens as the context."""

    name = f'augment_llms[{index}].recurrent_context'

    if augment.recurrent_context not in RECURRENT_CONTEXTS:
        raise ValueError(f"`{name}` must be one of {RECURRENT_CONTEXTS}, got {augment.recurrent_context!r}")

    if augment.recurrent_context == 'all_segments':
        return False

    if adapter.returns_hiddens:
        raise ValueError(f"`{name}` = 'final_state' reads the state its blocks return, so it needs the blocks; it cannot be used with model_return_hiddens = True")

    if any(position != 'output' for _, position in keys):
        raise ValueError(f"`{name}` = 'final_state' reads the state a block returns: the connected layers need hidden_position = 'output'")

    return True

def final_state_widths(adapter: ModelAdapter, keys) -> dict:
    sites = {key: adapter.layers[key[0]].site(key[1]) for key in keys}
    dims = state_widths(adapter, list(sites.values()))
    return {key: dims[site.key] for key, site in sites.items()}

# what else construction settles: why an augment cannot read the anchor's ids, and the dtype of the composition

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

CompositionDtype = torch.dtype | Literal['anchor']
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

def resolve_composition_dtype(composition_dtype: CompositionDtype, anchor: Module) -> torch.dtype:
    if composition_dtype == 'anchor':
        return floating_dtype(anchor) or torch.float32

    # float8 types are floating point too, but a LayerNorm or a matmul in them is not computed
    if composition_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"`composition_dtype` must be a floating point torch.dtype that is computed in, {COMPUTE_DTYPES}, or 'anchor', got {composition_dtype!r}")

    return composition_dtype
