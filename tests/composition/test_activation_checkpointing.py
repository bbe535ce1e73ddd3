from __future__ import annotations

import copy
import pickle

import pytest
import torch
import transformers
from torch import nn

import hf_models
from calm_pytorch import CALM, AugmentParams
from calm_pytorch.composition.activation_checkpointing import CheckpointedForward
from conftest import decoder, tokens

# activation checkpointing of the frozen anchor: the composition's gradients are those without it,
# the blocks the gradient flows through run twice per training step, the others once

class Block(nn.Module):
    def __init__(self, dim: int, dropout: float = 0.):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.net = nn.Sequential(nn.Linear(dim, dim * 4), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim * 4, dim))

    def forward(self, x):
        return x + self.net(self.norm(x))

class Generic(nn.Module):
    # a plain module whose blocks the user names
    def __init__(self, dim: int = 32, depth: int = 4, num_tokens: int = 256, dropout: float = 0.):
        super().__init__()
        self.emb = nn.Embedding(num_tokens, dim)
        self.blocks = nn.ModuleList([Block(dim, dropout) for _ in range(depth)])
        self.head = nn.Linear(dim, num_tokens)

    def forward(self, x):
        x = self.emb(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

# each anchor has dropout, which must stay off in the frozen model, checkpointed or not;
# `inner` picks a module each block calls first, inside the checkpointed forward

ANCHORS = dict(
    x_transformers = (lambda: decoder(dim = 32, depth = 4, attn_dropout = 0.3, ff_dropout = 0.3), {}, lambda units: units[0].to_q),
    hf_llama = (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**hf_models.LLAMA_LIKE, 'num_hidden_layers': 4, 'attention_dropout': 0.3}, num_key_value_heads = 1)), {}, lambda units: units[0].input_layernorm),
    generic = (lambda: Generic(dropout = 0.3), dict(anchor_transformer_blocks = 'blocks.*'), lambda units: units[0].norm),
    # its blocks take the cache by position, which the recompute must not write a second time
    hf_gpt2 = (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size = 128, n_embd = 32, n_layer = 4, n_head = 2, attn_pdrop = 0.3, resid_pdrop = 0.3, embd_pdrop = 0.3)), {}, lambda units: units[0].ln_1),
)

def composition(name: str, connections = ((4, 2), (8, 4)), **kwargs) -> CALM:
    torch.manual_seed(0)
    build, options, _ = ANCHORS[name]

    # the tests feed tokens below 128, the HF anchor's vocabulary; the augment's is 256
    calm = CALM(build(), AugmentParams(model = decoder(dim = 24, depth = 8), connections = connections, same_tokenizer = True), attn_kwargs = dict(heads = 2, dim_head = 16), **options, **kwargs)

    # random output projections, so that every delta and gradient is non-zero
    with torch.no_grad():
        for param in calm.cross_attns.parameters():
            param.normal_(std = 0.2)

    return calm.train()

def count_block_calls(calm: CALM, name: str) -> dict[int, int]:
    counts = {}
    inner = ANCHORS[name][2]

    for index, units in enumerate(calm.anchor_adapter.checkpoint_units()):
        inner(units).register_forward_pre_hook(lambda module, args, index = index: counts.__setitem__(index, counts.get(index, 0) + 1))

    return counts

def training_step(calm: CALM, seq: torch.Tensor, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """The loss, the composition's gradients, and the bytes autograd saved for the backward."""

    calm.zero_grad()
    saved = 0

    def pack(tensor):
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = calm(seq, **kwargs)

    loss.backward()
    return loss.detach(), [param.grad.clone() for param in calm.cross_attns.parameters()], saved

def assert_same_gradients(grads, reference):
    assert len(grads) == len(reference)
    for grad, expected in zip(grads, reference):
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, expected, atol = 1e-6, rtol = 0)

@pytest.mark.parametrize('name', ANCHORS)
def test_same_gradients_and_blocks_above_the_first_connection_recomputed(name):
    calm = composition(name)
    seq = tokens(length = 16) % 128
    loss, grads, saved = training_step(calm, seq)

    counts = count_block_calls(calm, name)
    calm.gradient_checkpointing_enable()
    assert calm.is_gradient_checkpointing

    checkpointed_loss, checkpointed_grads, checkpointed_saved = training_step(calm, seq)

    # dropout stayed off: the loss is the same, and so are the gradients
    assert torch.equal(checkpointed_loss, loss)
    assert_same_gradients(checkpointed_grads, grads)

    # the first connection adds to the output of anchor layer 2: blocks 1 and 2 need no gradient
    # and run once; blocks 3 and 4 are recomputed in the backward
    assert counts == {0: 1, 1: 1, 2: 2, 3: 2}
    assert checkpointed_saved < saved

    calm.gradient_checkpointing_disable()
    assert not calm.is_gradient_checkpointing
    counts.clear()

    plain_loss, plain_grads, plain_saved = training_step(calm, seq)
    assert counts == {0: 1, 1: 1, 2: 1, 3: 1}
    assert torch.equal(plain_loss, loss) and plain_saved == saved
    assert_same_gradients(plain_grads, grads)

