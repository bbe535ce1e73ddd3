from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from calm_pytorch.checkpoints.contents import FORMAT, FORMAT_VERSION, library_version
from calm_pytorch.helpers import typecheck

# reading a composition checkpoint's bytes (see contents.py for what it holds): the safetensors
# layout checked piece by piece, and the checksum, before anything is loaded

class CheckpointError(ValueError):
    """The file is not a readable composition checkpoint: missing, truncated, corrupted, or another format."""

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
