from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch
import torch.multiprocessing as mp

from calm_pytorch import CALM, AugmentParams, FineTuner, read_wiring
from calm_pytorch.training.fsdp import local_and_global_numel
from calm_pytorch.training.step_checkpoints import checkpoints

from hf_models import VOCAB, llama
from conftest import assert_close, assert_equal, composition, counting_sequences, decoder, free_port, frozen

# FSDP2 over 2 processes on CPU (gloo), spawned once: every scenario runs in the same two workers.
# An HF anchor with an x-transformers augment, and the other way round, so that both kinds of
# blocks are sharded as anchor and as augment. Each augment is connected below its top layer:
# an augment that stopped early (as it does without FSDP) would leave FSDP units gathered.

LENGTH = 12

def build(hf_anchor: bool, init_seed: int = 0) -> CALM:
    torch.manual_seed(1234)

    if hf_anchor:
        anchor, augment, connections = llama(dim = 32, depth = 2), decoder(dim = 16, depth = 4, num_tokens = VOCAB), ((2, 1), (3, 2))
    else:
        anchor, augment, connections = decoder(dim = 32, depth = 2, num_tokens = VOCAB), llama(dim = 16, depth = 3), ((1, 1), (2, 2))

    torch.manual_seed(init_seed)
    calm = CALM(anchor, AugmentParams(model = augment, connections = connections), attn_kwargs = dict(heads = 2, dim_head = 8))

    with torch.no_grad():
        for block in calm.cross_attns[0]:
            block.to_out.weight.normal_(std = 0.02)  # away from the identity: every weight gets a gradient

    return calm

PROBE = torch.arange(2 * LENGTH).reshape(2, LENGTH) % VOCAB

def finetuner(calm: CALM, **kwargs) -> FineTuner:
    options = dict(num_train_steps = 3, grad_accum_every = 2, learning_rate = 1e-3, warmup_steps = 1, progress = False, device = 'cpu')
    return FineTuner(calm, counting_sequences(vocab = VOCAB), **{**options, **kwargs})

def full_frozen(calm: CALM) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor
    return {key: value.full_tensor() if isinstance(value, DTensor) else value for key, value in frozen(calm).items()}

def all_resharded(calm: CALM) -> bool:
    from torch.distributed.tensor import DTensor
    # FSDP2 swaps a unit's parameters for whole plain tensors while it is gathered
    return all(isinstance(param, DTensor) for model in (calm.anchor, *calm.augments) for param in model.parameters())

def worker(rank: int, world_size: int, port: int, out_dir: str):
    os.environ.update(RANK = str(rank), LOCAL_RANK = str(rank), WORLD_SIZE = str(world_size), MASTER_ADDR = '127.0.0.1', MASTER_PORT = str(port))
    torch.set_num_threads(1)
    results = {}

    # 1. training equals one process on the same global batch; checkpoints; shard sizes

    calm = build(hf_anchor = True)
    before = frozen(calm)
    whole = [weakref.ref(param) for model in (calm.anchor, *calm.augments) for param in model.parameters()]

    tuner = finetuner(calm, batch_size = 2, strategy = 'fsdp', checkpoint_dir = os.path.join(out_dir, 'run'), checkpoint_every = 2)
    gc.collect()
    results.update(whole_alive = sum(ref() is not None for ref in whole), whole_count = len(whole))
    tuner.train()

    with torch.no_grad():
        logits = calm(PROBE, return_loss = False)

    results.update(
        composition = composition(calm),
        losses = [record['loss'] for record in tuner.history],
        frozen_untouched = all(torch.equal(before[key], value) for key, value in full_frozen(calm).items()),
        resharded = all_resharded(calm),
        logits = logits,
        numel = [local_and_global_numel(model) for model in (calm.anchor, *calm.augments)]
    )

    # 2. resume: an uninterrupted run against one stopped at step 2 and resumed in a fresh CALM

    straight = finetuner(build(hf_anchor = False), batch_size = 2, strategy = 'fsdp', num_train_steps = 4)
    straight.train()

    resume_dir = os.path.join(out_dir, 'resume')
    first = finetuner(build(hf_anchor = False), batch_size = 2, strategy = 'fsdp', num_train_steps = 4, checkpoint_dir = resume_dir)
    first.train(num_steps = 2)  # ends with a checkpoint

    resumed = finetuner(build(hf_anchor = False, init_seed = 1), batch_size = 2, strategy = 'fsdp', num_train_steps = 4, checkpoint_dir = resume_dir, resume = True)
    resumed.train()

    results.update(
        straight = composition(straight.calm),
        resumed = composition(resumed.calm),
        resumed_from = first.step,
        straight_resharded = all_resharded(straight.calm)
    )

    # 3. activation checkpointing of the anchor's blocks inside FSDP units: the same training

    checkpointed = build(hf_anchor = True)
    checkpointed.gradient_checkpointing_enable()
    assert len(checkpointed.checkpointed_modules) > 0

    tuner_ckpt = finetuner(checkpointed, batch_size = 2, strategy = 'fsdp')
    tuner_ckpt.train()
    results.update(checkpointed = composition(checkpointed), checkpointed_losses = [record['loss'] for record in tuner_ckpt.history])

    torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    tuner.close()

