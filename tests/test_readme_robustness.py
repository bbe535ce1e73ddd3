from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

# README_robustness.md holds the README sections on precision and segment-recurrent models until
# they are folded into README.md (whose snippets test_readme.py runs)

SECTIONS = Path(__file__).parent.parent / 'README_robustness.md'

@pytest.mark.skipif(not SECTIONS.exists(), reason = 'folded into README.md')
def test_robustness_snippets_run():
    snippets = re.findall(r'```python\n(.*?)```', SECTIONS.read_text(), flags = re.DOTALL)
    assert len(snippets) == 3

    namespace = {}
    for snippet in snippets:
        exec(compile(snippet, str(SECTIONS), 'exec'), namespace)

    # names of their own, so that the sections can follow the README's snippets without clobbering them
    for name in ('autocast_loss', 'summary_loss', 'recurrent_loss', 'picked_loss'):
        assert torch.isfinite(namespace[name])

    assert namespace['generated'].shape == (2, 4)
    assert not {'anchor', 'augment', 'calm', 'seq', 'loss', 'logits', 'new_tokens', 'document'} & set(namespace)
