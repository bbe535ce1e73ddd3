from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from calm_pytorch.helpers import exists
from calm_pytorch.training.data import NAMES, DataError, as_kwargs, named

# The FineTuner's default collate_fn: rows as users have them (a `datasets.Dataset` in its
# default format gives python lists, `with_format('torch')` tensors, 'numpy' / 'pandas' arrays)
# become one batch of CALM's keywords.
#
# - Hugging Face's column names are CALM's: `input_ids` is `seq`, `attention_mask` is `mask`;
#   `labels`, `prompt` and `prompt_mask` keep theirs.
# - Rows of different lengths are right-padded: `seq` with the pad id (and a `mask` is made, False
#   on padding), `labels` with -100, `prompt` with 0 and its `prompt_mask` False on padding.
# - `prompt` may be given per augment in each row, None for an augment that reads the anchor's
#   tokens (aligned): `prompt = [None, document]`. An augment reads a context in every row of a
#   batch or in none: CALM runs it one way per batch.
# - Other columns go to CALM's forward as they are: tensors of one shape, stacked.

IGNORE = -100

def as_python(value):
    # numpy and pandas formats give object arrays for lists holding None (a per-augment prompt)
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [as_python(item) for item in value]

    return value

def to_tensor(value, column: str, index: int) -> Tensor:
    if isinstance(value, Tensor):
        return value

    if isinstance(value, str) or (isinstance(value, (list, tuple)) and any(isinstance(item, str) for item in value)):
        raise DataError(f'column {column!r}, row {index} of the batch: holds text ({value!r:.40}); CALM reads token ids: tokenize it first')

    try:
        # a copy: arrays from datasets are read-only views of its memory
        return torch.from_numpy(np.array(value)) if isinstance(value, (np.ndarray, np.generic)) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise DataError(f'column {column!r}, row {index} of the batch: {type(value).__name__} {value!r:.60} is not a tensor, an array or a (nested) list of numbers ({error})') from None

def token_sequence(value, column: str, index: int, what: str = 'token ids') -> Tensor:
    tensor = to_tensor(value, column, index)

    if tensor.ndim != 1 or tensor.is_floating_point() or tensor.is_complex():
        raise DataError(f'column {column!r}, row {index} of the batch: expected a 1-d sequence of {what} (ints), got a {tensor.dtype} tensor of shape {tuple(tensor.shape)}')

    return tensor.long()

def mask_sequence(value, column: str, index: int) -> Tensor:
    tensor = to_tensor(value, column, index)

    if tensor.ndim != 1 or not bool(((tensor == 0) | (tensor == 1)).all()):
        raise DataError(f'column {column!r}, row {index} of the batch: expected a 1-d mask of True / False (or 1 / 0), got shape {tuple(tensor.shape)} with values {tensor.unique().tolist()[:5]}')

    return tensor.bool()

def pad_right(tensors: list[Tensor], value) -> Tensor:
    length = max(tensor.shape[0] for tensor in tensors)
    out = torch.full((len(tensors), length), value, dtype = tensors[0].dtype)

    for row, tensor in enumerate(tensors):
        out[row, :tensor.shape[0]] = tensor

    return out

def lengths_mask(lengths: list[int]) -> Tensor:
    return torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]

def check_lengths(tensors: list[Tensor], lengths: list[int], column: str, of: str):
    for index, (tensor, length) in enumerate(zip(tensors, lengths)):
        if tensor.shape[0] != length:
            raise DataError(f'column {column!r}, row {index} of the batch: {tensor.shape[0]} entries, but {of} has {length} in that row; they must align')

