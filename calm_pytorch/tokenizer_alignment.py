from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from einops import rearrange
from torch import Tensor

from calm_pytorch.adapters import DecodeState
from calm_pytorch.helpers import exists
from calm_pytorch.injection import AugmentContext
from calm_pytorch.precision import clean_context, to_model

if TYPE_CHECKING:
    from calm_pytorch.calm import CALM

# aligned mode across tokenizers: the augment reads the text the anchor has read, tokenized its own way
#
# text:      the anchor tokenizer's decoding of the real (unpadded) anchor tokens read so far, special
#            tokens skipped, a trailing incomplete UTF-8 character (U+FFFD) left out until completed
# committed: that text up to the start of its last piece (a run of word characters, or of other
#            non-space characters) and the whitespace before it; a text ending in whitespace is
#            committed up to that whitespace. Appending text can re-tokenize the last piece
#            (" the" + "re" -> " there"), never (for tokenizers that split words apart) what is before it
# rule:      anchor position i attends to the augment's reading of the committed text of its own
#            prefix: the augment tokens of `encode(committed(text_i))`. They are a function of the
#            anchor tokens <= i, so nothing the anchor has not read can leak, and training sees
#            exactly what generation sees
#
# one pass: the augment reads the tokenization of the last position's committed text once; a
# position whose tokens are a prefix of it attends to that prefix (the augment is causal). A
# position whose tokens are not (a tokenizer that re-tokenized across a word) gets its own augment
# run, so the rule holds exactly whatever the tokenizer does
#
# axes: b - batch, n - anchor positions, r - augment runs per row, m - augment positions of a run,
#       j - augment keys (r * m), h - heads, d - feature dimension

# tokenizers

