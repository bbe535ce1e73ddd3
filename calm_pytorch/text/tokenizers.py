from __future__ import annotations

import json
import sys
from typing import Any

from calm_pytorch.helpers import exists

# the two tokenizers of aligned mode across tokenizers (see text/alignment.py): the anchor's
# decodes its token ids to text, the augment's encodes that text its own way

class AnchorText:
    """The anchor's tokenizer, seen as `decode`: token ids -> text. A transformers tokenizer, a
    `tokenizers.Tokenizer`, or any object with `decode(ids) -> str`."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

        if not callable(getattr(tokenizer, 'decode', None)):
            raise TypeError(f'`anchor_tokenizer` must offer `decode(ids) -> str` (a transformers or `tokenizers` tokenizer), got {type(tokenizer).__name__}')

        self.backend = fast_backend(tokenizer)
        self.by_bytes = decodes_by_bytes(self.backend if exists(self.backend) else tokenizer)

    def __setstate__(self, state: dict):
        # pickled before `backend` and `by_bytes` existed
        self.__dict__.update(state)
        self.__dict__.setdefault('backend', fast_backend(self.tokenizer))
        self.__dict__.setdefault('by_bytes', decodes_by_bytes(self.backend if exists(self.backend) else self.tokenizer))

    def decode_batch(self, sequences: list[list[int]]) -> list[str]:
        tokenizer = self.tokenizer

        if len(sequences) == 0:
            return []

        if exists(self.backend):
            return self.backend.decode_batch(sequences, skip_special_tokens = True)

        if callable(getattr(tokenizer, 'batch_decode', None)):
            # transformers: no clean-up, which would rewrite " ." as "." depending on what follows
            return tokenizer.batch_decode(sequences, skip_special_tokens = True, clean_up_tokenization_spaces = False)

        if is_tokenizers_tokenizer(tokenizer):
            return tokenizer.decode_batch(sequences, skip_special_tokens = True)

        return [tokenizer.decode(ids) for ids in sequences]

    def decode_prefixes(self, tokens: list[int], lengths: list[int]) -> list[str]:
        """The texts of `tokens[:length]` for each of the ascending `lengths`. Where the decoder goes
        by bytes (`decodes_by_bytes`), each piece between two lengths is decoded once and added to
        the text before it when that text ends a character (else the piece is read again from
        where it did): linear in the tokens instead of quadratic."""

        if not self.by_bytes:
            return self.decode_batch([tokens[:length] for length in lengths])

        bounds = list(zip([0, *lengths[:-1]], lengths))
        pieces = self.decode_batch([tokens[start:end] for start, end in bounds])

        texts = []
        clean, clean_text = 0, ''  # the longest prefix so far whose text ends a character

        for (start, end), piece in zip(bounds, pieces):
            text = clean_text + (piece if start == clean else self.decode_batch([tokens[clean:end]])[0])
            texts.append(text)

            if not text.endswith('\ufffd'):
                clean, clean_text = end, text

        return texts

    def decode_extending(self, sequences: list[list[int]], known: list[tuple[list[int], str]]) -> list[str]:
        """`decode_batch`, reading per row only the tokens past `known[row]` where the decoder goes
        by bytes (`decodes_by_bytes`): `known[row]` holds tokens that begin the row and their text,
        ending a character. It is moved here to each row's tokens whose text ends a character too
        (no U+FFFD last, the mark of a character not yet complete), so that generation decodes each
        token about once instead of every row whole at every step."""

        if not self.by_bytes:
            return self.decode_batch(sequences)

        starts = [len(ids) if row[:len(ids)] == ids else 0 for row, (ids, _) in zip(sequences, known)]
        tails = self.decode_batch([row[start:] for row, start in zip(sequences, starts)])
        texts = [(text if start > 0 else '') + tail for (_, text), start, tail in zip(known, starts, tails)]

        for index, (row, text) in enumerate(zip(sequences, texts)):
            if not text.endswith('\ufffd'):
                known[index] = (row, text)

        return texts

class AugmentText:
    """The augment's tokenizer, seen as `encode`: text -> token ids. A transformers tokenizer or a
    `tokenizers.Tokenizer` (the special tokens it puts before a text, such as a BOS, are kept; those
    after it, such as BERT's [SEP], are left out: the text is still being read), or any object with
    `encode(text) -> list[int]`, used as it is. Padding and truncation are never applied, whatever
    the tokenizer's own settings: padding to the longest text of a batch would make each text's
    tokens depend on the other texts (later text of the same row among them), and truncation
    silently drops text."""

    def __init__(self, tokenizer: Any, name: str):
        self.tokenizer = tokenizer
        self.name = name
        self.kind = 'transformers' if callable(getattr(tokenizer, 'batch_decode', None)) else 'tokenizers' if is_tokenizers_tokenizer(tokenizer) else 'plain'

        # a str has `encode` too (to bytes): a hub id or path given for the tokenizer itself
        if isinstance(tokenizer, (str, bytes)) or self.kind == 'plain' and not callable(getattr(tokenizer, 'encode', None)):
            raise TypeError(f'`{name}` must offer `encode(text) -> list[int]` (a transformers or `tokenizers` tokenizer), got {type(tokenizer).__name__}')

        # a `tokenizers.Tokenizer` applies the padding and truncation it carries (`enable_padding()`,
        # or a tokenizer.json that ships them) in `encode_batch`: encode with a copy without them,
        # leaving the user's object as it is
        self.encoder = without_padding_or_truncation(tokenizer) if self.kind == 'tokenizers' else tokenizer

        self.prefix = self.leading_special_tokens() if self.kind != 'plain' else []
        self.splits_at_spaces, self.checked_size = False, None
        self.recheck()

    def __setstate__(self, state: dict):
        # pickled before the encoding of only what a text adds: `recheck` reads the pipeline
        self.__dict__.update({'splits_at_spaces': False, 'checked_size': None, **state})

    def raw_encode(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        if len(texts) == 0:
            return []  # a batch of no rows (transformers cannot encode an empty batch)

        if self.kind == 'transformers':
            return self.tokenizer(texts, add_special_tokens = add_special_tokens, padding = False, truncation = False)['input_ids']

        return [encoding.ids for encoding in self.encoder.encode_batch(texts, add_special_tokens = add_special_tokens)]

    def leading_special_tokens(self) -> list[int]:
        # what the tokenizer puts before a text: compare a text with and without its special tokens.
        # The text must give tokens of its own (an empty match would be found at 0): a vocabulary
        # without `a` (DNA letters, digits, another script) is probed with the next text
        for text in ('a', 'A', '0', '.', 'G', 'あ', 'а'):
            with_special, plain = (self.raw_encode([text], flag)[0] for flag in (True, False))

            if len(plain) > 0:
                start = next((i for i in range(len(with_special) - len(plain) + 1) if with_special[i:i + len(plain)] == plain), 0)
                return with_special[:start]

        return []

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == 'plain':
            return [list(self.tokenizer.encode(text)) for text in texts]

        return [self.prefix + ids for ids in self.raw_encode(texts, False)]

    def extends(self, before: str, text: str) -> bool:
        """Whether the tokens of `text` are those of `before` followed by those of the rest alone:
        `text` is `before` (ending in a non-space) and then a space, and the tokenizer splits at
        spaces (see `splits_at_spaces`)."""
        return self.splits_at_spaces and before[-1:].strip() != '' and text.startswith(before) and text[len(before):len(before) + 1] == ' '

    def encode_added(self, texts: list[str], bases: list[str | None]) -> list[list[int]]:
        """Per text, the tokens of what it adds to its base (an earlier text it `extends`), or all
        its tokens where it has none; in two batched calls."""
        full = iter(self.encode_batch([text for text, base in zip(texts, bases) if not exists(base)]))
        added = iter(self.raw_encode([text[len(base):] for text, base in zip(texts, bases) if exists(base)], False))
        return [next(added) if exists(base) else next(full) for base in bases]

    def encode_extending(self, texts: list[str], befores: list[list[tuple[str, list[int]]]]) -> list[list[int]]:
        """`encode_batch`, where each text comes with earlier texts and their tokens: a text that
        extends one of them (see `extends`; the longest is taken) encodes only what it adds.
        Generation's texts grow word by word, so a step encodes a word instead of the whole text."""

        self.recheck()
        bases = [max((before for before in candidates if self.extends(before[0], text)), key = lambda before: len(before[0]), default = None) for text, candidates in zip(texts, befores)]
        pieces = self.encode_added(texts, [base[0] if exists(base) else None for base in bases])
        return [base[1] + piece if exists(base) else piece for base, piece in zip(bases, pieces)]

    def encode_growing(self, texts: list[str], reach: int = 8) -> list[list[int]]:
        """`encode_batch` of texts that mostly extend one another (the committed texts of a prompt's
        prefixes, shortest first): each encodes what it adds to the longest of the `reach` texts
        before it that it extends, so the work is linear in the text where the tokenizer splits at
        spaces (a word followed by punctuation extends the text before the word)."""

        self.recheck()
        bases = [next((base for base in range(index - 1, max(index - reach, 0) - 1, -1) if self.extends(texts[base], text)), None) for index, text in enumerate(texts)]
        pieces = self.encode_added(texts, [texts[base] if exists(base) else None for base in bases])

        encoded = []
        for base, piece in zip(bases, pieces):
            encoded.append(encoded[base] + piece if exists(base) else piece)

        return encoded

    def vocabulary_size(self) -> int | None:
        if self.kind == 'transformers':
            return len(self.tokenizer)
        return self.tokenizer.get_vocab_size(with_added_tokens = True) if self.kind == 'tokenizers' else None

    def recheck(self):
        # tokens added to the tokenizer after it was read (`add_tokens`) may hold a space: read its
        # pipeline again whenever its vocabulary has grown, rather than split where it no longer may
        size = self.vocabulary_size()
        if size != self.checked_size:
            self.splits_at_spaces = self.kind != 'plain' and splits_at_spaces(self.tokenizer)
            self.checked_size = size

def is_tokenizers_tokenizer(tokenizer: Any) -> bool:
    # by type, not by method names: tiktoken's `Encoding` has `encode_batch` and `decode_batch`
    # too, with other arguments. Never imported here: an instance means it was imported already
    tokenizers = sys.modules.get('tokenizers')
    return exists(tokenizers) and isinstance(tokenizer, tokenizers.Tokenizer)

def fast_backend(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` behind a transformers fast tokenizer that decodes through it
    unchanged (no clean-up asked, `_decode` not overridden), else None. Generation decodes every
    row at every step: transformers' `batch_decode` first converts each row's ids, a third of
    that work."""

    if not type(tokenizer).__module__.startswith('transformers.'):
        return None

    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, PreTrainedTokenizerFast) and type(tokenizer)._decode is PreTrainedTokenizerFast._decode:
        return tokenizer.backend_tokenizer

    return None

def decodes_by_bytes(tokenizer: Any) -> bool:
    """Whether a `tokenizers.Tokenizer` decodes by bytes alone, as GPT-2's, Llama 3's and Qwen's
    do: its decoder is ByteLevel, which concatenates each token's bytes and reads them as UTF-8
    (a token that is not made of byte characters gives its own UTF-8). The text of tokens a + b is
    then the text of a followed by that of b wherever the bytes of a end a character: the
    reading restarts there, whatever follows. Other decoders are not read this way (SentencePiece's
    drops the space that starts a text, WordPiece's joins pieces with spaces)."""

    if not callable(getattr(tokenizer, 'to_str', None)):
        return False

    decoder = json.loads(tokenizer.to_str()).get('decoder')
    return exists(decoder) and decoder['type'] == 'ByteLevel'

# what a tokenizer may do and still split at spaces (see `splits_at_spaces`): normalizers that
# never turn a non-space into a space (checked over every code point for the Unicode forms),
# pre-tokenizers that split at spaces or decide each split from the characters beside it, and
# models that read one piece at a time
LOCAL_NORMALIZERS = {'NFC', 'NFD', 'NFKC', 'NFKD', 'Lowercase', 'StripAccents'}
DROPPING_PRE_TOKENIZERS = {'BertPreTokenizer', 'Whitespace', 'WhitespaceSplit'}  # leave no whitespace in any piece
LOCAL_PRE_TOKENIZERS = {'Digits', 'Punctuation'}
PIECEWISE_MODELS = {'BPE', 'WordPiece', 'WordLevel', 'Unigram'}

def splits_at_spaces(tokenizer: Any) -> bool:
    """Whether the tokenizer tokenizes `a + ' ' + b`, for `a` ending in a non-space, as the tokens
    of `a` followed by those of `' ' + b` alone. True for a `tokenizers` pipeline (or a transformers
    tokenizer that encodes through one unchanged) that splits the text at spaces before its model
    reads it (GPT-2's byte-level regular expression, BERT's pre-tokenizer, whitespace,
    SentencePiece's metaspace with `split`) and where nothing looks across that split: no regular
    expression of the tokenizer's own, no added token with a space or `rstrip`, no normalizer that
    may write a space (`Replace`, `Precompiled`, BERT's spaces around Chinese characters unless the
    pre-tokenizer drops them), and no prefix for a text that starts with a space. Anything else is
    encoded whole (Llama 3's and Qwen's expressions join punctuation to a following newline)."""

    backend = tokenizer

    if type(tokenizer).__module__.startswith('transformers.'):
        from transformers import PreTrainedTokenizerFast

        methods = ('__call__', '_encode_plus', '_batch_encode_plus')
        if not isinstance(tokenizer, PreTrainedTokenizerFast) or any(getattr(type(tokenizer), name, None) is not getattr(PreTrainedTokenizerFast, name, None) for name in methods):
            return False

        backend = tokenizer.backend_tokenizer

    if not callable(getattr(backend, 'to_str', None)):
        return False

    pipeline = json.loads(backend.to_str())

    def parts(component: dict | None, key: str) -> list[dict]:
        if not exists(component):
            return []
        return [part for member in component[key] for part in parts(member, key)] if component['type'] == 'Sequence' else [component]

    normalizers = parts(pipeline.get('normalizer'), 'normalizers')
    pre_tokenizers = parts(pipeline.get('pre_tokenizer'), 'pretokenizers')
    model = pipeline.get('model') or {}
    drops_spaces = len(pre_tokenizers) > 0 and pre_tokenizers[0]['type'] in DROPPING_PRE_TOKENIZERS

    def local_normalizer(part: dict) -> bool:
        if part['type'] == 'BertNormalizer':
            return not part.get('handle_chinese_chars') or drops_spaces
        return part['type'] in LOCAL_NORMALIZERS

    def splitting(part: dict) -> bool:
        if part['type'] == 'ByteLevel':
            return part.get('use_regex', True)
        if part['type'] == 'Metaspace':
            return part.get('split', True)
        return part['type'] in DROPPING_PRE_TOKENIZERS

    def local_pre_tokenizer(part: dict) -> bool:
        return splitting(part) or part['type'] in LOCAL_PRE_TOKENIZERS or part['type'] == 'ByteLevel'

    added = pipeline.get('added_tokens') or []

    return (
        all(map(local_normalizer, normalizers)) and
        any(map(splitting, pre_tokenizers)) and all(map(local_pre_tokenizer, pre_tokenizers)) and
        model.get('type') in PIECEWISE_MODELS and not model.get('dropout') and
        not any(token.get('rstrip') or any(char.isspace() for char in token['content']) for token in added)
    )

def without_padding_or_truncation(tokenizer: Any) -> Any:
    if getattr(tokenizer, 'padding', None) is None and getattr(tokenizer, 'truncation', None) is None:
        return tokenizer

    copy = type(tokenizer).from_str(tokenizer.to_str())
    copy.no_padding()
    copy.no_truncation()
    return copy

def same_vocabulary(anchor_tokenizer: Any, augment_tokenizer: Any) -> bool:
    """An augment whose tokenizer has the anchor's vocabulary reads the anchor's ids themselves."""

    if anchor_tokenizer is augment_tokenizer:
        return True

    get_vocab = [getattr(tokenizer, 'get_vocab', None) for tokenizer in (anchor_tokenizer, augment_tokenizer)]
    return all(callable(fn) for fn in get_vocab) and get_vocab[0]() == get_vocab[1]()

def text_readers(anchor_tokenizer: Any, augment_tokenizers: list[Any]) -> tuple[AnchorText | None, list[AugmentText | None]]:
    """What CALM keeps: the anchor's decoder, and per augment its encoder, or None where the augment
    reads the anchor's ids (no tokenizer of its own, or the anchor's vocabulary)."""

    given = [index for index, tokenizer in enumerate(augment_tokenizers) if exists(tokenizer)]

    if len(given) > 0 and not exists(anchor_tokenizer):
        raise ValueError(f'augment(s) {given} have a `tokenizer`, so they read the anchor\'s text tokenized their own way; pass the anchor\'s tokenizer too: `CALM(..., anchor_tokenizer=...)`')

    readers = [
        AugmentText(tokenizer, f'augment_llms[{index}].tokenizer') if exists(tokenizer) and not same_vocabulary(anchor_tokenizer, tokenizer) else None
        for index, tokenizer in enumerate(augment_tokenizers)
    ]

    return (AnchorText(anchor_tokenizer) if exists(anchor_tokenizer) else None), readers
