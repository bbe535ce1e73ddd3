from __future__ import annotations

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

    def __setstate__(self, state: dict):
        # pickled before `backend` existed
        self.__dict__.update(state)
        self.__dict__.setdefault('backend', fast_backend(self.tokenizer))

    def decode_batch(self, sequences: list[list[int]]) -> list[str]:
        tokenizer = self.tokenizer

        if len(sequences) == 0:
            return []

        if exists(self.backend):
            return self.backend.decode_batch(sequences, skip_special_tokens = True)

        if callable(getattr(tokenizer, 'batch_decode', None)):
            # transformers: no clean-up, which would rewrite " ." as "." depending on what follows
            return tokenizer.batch_decode(sequences, skip_special_tokens = True, clean_up_tokenization_spaces = False)

        if callable(getattr(tokenizer, 'decode_batch', None)):
            return tokenizer.decode_batch(sequences, skip_special_tokens = True)  # tokenizers.Tokenizer

        return [tokenizer.decode(ids) for ids in sequences]

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
        self.kind = 'transformers' if callable(getattr(tokenizer, 'batch_decode', None)) else 'tokenizers' if callable(getattr(tokenizer, 'encode_batch', None)) else 'plain'

        if self.kind == 'plain' and not callable(getattr(tokenizer, 'encode', None)):
            raise TypeError(f'`{name}` must offer `encode(text) -> list[int]` (a transformers or `tokenizers` tokenizer), got {type(tokenizer).__name__}')

        # a `tokenizers.Tokenizer` applies the padding and truncation it carries (`enable_padding()`,
        # or a tokenizer.json that ships them) in `encode_batch`: encode with a copy without them,
        # leaving the user's object as it is
        self.encoder = without_padding_or_truncation(tokenizer) if self.kind == 'tokenizers' else tokenizer

        self.prefix = self.leading_special_tokens() if self.kind != 'plain' else []

    def raw_encode(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        if len(texts) == 0:
            return []  # a batch of no rows (transformers cannot encode an empty batch)

        if self.kind == 'transformers':
            return self.tokenizer(texts, add_special_tokens = add_special_tokens, padding = False, truncation = False)['input_ids']

        return [encoding.ids for encoding in self.encoder.encode_batch(texts, add_special_tokens = add_special_tokens)]

    def leading_special_tokens(self) -> list[int]:
        # what the tokenizer puts before a text: compare a text with and without its special tokens
        with_special, plain = (self.raw_encode(['a'], flag)[0] for flag in (True, False))
        start = next((i for i in range(len(with_special) - len(plain) + 1) if with_special[i:i + len(plain)] == plain), 0)
        return with_special[:start]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == 'plain':
            return [list(self.tokenizer.encode(text)) for text in texts]

        return [self.prefix + ids for ids in self.raw_encode(texts, False)]

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
