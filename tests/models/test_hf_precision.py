from __future__ import annotations

import pytest
import torch
from hf_models import gpt2, llama

from calm_pytorch import CALM, AugmentParams

@pytest.mark.parametrize('augment_dtype', (torch.bfloat16, torch.float32))
def test_bf16_hf_anchor_composes(augment_dtype):
    anchor = llama().to(torch.bfloat16).eval()
    augment = gpt2().to(augment_dtype).eval()
    calm = CALM(anchor, AugmentParams(model = augment, connections = ((2, 1), (4, 2))), attn_kwargs = dict(heads = 2, dim_head = 16))

    seq = torch.randint(3, 128, (2, 12))

    # identity at init, in the anchor's dtype
    logits = calm(seq, return_loss = False)
    assert logits.dtype == torch.bfloat16
    assert torch.equal(logits, anchor(seq).logits)

    # a step trains the float32 composition only
    frozen = {name: param.clone() for name, param in anchor.named_parameters()}
    optim = torch.optim.AdamW(calm.parameters(), lr = 1e-2)
    loss = calm(seq)
    loss.backward()
    optim.step()

    assert torch.isfinite(loss)
    assert all(param.dtype == torch.float32 for param in calm.cross_attns.parameters())
    assert all(torch.equal(param, frozen[name]) for name, param in anchor.named_parameters())

    # and generation runs in bf16, with the anchor's cache
    new = calm.generate(seq[:, :4], max_new_tokens = 4, temperature = 0.)
    assert new.shape == (2, 4)
