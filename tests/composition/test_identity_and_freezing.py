from __future__ import annotations

import copy

import pytest
import torch
from conftest import decoder, encoder, tokens

from calm_pytorch import CALM, AugmentParams

def two_augments():
    return [AugmentParams(model = decoder(dim = 24, depth = 8)), AugmentParams(model = encoder(dim = 16, depth = 4))]

@pytest.mark.parametrize('num_augments', (1, 2))
def test_untrained_composition_returns_anchor_logits(anchor, num_augments):
    augments = [AugmentParams(model = decoder(dim = 24, depth = 8)), AugmentParams(model = decoder(dim = 16, depth = 4))][:num_augments]
    calm = CALM(anchor, augments)
    seq = tokens()

    expected = anchor(seq)

    # aligned mode: the augments read seq
    assert torch.equal(calm(seq, return_loss = False), expected)

    # context mode: the augments read their own prompt, with padding
    prompt = tokens(length = 10)
    prompt_mask = torch.ones_like(prompt, dtype = torch.bool)
    prompt_mask[0, 6:] = False
    assert torch.equal(calm(seq, prompt = prompt, prompt_mask = prompt_mask, return_loss = False), expected)

def snapshot(module):
    return {name: tensor.detach().clone() for name, tensor in (*module.named_parameters(), *module.named_buffers())}

def test_training_changes_only_the_composition(anchor):
    augments = two_augments()
    calm = CALM(anchor, augments)

    frozen = [anchor, *(augment.model for augment in augments)]
    before = [snapshot(model) for model in frozen]
    composition_before = snapshot(calm.cross_attns)

    optim = torch.optim.AdamW(calm.parameters(), lr = 3e-3, weight_decay = 0.1)
    seq, prompt = tokens(length = 12), tokens(length = 8)

    losses = []
    for _ in range(20):
        loss = calm(seq, prompt = [None, prompt])
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())

    for model, saved in zip(frozen, before):
        now = snapshot(model)
        assert all(torch.equal(now[name], saved[name]) for name in saved)
        assert all(param.grad is None for param in model.parameters())

    composition_after = snapshot(calm.cross_attns)
    assert any(not torch.equal(composition_after[name], composition_before[name]) for name in composition_before)
    assert losses[-1] < losses[0]

def test_frozen_models_run_in_eval_mode(anchor, augment):
    calm = CALM(anchor, augment)
    calm.train()

    assert calm.training and calm.cross_attns.training
    assert not anchor.training and not augment.training

    asked = CALM(decoder(), decoder(), frozen_in_eval_mode = False).train()
    assert asked.anchor.training

def test_user_params_not_mutated(anchor, augment):
    params = AugmentParams(model = augment, connect_every_num_layers = 2)
    saved = copy.copy(params.__dict__)
    CALM(anchor, params)
    assert params.__dict__ == saved
