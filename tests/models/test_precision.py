from __future__ import annotations

import pytest
import torch
from conftest import decoder, tokens
from segment_model import SegmentLM
from torch import nn

from calm_pytorch import CALM, AugmentParams, CrossAttentionBlock

f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16

def randomize(calm):
    for blocks in calm.cross_attns:
        for block in blocks:
            nn.init.normal_(block.to_out.weight, std = 0.5)
    return calm

def snapshot(*models):
    return [{name: tensor.clone() for name, tensor in model.state_dict().items()} for model in models]

def unchanged(models, saved):
    return all(torch.equal(tensor, model.state_dict()[name]) for model, state in zip(models, saved) for name, tensor in state.items())

@pytest.mark.parametrize('anchor_dtype, augment_dtype', [(f32, f32), (bf16, bf16), (f16, f16), (bf16, f32), (f32, bf16), (bf16, f16)], ids = ['fp32', 'bf16', 'fp16', 'bf16-fp32', 'fp32-bf16', 'bf16-fp16'])
def test_models_in_any_precision_compose(anchor_dtype, augment_dtype):
    anchor, augment = decoder().to(anchor_dtype), decoder(dim = 24).to(augment_dtype)
    calm = CALM(anchor, augment)
    seq, prompt = tokens(length = 10), tokens(length = 6)

    # the composition weights are float32 by default, whatever the models
    assert {param.dtype for param in calm.cross_attns.parameters()} == {f32}

    # identity at init, exactly, in the anchor's dtype
    for kwargs in (dict(), dict(prompt = prompt)):
        logits = calm(seq, return_loss = False, **kwargs)
        assert logits.dtype == anchor_dtype
        assert torch.equal(logits, anchor(seq))

    randomize(calm)
    logits = calm(seq, return_loss = False)
    assert logits.dtype == anchor_dtype and torch.isfinite(logits).all()
    assert not torch.equal(logits, anchor(seq))

    # a training step reaches the float32 composition only
    saved = snapshot(anchor, augment)
    calm(seq, prompt = prompt).backward()

    grads = [param.grad for param in calm.cross_attns.parameters()]
    assert all(grad is not None and grad.dtype == f32 and torch.isfinite(grad).all() for grad in grads)
    assert any(grad.abs().sum() > 0 for grad in grads)
    assert unchanged((anchor, augment), saved)
    assert all(param.grad is None for param in (*anchor.parameters(), *augment.parameters()))

def test_composition_dtype_follows_the_anchor_when_asked():
    anchor = decoder().to(bf16)

    calm = CALM(anchor, decoder(dim = 24), composition_dtype = 'anchor')
    assert {param.dtype for param in calm.cross_attns.parameters()} == {bf16}

    calm = CALM(anchor, decoder(dim = 24), composition_dtype = f16)
    assert {param.dtype for param in calm.cross_attns.parameters()} == {f16}

    randomize(calm)
    logits = calm(tokens(), return_loss = False)
    assert logits.dtype == bf16 and torch.isfinite(logits).all()

    for wrong in (torch.int64, torch.float8_e4m3fn):
        with pytest.raises(ValueError, match = rf"`composition_dtype` must be a floating point torch.dtype .* or 'anchor', got {wrong}"):
            CALM(anchor, decoder(dim = 24), composition_dtype = wrong)

    with pytest.raises(TypeError, match = 'composition_dtype'):
        CALM(anchor, decoder(dim = 24), composition_dtype = 'bf16')

def test_cross_attention_casts_in_and_the_delta_back():
    block = CrossAttentionBlock(16, 8, heads = 2, dim_head = 8)
    nn.init.normal_(block.to_out.weight)

    x, context = torch.randn(2, 5, 16), torch.randn(2, 7, 8)
    reference = block(x, context, causal = True)

    delta = block(x.to(bf16), context.to(f16), causal = True)
    assert delta.dtype == bf16

    # computed in float32 from inputs rounded to bf16 / fp16: close to the float32 delta
    assert torch.allclose(delta.float(), reference, atol = 0.1, rtol = 0.05)

