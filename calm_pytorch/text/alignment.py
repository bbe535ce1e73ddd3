from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from calm_pytorch.helpers import exists
from calm_pytorch.text.commit import committed_text
from calm_pytorch.text.tokenizers import AnchorText, AugmentText

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

# the forward: augment inputs and the visibility of every anchor position

@dataclass
class Alignment:
    ids: Tensor       # (b * r, m) augment token ids, right-padded
    mask: Tensor      # (b * r, m) True for the positions the augment reads
    visible: Tensor   # (b, n, r * m) anchor position i may attend to augment key j
    runs: int
    texts: list[list[int]]  # per row, the augment tokens of the whole committed text (its first run)

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

def real_tokens(seq: Tensor, mask: Tensor | None) -> list[list[int]]:
    # per row, the real anchor tokens (generation's steps need no per-position counts)
    if not exists(mask):
        return seq.tolist()

    return [ids[real].tolist() for ids, real in zip(seq, mask.bool())]

def augment_tokens_of_prefixes(real: list[int], lengths: Sequence[int], anchor: AnchorText, augment: AugmentText) -> dict[int, list[int]]:
    """For each number of real anchor tokens read: the augment tokens of the committed text."""

    lengths = sorted(set(lengths))
    texts = [committed_text(text) for text in anchor.decode_prefixes(real, lengths)]
    distinct = list(dict.fromkeys(texts))
    encoded = dict(zip(distinct, augment.encode_growing(distinct)))
    return {length: encoded[text] for length, text in zip(lengths, texts)}

def row_runs(tokens: dict[int, list[int]], counts: list[int]) -> tuple[list[int], list[list[int]], list[tuple[int, int]]]:
    # one row: the tokens of its whole committed text, the runs the augment reads (that text's
    # first), and per anchor position the run it attends to and how many of its tokens
    full = tokens[counts[-1]]
    runs, spans = [full], []

    for count in counts:
        prefix = tokens[count]

        if prefix == full[:len(prefix)]:
            spans.append((0, len(prefix)))
            continue

        # the tokenizer re-tokenized across a committed piece: this position reads its own run
        if prefix not in runs:
            runs.append(prefix)

        spans.append((runs.index(prefix), len(prefix)))

    return full, runs, spans

def align(seq: Tensor, mask: Tensor | None, anchor: AnchorText, augment: AugmentText) -> Alignment:
    b, n = seq.shape
    reals, counts = real_rows(seq, mask)

    runs_per_row, spans_per_row, texts = [], [], []
    known = {}  # rows with the same tokens (a prompt sampled several times) are aligned once

    for real, row_counts in zip(reals, counts):
        key = (tuple(real), tuple(row_counts))
        if key not in known:
            known[key] = row_runs(augment_tokens_of_prefixes(real, row_counts, anchor, augment), row_counts)

        full, runs, spans = known[key]
        texts.append(full)
        runs_per_row.append(runs)
        spans_per_row.append(spans)

    # (a batch of no rows reads one placeholder run, of no rows)
    r = max((len(runs) for runs in runs_per_row), default = 1)
    m = max((len(run) for runs in runs_per_row for run in runs), default = 1) or 1

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

        index, length = torch.tensor(spans, dtype = torch.long).reshape(-1, 2).unbind(dim = -1)
        visible[row] = (torch.arange(r)[:, None] == index[:, None, None]) & (torch.arange(m) < length[:, None, None])

    return Alignment(
        ids = rearrange(ids, 'b r m -> (b r) m').to(seq.device),
        mask = rearrange(read, 'b r m -> (b r) m').to(seq.device),
        visible = rearrange(visible, 'b n r m -> b n (r m)').to(seq.device),
        runs = r,
        texts = texts
    )

def common_prefix_len(a: list[int], b: list[int]) -> int:
    length = 0

    for x, y in zip(a, b):
        if x != y:
            break
        length += 1

    return length
