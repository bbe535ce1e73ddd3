from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch.nn import Module

from calm_pytorch.checkpoints.atomic import atomic_write_bytes
from calm_pytorch.checkpoints.contents import ANCHOR_PREFIX, FORMAT, PREFIX, composition_state_dict, composition_wiring
from calm_pytorch.checkpoints.file_format import CheckpointError, digest, read_bytes, split_file, verified_wiring
from calm_pytorch.checkpoints.fingerprint import composition_identities
from calm_pytorch.checkpoints.matching import check_fits, check_models
from calm_pytorch.checkpoints.zero3 import gathered, refuse_partitioned_load, writes_the_file
from calm_pytorch.helpers import typecheck

@typecheck
def save_composition(calm: Module, path: str | os.PathLike) -> Path:
    """Writes the composition weights and wiring to `path` atomically: after a crash the file at
    `path` is either the previous checkpoint or the new one, whole."""

    path = Path(path)

    # under DeepSpeed ZeRO-3 every process gathers (zero3.py); the first one writes
    with gathered([*calm.cross_attns.parameters(), *(param for param in calm.anchor.parameters() if param.requires_grad)]):
        tensors = {key: tensor.detach().cpu().clone().contiguous() for key, tensor in composition_state_dict(calm).items()}

    wiring_json = json.dumps(composition_wiring(calm) | dict(models = composition_identities(calm)), sort_keys = True)

    if not writes_the_file(calm):
        return path

    # the tensor bytes do not depend on the metadata: serialise once to hash them, then again with the hash

    metadata = dict(format = 'pt', calm_format = FORMAT, calm_wiring = wiring_json)
    header, data = split_file(save_safetensors(tensors, metadata = metadata), path)
    header['__metadata__'] = {**metadata, 'calm_sha256': digest(wiring_json, header, data)}

    return atomic_write_bytes(path, canonical_file(header, data))

def canonical_file(header: dict, data: bytes) -> bytes:
    # safetensors writes the metadata in the order of a hash map, another for each file: with the
    # header's keys sorted, the same composition gives the same bytes
    encoded = json.dumps(header, sort_keys = True, separators = (',', ':')).encode()
    encoded += b' ' * (-len(encoded) % 8)  # the tensor bytes start 8-aligned, as safetensors writes them
    return len(encoded).to_bytes(8, 'little') + encoded + data

@typecheck
def load_composition(calm: Module, path: str | os.PathLike, strict_models: bool = True, cast: bool = False) -> dict[str, Any]:
    """Loads composition weights saved by `save_composition` into `calm`, whose frozen models and
    wiring must match the saved one. Everything is checked before any weight is touched: on error
    `calm` is unchanged. Returns the checkpoint's wiring.

    strict_models: frozen models other than those the checkpoint was trained over (another class,
    depth, vocabulary, or the same shapes with other weights) are an error; False makes it a warning
    cast: the frozen models were loaded in another dtype than saved, on purpose: their weights'
    values cannot be compared (a warning), everything else is"""

    path = Path(path)
    refuse_partitioned_load(calm, path)

    # copying into a tensor on `meta` is a no-op: nothing would be loaded, silently
    if any(param.is_meta for param in calm.cross_attns.parameters()):
        raise ValueError(f'the composition\'s weights are on the meta device, which holds no values, so {path} cannot be loaded into them; materialise them first (calm.to_empty(device = ...)), then load')
    raw = read_bytes(path)
    wiring = verified_wiring(raw, path)

    try:
        tensors = load_safetensors(raw)
    except SafetensorError as error:
        raise CheckpointError(f'{path} is corrupted: safetensors could not read it ({error})') from None

    check_fits(calm, wiring, tensors, path)
    check_models(calm, wiring, path, strict_models, cast)

    anchor_params = dict(calm.anchor.named_parameters())

    with torch.no_grad():
        calm.cross_attns.load_state_dict({key[len(PREFIX):]: tensor for key, tensor in tensors.items() if key.startswith(PREFIX)}, strict = True)

        for key, tensor in tensors.items():
            if key.startswith(ANCHOR_PREFIX):
                anchor_params[key[len(ANCHOR_PREFIX):]].copy_(tensor)

    return wiring
