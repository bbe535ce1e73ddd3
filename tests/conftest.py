from __future__ import annotations

import pytest
import torch
from torch import nn
from x_transformers import Decoder, Encoder, TransformerWrapper

NUM_TOKENS = 256
MAX_SEQ_LEN = 64

# tiny models gain nothing from intra-op threads; on a shared, loaded machine the spinning
# threads made every small matmul ~100x slower (the HF tests went from 20 s to 140 s)
torch.set_num_threads(1)

@pytest.fixture(autouse = True)
def seed():
    torch.manual_seed(0)

def decoder(dim: int = 32, depth: int = 4, heads: int = 2, **kwargs) -> TransformerWrapper:
    return TransformerWrapper(
        num_tokens = NUM_TOKENS,
        max_seq_len = MAX_SEQ_LEN,
        attn_layers = Decoder(dim = dim, depth = depth, heads = heads, attn_dim_head = 16, **kwargs)
    )

def encoder(dim: int = 24, depth: int = 4, heads: int = 2, **kwargs) -> TransformerWrapper:
    return TransformerWrapper(
        num_tokens = NUM_TOKENS,
        max_seq_len = MAX_SEQ_LEN,
        attn_layers = Encoder(dim = dim, depth = depth, heads = heads, attn_dim_head = 16, **kwargs)
    )

def tokens(batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, NUM_TOKENS, (batch, length))

@pytest.fixture
def anchor():
    return decoder(dim = 32, depth = 4)

@pytest.fixture
def augment():
    return decoder(dim = 24, depth = 8)

class TupleBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.Linear(dim, dim)

    def forward(self, x, scale = 1.):
        return self.net(x).tanh() * scale + x, 'extra'

class TupleModel(nn.Module):
    # a generic model whose blocks return tuples and are given by the user
    def __init__(self, dim = 16, depth = 3, num_tokens = 256):
        super().__init__()
        self.emb = nn.Embedding(num_tokens, dim)
        self.blocks = nn.ModuleList([TupleBlock(dim) for _ in range(depth)])
        self.head = nn.Linear(dim, num_tokens)
        self.extras = []

    def forward(self, x):
        x = self.emb(x)
        for block in self.blocks:
            x, extra = block(x)
            self.extras.append(extra)
        return self.head(x)
