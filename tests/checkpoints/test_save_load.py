from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import calm_pytorch.checkpoints.atomic as atomic
import calm_pytorch.checkpoints.save_load as save_load
from calm_pytorch import CALM, AugmentParams, CheckpointError, CompositionMismatchError, read_wiring

from conftest import decoder, tokens

ATTN = dict(heads = 2, dim_head = 16)

def compose(anchor, augments, **kwargs) -> CALM:
    return CALM(anchor, augments, attn_kwargs = kwargs.pop('attn_kwargs', ATTN), **kwargs)

def trained(calm: CALM) -> CALM:
    # as if trained: a fresh composition is the identity (zero output projections), which would
    # make a load that did nothing pass the round trip
    with torch.no_grad():
        for param in calm.cross_attns.parameters():
            param.normal_(std = 0.1)
    return calm

def composition_snapshot(calm: CALM) -> dict[str, torch.Tensor]:
    return {key: tensor.clone() for key, tensor in calm.composition_state_dict().items()}

def assert_unchanged(calm: CALM, snapshot: dict[str, torch.Tensor]):
    current = calm.composition_state_dict()
    assert current.keys() == snapshot.keys()
    assert all(torch.equal(current[key], snapshot[key]) for key in snapshot)

# round trip

def test_round_trip_restores_logits_exactly(anchor, augment, tmp_path):
    calm = trained(compose(anchor, AugmentParams(model = augment)))
    path = calm.save(tmp_path / 'composition.safetensors')

    fresh = compose(anchor, AugmentParams(model = augment))
    seq = tokens()
    assert not torch.equal(fresh(seq, return_loss = False), calm(seq, return_loss = False))

    fresh.load(path)
    assert torch.equal(fresh(seq, return_loss = False), calm(seq, return_loss = False))

def test_checkpoint_holds_only_the_composition(anchor, augment, tmp_path):
    calm = trained(compose(anchor, AugmentParams(model = augment)))
    path = calm.save(tmp_path / 'composition.safetensors')

    saved = load_file(path)
    composition = dict(calm.cross_attns.named_parameters()) | dict(calm.cross_attns.named_buffers())

    assert len(saved) == len(composition) == len(calm.composition_state_dict())
    assert set(saved) == {f'cross_attns.{key}' for key in composition}

    frozen = {key for key in calm.state_dict() if not key.startswith('cross_attns.')}
    assert len(frozen) > 0 and frozen.isdisjoint(saved)

    wiring = read_wiring(path)
    assert [(c['augment_layer'], c['anchor_layer']) for c in wiring['augments'][0]['connections']] == list(calm.connections[0])
    assert {c['dim_context'] for c in wiring['augments'][0]['connections']} == {24}

def test_round_trip_with_two_augments(anchor, augment, tmp_path):
    second = decoder(dim = 16, depth = 4)
    augments = [AugmentParams(model = augment), AugmentParams(model = second, connections = ((2, 1), (4, 3)))]

    calm = trained(compose(anchor, augments))
    path = calm.save(tmp_path / 'composition.safetensors')

    fresh = compose(anchor, augments)
    fresh.load(path)

    seq = tokens()
    assert torch.equal(fresh(seq, return_loss = False), calm(seq, return_loss = False))

# mismatches: a clear error naming what differs, and nothing loaded

@pytest.mark.parametrize('other, named', [
    (dict(connections = ((4, 1), (8, 4))), ['connections', '(4, 2)', '(4, 1)']),
    (dict(hidden_position = 'input'), ['augment_position', "'output'", "'input'"]),
])
def test_other_connections_are_an_error(anchor, augment, tmp_path, other, named):
    path = trained(compose(anchor, AugmentParams(model = augment))).save(tmp_path / 'composition.safetensors')

    mismatched = compose(anchor, AugmentParams(model = augment, **other))
    before = composition_snapshot(mismatched)

    with pytest.raises(CompositionMismatchError) as error:
        mismatched.load(path)

    assert all(text in str(error.value) for text in named), str(error.value)
    assert_unchanged(mismatched, before)

def test_other_widths_are_an_error(anchor, augment, tmp_path):
    path = trained(compose(anchor, AugmentParams(model = augment))).save(tmp_path / 'composition.safetensors')

    narrower = compose(anchor, AugmentParams(model = decoder(dim = 16, depth = 8)))
    before = composition_snapshot(narrower)

    with pytest.raises(CompositionMismatchError, match = r'dim_context is 24 in the checkpoint, 16 in this composition'):
        narrower.load(path)

    assert_unchanged(narrower, before)

def test_other_heads_and_augment_count_are_errors(anchor, augment, tmp_path):
    path = trained(compose(anchor, AugmentParams(model = augment))).save(tmp_path / 'composition.safetensors')

    with pytest.raises(CompositionMismatchError, match = r'heads is 2 in the checkpoint, 4 in this composition'):
        compose(anchor, AugmentParams(model = augment), attn_kwargs = dict(heads = 4, dim_head = 16)).load(path)

    two = compose(anchor, [AugmentParams(model = augment), AugmentParams(model = decoder(dim = 16, depth = 4))])

    with pytest.raises(CompositionMismatchError, match = r'1 augment\(s\), this composition 2'):
        two.load(path)

