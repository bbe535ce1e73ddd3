from __future__ import annotations

import warnings

import pytest
import torch
from conftest import NUM_TOKENS, decoder
from x_transformers import Decoder, TransformerWrapper

from calm_pytorch import CALM, AugmentParams

# x-transformers features that change what the composition may assume: each either composes
# exactly, or is refused naming the feature, never read wrong

ATTN = dict(heads = 2, dim_head = 16)

def wrapper(max_seq_len: int = 64, **kwargs) -> TransformerWrapper:
    layers = {key: kwargs.pop(key) for key in list(kwargs) if key not in ('num_memory_tokens', 'return_only_embed', 'use_abs_pos_emb')}
    return TransformerWrapper(num_tokens = NUM_TOKENS, max_seq_len = max_seq_len, attn_layers = Decoder(dim = 32, depth = 2, heads = 2, attn_dim_head = 16, **layers), **kwargs)

def randomised(calm: CALM) -> CALM:
    with torch.no_grad():
        for param in calm.cross_attns.parameters():
            param.normal_(std = 0.3)
    return calm.eval()

def test_a_token_shift_anchor_decodes_as_its_forward():
    # x-transformers calls such a model cacheable, but its cache keeps no shifted token: cached
    # steps gave other greedy tokens than the forward. It now recomputes, and says so once
    torch.manual_seed(0)
    calm = randomised(CALM(wrapper(shift_tokens = 1), AugmentParams(model = decoder(dim = 24, depth = 2)), attn_kwargs = ATTN))
    prompt = torch.randint(0, NUM_TOKENS, (2, 6))

    with pytest.warns(UserWarning, match = r'anchor_llm \(TransformerWrapper\) cannot decode incrementally: it shifts tokens'):
        generated = calm.generate(prompt, max_new_tokens = 6, temperature = 0.)

    seq = prompt
    for _ in range(6):
        seq = torch.cat((seq, calm(seq, return_loss = False)[:, -1].argmax(dim = -1, keepdim = True)), dim = -1)

    assert torch.equal(generated, seq[:, 6:])

def test_memory_tokens_refuse_left_padded_generation_and_decode_rows_alone():
    # x-transformers masks its memory tokens instead of a left-padded row's padding
    torch.manual_seed(0)
    calm = CALM(wrapper(num_memory_tokens = 2), AugmentParams(model = decoder(dim = 24, depth = 2), connections = ((1, 1),)), attn_kwargs = ATTN).eval()
    long, short = torch.randint(0, NUM_TOKENS, (8,)), torch.randint(0, NUM_TOKENS, (3,))

    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # it cannot cache, said elsewhere

        with pytest.raises(ValueError, match = 'anchor_llm has memory tokens, which x-transformers masks instead of the padding'):
            calm.generate([long, short], max_new_tokens = 2, temperature = 0.)

        alone = calm.generate(short[None], max_new_tokens = 3, temperature = 0.)

    seq = short[None]
    for _ in range(3):
        seq = torch.cat((seq, calm(seq, return_loss = False)[:, -1].argmax(dim = -1, keepdim = True)), dim = -1)

    assert torch.equal(alone, seq[:, 3:])

def test_max_seq_len_zero_sets_no_length_limit():
    # x-transformers' "no absolute positions, no limit": generation was refused at any length
    torch.manual_seed(0)
    calm = CALM(wrapper(max_seq_len = 0, rotary_pos_emb = True), AugmentParams(model = decoder(dim = 24, depth = 2)), attn_kwargs = ATTN)
    prompt = torch.randint(0, NUM_TOKENS, (1, 40))

    assert calm.generate(prompt, max_new_tokens = 3, temperature = 0.).shape == (1, 3)

@pytest.mark.parametrize('role', ('anchor', 'augment'))
@pytest.mark.parametrize('feature, message', [
    (dict(num_residual_streams = 2), r'has 2 residual streams \(hyper-connections'),
    (dict(cross_attend = True), r'cross-attends \(`cross_attend = True`\)'),
])
def test_features_calm_cannot_compose_are_refused_by_name(role, feature, message):
    model, other = wrapper(**feature), decoder(dim = 24, depth = 2)
    anchor, augment = (model, other) if role == 'anchor' else (other, model)
    name = 'anchor_llm' if role == 'anchor' else r'augment_llms\[0\]'

    with pytest.raises(ValueError, match = f'^{name} {message}'):
        CALM(anchor, AugmentParams(model = augment), attn_kwargs = ATTN)

