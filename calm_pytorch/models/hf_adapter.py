from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn import Module

from calm_pytorch.helpers import exists
from calm_pytorch.models.adapter import DecodeState, Layer, ModelAdapter
from calm_pytorch.models.hf_discovery import discovery_root, find_hf_blocks, is_encoder_decoder, is_hf_model, text_config

# Hugging Face transformers models: how to call them (the blocks are found by hf_discovery.py).
# `transformers` is imported only to build a cache (hf_cache.py), for a model whose modeling code is loaded

# the keyword a forward takes its cache by: `past_key_values` until transformers 5.24, `cache` since
CACHE_KWARGS = ('cache', 'past_key_values')

# model types whose forward multiplies each input position's state by its attention-mask entry,
# so that a cached step takes the mask of its new positions only (as their own generate passes it)
MASKS_EACH_INPUT_POSITION = {'mamba', 'falcon_mamba'}

Role = Literal['anchor', 'augment']

# calling conventions

def forward_params(module: Module) -> set[str]:
    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return set()

def cache_kwarg(params: set[str]) -> str | None:
    return next((kwarg for kwarg in CACHE_KWARGS if kwarg in params), None)

def attends_to_all_earlier(config: Any) -> bool:
    kinds = getattr(config, 'layer_types', None) or getattr(config, 'attention_layers', None) or ()
    windowed = getattr(config, 'sliding_window', None) is not None and getattr(config, 'use_sliding_window', True)
    chunked = getattr(config, 'attention_chunk_size', None) is not None
    return not windowed and not chunked and all(kind in ('full_attention', 'global') for kind in kinds)

def image_input_shape(config: Any) -> tuple[int, ...] | None:
    size = getattr(config, 'image_size', None)
    channels = getattr(config, 'num_channels', 3)

    if isinstance(size, int):
        return (channels, size, size)

    if isinstance(size, (tuple, list)) and len(size) == 2:
        return (channels, *size)

    return None

def positions_from_mask(mask: Tensor) -> Tensor:
    # position of each real token among the real tokens of its row, as HF generate computes it:
    # padding on either side then never shifts the positions of the real tokens
    return (mask.long().cumsum(dim = -1) - 1).clamp(min = 0)

def position_tables(model: Module) -> list[torch.nn.Embedding]:
    # learned absolute positions of the text model (`wpe` of GPT-2, `position_embeddings` of BERT,
    # `embed_positions` of OPT), not those of a vision tower beside it
    return [
        module for name, module in discovery_root(model).named_modules()
        if isinstance(module, torch.nn.Embedding) and ('pos' in name.rsplit('.', 1)[-1] or name.endswith('wpe'))
    ]

def learned_max_positions(model: Module) -> int | None:
    # a learned position table fails with an index error past its end; rotary and relative
    # positions have no hard limit
    max_positions = getattr(text_config(model), 'max_position_embeddings', None)
    return max_positions if isinstance(max_positions, int) and len(position_tables(model)) > 0 else None

def vocab_size(target: Module, model: Module) -> int | None:
    # the embedding table itself (it may have been resized since the config was written), else the config
    try:
        embeddings = target.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embeddings = None

    size = getattr(embeddings, 'num_embeddings', None)

    if not isinstance(size, int):
        size = getattr(text_config(model), 'vocab_size', None)

    return size if isinstance(size, int) and size > 0 else None

def position_offset(model: Module) -> int:
    # RoBERTa and its kin count positions after the `padding_idx` of their position table: their
    # first real token sits at padding_idx + 1, the others' at 0
    padding_idx = next((table.padding_idx for table in position_tables(model) if exists(table.padding_idx)), None)
    return padding_idx + 1 if exists(padding_idx) else 0

def counts_positions_from_padding(model: Module) -> bool:
    return position_offset(model) > 0  # a name of 0.1.0, kept

