from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module

from calm_pytorch.checkpoints.contents import composition_state_dict
from calm_pytorch.checkpoints.pretrained import from_pretrained, push_to_hub, save_pretrained
from calm_pytorch.checkpoints.save_load import load_composition, save_composition
from calm_pytorch.composition.params import AugmentParams

class CompositionCheckpoints:
    """Mixin giving CALM its composition checkpoints: the learned weights and the wiring, nothing
    of the frozen models (see contents.py); and the composition as a directory, on the Hub or
    not (see pretrained.py)."""

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

    def save_pretrained(self, save_directory: str | os.PathLike, *, tokenizer: Any = None) -> Path:
        """Writes the composition as a directory: `composition.safetensors` (as `save`), `config.json`
        (how to rebuild the whole composition: each frozen model's source, revision, class and
        dtype, the wiring, attn_kwargs), a model card `README.md`, and the tokenizers (the anchor's
        at the top: `tokenizer`, else the CALM's `anchor_tokenizer`). Nothing of the frozen models'
        weights. Needs transformers (the config is a transformers config)."""
        return save_pretrained(self, save_directory, tokenizer = tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        anchor: Module | None = None,
        augments: AugmentParams | Module | Sequence[AugmentParams | Module | None] | None = None,
        anchor_tokenizer: Any = None,
        revision: str | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device_map: Any = None,
        strict_models: bool = True,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        calm_kwargs: dict[str, Any] | None = None,
        **model_kwargs
    ):
        """A composition from a directory written by `save_pretrained`, or a hub repo id (`revision`
        of that repo; `cache_dir`, `local_files_only`, `token` as in huggingface_hub).

        The frozen models are loaded through transformers from their recorded sources and
        revisions, in their recorded dtype unless `dtype` (or `torch_dtype`) says otherwise;
        `device_map` and `model_kwargs` (e.g. `quantization_config`) go to their `from_pretrained`.
        Pass models transformers cannot rebuild (x-transformers, your own modules, models built
        from a config): `anchor = ...`, `augments = [...]` (None where it is to be loaded, or
        AugmentParams with your options; the saved wiring is applied over them). `calm_kwargs`
        go to CALM (e.g. `anchor_transformer_blocks`). The frozen models are checked against the
        identity saved with the composition: other models are an error (a warning with
        `strict_models = False`; models cast to another dtype on purpose are compared in all but
        their weights' values)."""

        if torch_dtype is not None and dtype is not None:
            raise TypeError('pass the dtype as `dtype` or `torch_dtype`, not both')

        if device_map is not None:
            model_kwargs['device_map'] = device_map

        return from_pretrained(
            cls,
            pretrained_model_name_or_path,
            anchor = anchor,
            augments = augments,
            anchor_tokenizer = anchor_tokenizer,
            revision = revision,
            dtype = dtype if dtype is not None else torch_dtype,
            strict_models = strict_models,
            hub_kwargs = dict(cache_dir = cache_dir, local_files_only = local_files_only, token = token),
            calm_kwargs = calm_kwargs,
            model_kwargs = model_kwargs
        )

    def push_to_hub(self, repo_id: str, *, tokenizer: Any = None, private: bool | None = None, token: str | bool | None = None, revision: str | None = None, commit_message: str = 'Upload composition', create_pr: bool = False):
        """`save_pretrained` into a temporary directory uploaded to the hub repo `repo_id` (created
        if needed) with huggingface_hub. Returns the commit info."""
        return push_to_hub(self, repo_id, tokenizer = tokenizer, private = private, token = token, revision = revision, commit_message = commit_message, create_pr = create_pr)
