from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor
from torch.nn import Module

from calm_pytorch.checkpoints.contents import composition_state_dict, composition_wiring
from calm_pytorch.checkpoints.fingerprint import composition_identities, models_differences
from calm_pytorch.helpers import warn_user

class CompositionMismatchError(ValueError):
    """The checkpoint was saved from a composition wired differently from the one it is loaded into."""

MAX_LISTED = 8

# matching a checkpoint to a composition

def check_fits(calm: Module, saved: dict[str, Any], tensors: dict[str, Tensor], path: Path):
    problems = wiring_differences(saved, composition_wiring(calm))

    expected = composition_state_dict(calm)
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())

    if len(missing) > 0:
        problems.append(f'missing keys (in this composition, not in the checkpoint): {listed(missing)}')

    if len(unexpected) > 0:
        problems.append(f'unexpected keys (in the checkpoint, not in this composition): {listed(unexpected)}')

    shapes = [
        f'{key} {tuple(tensors[key].shape)} in the checkpoint, {tuple(expected[key].shape)} here'
        for key in sorted(expected.keys() & tensors.keys())
        if tuple(tensors[key].shape) != tuple(expected[key].shape)
    ]

    if len(shapes) > 0:
        problems.append(f'tensor shapes differ: {listed(shapes, sep = "; ")}')

    if len(problems) == 0:
        return

    details = '\n'.join(f'  - {problem}' for problem in problems)

    raise CompositionMismatchError(
        f'the checkpoint {path} does not fit this composition:\n{details}\n'
        'Build the CALM over the same models with the same connections, hidden positions and attn_kwargs as the one saved '
        f'(the saved wiring: calm_pytorch.read_wiring({str(path)!r}))'
    )

def check_models(calm: Module, saved: dict[str, Any], path: Path, strict: bool, cast: bool = False):
    if 'models' not in saved:
        warn_user(
            f'{path} was written by calm-compose {saved.get("library_version")} without the identity of its frozen models, so nothing '
            'checks that this composition is over the models it was trained with. Saving it again adds the identity'
        )
        return

    differences, cannot = models_differences(saved['models'], composition_identities(calm), cast)

    for line in cannot:
        warn_user(f'{path}: {line}')

    if len(differences) == 0:
        return

    details = '\n'.join(f'  - {line}' for line in differences)
    message = (
        f'the checkpoint {path} was trained over other frozen models than this composition\'s:\n{details}\n'
        'Its cross-attention learned to read those models; over others its output means nothing. Build the CALM over the models it was trained with, '
        'or, if these are the same models in another form (cast to another dtype, re-quantized), load with `strict_models = False`'
    )

    if strict:
        raise CompositionMismatchError(message)

    warn_user(message)

def wiring_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    saved_augments, current_augments = saved.get('augments', []), current['augments']

    if len(saved_augments) != len(current_augments):
        return [f'the checkpoint composes {len(saved_augments)} augment(s), this composition {len(current_augments)}']

    problems = []

    for index, (saved_augment, current_augment) in enumerate(zip(saved_augments, current_augments)):
        saved_connections = {(c['augment_layer'], c['anchor_layer']): c for c in saved_augment['connections']}
        current_connections = {(c['augment_layer'], c['anchor_layer']): c for c in current_augment['connections']}

        if list(saved_connections) != list(current_connections):
            problems.append(
                f'augment {index}: connections (augment layer, anchor layer) are {pairs(saved_connections)} in the checkpoint, '
                f'{pairs(current_connections)} in this composition'
            )

        for pair in saved_connections.keys() & current_connections.keys():
            for field, value in saved_connections[pair].items():
                if current_connections[pair].get(field) != value:
                    problems.append(
                        f'augment {index}, augment layer {pair[0]} -> anchor layer {pair[1]}: '
                        f'{field} is {value!r} in the checkpoint, {current_connections[pair].get(field)!r} in this composition'
                    )

    return problems

def pairs(connections: dict) -> str:
    return ', '.join(f'({a}, {b})' for a, b in connections) or 'none'

def listed(keys: list[str], sep: str = ', ') -> str:
    shown = sep.join(keys[:MAX_LISTED])
    return shown if len(keys) <= MAX_LISTED else f'{shown} and {len(keys) - MAX_LISTED} more'
