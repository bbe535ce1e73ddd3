from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.nn import Module, ModuleList

from calm_pytorch.adapters import ModelAdapter, make_adapter
from calm_pytorch.capture import HiddenRecorder
from calm_pytorch.cross_attention import CrossAttentionBlock
from calm_pytorch.helpers import cast_tuple, default, exists, typecheck
from calm_pytorch.injection import AnchorInjector, AugmentContext, Connection
from calm_pytorch.params import AugmentParams, HiddenPosition
from calm_pytorch.wiring import default_connections, validate_connections

# data flows one way:
# augment inputs -> recorded hidden states -> projected keys / values -> anchor hooks -> logits -> loss

class CALM(Module):
    """Composes a frozen anchor LLM with frozen augmenting models (Bansal et al. 2024).

    Only the cross-attention blocks (with their projections) are trained. The anchor and the
    augments stay registered submodules, so `.to()`, `state_dict()` and `parameters()` keep their
    usual meaning; their parameters have `requires_grad = False` and never get a gradient."""

    @typecheck
    def __init__(
        self,
        anchor_llm: Module,
        augment_llms: AugmentParams | Module | Sequence[AugmentParams | Module] | None = None,
        *,
        attn_kwargs: dict = dict(heads = 8, dim_head = 64),
        anchor_extract_blocks_fn = None,
        anchor_transformer_blocks: Sequence[Module] | None = None,
        anchor_hidden_position: HiddenPosition | tuple[HiddenPosition, ...] = 'output',
        pad_id: int = -1,
        frozen_in_eval_mode: bool = True,
        augment_llm: AugmentParams | Module | Sequence[AugmentParams | Module] | None = None,
        dim_anchor: int | None = None,
        dim_augment: int | Sequence[int] | None = None
    ):
        super().__init__()

        # the seed API names a single `augment_llm`

        if exists(augment_llm) and exists(augment_llms):
            raise TypeError('pass the augmenting models as `augment_llms` or `augment_llm`, not both')

        augment_llms = default(augment_llms, augment_llm)

        if not exists(augment_llms):
            raise TypeError('CALM needs at least one augmenting model: `augment_llms=AugmentParams(model=...)`')

        augments = [augment_llms] if isinstance(augment_llms, (AugmentParams, Module)) else list(augment_llms)

        if len(augments) == 0:
            raise ValueError('`augment_llms` is empty; pass at least one augmenting model')

        augments = [augment if isinstance(augment, AugmentParams) else AugmentParams(model = augment) for augment in augments]

        self.pad_id = pad_id
        self.frozen_in_eval_mode = frozen_in_eval_mode
        self.anchor = anchor_llm
        self.augments = ModuleList([augment.model for augment in augments])

        # adapters: where each model's layers are, in execution order, and how to call it

        self.anchor_adapter = make_adapter(
            anchor_llm,
            name = 'anchor_llm',
            blocks = anchor_transformer_blocks,
            extract_blocks_fn = anchor_extract_blocks_fn
        )

        self.augment_adapters = [
            make_adapter(
                augment.model,
                name = f'augment_llms[{index}]',
                blocks = augment.transformer_blocks,
                extract_blocks_fn = augment.extract_blocks_fn,
                mask_kwarg = augment.mask_kwarg,
                input_shape = augment.input_shape,
                returns_hiddens = augment.model_return_hiddens
            )
            for index, augment in enumerate(augments)
        ]

        num_anchor_layers = len(self.anchor_adapter.layers)
        anchor_positions = positions_per_layer(anchor_hidden_position, num_anchor_layers, 'anchor_hidden_position')
        self.num_augment_layers = [count_layers(adapter) for adapter in self.augment_adapters]

        # wiring: (augment_layer, anchor_layer) pairs per augment, 1-indexed

        self.connections = tuple(
            validate_connections(augment.connections, num_layers, num_anchor_layers, index) if exists(augment.connections)
            else default_connections(num_layers, num_anchor_layers, augment.connect_every_num_layers)
            for index, (augment, num_layers) in enumerate(zip(augments, self.num_augment_layers))
        )

        # widths come from one dummy forward through each model, at the sites actually used

        anchor_sites = [
            [self.anchor_adapter.layers[anchor_layer - 1].site(anchor_positions[anchor_layer - 1]) for _, anchor_layer in connections]
            for connections in self.connections
        ]

        anchor_dims = self.anchor_adapter.probe([site for sites in anchor_sites for site in sites]).dims
        dims_anchor = {anchor_dims[site.key] for sites in anchor_sites for site in sites}

        if exists(dim_anchor) and dims_anchor != {dim_anchor}:
            raise ValueError(f'dim_anchor={dim_anchor} does not match the anchor, whose hidden width is {sorted(dims_anchor)}; leave dim_anchor out to derive it')

        augment_keys = []

        for index, (augment, adapter, connections) in enumerate(zip(augments, self.augment_adapters, self.connections)):
            positions = positions_per_layer(augment.hidden_position, self.num_augment_layers[index], f'augment_llms[{index}].hidden_position')
            augment_keys.append([(augment_layer - 1, positions[augment_layer - 1]) for augment_layer, _ in connections])

        augment_dims = [augment_widths(adapter, keys) for adapter, keys in zip(self.augment_adapters, augment_keys)]

        if exists(dim_augment):
            given = cast_tuple(dim_augment, len(augments))
            derived = [sorted(set(dims.values())) for dims in augment_dims]

            if len(given) != len(augments) or any(dims != [dim] for dim, dims in zip(given, derived)):
                raise ValueError(f'dim_augment={dim_augment} does not match the augments, whose hidden widths are {derived}; leave dim_augment out to derive it')

        # the trainable part: one cross-attention per connection

        self.cross_attns = ModuleList([
            ModuleList([
                CrossAttentionBlock(anchor_dims[site.key], augment_dims[index][key], **attn_kwargs)
                for site, key in zip(anchor_sites[index], augment_keys[index])
            ])
            for index in range(len(augments))
        ])

        anchor_param = next(anchor_llm.parameters(), None)
        if exists(anchor_param):
            self.cross_attns.to(anchor_param.device)

        # freeze the models, remembering their state so that removing the hooks restores them

        frozen = [anchor_llm, *self.augments]
        self._frozen_state = [
            (module, module.training, [(param, param.requires_grad) for param in module.parameters()])
            for module in frozen
        ]

        for module in frozen:
            module.requires_grad_(False)

        # hooks: recorders on the connected augment sites, one injector over the anchor sites

        self.recorders = [HiddenRecorder(adapter, keys) for adapter, keys in zip(self.augment_adapters, augment_keys)]

        self.injector = AnchorInjector([
            (site, Connection(index, key, cross_attn))
            for index in range(len(augments))
            for site, key, cross_attn in zip(anchor_sites[index], augment_keys[index], self.cross_attns[index])
        ])

        self.augment_keys = augment_keys

        # augments that read tokens are probed for causality here rather than on the first aligned
        # call: the probe registers hooks, and inside a torch.compile'd forward that is a graph break
        self.augment_is_causal: list[bool | None] = [
            None if exists(adapter.input_shape) else adapter.is_causal([] if adapter.returns_hiddens else [adapter.layers[layer].site(position) for layer, position in keys])
            for adapter, keys in zip(self.augment_adapters, augment_keys)
        ]
        self.hooks_removed = False

        self.train(self.training)

    # modes

    def train(self, mode: bool = True):
        super().train(mode)

        # frozen models run without dropout unless asked otherwise
        if self.frozen_in_eval_mode:
            self.anchor.eval()
            self.augments.eval()

        return self

    def remove_hooks(self):
        """Takes every hook away and restores the models' `requires_grad` flags and train / eval
        modes: the anchor and the augments are again exactly the models they were. This CALM can
        no longer be called."""

        for hooks in (*self.recorders, self.injector):
            hooks.remove()

        for module, training, flags in self._frozen_state:
            module.train(training)
            for param, requires_grad in flags:
                param.requires_grad_(requires_grad)

        self.hooks_removed = True

    # forward

    @typecheck
    def forward(
        self,
        seq: Tensor,
        *,
        prompt: Tensor | Sequence[Tensor | None] | None = None,
        prompt_mask: Tensor | Sequence[Tensor | None] | None = None,
        mask: Tensor | None = None,
        return_loss: bool = True,
        **anchor_kwargs
    ) -> Tensor:
        """seq:         (b, n) token ids for the anchor
        prompt:      None for aligned mode (each augment reads `seq`), or a context for every
                     augment: one tensor, or one per augment (None there means aligned)
        prompt_mask: (b, m) True for real context positions, one or one per augment
        mask:        (b, n) True for real tokens of `seq`; masked labels are ignored by the loss
        return_loss: the next-token cross-entropy, else the logits (b, n, num_tokens)"""

        if self.hooks_removed:
            raise RuntimeError('this CALM had its hooks removed with `remove_hooks()`; build a new CALM to compose the models again')

        check_tokens(seq, 'seq', min_len = 2 if return_loss else 1)

        if exists(mask):
            mask = check_mask(mask, seq, 'mask', 'seq')

        if return_loss:
            labels = seq[:, 1:]
            seq = seq[:, :-1]

            if exists(mask):
                labels = labels.masked_fill(~mask[:, 1:], -100)
                mask = mask[:, :-1]

            labels = labels.masked_fill(labels == self.pad_id, -100)

        self.anchor_adapter.check_length(seq, 'seq')

        contexts = self.augment_contexts(seq, mask, prompt, prompt_mask)

        with self.injector.composed(contexts):
            logits = self.anchor_adapter.logits(self.anchor_adapter(seq, mask, **anchor_kwargs))

        if not return_loss:
            return logits

        # classes last and positions flattened: cross_entropy over a (b, c, n) view is twice as slow on CPU
        return F.cross_entropy(rearrange(logits, 'b n c -> (b n) c'), rearrange(labels, 'b n -> (b n)'), ignore_index = -100)

    def augment_contexts(
        self,
        seq: Tensor,
        mask: Tensor | None,
        prompt,
        prompt_mask
    ) -> list[AugmentContext]:
        """Runs every augment (frozen, without gradients) and returns what the anchor attends to."""

        num_augments = len(self.augments)
        prompts = per_augment(prompt, num_augments, 'prompt')
        prompt_masks = per_augment(prompt_mask, num_augments, 'prompt_mask')

        contexts = []

        for index, (adapter, recorder, augment_prompt, augment_prompt_mask) in enumerate(zip(self.augment_adapters, self.recorders, prompts, prompt_masks)):
            aligned = not exists(augment_prompt)
            arg = f'prompt[{index}]' if isinstance(prompt, (list, tuple)) else 'prompt'

            if aligned:
                if exists(augment_prompt_mask):
                    raise ValueError(f'a prompt_mask was given for augment {index} but no prompt; pass the prompt too, or leave the mask out for aligned mode')

                self.check_aligned(index)
                inputs, inputs_mask = seq, mask
            else:
                self.check_prompt(index, augment_prompt, augment_prompt_mask, seq, arg)
                inputs, inputs_mask = augment_prompt, augment_prompt_mask.bool() if exists(augment_prompt_mask) else None

            adapter.check_length(inputs, 'seq' if aligned else arg)

            with torch.no_grad():
                hiddens = recorder(lambda: adapter(inputs, inputs_mask))

            if exists(inputs_mask) and not aligned:
                length = next(iter(hiddens.values())).shape[-2]
                if inputs_mask.shape[-1] != length:
                    raise ValueError(f'`{arg}_mask` covers {inputs_mask.shape[-1]} positions, but augment {index} produced {length} hidden positions')

            contexts.append(AugmentContext(hiddens, inputs_mask, causal = aligned))

        return contexts

    def check_aligned(self, index: int):
        adapter = self.augment_adapters[index]

        if exists(adapter.input_shape):
            raise ValueError(f'augment {index} takes inputs of shape {adapter.input_shape}, not tokens, so it cannot read `seq`; pass its input as `prompt=`')

        if self.augment_is_causal[index] is None:
            sites = [] if adapter.returns_hiddens else [adapter.layers[layer].site(position) for layer, position in self.augment_keys[index]]
            self.augment_is_causal[index] = adapter.is_causal(sites)

        if not self.augment_is_causal[index]:
            raise ValueError(
                f'augment {index} ({type(adapter.model).__name__}) is not causal: its hidden states at a position depend on later tokens, '
                'so in aligned mode (no prompt) the anchor would see the future. Pass its input as `prompt=` (context mode) instead'
            )

    def check_prompt(self, index: int, prompt: Tensor, prompt_mask: Tensor | None, seq: Tensor, arg: str):
        if not isinstance(prompt, Tensor):
            raise TypeError(f'`{arg}` must be a tensor, got {type(prompt).__name__}')

        adapter = self.augment_adapters[index]

        if exists(adapter.input_shape):
            if tuple(prompt.shape[1:]) != tuple(adapter.input_shape):
                raise ValueError(f'`{arg}` must have shape (batch, *{tuple(adapter.input_shape)}) for augment {index}, got {tuple(prompt.shape)}')
        else:
            check_tokens(prompt, arg)

        if prompt.shape[0] != seq.shape[0]:
            raise ValueError(f'`{arg}` has batch size {prompt.shape[0]} but `seq` has batch size {seq.shape[0]}; they must match')

        if exists(prompt_mask):
            if not isinstance(prompt_mask, Tensor) or prompt_mask.ndim != 2 or prompt_mask.shape[0] != prompt.shape[0]:
                shape = tuple(prompt_mask.shape) if isinstance(prompt_mask, Tensor) else type(prompt_mask).__name__
                raise ValueError(f'`{arg}_mask` must have shape (batch, context_len) with batch {prompt.shape[0]}, got {shape}')

            if prompt_mask.dtype.is_floating_point:
                raise TypeError(f'`{arg}_mask` must be a bool tensor (True for real positions), got dtype {prompt_mask.dtype}')

            if not exists(adapter.input_shape) and prompt_mask.shape != prompt.shape:
                raise ValueError(f'`{arg}_mask` must have the shape of `{arg}` {tuple(prompt.shape)}, got {tuple(prompt_mask.shape)}')

