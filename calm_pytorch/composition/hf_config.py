from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.nn import Module
from transformers import AutoConfig, PretrainedConfig

from calm_pytorch.composition.protocol import Composition
from calm_pytorch.helpers import exists
from calm_pytorch.models.factory import peft_base_model
from calm_pytorch.models.hf_discovery import is_hf_model, text_config
from calm_pytorch.models.precision import floating_dtype

# `calm.config`: what tools that take a causal LM read of `model.config` (Trainer, TRL, lm_eval,
# DeepSpeed's "auto" sizes, model cards): the text fields of the anchor (vocabulary, width, depth,
# positions, special tokens, `_name_or_path`), so that sizes come out as the anchor's, plus a
# description of the composition: where each frozen model came from and how it is wired.
# A transformers config, so `to_dict`, `to_json_string` and `save_pretrained` work as tools expect.
# This module imports transformers: CALM reaches it only when `.config` is read.

ANCHOR_TEXT_FIELDS = ('vocab_size', 'hidden_size', 'num_hidden_layers', 'max_position_embeddings', 'bos_token_id', 'eos_token_id', 'pad_token_id')

class CALMConfig(PretrainedConfig):
    """The configuration of a composition, as `calm.config`. The text fields are the anchor's;
    `anchor` and `augments` describe each frozen model (class, source, revision, dtype) and
    `composition` the wiring (connections, hidden positions, cross-attention heads); saved as a
    composition directory's config.json (checkpoints/pretrained.py)."""

    model_type = 'calm'

    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    max_position_embeddings: int | None = None
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    use_cache: bool = True
    tie_word_embeddings: bool = False

    anchor: dict | None = None
    augments: list | None = None
    composition: dict | None = None
    tokenizers: dict | None = None  # written by save_pretrained: where the tokenizers were saved
    calm_version: str | None = None

# AutoConfig.from_pretrained reads a composition directory's config.json
AutoConfig.register('calm', CALMConfig, exist_ok = True)

def model_source(model: Module, loaded_dir: str | None = None) -> dict[str, Any]:
    """Where a frozen model came from, as far as it says: its class, and for a transformers model
    the hub id or local path it was loaded from (`loaded_dir`: that path made absolute when the
    composition was built) and the revision resolved (None when it was built from a config), and
    its dtype."""

    model = peft_base_model(model)
    dtype = floating_dtype(model)
    source = dict(
        library = 'transformers' if is_hf_model(model) else type(model).__module__.split('.')[0],
        model_class = type(model).__name__,
        source = None,
        revision = None,
        dtype = str(dtype).removeprefix('torch.') if exists(dtype) else None
    )

    if is_hf_model(model):
        source['source'] = loaded_dir or model.config.name_or_path or None
        source['revision'] = hub_revision(model.config)

    return source

def hub_revision(config) -> str | None:
    """The commit of a hub model: transformers 4 kept it on the config; transformers 5 does not, so
    it is the commit the hub cache holds for the model's default branch (None for a local directory
    or a model not in the cache; a model loaded at another revision cannot be told apart, see
    `cached_revisions`). The fingerprint saved with a composition is what proves identity."""

    commit = getattr(config, '_commit_hash', None)
    name = config.name_or_path

    if exists(commit) or not name or Path(name).exists():
        return commit

    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, 'config.json')
    return Path(cached).parent.name if isinstance(cached, str) else None

def cached_revisions(name: str | None) -> list[str]:
    """The commits of a hub model the hub cache holds (none for a local directory)."""

    if not name or Path(name).exists():
        return []

    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, 'config.json')
    return sorted(path.name for path in Path(cached).parent.parent.iterdir()) if isinstance(cached, str) else []

def composition_description(calm: Composition) -> dict[str, Any]:
    """How the composition is wired: enough, with the frozen models, to build the same CALM again."""

    first = calm.cross_attns[0][0]

    return dict(
        attn_kwargs = dict(heads = first.heads, dim_head = first.to_q.out_features // first.heads),
        anchor_hidden_position = list(calm.anchor_positions),
        pad_id = calm.pad_id,
        composition_dtype = str(first.to_q.weight.dtype).removeprefix('torch.'),
        augments = [
            dict(
                connections = [list(pair) for pair in connections],
                hidden_positions = [position for _, position in keys],
                num_layers = num_layers,
                recurrent_context = 'final_state' if final_state else 'all_segments',
                same_tokenizer = declared_same_tokenizer(calm, index)
            )
            for index, (connections, keys, num_layers, final_state) in enumerate(zip(calm.connections, calm.augment_keys, calm.num_augment_layers, calm.reads_final_state))
        ]
    )

def declared_same_tokenizer(calm: Composition, index: int) -> bool:
    # vocabularies of different sizes read as one only with AugmentParams(same_tokenizer = True)
    anchor_vocab, augment_vocab = calm.anchor_adapter.vocab_size, calm.augment_adapters[index].vocab_size
    differ = exists(anchor_vocab) and exists(augment_vocab) and anchor_vocab != augment_vocab
    return differ and not exists(calm.augment_texts[index]) and not exists(calm.vocab_mismatch[index])

def anchor_text_fields(calm: Composition) -> dict[str, Any]:
    anchor = peft_base_model(calm.anchor)
    adapter = calm.anchor_adapter

    fields = dict(
        vocab_size = adapter.vocab_size,
        hidden_size = calm.cross_attns[0][0].norm.normalized_shape[0],
        num_hidden_layers = len(adapter.layers),
        max_position_embeddings = adapter.max_seq_len
    )

    if is_hf_model(anchor):
        config = text_config(anchor)
        fields |= {name: getattr(config, name) for name in ANCHOR_TEXT_FIELDS if exists(getattr(config, name, None))}
        fields |= dict(name_or_path = anchor.config.name_or_path, use_cache = bool(getattr(config, 'use_cache', True)))

    return fields

def composition_config(calm: Composition) -> CALMConfig:
    dtype = floating_dtype(calm.anchor)
    dirs = getattr(calm, 'model_dirs', None) or [None] * (1 + len(calm.augments))  # a CALM pickled before they were kept

    return CALMConfig(
        architectures = ['CALM'],
        dtype = dtype,
        anchor = model_source(calm.anchor, dirs[0]),
        augments = [model_source(model, loaded_dir) for model, loaded_dir in zip(calm.augments, dirs[1:])],
        composition = composition_description(calm),
        **anchor_text_fields(calm)
    )
