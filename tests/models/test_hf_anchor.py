from __future__ import annotations

import pytest
import torch
from hf_models import DECODERS, gpt2

from calm_pytorch import CALM, AugmentParams

ATTN = dict(heads = 2, dim_head = 16)

@pytest.mark.parametrize('family', list(DECODERS))
def test_decoder_family_as_anchor(family):
    anchor, augment = DECODERS[family].build().eval(), gpt2(depth = 4)
    seq = torch.randint(3, 100, (2, 8))

    with torch.no_grad():
        plain = anchor(seq).logits

    calm = CALM(anchor, AugmentParams(model = augment, connections = ((2, 1), (4, 2))), attn_kwargs = ATTN)

    # identity at init: the zero output projections add exactly nothing
    assert torch.equal(calm(seq, return_loss = False), plain)

    # a random delta through the hooks reaches the logits
    with torch.no_grad():
        for cross_attn in calm.cross_attns[0]:
            cross_attn.to_out.weight.normal_()

    outputs = []
    last_block = calm.anchor_adapter.layers[-1].output.module
    handle = last_block.register_forward_hook(lambda module, args, output: outputs.append(output))

    assert not torch.allclose(calm(seq, return_loss = False), plain, atol = 1e-3)

    # what the next hooks and the model see: a tuple block (Falcon, Bloom) still returns a tuple of the same length
    anchor(seq)
    handle.remove()
    composed, direct = outputs
    assert type(composed) is type(direct) and (not isinstance(direct, tuple) or len(composed) == len(direct))

    # outside a CALM call the anchor is untouched
    assert torch.equal(anchor(seq).logits, plain)

    # training changes the composition weights only
    frozen = {name: tensor.clone() for name, tensor in [*anchor.state_dict().items(), *(('augment.' + k, v) for k, v in augment.state_dict().items())]}
    trained = {name: param.clone() for name, param in calm.cross_attns.named_parameters()}
    optim = torch.optim.AdamW(calm.cross_attns.parameters(), lr = 1e-2)

    for _ in range(2):
        calm(seq).backward()
        optim.step()
        optim.zero_grad()

    after = {**anchor.state_dict(), **{'augment.' + k: v for k, v in augment.state_dict().items()}}
    assert all(torch.equal(frozen[name], after[name]) for name in frozen)
    assert all(param.grad is None for param in [*anchor.parameters(), *augment.parameters()])
    assert any(not torch.equal(trained[name], param) for name, param in calm.cross_attns.named_parameters())
