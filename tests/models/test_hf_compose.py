from __future__ import annotations

import pytest
import torch
from hf_models import ENCODERS, gpt2, llama, transformers

from calm_pytorch import CALM, AugmentParams

ATTN = dict(heads = 2, dim_head = 16)

def randomize(calm: CALM):
    # a composition that adds something, so that equalities below are not trivially true
    with torch.no_grad():
        for blocks in calm.cross_attns:
            for cross_attn in blocks:
                cross_attn.to_out.weight.normal_()

def tokens(batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(3, 100, (batch, length))

def test_llama_anchor_with_gpt2_aligned_and_bert_plus_vit_in_context():
    anchor = llama(depth = 4).eval()
    bert, vit = ENCODERS['bert'].build(), ENCODERS['vit'].build()
    seq = tokens()
    plain = anchor(seq).logits

    # aligned: the augment reads the anchor's tokens
    aligned = CALM(anchor, gpt2(depth = 4), attn_kwargs = ATTN)
    assert torch.equal(aligned(seq, return_loss = False), plain)
    aligned.remove_hooks()

    # context: a document for the encoder and an image for the vision model, together
    calm = CALM(anchor, [bert, AugmentParams(model = vit, connections = ((1, 2), (2, 4)))], attn_kwargs = ATTN)
    document, image = tokens(length = 5), torch.randn(2, 3, 16, 16)
    document_mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])

    assert torch.equal(calm(seq, prompt = [document, image], prompt_mask = [document_mask, None], return_loss = False), plain)

    randomize(calm)
    loss = calm(seq, prompt = [document, image], prompt_mask = [document_mask, None])
    loss.backward()
    assert all(param.grad is not None for param in calm.cross_attns.parameters())

    # a bidirectional encoder would show the anchor the future in aligned mode
    with pytest.raises(ValueError, match = r'augment 0 \(BertModel\) is not causal'):
        calm(seq, prompt = [None, image])

    # a vision model cannot read the anchor's tokens
    with pytest.raises(ValueError, match = r'takes inputs of shape \(3, 16, 16\).*`prompt=`'):
        calm(seq, prompt = [document, None])

    # raw pixels: transformers' ViT casts them itself and would read 0 to 255 as they are
    for raw in (torch.randint(0, 256, (2, 3, 16, 16), dtype = torch.uint8), image > 0):
        with pytest.raises(TypeError, match = rf'`prompt\[1\]` for augment 1 has dtype {raw.dtype}; its model reads floats'):
            calm(seq, prompt = [document, raw])

@pytest.mark.parametrize('make_augment', [gpt2, lambda: llama(dim = 24, depth = 4), ENCODERS['bert'].build, ENCODERS['t5_encoder'].build], ids = ['gpt2', 'llama', 'bert', 't5'])
def test_padding_an_augment_input_changes_nothing(make_augment):
    anchor = llama()
    calm = CALM(anchor, AugmentParams(model = make_augment(), connections = ((2, 1),)), attn_kwargs = ATTN)
    randomize(calm)

    seq, document = tokens(), tokens(length = 6)
    logits = calm(seq, prompt = document, return_loss = False)

    # right padding with its mask; and left padding, whose real tokens get their positions from the mask
    pad = torch.zeros(2, 3, dtype = torch.long)
    real, padding = torch.ones(2, 6, dtype = torch.bool), torch.zeros(2, 3, dtype = torch.bool)

    right = calm(seq, prompt = torch.cat((document, pad), dim = -1), prompt_mask = torch.cat((real, padding), dim = -1), return_loss = False)
    left = calm(seq, prompt = torch.cat((pad, document), dim = -1), prompt_mask = torch.cat((padding, real), dim = -1), return_loss = False)

    assert torch.allclose(right, logits, atol = 1e-5)
    assert torch.allclose(left, logits, atol = 1e-5)

def test_anchor_gets_its_padding_mask_and_extra_keywords():
    anchor = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size = 128, n_embd = 32, n_layer = 2, n_head = 2, n_positions = 64)).eval()
    calm = CALM(anchor, gpt2(), attn_kwargs = ATTN)

    # a left-padded batch, as batched generation needs it
    seq = tokens()
    mask = torch.ones_like(seq, dtype = torch.bool)
    mask[0, :3] = False
    positions = (mask.long().cumsum(-1) - 1).clamp(min = 0)

    expected = anchor(seq, attention_mask = mask.long(), position_ids = positions).logits

    assert torch.equal(calm(seq, mask = mask, position_ids = positions, return_loss = False), expected)
    assert torch.equal(calm(seq, attention_mask = mask.long(), position_ids = positions, return_loss = False), expected)
    assert not torch.allclose(calm(seq, return_loss = False), expected, atol = 1e-3)

def test_augment_stops_after_its_deepest_connected_block():
    augment = gpt2(depth = 4)
    calm = CALM(llama(), AugmentParams(model = augment, connections = ((1, 1), (2, 2))), attn_kwargs = ATTN)
    calm(tokens())  # the first aligned call probes the augment for causality with full forwards

    # counted when a module starts: the block that stops the forward did run
    ran, grad_enabled = [], []
    for index, block in enumerate(augment.transformer.h):
        block.register_forward_pre_hook(lambda *_, index = index: ran.append(index) or grad_enabled.append(torch.is_grad_enabled()))
    augment.transformer.ln_f.register_forward_pre_hook(lambda *_: ran.append('final norm'))
    augment.lm_head.register_forward_pre_hook(lambda *_: ran.append('head'))

    calm(tokens()).backward()
    calm(tokens(), prompt = tokens(length = 5))

    assert ran == [0, 1, 0, 1]

    # the frozen augment runs without building a graph, even in a training step
    assert not any(grad_enabled)

def test_summary_names_the_wiring_and_counts_parameters():
    anchor, augment = llama(depth = 4), gpt2(depth = 4)
    calm = CALM(anchor, AugmentParams(model = augment, connections = ((2, 1), (4, 4))), attn_kwargs = ATTN)
    summary = calm.summary()

    trainable = sum(param.numel() for param in calm.cross_attns.parameters())
    frozen = sum(param.numel() for param in [*anchor.parameters(), *augment.parameters()])

    assert 'anchor: LlamaForCausalLM, 4 layers' in summary
    assert 'augment 0: GPT2LMHeadModel, 4 layers' in summary
    assert 'augment layer   2 (transformer.h.1 output, width 24) -> anchor layer   1 (model.layers.0 output, width 32)' in summary
    assert 'augment layer   4 (transformer.h.3 output, width 24) -> anchor layer   4 (model.layers.3 output, width 32)' in summary
    assert f'trainable: {trainable:,} parameters' in summary and f'frozen: {frozen:,}' in summary
