from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor

from calm_pytorch.checkpoints.contents import composition_state_dict
from calm_pytorch.checkpoints.save_load import load_composition, save_composition

class CompositionCheckpoints:
    """Mixin giving CALM its composition checkpoints: the learned weights and the wiring, nothing
    of the frozen models (see contents.py)."""

    def composition_state_dict(self) -> dict[str, Tensor]:
        """The composition weights only, keyed as in `state_dict()`: `cross_attns.0.1.to_q.weight`, ..."""
        return composition_state_dict(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the composition weights (safetensors) and wiring (JSON in its metadata) to `path`, atomically."""
        return save_composition(self, path)

    def load(self, path: str | os.PathLike, strict_models: bool = True) -> dict[str, Any]:
        """Loads a checkpoint written by `save` into this composition over the same frozen models.
        A mismatched wiring, other frozen models (unless `strict_models = False`: then a warning)
        or a damaged file is an error, and then nothing is loaded."""
        return load_composition(self, path, strict_models = strict_models)
