from __future__ import annotations

import datasets
import pytest
import torch
from conftest import assert_equal, composition, decoder
from torch.utils.data import IterableDataset

from calm_pytorch import CALM, AugmentParams, FineTuner
from calm_pytorch.composition.loss import next_token_loss
from calm_pytorch.training.collate import Collator
from calm_pytorch.training.data import DataError, StreamShard

# FineTuner over the data users have: Hugging Face datasets in any format and as streams, HF
# column names, rows of different lengths, a context for some augments and not others

datasets.disable_progress_bars()

def build(num_augments: int = 1) -> CALM:
    torch.manual_seed(1234)
    anchor = decoder(dim = 32, depth = 2)
    augments = [AugmentParams(model = decoder(dim = 16, depth = 2)) for _ in range(num_augments)]
    calm = CALM(anchor, augments, attn_kwargs = dict(heads = 2, dim_head = 8))

    with torch.no_grad():
        for param in calm.cross_attns.parameters():
            param.normal_(std = 0.1)

    return calm

def finetuner(calm: CALM, data, **kwargs) -> FineTuner:
    options = dict(num_train_steps = 4, batch_size = 4, learning_rate = 3e-3, progress = False, device = 'cpu', shuffle = False)
    return FineTuner(calm, data, **{**options, **kwargs})

def hf_rows(num: int = 16) -> dict[str, list]:
    # rows of lengths 6 to 12, an answer-only loss on the second half, as python lists
    generator = torch.Generator().manual_seed(0)
    columns = dict(input_ids = [], attention_mask = [], labels = [])

    for index in range(num):
        length = 6 + index % 7
        ids = torch.randint(0, 256, (length,), generator = generator)
        labels = ids.clone()
        labels[:length // 2] = -100
        columns['input_ids'].append(ids.tolist())
        columns['attention_mask'].append([1] * length)
        columns['labels'].append(labels.tolist())

    return columns

def padded_by_hand(columns: dict[str, list]) -> list[dict[str, torch.Tensor]]:
    # the same rows as FineTuner's own data: CALM's names, right-padded per batch of 4 by hand
    rows = []

    for start in range(0, len(columns['input_ids']), 4):
        chunk = range(start, start + 4)
        length = max(len(columns['input_ids'][index]) for index in chunk)

        for index in chunk:
            ids = columns['input_ids'][index]
            pad = length - len(ids)
            rows.append(dict(
                seq = torch.tensor(ids + [0] * pad),
                mask = torch.tensor([True] * len(ids) + [False] * pad),
                labels = torch.tensor(columns['labels'][index] + [-100] * pad)
            ))

    return rows

def trained(data, **kwargs) -> dict[str, torch.Tensor]:
    tuner = finetuner(build(), data, **kwargs)
    tuner.train()
    return composition(tuner.calm)

@pytest.mark.parametrize('format', [None, 'torch', 'numpy', 'pandas', 'arrow'])
def test_a_hf_dataset_in_any_format_trains_as_the_same_rows_padded_by_hand(format):
    columns = hf_rows()
    dataset = datasets.Dataset.from_dict(columns).with_format(format)

    assert_equal(trained(dataset), trained(padded_by_hand(columns)))

def test_streams_train_as_the_same_rows_in_order():
    columns = hf_rows()
    expected = trained(padded_by_hand(columns))

    stream = datasets.Dataset.from_dict(columns).to_iterable_dataset()
    assert_equal(trained(stream), expected)

    class Rows(IterableDataset):
        def __iter__(self):
            return iter([dict(zip(columns, values)) for values in zip(*columns.values())])

    assert_equal(trained(Rows()), expected)

    # a stream has no random access: shuffling it is its own business
    with pytest.raises(ValueError, match = 'shuffle it yourself'):
        finetuner(build(), stream, shuffle = True)

def test_a_stream_resumes_where_it_stopped(tmp_path):
    stream = datasets.Dataset.from_dict(hf_rows(8)).to_iterable_dataset()  # 2 batches an epoch
    straight = trained(stream, num_train_steps = 5)

    first = finetuner(build(), stream, num_train_steps = 5, checkpoint_dir = tmp_path, checkpoint_every = 3)
    first.train(num_steps = 3)

    resumed = finetuner(build(), stream, num_train_steps = 5, checkpoint_dir = tmp_path, resume = True)
    assert (resumed.step, resumed.epoch, resumed.batch_in_epoch) == (3, 1, 1)
    resumed.train()
    assert_equal(composition(resumed.calm), straight)

def test_stream_shards_are_disjoint_and_cover_the_stream():
    class Numbers(IterableDataset):
        def __iter__(self):
            return iter(range(10))

    shards = [list(StreamShard(Numbers(), rank, 3)) for rank in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]

def test_padded_batch_loss_is_the_sum_of_the_rows_losses():
    # right padding and the mask it makes change nothing for the real tokens (the anchor and the
    # aligned augment are causal): the summed loss of the batch is the sum over its rows
    calm = build().eval()
    rows = [dict(input_ids = list(range(10 + length, 10 + 2 * length))) for length in (3, 9, 5)]
    batch = Collator(1)(rows)

    assert batch['seq'].shape == (3, 9) and batch['mask'].sum(-1).tolist() == [3, 9, 5]

    with torch.no_grad():
        loss, count = next_token_loss(calm, batch)
        alone = [next_token_loss(calm, dict(seq = torch.tensor([row['input_ids']]))) for row in rows]

    assert count == sum(row_count for _, row_count in alone) == 2 + 8 + 4
    torch.testing.assert_close(loss, sum(row_loss for row_loss, _ in alone), atol = 1e-4, rtol = 1e-5)

def test_per_item_mix_of_aligned_and_context_augments():
    calm = build(num_augments = 2).eval()
    generator = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 256, (length,), generator = generator).tolist() for length in (4, 7, 5, 6)]
    rows = [dict(input_ids = torch.randint(0, 256, (8,), generator = generator).tolist(), prompt = [None, doc]) for doc in docs]

    # as a datasets.Dataset: the per-augment prompt column holds nulls, which python format keeps
    dataset = datasets.Dataset.from_list(rows)
    batch = Collator(2)(dataset.__getitems__([0, 1, 2, 3]))

    assert batch['prompt'][0] is None and batch['prompt_mask'][0] is None
    assert batch['prompt'][1].shape == (4, 7) and batch['prompt_mask'][1].sum(-1).tolist() == [4, 7, 5, 6]

    with torch.no_grad():
        loss, _ = next_token_loss(calm, batch)
        by_hand = sum(
            next_token_loss(calm, dict(seq = torch.tensor([row['input_ids']]), prompt = [None, torch.tensor([doc])]))[0]
            for row, doc in zip(rows, docs)
        )

    torch.testing.assert_close(loss, by_hand, atol = 1e-4, rtol = 1e-5)

    # and FineTuner trains on it
    tuner = finetuner(build(num_augments = 2), dataset, num_train_steps = 2)
    assert all(torch.isfinite(torch.tensor(step['loss'])) for step in tuner.train())

