from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from torch import nn
from x_transformers import Decoder, Encoder, TransformerWrapper

NUM_TOKENS = 256
MAX_SEQ_LEN = 64
ROOT = Path(__file__).resolve().parent.parent  # the repository

# tiny models gain nothing from intra-op threads; on a shared, loaded machine the spinning
# threads made every small matmul ~100x slower (the HF tests went from 20 s to 140 s)
torch.set_num_threads(1)

@pytest.fixture(autouse = True)
def seed():
    torch.manual_seed(0)

def decoder(dim: int = 32, depth: int = 4, heads: int = 2, num_tokens: int = NUM_TOKENS, **kwargs) -> TransformerWrapper:
    return TransformerWrapper(
        num_tokens = num_tokens,
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

# training data and comparisons of what a composition learned

def counting_sequences(num: int = 32, seed: int = 0, vocab: int = NUM_TOKENS, length: int = 12) -> list[dict[str, torch.Tensor]]:
    """Counting sequences with random starts and strides; rows padded at the end by varying amounts,
    so that micro-batches hold different numbers of tokens."""
    generator = torch.Generator().manual_seed(seed)
    data = []

    for index in range(num):
        start, stride = torch.randint(0, vocab, (2,), generator = generator).tolist()
        seq = (start + stride * torch.arange(length)) % vocab
        data.append(dict(seq = seq, mask = torch.arange(length) < length - (index % 4)))

    return data

def composition(calm) -> dict[str, torch.Tensor]:
    return {key: tensor.detach().clone() for key, tensor in calm.composition_state_dict().items()}

def frozen(calm) -> dict[str, torch.Tensor]:
    return {key: tensor.clone() for key, tensor in calm.state_dict().items() if not key.startswith('cross_attns.')}

def assert_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert different == []

def assert_close(a: dict, b: dict, atol: float = 1e-5):
    assert a.keys() == b.keys()
    worst = max((a[key] - b[key]).abs().max().item() for key in a)
    assert worst <= atol, worst

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]