def test_a_delta_added_to_a_block_input_recomputes_that_block():
    calm = composition('generic', connections = ((8, 2),), anchor_hidden_position = 'input')
    seq = tokens()
    _, grads, _ = training_step(calm, seq)

    counts = count_block_calls(calm, 'generic')
    calm.gradient_checkpointing_enable()
    _, checkpointed_grads, _ = training_step(calm, seq)

    assert counts == {0: 1, 1: 2, 2: 2, 3: 2}
    assert_same_gradients(checkpointed_grads, grads)

@pytest.mark.parametrize('position', ('input', 'output'))
@pytest.mark.parametrize('name', ANCHORS)
def test_a_padding_mask_with_every_anchor(name, position):
    # x-transformers masks through einx, which wrapped torch's early stop of the recompute into an error
    calm = composition(name, anchor_hidden_position = position)
    seq = tokens(length = 12) % 128
    mask = torch.ones_like(seq, dtype = torch.bool)
    mask[1, 8:] = False

    loss, grads, _ = training_step(calm, seq, mask = mask)
    calm.gradient_checkpointing_enable()
    checkpointed_loss, checkpointed_grads, _ = training_step(calm, seq, mask = mask)

    assert torch.equal(checkpointed_loss, loss)
    assert_same_gradients(checkpointed_grads, grads)

def test_context_mode_and_every_n_layers():
    calm = composition('hf_llama', connections = ((4, 1),))
    seq, prompt = tokens() % 128, tokens(length = 10)
    _, grads, _ = training_step(calm, seq, prompt = prompt)

    counts = count_block_calls(calm, 'hf_llama')
    calm.activation_checkpointing_enable(every_n_layers = 2)
    _, checkpointed_grads, _ = training_step(calm, seq, prompt = prompt)

    # blocks 2..4 carry the gradient; every second of them is checkpointed
    assert counts == {0: 1, 1: 2, 2: 1, 3: 2}
    assert_same_gradients(checkpointed_grads, grads)

@pytest.mark.parametrize('use_reentrant', (False, True))
def test_trainable_parameters_inside_the_anchor_below_the_composition(use_reentrant):
    # e.g. LoRA weights the user trains with the composition: their block is checkpointed too (and
    # reentrant checkpointing, whose block inputs there require no grad, still gives them theirs)
    calm = composition('generic')
    first = calm.anchor.blocks[0].net[0]
    first.weight.requires_grad_(True)
    seq = tokens()

    _, grads, _ = training_step(calm, seq)
    weight_grad, first.weight.grad = first.weight.grad.clone(), None

    counts = count_block_calls(calm, 'generic')
    calm.gradient_checkpointing_enable(gradient_checkpointing_kwargs = dict(use_reentrant = use_reentrant))
    _, checkpointed_grads, _ = training_step(calm, seq)

    assert counts == {0: 2, 1: 2, 2: 2, 3: 2}
    assert_same_gradients(checkpointed_grads, grads)
    torch.testing.assert_close(first.weight.grad, weight_grad, atol = 1e-6, rtol = 0)

def test_no_recompute_without_gradients_and_generation_unchanged():
    calm = composition('hf_llama')
    prompt = tokens(batch = 1, length = 4) % 128
    expected = calm.generate(prompt, max_new_tokens = 5, temperature = 0.)

    counts = count_block_calls(calm, 'hf_llama')
    calm.gradient_checkpointing_enable()

    with torch.no_grad():
        calm(tokens() % 128)

    assert counts == {0: 1, 1: 1, 2: 1, 3: 1}
    assert torch.equal(calm.generate(prompt, max_new_tokens = 5, temperature = 0.), expected)

