from __future__ import annotations

import threading
from typing import Any

from torch import Tensor
from torch.nn import Module

from calm_pytorch.helpers import exists
from calm_pytorch.models.adapter import DecodeState, Layer, ModelAdapter, left_pad_offsets
from calm_pytorch.models.sites import Site

class XTransformersAdapter(ModelAdapter):
    """x-transformers TransformerWrapper (Decoder or Encoder). Its layer list alternates attention
    and feedforward sublayers, each a (norms, branch, residual) triple: a block ends with the
    residual of its feedforward, and the input of block 1 is the input of `attn_layers`."""

    @staticmethod
    def matches(model: Module) -> bool:
        from x_transformers.x_transformers import AttentionLayers
        return isinstance(getattr(model, 'attn_layers', None), AttentionLayers)

    # x-transformers' cache keeps no shifted token (`shift_tokens`): its cached steps differ from its
    # forward. A class default, so that adapters pickled before this was known read it too
    shifts_tokens: bool = False
    # an augment with absolute positions, which a left-padded row must read from its first real token
    positions_from_mask: bool = False

    def __init__(self, model: Module, *, role: str = 'augment', **kwargs):
        check_composable(model, kwargs['name'], role, exists(kwargs.get('logits_fn')))
        super().__init__(model, **kwargs)

        from x_transformers import x_transformers as xt

        if isinstance(getattr(model, 'pos_emb', None), xt.AbsolutePositionalEmbedding):
            self.max_seq_len = model.max_seq_len

        # 0 is x-transformers' "no absolute positions, no limit"
        self.configured_len = getattr(model, 'max_seq_len', None) or None

        shift_tokens = getattr(xt, 'ShiftTokens', None)
        self.shifts_tokens = isinstance(shift_tokens, type) and any(isinstance(module, shift_tokens) for module in model.modules())

        # learned absolute positions, read per row; `pos` also reaches the attention layers, where
        # rotary embeddings and relative biases other than alibi take no positions per row
        absolute = isinstance(getattr(model, 'pos_emb', None), xt.AbsolutePositionalEmbedding)
        rotary = exists(getattr(model.attn_layers, 'rotary_pos_emb', None))
        rel_pos = getattr(model.attn_layers, 'rel_pos', None)
        per_row = not rotary and (not exists(rel_pos) or isinstance(rel_pos, xt.AlibiPositionalBias))
        self.positions_from_mask = role == 'augment' and absolute and per_row

        # a ContinuousTransformerWrapper reads vectors and has no vocabulary
        num_tokens = getattr(model, 'num_tokens', None)
        self.vocab_size = num_tokens if isinstance(num_tokens, int) and not exists(self.input_shape) else None

    def __call__(self, inputs: Tensor, mask: Tensor | None = None, **kwargs) -> Any:
        # x-transformers counts absolute positions from the first position, padding or not: an
        # augment's left-padded row (aligned, or a context prompt) reads each token at its position
        # alone, as `seq_start_pos` gives in decoding. No data-dependent branch: a compiled forward
        # keeps one graph. The anchor reads exactly what its caller passes: its plain call is the reference
        if self.positions_from_mask and exists(mask) and 'pos' not in kwargs:
            kwargs['pos'] = (mask.long().cumsum(dim = -1) - 1).clamp(min = 0)

        return super().__call__(inputs, mask, **kwargs)

    @property
    def can_cache(self) -> bool:
        return bool(getattr(self.model, 'can_cache_kv', False)) and not self.shifts_tokens

    @property
    def why_no_cache(self) -> str | None:
        if self.shifts_tokens:
            return "it shifts tokens (`shift_tokens`), which x-transformers' cache does not keep, so its cached steps would differ from its forward"

        return None if self.can_cache else 'its `can_cache_kv` is False (x-transformers turns it off for features that cannot be cached)'

    def decode(self, tokens: Tensor, mask: Tensor | None, state: DecodeState | None) -> Any:
        # left padding goes in as `seq_start_pos`, as in x-transformers' own generate: positions
        # are shifted so each row starts at 0, and the padded keys are masked
        seq_start_pos = left_pad_offsets(mask)

        if exists(seq_start_pos) and getattr(self.model, 'num_memory_tokens', 0) > 0:
            # x-transformers counts `seq_start_pos` from its memory tokens, prepended to the
            # sequence: it would mask them and read the padding
            raise ValueError(
                f'{self.name} has memory tokens, which x-transformers masks instead of the padding of a left-padded row: '
                'generate prompts of different lengths one at a time'
            )

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

def check_composable(model: Module, name: str, role: str, has_logits_fn: bool):
    # features whose layers CALM cannot read or write as one hidden state per position, refused
    # before the probes fail inside x-transformers
    attn_layers = model.attn_layers

    if getattr(attn_layers, 'num_residual_streams', 1) > 1:
        raise ValueError(
            f'{name} has {attn_layers.num_residual_streams} residual streams (hyper-connections, `num_residual_streams`), '
            'folded into the batch between its layers: CALM reads and writes one hidden state per position, and cannot compose it'
        )

    if getattr(attn_layers, 'cross_attend', False):
        raise ValueError(f'{name} cross-attends (`cross_attend = True`) to a `context` it must be given, which CALM does not pass')

    if role == 'anchor' and getattr(model, 'to_logits', True) is None and not has_logits_fn:
        raise ValueError(
            f'{name} returns embeddings, not logits (`return_only_embed = True`): the anchor must give logits over its '
            f'{model.num_tokens} tokens; give `anchor_logits_fn` (embeddings -> logits), or use such a model as an augment'
        )
