from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).parent.parent / 'README.md'

def python_snippets() -> list[str]:
    return re.findall(r'```python\n(.*?)```', README.read_text(), flags = re.DOTALL)

def test_readme_has_snippets():
    assert len(python_snippets()) >= 5

def test_readme_snippets_run(tmp_path, monkeypatch):
    # the snippets build on each other, as a reader runs them top to bottom; files go to a temporary folder
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for snippet in python_snippets():
        exec(compile(snippet, str(README), 'exec'), namespace)

    assert isinstance(namespace['loss'], torch.Tensor) and torch.isfinite(namespace['loss'])
    assert namespace['new_tokens'].shape == (2, 8)
    assert namespace['logits'].shape == (2, 64, 20000)
    assert len(namespace['history']) == 4
    # the Hugging Face section
    assert namespace['greedy'].shape == (2, 16) and namespace['beams'].shape == (4, 16)
    assert torch.equal(namespace['plain'], namespace['anchor'].generate(namespace['input_ids'], max_new_tokens = 8, do_sample = False))
    assert len(namespace['calm'].anchor_adapter.layers) == 4

    for name in ('autocast_loss', 'summary_loss', 'recurrent_loss', 'picked_loss'):
        assert torch.isfinite(namespace[name])
    assert (tmp_path / 'runs' / 'composition.safetensors').exists()

def test_readme_test_command_is_what_ci_runs():
    ci = (Path(__file__).parent.parent / '.ci' / 'run').read_text()
    assert 'pip install -e ".[test]" && pytest -q' in README.read_text()
    assert 'pip install -e ".[test]" && pytest -q' in ci
