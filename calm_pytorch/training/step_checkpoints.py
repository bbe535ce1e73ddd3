from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import torch

from calm_pytorch.checkpoints.atomic import publish_dir, temporary_dir_beside
from calm_pytorch.checkpoints.file_format import CheckpointError
from calm_pytorch.checkpoints.pretrained import COMPOSITION_FILE

# a training checkpoint is a directory `step-00000100/` under the checkpoint root:
#   composition.safetensors  the composition weights and wiring (calm.save)
#   trainer_state.pt         optimizer, scheduler, step, data position, RNG states
# It is filled under a hidden temporary name and renamed into place when complete, so a
# directory with a step name is always whole. The trainer state holds only tensors, numbers,
# strings and containers, and is read with `torch.load(weights_only = True)`, which refuses to
# unpickle anything else: no code runs on load.

STEP_DIR = re.compile(r'^step-(\d+)$')
STATE_FILE = 'trainer_state.pt'

def step_dir_name(step: int) -> str:
    return f'step-{step:08d}'

def checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """The complete training checkpoints under `root`, oldest first."""
    root = Path(root)

    if not root.is_dir():
        return []

    found = []

    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file() and (path / COMPOSITION_FILE).is_file():
            found.append((int(match.group(1)), path))

    return sorted(found)

def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = checkpoints(root)
    return found[-1][1] if len(found) > 0 else None

def save_training_checkpoint(root: str | os.PathLike, step: int, calm, state: dict, keep_last: int | None = None) -> Path:
    path = Path(root) / step_dir_name(step)
    tmp = temporary_dir_beside(path)

    try:
        calm.save(tmp / COMPOSITION_FILE)
        torch.save(state, tmp / STATE_FILE)
        publish_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors = True)
        raise

    # pruned among this step and those before it: a later step's directory is not this run's
    # (FineTuner refuses to start below one), and never goes first
    if keep_last is not None:
        for _, old in [(found, old) for found, old in checkpoints(root) if found <= step][:-keep_last]:
            shutil.rmtree(old, ignore_errors = True)

    return path

def load_training_state(path: str | os.PathLike) -> dict:
    path = Path(path)

    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f'{path} is not a training checkpoint: it has no {STATE_FILE}; expected a directory written by FineTuner, e.g. runs/step-00000100')

    try:
        return torch.load(path / STATE_FILE, map_location = 'cpu', weights_only = True)
    except Exception as error:  # truncated, corrupted or not torch's format: torch names neither the file nor the cause
        raise CheckpointError(f'{path / STATE_FILE} could not be read ({type(error).__name__}: {error}); the checkpoint is damaged: resume from another one') from error

# random number generators: saved per process, so that dropout or sampling in a user's loss
# continue as if never interrupted

def rng_state() -> dict:
    state = dict(torch = torch.get_rng_state(), python = random.getstate())

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()

    return state

def set_rng_state(state: dict):
    torch.set_rng_state(state['torch'])
    random.setstate(state['python'])

    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])
