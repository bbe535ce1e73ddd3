from __future__ import annotations

import operator
from typing import NamedTuple

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
# c - augment width (dim_context)

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

class ContextMemory(NamedTuple):
    """What decoding keeps of one augment layer for one cross-attention.

    states: per augment position, tensors (b, h, j, d): its keys and values; or, with `folded`
            weights, its normalised state alone, (b, 1, j, c)
    folded: `CrossAttentionBlock.fold()`, computed once per generation, where decoding steps attend
            over the normalised states (`CrossAttentionBlock.step_folded`)"""

    states: tuple[Tensor, ...]
    folded: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def length(self) -> int:
        return self.states[0].shape[-2]

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

    def fold_for(self, keys: int, appending: bool = False) -> tuple[Tensor, Tensor, Tensor] | None:
        """The folded weights (`fold`) where a decoding step over `keys` augment positions, all
        rows together, reads fewer numbers with them, else None (decoding keeps keys and values).
        Folded, a step reads each position's normalised state (c numbers) twice and two folded
        matrices of dim * h * c; otherwise each position's key and value and the query and
        output projections, all of h * d. `appending`: each step also remembers new positions
        (aligned mode), which otherwise reads the context and key-value projections, c * dim +
        dim * 2 h d, and folded only the norm. It pays where the augment is narrower than the
        cross-attention (c < h d) and the positions many."""
        dim, dim_context, dim_inner = self.to_q.in_features, self.to_context.in_features, self.to_q.out_features
        folded_reads = 2 * keys * dim_context + 2 * dim * self.heads * dim_context
        plain_reads = 2 * keys * dim_inner + 2 * dim * dim_inner + appending * (dim_context * dim + dim * 2 * dim_inner)
        return self.fold() if folded_reads < plain_reads else None

    def fold(self) -> tuple[Tensor, Tensor, Tensor]:
        """The block's projections composed around the normalised augment states n (b, j, c),
        exact in the algebra. A key is W_k f_proj(n): the score q_h . key equals
        (W_qk x)_h . n, W_qk = (W_k,h W_c)^T W_q,h / sqrt(d), plus the keys' share of f_proj's
        bias, one number for all the keys of a query, which the softmax ignores. The values
        sum_j p_j W_v f_proj(n_j) = W_v W_c (sum_j p_j n_j) + W_v b_c, since the p_j add up to 1,
        so the output is W_vo (sum_j p_j n_j) + b_o. Returns W_qk (h c, dim), W_vo (dim, h c)
        and b_o (dim), in the block's dtype."""
        heads = self.heads
        w_q = rearrange(self.to_q.weight.float(), '(h d) e -> h d e', h = heads)
        w_k, w_v = rearrange(self.to_kv.weight.float(), '(kv h d) e -> kv h d e', kv = 2, h = heads)
        w_out = rearrange(self.to_out.weight.float(), 'e (h d) -> h e d', h = heads)
        w_c, b_c = self.to_context.weight.float(), self.to_context.bias.float()

        w_qk = (w_k @ w_c).transpose(-1, -2) @ w_q * w_q.shape[-2] ** -0.5  # (h, c, dim)
        w_vo = w_out @ (w_v @ w_c)                                           # (h, dim, c)
        b_o = (w_out @ (w_v @ b_c)[..., None]).sum(dim = 0)[..., 0]          # (dim,)

        dtype = self.to_q.weight.dtype
        return rearrange(w_qk, 'h c e -> (h c) e').to(dtype), rearrange(w_vo, 'h e c -> e (h c)').to(dtype), b_o.to(dtype)

    def remember(self, context: Tensor, folded: tuple | None = None) -> tuple[Tensor, ...]:
        """(b, j, c) augment hidden states -> what decoding keeps of each position: its keys and
        values, (b, h, j, d) each; or, for `folded` weights, the normalised state, (b, 1, j, c)."""
        # the augment may run in another dtype, or on another device, than the composition
        context = context.to(device = self.to_kv.weight.device, dtype = self.to_kv.weight.dtype)
        context = self.context_norm(context)

        if exists(folded):
            return (context.unsqueeze(1),)  # (b, 1, j, c)

        return self.keys_values_of(context)

    def project_context(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """(b, j, dim_context) augment hidden states -> keys and values (b, h, j, d)."""
        return self.remember(context)

    def keys_values_of(self, normalised: Tensor) -> tuple[Tensor, Tensor]:
        """(b, j, c) normalised augment states -> keys and values (b, h, j, d)."""
        # views, not einops: in aligned mode this runs at every step
        batch, length = normalised.shape[:2]
        kv = self.to_kv(self.to_context(normalised)).view(batch, length, 2, self.heads, self.to_q.out_features // self.heads)
        return tuple(kv.permute(2, 0, 3, 1, 4).unbind(0))  # (b, h, j, d) each

    def state_shapes(self, folded: tuple | None = None) -> list[tuple[int, int]]:
        """The (h, d) of each tensor `remember` returns."""
        if exists(folded):
            return [(1, self.to_context.in_features)]

        return [(self.heads, self.to_q.out_features // self.heads)] * 2

    def keys_values(self, memory: ContextMemory) -> tuple[Tensor, Tensor]:
        if not exists(memory.folded):
            return memory.states

        states, = memory.states
        return self.keys_values_of(states[:, 0])

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        memory: ContextMemory | None = None,
        mask: Tensor | None = None,
        causal: bool = False,
        query_offset: int | None = None,
        visible: Tensor | None = None
    ) -> Tensor:
        """Returns the delta to add to `x`, in the dtype of `x`.

        x:       (b, i, dim) anchor hidden states
        context: (b, j, dim_context) augment hidden states, or their `memory` (decoding)
        mask:    (b, j) True where the augment position is real (not padding)
        causal:  aligned mode; query i sits at augment position i + query_offset and sees keys up to it
        query_offset: j - i when None (the queries are the last positions); a segment of a
                 segment-recurrent anchor covering positions [s, e) passes s
        visible: (b, i, j) True where query i may attend to key j, any pattern (aligned mode
                 across tokenizers); combined with `mask`, instead of `causal`
        """
        memory = memory if exists(memory) else ContextMemory(self.remember(context))
        i, j = x.shape[-2], memory.length
        device = self.to_q.weight.device

        pattern, visible = visible, None

        if exists(mask):
            visible = rearrange(mask.to(device = device, dtype = torch.bool), 'b j -> b 1 1 j')

        if exists(pattern):
            pattern = rearrange(pattern.to(device = device, dtype = torch.bool), 'b i j -> b 1 i j')
            visible = pattern if not exists(visible) else (visible & pattern)

        offset = query_offset if exists(query_offset) else j - i

        # a query at offset j - 1 or later (a decoding step) sees every key: no mask to build
        if causal and not (i == 1 and offset >= j - 1):
            causal_visible = torch.ones((i, j), device = device, dtype = torch.bool).tril(offset)
            visible = causal_visible if not exists(visible) else (visible & causal_visible)

        # a query that sees no key (its context is all padding) would be NaN: it attends to
        # everything instead and its output is zeroed below

        no_key = None

        if exists(visible):
            no_key = ~visible.any(dim = -1, keepdim = True)
            visible = visible | no_key

        x_in = self.norm(x.to(device = device, dtype = self.to_q.weight.dtype))

        # views, not einops, from here: this runs once per block per generated token, where an
        # einops call costs about as much as one of the small matmuls

        if exists(memory.folded) and i == 1:
            delta = self.step_folded(x_in, memory, visible)
        else:
            batch = x_in.shape[0]
            dim_inner = self.to_q.out_features
            q = self.to_q(x_in).view(batch, i, self.heads, dim_inner // self.heads).transpose(1, 2)  # (b, h, i, d)
            out = F.scaled_dot_product_attention(q, *self.keys_values(memory), attn_mask = visible)
            delta = self.to_out(out.transpose(1, 2).reshape(batch, i, dim_inner))

        if exists(no_key):
            delta = delta.masked_fill(no_key[:, 0] if no_key.ndim == 4 else no_key, 0.)  # (b, 1, i, 1) or (i, 1)

        return delta.to(device = x.device, dtype = x.dtype)

    def step_folded(self, x: Tensor, memory: ContextMemory, visible: Tensor | None) -> Tensor:
        """One decoding step (x: (b, 1, dim), normalised) over the normalised augment states, with
        the folded weights (`fold`): the delta (b, 1, dim)."""
        w_qk, w_vo, b_o = memory.folded
        states = memory.states[0][:, 0]  # (b, j, c)
        batch = x.shape[0]

        q = F.linear(x, w_qk).view(batch, self.heads, states.shape[-1])  # (b, h, c)
        sim = torch.bmm(q, states.transpose(1, 2)).unsqueeze(2)          # (b, h, 1, j)

        if exists(visible):
            sim = sim.masked_fill(~visible, torch.finfo(sim.dtype).min)

        attn = sim.float().softmax(dim = -1).to(states.dtype)
        out = torch.bmm(attn.squeeze(2), states)                         # (b, h, c)
        return F.linear(out.view(batch, 1, w_vo.shape[-1]), w_vo, b_o)

class CompositionInit:
    """Mixin: re-initialising the composition weights, as a fresh CALM has them."""

    def init_composition_weights(self):
        """Draws the composition weights anew as at construction, output projections at zero: the
        composition again returns exactly the anchor's logits. For a CALM built over `meta`
        models, after `to_empty`, when no composition checkpoint is loaded."""

        for module in self.cross_attns.modules():
            if isinstance(module, CrossAttentionBlock):
                module.reset_parameters()
