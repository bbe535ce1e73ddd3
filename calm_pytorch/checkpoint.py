from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from calm_pytorch.atomic import atomic_write_bytes
from calm_pytorch.calm import CALM
from calm_pytorch.cross_attention import CrossAttentionBlock
from calm_pytorch.helpers import typecheck

# a composition checkpoint is one safetensors file: the tensors are the composition weights
# (`cross_attns.*`, and `anchor.*` for anchor parameters trained with them, e.g. LoRA weights;
# nothing of the frozen models) and its string metadata holds
#   calm_format - 'calm-composition'
#   calm_wiring - JSON: which augment layer feeds which anchor layer, at what widths and heads
#   calm_sha256 - a digest of the wiring, the tensor index and every tensor byte: safetensors has
#                 no checksum of its own, and a flipped byte must not load silently
# One file keeps weights and wiring consistent with each other and lets one rename publish both.
# safetensors holds raw tensors only, so loading never unpickles (never runs code).

FORMAT = 'calm-composition'
FORMAT_VERSION = 1
PREFIX = 'cross_attns.'
ANCHOR_PREFIX = 'anchor.'
MAX_LISTED = 8

class CheckpointError(ValueError):
    """The file is not a readable composition checkpoint: missing, truncated, corrupted, or another format."""

class CompositionMismatchError(ValueError):
    """The checkpoint was saved from a composition wired differently from the one it is loaded into."""

def library_version() -> str:
    try:
        return version('calm-compose')
    except PackageNotFoundError:
        return 'unknown'

# what is saved

def composition_state_dict(calm: CALM) -> dict[str, Tensor]:
    """The composition weights, keyed as in `calm.state_dict()` (`cross_attns.0.1.to_q.weight`, ...),
    and the anchor parameters trained with them (`anchor.*`, e.g. LoRA weights: those the user left
    trainable, see calm_pytorch/trainable.py)."""

    state = {PREFIX + key: tensor for key, tensor in calm.cross_attns.state_dict().items()}
    state |= {ANCHOR_PREFIX + name: param.detach() for name, param in calm.anchor.named_parameters() if param.requires_grad}
    return state

def block_shape(block: CrossAttentionBlock) -> dict[str, int]:
    return dict(
        dim = block.norm.normalized_shape[0],
        dim_context = block.context_norm.normalized_shape[0],
        heads = block.heads,
        dim_head = block.to_q.out_features // block.heads
    )

def composition_wiring(calm: CALM) -> dict[str, Any]:
    """The wiring of a composition, as saved beside its weights: per augment, each connection with
    its layers (1-indexed), hidden positions, widths and heads."""

    augments = []

    for index, (connections, keys, blocks) in enumerate(zip(calm.connections, calm.augment_keys, calm.cross_attns)):
        augments.append(dict(
            model = type(calm.augments[index]).__name__,
            connections = [
                dict(
                    augment_layer = augment_layer,
                    anchor_layer = anchor_layer,
                    augment_position = position,
                    anchor_position = calm.anchor_positions[anchor_layer - 1],
                    **block_shape(block)
                )
                for (augment_layer, anchor_layer), (_, position), block in zip(connections, keys, blocks)
            ]
        ))

    return dict(
        format = FORMAT,
        format_version = FORMAT_VERSION,
        library_version = library_version(),
        anchor = type(calm.anchor).__name__,
        augments = augments
    )

# the file

def digest(wiring_json: str, header: dict, data: bytes) -> str:
    # covers the wiring, every tensor's name, dtype, shape and offsets, and every tensor byte
    index = {key: info for key, info in header.items() if key != '__metadata__'}

    sha = hashlib.sha256()
    sha.update(wiring_json.encode())
    sha.update(json.dumps(index, sort_keys = True).encode())
    sha.update(data)
    return sha.hexdigest()