def test_an_anchor_returning_embeddings_needs_a_logits_fn_and_an_augment_may():
    # its (b, n, dim) output was read as logits: "token ids" drawn from embedding features
    with pytest.raises(ValueError, match = r'^anchor_llm returns embeddings, not logits \(`return_only_embed = True`\)'):
        CALM(wrapper(return_only_embed = True), AugmentParams(model = decoder(dim = 24, depth = 2)), attn_kwargs = ATTN)

    head = torch.nn.Linear(32, NUM_TOKENS)
    calm = CALM(wrapper(return_only_embed = True), AugmentParams(model = decoder(dim = 24, depth = 2)), anchor_logits_fn = head, attn_kwargs = ATTN)
    assert calm(torch.randint(0, NUM_TOKENS, (2, 6)), return_loss = False).shape == (2, 6, NUM_TOKENS)

    CALM(decoder(dim = 32, depth = 2), AugmentParams(model = wrapper(return_only_embed = True)), attn_kwargs = ATTN)

@pytest.mark.parametrize('positions', (dict(scaled_sinu_pos_emb = True), dict(dynamic_pos_bias = True), dict(alibi_pos_bias = True)))
def test_augments_with_other_positions_read_masks_as_before(positions):
    # positions from the mask go only to learned absolute ones: scaled sinusoids and relative
    # biases other than alibi take no positions per row
    layer_kwargs = {key: value for key, value in positions.items() if key != 'scaled_sinu_pos_emb'}
    augment = TransformerWrapper(
        num_tokens = NUM_TOKENS, max_seq_len = 64, scaled_sinu_pos_emb = positions.get('scaled_sinu_pos_emb', False),
        attn_layers = Decoder(dim = 24, depth = 2, heads = 2, attn_dim_head = 16, **layer_kwargs)
    )
    calm = CALM(decoder(dim = 32, depth = 2), AugmentParams(model = augment), attn_kwargs = ATTN)
    seq, mask = torch.randint(0, NUM_TOKENS, (2, 6)), torch.ones(2, 6, dtype = torch.bool)
    mask[1, 4:] = False

    assert calm(seq, mask = mask, return_loss = False).shape == (2, 6, NUM_TOKENS)
    assert calm(seq, prompt = seq, prompt_mask = mask, return_loss = False).shape == (2, 6, NUM_TOKENS)

def test_an_augment_with_absolute_positions_reads_a_left_padded_row_as_alone():
    # x-transformers counts absolute positions from the first position, padding or not: the
    # augment's hidden states of a left-padded row were those of other positions (aligned mode and a
    # context prompt), where generation already read each row as alone
    torch.manual_seed(0)
    anchor = wrapper(rotary_pos_emb = True, use_abs_pos_emb = False)  # itself the same padded or alone
    augment = decoder(dim = 24, depth = 2)
    assert augment.pos_emb.__class__.__name__ == 'AbsolutePositionalEmbedding'
    calm = randomised(CALM(anchor, [AugmentParams(model = augment), AugmentParams(model = decoder(dim = 24, depth = 2))], attn_kwargs = ATTN))

    row, document = torch.randint(0, NUM_TOKENS, (1, 5)), torch.randint(0, NUM_TOKENS, (1, 4))
    seq, prompt = torch.zeros(2, 8, dtype = torch.long), torch.zeros(2, 7, dtype = torch.long)
    seq[0], seq[1, 3:], prompt[0], prompt[1, 3:] = torch.randint(0, NUM_TOKENS, (8,)), row, torch.randint(0, NUM_TOKENS, (7,)), document
    mask, prompt_mask = torch.ones(2, 8, dtype = torch.bool), torch.ones(2, 7, dtype = torch.bool)
    mask[1, :3], prompt_mask[1, :3] = False, False

    padded = calm(seq, mask = mask, prompt = [None, prompt], prompt_mask = [None, prompt_mask], return_loss = False)
    alone = calm(row, prompt = [None, document], return_loss = False)
    assert torch.allclose(padded[1, 3:], alone[0], atol = 1e-5)
