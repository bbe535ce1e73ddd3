from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import decoder, tokens

from calm_pytorch import CALM, AugmentParams

ATTN = dict(heads = 2, dim_head = 16)

def compose(**kwargs) -> CALM:
    calm = CALM(decoder(dim = 32, depth = 2), AugmentParams(model = decoder(dim = 24, depth = 4)), attn_kwargs = kwargs.pop('attn_kwargs', ATTN), **kwargs)

    # random output projections: every composition weight then takes part in the loss
    with torch.no_grad():
        for param in calm.cross_attns.parameters():
            param.normal_(std = 0.2)

    return calm

# a batch without any label to learn from

def no_labels(calm: CALM, case: str) -> dict:
    seq = tokens(batch = 2, length = 8)

    if case == 'mask all False':
        return dict(seq = seq, mask = torch.zeros_like(seq, dtype = torch.bool))

    if case == 'every label is pad_id':
        seq[:, 1:] = calm.pad_id
        return dict(seq = seq)

    return dict(seq = seq[:0])

@pytest.mark.parametrize('case', ['mask all False', 'every label is pad_id', 'batch of size 0'])
def test_a_batch_without_labels_gives_a_zero_loss_with_zero_gradients(case):
    calm = compose(pad_id = 0)
    loss = calm(**no_labels(calm, case))

    assert torch.equal(loss, torch.tensor(0.))
    assert loss.requires_grad

    loss.backward()

    grads = [param.grad for param in calm.cross_attns.parameters()]
    assert all(grad is not None and not grad.any() for grad in grads)

def test_the_loss_of_a_partly_masked_batch_is_still_the_mean_over_its_labels():
    calm = compose()
    seq = tokens(batch = 2, length = 8)
    mask = torch.ones_like(seq, dtype = torch.bool)
    mask[0, 5:] = False

    logits = calm(seq[:, :-1], mask = mask[:, :-1], return_loss = False)
    labels = seq[:, 1:].masked_fill(~mask[:, 1:], -100)
    expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index = -100)

    assert torch.allclose(calm(seq, mask = mask), expected, atol = 1e-6)

# attn_kwargs

@pytest.mark.parametrize('attn_kwargs, error, message', [
    (dict(heads = 0, dim_head = 16), ValueError, r"`attn_kwargs\['heads'\]` must be a positive int, got 0"),
    (dict(heads = 2, dim_head = 0), ValueError, r"`attn_kwargs\['dim_head'\]` must be a positive int, got 0"),
    (dict(heads = -2, dim_head = 16), ValueError, r"`attn_kwargs\['heads'\]` must be a positive int, got -2"),
    (dict(heads = 2, dim_head = 16.), TypeError, r"`attn_kwargs\['dim_head'\]` must be a positive int, got 16.0 of type float"),
    (dict(heads = True, dim_head = 16), TypeError, r"`attn_kwargs\['heads'\]` must be a positive int, got True of type bool"),
    (dict(heads = '2', dim_head = 16), TypeError, r"got '2' of type str"),
    (dict(heads = 2, dim_heads = 16), TypeError, r"`attn_kwargs` takes \('heads', 'dim_head'\), got unknown key\(s\) \['dim_heads'\]"),
])
def test_bad_attn_kwargs_are_refused_at_construction(attn_kwargs, error, message):
    with pytest.raises(error, match = message):
        compose(attn_kwargs = attn_kwargs)

def test_numpy_integers_and_one_key_are_fine_in_attn_kwargs():
    calm = compose(attn_kwargs = dict(heads = np.int64(4)))
    block = calm.cross_attns[0][0]

    assert type(block.heads) is int and block.heads == 4
    assert block.to_q.out_features == 4 * 64  # dim_head keeps its default

# sampling

@pytest.mark.parametrize('temperature', [float('nan'), float('inf'), -1.])
def test_temperature_must_be_finite_and_not_negative(temperature):
    calm = compose()

    with pytest.raises(ValueError, match = r'`temperature` must be a finite number >= 0 \(0 is greedy\), got'):
        calm.generate(tokens(length = 4), max_new_tokens = 2, temperature = temperature)
