"""The key-value arithmetic example: its data, its scorer, and a quick run of the whole pipeline."""

from __future__ import annotations

import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'examples'))

import kv_arithmetic  # noqa: E402
import kv_data as data  # noqa: E402

@pytest.fixture
def world() -> data.World:
    return data.make_world(num_keys = 300, held_in_fraction = 0.3, operands = 3, generator = torch.Generator().manual_seed(0))

@pytest.fixture
def composition(world) -> data.CompositionData:
    return data.make_composition_data(world, size = 3000, generator = torch.Generator().manual_seed(1))

# reading sequences back, independently of how they were built

def parse_keys(prompt: list[int]) -> list[int]:
    return [token - data.FIRST_KEY for token in prompt if token >= data.FIRST_KEY]

def parse_number(digit_tokens: list[int]) -> int:
    # least-significant digit first
    return sum((token - data.FIRST_DIGIT) * 10 ** place for place, token in enumerate(digit_tokens))

def test_held_out_keys_never_appear_in_composition_data(world, composition):
    held_out_tokens = set(data.key_tokens(world.held_out).tolist())

    for part in (composition.kv_arithmetic, composition.kv_substitution, composition.numeric):
        tokens = torch.cat((part.prompts, part.targets), dim = -1)
        assert held_out_tokens.isdisjoint(tokens.unique().tolist())

    # and the held-in keys are actually used
    used = set(composition.kv_arithmetic.prompts.unique().tolist())
    assert len(used & set(data.key_tokens(world.held_in).tolist())) > 0.9 * len(world.held_in)

def test_held_in_and_held_out_keys_partition_all_keys(world):
    both = torch.cat((world.held_in, world.held_out)).sort().values
    assert torch.equal(both, torch.arange(world.num_keys))
    assert len(world.held_in) == 90

def test_every_label_is_the_arithmetic_value(world, composition):
    evals = data.make_eval_sets(world, 200, composition, torch.Generator().manual_seed(2))
    values = world.values.tolist()

    for examples in (composition.kv_arithmetic, evals.kv_arithmetic_held_out, evals.kv_arithmetic_held_in):
        for prompt, target in zip(examples.prompts.tolist(), examples.targets.tolist()):
            keys = parse_keys(prompt)
            assert len(keys) == 3 and prompt[-1] == data.EQUALS and target[-1] == data.EOS
            assert parse_number(target[:-1]) == sum(values[key] for key in keys)

    for examples in (composition.numeric, evals.numeric):
        for prompt, target in zip(examples.prompts.tolist(), examples.targets.tolist()):
            numbers = [token - data.FIRST_DIGIT for token in prompt[1:-1:2]]
            assert parse_number(target[:-1]) == sum(numbers)

    for prompt, target in zip(evals.kv_substitution.prompts.tolist(), evals.kv_substitution.targets.tolist()):
        substituted = [token - data.FIRST_DIGIT for token in target[:-1:2]]
        assert prompt[-1] == data.COLON and substituted == [values[key] for key in parse_keys(prompt)]

def test_evaluation_keys(world, composition):
    evals = data.make_eval_sets(world, 200, composition, torch.Generator().manual_seed(2))
    held_in, held_out = set(world.held_in.tolist()), set(world.held_out.tolist())

    for prompt in evals.kv_arithmetic_held_out.prompts.tolist() + evals.kv_substitution.prompts.tolist():
        assert set(parse_keys(prompt)) <= held_out

    seen = {tuple(row) for row in composition.kv_arithmetic.prompts.tolist()}
    for prompt in evals.kv_arithmetic_held_in.prompts.tolist():
        assert set(parse_keys(prompt)) <= held_in and tuple(prompt) not in seen

def test_too_few_held_in_keys_are_refused_before_any_training(tmp_path):
    # 2 held-in keys give 8 expressions of 3 keys, all in the composition data: the held-in
    # evaluation set would be empty, found before anything trains
    with pytest.raises(ValueError, match = 'no new held-in expression'):
        kv_arithmetic.main(['--quick', '--num-keys', '5', '--out', str(tmp_path)])

    assert list(tmp_path.rglob('*.pt')) == []

def test_augment_data_labels_values_at_keys(world):
    batch = data.augment_batch(world, 30, torch.Generator().manual_seed(3))
    tokens, labels = batch.tokens.tolist(), batch.loss_mask.tolist()

    for row, mask in zip(tokens, labels):
        for position, labelled in enumerate(mask):
            if not labelled or row[position] == data.EOS:
                continue
            # a labelled value follows its key (listing), its key's `=` (lines) or sits in a substitution
            token = row[position]
            assert data.FIRST_DIGIT <= token < data.FIRST_KEY or token == data.PLUS
        # no arithmetic anywhere in m_A's data: no answers after `=` other than single values
        assert data.EQUALS not in row or row.count(data.EQUALS) == sum(1 for t in row if t >= data.FIRST_KEY)