def test_missing_keys_are_named(anchor, augment, tmp_path, monkeypatch):
    calm = trained(compose(anchor, AugmentParams(model = augment)))

    # a well-formed checkpoint whose wiring fits but whose tensors lack one
    dropped = 'cross_attns.0.1.to_q.weight'
    full = save_load.composition_state_dict

    with monkeypatch.context() as patch:
        patch.setattr(save_load, 'composition_state_dict', lambda calm: {key: value for key, value in full(calm).items() if key != dropped})
        path = calm.save(tmp_path / 'composition.safetensors')

    fresh = compose(anchor, AugmentParams(model = augment))

    with pytest.raises(CompositionMismatchError, match = r'missing keys .*cross_attns\.0\.1\.to_q\.weight'):
        fresh.load(path)

# damaged files: a clear error, never a partial load

@pytest.mark.parametrize('damage', ['truncate_half', 'truncate_header', 'truncate_tail', 'flip_data_byte', 'flip_header_byte'])
def test_damaged_file_is_an_error(anchor, augment, tmp_path, damage):
    calm = trained(compose(anchor, AugmentParams(model = augment)))
    path = calm.save(tmp_path / 'composition.safetensors')
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], 'little')

    if damage == 'truncate_half':
        raw = raw[:len(raw) // 2]
    elif damage == 'truncate_header':
        raw = raw[:5]
    elif damage == 'truncate_tail':
        raw = raw[:-1]
    elif damage == 'flip_data_byte':
        raw[8 + header_len + (len(raw) - 8 - header_len) // 2] ^= 0xFF
    elif damage == 'flip_header_byte':
        raw[8 + header_len // 2] ^= 0x01

    path.write_bytes(bytes(raw))

    fresh = compose(anchor, AugmentParams(model = augment))
    before = composition_snapshot(fresh)

    with pytest.raises(CheckpointError, match = r'truncated|corrupted'):
        fresh.load(path)

    assert_unchanged(fresh, before)

def test_other_files_are_refused_without_unpickling(anchor, augment, tmp_path):
    calm = compose(anchor, AugmentParams(model = augment))

    plain = tmp_path / 'plain.safetensors'
    save_file({'weight': torch.zeros(2)}, plain)

    with pytest.raises(CheckpointError, match = 'not a calm composition checkpoint'):
        calm.load(plain)

    # a pickle that would run code when unpickled: never unpickled
    class Payload:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled')",))

    pickled = tmp_path / 'pickled.pt'
    torch.save({'payload': Payload()}, pickled)

    with pytest.raises(CheckpointError):
        calm.load(pickled)

    with pytest.raises(FileNotFoundError, match = 'no composition checkpoint'):
        calm.load(tmp_path / 'absent.safetensors')

# atomic writes

def test_failed_write_leaves_previous_checkpoint(anchor, augment, tmp_path, monkeypatch):
    calm = trained(compose(anchor, AugmentParams(model = augment)))
    path = calm.save(tmp_path / 'composition.safetensors')
    previous = path.read_bytes()
    seq = tokens()
    expected = calm(seq, return_loss = False)

    trained(calm)  # new weights, whose save will fail halfway

    def write_half_then_fail(handle, data):
        handle.write(data[:len(data) // 2])
        raise OSError('disk full (simulated)')

    monkeypatch.setattr(atomic, 'write_chunks', write_half_then_fail)

    with pytest.raises(OSError, match = 'simulated'):
        calm.save(path)

    monkeypatch.undo()

    assert path.read_bytes() == previous
    assert [file.name for file in tmp_path.iterdir()] == [path.name]  # no temporary file left behind

    fresh = compose(anchor, AugmentParams(model = augment))
    fresh.load(path)
    assert torch.equal(fresh(seq, return_loss = False), expected)

def test_failed_rename_leaves_previous_checkpoint(anchor, augment, tmp_path, monkeypatch):
    calm = trained(compose(anchor, AugmentParams(model = augment)))
    path = calm.save(tmp_path / 'composition.safetensors')
    previous = path.read_bytes()

    trained(calm)

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, 'replace', crash)

    with pytest.raises(KeyboardInterrupt):
        calm.save(path)

    monkeypatch.undo()

    assert path.read_bytes() == previous
    assert [file.name for file in tmp_path.iterdir()] == [path.name]

def test_a_directory_or_a_file_in_the_way_is_named(anchor, augment, tmp_path):
    calm = compose(anchor, augment)
    (tmp_path / 'a_dir').mkdir()
    (tmp_path / 'a_file').write_text('')

    with pytest.raises(IsADirectoryError, match = r'a_dir is a directory; a checkpoint is one file'):
        calm.save(tmp_path / 'a_dir')

    with pytest.raises(NotADirectoryError, match = r'a_file is a file, not a directory'):
        calm.save(tmp_path / 'a_file' / 'calm.safetensors')

    assert sorted(path.name for path in tmp_path.iterdir()) == ['a_dir', 'a_file']  # no temporary left

def test_loading_into_a_composition_on_meta_is_refused(anchor, augment, tmp_path):
    path = trained(compose(anchor, augment)).save(tmp_path / 'calm.safetensors')

    with torch.device('meta'):
        meta = compose(decoder(dim = 32, depth = 4), decoder(dim = 32, depth = 4))

    with pytest.raises(ValueError, match = 'on the meta device, which holds no values'):
        meta.load(path)
