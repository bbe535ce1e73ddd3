from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.nn import Module

# model configs as a user has them (a hub config.json, JSON, a transformers config), and models
# built from them on the `meta` device: shapes without memory

def llama(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, vocab: int, tied: bool = False, **extra) -> dict:
    return dict(
        model_type = 'llama', hidden_size = hidden, num_hidden_layers = layers, intermediate_size = intermediate,
        num_attention_heads = heads, num_key_value_heads = kv_heads, vocab_size = vocab, tie_word_embeddings = tied, **extra
    )

# the shapes of published Llama models, as their config.json files give them (no download needed
# to plan): Llama 2 and TinyLlama share one 32k tokenizer, Llama 3 and 3.2 one of 128k
KNOWN = {
    'llama-2-7b': llama(4096, 32, 11008, 32, 32, 32000, max_position_embeddings = 4096),
    'llama-2-13b': llama(5120, 40, 13824, 40, 40, 32000, max_position_embeddings = 4096),
    'llama-2-70b': llama(8192, 80, 28672, 64, 8, 32000, max_position_embeddings = 4096),
    'tinyllama-1.1b': llama(2048, 22, 5632, 32, 4, 32000),
    'llama-3-8b': llama(4096, 32, 14336, 32, 8, 128256, max_position_embeddings = 8192, rope_theta = 500000.),
    'llama-3-70b': llama(8192, 80, 28672, 64, 8, 128256, max_position_embeddings = 8192, rope_theta = 500000.),
    'llama-3.2-1b': llama(2048, 16, 8192, 32, 8, 128256, tied = True, head_dim = 64, rope_theta = 500000.),
}

def load_config(config: Any):
    """A transformers config from a `PretrainedConfig`, a dict with a `model_type`, the path of a
    config.json file (or of a folder holding one), a JSON string, or a name in `KNOWN`."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config

    if isinstance(config, str) and config in KNOWN:
        config = KNOWN[config]

    if isinstance(config, (str, Path)) and Path(config).is_dir():
        config = Path(config) / 'config.json'

    if isinstance(config, (str, Path)) and Path(config).is_file():
        config = json.loads(Path(config).read_text())
    elif isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError:
            raise ValueError(f'a model config is a config.json file, a folder holding one, or JSON; got {config!r}, which is neither an existing path, JSON, nor one of the known shapes {sorted(KNOWN)}') from None

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
    try:
        from transformers import masking_utils
    except ImportError:  # an older transformers, which builds its masks without this check
        masking_utils = None

    original = getattr(masking_utils, 'find_packed_sequence_indices', None)

    if original is None:
        yield
        return

    masking_utils.find_packed_sequence_indices = lambda position_ids: None if position_ids.is_meta else original(position_ids)

    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original
