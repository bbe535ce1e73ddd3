from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
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
from calm_pytorch.fingerprint import composition_identities, models_differences
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
    """safetensors layout: 8 bytes little-endian header length, the JSON header, then the tensor bytes.
    The header is checked to describe exactly the tensor bytes that follow."""

    if len(raw) < 8:
        raise CheckpointError(f'{path} is truncated or not a safetensors file: it holds {len(raw)} bytes, fewer than the 8-byte header length')

    header_len = int.from_bytes(raw[:8], 'little')

    if 8 + header_len > len(raw):
        raise CheckpointError(f'{path} is truncated or not a safetensors file: its header claims {header_len} bytes but the file holds {len(raw)}')

    try:
        header = json.loads(raw[8:8 + header_len].decode('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f'{path} is corrupted or not a safetensors file: its header is not valid JSON ({error})') from None

    if not isinstance(header, dict):
        raise CheckpointError(f'{path} is corrupted or not a safetensors file: its header is not a JSON object')

    data = raw[8 + header_len:]
    check_index(header, len(data), path)
    return header, data

# the shape of a header. Valid JSON of the wrong shape (a list where an object belongs, one offset
# where two do: one flipped bit turns `[0,64]` into `[0.64]`) is a damaged file like any other

DTYPE_SIZES = dict(
    BOOL = 1, U8 = 1, I8 = 1, F8_E4M3 = 1, F8_E5M2 = 1, I16 = 2, U16 = 2, F16 = 2, BF16 = 2,
    I32 = 4, U32 = 4, F32 = 4, I64 = 8, U64 = 8, F64 = 8
)

def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0

def check_index(header: dict, data_len: int, path: Path):
    """Every tensor entry is {dtype, shape, data_offsets} of a consistent size, and together they
    cover the tensor bytes exactly, without gaps or overlaps (as safetensors writes them)."""

    def corrupted(problem: str):
        raise CheckpointError(f'{path} is corrupted or not a safetensors file: {problem}')

    spans = []

    for key, info in header.items():
        if key == '__metadata__':
            continue

        if not isinstance(info, dict) or set(info) != {'dtype', 'shape', 'data_offsets'}:
            corrupted(f'the entry of {key!r} is not an object of dtype, shape and data_offsets')

        dtype, shape, offsets = info['dtype'], info['shape'], info['data_offsets']

        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            corrupted(f'{key!r} has the unknown dtype {dtype!r}')

        if not isinstance(shape, list) or not all(map(is_count, shape)):
            corrupted(f'{key!r} has the shape {shape!r}, not a list of sizes')

        if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(is_count, offsets)) or offsets[0] > offsets[1]:
            corrupted(f'{key!r} has the data_offsets {offsets!r}, not [start, end]')

        if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_SIZES[dtype]:
            corrupted(f'{key!r} spans {offsets[1] - offsets[0]} bytes, but a {dtype} tensor of shape {shape} needs {math.prod(shape) * DTYPE_SIZES[dtype]}')

        spans.append(tuple(offsets))

    end = 0

    for start, stop in sorted(spans):
        if start != end:
            corrupted(f'its tensors leave a gap or overlap at byte {min(start, end)} of the data')
        end = stop

    if end != data_len:
        raise CheckpointError(f'{path} is truncated or corrupted: its header describes {end} bytes of tensors, the file holds {data_len}')

METADATA_KEYS = {'format', 'calm_format', 'calm_wiring', 'calm_sha256'}

def read_header(raw: bytes, path: Path) -> tuple[dict, dict, bytes]:
    header, data = split_file(raw, path)
    metadata = header.get('__metadata__', {})

    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise CheckpointError(f'{path} is corrupted or not a safetensors file: its __metadata__ is not an object of strings')

    if metadata.get('calm_format') != FORMAT or 'calm_wiring' not in metadata or 'calm_sha256' not in metadata:
        raise CheckpointError(f'{path} is a safetensors file but not a calm composition checkpoint (no calm wiring in its metadata); write one with `calm.save(path)`')

    # the checksum covers the wiring, the tensors and their index; the rest of the metadata is fixed
    if set(metadata) != METADATA_KEYS or metadata['format'] != 'pt':
        raise CheckpointError(f'{path} is corrupted: its metadata holds {sorted(metadata)} (format {metadata.get("format")!r}), a composition checkpoint {sorted(METADATA_KEYS)} (format \'pt\')')

    return header, metadata, data

@typecheck
def read_wiring(path: str | os.PathLike) -> dict[str, Any]:
    """The wiring stored in a composition checkpoint, without loading its weights."""
    path = Path(path)
    return verified_wiring(read_bytes(path), path)

def verified_wiring(raw: bytes, path: Path) -> dict[str, Any]:
    """The wiring of the checkpoint `raw`, once its structure and checksum hold (no torch involved)."""

    header, metadata, data = read_header(raw, path)
    wiring_json = metadata['calm_wiring']

    if digest(wiring_json, header, data) != metadata['calm_sha256']:
        raise CheckpointError(f'{path} is corrupted: its content does not match the checksum written with it')

    return parse_wiring(wiring_json, path)

def parse_wiring(wiring_json: str, path: Path) -> dict[str, Any]:
    try:
        wiring = json.loads(wiring_json)
    except (json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f'{path} is corrupted: its wiring is not valid JSON ({error})') from None

    version = wiring.get('format_version', 0) if isinstance(wiring, dict) else None

    if not is_count(version):
        raise CheckpointError(f'{path} is corrupted: its wiring is not an object with a format_version')

    if version > FORMAT_VERSION:
        raise CheckpointError(
            f'{path} has checkpoint format version {version}, written by calm-compose {wiring.get("library_version")}; '
            f'this calm-compose ({library_version()}) reads up to version {FORMAT_VERSION}: upgrade calm-compose'
        )

    check_wiring_shape(wiring, path)
    return wiring

def check_wiring_shape(wiring: dict, path: Path):
    # what matching a checkpoint to a composition reads: augments, each with its connections
    augments = wiring.get('augments')

    def well_formed(augment) -> bool:
        connections = augment.get('connections') if isinstance(augment, dict) else None
        return isinstance(connections, list) and all(
            isinstance(connection, dict) and is_count(connection.get('augment_layer')) and is_count(connection.get('anchor_layer'))
            for connection in connections
        )

    if not isinstance(augments, list) or not all(map(well_formed, augments)):
        raise CheckpointError(f'{path} is corrupted: its wiring does not list augments, each with connections of an augment_layer and an anchor_layer')

    # the identity of the frozen models (absent from checkpoints of calm-compose before it)
    models = wiring.get('models', dict(anchor = {}, augments = [{}] * len(augments)))

    if not (
        isinstance(models, dict) and isinstance(models.get('anchor'), dict) and isinstance(models.get('augments'), list) and
        len(models['augments']) == len(augments) and all(isinstance(one, dict) for one in models['augments'])
    ):
        raise CheckpointError(f'{path} is corrupted: its wiring does not hold the identity of the anchor and of each of its {len(augments)} augments')

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
    wiring_json = json.dumps(composition_wiring(calm) | dict(models = composition_identities(calm)), sort_keys = True)

    # the tensor bytes do not depend on the metadata: serialise once to hash them, then again with the hash

    metadata = dict(format = 'pt', calm_format = FORMAT, calm_wiring = wiring_json)
    header, data = split_file(save_safetensors(tensors, metadata = metadata), path)
    raw = save_safetensors(tensors, metadata = {**metadata, 'calm_sha256': digest(wiring_json, header, data)})

    return atomic_write_bytes(path, raw)

@typecheck
def load_composition(calm: CALM, path: str | os.PathLike, strict_models: bool = True) -> dict[str, Any]:
    """Loads composition weights saved by `save_composition` into `calm`, whose frozen models and
    wiring must match the saved one. Everything is checked before any weight is touched: on error
    `calm` is unchanged. Returns the checkpoint's wiring.

    strict_models: frozen models other than those the checkpoint was trained over (another class,
    depth, vocabulary, or the same shapes with other weights) are an error; False makes it a warning"""

    path = Path(path)
    raw = read_bytes(path)
    wiring = verified_wiring(raw, path)

    try:
        tensors = load_safetensors(raw)
    except SafetensorError as error:
        raise CheckpointError(f'{path} is corrupted: safetensors could not read it ({error})') from None

    check_fits(calm, wiring, tensors, path)
    check_models(calm, wiring, path, strict_models)

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

def check_models(calm: CALM, saved: dict[str, Any], path: Path, strict: bool):
    if 'models' not in saved:
        warnings.warn(
            f'{path} was written by calm-compose {saved.get("library_version")} without the identity of its frozen models, so nothing '
            'checks that this composition is over the models it was trained with. Saving it again adds the identity',
            stacklevel = 3
        )
        return

    differences, cannot = models_differences(saved['models'], composition_identities(calm))

    for line in cannot:
        warnings.warn(f'{path}: {line}', stacklevel = 3)

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

    warnings.warn(message, stacklevel = 3)

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