def split_file(raw: bytes, path: Path) -> tuple[dict, bytes]:
    """safetensors layout: 8 bytes little-endian header length, the JSON header, then the tensor bytes."""

    if len(raw) < 8:
        raise CheckpointError(f'{path} is truncated or not a safetensors file: it holds {len(raw)} bytes, fewer than the 8-byte header length')

    header_len = int.from_bytes(raw[:8], 'little')

    if 8 + header_len > len(raw):
        raise CheckpointError(f'{path} is truncated or not a safetensors file: its header claims {header_len} bytes but the file holds {len(raw)}')

    try:
        header = json.loads(raw[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f'{path} is corrupted or not a safetensors file: its header is not valid JSON ({error})') from None

    if not isinstance(header, dict):
        raise CheckpointError(f'{path} is corrupted or not a safetensors file: its header is not a JSON object')

    data = raw[8 + header_len:]
    ends = [info['data_offsets'][1] for key, info in header.items() if key != '__metadata__' and isinstance(info, dict) and 'data_offsets' in info]
    expected = max(ends, default = 0)

    if len(data) != expected:
        raise CheckpointError(f'{path} is truncated or corrupted: its header describes {expected} bytes of tensors, the file holds {len(data)}')

    return header, data

def read_header(raw: bytes, path: Path) -> tuple[dict, dict, bytes]:
    header, data = split_file(raw, path)
    metadata = header.get('__metadata__') or {}

    if metadata.get('calm_format') != FORMAT or 'calm_wiring' not in metadata or 'calm_sha256' not in metadata:
        raise CheckpointError(f'{path} is a safetensors file but not a calm composition checkpoint (no calm wiring in its metadata); write one with `calm.save(path)`')

    return header, metadata, data

@typecheck
def read_wiring(path: str | os.PathLike) -> dict[str, Any]:
    """The wiring stored in a composition checkpoint, without loading its weights."""
    path = Path(path)
    _, metadata, _ = read_header(read_bytes(path), path)
    return parse_wiring(metadata['calm_wiring'], path)

def parse_wiring(wiring_json: str, path: Path) -> dict[str, Any]:
    try:
        wiring = json.loads(wiring_json)
    except json.JSONDecodeError as error:
        raise CheckpointError(f'{path} is corrupted: its wiring is not valid JSON ({error})') from None

    if wiring.get('format_version', 0) > FORMAT_VERSION:
        raise CheckpointError(
            f'{path} has checkpoint format version {wiring.get("format_version")}, written by calm-compose {wiring.get("library_version")}; '
            f'this calm-compose ({library_version()}) reads up to version {FORMAT_VERSION}: upgrade calm-compose'
        )

    return wiring

def read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f'no composition checkpoint at {path}')

    return path.read_bytes()

@typecheck
def save_composition(calm: CALM, path: str | os.PathLike) -> Path:
    """Writes the composition weights and wiring to `path` atomically: after a crash the file at
    `path` is either the previous checkpoint or the new one, whole."""

    path = Path(path)
    tensors = {key: tensor.detach().cpu().contiguous() for key, tensor in composition_state_dict(calm).items()}
    wiring_json = json.dumps(composition_wiring(calm), sort_keys = True)

    # the tensor bytes do not depend on the metadata: serialise once to hash them, then again with the hash

    metadata = dict(format = 'pt', calm_format = FORMAT, calm_wiring = wiring_json)
    header, data = split_file(save_safetensors(tensors, metadata = metadata), path)
    raw = save_safetensors(tensors, metadata = {**metadata, 'calm_sha256': digest(wiring_json, header, data)})

    return atomic_write_bytes(path, raw)

@typecheck
def load_composition(calm: CALM, path: str | os.PathLike) -> dict[str, Any]:
    """Loads composition weights saved by `save_composition` into `calm`, whose frozen models and
    wiring must match the saved one. Everything is checked before any weight is touched: on error
    `calm` is unchanged. Returns the checkpoint's wiring."""

    path = Path(path)
    raw = read_bytes(path)
    header, metadata, data = read_header(raw, path)
    wiring_json = metadata['calm_wiring']

    if digest(wiring_json, header, data) != metadata['calm_sha256']:
        raise CheckpointError(f'{path} is corrupted: its content does not match the checksum written with it')

    wiring = parse_wiring(wiring_json, path)

    try:
        tensors = load_safetensors(raw)
    except SafetensorError as error:
        raise CheckpointError(f'{path} is corrupted: safetensors could not read it ({error})') from None

    check_fits(calm, wiring, tensors, path)

    anchor_params = dict(calm.anchor.named_parameters())

    with torch.no_grad():
        calm.cross_attns.load_state_dict({key[len(PREFIX):]: tensor for key, tensor in tensors.items() if key.startswith(PREFIX)}, strict = True)

        for key, tensor in tensors.items():
            if key.startswith(ANCHOR_PREFIX):
                anchor_params[key[len(ANCHOR_PREFIX):]].copy_(tensor)

    return wiring

# matching a checkpoint to a composition

def check_fits(calm: CALM, saved: dict[str, Any], tensors: dict[str, Tensor], path: Path):
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
