from __future__ import annotations

import os
import subprocess
import sys

# transformers is an optional dependency: the package imports and composes x-transformers models
# in an interpreter where importing it fails

SCRIPT = '''
import sys
sys.modules['transformers'] = None   # any import of it raises ImportError

import torch
from x_transformers import Decoder, TransformerWrapper
from calm_pytorch import CALM

def model(dim):
    return TransformerWrapper(num_tokens = 64, max_seq_len = 16, attn_layers = Decoder(dim = dim, depth = 2, heads = 2))

calm = CALM(model(16), model(8), attn_kwargs = dict(heads = 2, dim_head = 8))
assert torch.isfinite(calm(torch.randint(0, 64, (1, 8))))
assert not any(name.startswith('transformers.') for name in sys.modules)
print('ok')
'''

def test_library_works_without_transformers():
    result = subprocess.run([sys.executable, '-c', SCRIPT], capture_output = True, text = True, timeout = 300, env = {**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'ok'
