from __future__ import annotations

from typing import Any

from calm_pytorch.checkpoints.zero3 import full_numel
from calm_pytorch.composition.protocol import Composition
from calm_pytorch.helpers import exists

# the README.md of a composition directory: which models, how they are wired, what was trained,
# and the line that loads it. Hub metadata (library, tags, the anchor as base model) in YAML front matter

def source_line(source: dict[str, Any]) -> str:
    where = source.get('source') or 'not recorded: pass the model to `from_pretrained`'
    revision = source.get('revision') or ''
    return f"| {source.get('model_class')} ({source.get('library')}) | {where} | {revision} | {source.get('dtype')} |"

def is_hub_id(source: str | None) -> bool:
    # `org/name`, not a local path
    return isinstance(source, str) and source.count('/') == 1 and not source.startswith(('.', '/', '~'))

def model_card(calm: Composition, config: dict[str, Any], name: str, training: list[str] | None = None) -> str:
    description = config['composition']
    anchor_source = config['anchor'].get('source')
    # anchor parameters trained with the composition (LoRA weights) are saved with it, not frozen
    anchor_trained = set(calm.trainable_anchor_params)
    anchor_params = dict(calm.anchor.named_parameters())
    trained_in_anchor = sum(full_numel(param) for name, param in anchor_params.items() if name in anchor_trained)
    trained = sum(full_numel(param) for param in calm.cross_attns.parameters()) + trained_in_anchor
    frozen = sum(full_numel(param) for model in calm.augments for param in model.parameters()) + \
        sum(full_numel(param) for name, param in anchor_params.items() if name not in anchor_trained)
    what_trained = 'the composition and the anchor\'s own trainable parameters (e.g. LoRA)' if trained_in_anchor > 0 else 'the composition'

    front = ['---', 'library_name: calm-compose', 'tags:', '- calm', '- model-composition']
    if is_hub_id(anchor_source):
        front += [f'base_model: {anchor_source}']
    front += ['---', '']

    lines = [
        f'# {name}',
        '',
        'A composition of frozen language models (CALM, Bansal et al. 2024, "LLM Augmented LLMs"): the anchor '
        'cross-attends to hidden states of the augmenting models through trained projections and cross-attention blocks. '
        'This repository holds what was trained (`composition.safetensors`) and how to rebuild the rest (`config.json`); '
        'the frozen models are loaded from their own sources, and checked to be the ones the composition was trained over.',
        '',
        '## Models',
        '',
        '| role | class | source | revision | dtype |',
        '|---|---|---|---|---|',
        '| anchor ' + source_line(config['anchor']),
        *[f'| augment {index} ' + source_line(source) for index, source in enumerate(config['augments'])],
        '',
        '## Wiring',
        '',
        f"Cross-attention: {description['attn_kwargs']['heads']} heads of {description['attn_kwargs']['dim_head']}, "
        f"weights in {description['composition_dtype']}.",
        '',
        '| augment | augment layer | anchor layer | reads the augment layer\'s | writes the anchor layer\'s |',
        '|---|---|---|---|---|',
        *[
            f"| {index} | {augment_layer} | {anchor_layer} | {position} | {description['anchor_hidden_position'][anchor_layer - 1]} |"
            for index, augment in enumerate(description['augments'])
            for (augment_layer, anchor_layer), position in zip(augment['connections'], augment['hidden_positions'])
        ],
        '',
        '## Parameters',
        '',
        f'Trained: {trained:,} ({what_trained}). Frozen: {frozen:,} (the anchor and the augments, unchanged).',
        ''
    ]

    if exists(training) and len(training) > 0:
        lines += ['## Training', '', *training, '']

    lines += [
        '## How to load',
        '',
        '```python',
        'from calm_pytorch import CALM  # pip install "calm-compose @ git+https://github.com/calm-pytorch/calm_pytorch"',
        '',
        f'calm = CALM.from_pretrained({name!r})',
        '```',
        ''
    ]

    if trained_in_anchor > 0:
        lines += ['The anchor was trained with its own adapters (e.g. LoRA), saved in `composition.safetensors`: pass it in, with the same adapters in place: `CALM.from_pretrained(..., anchor = ...)`.', '']

    if any(not source.get('source') for source in (config['anchor'], *config['augments'])):
        lines += ['Models without a recorded source are passed in: `CALM.from_pretrained(..., anchor = ..., augments = [...])`.', '']

    return '\n'.join(front + lines)
