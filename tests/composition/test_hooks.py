from __future__ import annotations

import copy

import pytest
import torch
from conftest import TupleModel, decoder, encoder, tokens

from calm_pytorch import CALM, AugmentParams

def hook_counts(model):
    return {name: (len(module._forward_hooks), len(module._forward_pre_hooks)) for name, module in model.named_modules()}

def test_models_called_directly_are_untouched(anchor, augment):
    other = encoder()
    plain = [copy.deepcopy(model).eval() for model in (anchor, augment, other)]
    calm = CALM(anchor, [augment, other])
    seq = tokens()

    def direct_outputs_match():
        return all(torch.equal(model(seq), reference(seq)) for model, reference in zip((anchor, augment, other), plain))

    assert direct_outputs_match()
    calm(seq, prompt = [None, tokens(length = 6)]).backward()
    assert direct_outputs_match()

    # a direct augment call in between leaves no stale hidden state for the next composed call
    prompt = tokens(length = 6)
    before = calm(seq, return_loss = False, prompt = [None, prompt])
    augment(tokens(length = 30))
    assert all(recorder.call.recording is None for recorder in calm.recorders)
    assert torch.equal(calm(seq, return_loss = False, prompt = [None, prompt]), before)

def test_remove_hooks_restores_the_models(anchor, augment):
    anchor_hooks, augment_hooks = hook_counts(anchor), hook_counts(augment)
    flags = [param.requires_grad for param in anchor.parameters()]
    anchor.train()

    calm = CALM(anchor, augment)
    assert hook_counts(anchor) != anchor_hooks

    calm.remove_hooks()

    assert hook_counts(anchor) == anchor_hooks
    assert hook_counts(augment) == augment_hooks
    assert [param.requires_grad for param in anchor.parameters()] == flags
    assert anchor.training

    with pytest.raises(RuntimeError, match = 'remove_hooks'):
        calm(tokens())