# helpers for the constructor

def count_layers(adapter: ModelAdapter) -> int:
    if adapter.returns_hiddens:
        with torch.no_grad():
            return len(adapter(adapter.dummy_input()))

    return len(adapter.layers)

def augment_widths(adapter: ModelAdapter, keys) -> dict:
    if adapter.returns_hiddens:
        with torch.no_grad():
            hiddens = adapter(adapter.dummy_input())
        return {key: hiddens[key[0]].shape[-1] for key in keys}

    sites = {key: adapter.layers[key[0]].site(key[1]) for key in keys}
    dims = adapter.probe(list(sites.values())).dims
    return {key: dims[site.key] for key, site in sites.items()}

def positions_per_layer(position, num_layers: int, name: str) -> tuple[HiddenPosition, ...]:
    positions = cast_tuple(position, num_layers)

    if len(positions) != num_layers:
        raise ValueError(f'`{name}` must be one position or one per layer ({num_layers} layers), got {len(positions)}')

    if not all(p in ('input', 'output') for p in positions):
        raise ValueError(f"`{name}` must be 'input' or 'output', got {position!r}")

    return positions

# helpers for the forward

def check_tokens(tokens: Tensor, name: str, min_len: int = 1):
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f'`{name}` must hold integer token ids (e.g. torch.long), got dtype {tokens.dtype}')

    if tokens.ndim != 2:
        raise ValueError(f'`{name}` must have shape (batch, seq_len), got {tuple(tokens.shape)}')

    if tokens.shape[1] < min_len:
        raise ValueError(f'`{name}` must have at least {min_len} token(s) (a loss needs 2: inputs and next-token labels), got shape {tuple(tokens.shape)}')

def check_mask(mask: Tensor, like: Tensor, name: str, like_name: str) -> Tensor:
    if mask.shape != like.shape:
        raise ValueError(f'`{name}` must have the shape of `{like_name}` {tuple(like.shape)}, got {tuple(mask.shape)}')

    if mask.dtype.is_floating_point:
        raise TypeError(f'`{name}` must be a bool tensor (True for real tokens), got dtype {mask.dtype}')

    return mask.bool()

def per_augment(value, num_augments: int, name: str) -> list:
    if not isinstance(value, (list, tuple)):
        return [value] * num_augments

    if len(value) != num_augments:
        raise ValueError(f'`{name}` holds {len(value)} entries but there are {num_augments} augments; pass one per augment, or a single tensor for all')

    return list(value)
