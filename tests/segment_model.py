from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# a tiny segment-recurrent language model with the interface of Om LLM's ARCformer blocks:
# the input is cut into segments; every block is called once per segment as
# block(x, state, offset) -> (output, new_state), where state is a short sequence of state tokens
# carried from one segment to the next. Memory per call is bounded by the segment length

def positions(offset: int, length: int, dim: int, device) -> Tensor:
    # sinusoidal positions of the segment's tokens in the whole input: the offset is what makes
    # a token know where its segment lies
    pos = torch.arange(offset, offset + length, device = device, dtype = torch.float32)[:, None]
    freqs = torch.exp(torch.arange(0, dim, 2, device = device, dtype = torch.float32) * (-math.log(1e4) / dim))
    return torch.cat(((pos * freqs).sin(), (pos * freqs).cos()), dim = -1)

class SegmentBlock(nn.Module):
    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first = True)
        self.state_attn = nn.MultiheadAttention(dim, heads, batch_first = True)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))

    def forward(self, x: Tensor, state: Tensor, offset: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, n, s = x.shape[0], x.shape[1], state.shape[1]
        x = x + positions(offset, n, x.shape[-1], x.device).to(x.dtype)

        memory = self.norm(torch.cat((state, x), dim = 1))

        # a token sees every state token and the tokens of its segment up to itself (True = hidden)
        future = torch.ones(n, n, dtype = torch.bool, device = x.device).triu(1)
        blocked = torch.cat((torch.zeros(n, s, dtype = torch.bool, device = x.device), future), dim = -1)

        x = x + self.attn(memory[:, s:], memory, memory, attn_mask = blocked, need_weights = False)[0]
        x = x + self.ff(x)

        # the state reads the whole segment, padding excluded, and carries it to the next one
        padding = None
        if mask is not None:
            padding = torch.cat((torch.zeros(b, s, dtype = torch.bool, device = x.device), ~mask), dim = -1)

        new_state = state + self.state_attn(memory[:, :s], memory, memory, key_padding_mask = padding, need_weights = False)[0]

        # a segment of padding only leaves the state as it was: right padding changes nothing
        if mask is not None:
            new_state = torch.where(mask.any(dim = -1)[:, None, None], new_state, state)

        return x, new_state

class SegmentLM(nn.Module):
    def __init__(self, num_tokens: int = 256, dim: int = 16, depth: int = 3, segment_len: int = 4, num_state_tokens: int = 2):
        super().__init__()
        self.segment_len = segment_len
        self.emb = nn.Embedding(num_tokens, dim)
        self.blocks = nn.ModuleList([SegmentBlock(dim) for _ in range(depth)])
        self.init_state = nn.Parameter(torch.randn(depth, num_state_tokens, dim) * 0.1)
        self.head = nn.Linear(dim, num_tokens)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """(b, n) tokens -> (logits (b, n, num_tokens), final state of every block)"""
        x = self.emb(tokens)
        states = [state.expand(x.shape[0], -1, -1) for state in self.init_state]
        outputs = []

        for start in range(0, x.shape[1], self.segment_len):
            h = x[:, start:start + self.segment_len]
            segment_mask = mask[:, start:start + self.segment_len] if mask is not None else None

            for layer, block in enumerate(self.blocks):
                h, states[layer] = block(h, states[layer], start, segment_mask)

            outputs.append(h)

        return self.head(torch.cat(outputs, dim = 1)), states
