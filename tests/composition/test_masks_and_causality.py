from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import MAX_SEQ_LEN, NUM_TOKENS, tokens
from hf_models import llama
from x_transformers import Decoder, TransformerWrapper

from calm_pytorch import CALM, AugmentParams, CrossAttentionBlock

def trained(calm, steps = 5, **kwargs):
    # a few steps so the cross-attention output is no longer zero
    optim = torch.optim.Adam(calm.parameters(), lr = 1e-2)
    for _ in range(steps):
        calm(tokens(length = 12), **kwargs).backward()
        optim.step()
        optim.zero_grad()

    assert any(block.to_out.weight.abs().sum() > 0 for blocks in calm.cross_attns for block in blocks)
    return calm

def test_aligned_mode_never_sees_future_tokens(anchor, augment):
    calm = trained(CALM(anchor, augment))
    calm.eval()

    seq = tokens(length = 12)
    logits = calm(seq, return_loss = False)

    for j in (3, 7, 11):
        changed = seq.clone()
        changed[:, j] = (changed[:, j] + 1) % 256
        changed_logits = calm(changed, return_loss = False)

        assert torch.allclose(changed_logits[:, :j], logits[:, :j], atol = 1e-6)
        assert not torch.allclose(changed_logits[:, j:], logits[:, j:])

def test_right_padding_the_context_changes_nothing(anchor, augment):
    calm = trained(CALM(anchor, augment), prompt = tokens(length = 8))
    seq, prompt = tokens(length = 10), tokens(length = 8)

    logits = calm(seq, prompt = prompt, return_loss = False)

    padded = F.pad(prompt, (0, 5), value = 0)
    padded_mask = F.pad(torch.ones_like(prompt, dtype = torch.bool), (0, 5), value = False)
    padded_logits = calm(seq, prompt = padded, prompt_mask = padded_mask, return_loss = False)

    assert torch.allclose(padded_logits, logits, atol = 1e-5)

def test_fully_padded_context_row_gives_anchor_logits(anchor, augment):
    calm = trained(CALM(anchor, augment), prompt = tokens(length = 8))
    seq, prompt = tokens(length = 10), tokens(length = 8)
    prompt_mask = torch.ones_like(prompt, dtype = torch.bool)
    prompt_mask[1] = False

    logits = calm(seq, prompt = prompt, prompt_mask = prompt_mask, return_loss = False)

    assert torch.isfinite(logits).all()
    assert torch.equal(logits[1], anchor(seq)[1])
    assert not torch.allclose(logits[0], anchor(seq)[0])

def test_loss_ignores_masked_and_pad_labels(anchor, augment):
    calm = CALM(anchor, augment, pad_id = 0)
    seq = tokens(length = 10)
    seq[:, 7:] = 0
    mask = seq != 0

    loss = calm(seq, mask = mask)
    logits = calm(seq[:, :-1], mask = mask[:, :-1], return_loss = False)
    expected = F.cross_entropy(logits[:, :6].reshape(-1, logits.shape[-1]), seq[:, 1:7].reshape(-1))

    assert torch.allclose(loss, expected)

    # without the mask, pad_id alone excludes the same labels
    assert torch.allclose(calm(seq), F.cross_entropy(calm(seq[:, :-1], return_loss = False)[:, :6].reshape(-1, 256), seq[:, 1:7].reshape(-1)))

def test_a_left_padded_batch_has_the_loss_of_its_rows_alone():
    # the first real token of a left-padded row is predicted from padding: it has no label, as
    # the first token of the row alone has none. (transformers models: their positions count the
    # real tokens; x-transformers ones shift a left-padded row's absolute positions in a forward)
    calm = CALM(llama(depth = 2), AugmentParams(model = llama(depth = 2), connections = ((1, 1), (2, 2))))

    with torch.no_grad():
        for block in calm.cross_attns.modules():
            if isinstance(block, CrossAttentionBlock):
                block.to_out.weight.normal_(std = 0.3)

    rows = [torch.randint(3, 100, (length,)) for length in (10, 6, 3)]
    seq = torch.stack([F.pad(row, (10 - len(row), 0), value = 7) for row in rows])
    mask = torch.stack([F.pad(torch.ones_like(row, dtype = torch.bool), (10 - len(row), 0), value = False) for row in rows])

    alone = torch.stack([calm(row[None]) * (len(row) - 1) for row in rows]).sum() / sum(len(row) - 1 for row in rows)
    torch.testing.assert_close(calm(seq, mask = mask), alone)