def test_remove_hooks_and_disable_restore_the_blocks():
    calm = composition('generic')
    blocks = list(calm.anchor.blocks)

    # another library's forward set on the instance (as accelerate's hooks do) is kept and restored
    own_forward = blocks[3].forward
    blocks[3].forward = own_forward

    calm.gradient_checkpointing_enable()
    assert [isinstance(block.__dict__.get('forward'), CheckpointedForward) for block in blocks] == [False, False, True, True]

    calm.gradient_checkpointing_disable()
    assert 'forward' not in blocks[2].__dict__ and blocks[3].__dict__['forward'] == own_forward

    calm.gradient_checkpointing_enable()
    calm.remove_hooks()
    assert 'forward' not in blocks[2].__dict__ and blocks[3].__dict__['forward'] == own_forward

    with pytest.raises(RuntimeError, match = 'remove_hooks'):
        calm.gradient_checkpointing_enable()

def test_a_checkpointed_composition_pickles_whole():
    calm = composition('hf_llama')
    calm.gradient_checkpointing_enable(gradient_checkpointing_kwargs = dict(use_reentrant = True), offload = True)
    seq = tokens() % 128
    _, grads, _ = training_step(calm, seq)

    copy_ = pickle.loads(pickle.dumps(calm))
    assert len(copy_.checkpointed_modules) == len(calm.checkpointed_modules)
    _, copied_grads, _ = training_step(copy_, seq)
    assert_same_gradients(copied_grads, grads)

def test_deepcopy_checkpoints_its_own_blocks():
    calm = composition('generic')
    seq = tokens()
    _, grads, _ = training_step(calm, seq)
    calm.gradient_checkpointing_enable()

    copied = copy.deepcopy(calm)
    wrapper = copied.anchor.blocks[3].__dict__['forward']
    assert wrapper.module is copied.anchor.blocks[3] and wrapper.forward.__self__ is copied.anchor.blocks[3]

    counts = count_block_calls(copied, 'generic')
    _, copied_grads, _ = training_step(copied, seq)
    assert counts == {0: 1, 1: 1, 2: 2, 3: 2}
    assert_same_gradients(copied_grads, grads)

def test_reentrant_checkpointing_and_bad_arguments():
    calm = composition('hf_llama')
    seq = tokens() % 128
    _, grads, _ = training_step(calm, seq)

    # the kwargs go to torch.utils.checkpoint.checkpoint, as with transformers models
    calm.gradient_checkpointing_enable(gradient_checkpointing_kwargs = dict(use_reentrant = True))
    _, checkpointed_grads, _ = training_step(calm, seq)
    assert_same_gradients(checkpointed_grads, grads)

    assert calm.supports_gradient_checkpointing

    with pytest.raises(ValueError, match = 'every_n_layers'):
        calm.activation_checkpointing_enable(every_n_layers = 0)

def test_compiled_checkpointed_step_matches_eager():
    calm = composition('generic')
    seq = tokens()
    loss, grads, _ = training_step(calm, seq)

    calm.gradient_checkpointing_enable()
    torch._dynamo.reset()
    compiled = torch.compile(calm, backend = 'eager', fullgraph = True)

    for _ in range(2):
        calm.zero_grad(set_to_none = True)
        compiled_loss = compiled(seq)
        compiled_loss.backward()

    torch.testing.assert_close(compiled_loss, loss, atol = 1e-5, rtol = 1e-5)

    for param, grad in zip(calm.cross_attns.parameters(), grads):
        torch.testing.assert_close(param.grad, grad, atol = 1e-5, rtol = 1e-4)

def test_hf_trainer_with_gradient_checkpointing_trains_the_same(tmp_path):
    from transformers import Trainer, TrainingArguments, default_data_collator

    generator = torch.Generator().manual_seed(1)
    rows = [dict(input_ids = ids, labels = ids) for ids in torch.randint(3, 128, (8, 12), generator = generator).tolist()]

    def train(**kwargs) -> CALM:
        torch.manual_seed(0)
        calm = CALM(hf_models.llama(), AugmentParams(model = hf_models.gpt2(), connections = ((2, 1), (4, 2))), attn_kwargs = dict(heads = 2, dim_head = 8))
        args = TrainingArguments(output_dir = str(tmp_path), per_device_train_batch_size = 4, max_steps = 2, report_to = [], use_cpu = True, disable_tqdm = True, save_strategy = 'no', learning_rate = 1e-2, seed = 0, **kwargs)
        Trainer(model = calm, args = args, train_dataset = rows, data_collator = default_data_collator).train()
        return calm

    plain, checkpointed = train(), train(gradient_checkpointing = True)

    # the Trainer enabled it: anchor block 2 carries the gradient of the connection at layer 1
    assert checkpointed.checkpointed_modules == [checkpointed.anchor.model.layers[1]]

    for param, expected in zip(checkpointed.cross_attns.parameters(), plain.cross_attns.parameters()):
        torch.testing.assert_close(param, expected, atol = 1e-6, rtol = 1e-5)