class NormedBlock(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj, self.norm = torch.nn.Linear(dim, dim), torch.nn.BatchNorm1d(dim)

    def forward(self, x):
        return self.norm(self.proj(x).transpose(1, 2)).transpose(1, 2)

class NormedLM(torch.nn.Module):
    # a frozen model with batch norms, whose running statistics a forward in training mode updates
    def __init__(self, dim = 16, depth = 2, num_tokens = 256):
        super().__init__()
        self.embed = torch.nn.Embedding(num_tokens, dim)
        self.blocks = torch.nn.ModuleList([NormedBlock(dim) for _ in range(depth)])
        self.to_logits = torch.nn.Linear(dim, num_tokens)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.to_logits(x)

@pytest.mark.parametrize('role', ('anchor', 'augment'))
def test_building_a_composition_leaves_running_statistics_and_modes_alone(anchor, augment, role):
    normed = NormedLM(dim = 32 if role == 'anchor' else 16)
    normed.train()
    normed.blocks[1].eval()  # a model may mix modes; each submodule gets its own back
    buffers = {name: buffer.clone() for name, buffer in normed.named_buffers()}
    modes = {name: module.training for name, module in normed.named_modules()}

    calm = CALM(normed, augment, anchor_transformer_blocks = normed.blocks) if role == 'anchor' else \
        CALM(anchor, AugmentParams(model = normed, transformer_blocks = normed.blocks))

    assert all(torch.equal(buffer, buffers[name]) for name, buffer in normed.named_buffers())

    calm.remove_hooks()
    assert {name: module.training for name, module in normed.named_modules()} == modes

class OddLengthsFail(torch.nn.Module):
    # reads tokens in pairs: the 2-token dummy input passes, the 3-token causality probe fails
    def __init__(self):
        super().__init__()
        self.inner = decoder(dim = 16, depth = 2)

    def forward(self, tokens):
        assert tokens.shape[-1] % 2 == 0, 'this model reads tokens in pairs'
        return self.inner(tokens)

def test_a_failed_construction_leaves_the_models_unfrozen_and_unhooked(anchor):
    augment = OddLengthsFail()
    hooks = [hook_counts(anchor), hook_counts(augment)]
    flags = [[param.requires_grad for param in model.parameters()] for model in (anchor, augment)]

    with pytest.raises(AssertionError, match = 'pairs'):
        CALM(anchor, AugmentParams(model = augment, transformer_blocks = [layer[1] for layer in augment.inner.attn_layers.layers]))

    assert [hook_counts(anchor), hook_counts(augment)] == hooks
    assert [[param.requires_grad for param in model.parameters()] for model in (anchor, augment)] == flags

def test_failed_forward_leaves_no_stale_state(anchor, augment):
    calm = CALM(anchor, augment)
    calm.eval()
    seq, prompt = tokens(), tokens(length = 8)

    fresh = CALM(copy.deepcopy(anchor), copy.deepcopy(augment))
    fresh.cross_attns.load_state_dict(calm.cross_attns.state_dict())

    # too long for the anchor's absolute positions: a clear error before anything runs
    with pytest.raises(ValueError, match = 'max_seq_len'):
        calm(tokens(length = 100))

    # a failure inside the anchor's forward, after the augment was recorded and the context set
    def explode(module, args, output):
        raise RuntimeError('boom')

    handle = anchor.attn_layers.layers[-1][1].register_forward_hook(explode)
    with pytest.raises(RuntimeError, match = 'boom'):
        calm(seq, prompt = prompt)
    handle.remove()

    assert calm.injector.call.contexts is None
    assert all(recorder.call.recording is None for recorder in calm.recorders)
    assert torch.equal(calm(seq, prompt = prompt), fresh(seq, prompt = prompt))
    assert torch.equal(anchor(seq), fresh.anchor(seq))

def test_augment_stops_after_its_deepest_connected_block(anchor):
    augment = decoder(dim = 24, depth = 8)
    calm = CALM(anchor, AugmentParams(model = augment, connections = ((2, 2), (3, 4))))
    calm(tokens())  # the first aligned call also probes the augment for causality

    ran = []
    for index, layer in enumerate(augment.attn_layers.layers):
        layer[1].register_forward_hook(lambda *_, index = index: ran.append(index))
    augment.to_logits.register_forward_hook(lambda *_: ran.append('head'))

    calm(tokens())

    # layers alternate attention and feedforward: block 3 ends with sublayer index 5
    assert max(ran) == 5 and 'head' not in ran

def test_tuple_blocks_get_tuples_back():
    anchor, augment = TupleModel(), TupleModel()
    calm = CALM(anchor, AugmentParams(model = augment, transformer_blocks = augment.blocks), anchor_transformer_blocks = list(reversed(anchor.blocks)))

    calm.cross_attns[0][0].to_out.weight.data.normal_()
    calm(tokens(length = 6), return_loss = False)

    assert anchor.extras[-3:] == ['extra'] * 3

def test_blocks_given_in_any_order_are_numbered_by_execution():
    anchor, augment = TupleModel(depth = 4), TupleModel(depth = 4)
    blocks = [anchor.blocks[i] for i in (2, 0, 3, 1)]
    calm = CALM(anchor, AugmentParams(model = augment, transformer_blocks = augment.blocks, connections = ((1, 2),)), anchor_transformer_blocks = blocks)

    assert calm.anchor_adapter.layers[1].output.module is anchor.blocks[1]

def test_input_position_adds_the_delta_before_the_block():
    anchor, augment = TupleModel(), TupleModel()
    calm = CALM(
        anchor,
        AugmentParams(model = augment, transformer_blocks = augment.blocks, connections = ((2, 2),)),
        anchor_transformer_blocks = anchor.blocks,
        anchor_hidden_position = 'input'
    )

    calm.cross_attns[0][0].to_out.weight.data.normal_()
    seq = tokens(length = 6)

    # the delta through the pre-hook, reproduced by hand: block 2 runs on its input plus the delta
    captured = {}
    anchor.blocks[1].register_forward_pre_hook(lambda module, args: captured.update(x = args[0]))
    logits = calm(seq, return_loss = False)

    with torch.no_grad():
        x = anchor.emb(seq)
        x, _ = anchor.blocks[0](x)
        context = augment.blocks[1](augment.blocks[0](augment.emb(seq))[0])[0]
        delta = calm.cross_attns[0][0](x, context, causal = True)
        x = x + delta
        assert torch.allclose(captured['x'], x, atol = 1e-6)
        x, _ = anchor.blocks[1](x)
        x, _ = anchor.blocks[2](x)
        expected = anchor.head(x)

    assert torch.allclose(logits, expected, atol = 1e-5)
    assert not torch.allclose(logits, anchor(seq), atol = 1e-3)

def test_xtransformers_input_of_layer_one_is_the_embedding_output(anchor, augment):
    calm = CALM(anchor, augment, anchor_hidden_position = 'input')
    assert calm.anchor_adapter.layers[0].input.module is anchor.attn_layers
