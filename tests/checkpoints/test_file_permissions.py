from __future__ import annotations

import os
import stat

import pytest
import torch
from conftest import decoder

from calm_pytorch import CALM, AugmentParams
from calm_pytorch.training.step_checkpoints import COMPOSITION_FILE, STATE_FILE, save_training_checkpoint

# files are written as `open` and `mkdir` would: with the permissions the user's umask allows

@pytest.fixture(params = [0o022, 0o077, 0o002])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)

def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)

@pytest.mark.skipif(os.name != 'posix', reason = 'POSIX permissions')
def test_checkpoints_follow_the_umask(umask, tmp_path):
    calm = CALM(decoder(dim = 32, depth = 2), AugmentParams(model = decoder(dim = 24, depth = 4)), attn_kwargs = dict(heads = 2, dim_head = 16))

    path = calm.save(tmp_path / 'composition.safetensors')
    assert mode(path) == 0o666 & ~umask

    step = save_training_checkpoint(tmp_path / 'runs', 10, calm, dict(step = torch.tensor(10)))

    assert mode(step) == 0o777 & ~umask
    assert mode(step / COMPOSITION_FILE) == 0o666 & ~umask
    assert mode(step / STATE_FILE) == 0o666 & ~umask

    # writing over an existing checkpoint too
    path = calm.save(path)
    assert mode(path) == 0o666 & ~umask
    assert mode(save_training_checkpoint(tmp_path / 'runs', 10, calm, dict(step = torch.tensor(10)))) == 0o777 & ~umask
