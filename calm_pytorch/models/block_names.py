from __future__ import annotations

import difflib
from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch.nn import Module, ModuleList, Sequential

# wiring by module names: blocks may be given as the names `model.named_modules()` reports, or as
# glob patterns over them. A `*` matches within one dotted component, so "model.layers.*" is the
# blocks and not their submodules; a name or pattern matching one ModuleList means its entries

BlockSpec = str | Module

def is_named(blocks) -> bool:
    return isinstance(blocks, str) or (isinstance(blocks, (list, tuple)) and any(isinstance(block, str) for block in blocks))

def matches(pattern: str, name: str) -> bool:
    pattern_parts, name_parts = pattern.split('.'), name.split('.')
    return len(pattern_parts) == len(name_parts) and all(fnmatchcase(part, glob) for part, glob in zip(name_parts, pattern_parts))

def nearest_names(pattern: str, names: Sequence[str], count: int = 5) -> list[str]:
    # compare against the literal part of the pattern too: "model.layer.*" is near "model.layers"
    literal = pattern.split('*')[0].rstrip('.')
    close = difflib.get_close_matches(pattern, names, n = count, cutoff = 0.5)
    close += difflib.get_close_matches(literal, names, n = count, cutoff = 0.5) if literal else []
    return list(dict.fromkeys(close))[:count]

def resolve_blocks(model: Module, blocks: BlockSpec | Sequence[BlockSpec], *, name: str) -> list[Module]:
    """Module names and glob patterns (mixed with modules if wanted) -> the modules, each once,
    in the order given and, within one pattern, in the model's own order."""

    specs = [blocks] if isinstance(blocks, (str, Module)) else list(blocks)
    named = list(model.named_modules())
    names = [module_name for module_name, _ in named if module_name != '']

    resolved = []

    for spec in specs:
        if isinstance(spec, Module):
            resolved.append(spec)
            continue

        if not isinstance(spec, str):
            raise TypeError(f'the blocks of {name} must be modules or module names, got {type(spec).__name__} {spec!r}')

        found = [module for module_name, module in named if module_name != '' and matches(spec, module_name)]

        if len(found) == 0:
            lists = [f'{module_name!r} ({len(module)} x {type(module[0]).__name__})' for module_name, module in named if isinstance(module, ModuleList) and len(module) > 0]
            near = ', '.join(repr(candidate) for candidate in nearest_names(spec, names)) or 'none'
            raise ValueError(
                f'no module of {name} ({type(model).__name__}) is named {spec!r}; nearest names: {near}. '
                f'Its module lists: {", ".join(lists) or "none"}. A `*` matches one dotted component, e.g. "model.layers.*"'
            )

        # one container named: its entries are the blocks
        if len(found) == 1 and isinstance(found[0], (ModuleList, Sequential)):
            found = list(found[0])

        resolved.extend(found)

    return list({id(module): module for module in resolved}.values())
