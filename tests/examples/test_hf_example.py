from __future__ import annotations

from pathlib import Path

def test_hf_example_runs(monkeypatch, capsys):
    import runpy
    import sys

    example = Path(__file__).resolve().parents[2] / 'examples' / 'compose_hf.py'
    monkeypatch.setattr(sys, 'argv', [str(example), '--steps', '2'])
    runpy.run_path(str(example), run_name = '__main__')

    out = capsys.readouterr().out
    assert 'augment layer   4 (encoder.layer.3 output, width 32) -> anchor layer   4 (model.layers.3 output, width 64)' in out
    assert 'generated' in out
