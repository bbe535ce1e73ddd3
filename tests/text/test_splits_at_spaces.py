from __future__ import annotations

# a text that grew by words is encoded only in the words it added, where the tokenizer splits at
# spaces (text/tokenizers.py, `splits_at_spaces`): the tokens must be exactly those of encoding the
# whole text, for every pipeline the rule accepts; the others are encoded whole

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from text_tokenizers import CORPUS, across_spaces_bpe, byte_bpe, wordpiece
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from torch import nn
from transformers import PreTrainedTokenizerFast

from calm_pytorch import CALM, AugmentParams
from calm_pytorch.text.commit import committed_text
from calm_pytorch.text.tokenizers import AugmentText, splits_at_spaces

# spaces, tabs, new lines, a no-break space, digits, punctuation, contractions, accents, combining
# marks, a character NFKC spells with a space (´), Chinese
CHARACTERS = list(" \t\n\u00a0aAbéz19.,'-!\"s") + ['\u0301', '\u00b4', '東', "'s"]

def trained(pre_tokenizer, model = 'bpe', normalizer = None, added = ()) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.Unigram() if model == 'unigram' else models.WordLevel(unk_token = '<unk>') if model == 'wordlevel' else models.BPE(unk_token = '<unk>'))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.normalizer = normalizer
    trainer = (
        trainers.UnigramTrainer(vocab_size = 150, special_tokens = ['<unk>'], unk_token = '<unk>') if model == 'unigram' else
        trainers.WordLevelTrainer(special_tokens = ['<unk>']) if model == 'wordlevel' else
        trainers.BpeTrainer(vocab_size = 300, special_tokens = ['<unk>'])
    )
    tokenizer.train_from_iterator(CORPUS * 3, trainer)
    tokenizer.add_tokens(list(added))
    return PreTrainedTokenizerFast(tokenizer_object = tokenizer, unk_token = '<unk>')

SPLITTING = {
    'byte-level BPE': byte_bpe,
    'byte-level BPE with a prefix space': lambda: trained(pre_tokenizers.ByteLevel(add_prefix_space = True)),
    'digits, then byte-level (SmolLM2)': lambda: trained(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits = True), pre_tokenizers.ByteLevel(add_prefix_space = False)]), normalizer = normalizers.NFKC()),
    'WordPiece with [CLS] and [SEP]': wordpiece,
    'metaspace unigram': lambda: trained(pre_tokenizers.Metaspace(), 'unigram'),
    'metaspace BPE, prefix on the first piece': lambda: trained(pre_tokenizers.Metaspace(prepend_scheme = 'first'), normalizer = normalizers.Lowercase()),
    'whitespace word level': lambda: trained(pre_tokenizers.Whitespace(), 'wordlevel', normalizers.BertNormalizer(lowercase = True)),
    'added tokens without spaces': lambda: trained(pre_tokenizers.ByteLevel(add_prefix_space = False), added = ('<x>', 'ab')),
}

@pytest.mark.parametrize('name', list(SPLITTING))
@settings(max_examples = 60, deadline = None, suppress_health_check = [HealthCheck.function_scoped_fixture])
@given(words = st.lists(st.lists(st.sampled_from(CHARACTERS), min_size = 1, max_size = 6).map(''.join), min_size = 2, max_size = 8))
def test_a_text_grown_by_words_encodes_as_the_whole_text(name, words):
    reader = AugmentText(SPLITTING[name](), 'tokenizer')
    assert reader.splits_at_spaces

    text = ' '.join(words)
    texts = list(dict.fromkeys(committed_text(text[:end]) for end in range(len(text) + 1)))  # as a prompt's prefixes commit them
    exact = reader.encode_batch(texts)

    assert reader.encode_growing(texts) == exact
    assert reader.encode_extending(texts[1:], [[before] for before in zip(texts[:-1], exact[:-1])]) == exact[1:]
    assert reader.encode_extending(texts[2:], [list(zip(texts[index:index + 2], exact[index:index + 2])) for index in range(len(texts) - 2)]) == exact[2:]

def test_a_text_grown_by_words_encodes_only_the_words_it_added():
    reader = AugmentText(wordpiece(), 'tokenizer')
    encoded = []
    raw_encode = reader.raw_encode
    reader.raw_encode = lambda texts, special: encoded.extend(texts) or raw_encode(texts, special)

    earlier = [(text, reader.encode_batch([text])[0]) for text in ('the cat sat on the', 'the cat sat on the mat')]
    texts = ['the cat sat on the mat and then', 'the cat sat on the mat, then', 'the cat sat on the mat.then', 'a different text']
    encoded.clear()

    tokens = reader.encode_extending(texts, [earlier] * len(texts))

    # the longest earlier text each extends by a space; what extends none is encoded whole
    assert encoded == ['a different text', ' and then', ' mat, then', ' mat.then']
    assert tokens == reader.encode_batch(texts)

