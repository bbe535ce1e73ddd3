from __future__ import annotations

import pytest
import torch
from conftest import TupleModel, decoder, tokens

from calm_pytorch import CALM, AugmentParams
from calm_pytorch.composition.wiring import default_connections

@pytest.mark.parametrize('augment_depth', range(1, 25))
def test_default_connections_take_every_fourth_layer_and_drop_none(augment_depth):
    for anchor_depth in range(1, 25):
        connections = default_connections(augment_depth, anchor_depth, every = 4)
        augment_layers = [augment_layer for augment_layer, _ in connections]
        anchor_layers = [anchor_layer for _, anchor_layer in connections]

        expected = list(range(4, augment_depth + 1, 4)) or [augment_depth]
        assert augment_layers == expected
        assert all(1 <= layer <= anchor_depth for layer in anchor_layers)
        assert anchor_layers == sorted(anchor_layers)

        # spread evenly: the deepest connected augment layer feeds the last anchor layer,
        # and distinct anchor layers are used whenever the anchor is deep enough
        assert anchor_layers[-1] == anchor_depth
        assert len(set(anchor_layers)) == min(len(expected), anchor_depth)

def test_paper_default_on_twelve_layers(anchor):
    calm = CALM(decoder(depth = 12), decoder(dim = 24, depth = 12))
    assert calm.connections == (((4, 4), (8, 8), (12, 12)),)

def test_custom_connections_are_honoured(anchor, augment):
    connections = ((1, 1), (5, 1), (8, 3))
    calm = CALM(anchor, AugmentParams(model = augment, connections = connections))

    assert calm.connections == (connections,)
    assert len(calm.cross_attns[0]) == 3

def test_several_augments_into_one_anchor_layer_are_summed_from_the_same_hidden_state():
    anchor, augments = TupleModel(), [TupleModel(), TupleModel(dim = 8)]
    calm = CALM(
        anchor,
        [AugmentParams(model = model, transformer_blocks = model.blocks, connections = ((3, 2),)) for model in augments],
        anchor_transformer_blocks = anchor.blocks
    )

    assert len(calm.injector.handles) == 1  # one injection hook at the shared site

    for blocks in calm.cross_attns:
        blocks[0].to_out.weight.data.normal_()

    seq = tokens(length = 6)
    logits = calm(seq, return_loss = False)

    with torch.no_grad():
        contexts = []
        for model in augments:
            x = model.emb(seq)
            for block in model.blocks:
                x, _ = block(x)
            contexts.append(x)

        x, _ = anchor.blocks[0](anchor.emb(seq))
        x, _ = anchor.blocks[1](x)
        deltas = [blocks[0](x, context, causal = True) for blocks, context in zip(calm.cross_attns, contexts)]
        x, _ = anchor.blocks[2](x + deltas[0] + deltas[1])
        expected = anchor.head(x)

    assert torch.allclose(logits, expected, atol = 1e-5)
