from __future__ import annotations

import pytest
import torch
from conftest import TupleModel, tokens
from torch import nn

from calm_pytorch import CALM, AugmentParams

class HiddensModel(nn.Module):
    # returns the hidden state after every layer, as some feature extractors do
    def __init__(self, dim = 12, depth = 4):
        super().__init__()
        self.emb = nn.Embedding(256, dim)
        self.layers = nn.ModuleList([nn.Linear(dim, dim) for _ in range(depth)])

    def forward(self, x, padding = None):
        self.padding = padding
        x = self.emb(x)
        hiddens = []
        for layer in self.layers:
            x = x + layer(x).tanh()
            hiddens.append(x)
        return hiddens

def test_model_returning_its_hiddens(anchor):
    model = HiddensModel()
    calm = CALM(anchor, AugmentParams(model = model, model_return_hiddens = True, connections = ((2, 1), (4, 4))))

    assert calm.num_augment_layers == [4]
    assert [block.to_context.in_features for block in calm.cross_attns[0]] == [12, 12]

    seq = tokens()
    assert torch.equal(calm(seq, return_loss = False), anchor(seq))

    # the per-position model is causal, so aligned mode is allowed; the context is the chosen layer
    calm.cross_attns[0][1].to_out.weight.data.normal_()
    captured = {}
    calm.cross_attns[0][1].register_forward_pre_hook(lambda module, args: captured.update(context = args[1]))
    calm(seq)

    assert torch.equal(captured['context'], model(seq[:, :-1])[3])

def test_explicit_mask_kwarg(anchor):
    model = HiddensModel()
    calm = CALM(anchor, AugmentParams(model = model, model_return_hiddens = True, mask_kwarg = 'padding'))

    prompt = tokens(length = 6)
    prompt_mask = torch.ones_like(prompt, dtype = torch.bool)
    prompt_mask[:, 4:] = False
    calm(tokens(), prompt = prompt, prompt_mask = prompt_mask)

    assert torch.equal(model.padding, prompt_mask)

def test_augment_hidden_position_input_reads_the_block_input(anchor):
    augment = TupleModel(dim = 16, depth = 3)
    calm = CALM(anchor, AugmentParams(model = augment, transformer_blocks = augment.blocks, hidden_position = 'input', connections = ((1, 2),)))

    calm.cross_attns[0][0].to_out.weight.data.normal_()
    captured = {}
    calm.cross_attns[0][0].register_forward_pre_hook(lambda module, args: captured.update(context = args[1]))
    seq = tokens()
    calm(seq, return_loss = False)

    assert torch.equal(captured['context'], augment.emb(seq))

class ConvBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding = 1)

    def forward(self, x):
        return x + self.conv(x).tanh()

class ConvNet(nn.Module):
    # a CNN whose blocks give feature maps (batch, channels, h, w)
    def __init__(self, channels: int = 8, depth: int = 2):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding = 1)
        self.blocks = nn.ModuleList([ConvBlock(channels) for _ in range(depth)])

    def forward(self, images):
        x = self.stem(images)
        for block in self.blocks:
            x = block(x)
        return x

def test_what_a_model_returning_its_hiddens_returns_is_checked(anchor):
    # a transformers output (its keys were read as layers) or one tensor (its rows were read as
    # layers) failed later, far from the option; 'input' was silently read as 'output'
    class OneTensor(HiddensModel):
        def forward(self, x, padding = None):
            return super().forward(x)[-1]

    with pytest.raises(TypeError, match = r'augment_llms\[0\] was given model_return_hiddens = True, so its output must be a list or tuple.*got a tensor of shape \(1, 2, 12\)'):
        CALM(anchor, AugmentParams(model = OneTensor(), model_return_hiddens = True))

    with pytest.raises(ValueError, match = r"augment_llms\[0\].hidden_position = 'input' needs the blocks"):
        CALM(anchor, AugmentParams(model = HiddensModel(), model_return_hiddens = True, hidden_position = 'input'))

def test_blocks_giving_feature_maps_are_refused_at_construction(anchor):
    # their width was read from the map's last axis, and the first forward failed in a reshape
    model = ConvNet()
    with pytest.raises(ValueError, match = r'layer 2 of augment_llms\[0\] \(ConvBlock\) gives hidden states of shape \(1, 8, 4, 4\)'):
        CALM(anchor, AugmentParams(model = model, transformer_blocks = model.blocks, input_shape = (3, 4, 4)))
