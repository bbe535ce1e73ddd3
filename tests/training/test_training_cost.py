from __future__ import annotations

import gc
import importlib.util
import sys
import weakref
from pathlib import Path

import pytest
import torch

from calm_pytorch import CALM, AugmentParams
from conftest import decoder, tokens

# the benchmark's hand-written limit must do exactly the work CALM does, or the ratio means nothing

BENCHMARK = Path(__file__).resolve().parents[2] / 'benchmarks' / 'training.py'
spec = importlib.util.spec_from_file_location('training_benchmark', BENCHMARK)
training = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = training  # dataclasses look their module up there
spec.loader.exec_module(training)

TINY = training.Setup(
    'tiny', dim_anchor = 32, dim_augment = 24, depth = 4, heads_anchor = 2, heads_augment = 2,
    num_tokens = 128, max_seq_len = 32, batch = 2, seq_len = 12, every = 2, heads = 2, dim_head = 16
)

@pytest.mark.parametrize('mode', ['aligned', 'context'])
@pytest.mark.parametrize('num_augments', [1, 3])
def test_limit_and_calm_compute_the_same_loss_and_gradients(mode, num_augments):
    setup = training.replace(TINY, mode = mode, num_augments = num_augments)
    cpu = torch.device('cpu')
    anchor, augments = training.build_frozen(setup, cpu)

    limit, limit_params = training.make_limit(setup, training.sharing_weights(anchor), [training.sharing_weights(augment) for augment in augments])
    calm, calm_params = training.make_calm(setup, training.sharing_weights(anchor), [training.sharing_weights(augment) for augment in augments])

    # random weights everywhere: at init the output projections are zero, and so would be most gradients
    with torch.no_grad():
        for param in limit_params:
            param.normal_(std = 0.2)

    calm.cross_attns.load_state_dict(limit.cross_attns.state_dict())

    batch = training.batch_for(setup, cpu)

    limit_loss = limit(**batch)
    limit_loss.backward()

    calm_loss = calm(**batch)
    calm_loss.backward()

    assert torch.allclose(limit_loss, calm_loss, atol = 1e-5, rtol = 0)

    for limit_param, calm_param in zip(limit_params, calm_params):
        assert limit_param.grad is not None and limit_param.grad.abs().sum() > 0
        assert torch.allclose(limit_param.grad, calm_param.grad, atol = 1e-5, rtol = 1e-5)

    assert all(param.grad is None for param in (*anchor.parameters(), *(p for augment in augments for p in augment.parameters())))

def watch_augment_blocks(calm: CALM, index: int = 0):
    """Weak references to each augment block's output, kept by a hook that runs before CALM's."""
    refs, fired = {}, []

    for layer, sites in enumerate(calm.augment_adapters[index].layers, start = 1):
        def hook(module, args, output, layer = layer):
            fired.append(layer)
            refs[layer] = weakref.ref(output)

        sites.output.module.register_forward_hook(hook, prepend = True)

    return refs, fired

def test_recording_keeps_only_the_connected_hidden_states_and_none_after_backward():
    calm = CALM(decoder(dim = 32, depth = 4), AugmentParams(model = decoder(dim = 24, depth = 8), connections = ((2, 2), (5, 4))), attn_kwargs = dict(heads = 2, dim_head = 16))
    refs, fired = watch_augment_blocks(calm)

    loss = calm(tokens())

    # the augment stopped after its deepest connected layer, 5 of 8
    assert fired == [1, 2, 3, 4, 5]

    # between forward and backward, the only augment hidden states alive are the connected ones
    # (held by the autograd graph of their cross-attentions); the recorder holds none itself
    alive = {layer for layer, ref in refs.items() if ref() is not None}
    assert alive == {2, 5}
    assert calm.recorders[0].call.recording is None and calm.injector.call.contexts is None

    loss.backward()

    assert all(ref() is None for ref in refs.values())

def live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if torch.is_tensor(obj))

def test_training_steps_leave_no_tensors_behind():
    calm = CALM(decoder(dim = 32, depth = 4), AugmentParams(model = decoder(dim = 24, depth = 8)), attn_kwargs = dict(heads = 2, dim_head = 16))
    optimizer = torch.optim.AdamW(calm.cross_attns.parameters(), lr = 1e-3)
    seq, prompt = tokens(), tokens(length = 10)

    def step(**kwargs):
        calm(seq, **kwargs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none = True)

    # the first steps create the optimizer state; later ones must not add a tensor
    step(), step(prompt = prompt)
    before = live_tensors()

    for _ in range(3):
        step()
        step(prompt = prompt)

    assert live_tensors() == before