def test_autocast_on_cpu(anchor, augment):
    calm = CALM(anchor, augment)
    seq, prompt = tokens(length = 10), tokens(length = 6)

    with torch.autocast('cpu', dtype = bf16):
        assert torch.equal(calm(seq, return_loss = False), anchor(seq))

    randomize(calm)
    saved = snapshot(anchor, augment)

    with torch.autocast('cpu', dtype = bf16):
        logits = calm(seq, prompt = prompt, return_loss = False)
        loss = calm(seq, prompt = prompt)

    assert logits.dtype == bf16 and torch.isfinite(logits).all()
    loss.backward()

    assert all(param.grad.dtype == f32 and torch.isfinite(param.grad).all() for param in calm.cross_attns.parameters())
    assert unchanged((anchor, augment), saved)

def greedy(anchor, prompt, num):
    out = prompt
    for _ in range(num):
        out = torch.cat((out, anchor(out)[:, -1].argmax(dim = -1, keepdim = True)), dim = -1)
    return out[:, prompt.shape[-1]:]

def test_generation_in_bf16():
    anchor, augment = decoder().to(bf16), decoder(dim = 24).to(bf16)
    calm = CALM(anchor, augment)
    prompt = tokens(length = 5)

    # at init the composition generates exactly what the anchor does
    assert torch.equal(calm.generate(prompt, max_new_tokens = 4, temperature = 0.), greedy(anchor, prompt, 4))

    randomize(calm)
    for kwargs in (dict(temperature = 0.), dict(temperature = 1., top_k = 5)):
        new = calm.generate(prompt, max_new_tokens = 4, prompt = tokens(length = 6), **kwargs)
        assert new.shape == (2, 4) and new.dtype == torch.long and ((0 <= new) & (new < 256)).all()

def test_segment_recurrent_anchor_in_bf16_with_a_float32_augment():
    anchor = SegmentLM(dim = 32).to(bf16)
    calm = randomize(CALM(anchor, decoder(dim = 24), anchor_transformer_blocks = anchor.blocks))
    logits = calm(tokens(length = 10), return_loss = False)
    assert logits.dtype == bf16 and torch.isfinite(logits).all()

def test_float_context_is_cast_to_the_augments_dtype(anchor):
    class Patches(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

        def forward(self, images):
            x = images.flatten(2).transpose(1, 2)  # (b, 4, 2, 2) -> (b, 4 positions, 4 channels)
            for block in self.blocks:
                x = block(x).relu()
            return x

    seen = []
    model = Patches().to(bf16)
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    calm = randomize(CALM(anchor, AugmentParams(model = model, transformer_blocks = model.blocks, input_shape = (4, 2, 2))))

    # a float64 image for a bf16 encoder: cast on the way in
    logits = calm(tokens(), prompt = torch.randn(2, 4, 2, 2, dtype = torch.float64), return_loss = False)

    assert seen[-1] == bf16
    assert logits.dtype == f32 and torch.isfinite(logits).all()

def test_the_loss_of_a_bf16_anchor_is_computed_in_float32():
    # as transformers computes its models' loss, and as FineTuner's next_token_loss does: a bf16
    # log-softmax keeps about 3 digits, and the two trainers reported different losses
    from hf_models import llama
    from calm_pytorch import next_token_loss

    torch.manual_seed(0)
    calm = CALM(llama().to(torch.bfloat16), decoder(dim = 24, num_tokens = 128), attn_kwargs = dict(heads = 2, dim_head = 8))
    seq = torch.randint(3, 128, (4, 33))

    with torch.no_grad():
        logits = calm(seq[:, :-1], return_loss = False)
        expected = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), seq[:, 1:].flatten())
        loss = calm(seq)
        hf_loss = calm(input_ids = seq, labels = seq).loss
        summed, count = next_token_loss(calm, dict(seq = seq))

    assert logits.dtype == torch.bfloat16
    assert loss.dtype == hf_loss.dtype == torch.float32
    assert torch.equal(loss, expected) and torch.equal(hf_loss, expected)
    torch.testing.assert_close(summed / count, expected, rtol = 1e-6, atol = 0)
