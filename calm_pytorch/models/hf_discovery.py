from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.nn import Module, ModuleList

from calm_pytorch.helpers import exists

# Hugging Face transformers models: where their blocks are.
# `transformers` is never imported here: a model can only be a transformers model if its modeling
# code was already imported, so we look it up in sys.modules and the library stays optional.

BLOCKS_HINT = (
    'pass the blocks yourself: by name or glob pattern, e.g. `transformer_blocks="model.layers.*"` '
    '(`anchor_transformer_blocks=` for the anchor), as modules, or with `extract_blocks_fn=lambda model: model.model.layers`'
)

def is_hf_model(model: Module) -> bool:
    modeling_utils = sys.modules.get('transformers.modeling_utils')

    if not exists(modeling_utils):
        return False

    pretrained = getattr(modeling_utils, 'PreTrainedModel', None)
    return isinstance(pretrained, type) and isinstance(model, pretrained)

def loaded_from_dir(model: Module) -> str | None:
    """The absolute path of the local directory a transformers model was loaded from (its config
    keeps the path as given, relative to the directory the process was in then), else None."""

    name = getattr(getattr(model, 'config', None), 'name_or_path', None)
    return str(Path(name).resolve()) if is_hf_model(model) and isinstance(name, str) and name and Path(name).is_dir() else None

def text_config(model: Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, 'get_text_config') else config

def is_encoder_decoder(model: Module) -> bool:
    return bool(getattr(model.config, 'is_encoder_decoder', False))

# discovery
#
# measured on transformers 5.23 over 25 tiny models: the blocks are the ModuleList, inside the
# decoder (or the encoder of an encoder-decoder), whose entries are the class that HF itself
# records hidden states from (`_can_record_outputs`) or will not split across devices
# (`_no_split_modules`), and whose length is the configured depth. The longest homogeneous list
# alone picks the vision tower of Llava and the decoder of a full T5

def discovery_root(model: Module) -> Module:
    getter = 'get_encoder' if is_encoder_decoder(model) else 'get_decoder'

    try:
        root = getattr(model, getter)()
    except (AttributeError, NotImplementedError, TypeError):
        return model

    return root if isinstance(root, Module) else model

def block_classes(*modules: Module) -> tuple[tuple[type, ...], set[str]]:
    classes, names = [], set()

    for module in modules:
        recorded = (getattr(type(module), '_can_record_outputs', None) or {}).get('hidden_states')
        recorded = getattr(recorded, 'target_class', recorded)

        if isinstance(recorded, type):
            classes.append(recorded)

        names.update(getattr(module, '_no_split_modules', None) or ())

    return tuple(classes), names

def module_lists(model: Module) -> list[tuple[str, ModuleList]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, ModuleList) and len(module) > 0]

def describe_lists(lists: Sequence[tuple[str, ModuleList]]) -> str:
    return ', '.join(f'{name!r} ({len(module)} x {type(module[0]).__name__})' for name, module in lists) or 'none'

def find_hf_blocks(model: Module) -> tuple[str, ModuleList]:
    """Returns the name and the ModuleList of the transformer blocks of a transformers model:
    a decoder-only LM, an encoder, a vision encoder, the encoder of an encoder-decoder, or the
    language model of a multimodal model."""

    depth = getattr(text_config(model), 'num_hidden_layers', None)
    root = discovery_root(model)
    classes, class_names = block_classes(root, model)

    def is_block(module: Module) -> bool:
        return isinstance(module, classes) or type(module).__name__ in class_names

    all_lists = module_lists(model)
    root_ids = {id(module) for module in root.modules()}
    under_root = [(name, blocks) for name, blocks in all_lists if id(blocks) in root_ids]

    def of_depth(lists):
        return [(name, blocks) for name, blocks in lists if not exists(depth) or len(blocks) == depth]

    def homogeneous(blocks: ModuleList) -> bool:
        return len({type(block) for block in blocks}) == 1

    # most specific first: block classes under the root, anywhere, then any homogeneous list of the right depth

    pools = [
        [(name, blocks) for name, blocks in under_root if all(map(is_block, blocks))],
        [(name, blocks) for name, blocks in all_lists if all(map(is_block, blocks))],
        [(name, blocks) for name, blocks in under_root if homogeneous(blocks)] if exists(depth) else [],
    ]

    for pool in pools:
        matching = of_depth(pool)

        if len(matching) == 1:
            return matching[0]

        if len(matching) > 1:
            raise ValueError(
                f'{type(model).__name__} has several candidate block lists of depth {depth}: {describe_lists(matching)}; '
                f'choose one and {BLOCKS_HINT}'
            )

    raise ValueError(
        f'could not find the transformer blocks of {type(model).__name__}: no module list of its configured depth '
        f'(num_hidden_layers = {depth}) holds its block class ({", ".join(sorted({*class_names, *(c.__name__ for c in classes)})) or "unknown"}). '
        f'Its module lists: {describe_lists(all_lists)}. {BLOCKS_HINT}'
    )
