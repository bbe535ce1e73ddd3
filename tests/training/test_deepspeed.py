from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open

from calm_pytorch import CALM
from calm_pytorch.helpers import exists
from calm_pytorch.checkpoints.fingerprint import composition_identities

from conftest import free_port
from hf_models import gpt2, llama

# DeepSpeed ZeRO-3 under CALMTrainer, 2 processes on CPU (gloo), with partitioning forced on (a
# tiny model is otherwise never partitioned): the composition checkpoint holds the gathered
# weights and the identity of the whole frozen models, and loads in one process to the logits the
# partitioned composition computes. ZeRO-2 partitions no weight: its checkpoints are the usual ones,
# and a run resumed from one ends where the straight run does.

PROBE = torch.arange(2 * 10).reshape(2, 10) % 120 + 3

def build() -> CALM:
    torch.manual_seed(0)
    return CALM(llama(), gpt2(), attn_kwargs = dict(heads = 2, dim_head = 8))

def dataset(num: int = 8, length: int = 12) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    rows = []

    for _ in range(num):
        ids = torch.randint(3, 128, (length,), generator = generator)
        rows.append(dict(input_ids = ids.tolist(), attention_mask = [1] * length, labels = ids.tolist()))

    return rows

def zero_config(stage: int) -> dict:
    zero = dict(stage = stage)

    if stage == 3:
        zero |= dict(stage3_param_persistence_threshold = 0, model_persistence_threshold = 0)

    return dict(
        zero_optimization = zero,
        train_micro_batch_size_per_gpu = 'auto',
        gradient_accumulation_steps = 'auto',
        train_batch_size = 'auto',
        zero_allow_untested_optimizer = True,
        bf16 = dict(enabled = False),
        fp16 = dict(enabled = False)
    )

def worker(rank: int, world_size: int, port: int, out_dir: str):
    os.environ.update(RANK = str(rank), LOCAL_RANK = str(rank), WORLD_SIZE = str(world_size), MASTER_ADDR = '127.0.0.1', MASTER_PORT = str(port), DS_ACCELERATOR = 'cpu')
    torch.set_num_threads(1)

    from transformers import TrainingArguments, default_data_collator

    from calm_pytorch.checkpoints.zero3 import any_partitioned
    from calm_pytorch.training.hf_trainer import CALMTrainer

    calm = build()
    args = TrainingArguments(
        output_dir = out_dir, per_device_train_batch_size = 2, max_steps = 2, learning_rate = 1e-2, seed = 0,
        report_to = [], use_cpu = True, disable_tqdm = True, save_strategy = 'steps', save_steps = 2, deepspeed = zero_config(3)
    )

    trainer = CALMTrainer(model = calm, args = args, train_dataset = dataset(), data_collator = default_data_collator)
    trainer.train()

    results = dict(partitioned = any_partitioned(calm), shapes = sorted({tuple(param.shape) for param in calm.parameters()}))

    # the partitioned composition's own logits (DeepSpeed gathers each module in its forward)
    with torch.no_grad():
        results['logits'] = calm(PROBE, return_loss = False)

    trainer.save_model(os.path.join(out_dir, 'final'))

    # loading into partitioned weights would be overwritten by the optimizer's copy: refused
    try:
        calm.load(os.path.join(out_dir, 'final', 'composition.safetensors'))
    except RuntimeError as error:
        results['load_refused'] = 'ZeRO-3' in str(error)

    # ZeRO-2 in the same processes: four steps straight, and two more resumed from step two
    def zero2(max_steps: int, run: str, resume: str | None = None) -> dict:
        calm = build()

        if exists(resume):
            # other weights than the straight run's: only the resumed checkpoint makes them equal again
            with torch.no_grad():
                for param in calm.cross_attns.parameters():
                    param.normal_(std = 0.1)
        args = TrainingArguments(
            output_dir = os.path.join(out_dir, run), per_device_train_batch_size = 2, max_steps = max_steps, learning_rate = 1e-2, seed = 0,
            report_to = [], use_cpu = True, disable_tqdm = True, save_strategy = 'steps', save_steps = 2, deepspeed = zero_config(2)
        )
        CALMTrainer(model = calm, args = args, train_dataset = dataset(16), data_collator = default_data_collator).train(resume_from_checkpoint = resume)
        return {key: tensor.clone() for key, tensor in calm.composition_state_dict().items()}

    results['zero2_straight'] = zero2(4, 'zero2')
    results['zero2_resumed'] = zero2(4, 'zero2_resumed', resume = os.path.join(out_dir, 'zero2', 'checkpoint-2'))

    if rank == 0:
        torch.save(results, os.path.join(out_dir, 'results.pt'))

    torch.distributed.destroy_process_group()

    # DeepSpeed's CPU communication op leaves a native thread running, whose destructor aborts the
    # interpreter at exit now and then ("terminate called without an active exception"): leave
    # without running native destructors, once everything is written
    os._exit(0)

@pytest.fixture(scope = 'module')
def zero_runs(tmp_path_factory) -> dict:
    # both scenarios in one pair of processes, spawned once
    out_dir = tmp_path_factory.mktemp('deepspeed')
    mp.spawn(worker, args = (2, free_port(), str(out_dir)), nprocs = 2, join = True)
    return torch.load(out_dir / 'results.pt') | dict(out_dir = out_dir)

def test_zero3_checkpoints_hold_the_gathered_composition_and_the_whole_models_identity(zero_runs):
    results, tmp_path = zero_runs, zero_runs['out_dir']

    # the weights really were partitioned: (0,) tensors outside DeepSpeed's forward
    assert results['partitioned'] and results['shapes'] == [(0,)]
    assert results['load_refused']

    fresh = build()
    expected_shapes = {key: tuple(tensor.shape) for key, tensor in fresh.composition_state_dict().items()}

    for checkpoint in (tmp_path / 'checkpoint-2', tmp_path / 'final'):
        path = checkpoint / 'composition.safetensors'
        assert not any(checkpoint.glob('model*.safetensors'))

        with safe_open(str(path), 'pt') as file:
            assert {key: tuple(file.get_tensor(key).shape) for key in file.keys()} == expected_shapes
            wiring = json.loads(file.metadata()['calm_wiring'])

        # the identity of the whole frozen models, as one process computes it from the full weights
        assert wiring['models'] == composition_identities(fresh)

    # one process, the same frozen models: the composition loads (identities checked) to the same logits
    fresh.load(tmp_path / 'final' / 'composition.safetensors')

    with torch.no_grad():
        logits = fresh(PROBE, return_loss = False)
        untrained = build()(PROBE, return_loss = False)

    assert torch.allclose(logits, results['logits'], atol = 1e-5)

    assert not torch.allclose(logits, untrained, atol = 1e-3)  # it was trained

def test_zero2_resumes_exactly(zero_runs):
    straight, resumed = zero_runs['zero2_straight'], zero_runs['zero2_resumed']
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
