from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / 'examples'

def test_xtransformers_example_trains(monkeypatch, capsys):
    monkeypatch.setattr(sys, 'argv', ['train_xtransformers.py', '--steps', '30'])
    runpy.run_path(str(EXAMPLES / 'train_xtransformers.py'), run_name = '__main__')

    losses = [float(loss) for loss in re.findall(r'loss ([0-9.]+)', capsys.readouterr().out)]
    assert len(losses) == 4 and losses[-1] < losses[0]

def test_hf_trainer_example_trains_saves_and_reloads(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, 'argv', ['train_hf_trainer.py', '--max-steps', '30', '--out', str(tmp_path)])
    runpy.run_path(str(EXAMPLES / 'train_hf_trainer.py'), run_name = '__main__')

    out = capsys.readouterr().out
    losses = [float(loss) for loss in re.findall(r'step +\d+  loss ([0-9.]+)', out)]
    assert len(losses) == 6 and losses[-1] < losses[0]

    trained, reloaded, untrained = re.search(r'trained ([0-9.]+), reloaded ([0-9.]+), untrained ([0-9.]+)', out).groups()
    assert trained == reloaded and float(trained) > float(untrained)

    # periodic checkpoints and the final save hold the composition, not the frozen models
    assert sorted(path.name for path in (tmp_path / 'final').iterdir()) == ['composition.safetensors', 'training_args.bin']
    assert (tmp_path / 'checkpoint-30' / 'composition.safetensors').is_file() and not (tmp_path / 'checkpoint-30' / 'model.safetensors').exists()
