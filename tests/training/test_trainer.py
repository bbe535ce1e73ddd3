from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.multiprocessing as mp

import calm_pytorch.training.finetuner as trainer_module
from calm_pytorch import CALM, AugmentParams, CheckpointError, FineTuner, next_token_loss
from calm_pytorch.training.schedule import warmup_then
from calm_pytorch.training.step_checkpoints import checkpoints, load_training_state, save_training_checkpoint

from conftest import assert_close, assert_equal, composition, counting_sequences, decoder, free_port, frozen

# tiny models and data: every FineTuner here runs a handful of steps in well under a second

def build(init_seed: int = 0) -> CALM:
    """The same frozen models every time; the composition initialised from `init_seed`."""
    torch.manual_seed(1234)
    anchor, augment = decoder(dim = 32, depth = 2), decoder(dim = 16, depth = 2)

    torch.manual_seed(init_seed)
    calm = CALM(anchor, AugmentParams(model = augment), attn_kwargs = dict(heads = 2, dim_head = 8))

    with torch.no_grad():
        # start away from the identity, so that every weight gets a gradient at once
        calm.cross_attns[0][0].to_out.weight.normal_(std = 0.02)

    return calm

def finetuner(calm: CALM, data, **kwargs) -> FineTuner:
    options = dict(num_train_steps = 20, batch_size = 4, learning_rate = 3e-3, warmup_steps = 3, progress = False, device = 'cpu')
    return FineTuner(calm, data, **{**options, **kwargs})

# resume

def test_resume_equals_uninterrupted_run(tmp_path):
    data = counting_sequences(24)  # 6 batches an epoch: the interruption falls inside the second epoch

    straight = finetuner(build(), data)
    straight.train()

    first = finetuner(build(), data, checkpoint_dir = tmp_path, checkpoint_every = 5, keep_last = 2)
    first.train(num_steps = 10)
    assert first.step == 10

    # a new process would build a fresh composition: its own initial weights are overwritten
    resumed = finetuner(build(init_seed = 1), data, checkpoint_dir = tmp_path, checkpoint_every = 5, keep_last = 2, resume = True)
    assert resumed.step == 10
    resumed.train()

    assert resumed.step == 20
    assert_equal(composition(resumed.calm), composition(straight.calm))
    assert_equal(resumed.optimizer.state_dict()['state'][0], straight.optimizer.state_dict()['state'][0])
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()

    # keep-last-2: steps 15 and 20 remain, each a whole checkpoint
    assert [step for step, _ in checkpoints(tmp_path)] == [15, 20]
    assert load_training_state(tmp_path / 'step-00000020')['step'] == 20

def test_crash_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import calm_pytorch.training.step_checkpoints as training_state

    tuner = finetuner(build(), counting_sequences(8), checkpoint_dir = tmp_path, checkpoint_every = 2, num_train_steps = 4)
    tuner.train(num_steps = 2)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. the job is killed while trainer_state.pt is written

    monkeypatch.setattr(training_state.torch, 'save', crash)

    with pytest.raises(KeyboardInterrupt):
        tuner.train()

    monkeypatch.undo()

    assert [path.name for path in tmp_path.iterdir()] == ['step-00000002']  # no half directory, hidden or not

    resumed = finetuner(build(), counting_sequences(8), checkpoint_dir = tmp_path, num_train_steps = 4, resume = True)
    assert resumed.step == 2

def test_a_run_never_mixes_its_checkpoints_with_later_ones(tmp_path):
    # checkpoints were pruned by step number: a run below another run's steps deleted each of its
    # own as it wrote it, and `resume = True` then restored the other run
    data = counting_sequences(8)
    first = finetuner(build(), data, checkpoint_dir = tmp_path, checkpoint_every = 2, keep_last = 2, num_train_steps = 6)
    first.train()
    assert [step for step, _ in checkpoints(tmp_path)] == [4, 6]

    for resume, later, start in ((False, '4, 6', 0), (tmp_path / 'step-00000004', '6', 4)):
        with pytest.raises(ValueError, match = rf'holds checkpoints of steps \[{later}\], past the step this run starts at \({start}\): resume from the latest'):
            finetuner(build(), data, checkpoint_dir = tmp_path, checkpoint_every = 2, resume = resume)

    assert [step for step, _ in checkpoints(tmp_path)] == [4, 6]

    # pruning keeps the last among the steps up to the one written, never a later one
    save_training_checkpoint(tmp_path, 2, first.calm, dict(step = 2), keep_last = 1)
    assert [step for step, _ in checkpoints(tmp_path)] == [2, 4, 6]

    save_training_checkpoint(tmp_path, 8, first.calm, dict(step = 8), keep_last = 2)
    assert [step for step, _ in checkpoints(tmp_path)] == [6, 8]

