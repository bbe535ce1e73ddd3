from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.nn import Module

# model configs as a user has them (a hub config.json, JSON, a transformers config), and models
# built from them on the `meta` device: shapes without memory

def load_config(config: Any):
    """A transformers config from a `PretrainedConfig`, a dict with a `model_type`, the path of a
    config.json file (or of a folder holding one), or a JSON string."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config

    if isinstance(config, (str, Path)) and Path(config).is_dir():
        config = Path(config) / 'config.json'

    if isinstance(config, (str, Path)) and Path(config).is_file():
        config = json.loads(Path(config).read_text())
    elif isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError:
            raise ValueError(f'a model config is a config.json file, a folder holding one, or JSON; got {config!r}, which is neither an existing path nor JSON') from None

    if not isinstance(config, dict) or 'model_type' not in config:
        raise ValueError(f'a model config needs its `model_type` (e.g. "llama") to say which model it describes; got {config!r}')

    config = dict(config)
    return AutoConfig.for_model(config.pop('model_type'), **config)

def meta_model(config, dtype: torch.dtype) -> Module:
    """The causal LM of `config` on the meta device, in `dtype`."""
    from transformers import AutoModelForCausalLM

    with torch.device('meta'):
        model = AutoModelForCausalLM.from_config(config, dtype = dtype)

    return model.to(dtype).eval()

@contextmanager
def meta_masks():
    """While composing meta models: transformers looks for packed sequences by reading the values
    of the position ids (`.all()`), which a meta tensor has not; the plan's inputs are never
    packed. (The constructor's probe of a transformers augment with `use_cache = False` goes
    there.)"""
    from transformers import masking_utils

    original = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None if position_ids.is_meta else original(position_ids)

    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original