def test_exact_match_on_hand_made_predictions():
    d = lambda *digits: [data.FIRST_DIGIT + digit for digit in digits]
    targets = torch.tensor([d(3, 1) + [data.EOS]] * 6)
    generated = torch.tensor([
        d(3, 1) + [data.EOS, data.PAD],         # right, padding after <eos>
        d(3, 1) + [data.EOS, data.EOS],         # right, anything after the first <eos> is ignored
        d(1, 3) + [data.EOS, data.PAD],         # digits swapped
        d(3) + [data.EOS, data.PAD, data.PAD],  # too short
        d(3, 1, 0) + [data.EOS],                # too long
        d(3, 1, 0, 0),                          # never stops
    ])
    assert data.exact_match(generated, targets).tolist() == [True, True, False, False, False, False]

    # an output shorter than the target is wrong, not an error
    assert data.exact_match(generated[:, :2], targets).tolist() == [False] * 6

def test_number_tokens_least_significant_first():
    tokens = data.number_tokens(torch.tensor([7, 13, 27]), width = 2) - data.FIRST_DIGIT
    assert tokens.tolist() == [[7, 0], [3, 1], [7, 2]]

def test_chance_accuracy():
    # uniform single digits: the most likely sum of three is 13 or 14, 75 ways in 1000
    balanced = data.World(torch.arange(10), torch.tensor([], dtype = torch.long), torch.arange(10), operands = 3)
    assert data.chance_accuracy(balanced) == pytest.approx(0.075)

    # only held-out keys count: here they are all worth 0 or 9, so sums of 0 and 27 are 1 in 8
    skewed = data.World(torch.tensor([0, 9, 5, 5]), torch.tensor([2, 3]), torch.tensor([0, 1]), operands = 3)
    assert data.chance_accuracy(skewed) == pytest.approx(3 / 8)

    constant = data.World(torch.zeros(10, dtype = torch.long), torch.tensor([0]), torch.arange(1, 10), operands = 3)
    assert data.chance_accuracy(constant) == pytest.approx(1.)

def test_greedy_decoding_pads_after_eos():
    class Scripted(torch.nn.Module):
        # emits 5, then <eos>, for every row
        def forward(self, tokens):
            logits = torch.zeros(tokens.shape[0], tokens.shape[1], 20)
            logits[:, -1, 5 if tokens.shape[1] == 2 else data.EOS] = 1.
            return logits

    out = kv_arithmetic.greedy(Scripted(), torch.ones(3, 2, dtype = torch.long), max_new_tokens = 4)
    assert out.tolist() == [[5, data.EOS, data.PAD, data.PAD]] * 3

def test_quick_run_end_to_end(tmp_path, capsys):
    out, plot = tmp_path / 'run', tmp_path / 'plot.png'
    started = time.time()
    results = kv_arithmetic.main(['--quick', '--out', str(out), '--plot', str(plot)])
    elapsed = time.time() - started

    assert elapsed < 60, f'--quick took {elapsed:.0f}s'
    printed = capsys.readouterr().out

    # the table's structure: every system on every task, as a percentage
    (result,) = results
    assert set(result.accuracy) == {system for system, _ in kv_arithmetic.SYSTEMS}
    for scores in result.accuracy.values():
        assert set(scores) == {task for task, _ in kv_arithmetic.TASKS}
        assert all(0. <= score <= 100. for score in scores.values())

    header = '| task | m_A alone | m_B alone | CALM | CALM, random m_A (control) |'
    assert header in printed and 'chance on key-value arithmetic' in printed
    for _, name in kv_arithmetic.TASKS:
        assert f'| {name} |' in printed

    # the composition curve starts at step 0 and ends at the last step
    steps = [point[0] for point in result.curves['calm']]
    assert steps[0] == 0 and steps[-1] == kv_arithmetic.Config(**kv_arithmetic.QUICK).composition_steps

    # weights are cached, and the plot written when matplotlib is there
    (run_dir,) = out.iterdir()
    assert {'anchor.pt', 'augment.pt', 'calm.safetensors', 'control.safetensors'} <= {path.name for path in run_dir.iterdir()}

    # the composition checkpoint holds only what was learned
    assert all(key.startswith('cross_attns.') for key in safe_open(run_dir / 'calm.safetensors', 'pt').keys())

    # the plot is written when matplotlib is installed (the `examples` extra)
    assert plot.exists() == (find_spec('matplotlib') is not None)

def test_second_run_loads_the_cache_and_reproduces(tmp_path, capsys):
    first = kv_arithmetic.main(['--quick', '--out', str(tmp_path), '--plot', str(tmp_path / 'plot.png')])
    capsys.readouterr()

    second = kv_arithmetic.main(['--quick', '--out', str(tmp_path), '--plot', str(tmp_path / 'plot.png')])
    captured = capsys.readouterr()
    printed = captured.out + captured.err  # progress bars go to stderr

    for name in ('anchor.pt', 'augment.pt', 'calm.safetensors', 'control.safetensors'):
        assert f'loaded {name}' in printed

    assert 'CALM with trained m_A' not in printed  # no training progress on the second run
    assert first[0].accuracy == second[0].accuracy
    assert first[0].curves == second[0].curves

@pytest.mark.parametrize('argv, message', [
    (['--seeds', '0'], 'argument --seeds: must be positive, got 0'),
    (['--composition-steps', '-3'], 'argument --composition-steps: must be positive, got -3'),
    (['--held-in-fraction', '1.5'], 'argument --held-in-fraction: must be between 0 and 1, got 1.5'),
])
def test_the_command_line_refuses_counts_of_nothing(argv, message, capsys):
    with pytest.raises(SystemExit):
        kv_arithmetic.parse_args(argv)
    assert message in capsys.readouterr().err
