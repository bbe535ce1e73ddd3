from __future__ import annotations

# tokenizers built in code (never downloaded), different enough to exercise aligned mode across
# tokenizers: a byte-level BPE (any text; a prefix of its tokens may end inside a UTF-8 character),
# a WordPiece with [CLS] / [SEP] and [UNK] (its own word splits, characters it cannot encode), and
# a BPE that merges across spaces (re-tokenizes text it has already read)

from functools import cache

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    'the cat sat on the mat, and there the dog saw it.',
    'then they went there together; the other one stayed at home.',
    'numbers like 12 and 345 are words too: a_b, x-y, (z)!',
    'café naïve über straße — déjà vu, 東京 and 北京.',
    'whitespace   runs\tand\nnew lines, and "quotes" in it.',
]

ALPHABET = sorted(set(''.join(CORPUS)) - set('東京北'))  # a few characters the WordPiece cannot encode

@cache
def byte_bpe() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space = False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size = 320, special_tokens = ['<pad>', '<bos>', '<eos>'], initial_alphabet = pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object = tokenizer, pad_token = '<pad>', bos_token = '<bos>', eos_token = '<eos>')

@cache
def wordpiece() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordPiece(unk_token = '[UNK]'))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size = 200, special_tokens = ['[PAD]', '[UNK]', '[CLS]', '[SEP]'], initial_alphabet = ALPHABET, limit_alphabet = len(ALPHABET))
    tokenizer.train_from_iterator([text.replace('東京', '').replace('北京', '') for text in CORPUS], trainer)
    cls, sep = tokenizer.token_to_id('[CLS]'), tokenizer.token_to_id('[SEP]')
    tokenizer.post_processor = processors.TemplateProcessing(single = '[CLS] $A [SEP]', special_tokens = [('[CLS]', cls), ('[SEP]', sep)])
    return PreTrainedTokenizerFast(tokenizer_object = tokenizer, pad_token = '[PAD]', unk_token = '[UNK]')

@cache
def across_spaces_bpe() -> PreTrainedTokenizerFast:
    # no pre-tokenizer: merges may span spaces, so appending text can re-tokenize what was read
    tokenizer = Tokenizer(models.BPE(unk_token = '<unk>'))
    tokenizer.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size = 260, special_tokens = ['<unk>'], initial_alphabet = ALPHABET)
    tokenizer.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object = tokenizer, unk_token = '<unk>')

def vocab_size(tokenizer) -> int:
    return len(tokenizer)
