from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn import Module

from calm_pytorch.composition.wiring import is_layer_index
from calm_pytorch.helpers import exists

# axes
# b - batch
# h - heads
# i - anchor (query) positions
# j - augment (key / value) positions
# d - feature dimension

ATTN_KWARGS = ('heads', 'dim_head')

def check_attn_kwargs(attn_kwargs: dict) -> dict:
    """Refuses unknown keys, and `heads` / `dim_head` that are not positive ints: `dim_head = 0`
    would build blocks that add nothing and can never learn."""

    unknown = [key for key in attn_kwargs if key not in ATTN_KWARGS]

    if len(unknown) > 0:
        raise TypeError(f'`attn_kwargs` takes {ATTN_KWARGS}, got unknown key(s) {unknown}; e.g. attn_kwargs = dict(heads = 8, dim_head = 64)')

    for key, value in attn_kwargs.items():
        # bool is an int in Python, but `heads = True` is a mistake, not one head
        if not is_layer_index(value):
            raise TypeError(f'`attn_kwargs[{key!r}]` must be a positive int, got {value!r} of type {type(value).__name__}')

        if operator.index(value) < 1:
            raise ValueError(f'`attn_kwargs[{key!r}]` must be a positive int, got {value!r}')

    return {key: operator.index(value) for key, value in attn_kwargs.items()}

class CrossAttentionBlock(Module):
    """Anchor hidden states attend to one augment layer's hidden states.

    The augment width is projected to the anchor width first (the paper's f_proj). The output
    projection starts at zero, so an untrained block adds exactly nothing to the anchor."""

    def __init__(
        self,
        dim: int,
        dim_context: int,
        *,
        heads: int = 8,
        dim_head: int = 64
    ):
        super().__init__()
        self.heads = heads
        dim_inner = heads * dim_head

        self.norm = nn.LayerNorm(dim)
        self.context_norm = nn.LayerNorm(dim_context)
        self.to_context = nn.Linear(dim_context, dim)  # f_proj of the paper

        self.to_q = nn.Linear(dim, dim_inner, bias = False)
        self.to_kv = nn.Linear(dim, dim_inner * 2, bias = False)  # keys and values in one matmul
        self.to_out = nn.Linear(dim_inner, dim, bias = False)

        nn.init.zeros_(self.to_out.weight)

    def reset_parameters(self):
        """The weights as at construction: default inits, the output projection at zero."""
        for module in (self.norm, self.context_norm, self.to_context, self.to_q, self.to_kv):
            module.reset_parameters()

        nn.init.zeros_(self.to_out.weight)

    def project_context(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """(b, j, dim_context) -> keys and values (b, h, j, d); computable once per context."""
        # the augment may run in another dtype, or on another device, than the composition
        context = context.to(device = self.to_kv.weight.device, dtype = self.to_kv.weight.dtype)
        context = self.to_context(self.context_norm(context))
        kv = self.to_kv(context)
        return rearrange(kv, 'b j (kv h d) -> kv b h j d', kv = 2, h = self.heads).unbind(0)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        kv: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        causal: bool = False,
        query_offset: int | None = None,
        visible: Tensor | None = None
    ) -> Tensor:
        """Returns the delta to add to `x`, in the dtype of `x`.

        x:       (b, i, dim) anchor hidden states
        context: (b, j, dim_context) augment hidden states, or `kv` already projected
        mask:    (b, j) True where the augment position is real (not padding)
        causal:  aligned mode; query i sits at augment position i + query_offset and sees keys up to it
        query_offset: j - i when None (the queries are the last positions); a segment of a
                 segment-recurrent anchor covering positions [s, e) passes s
        visible: (b, i, j) True where query i may attend to key j, any pattern (aligned mode
                 across tokenizers); combined with `mask`, instead of `causal`
        """
        k, v = kv if exists(kv) else self.project_context(context)
        i, j = x.shape[-2], k.shape[-2]

        q = self.to_q(self.norm(x.to(device = self.to_q.weight.device, dtype = self.to_q.weight.dtype)))
        q = rearrange(q, 'b i (h d) -> b h i d', h = self.heads)

        pattern, visible = visible, None

        if exists(mask):
            visible = rearrange(mask.to(device = k.device, dtype = torch.bool), 'b j -> b 1 1 j')

        if exists(pattern):
            pattern = rearrange(pattern.to(device = k.device, dtype = torch.bool), 'b i j -> b 1 i j')
            visible = pattern if not exists(visible) else (visible & pattern)

        offset = query_offset if exists(query_offset) else j - i

        # a query at offset j - 1 or later (a decoding step) sees every key: no mask to build
        if causal and not (i == 1 and offset >= j - 1):
            causal_visible = torch.ones((i, j), device = k.device, dtype = torch.bool).tril(offset)
            visible = causal_visible if not exists(visible) else (visible & causal_visible)

        # a query that sees no key (its context is all padding) would be NaN: it attends to
        # everything instead and its output is zeroed below

        no_key = None

        if exists(visible):
            no_key = ~visible.any(dim = -1, keepdim = True)
            visible = visible | no_key

        out = F.scaled_dot_product_attention(q, k, v, attn_mask = visible)

        if exists(no_key):
            out = out.masked_fill(no_key, 0.)

        out = rearrange(out, 'b h i d -> b i (h d)')
        return self.to_out(out).to(device = x.device, dtype = x.dtype)

class CompositionInit:
    """Mixin: re-initialising the composition weights, as a fresh CALM has them."""

    def init_composition_weights(self):
        """Draws the composition weights anew as at construction, output projections at zero: the
        composition again returns exactly the anchor's logits. For a CALM built over `meta`
        models, after `to_empty`, when no composition checkpoint is loaded."""

        for module in self.cross_attns.modules():
            if isinstance(module, CrossAttentionBlock):
                module.reset_parameters()
