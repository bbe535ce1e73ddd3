from __future__ import annotations

import pytest
import torch
from text_tokenizers import across_spaces_bpe, byte_bpe, wordpiece
from torch import nn
from x_transformers import Decoder, TransformerWrapper

from calm_pytorch import CALM, AugmentParams

# aligned mode across tokenizers at its edges: nothing committed yet, and batches of no rows

def composition(augment_tokenizer) -> CALM:
    torch.manual_seed(0)
    anchor = TransformerWrapper(num_tokens = len(byte_bpe()), max_seq_len = 256, attn_layers = Decoder(dim = 32, depth = 2, heads = 2, attn_dim_head = 16))
    augment = TransformerWrapper(num_tokens = len(augment_tokenizer), max_seq_len = 256, attn_layers = Decoder(dim = 24, depth = 2, heads = 2, attn_dim_head = 16))
    calm = CALM(anchor, AugmentParams(model = augment, tokenizer = augment_tokenizer, connect_every_num_layers = 1), anchor_tokenizer = byte_bpe(), attn_kwargs = dict(heads = 2, dim_head = 16))

    for param in calm.cross_attns.parameters():
        if param.ndim == 2:
            nn.init.normal_(param, std = 0.2)

    return calm.eval()

AUGMENT_TOKENIZERS = {'no_special_tokens': across_spaces_bpe, 'cls_first': wordpiece}

# prompts whose committed text is empty: whitespace, a BOS alone, one word that may go on
PROMPTS = {'whitespace': [byte_bpe().convert_tokens_to_ids('Ġ')], 'bos_only': [byte_bpe().bos_token_id], 'one_word': byte_bpe()('the')['input_ids']}

@pytest.mark.parametrize('augment_tokenizer', AUGMENT_TOKENIZERS)
@pytest.mark.parametrize('prompt', PROMPTS)
def test_cached_generation_starts_with_nothing_committed(augment_tokenizer, prompt):
    calm = composition(AUGMENT_TOKENIZERS[augment_tokenizer]())
    tokens = torch.tensor([PROMPTS[prompt]] * 2)

    with torch.no_grad():
        cached, uncached = (calm.generate(tokens, max_new_tokens = 6, temperature = 0., use_cache = use_cache) for use_cache in (True, False))

    assert torch.equal(cached, uncached)

    # greedy: each new token is the argmax of the forward over the text so far
    with torch.no_grad():
        logits = calm(torch.cat((tokens, cached), dim = -1), return_loss = False)

    assert torch.equal(logits[:, tokens.shape[-1] - 1:-1].argmax(-1), cached)

@pytest.mark.parametrize('augment_tokenizer', AUGMENT_TOKENIZERS)
def test_a_batch_of_no_rows_gives_no_rows(augment_tokenizer):
    calm = composition(AUGMENT_TOKENIZERS[augment_tokenizer]())
    empty = torch.zeros((0, 5), dtype = torch.long)

    with torch.no_grad():
        assert calm(empty, return_loss = False).shape == (0, 5, len(byte_bpe()))

        for use_cache in (True, False):
            assert calm.generate(empty, max_new_tokens = 3, use_cache = use_cache).shape == (0, 3)

def test_a_tokenizer_named_by_a_string_is_refused_at_construction():
    # a str has `encode` too, to bytes: it would fail only at the first aligned call
    anchor = TransformerWrapper(num_tokens = len(byte_bpe()), max_seq_len = 256, attn_layers = Decoder(dim = 32, depth = 2, heads = 2, attn_dim_head = 16))
    augment = TransformerWrapper(num_tokens = 64, max_seq_len = 256, attn_layers = Decoder(dim = 24, depth = 2, heads = 2, attn_dim_head = 16))

    with pytest.raises(TypeError, match = r'`augment_llms\[0\]\.tokenizer` must offer `encode\(text\) -> list\[int\]`.*got str'):
        CALM(anchor, AugmentParams(model = augment, tokenizer = 'bert-base-uncased'), anchor_tokenizer = byte_bpe())

def test_the_leading_special_tokens_of_a_vocabulary_without_a_are_kept():
    # the prefix (BOS, [CLS]) was found by encoding 'a' with and without special tokens; a
    # vocabulary that cannot spell it (DNA letters, no unknown token) lost its BOS
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from calm_pytorch.text.tokenizers import AugmentText

    dna = Tokenizer(models.BPE())
    dna.pre_tokenizer = pre_tokenizers.Whitespace()
    dna.train_from_iterator(['ACGT GATTACA TTAGGC CAT GCA'] * 5, trainers.BpeTrainer(vocab_size = 40, special_tokens = ['<s>', '</s>']))
    dna.post_processor = processors.TemplateProcessing(single = '<s> $A', special_tokens = [('<s>', 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object = dna, bos_token = '<s>', eos_token = '</s>')

    reader = AugmentText(tokenizer, 'augment')
    assert reader.prefix == [0]
    assert reader.encode_batch(['GATTACA CAT']) == [tokenizer('GATTACA CAT').input_ids]

class BytesWithBatchMethods:
    """A plain tokenizer (UTF-8 bytes) whose `encode_batch` / `decode_batch` take other arguments
    than `tokenizers`' (as tiktoken's `Encoding` does): only `encode` and `decode` are promised."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode(errors = 'replace')

    def encode_batch(self, texts, *, num_threads = 8):
        return [self.encode(text) for text in texts]

    def decode_batch(self, batch, *, errors = 'replace', num_threads = 8):
        return [self.decode(ids) for ids in batch]

def test_a_plain_tokenizer_with_batch_methods_of_its_own_is_read_by_encode_and_decode():
    # taken for a `tokenizers.Tokenizer` by its method names, it failed at the first call on
    # `add_special_tokens` (augment) or `skip_special_tokens` (anchor)
    plain = BytesWithBatchMethods()
    text = 'the cat sat'

    for anchor_tokenizer, augment_tokenizer in ((byte_bpe(), plain), (plain, byte_bpe())):
        anchor_vocab, augment_vocab = (256 if tokenizer is plain else len(tokenizer) for tokenizer in (anchor_tokenizer, augment_tokenizer))
        anchor = TransformerWrapper(num_tokens = anchor_vocab, max_seq_len = 64, attn_layers = Decoder(dim = 32, depth = 2, heads = 2, attn_dim_head = 16))
        augment = TransformerWrapper(num_tokens = augment_vocab, max_seq_len = 64, attn_layers = Decoder(dim = 24, depth = 2, heads = 2, attn_dim_head = 16))
        calm = CALM(anchor, AugmentParams(model = augment, tokenizer = augment_tokenizer), anchor_tokenizer = anchor_tokenizer, attn_kwargs = dict(heads = 2, dim_head = 16))

        ids = torch.tensor([anchor_tokenizer.encode(text) if anchor_tokenizer is plain else anchor_tokenizer(text).input_ids])
        assert calm(ids, return_loss = False).shape == (1, ids.shape[-1], anchor_vocab)
        assert calm.generate(ids, max_new_tokens = 2, temperature = 0.).shape == (1, 2)
