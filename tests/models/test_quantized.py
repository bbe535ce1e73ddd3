from __future__ import annotations

import pytest
import torch
from torch.nn import Linear, Parameter

from calm_pytorch import CALM, AugmentParams, FineTuner

from hf_models import VOCAB, llama
from conftest import counting_sequences, decoder

# frozen models quantized with torchao (int8 weights, computed on CPU): quantization replaces the
# weight of every Linear with a tensor subclass and leaves the modules, hence the blocks, the
# hooks and the discovery of layers, as they were

torchao_quantization = pytest.importorskip('torchao.quantization', reason = 'needs torchao, in the test extra: pip install -e ".[test]"')

def quantized(model):
    torchao_quantization.quantize_(model, torchao_quantization.Int8WeightOnlyConfig())
    return model.eval()

def models():
    torch.manual_seed(1234)
    return quantized(llama(dim = 32, depth = 2)), quantized(decoder(dim = 16, depth = 4, num_tokens = VOCAB))

def compose(anchor, augment, init_seed: int = 0) -> CALM:
    torch.manual_seed(init_seed)
    return CALM(anchor, AugmentParams(model = augment, connections = ((2, 1), (4, 2))), attn_kwargs = dict(heads = 2, dim_head = 8))

def raw_tensors(tensor) -> list[torch.Tensor]:
    # the plain tensors a quantized tensor is made of (int8 data, scales, ...)
    if type(tensor) in (torch.Tensor, Parameter):
        return [tensor.detach().clone()]

    names, _ = tensor.__tensor_flatten__()
    return [inner for name in names for inner in raw_tensors(getattr(tensor, name))]

def snapshot(*models) -> list[torch.Tensor]:
    return [inner for model in models for tensor in (*model.parameters(), *model.buffers()) for inner in raw_tensors(tensor)]

PROMPT = torch.arange(12).reshape(2, 6) % VOCAB

def test_untrained_composition_returns_the_quantized_anchors_logits():
    anchor, augment = models()
    assert all(type(module.weight) is not Parameter for module in anchor.modules() if isinstance(module, Linear))

    calm = compose(anchor, augment)

    with torch.no_grad():
        assert torch.equal(calm(PROMPT, return_loss = False), anchor(PROMPT).logits)

    # quantized models are frozen whole, their embeddings and norms included
    assert [name for name, param in calm.named_parameters() if param.requires_grad and not name.startswith('cross_attns.')] == []

def test_training_generation_and_checkpoint_over_quantized_models(tmp_path):
    anchor, augment = models()
    before = snapshot(anchor, augment)
    calm = compose(anchor, augment)
    initial = {key: value.clone() for key, value in calm.composition_state_dict().items()}

    tuner = FineTuner(calm, counting_sequences(16, vocab = VOCAB), num_train_steps = 6, batch_size = 4, learning_rate = 1e-2, progress = False, device = 'cpu')
    history = tuner.train()

    assert all(torch.isfinite(torch.tensor([record['loss'] for record in history])))
    assert all(not torch.equal(initial[key], value) for key, value in calm.composition_state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(anchor, augment)))

    # generation: cached decoding agrees with recomputing the whole composition
    calm.eval()
    cached = calm.generate(PROMPT, max_new_tokens = 5, temperature = 0.)
    assert torch.equal(cached, calm.generate(PROMPT, max_new_tokens = 5, temperature = 0., use_cache = False))

    # the checkpoint holds the composition only, and restores it over the same quantized models
    path = calm.save(tmp_path / 'composition.safetensors')
    restored = compose(anchor, augment, init_seed = 1)
    restored.load(path)

    with torch.no_grad():
        assert torch.equal(restored(PROMPT, return_loss = False), calm(PROMPT, return_loss = False))