@pytest.fixture(scope = 'module')
def ranks(tmp_path_factory) -> tuple[str, list[dict]]:
    out_dir = tmp_path_factory.mktemp('fsdp')
    mp.start_processes(worker, args = (2, free_port(), str(out_dir)), nprocs = 2, start_method = 'spawn')
    return out_dir, [torch.load(out_dir / f'rank{rank}.pt', weights_only = True) for rank in range(2)]

def test_fsdp_run_matches_single_process_and_its_checkpoint_loads_anywhere(ranks):
    out_dir, ranks = ranks

    single = finetuner(build(hf_anchor = True), batch_size = 4)
    before = frozen(single.calm)
    single.train()

    assert_equal(ranks[0]['composition'], ranks[1]['composition'])
    assert_close(ranks[0]['composition'], composition(single.calm))
    assert ranks[0]['losses'] == pytest.approx([record['loss'] for record in single.history], abs = 1e-5)
    assert ranks[0]['frozen_untouched'] and ranks[1]['frozen_untouched']
    assert_equal(frozen(single.calm), before)

    # the checkpoint rank 0 wrote is an ordinary composition file: this process is not distributed
    assert [step for step, _ in checkpoints(out_dir / 'run')] == [2, 3]

    fresh = build(hf_anchor = True, init_seed = 5)
    fresh.load(out_dir / 'run' / 'step-00000003' / 'composition.safetensors')
    assert_equal(composition(fresh), ranks[0]['composition'])

    with torch.no_grad():
        logits = fresh(PROBE, return_loss = False)

    assert (logits - ranks[0]['logits']).abs().max() <= 1e-5

def test_a_checkpoint_written_under_fsdp_names_the_models_own_classes(ranks):
    out_dir, _ = ranks
    path = out_dir / 'run' / 'step-00000003' / 'composition.safetensors'
    wiring, single = read_wiring(path), read_wiring(build(hf_anchor = True).save(out_dir / 'single.safetensors'))

    # FSDP2 swaps each sharded module's class for a generated FSDP<Class>: the file names the model's own
    assert (wiring['anchor'], wiring['augments'][0]['model']) == ('LlamaForCausalLM', 'TransformerWrapper')
    assert (wiring['models']['anchor']['model'], wiring['models']['augments'][0]['model']) == ('LlamaForCausalLM', 'TransformerWrapper')
    assert (wiring['anchor'], wiring['augments'][0]['model']) == (single['anchor'], single['augments'][0]['model'])

def test_fsdp_resume_equals_uninterrupted_run(ranks):
    _, ranks = ranks

    for rank in ranks:
        assert rank['resumed_from'] == 2
        assert_equal(rank['resumed'], rank['straight'])

def test_fsdp_with_activation_checkpointing_trains_the_same(ranks):
    _, ranks = ranks

    for rank in ranks:
        assert_close(rank['checkpointed'], rank['composition'], atol = 1e-6)
        assert rank['checkpointed_losses'] == pytest.approx(rank['losses'], abs = 1e-6)

def test_each_rank_holds_half_of_the_frozen_weights_and_nothing_stays_gathered(ranks):
    _, ranks = ranks

    for model in range(2):  # the anchor, the augment
        (local0, total), (local1, total1) = ranks[0]['numel'][model], ranks[1]['numel'][model]
        assert total == total1 and local0 + local1 == total
        assert max(local0, local1) <= 0.55 * total, (local0, local1, total)

    assert all(rank['resharded'] and rank['straight_resharded'] for rank in ranks)

    # the whole parameters are gone once sharded: nothing (the CALM's memory of the requires_grad
    # flags it restores on removal included) keeps a full copy of the frozen weights alive
    for rank in ranks:
        assert rank['whole_count'] > 0 and rank['whole_alive'] == 0

def test_fsdp_refuses_quantized_frozen_models_up_front():
    quantization = pytest.importorskip('torchao.quantization', reason = 'needs torchao, in the test extra: pip install -e ".[test]"')
    calm = build(hf_anchor = True)
    quantization.quantize_(calm.augments[0], quantization.Int8WeightOnlyConfig())  # the x-transformers augment

    with pytest.raises(ValueError, match = r"strategy='fsdp' cannot shard quantized weights: augments\.0\.\S+ \(\w+\).*strategy='ddp'"):
        finetuner(calm, batch_size = 2, strategy = 'fsdp')

def test_fsdp_refuses_trained_anchor_parameters():
    calm = build(hf_anchor = True)
    calm.anchor.model.layers[0].mlp.up_proj.weight.requires_grad_(True)  # as a LoRA weight would be

    with pytest.raises(ValueError, match = r"strategy='fsdp' shards frozen models only.*anchor\.model\.layers\.0\.mlp\.up_proj\.weight.*strategy='ddp'"):
        finetuner(calm, batch_size = 2, strategy = 'fsdp', train_anchor_params = True)
