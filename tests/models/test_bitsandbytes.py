from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from calm_pytorch import CALM, AugmentParams, FineTuner

from hf_models import VOCAB, llama
from conftest import counting_sequences

# frozen transformers models quantized by bitsandbytes on CPU: 8-bit (LLM.int8) for the anchor,
# 4-bit NF4 for the augment. bitsandbytes swaps every Linear for its own module holding an int8
# or packed uint8 weight; the blocks, the hooks and the discovery of layers stay as they were

bitsandbytes = pytest.importorskip('bitsandbytes', reason = 'needs bitsandbytes, in the test extra: pip install -e ".[test]"')

# the 8-bit matmul logs a line per call that it casts float32 inputs to float16
logging.getLogger('bitsandbytes').setLevel(logging.ERROR)

EIGHT_BIT = BitsAndBytesConfig(load_in_8bit = True)
FOUR_BIT = BitsAndBytesConfig(load_in_4bit = True, bnb_4bit_quant_type = 'nf4')

@pytest.fixture(scope = 'module')
def saved(tmp_path_factory):
    # tiny float models saved once; each test loads its own quantized copies from them
    torch.manual_seed(1234)
    anchor_dir, augment_dir = tmp_path_factory.mktemp('anchor'), tmp_path_factory.mktemp('augment')
    llama(dim = 32).save_pretrained(anchor_dir)
    # bitsandbytes repacks 4-bit weights for CPUs with AVX512-BF16 at the first inference forward,
    # which needs every input width a multiple of 64 and every output width a multiple of 32
    llama(dim = 64, depth = 4).save_pretrained(augment_dir)
    return anchor_dir, augment_dir

def load(path, config):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config = config, device_map = 'cpu').eval()

def models(saved):
    anchor_dir, augment_dir = saved
    return load(anchor_dir, EIGHT_BIT), load(augment_dir, FOUR_BIT)

def compose(anchor, augment, init_seed: int = 0) -> CALM:
    torch.manual_seed(init_seed)
    return CALM(anchor, AugmentParams(model = augment, connections = ((2, 1), (4, 2))), attn_kwargs = dict(heads = 2, dim_head = 8))

def snapshot(*models) -> list[torch.Tensor]:
    # every tensor of the frozen models as held in memory: parameters and buffers, and beside the
    # int8 / packed 4-bit data their scales (8-bit: SCB, moved from the weight to the module's state
    # at its first forward; 4-bit: the absmax and the NF4 code book of the weight's quant_state)
    tensors = []
    for model in models:
        tensors += [tensor.detach().clone() for tensor in (*model.parameters(), *model.buffers())]
        for module in model.modules():
            weight = getattr(module, 'weight', None)
            if isinstance(weight, bitsandbytes.nn.Int8Params):
                tensors.append((weight.SCB if weight.SCB is not None else module.state.SCB).clone())
            elif isinstance(weight, bitsandbytes.nn.Params4bit):
                tensors += [weight.quant_state.absmax.clone(), weight.quant_state.code.clone()]
    return tensors

PROMPT = torch.arange(12).reshape(2, 6) % VOCAB

def test_untrained_composition_returns_the_quantized_anchors_logits(saved):
    anchor, augment = models(saved)
    assert isinstance(anchor.model.layers[0].mlp.up_proj, bitsandbytes.nn.Linear8bitLt)
    assert isinstance(augment.model.layers[0].mlp.up_proj, bitsandbytes.nn.Linear4bit)

    calm = compose(anchor, augment)

    with torch.no_grad():
        assert torch.equal(calm(PROMPT, return_loss = False), anchor(PROMPT).logits)

    # the loss reaches the composition only: the quantized models (embeddings and norms, which
    # bitsandbytes leaves in float32 and trainable, included) get no gradient
    calm(PROMPT).backward()
    with_grad = {name for name, param in calm.named_parameters() if param.grad is not None}
    assert with_grad and all(name.startswith('cross_attns.') for name in with_grad)
    assert all(param.grad is None for model in (anchor, augment) for param in model.parameters())

def test_training_generation_and_checkpoint_over_bitsandbytes_models(saved, tmp_path):
    anchor, augment = models(saved)
    calm = compose(anchor, augment)
    # after the constructor's probe forward: on CPUs with AVX512-BF16 bitsandbytes repacks the 4-bit
    # weights at their first inference forward (absmax rounded to bfloat16), which is its doing
    before = snapshot(anchor, augment)
    initial = {key: value.clone() for key, value in calm.composition_state_dict().items()}

    tuner = FineTuner(calm, counting_sequences(8, vocab = VOCAB), num_train_steps = 3, batch_size = 4, learning_rate = 1e-2, progress = False, device = 'cpu')
    history = tuner.train()

    assert all(torch.isfinite(torch.tensor([record['loss'] for record in history])))
    assert all(not torch.equal(initial[key], value) for key, value in calm.composition_state_dict().items())
    after = snapshot(anchor, augment)
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(before, after))

    # generation: cached decoding agrees with recomputing the whole composition
    calm.eval()
    cached = calm.generate(PROMPT, max_new_tokens = 5, temperature = 0.)
    assert torch.equal(cached, calm.generate(PROMPT, max_new_tokens = 5, temperature = 0., use_cache = False))

    # the checkpoint holds the composition only and restores it over freshly loaded quantized models
    path = calm.save(tmp_path / 'composition.safetensors')
    restored = compose(*models(saved), init_seed = 1)
    restored.load(path)

    with torch.no_grad():
        assert torch.equal(restored(PROMPT, return_loss = False), calm(PROMPT, return_loss = False))
