from __future__ import annotations

import pytest
import torch
from text_tokenizers import byte_bpe, wordpiece
from tokenizers import Tokenizer
from torch import nn
from x_transformers import Decoder, TransformerWrapper

from calm_pytorch import CALM, AugmentParams
from calm_pytorch.text.tokenizers import AnchorText

# aligned mode across tokenizers encodes every prefix of a row in one batch: a tokenizer that pads
# (to the longest text of that batch, or to a fixed length) or truncates, as a `tokenizers.Tokenizer`
# configured with `enable_padding()` / `enable_truncation()` or loaded from a tokenizer.json that
# ships them does, must read exactly as the same tokenizer without those settings

def raw_wordpiece(padding: dict | None = None, truncation: int | None = None) -> Tokenizer:
    tokenizer = Tokenizer.from_str(wordpiece().backend_tokenizer.to_str())

    if padding is not None:
        tokenizer.enable_padding(pad_id = tokenizer.token_to_id('[PAD]'), pad_token = '[PAD]', **padding)

    if truncation is not None:
        tokenizer.enable_truncation(max_length = truncation)

    return tokenizer

SETTINGS = {
    'pad_to_longest': dict(padding = {}),
    'pad_and_truncate_to_8': dict(padding = dict(length = 8), truncation = 8),  # a tokenizer.json's fixed padding / truncation
    'truncate_to_4': dict(truncation = 4),
}

def composition(augment_tokenizer) -> CALM:
    torch.manual_seed(0)
    anchor = TransformerWrapper(num_tokens = len(byte_bpe()), max_seq_len = 256, attn_layers = Decoder(dim = 32, depth = 2, heads = 2, attn_dim_head = 16))
    augment = TransformerWrapper(num_tokens = wordpiece().backend_tokenizer.get_vocab_size(), max_seq_len = 256, attn_layers = Decoder(dim = 24, depth = 2, heads = 2, attn_dim_head = 16))
    calm = CALM(anchor, AugmentParams(model = augment, tokenizer = augment_tokenizer, connect_every_num_layers = 1), anchor_tokenizer = byte_bpe(), attn_kwargs = dict(heads = 2, dim_head = 16))

    for param in calm.cross_attns.parameters():
        if param.ndim == 2:
            nn.init.normal_(param, std = 0.2)

    return calm.eval()

def ids(text: str) -> torch.Tensor:
    return torch.tensor([byte_bpe()(text)['input_ids']])

TEXT = 'the cat sat on the mat, and there the dog saw it'

@pytest.mark.parametrize('setting', SETTINGS)
def test_a_padding_or_truncating_tokenizer_reads_as_the_same_tokenizer_without_those_settings(setting):
    tokens = ids(TEXT)

    with torch.no_grad():
        expected = composition(raw_wordpiece())(tokens, return_loss = False)
        configured = raw_wordpiece(**SETTINGS[setting])
        logits = composition(configured)(tokens, return_loss = False)

    assert torch.equal(logits, expected)

    # the user's tokenizer keeps its own settings
    assert (configured.padding is not None) == ('padding' in SETTINGS[setting])
    assert (configured.truncation is not None) == ('truncation' in SETTINGS[setting])

@pytest.mark.parametrize('setting', SETTINGS)
def test_later_text_does_not_reach_earlier_positions_through_padding(setting):
    calm = composition(raw_wordpiece(**SETTINGS[setting]))
    short, long = ids('the cat sat on the'), ids('the cat sat on the mat, and there the dog saw it together')
    kept = short.shape[-1]
    assert torch.equal(long[:, :kept], short)

    with torch.no_grad():
        short_logits, long_logits = (calm(seq, return_loss = False) for seq in (short, long))

    assert torch.allclose(long_logits[:, :kept], short_logits, atol = 1e-5)  # shapes differ: equal up to float order

@pytest.mark.parametrize('make', (byte_bpe, wordpiece), ids = ('byte_bpe', 'wordpiece'))
def test_the_anchor_text_of_a_fast_tokenizer_is_its_batch_decode(make):
    tokenizer = make()
    rows = [tokenizer('the cat sat on the mat')['input_ids'], [tokenizer.pad_token_id] + tokenizer('then, they went')['input_ids'], []]
    expected = tokenizer.batch_decode(rows, skip_special_tokens = True, clean_up_tokenization_spaces = False)

    # generation decodes every row each step: straight through the `tokenizers.Tokenizer`
    fast = AnchorText(tokenizer)
    assert fast.backend is tokenizer.backend_tokenizer and fast.decode_batch(rows) == expected

    # a tokenizer whose `_decode` does more is decoded through transformers
    class Cleaning(type(tokenizer)):
        def _decode(self, token_ids, **kwargs):
            return super()._decode(token_ids, **kwargs).upper()

    cleaning = AnchorText(Cleaning(tokenizer_object = tokenizer.backend_tokenizer))
    assert cleaning.backend is None and cleaning.decode_batch(rows) == [text.upper() for text in expected]
