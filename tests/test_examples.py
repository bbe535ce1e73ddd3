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