@pytest.mark.parametrize('rows, message', [
    ([dict(input_ids = [1, 2, 3], text = 'a'), dict(input_ids = [4, 5], text = 'b')], r"column 'text' holds text.*remove_columns\(\['text'\]\)"),
    ([dict(input_ids = [1.5, 2.0])], r"column 'input_ids', row 0 of the batch: expected a 1-d sequence of token ids \(ints\), got a torch.float32"),
    ([dict(input_ids = 'hello')], r"column 'input_ids', row 0 of the batch: holds text"),
    ([dict(input_ids = [1, 2, 3], attention_mask = [1, 1])], r"column 'attention_mask', row 0 of the batch: 2 entries, but input_ids has 3"),
    ([dict(input_ids = [1, 2], attention_mask = [1, 2])], r"column 'attention_mask', row 0 of the batch: expected a 1-d mask"),
    ([dict(input_ids = [1, 2], labels = [1, 2, 3])], r"column 'labels', row 0 of the batch: 3 entries, but input_ids has 2"),
    ([dict(input_ids = [1, 2], seq = [1, 2])], r"both 'input_ids' and 'seq'"),
    ([dict(tokens = [1, 2])], r"columns \['tokens'\] but no tokens for the anchor"),
    ([dict(input_ids = [1, 2]), dict(input_ids = [1, 2], labels = [1, 2])], r"row 1 has the columns"),
    ([dict(input_ids = [1, 2], prompt = [None, [3]]), dict(input_ids = [1, 2], prompt = [None, None])], r"column 'prompt\[1\]': in one batch, rows \[0\] give augment 1 a context and rows \[1\] None"),
    ([dict(input_ids = [1, 2], extra = [1, 2]), dict(input_ids = [1, 2], extra = [1])], r"column 'extra': its rows have the shapes"),
])
def test_bad_data_names_the_column_and_what_was_expected(rows, message):
    with pytest.raises(DataError, match = message):
        Collator(2)(rows)

def test_bad_data_is_refused_before_training_starts():
    dataset = datasets.Dataset.from_dict(dict(input_ids = [[1, 2, 3]] * 4, text = ['a'] * 4))
    tuner = finetuner(build(), dataset, num_train_steps = 1)

    with pytest.raises(DataError, match = "column 'text'"):
        tuner.train()

    # a loss_fn of one's own may read text: it gets the strings
    seen = []

    def loss_fn(model, batch):
        seen.append(batch.pop('text'))
        return next_token_loss(model, batch)

    finetuner(build(), dataset, num_train_steps = 1, loss_fn = loss_fn).train()
    assert seen == [['a'] * 4]

def test_a_generator_is_refused():
    with pytest.raises(TypeError, match = 'a generator can be read only once'):
        finetuner(build(), (row for row in padded_by_hand(hf_rows())))