def check_right_padded(mask: Tensor, name: str, kind: str):
    if bool((mask.int().cummin(dim = -1).values != mask.int()).any()):
        raise ValueError(
            f'the mask given to {name} ({kind}) has padding before real tokens, but this model counts its learned positions '
            'from its first position and takes no `position_ids`, so a left-padded row would read other positions than '
            'alone: pad its input on the right'
        )

class HFAdapter(ModelAdapter):
    """A transformers model. Its blocks are found from the model itself; it is called with
    keyword arguments (`input_ids` or `pixel_values`, `attention_mask`, `position_ids`); an
    encoder-decoder augment runs its encoder only.

    The padding mask of an augment also gives its `position_ids`, so that padding (on either
    side) never changes the hidden states of real tokens, even with absolute positions; an
    augment with learned positions and no `position_ids` argument is refused left padding. The
    anchor gets exactly what the user passes: `mask` as `attention_mask`, and any extra keywords
    (e.g. `use_cache=False` in training, to skip building a cache)."""

    @staticmethod
    def matches(model: Module) -> bool:
        return is_hf_model(model)

    def __init__(
        self,
        model: Module,
        *,
        name: str,
        role: Role = 'augment',
        input_shape: tuple[int, ...] | None = None,
        mask_kwarg: str | None = None,
        **kwargs
    ):
        self.role = role
        self.blocks_name = None

        if is_encoder_decoder(model) and role == 'anchor':
            raise ValueError(
                f'{name} ({type(model).__name__}) is an encoder-decoder model; an anchor must be a decoder-only language model '
                f'(a *ForCausalLM, or a multimodal model whose language model is decoder-only). Its encoder can be an augment'
            )

        # an encoder-decoder augment contributes its encoder only: the decoder would need its own inputs
        self.target = model.get_encoder() if is_encoder_decoder(model) else model
        self.main_input = getattr(self.target, 'main_input_name', None) or 'input_ids'
        self.params = forward_params(self.target)

        if not exists(input_shape) and self.main_input == 'pixel_values':
            input_shape = image_input_shape(model.config)

        if not exists(mask_kwarg) and 'attention_mask' in self.params:
            mask_kwarg = 'attention_mask'

        self.positions_from_mask = role == 'augment' and 'position_ids' in self.params and not exists(input_shape)

        self.first_position = position_offset(model)  # where ids from the mask start
        # a cached step of these models takes the mask of its new positions only (see the set)
        self.masks_new_positions = text_config(model).model_type in MASKS_EACH_INPUT_POSITION

        # an augment with learned positions and no `position_ids` argument (BART's encoder) reads a
        # left-padded row at other positions than alone
        self.left_padding_moves_positions = role == 'augment' and not exists(input_shape) and 'position_ids' not in self.params and len(position_tables(model)) > 0

        super().__init__(model, name = name, input_shape = input_shape, mask_kwarg = mask_kwarg, **kwargs)

        self.max_seq_len = None if exists(self.input_shape) else learned_max_positions(model)
        configured = getattr(text_config(model), 'max_position_embeddings', None)
        self.configured_len = configured if isinstance(configured, int) and not exists(self.input_shape) else None
        self.vocab_size = vocab_size(self.target, model) if self.main_input == 'input_ids' else None

        self.read_cache_interface()

    def read_cache_interface(self):
        # a decoder whose forward takes a cache decodes incrementally in generation. The keyword
        # is read off the signature, which changed across transformers versions
        self.cache_kwarg = cache_kwarg(self.params)
        self.no_cache_reason = (
            'it is an encoder-decoder model, of which only the encoder runs, on the whole sequence' if is_encoder_decoder(self.model) else
            f'its forward takes no cache (neither of {", ".join(CACHE_KWARGS)})' if not exists(self.cache_kwarg) else
            None
        )

    def __setstate__(self, state: dict):
        # an adapter pickled by 0.1.0 knew only `past_key_values`
        self.__dict__.update(state)

        if 'cache_kwarg' not in state:
            self.read_cache_interface()

    def find_layers(self) -> list[Layer]:
        try:
            self.blocks_name, blocks = find_hf_blocks(self.model)
        except ValueError as error:
            raise ValueError(f'{self.name}: {error}') from None

        return self.layers_from_blocks(blocks)

    def __call__(self, inputs: Tensor, mask: Tensor | None = None, **kwargs) -> Any:
        kwargs[self.main_input] = inputs

        if exists(mask) and exists(self.mask_kwarg):
            kwargs.setdefault(self.mask_kwarg, mask.long())

        if exists(mask) and self.positions_from_mask:
            kwargs.setdefault('position_ids', positions_from_mask(mask) + getattr(self, 'first_position', 0))

        # checked outside a compiled graph only: it reads the mask's values
        if exists(mask) and getattr(self, 'left_padding_moves_positions', False) and not torch.compiler.is_compiling():
            check_right_padded(mask, self.name, type(self.model).__name__)

        # an augment's cache would be thrown away. The anchor is left alone: `use_cache=False`
        # takes another attention path in some models (GPT-J, GPT-Neo), which changes the
        # logits in the last bits, and an untrained composition must equal the anchor exactly
        if self.role == 'augment' and 'use_cache' in self.params:
            kwargs.setdefault('use_cache', False)

        return self.target(**kwargs)

    @property
    def can_cache(self) -> bool:
        return not exists(self.no_cache_reason)

    @property
    def why_no_cache(self) -> str | None:
        return self.no_cache_reason

    @property
    def decodes_with_gaps(self) -> bool:
        # positions count the real tokens of the mask, and every layer attends to all earlier
        # positions: a masked one anywhere is then skipped. A window (sliding, local, chunked)
        # counts cache slots instead of tokens, so it would see fewer tokens across a gap
        return self.can_cache and 'position_ids' in forward_params(self.model) and attends_to_all_earlier(text_config(self.model))

    def crop(self, state: DecodeState, length: int):
        if not exists(state.cache) or length == 0:
            state.cache, state.length = None, 0
            return

        # `crop` takes minus the number of positions to drop
        state.cache.crop(min(length - state.length, 0))
        state.length = min(state.length, length)

    def decode(self, tokens: Tensor, mask: Tensor | None, state: DecodeState | None) -> Any:
        """One decoding step with the model's cache (see `ModelAdapter.decode`); its logits are
        those of the last position. Positions count real tokens only, so a left-padded row sees
        the positions it would see alone."""

        if not self.can_cache:
            return super().decode(tokens, mask, state)

        mask = mask.long() if exists(mask) else torch.ones_like(tokens)
        position_ids = positions_from_mask(mask) + getattr(self, 'first_position', 0)

        if not exists(state):
            return self.model(input_ids = tokens, attention_mask = mask, position_ids = position_ids, use_cache = False)

        if not exists(state.cache):
            # created here rather than returned by the model: a recorder may stop the forward after
            # its deepest connected layer, and the cache object, filled in place, survives that
            from calm_pytorch.models.hf_cache import new_cache
            state.cache = new_cache(self.model.config, state.rollback, state.capacity)

        start, state.length = state.length, tokens.shape[-1]

        # generation reads the logits of the newest position only: the vocabulary projection of
        # the rest of a prompt is skipped, as in transformers' own generate
        last_logits = dict(logits_to_keep = 1) if 'logits_to_keep' in self.params else dict()

        # a whole sequence's mask would broadcast one new position over all of them
        step_mask = mask[:, start:] if getattr(self, 'masks_new_positions', False) else mask

        return self.model(
            input_ids = tokens[:, start:],
            attention_mask = step_mask,
            position_ids = position_ids[:, start:],
            use_cache = True,
            **{self.cache_kwarg: state.cache},
            **last_logits
        )
