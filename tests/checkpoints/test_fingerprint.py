from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import decoder, tokens
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

import calm_pytorch.checkpoints.file_format as file_format
from calm_pytorch import CALM, AugmentParams, CompositionMismatchError, read_wiring
from calm_pytorch.checkpoints.contents import FORMAT
from calm_pytorch.checkpoints.fingerprint import identity_differences, model_identity

ATTN = dict(heads = 2, dim_head = 16)

def compose(anchor, augment) -> CALM:
    return CALM(anchor, AugmentParams(model = augment), attn_kwargs = ATTN)

def trained(calm: CALM) -> CALM:
    with torch.no_grad():
        for param in calm.cross_attns.parameters():
            param.normal_(std = 0.1)
    return calm

def composition(calm: CALM) -> dict[str, torch.Tensor]:
    return {key: tensor.clone() for key, tensor in calm.composition_state_dict().items()}

def same(calm: CALM, snapshot: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(tensor, snapshot[key]) for key, tensor in calm.composition_state_dict().items())

def copy_of(model: nn.Module, perturb: str | None = None) -> nn.Module:
    # the same model, or the same shapes with one tensor's values changed
    other = decoder(dim = model.attn_layers.dim, depth = len(model.attn_layers.layers) // 2)
    other.load_state_dict(model.state_dict())

    if perturb is not None:
        with torch.no_grad():
            dict(other.named_parameters())[perturb].add_(1e-3)

    return other

@pytest.fixture
def saved(anchor, augment, tmp_path):
    calm = trained(compose(anchor, augment))
    return calm, calm.save(tmp_path / 'composition.safetensors')

def test_the_checkpoint_holds_the_identity_of_each_frozen_model(saved):
    _, path = saved
    models = read_wiring(path)['models']

    assert models['anchor']['model'] == 'TransformerWrapper'
    assert (models['anchor']['layers'], models['anchor']['widths'], models['anchor']['vocab_size']) == (4, [32], 256)
    assert (models['augments'][0]['layers'], models['augments'][0]['widths']) == (8, [24])
    assert models['anchor']['weights'] != models['augments'][0]['weights']

def test_a_copy_of_the_same_models_loads_without_a_warning(saved, anchor, augment):
    calm, path = saved
    fresh = compose(copy_of(anchor), copy_of(augment))

    with warnings.catch_warnings():
        warnings.simplefilter('error')
        fresh.load(path)

    seq = tokens()
    assert torch.equal(fresh(seq, return_loss = False), calm(seq, return_loss = False))

@pytest.mark.parametrize('which', ['anchor', 'augment'])
def test_other_weights_of_the_same_shapes_are_an_error_naming_the_model(saved, anchor, augment, which):
    _, path = saved
    perturbed = 'attn_layers.layers.2.1.to_q.weight'  # one tensor of one layer
    models = (copy_of(anchor, perturbed), copy_of(augment)) if which == 'anchor' else (copy_of(anchor), copy_of(augment, perturbed))
    fresh = compose(*models)
    before = composition(fresh)

    name = 'anchor' if which == 'anchor' else 'augment 0'
    other = 'augment 0' if which == 'anchor' else 'anchor'

    with pytest.raises(CompositionMismatchError, match = rf'trained over other frozen models .*\n  - {name}: its weights differ \(fingerprint \w+ in the checkpoint, \w+ here\): same shapes, other values\n') as error:
        fresh.load(path)

    assert f'{other}:' not in str(error.value)
    assert 'strict_models = False' in str(error.value)
    assert same(fresh, before)

    # the opt-out loads, with the same message as a warning
    with pytest.warns(UserWarning, match = f'{name}: its weights differ'):
        fresh.load(path, strict_models = False)

    assert not same(fresh, before)

def test_other_class_depth_and_vocabulary_are_named(saved):
    _, path = saved
    other_anchor = nn_anchor()
    other = CALM(other_anchor, AugmentParams(model = decoder(dim = 24, depth = 8)), anchor_transformer_blocks = other_anchor.blocks, attn_kwargs = ATTN, )

    with pytest.raises(CompositionMismatchError) as error:
        other.load(path)

    message = str(error.value)
    assert "anchor: class 'TransformerWrapper' in the checkpoint, 'Plain' here" in message
    assert 'anchor: vocabulary size 256 in the checkpoint, None here' in message
    assert 'anchor: its tensors (names and shapes) differ' in message
    assert 'augment 0: its weights differ' in message

class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(256, 32)
        self.blocks = nn.ModuleList([nn.Linear(32, 32) for _ in range(4)])
        self.head = nn.Linear(32, 256)

    def forward(self, x):
        x = self.emb(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

def nn_anchor():
    return Plain()

def test_a_cast_copy_is_named_and_loads_with_the_opt_out(saved, anchor, augment):
    _, path = saved
    fresh = compose(copy_of(anchor).to(torch.bfloat16), copy_of(augment))

    with pytest.raises(CompositionMismatchError, match = 'anchor: its weights are bfloat16 here, float32 in the checkpoint, so their values cannot be compared'):
        fresh.load(path)

    with pytest.warns(UserWarning, match = 'anchor: its weights are bfloat16'):
        fresh.load(path, strict_models = False)

def without_identity(path):
    # a checkpoint as calm-compose wrote it before the identity: the same file without `models`
    raw = path.read_bytes()
    metadata = json.loads(raw[8:8 + int.from_bytes(raw[:8], 'little')])['__metadata__']
    wiring = json.loads(metadata['calm_wiring'])
    del wiring['models']

    tensors = load_safetensors(raw)
    wiring_json = json.dumps(wiring, sort_keys = True)
    header, data = file_format.split_file(save_safetensors(tensors, metadata = dict(format = 'pt')), path)
    metadata = dict(format = 'pt', calm_format = FORMAT, calm_wiring = wiring_json, calm_sha256 = file_format.digest(wiring_json, header, data))
    path.write_bytes(save_safetensors(tensors, metadata = metadata))

def test_an_old_checkpoint_without_identity_loads_with_a_warning(saved, anchor, augment):
    calm, path = saved
    without_identity(path)
    other = compose(copy_of(anchor, 'attn_layers.layers.2.1.to_q.weight'), copy_of(augment))

    with pytest.warns(UserWarning, match = 'without the identity of its frozen models') as record:
        other.load(path)

    # named at the user's line, not inside the package or its type check's wrapper
    assert [warning.filename for warning in record] == [__file__]

    assert torch.equal(other.composition_state_dict()['cross_attns.0.0.to_q.weight'], calm.composition_state_dict()['cross_attns.0.0.to_q.weight'])

# the fingerprint itself

def test_the_fingerprint_samples_every_tensor_and_reads_them_in_place():
    model = decoder()
    identity = model_identity(model, layers = 4, widths = [32], vocab_size = 256)

    # a change at a sampled position of any tensor (the first element is always sampled)
    for name, param in model.named_parameters():
        original = param.detach().clone()
        with torch.no_grad():
            param.view(-1)[0] += 1.
        assert model_identity(model, layers = 4, widths = [32], vocab_size = 256)['weights'] != identity['weights'], name
        with torch.no_grad():
            param.copy_(original)

    assert model_identity(model, layers = 4, widths = [32], vocab_size = 256) == identity

    # a non-contiguous parameter holds the same values: the same fingerprint
    weight = model.to_logits.weight
    model.to_logits.weight = nn.Parameter(weight.detach().t().contiguous().t())
    assert not model.to_logits.weight.is_contiguous()
    assert model_identity(model, layers = 4, widths = [32], vocab_size = 256) == identity

def test_tensors_that_cannot_be_read_count_by_name_shape_and_dtype():
    real = decoder()

    with torch.device('meta'):
        meta = decoder()

    real_identity = model_identity(real, layers = 4, widths = [32], vocab_size = 256)
    meta_identity = model_identity(meta, layers = 4, widths = [32], vocab_size = 256)
    num_tensors = len(list(real.parameters())) + len(list(real.buffers()))

    assert real_identity['unread'] == 0 and meta_identity['unread'] == num_tensors
    assert meta_identity['tensors'] == real_identity['tensors']

    # the weights cannot be compared: a warning, not a difference
    differences, warnings = identity_differences(real_identity, meta_identity)
    assert differences == []
    assert warnings == [f'its weights could not be compared: 0 tensors were unreadable (meta device, quantized or sharded) when saved, {num_tensors} here']

    # a tensor subclass (quantized weights, DTensor shards) is not indexed either
    class Packed(torch.Tensor):
        pass

    real.to_logits.weight = nn.Parameter(real.to_logits.weight.detach().as_subclass(Packed), requires_grad = False)
    assert model_identity(real, layers = 4, widths = [32], vocab_size = 256)['unread'] == 1