def test_resuming_with_other_settings_warns(tmp_path):
    data = counting_sequences(8)
    finetuner(build(), data, checkpoint_dir = tmp_path, checkpoint_every = 2, num_train_steps = 2).train()

    with warnings.catch_warnings():
        warnings.simplefilter('error')
        finetuner(build(), data, checkpoint_dir = tmp_path, resume = True)  # the same settings: no warning

    with pytest.warns(UserWarning, match = r'other settings than it was saved with: seed 5 \(saved: 0\), optimizer .*0\.01.* \(saved: .*0\.003'):
        finetuner(build(), data, checkpoint_dir = tmp_path, resume = True, seed = 5, learning_rate = 1e-2)

def test_a_damaged_trainer_state_is_named(tmp_path):
    finetuner(build(), counting_sequences(8), checkpoint_dir = tmp_path, checkpoint_every = 2, num_train_steps = 2).train()
    state = tmp_path / 'step-00000002' / 'trainer_state.pt'
    state.write_bytes(state.read_bytes()[:len(state.read_bytes()) // 2])

    with pytest.raises(CheckpointError, match = r'step-00000002/trainer_state.pt could not be read .* damaged'):
        finetuner(build(), counting_sequences(8), checkpoint_dir = tmp_path, resume = True)

def test_resume_without_checkpoint_starts_fresh(tmp_path):
    tuner = finetuner(build(), counting_sequences(8), checkpoint_dir = tmp_path / 'empty', resume = True)
    assert tuner.step == 0

# gradient accumulation

def test_accumulation_equals_one_large_batch():
    data = counting_sequences(32)

    accumulated = finetuner(build(), data, batch_size = 2, grad_accum_every = 4, num_train_steps = 3)
    large = finetuner(build(), data, batch_size = 8, grad_accum_every = 1, num_train_steps = 3)

    accumulated.train()
    large.train()

    assert_close(composition(accumulated.calm), composition(large.calm))
    assert [round(r['loss'], 5) for r in accumulated.history] == [round(r['loss'], 5) for r in large.history]

# bf16

def test_bf16_autocast_trains_and_keeps_frozen_weights():
    calm = build()
    before = frozen(calm)
    data = counting_sequences(8)

    tuner = finetuner(calm, data, bf16 = True, batch_size = 8, num_train_steps = 25, learning_rate = 1e-2, schedule = 'constant', max_grad_norm = None)
    history = tuner.train()

    losses = [record['loss'] for record in history]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses

    assert_equal(frozen(calm), before)
    assert all(param.grad is None for name, param in calm.named_parameters() if not name.startswith('cross_attns.'))

# the pieces around the loop

def test_evaluation_callback_and_tuple_datasets():
    data = [(row['seq'], row['mask']) for row in counting_sequences(8)]
    calls = []

    def evaluate(tuner: FineTuner) -> dict:
        calls.append(tuner.step)
        assert not tuner.calm.training and not torch.is_grad_enabled()
        return dict(eval_loss = tuner.calm(data[0][0][None]).item())

    tuner = finetuner(build(), data, batch_keys = ('seq', 'mask'), num_train_steps = 6, eval_fn = evaluate, eval_every = 2)
    history = tuner.train()

    assert calls == [2, 4, 6]
    assert ['eval_loss' in record for record in history] == [False, True] * 3
    assert tuner.calm.cross_attns.training

    with pytest.raises(ValueError, match = 'batch_keys'):
        finetuner(build(), data, num_train_steps = 1).train()

def test_only_composition_weights_are_optimised():
    calm = build()
    calm.anchor.token_emb.emb.weight.requires_grad_(True)

    with pytest.raises(ValueError, match = r'outside it require grad: anchor\.token_emb'):
        finetuner(calm, counting_sequences(8))

    calm.anchor.token_emb.emb.weight.requires_grad_(False)
    tuner = finetuner(calm, counting_sequences(8))
    optimised = {id(param) for group in tuner.optimizer.param_groups for param in group['params']}
    assert optimised == {id(param) for param in calm.cross_attns.parameters()}

def test_gradients_are_clipped_by_default_and_clipping_can_be_turned_off():
    # a loss scaled up so that the gradient's norm is far above 1
    def scaled_loss(model, batch):
        loss, count = next_token_loss(model, batch)
        return loss * 1e3, count

    def norms_at_the_optimizer(tuner) -> list[float]:
        norms = []
        tuner.optimizer.register_step_pre_hook(lambda *args: norms.append(torch.linalg.vector_norm(torch.stack([param.grad.norm() for param in tuner.params])).item()))
        return norms

    data = counting_sequences(8)
    clipped = FineTuner(build(), data, num_train_steps = 2, batch_size = 4, loss_fn = scaled_loss, progress = False, device = 'cpu')
    assert clipped.max_grad_norm == 1.0

    seen = norms_at_the_optimizer(clipped)
    history = clipped.train()

    assert all(record['grad_norm'] > 10 for record in history)          # the norm before clipping
    assert seen == pytest.approx([1.0, 1.0], rel = 1e-5)                # what AdamW stepped with

    unclipped = finetuner(build(), data, num_train_steps = 2, loss_fn = scaled_loss, max_grad_norm = None)
    seen = norms_at_the_optimizer(unclipped)
    history = unclipped.train()

    assert all(record['grad_norm'] is None for record in history)
    assert min(seen) > 10

    # a bound of 0 would wipe every gradient out, a negative one turn it around
    for wrong in (0., -1.):
        with pytest.raises(ValueError, match = rf'max_grad_norm must be positive \(None: no clipping\), got {wrong}'):
            finetuner(build(), data, num_train_steps = 2, max_grad_norm = wrong)

def test_warmup_then_cosine_schedule():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr = 1.)
    scheduler = warmup_then(optimizer, warmup_steps = 4, num_train_steps = 14, schedule = 'cosine', min_lr_ratio = 0.1)

    rates = []
    for _ in range(16):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()

    assert rates[:5] == pytest.approx([0.25, 0.5, 0.75, 1., 1.])
    assert all(a >= b for a, b in zip(rates[3:], rates[4:]))
    assert rates[14] == pytest.approx(0.1) and rates[15] == pytest.approx(0.1)

# distributed: two processes on CPU with gloo, spawned from the test

def distributed_worker(rank: int, world_size: int, port: int, out_dir: str, options: dict):
    # what torchrun sets for each process
    os.environ.update(RANK = str(rank), LOCAL_RANK = str(rank), WORLD_SIZE = str(world_size), MASTER_ADDR = '127.0.0.1', MASTER_PORT = str(port))
    torch.set_num_threads(1)

    written = []
    save = trainer_module.save_training_checkpoint
    trainer_module.save_training_checkpoint = lambda *args, **kwargs: written.append(save(*args, **kwargs)) or written[-1]

    calm = build()
    before = frozen(calm)

    tuner = finetuner(calm, counting_sequences(32), checkpoint_dir = os.path.join(out_dir, 'checkpoints'), **options)
    assert tuner.distributed.world_size == world_size and tuner.distributed.rank == rank
    tuner.train()

    torch.save(dict(
        composition = composition(calm),
        frozen_untouched = all(torch.equal(before[key], value) for key, value in frozen(calm).items()),
        written = [str(path) for path in written],
        losses = [record['loss'] for record in tuner.history]
    ), os.path.join(out_dir, f'rank{rank}.pt'))

    tuner.close()

def test_two_process_gloo_run_matches_single_process(tmp_path):
    options = dict(num_train_steps = 3, checkpoint_every = 2, grad_accum_every = 2)

    mp.start_processes(distributed_worker, args = (2, free_port(), str(tmp_path), dict(batch_size = 2, **options)), nprocs = 2, start_method = 'spawn')

    ranks = [torch.load(tmp_path / f'rank{rank}.pt', weights_only = True) for rank in range(2)]

    # the same global batch in one process: 2 processes x 2 samples
    single = finetuner(build(), counting_sequences(32), batch_size = 4, **{**options, 'checkpoint_every': None})
    single.train()

    assert_equal(ranks[0]['composition'], ranks[1]['composition'])
    assert_close(ranks[0]['composition'], composition(single.calm))
    assert ranks[0]['losses'] == pytest.approx([record['loss'] for record in single.history], abs = 1e-5)

    assert ranks[0]['frozen_untouched'] and ranks[1]['frozen_untouched']

    # rank 0 wrote the checkpoint of step 2 and the final one; rank 1 wrote nothing
    assert [os.path.basename(path) for path in ranks[0]['written']] == ['step-00000002', 'step-00000003']
    assert ranks[1]['written'] == []
    assert [step for step, _ in checkpoints(tmp_path / 'checkpoints')] == [2, 3]

def test_float16_weights_are_refused_with_the_reason():
    # AdamW's epsilon is 0 in float16: the first step turned the composition to NaN
    calm = build()
    calm.cross_attns.half()

    with pytest.raises(ValueError, match = r'trainable parameters are float16 \(e.g. cross_attns.0.0.*NaN at the first step.*torch.autocast'):
        finetuner(calm, counting_sequences(8), num_train_steps = 2)