class AnchorText:
    """The anchor's tokenizer, seen as `decode`: token ids -> text. A transformers tokenizer, a
    `tokenizers.Tokenizer`, or any object with `decode(ids) -> str`."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

        if not callable(getattr(tokenizer, 'decode', None)):
            raise TypeError(f'`anchor_tokenizer` must offer `decode(ids) -> str` (a transformers or `tokenizers` tokenizer), got {type(tokenizer).__name__}')

    def decode_batch(self, sequences: list[list[int]]) -> list[str]:
        tokenizer = self.tokenizer

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
    `encode(text) -> list[int]`, used as it is."""

    def __init__(self, tokenizer: Any, name: str):
        self.tokenizer = tokenizer
        self.name = name
        self.kind = 'transformers' if callable(getattr(tokenizer, 'batch_decode', None)) else 'tokenizers' if callable(getattr(tokenizer, 'encode_batch', None)) else 'plain'

        if self.kind == 'plain' and not callable(getattr(tokenizer, 'encode', None)):
            raise TypeError(f'`{name}` must offer `encode(text) -> list[int]` (a transformers or `tokenizers` tokenizer), got {type(tokenizer).__name__}')

        self.prefix = self.leading_special_tokens() if self.kind != 'plain' else []

    def raw_encode(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        if self.kind == 'transformers':
            return self.tokenizer(texts, add_special_tokens = add_special_tokens)['input_ids']

        return [encoding.ids for encoding in self.tokenizer.encode_batch(texts, add_special_tokens = add_special_tokens)]

    def leading_special_tokens(self) -> list[int]:
        # what the tokenizer puts before a text: compare a text with and without its special tokens
        with_special, plain = (self.raw_encode(['a'], flag)[0] for flag in (True, False))
        start = next((i for i in range(len(with_special) - len(plain) + 1) if with_special[i:i + len(plain)] == plain), 0)
        return with_special[:start]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == 'plain':
            return [list(self.tokenizer.encode(text)) for text in texts]

        return [self.prefix + ids for ids in self.raw_encode(texts, False)]

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

# the committed text

def is_word_char(char: str) -> bool:
    # letters, digits and combining marks (a mark may still join the letter before it)
    return char == '_' or unicodedata.category(char)[0] in 'LNM'

def commit_point(text: str) -> int:
    """The length of the committed part of `text` (see the rule above)."""

    stripped = text.rstrip()

    if len(stripped) < len(text):
        return len(stripped)

    if len(text) == 0:
        return 0

    word = is_word_char(text[-1])
    start = len(text)

    while start > 0 and not text[start - 1].isspace() and is_word_char(text[start - 1]) == word:
        start -= 1

    return len(text[:start].rstrip())

def committed_text(text: str) -> str:
    text = text.rstrip('\ufffd')  # an incomplete UTF-8 character: text once completed
    return text[:commit_point(text)]

# the forward: augment inputs and the visibility of every anchor position

@dataclass
class Alignment:
    ids: Tensor       # (b * r, m) augment token ids, right-padded
    mask: Tensor      # (b * r, m) True for the positions the augment reads
    visible: Tensor   # (b, n, r * m) anchor position i may attend to augment key j
    runs: int

def real_rows(seq: Tensor, mask: Tensor | None) -> tuple[list[list[int]], list[list[int]]]:
    # per row: the real anchor tokens, and for each position how many of them it has read
    rows = seq.tolist()
    masks = mask.tolist() if exists(mask) else [[True] * seq.shape[-1]] * seq.shape[0]
    reals, counts = [], []

    for ids, row_mask in zip(rows, masks):
        reals.append([token for token, real in zip(ids, row_mask) if real])
        count, row_counts = 0, []

        for real in row_mask:
            count += int(real)
            row_counts.append(count)

        counts.append(row_counts)

    return reals, counts

def augment_tokens_of_prefixes(real: list[int], lengths: Sequence[int], anchor: AnchorText, augment: AugmentText) -> dict[int, list[int]]:
    """For each number of real anchor tokens read: the augment tokens of the committed text."""

    lengths = sorted(set(lengths))
    texts = [committed_text(text) for text in anchor.decode_batch([real[:length] for length in lengths])]
    distinct = list(dict.fromkeys(texts))
    encoded = dict(zip(distinct, augment.encode_batch(distinct)))
    return {length: encoded[text] for length, text in zip(lengths, texts)}

def align(seq: Tensor, mask: Tensor | None, anchor: AnchorText, augment: AugmentText) -> Alignment:
    b, n = seq.shape
    reals, counts = real_rows(seq, mask)

    runs_per_row, spans_per_row = [], []

    for real, row_counts in zip(reals, counts):
        tokens = augment_tokens_of_prefixes(real, row_counts, anchor, augment)
        full = tokens[row_counts[-1]]
        runs, spans = [full], []  # spans: per anchor position, (run, number of visible tokens)

        for count in row_counts:
            prefix = tokens[count]

            if prefix == full[:len(prefix)]:
                spans.append((0, len(prefix)))
                continue

            # the tokenizer re-tokenized across a committed piece: this position reads its own run
            if prefix not in runs:
                runs.append(prefix)

            spans.append((runs.index(prefix), len(prefix)))

        runs_per_row.append(runs)
        spans_per_row.append(spans)

    r = max(len(runs) for runs in runs_per_row)
    m = max(1, max(len(run) for runs in runs_per_row for run in runs))

    # an augment cannot read an empty sequence: an empty run reads one placeholder token, which no
    # anchor position attends to; rows with fewer runs repeat their first, equally unattended
    ids = torch.zeros((b, r, m), dtype = torch.long)
    read = torch.zeros((b, r, m), dtype = torch.bool)
    visible = torch.zeros((b, n, r, m), dtype = torch.bool)

    for row, (runs, spans) in enumerate(zip(runs_per_row, spans_per_row)):
        runs = runs + [runs[0]] * (r - len(runs))

        for index, run in enumerate(runs):
            ids[row, index, :len(run)] = torch.tensor(run, dtype = torch.long)
            read[row, index, :max(len(run), 1)] = True

        for position, (index, length) in enumerate(spans):
            visible[row, position, index, :length] = True

    return Alignment(
        ids = rearrange(ids, 'b r m -> (b r) m').to(seq.device),
        mask = rearrange(read, 'b r m -> (b r) m').to(seq.device),
        visible = rearrange(visible, 'b n r m -> b n (r m)').to(seq.device),
        runs = r
    )

def text_aligned_context(calm: CALM, index: int, seq: Tensor, mask: Tensor | None) -> AugmentContext:
    """Runs augment `index` on its own tokenization of the text of `seq` (see the rule above)."""

    adapter, recorder = calm.augment_adapters[index], calm.recorders[index]
    alignment = align(seq, mask, calm.anchor_text, calm.augment_texts[index])

    adapter.check_length(alignment.ids, f'the augment tokenization of `seq` (augment {index})')
    adapter.check_token_ids(alignment.ids, f'the augment tokenization of `seq` (augment {index}; is its tokenizer the one of its model?)')
    inputs = to_model(alignment.ids, adapter.model, 'seq')
    inputs_mask = alignment.mask.to(inputs.device)

    with torch.no_grad():
        hiddens = recorder(lambda: adapter(inputs, inputs_mask), inputs.shape[-1])

    hiddens = clean_context(hiddens, inputs_mask, f'augment {index}')
    hiddens = {key: rearrange(hidden, '(b r) m d -> b (r m) d', r = alignment.runs) for key, hidden in hiddens.items()}
    return AugmentContext(hiddens, None, causal = False, visible = alignment.visible)

# cached generation: each new anchor token extends the text; per row, the augment's cache is rolled
# back to the tokens it shares with the new committed text, and the rest is decoded

def common_prefix_len(a: list[int], b: list[int]) -> int:
    length = 0

    for x, y in zip(a, b):
        if x != y:
            break
        length += 1

    return length

class RowKeysValues:
    """Projected keys and values (b, h, j, d) of one cross-attention, a length per row. Unused
    slots hold zeros: a masked key gets zero weight, and 0 * NaN would still be NaN."""

    def __init__(self, batch: int):
        self.lengths = [0] * batch
        self.k = self.v = None

    def write(self, row: int, start: int, k: Tensor, v: Tensor):
        end = start + k.shape[-2]

        if not exists(self.k):
            b, (_, h, _, d) = len(self.lengths), k.shape
            self.k, self.v = (k.new_zeros((b, h, max(end, 16), d)) for _ in range(2))

        if end > self.k.shape[-2]:
            grow = max(end, 2 * self.k.shape[-2]) - self.k.shape[-2]
            self.k, self.v = (torch.cat((t, t.new_zeros((*t.shape[:2], grow, t.shape[-1]))), dim = -2) for t in (self.k, self.v))

        self.k[row, :, start:end] = k[0]
        self.v[row, :, start:end] = v[0]
        self.lengths[row] = end

    def view(self) -> tuple[Tensor, Tensor]:
        length = max(1, max(self.lengths))
        return self.k[:, :, :length], self.v[:, :, :length]

class TextStream:
    """One augment aligned across tokenizers, during one cached `generate` call: per row, the
    augment tokens in its own cache (batch 1: rows re-tokenize at different places), and the keys
    and values of each cross-attention. The anchor's newest position sees every one of them."""

    def __init__(self, calm: CALM, index: int, batch: int):
        self.calm, self.index = calm, index
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.states = [DecodeState(rollback = True) for _ in range(batch)]
        self.kv = {block: RowKeysValues(batch) for block in calm.cross_attns[index]}

    def context(self, seq: Tensor, mask: Tensor | None) -> AugmentContext:
        calm = self.calm
        reals, _ = real_rows(seq, mask)
        texts = [committed_text(text) for text in calm.anchor_text.decode_batch(reals)]

        for row, target in enumerate(calm.augment_texts[self.index].encode_batch(texts)):
            keep = common_prefix_len(self.tokens[row], target)

            if keep < len(self.tokens[row]):
                calm.augment_adapters[self.index].crop(self.states[row], keep)

            if len(target) > keep:
                self.extend(row, target, keep)

            self.tokens[row] = target
            for buffer in self.kv.values():
                buffer.lengths[row] = len(target)

        kv = {block: buffer.view() for block, buffer in self.kv.items()}
        length = next(iter(kv.values()))[0].shape[-2]
        lengths = torch.tensor([len(tokens) for tokens in self.tokens], device = seq.device)
        return AugmentContext({}, torch.arange(length, device = seq.device) < lengths[:, None], causal = False, kv = kv)

    def extend(self, row: int, target: list[int], keep: int):
        calm, index = self.calm, self.index
        adapter, recorder, state = calm.augment_adapters[index], calm.recorders[index], self.states[row]

        ids = to_model(torch.tensor([target], dtype = torch.long), adapter.model, 'seq')
        adapter.check_length(ids, f'the augment tokenization of the generated text (augment {index})')
        adapter.check_token_ids(ids, f'the augment tokenization of the generated text (augment {index})')

        if not adapter.can_cache:
            # recomputes every position
            hiddens = recorder(lambda: adapter.decode(ids, None, state), len(target))
            hiddens = {key: hidden[:, keep:] for key, hidden in hiddens.items()}
        else:
            # an empty cache reads the tokens at once; a filled one one token per call, the only
            # way x-transformers' cache places several new tokens right (measured: 1.6 off otherwise)
            ends = [len(target)] if state.length == 0 else range(keep + 1, len(target) + 1)
            steps = [recorder(lambda: adapter.decode(ids[:, :end], None, state), end - state.length) for end in ends]
            hiddens = {key: torch.cat([step[key] for step in steps], dim = -2)[:, -(len(target) - keep):] for key in steps[0]}

        for block, key in zip(calm.cross_attns[index], calm.augment_keys[index]):
            self.kv[block].write(row, keep, *block.project_context(hiddens[key]))
