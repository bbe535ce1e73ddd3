from __future__ import annotations

import copy

import torch
from conftest import tokens
from torch import nn

from calm_pytorch import CALM

class Outer(nn.Module):
    def __init__(self, calm):
        super().__init__()
        self.calm = calm
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, seq):
        return self.calm(seq) * self.scale

def test_calm_nested_in_another_module(anchor, augment):
    outer = Outer(CALM(anchor, augment))

    optim = torch.optim.AdamW(outer.parameters(), lr = 1e-2)
    for _ in range(3):
        outer(tokens()).backward()
        optim.step()
        optim.zero_grad()

    state = outer.state_dict()

    # the standard meaning: every parameter and buffer, frozen models included
    assert set(state) == {name for name, _ in outer.named_parameters()} | {name for name, _ in outer.named_buffers()}
    assert any(name.startswith('calm.anchor.') for name in state)
    assert any(name.startswith('calm.cross_attns.') for name in state)

    # parameters(recurse = False) is only the module's own parameters
    assert list(outer.parameters(recurse = False)) == [outer.scale]
    assert list(outer.calm.parameters(recurse = False)) == []

    trainable = {name for name, param in outer.named_parameters() if param.requires_grad}
    assert trainable == {'scale'} | {f'calm.{name}' for name, _ in outer.calm.cross_attns.named_parameters(prefix = 'cross_attns')}

    other = Outer(CALM(copy.deepcopy(anchor), copy.deepcopy(augment)))
    other.load_state_dict(state)
    seq = tokens()
    assert torch.equal(other(seq), outer(seq))

def test_deepcopy_gives_an_independent_composition(anchor, augment):
    calm = CALM(anchor, augment)
    twin = copy.deepcopy(calm)

    for blocks in twin.cross_attns:
        for block in blocks:
            block.to_out.weight.data.normal_()

    seq = tokens()
    assert torch.equal(calm(seq, return_loss = False), anchor(seq))
    assert not torch.allclose(twin(seq, return_loss = False), anchor(seq))

    twin.remove_hooks()
    assert torch.equal(calm(seq, return_loss = False), anchor(seq))
    assert torch.equal(twin.anchor(seq), anchor(seq))
