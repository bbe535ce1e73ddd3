from __future__ import annotations

# the prompt's alignment decodes each prefix, generation each row at every step; where the anchor's
# tokenizer decodes by bytes (text/tokenizers.py, `decodes_by_bytes`) only the tokens past a prefix
# whose text ends a character are read (`AnchorText.decode_prefixes`, `decode_extending`): the
# text must be exactly the whole decode

import pickle

from hypothesis import given, settings
from hypothesis import strategies as st
from text_tokenizers import across_spaces_bpe, byte_bpe, wordpiece
from tokenizers import Tokenizer, decoders, models

from calm_pytorch.text.tokenizers import AnchorText

@settings(max_examples = 300, deadline = None)
@given(data = st.data())
def test_text_read_in_pieces_is_the_whole_text(data):
    anchor = AnchorText(byte_bpe())
    vocab = len(byte_bpe())

    # any ids: single bytes that start or continue a UTF-8 character, merges, special tokens
    rows = data.draw(st.lists(st.lists(st.integers(0, vocab - 1), max_size = 24), min_size = 1, max_size = 3))
    steps = data.draw(st.lists(st.integers(1, 4), min_size = 1, max_size = 12))
    known = [([], '')] * len(rows)

    lengths = [0] * len(rows)
    for step in steps:
        lengths = [min(length + step, len(row)) for length, row in zip(lengths, rows)]
        sequences = [row[:length] for row, length in zip(rows, lengths)]
        assert anchor.decode_extending(sequences, known) == anchor.decode_batch(sequences)

@settings(max_examples = 300, deadline = None)
@given(ids = st.lists(st.integers(0, 319), max_size = 30), data = st.data())
def test_the_prompts_prefixes_read_in_pieces_are_the_whole_texts(ids, data):
    anchor = AnchorText(byte_bpe())
    lengths = sorted(set(data.draw(st.lists(st.integers(0, len(ids)), min_size = 1, max_size = 12))))
    assert anchor.decode_prefixes(ids, lengths) == anchor.decode_batch([ids[:length] for length in lengths])

def test_the_prompts_prefixes_and_each_steps_tokens_are_read_once():
    ids = byte_bpe()('café naïve über 東京, the cat sat on the mat')['input_ids']
    lengths = list(range(1, len(ids) + 1))
    whole = AnchorText(byte_bpe()).decode_batch([ids[:length] for length in lengths])

    def counted() -> tuple[AnchorText, list[int]]:
        anchor, read = AnchorText(byte_bpe()), []
        decode_batch = anchor.decode_batch
        anchor.decode_batch = lambda sequences: read.extend(map(len, sequences)) or decode_batch(sequences)
        return anchor, read

    # the prompt's prefixes at once, then a growing row a step at a time
    anchor, prefixes_read = counted()
    assert anchor.decode_prefixes(ids, lengths) == whole

    anchor, steps_read = counted()
    known = [([], '')]
    assert [anchor.decode_extending([ids[:length]], known)[0] for length in lengths] == whole

    # tokens are read again only while a character is incomplete; each prefix whole would read
    # len(ids) * (len(ids) + 1) / 2
    for read in (prefixes_read, steps_read):
        assert len(ids) <= sum(read) <= 2 * len(ids)

def test_a_row_that_changed_is_read_whole():
    anchor = AnchorText(byte_bpe())
    first, other = (byte_bpe()(text)['input_ids'] for text in ('the cat sat', 'a dog ran off'))
    known = [([], '')]

    anchor.decode_extending([first], known)
    assert anchor.decode_extending([other], known) == anchor.decode_batch([other])

def test_other_decoders_read_every_row_whole():
    assert AnchorText(byte_bpe()).by_bytes

    # WordPiece joins pieces with spaces; a BPE without a byte-level decoder gives its pieces as they are
    for tokenizer in (wordpiece(), across_spaces_bpe(), Tokenizer(models.BPE())):
        anchor = AnchorText(tokenizer)
        assert not anchor.by_bytes

    raw = Tokenizer(models.BPE())
    raw.decoder = decoders.ByteLevel()
    assert AnchorText(raw).by_bytes  # a `tokenizers.Tokenizer` itself

def test_a_reader_pickled_before_by_bytes_reads_the_decoder_again():
    anchor = AnchorText(byte_bpe())
    del anchor.by_bytes
    assert pickle.loads(pickle.dumps(anchor)).by_bytes
