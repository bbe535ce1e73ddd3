from __future__ import annotations

import pytest
import torch
import transformers
from hf_models import DECODERS, TOKENS, VOCAB
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, DynamicLayer, DynamicSlidingWindowLayer

import calm_pytorch.models.hf_cache as hf_cache
from calm_pytorch import CALM, AugmentParams
from calm_pytorch.models.hf_adapter import cache_kwarg, forward_params
from calm_pytorch.models.hf_cache import SLACK, ReservedLayer, new_cache

# decoding writes a transformers model's keys and values into room reserved ahead: these tests
# compare every cached tensor with transformers' own concatenating layer, and count the rooms

def states(length: int, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, length, 4, generator = generator), torch.randn(batch, 3, length, 5, generator = generator)

def update_both(reserved: ReservedLayer, plain: DynamicLayer, length: int, seed: int, batch: int = 2):
    keys, values = states(length, batch, seed)
    returned = reserved.update(keys, values)
    expected = plain.update(keys, values)

    for got, want in zip((*returned, reserved.keys, reserved.values), (*expected, plain.keys, plain.values)):
        assert torch.equal(got, want)

def test_a_layer_holds_what_concatenation_holds_in_one_room_of_the_hinted_size():
    reserved, plain = ReservedLayer(capacity = 12), DynamicLayer()
    update_both(reserved, plain, 5, seed = 0)
    room = reserved.room[0].data_ptr()

    for step in range(7):
        update_both(reserved, plain, 1, seed = step + 1)

    assert reserved.reservations == 1
    assert reserved.room[0].shape[-2] == 12
    assert reserved.keys.data_ptr() == room  # written in place, never copied
    assert reserved.get_seq_length() == 12

def test_without_a_hint_or_past_it_the_room_doubles():
    reserved, plain = ReservedLayer(), DynamicLayer()
    update_both(reserved, plain, 3, seed = 0)

    for step in range(600):  # rooms of 3 + SLACK, then twice the need, twice again
        update_both(reserved, plain, 1, seed = step + 1)

    assert reserved.reservations == 3
    assert 603 <= reserved.room[0].shape[-2] <= 2 * 603

    past_hint = ReservedLayer(capacity = 4)
    plain = DynamicLayer()
    update_both(past_hint, plain, 4, seed = 0)

    for step in range(12):  # rooms of 4, then 5 + SLACK: not one per step
        update_both(past_hint, plain, 1, seed = step + 1)

    assert past_hint.reservations == 2

def test_a_large_hint_is_not_reserved_at_once():
    reserved = ReservedLayer(capacity = 10 ** 6)
    reserved.update(*states(8))
    assert reserved.room[0].shape[-2] == 8 + SLACK

def test_crop_reorder_select_and_reset_stay_exact():
    reserved, plain = ReservedLayer(capacity = 20), DynamicLayer()
    update_both(reserved, plain, 6, seed = 0)

    for layer in (reserved, plain):
        layer.crop(-2)

    update_both(reserved, plain, 3, seed = 1)  # written over the cropped positions
    assert reserved.reservations == 1

    order = torch.tensor([1, 0])
    for layer in (reserved, plain):
        layer.reorder_cache(order)

    update_both(reserved, plain, 1, seed = 2)

    for layer in (reserved, plain):
        layer.batch_select_indices(torch.tensor([1]))

    update_both(reserved, plain, 2, seed = 3, batch = 1)

    for layer in (reserved, plain):
        layer.crop(-layer.get_seq_length())

    update_both(reserved, plain, 2, seed = 4, batch = 1)

    for layer in (reserved, plain):
        layer.reset()

    update_both(reserved, plain, 2, seed = 5, batch = 1)

def test_with_gradients_it_concatenates_so_that_backward_sees_every_step():
    reserved, plain = ReservedLayer(capacity = 8), DynamicLayer()
    keys, values = (tensor.requires_grad_() for tensor in states(3))
    step_keys, step_values = (tensor.requires_grad_() for tensor in states(1, seed = 1))

    grads = []
    for layer in (reserved, plain):
        # squares keep their inputs for the backward, as attention keeps the keys: a later write
        # into them in place would fail it
        first = sum(tensor.square().sum() for tensor in layer.update(keys, values))
        second = sum(tensor.square().sum() for tensor in layer.update(step_keys, step_values))
        grads.append(torch.autograd.grad(first + second, (keys, values, step_keys, step_values)))

    for got, want in zip(*grads):
        assert torch.equal(got, want)

def test_transformers_own_caches_never_build_it():
    assert ReservedLayer not in DYNAMIC_LAYER_TYPE_MAPPING.values()
    config = DECODERS['llama'].build().config
    assert all(type(layer) is DynamicLayer for layer in transformers.DynamicCache(config = config).layers)

def test_only_full_attention_layers_are_replaced():
    config = transformers.Gemma3TextConfig(
        vocab_size = VOCAB, hidden_size = 32, num_hidden_layers = 2, num_attention_heads = 2, num_key_value_heads = 1,
        head_dim = 16, intermediate_size = 64, max_position_embeddings = 64, sliding_window = 4,
        layer_types = ['sliding_attention', 'full_attention'], **TOKENS
    )
    assert [type(layer) for layer in new_cache(config, rollback = False, capacity = 16).layers] == [DynamicSlidingWindowLayer, ReservedLayer]

@pytest.mark.parametrize('family', ('llama', 'gpt2'))
def test_a_model_decodes_the_same_logits_with_it(family):
    torch.manual_seed(0)
    model = DECODERS[family].build().eval()
    tokens = torch.randint(3, VOCAB, (2, 12))
    caches = (transformers.DynamicCache(config = model.config), new_cache(model.config, rollback = False, capacity = 12))
    keyword = cache_kwarg(forward_params(model))  # the keyword changed across transformers versions

    with torch.no_grad():
        for start, end in ((0, 8), *((n, n + 1) for n in range(8, 12))):
            logits = [model(input_ids = tokens[:, start:end], use_cache = True, **{keyword: cache}).logits for cache in caches]
            assert torch.equal(*logits)

    assert all(layer.reservations == 1 for layer in caches[1].layers)

def test_generate_reserves_the_whole_generation_once(monkeypatch):
    made = []

    def recording(*args, **kwargs):
        made.append(new_cache(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(hf_cache, 'new_cache', recording)

    torch.manual_seed(0)
    anchor, augment = DECODERS['llama'].build().eval(), DECODERS['llama'].build().eval()
    calm = CALM(anchor, AugmentParams(model = augment, connections = ((1, 1), (2, 2))), attn_kwargs = dict(heads = 2, dim_head = 16)).eval()
    prompt = torch.randint(3, VOCAB, (2, 8))

    generated = calm.generate(prompt, max_new_tokens = 6, temperature = 0.)
    own = anchor.generate(prompt, attention_mask = torch.ones_like(prompt), max_new_tokens = 6, do_sample = False, eos_token_id = None)

    assert torch.equal(generated, own[:, 8:])  # an untrained composition is the anchor
    assert len(made) == 2  # the anchor's and the aligned augment's

    for cache in made:
        assert all(layer.reservations == 1 and layer.room[0].shape[-2] == 14 for layer in cache.layers)
