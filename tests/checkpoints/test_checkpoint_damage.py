from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import decoder
from safetensors.torch import save as save_safetensors

import calm_pytorch.checkpoints.file_format as file_format
from calm_pytorch import CALM, AugmentParams, CheckpointError

# every damaged file is a CheckpointError and loads nothing: whatever the damage, including
# headers that are valid JSON of the wrong shape

MODELS = {}

def tiny() -> CALM:
    # every composition of a test over the same frozen models, as a checkpoint expects
    if 'anchor' not in MODELS:
        MODELS.update(anchor = decoder(dim = 16, depth = 2), augment = decoder(dim = 16, depth = 4))

    calm = CALM(MODELS['anchor'], AugmentParams(model = MODELS['augment']), attn_kwargs = dict(heads = 1, dim_head = 8))

    with torch.no_grad():
        for param in calm.cross_attns.parameters():
            param.normal_()

    return calm

@pytest.fixture(autouse = True)
def fresh_models():
    MODELS.clear()
    yield
    MODELS.clear()

def snapshot(calm: CALM) -> dict[str, torch.Tensor]:
    return {key: tensor.clone() for key, tensor in calm.composition_state_dict().items()}

def unchanged(calm: CALM, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(tensor, before[key]) for key, tensor in calm.composition_state_dict().items())

def header_of(raw: bytes) -> dict:
    return json.loads(raw[8:8 + int.from_bytes(raw[:8], 'little')])

def with_header(raw: bytes, header: dict) -> bytes:
    data = raw[8 + int.from_bytes(raw[:8], 'little'):]
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, 'little') + encoded + data

def flipped(raw: bytes, byte: int, bit: int) -> bytes:
    damaged = bytearray(raw)
    damaged[byte] ^= 1 << bit
    return bytes(damaged)

def test_every_bit_flip_of_the_header_and_of_sampled_tensor_bytes_is_an_error(tmp_path):
    calm = tiny()
    path = calm.save(tmp_path / 'composition.safetensors')
    raw = path.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], 'little')  # the length prefix and the JSON header

    rng = random.Random(0)
    tensor_flips = [(rng.randrange(header_end, len(raw)), rng.randrange(8)) for _ in range(300)]
    header_flips = [(byte, bit) for byte in range(header_end) for bit in range(8)]

    # the checks `load` runs before any weight is touched, on every damaged file (without torch: fast)
    for byte, bit in header_flips + tensor_flips:
        with pytest.raises(CheckpointError):
            file_format.verified_wiring(flipped(raw, byte, bit), path)

    # and the whole `load` on a sample of them: an error, and the weights of the composition unchanged
    fresh = tiny()
    before = snapshot(fresh)

    for byte, bit in rng.sample(header_flips, 100) + tensor_flips[:50]:
        path.write_bytes(flipped(raw, byte, bit))

        with pytest.raises(CheckpointError):
            fresh.load(path)

    assert unchanged(fresh, before)

    path.write_bytes(raw)  # the undamaged file loads
    fresh.load(path)
    assert not unchanged(fresh, before)

def reshaped(raw: bytes, change) -> bytes:
    header = header_of(raw)
    change(header)
    return with_header(raw, header)

def first_tensor(header: dict) -> dict:
    return header[next(key for key in header if key != '__metadata__')]

def set_wiring(value):
    # a wiring of the wrong shape with a checksum that matches it, as a hand-made file would carry
    def change(header):
        wiring_json = json.dumps(value)
        index = {key: info for key, info in header.items() if key != '__metadata__'}
        header['__metadata__']['calm_wiring'] = wiring_json
        header['__metadata__']['calm_sha256'] = file_format.digest(wiring_json, index, DATA[0])
    return change

DATA = [b'']

@pytest.mark.parametrize('change, message', [
    (lambda header: header.update(__metadata__ = 'calm'), 'its __metadata__ is not an object of strings'),
    (lambda header: header.update(__metadata__ = ['calm-composition']), 'its __metadata__ is not an object of strings'),
    (lambda header: header['__metadata__'].update(calm_wiring = 5), 'its __metadata__ is not an object of strings'),
    (lambda header: header['__metadata__'].update(format = 'pu'), r"its metadata holds .*\(format 'pu'\)"),
    (lambda header: header['__metadata__'].update(extra = 'x'), 'its metadata holds'),
    (lambda header: first_tensor(header).update(data_offsets = [0]), r'has the data_offsets \[0\], not \[start, end\]'),
    (lambda header: first_tensor(header).update(data_offsets = [0.5, 64]), r'not \[start, end\]'),
    (lambda header: first_tensor(header).update(shape = 'big'), "has the shape 'big'"),
    (lambda header: first_tensor(header).update(shape = [True]), r'has the shape \[True\]'),
    (lambda header: first_tensor(header).update(dtype = 'F33'), "the unknown dtype 'F33'"),
    (lambda header: first_tensor(header).update(dtype = ['F32']), 'the unknown dtype'),
    (lambda header: first_tensor(header).pop('dtype'), 'is not an object of dtype, shape and data_offsets'),
    (lambda header: header.update(extra = [1, 2]), "the entry of 'extra' is not an object"),
    (lambda header: first_tensor(header).update(shape = [1]), r'spans \d+ bytes, but a F32 tensor of shape \[1\] needs 4'),
    (set_wiring(5), 'its wiring is not an object with a format_version'),
    (set_wiring([]), 'its wiring is not an object with a format_version'),
    (set_wiring(dict(format_version = '1')), 'its wiring is not an object with a format_version'),
    (set_wiring(dict(format_version = 1)), 'its wiring does not list augments'),
    (set_wiring(dict(format_version = 1, augments = {})), 'its wiring does not list augments'),
    (set_wiring(dict(format_version = 1, augments = [dict(connections = [dict(augment_layer = '4', anchor_layer = 2)])])), 'its wiring does not list augments'),
])
def test_headers_of_the_wrong_shape_are_errors(tmp_path, change, message):
    calm = tiny()
    raw = calm.save(tmp_path / 'composition.safetensors').read_bytes()
    DATA[0] = raw[8 + int.from_bytes(raw[:8], 'little'):]

    path = tmp_path / 'damaged.safetensors'
    path.write_bytes(reshaped(raw, change))

    fresh = tiny()
    before = snapshot(fresh)

    with pytest.raises(CheckpointError, match = message):
        fresh.load(path)

    with pytest.raises(CheckpointError, match = message):
        file_format.read_wiring(path)

    assert unchanged(fresh, before)

def test_tensors_that_overlap_or_leave_a_gap_are_errors(tmp_path):
    tensors = dict(a = torch.zeros(4), b = torch.ones(4))
    raw = save_safetensors(tensors, metadata = dict(format = 'pt'))
    header = header_of(raw)
    header['b']['data_offsets'] = [8, 24]
    header['a']['data_offsets'] = [0, 16]

    with pytest.raises(CheckpointError, match = 'leave a gap or overlap at byte 8'):
        file_format.split_file(with_header(raw, header), tmp_path)