def test_a_token_added_later_with_a_space_is_read_before_encoding():
    tokenizer = trained(pre_tokenizers.ByteLevel(add_prefix_space = False))
    reader = AugmentText(tokenizer, 'tokenizer')
    assert reader.splits_at_spaces

    tokenizer.add_tokens(['the cat'])  # the user's, after the composition was built
    before, text = 'we saw the', 'we saw the cat sat'

    assert reader.encode_extending([text], [[(before, reader.encode_batch([before])[0])]]) == reader.encode_batch([text])
    assert reader.encode_growing([before, text]) == reader.encode_batch([before, text])
    assert not reader.splits_at_spaces

def test_a_reader_pickled_before_the_rule_reads_the_pipeline_again():
    import pickle

    reader = AugmentText(byte_bpe(), 'tokenizer')
    state = {key: value for key, value in reader.__dict__.items() if key not in ('splits_at_spaces', 'checked_size')}
    old = AugmentText.__new__(AugmentText)
    old.__setstate__(pickle.loads(pickle.dumps(state)))

    assert old.encode_growing(['the', 'the cat']) == reader.encode_batch(['the', 'the cat']) and old.splits_at_spaces

def test_tokenizers_that_may_join_across_a_space_are_encoded_whole():
    llama3_expression = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

    class OwnEncoding(PreTrainedTokenizerFast):
        def _encode_plus(self, *args, **kwargs):
            return super()._encode_plus(*args, **kwargs)

    whole = {
        'merges across spaces': across_spaces_bpe(),
        "a regular expression of the tokenizer's own": trained(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(llama3_expression), 'isolated'), pre_tokenizers.ByteLevel(use_regex = False)])),
        'an added token with a space': trained(pre_tokenizers.ByteLevel(add_prefix_space = False), added = ('a b',)),
        'spaces written around Chinese characters, then read by byte-level': trained(pre_tokenizers.ByteLevel(), normalizer = normalizers.BertNormalizer()),
        'a replaced character': trained(pre_tokenizers.ByteLevel(), normalizer = normalizers.Replace('x', ' ')),
        'metaspace without splitting': trained(pre_tokenizers.Metaspace(split = False), 'unigram'),
        'a transformers class with its own encoding': OwnEncoding(tokenizer_object = byte_bpe().backend_tokenizer),
    }

    for name, tokenizer in whole.items():
        assert not splits_at_spaces(tokenizer), name

    # why it matters: merged across spaces, a grown text is not its words encoded apart
    reader = AugmentText(across_spaces_bpe(), 'tokenizer')
    assert not reader.splits_at_spaces
    assert any(reader.raw_encode([a + ' ' + b], False)[0] != reader.raw_encode([a], False)[0] + reader.raw_encode([' ' + b], False)[0] for a, b in (('the', 'cat'), ('there', 'the'), ('and', 'there')))
    assert reader.encode_growing(['the', 'the cat']) == reader.encode_batch(['the', 'the cat'])

def test_generation_encodes_each_committed_word_once():
    # counts the characters the augment's tokenizer reads: the prompt's prefixes and every step
    # encode the text once in all, instead of once per prefix (quadratic)
    anchor_tokenizer, augment_tokenizer = byte_bpe(), wordpiece()
    torch.manual_seed(0)

    def llama(vocab: int):
        config = transformers.LlamaConfig(vocab_size = vocab, hidden_size = 32, num_hidden_layers = 2, num_attention_heads = 2, num_key_value_heads = 1, intermediate_size = 64, max_position_embeddings = 256)
        return transformers.LlamaForCausalLM(config).eval()

    calm = CALM(llama(len(anchor_tokenizer)), AugmentParams(model = llama(len(augment_tokenizer)), tokenizer = augment_tokenizer, connect_every_num_layers = 1), anchor_tokenizer = anchor_tokenizer, attn_kwargs = dict(heads = 2, dim_head = 16))
    for param in calm.cross_attns.parameters():
        if param.ndim == 2:
            nn.init.normal_(param, std = 0.5)  # so that the augment changes the tokens
    calm.eval()

    reader = calm.augment_texts[0]
    encoded = []
    raw_encode = reader.raw_encode
    reader.raw_encode = lambda texts, special: encoded.extend(texts) or raw_encode(texts, special)

    text = 'the cat sat on the mat, and there the dog saw it. then they went there together'
    prompt = torch.tensor([anchor_tokenizer(text)['input_ids']])

    # the steps write words (an untrained anchor would write bytes without spaces, each of whose
    # commits is rightly encoded whole)
    words = anchor_tokenizer(' and the other one stayed at home, the cat sat there')['input_ids']

    def write(logits, step = [0]):
        step[0] += 1
        return torch.full_like(logits, float('-inf')).index_fill(-1, torch.tensor(words[step[0] - 1]), 0.)

    new = calm.generate(prompt, max_new_tokens = len(words), temperature = 0., filter_fn = write)

    final = committed_text(anchor_tokenizer.decode(torch.cat((prompt, new), dim = -1)[0]))
    assert len(final) <= sum(map(len, encoded)) <= 2 * len(final)

    # and freely generated tokens equal those recomputed at every step
    reader.raw_encode = raw_encode
    free = calm.generate(prompt, max_new_tokens = 24, temperature = 0.)
    assert torch.equal(free, calm.generate(prompt, max_new_tokens = 24, temperature = 0., use_cache = False))
