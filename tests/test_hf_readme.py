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