class Collator:
    """Makes one batch of CALM's keywords from a list of rows (see the module comment).

    num_augments: the composition's, to read a per-augment `prompt`
    pad_id:       pads `seq` (the padding is masked out; the id only has to be in the vocabulary)
    batch_keys:   names the items of tuple rows
    text_allowed: let text columns through as lists of strings (for a loss_fn that reads them)"""

    def __init__(self, num_augments: int, pad_id: int = 0, batch_keys: Sequence[str] | None = None, text_allowed: bool = False):
        self.num_augments = num_augments
        self.pad_id = pad_id
        self.batch_keys = batch_keys
        self.text_allowed = text_allowed

    def __call__(self, rows: Sequence) -> dict[str, Any]:
        rows = [as_kwargs(row, self.batch_keys) for row in rows]
        # errors name the columns as the dataset does
        shown = {name: hf_name if hf_name in rows[0] else name for hf_name, name in NAMES.items()}
        rows = [named(row, f'row {index}') for index, row in enumerate(rows)]
        columns = list(rows[0])

        for index, row in enumerate(rows):
            if set(row) != set(columns):
                raise DataError(f'row {index} has the columns {sorted(row)}, row 0 {sorted(columns)}; every row needs the same columns')

        if 'seq' not in columns:
            raise DataError(f'the rows have the columns {columns} but no tokens for the anchor: a column `input_ids` (or `seq`)')

        batch = {}
        seqs = [token_sequence(row['seq'], shown['seq'], index) for index, row in enumerate(rows)]
        lengths = [len(seq) for seq in seqs]
        batch['seq'] = pad_right(seqs, self.pad_id)

        if 'mask' in columns:
            masks = [mask_sequence(row['mask'], shown['mask'], index) for index, row in enumerate(rows)]
            check_lengths(masks, lengths, shown['mask'], shown['seq'])
            batch['mask'] = pad_right(masks, False)
        elif len(set(lengths)) > 1:
            batch['mask'] = lengths_mask(lengths)

        if 'labels' in columns:
            labels = [token_sequence(row['labels'], 'labels', index, 'labels (token ids, -100 for no loss)') for index, row in enumerate(rows)]
            check_lengths(labels, lengths, 'labels', shown['seq'])
            batch['labels'] = pad_right(labels, IGNORE)

        if 'prompt' in columns:
            prompts, prompt_masks = self.prompts(rows, 'prompt_mask' in columns)

            if any(exists(prompt) for prompt in prompts):
                batch['prompt'], batch['prompt_mask'] = prompts, prompt_masks

        elif 'prompt_mask' in columns:
            raise DataError('there is a column `prompt_mask` but no `prompt` for it to mask')

        for column in columns:
            if column not in ('seq', 'mask', 'labels', 'prompt', 'prompt_mask'):
                batch[column] = self.other(column, [row[column] for row in rows])

        return batch

    def per_augment(self, value) -> list:
        value = as_python(value)

        # a list holding None, tensors or lists, one entry per augment; anything else is one value for every augment
        entries = isinstance(value, (list, tuple)) and len(value) == self.num_augments and any(item is None or isinstance(item, (Tensor, np.ndarray, list, tuple)) for item in value)

        if not entries:
            return [value] * self.num_augments

        return list(value)

    def prompts(self, rows: list[dict], has_masks: bool) -> tuple[list, list]:
        per_row = [self.per_augment(row['prompt']) for row in rows]
        masks_per_row = [self.per_augment(row['prompt_mask']) for row in rows] if has_masks else None
        prompts, masks = [], []

        for augment in range(self.num_augments):
            column = 'prompt' if self.num_augments == 1 else f'prompt[{augment}]'
            values = [entries[augment] for entries in per_row]
            given = [index for index, value in enumerate(values) if exists(value)]

            if len(given) == 0:
                prompts.append(None)
                masks.append(None)
                continue

            if len(given) != len(values):
                missing = [index for index in range(len(values)) if index not in given]
                raise DataError(
                    f'column {column!r}: in one batch, rows {given} give augment {augment} a context and rows {missing} None (aligned); an augment '
                    'reads a context in every row of a batch or in none: give every row a context, or train on one dataset per mode'
                )

            tensors = [to_tensor(value, column, index) for index, value in enumerate(values)]
            mask_column = 'prompt_mask' if self.num_augments == 1 else f'prompt_mask[{augment}]'
            given_masks = [entries[augment] for entries in masks_per_row] if exists(masks_per_row) else [None] * len(rows)

            if any(exists(mask) for mask in given_masks) and not all(exists(mask) for mask in given_masks):
                raise DataError(f'column {mask_column!r}: some rows give a mask for augment {augment}\'s context and some None; give one in every row or in none')

            given_masks = given_masks if exists(given_masks[0]) else None

            if all(tensor.ndim == 1 and not tensor.is_floating_point() for tensor in tensors):
                # token contexts, right-padded: left padding would shift an augment's absolute positions
                lengths = [len(tensor) for tensor in tensors]
                prompts.append(pad_right([tensor.long() for tensor in tensors], 0))

                if exists(given_masks):
                    given_masks = [mask_sequence(mask, mask_column, index) for index, mask in enumerate(given_masks)]
                    check_lengths(given_masks, lengths, mask_column, column)
                    masks.append(pad_right(given_masks, False))
                else:
                    masks.append(lengths_mask(lengths) if len(set(lengths)) > 1 else None)
                continue

            # another input (an image): one shape in every row
            prompts.append(self.stacked(column, tensors))
            masks.append(self.stacked(mask_column, [to_tensor(mask, mask_column, index) for index, mask in enumerate(given_masks)]) if exists(given_masks) else None)

        return prompts, masks

    def stacked(self, column: str, tensors: list[Tensor]) -> Tensor:
        shapes = {tuple(tensor.shape) for tensor in tensors}

        if len(shapes) > 1:
            raise DataError(
                f'column {column!r}: its rows have the shapes {sorted(shapes)[:4]}; only `input_ids` / `seq`, `attention_mask` / `mask`, `labels`, '
                'and token `prompt`s and their masks are padded: give this column one shape, or pass a collate_fn'
            )

        return torch.stack(tensors)

    def other(self, column: str, values: list):
        if self.text_allowed and all(isinstance(value, str) for value in values):
            return values

        if any(isinstance(value, str) for value in values):
            raise DataError(
                f'column {column!r} holds text; every column other than the tokens goes to calm(...) as a keyword. '
                f'Drop it (`dataset.remove_columns([{column!r}])`), or keep it for a loss_fn of your own'
            )

        if all(value is None for value in values):
            return None

        tensors = [to_tensor(value, column, index) for index, value in enumerate(values)]
        return self.stacked(column, tensors)