def test_augment_receives_the_padding_mask(anchor, augment):
    seen = {}
    augment.register_forward_pre_hook(lambda module, args, kwargs: seen.update(mask = kwargs.get('mask')), with_kwargs = True)

    calm = CALM(anchor, augment)
    prompt = tokens(length = 8)
    prompt_mask = torch.ones_like(prompt, dtype = torch.bool)
    prompt_mask[:, 5:] = False
    calm(tokens(), prompt = prompt, prompt_mask = prompt_mask)

    assert torch.equal(seen['mask'], prompt_mask)

def test_an_augment_with_memory_tokens_is_refused_in_aligned_mode_and_read_in_context_mode(anchor):
    # x-transformers prepends its memory tokens: position i of its hidden states is not token i
    augment = TransformerWrapper(num_tokens = NUM_TOKENS, max_seq_len = MAX_SEQ_LEN, num_memory_tokens = 2, attn_layers = Decoder(dim = 24, depth = 4, heads = 2, attn_dim_head = 16))
    calm = CALM(anchor, augment)
    seq = tokens(length = 10)

    for mask in (None, torch.ones_like(seq, dtype = torch.bool)):
        with pytest.raises(ValueError, match = r'augment 0 produced 12 hidden positions for 10 tokens; aligned mode'):
            calm(seq, mask = mask, return_loss = False)

    with pytest.raises(ValueError, match = r'augment 0 produced 6 hidden positions for 4 tokens'):
        calm.generate(seq[:, :4], 7)

    # in context mode every position of it is context
    assert calm(seq, prompt = tokens(length = 6)).isfinite()

class CausalMean(torch.nn.Module):
    """A block reading the mean of the positions up to each one: causal, with no mask argument."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = torch.nn.Linear(dim, dim)

    def forward(self, x):
        mean = x.cumsum(dim = 1) / torch.arange(1, x.shape[1] + 1)[None, :, None]
        return x + self.net(mean).tanh()

class MasklessLM(torch.nn.Module):
    def __init__(self, dim: int = 12, depth: int = 2):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(NUM_TOKENS, dim), torch.nn.Linear(dim, NUM_TOKENS)
        self.blocks = torch.nn.ModuleList([CausalMean(dim) for _ in range(depth)])

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

def test_an_aligned_augment_without_a_mask_argument_is_refused_left_padding(anchor):
    # it would read the padding before a short row's tokens (as context mode already refused):
    # right padding is harmless to a causal augment, left padding is refused in the forward and in
    # generation; rows without padding generate as before
    augment = MasklessLM()
    calm = CALM(anchor, AugmentParams(model = augment, transformer_blocks = augment.blocks), attn_kwargs = dict(heads = 2, dim_head = 8))
    seq = tokens(length = 7)
    right, left = torch.ones(2, 7, dtype = torch.bool), torch.ones(2, 7, dtype = torch.bool)
    right[1, 4:], left[1, :3] = False, False

    calm(seq, mask = right, return_loss = False)

    with pytest.raises(ValueError, match = r'`mask` marks padding for augment 0 \(MasklessLM\), whose forward takes no mask argument.*before real tokens'):
        calm(seq, mask = left, return_loss = False)

    with pytest.raises(ValueError, match = r'`mask` marks padding for augment 0 \(MasklessLM\)'):
        calm.generate([seq[0], seq[1, 3:]], max_new_tokens = 2, temperature = 0.)

    assert calm.generate(seq, max_new_tokens = 2, temperature = 0.).shape == (2, 2)
