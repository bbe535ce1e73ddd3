from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / 'examples'

def test_xtransformers_example_trains(monkeypatch, capsys):
    monkeypatch.setattr(sys, 'argv', ['train_xtransformers.py', '--steps', '30'])
    runpy.run_path(str(EXAMPLES / 'train_xtransformers.py'), run_name = '__main__')

    losses = [float(loss) for loss in re.findall(r'loss ([0-9.]+)', capsys.readouterr().out)]
    assert len(losses) == 4 and losses[-1] < losses[0]

@pytest.mark.parametrize('script, argv, message', [
    ('train_xtransformers.py', ['--steps', '-2'], '--steps must be positive, got -2'),
    ('compose_hf.py', ['--steps', '0'], '--steps must be positive, got 0'),
    ('train_hf_trainer.py', ['--max-steps', '-1'], '--max-steps must be positive, got -1'),
])
def test_the_examples_refuse_to_train_nothing(script, argv, message, monkeypatch, capsys):
    # before: -2 steps trained nothing and printed a result; -1 max steps became Trainer's 3 epochs
    monkeypatch.setattr(sys, 'argv', [script, *argv])
    with pytest.raises(SystemExit):
        runpy.run_path(str(EXAMPLES / script), run_name = '__main__')
    assert message in capsys.readouterr().err

def test_hf_trainer_example_trains_saves_and_reloads(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, 'argv', ['train_hf_trainer.py', '--max-steps', '30', '--out', str(tmp_path)])
    runpy.run_path(str(EXAMPLES / 'train_hf_trainer.py'), run_name = '__main__')

    out = capsys.readouterr().out
    losses = [float(loss) for loss in re.findall(r'step +\d+  loss ([0-9.]+)', out)]
    assert len(losses) == 6 and losses[-1] < losses[0]

    trained, reloaded, untrained = re.search(r'trained ([0-9.]+), reloaded ([0-9.]+), untrained ([0-9.]+)', out).groups()
    assert trained == reloaded and float(trained) > float(untrained)

    # periodic checkpoints and the final save hold the composition, not the frozen models
    assert sorted(path.name for path in (tmp_path / 'final').iterdir()) == ['README.md', 'composition.safetensors', 'config.json', 'training_args.bin']
    assert (tmp_path / 'checkpoint-30' / 'composition.safetensors').is_file() and not (tmp_path / 'checkpoint-30' / 'model.safetensors').exists()

def test_train_example_under_torchrun_with_sharded_frozen_models(tmp_path):
    # two processes on CPU (gloo), as the docs tell users to start them; --standalone picks a free port
    command = [
        sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(EXAMPLES / 'train.py'),
        '--strategy', 'fsdp', '--steps', '2', '--batch-size', '4', '--warmup', '1', '--checkpoint-every', '1', '--eval-every', '2', '--out', str(tmp_path)
    ]
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]), 'OMP_NUM_THREADS': '1'}
    result = subprocess.run(command, env = env, capture_output = True, text = True, timeout = 300)
    assert result.returncode == 0, result.stderr[-3000:]

    # rank 0 alone reports and writes: one composition, reloaded with the same logits
    out = result.stdout
    assert out.count('processes 2, samples per step 8') == 1
    assert re.search(r'loss [0-9.]+ at step 1 -> [0-9.]+ at step 2', out)
    assert out.count('reloaded: logits equal') == 1

    # and it held half of the frozen weights, give or take the rounding of odd-sized shards
    local, total = (int(number.replace(',', '')) for number in re.search(r'frozen parameters held by this process: ([0-9,]+) of ([0-9,]+) \(fsdp\)', out).groups())
    assert 0.45 * total <= local <= 0.55 * total

    assert (tmp_path / 'composition.safetensors').is_file()
    assert sorted(path.name for path in (tmp_path / 'checkpoints').iterdir()) == ['step-00000001', 'step-00000002']
