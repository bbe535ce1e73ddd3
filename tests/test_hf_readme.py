from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip('transformers')

README = Path(__file__).parent.parent / 'README_hf.md'

def python_snippets() -> list[str]:
    return re.findall(r'```python\n(.*?)```', README.read_text(), flags = re.DOTALL)

def test_readme_hf_snippets_run():
    # the snippets build on each other, as a reader runs them top to bottom
    namespace = {}
    for snippet in python_snippets():
        exec(compile(snippet, str(README), 'exec'), namespace)

    assert len(python_snippets()) >= 4
    assert torch.isfinite(namespace['loss'])
    assert namespace['greedy'].shape == (2, 16) and namespace['beams'].shape == (4, 16)
    assert torch.equal(namespace['plain'], namespace['anchor'].generate(namespace['input_ids'], max_new_tokens = 8, do_sample = False))
    assert len(namespace['calm'].anchor_adapter.layers) == 4

def test_hf_example_runs(monkeypatch, capsys):
    import runpy
    import sys

    example = Path(__file__).parent.parent / 'examples' / 'compose_hf.py'
    monkeypatch.setattr(sys, 'argv', [str(example), '--steps', '2'])
    runpy.run_path(str(example), run_name = '__main__')

    out = capsys.readouterr().out
    assert 'augment layer   4 (encoder.layer.3 output, width 32) -> anchor layer   4 (model.layers.3 output, width 64)' in out
    assert 'generated' in out
