from __future__ import annotations

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
