from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from transformers import Trainer, default_data_collator

from calm_pytorch.training.hf_trainer import CALMTrainer, gathered_composition

from conftest import assert_close, composition, free_port
from test_hf_trainer import StopAt, build, frozen_state, hf_dataset, randomize_outputs, training_args

# CALMTrainer under Accelerate's FSDP2, 2 processes on CPU (gloo).
#
# Accelerate 1.16 turns FSDP on for accelerators only: with `use_cpu` (or no GPU) its state says
# MULTI_CPU and it prepares DDP, whatever the FSDP plugin says (CALMTrainer refuses that, below).
# To run its FSDP2 code here, the workers change that one decision: the state Accelerate builds is
# set to FSDP with the plugin Trainer made, as it is on GPUs. Everything after (fsdp2_prepare_model,
# fully_shard, the optimizer's FSDP state files, Trainer's FSDP branches) is the libraries' own.

FSDP = dict(fsdp = 'full_shard', fsdp_config = dict(fsdp_version = 2))
STEPS = dict(max_steps = 4, save_strategy = 'steps', save_steps = 2, per_device_train_batch_size = 2, learning_rate = 1e-3)

def accelerate_fsdp_on_cpu():
    from accelerate.state import AcceleratorState, DistributedType

    init = AcceleratorState.__init__

    def fsdp_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if kwargs.get('fsdp_plugin') is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = kwargs['fsdp_plugin']

    AcceleratorState.__init__ = fsdp_init

def whole(tensor):
    from torch.distributed.tensor import DTensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

def gathered(calm) -> dict[str, torch.Tensor]:
    with gathered_composition(calm):
        return composition(calm)

def worker(rank: int, world_size: int, port: int, out_dir: str):
    os.environ.update(RANK = str(rank), LOCAL_RANK = str(rank), WORLD_SIZE = str(world_size), LOCAL_WORLD_SIZE = str(world_size), MASTER_ADDR = '127.0.0.1', MASTER_PORT = str(port))
    torch.set_num_threads(1)

    out_dir = Path(out_dir)
    data = hf_dataset()
    results = {}

    # as Accelerate is: on CPU it would train with DDP, every process holding the whole frozen models
    try:
        CALMTrainer(model = build(), args = training_args(out_dir / 'refused', **FSDP), train_dataset = data, data_collator = default_data_collator)
        results['refused'] = None
    except ValueError as error:
        results['refused'] = str(error)

    accelerate_fsdp_on_cpu()

    # an uninterrupted run

    calm = build()
    frozen = frozen_state(calm)
    trainer = CALMTrainer(model = calm, args = training_args(out_dir / 'straight', **STEPS, **FSDP), train_dataset = data, data_collator = default_data_collator)
    trainer.train()

    from torch.distributed.fsdp import FSDPModule
    results.update(
        fsdp = trainer.is_fsdp_enabled,
        units = sorted({type(module).__name__ for module in calm.modules() if isinstance(module, FSDPModule)}),
        straight = gathered(calm),
        losses = [entry['loss'] for entry in trainer.state.log_history if 'loss' in entry],
        frozen_untouched = all(torch.equal(whole(tensor), frozen[name]) for name, tensor in frozen_state(calm).items())
    )

    # stopped after step 2, then resumed by fresh objects over another composition

    interrupted = build()
    CALMTrainer(model = interrupted, args = training_args(out_dir / 'resumed', **STEPS, **FSDP), train_dataset = data, data_collator = default_data_collator, callbacks = [StopAt(2)]).train()

    resumed = build()
    randomize_outputs(resumed)
    trainer = CALMTrainer(model = resumed, args = training_args(out_dir / 'resumed', **STEPS, **FSDP), train_dataset = data, data_collator = default_data_collator)
    trainer.train(resume_from_checkpoint = True)

    results.update(resumed = gathered(resumed), resumed_steps = trainer.state.global_step)
    torch.save(results, out_dir / f'rank{rank}.pt')

@pytest.fixture(scope = 'module')
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp('hf_fsdp')
    mp.start_processes(worker, args = (2, free_port(), str(out_dir)), nprocs = 2, start_method = 'spawn')
    return out_dir, [torch.load(out_dir / f'rank{rank}.pt', weights_only = True) for rank in range(2)]

def test_fsdp_run_matches_one_process_and_shards_the_frozen_blocks(ranks, tmp_path):
    _, ranks = ranks

    # one process, no FSDP, the same global batch
    calm = build()
    args = training_args(tmp_path, **{**STEPS, 'per_device_train_batch_size': 4, 'save_strategy': 'no'})
    Trainer(model = calm, args = args, train_dataset = hf_dataset(), data_collator = default_data_collator).train()

    for rank in ranks:
        assert rank['fsdp'] and rank['frozen_untouched']
        # the units CALMTrainer named: the anchor's and the augment's blocks, and the CALM as root
        assert rank['units'] == ['FSDPCALM', 'FSDPGPT2Block', 'FSDPLlamaDecoderLayer']
        assert_close(rank['straight'], composition(calm))

    assert_close(ranks[0]['straight'], ranks[1]['straight'], atol = 0.)

def test_fsdp_checkpoints_hold_the_composition_only_and_load_in_one_process(ranks):
    out_dir, ranks = ranks
    checkpoint = out_dir / 'straight' / 'checkpoint-4'
    files = {path.name for path in checkpoint.iterdir()}

    assert {'composition.safetensors', 'scheduler.pt', 'trainer_state.json'} <= files
    assert any(name.startswith('optimizer') for name in files)
    # no model weights: neither Trainer's whole-model file nor FSDP's sharded one
    assert not any(name.startswith(('model', 'pytorch_model')) for name in files), files

    calm = build(seed = 3)
    calm.load(checkpoint / 'composition.safetensors')
    assert_close(composition(calm), ranks[0]['straight'], atol = 0.)

def test_fsdp_resume_equals_the_uninterrupted_run(ranks):
    _, ranks = ranks

    for rank in ranks:
        assert rank['resumed_steps'] == 4
        assert_close(rank['resumed'], rank['straight'], atol = 1e-6)

def test_fsdp_on_cpu_is_refused(ranks):
    _, ranks = ranks

    for rank in ranks:
        assert re.search(r"Accelerate runs MULTI_CPU here: it enables FSDP on accelerators only.*FineTuner\(strategy='fsdp'\)", rank['refused'] or '')
