from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module
from torch.nn.utils import clip_grad_norm_
from torch.optim import AdamW
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from calm_pytorch.calm import CALM
from calm_pytorch.composition.loss import next_token_loss
from calm_pytorch.helpers import exists, typecheck, warn_user
from calm_pytorch.models.precision import on_meta
from calm_pytorch.training.collate import Collator
from calm_pytorch.training.data import MapDataset, ResumableDistributedSampler, as_kwargs, named, readable_rows, shard_stream, to_device
from calm_pytorch.training.distributed import setup_distributed, wrap_for_ddp
from calm_pytorch.training.fsdp import STRATEGIES, Strategy, average_gradients, shard_frozen_models
from calm_pytorch.training.schedule import Schedule, warmup_then
from calm_pytorch.training.sharded_loading import shard_and_load
from calm_pytorch.training.step_checkpoints import (
    COMPOSITION_FILE,
    checkpoints,
    latest_checkpoint,
    load_training_state,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
)

LossFn = Callable[[torch.nn.Module, dict], Tensor | tuple[Tensor, Tensor | int]]
EvalFn = Callable[['FineTuner'], dict | None]

def refuse_float16(calm: Module):
    # AdamW's epsilon (1e-8) is 0 in float16: a weight whose gradient is 0 becomes 0 / 0 = NaN at
    # its first step, and at step 1 every weight below the zero-initialised output projections has one
    half = [name for name, param in calm.named_parameters() if param.requires_grad and param.dtype == torch.float16]

    if len(half) > 0:
        raise ValueError(
            f'{len(half)} trainable parameters are float16 (e.g. {half[0]}), which AdamW turns to NaN at the first step (its epsilon is 0 in float16). '
            'Keep the composition in float32 (composition_dtype\'s default; calm.half() casts it too) or bfloat16; for float16 compute, use torch.autocast'
        )

class FineTuner:
    """Trains the composition weights of a CALM: one process, or many under torchrun.

    Every process builds the same CALM and the same FineTuner; under torchrun (WORLD_SIZE > 1)
    the CALM is wrapped in DistributedDataParallel over its composition weights only, the data
    is sharded with a DistributedSampler, and only rank 0 writes checkpoints.
    strategy='fsdp' instead shards the frozen models block by block over the processes (FSDP2,
    see training/fsdp.py); the composition weights stay whole in every process. With
    `frozen_checkpoints` (one per frozen model, the anchor first: folders written by
    `save_pretrained` or .safetensors files), the CALM is built on the meta device and each
    process reads only its shards from the files (training/sharded_loading.py).

    batch_size is per process and per micro-batch: a step sees
    batch_size * grad_accum_every * world_size samples. Every token of a step weighs the same,
    however the tokens fall into micro-batches, processes and padding (see `next_token_loss`).

    train_anchor_params: also train the anchor parameters the CALM kept trainable (those the user
    left trainable in a partly frozen anchor, e.g. the LoRA weights of a PEFT model); they are
    saved in the checkpoints with the composition.

    dataset: a map-style dataset (a list, a torch Dataset, a `datasets.Dataset` in any format) or
    a stream (a torch or `datasets` IterableDataset). Rows are dicts (CALM's names `seq`, `mask`,
    `labels`, `prompt`, `prompt_mask`, or Hugging Face's `input_ids`, `attention_mask`), tuples
    named by `batch_keys`, or token tensors; rows of different lengths are padded, and `prompt`
    may hold one entry per augment, None for an aligned one (see training/collate.py).
    shuffle: map-style datasets only (the default there); a stream is read in its own order"""

    @typecheck
    def __init__(
        self,
        calm: CALM,
        dataset: MapDataset | Iterable,
        *,
        num_train_steps: int,
        batch_size: int = 8,
        grad_accum_every: int = 1,
        learning_rate: float = 1e-3,  # what the real-model runs trained at (docs/training.md#starting-points)
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 0,
        schedule: Schedule = 'cosine',
        min_lr_ratio: float = 0.1,
        max_grad_norm: float | None = 1.0,
        bf16: bool = False,
        batch_keys: Sequence[str] | None = None,
        loss_fn: LossFn = next_token_loss,
        eval_fn: EvalFn | None = None,
        eval_every: int | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        keep_last: int | None = 3,
        resume: bool | str | os.PathLike = False,
        seed: int = 0,
        shuffle: bool | None = None,
        num_workers: int = 0,
        collate_fn: Callable | None = None,
        device: str | torch.device | None = None,
        backend: str | None = None,
        find_unused_parameters: bool = False,
        progress: bool = True,
        train_anchor_params: bool = False,
        strategy: Strategy = 'ddp',
        frozen_checkpoints: Sequence[str | os.PathLike] | None = None
    ):
        positive = dict(num_train_steps = num_train_steps, batch_size = batch_size, grad_accum_every = grad_accum_every)
        positive |= {name: value for name, value in dict(eval_every = eval_every, checkpoint_every = checkpoint_every, keep_last = keep_last).items() if exists(value)}

        for name, value in positive.items():
            if value < 1:
                raise ValueError(f'{name} must be at least 1, got {value}')

        # clip_grad_norm_ scales by max_norm / norm: a negative bound turns every gradient around, zero wipes it out
        if exists(max_grad_norm) and not max_grad_norm > 0:
            raise ValueError(f'max_grad_norm must be positive (None: no clipping), got {max_grad_norm}')

        if exists(eval_every) != exists(eval_fn):
            raise ValueError('eval_fn and eval_every go together: pass both to evaluate every eval_every steps, or neither')

        if exists(checkpoint_every) and not exists(checkpoint_dir):
            raise ValueError('checkpoint_every was given without a checkpoint_dir to write to')

        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}: 'ddp' keeps a whole copy of the frozen models in every process, 'fsdp' shards them; got {strategy!r}")

        if exists(frozen_checkpoints) and strategy != 'fsdp':
            raise ValueError("frozen_checkpoints loads each process's shard of the frozen models, with strategy='fsdp'; with 'ddp' every process holds whole models: build them as usual")

        if resume and not exists(checkpoint_dir) and not isinstance(resume, (str, os.PathLike)):
            raise ValueError('resume=True needs a checkpoint_dir to find the latest checkpoint in (or pass the checkpoint path as resume=)')

        self.calm = calm
        self.num_train_steps = num_train_steps
        self.batch_size = batch_size
        self.grad_accum_every = grad_accum_every
        self.max_grad_norm = max_grad_norm
        self.bf16 = bf16
        self.batch_keys = batch_keys
        self.loss_fn = loss_fn
        self.eval_fn = eval_fn
        self.eval_every = eval_every
        self.checkpoint_dir = Path(checkpoint_dir) if exists(checkpoint_dir) else None
        self.checkpoint_every = checkpoint_every
        self.keep_last = keep_last
        self.seed = seed
        self.strategy = strategy
        self.progress = progress

        # what is trained: the composition weights, and the anchor parameters left trainable (LoRA) when asked

        trainable = {name: param for name, param in calm.named_parameters() if param.requires_grad}
        allowed = ('cross_attns.', 'anchor.') if train_anchor_params else ('cross_attns.',)
        outside = [name for name in trainable if not name.startswith(allowed)]

        if len(outside) > 0:
            in_anchor = any(name.startswith('anchor.') for name in outside)
            raise ValueError(
                f'FineTuner trains and checkpoints the composition weights (calm.cross_attns) only, but these parameters '
                f'outside it require grad: {", ".join(outside[:5])}{" ..." if len(outside) > 5 else ""}. '
                + ('To train the anchor parameters left trainable (e.g. LoRA weights) too, pass train_anchor_params=True; or freeze them' if in_anchor else 'Freeze them, or write your own loop')
            )

        if len(trainable) == 0:
            raise ValueError('the CALM has no trainable parameters: calm.cross_attns is frozen (requires_grad=False)')

        # processes and device

        self.distributed = setup_distributed(device, backend)
        self.device = self.distributed.device

        if exists(frozen_checkpoints):
            # built on meta: sharded first, then each process reads its part of the files
            self.model = shard_and_load(calm, frozen_checkpoints, distributed = self.distributed)
        else:
            if on_meta(calm):
                raise ValueError('the CALM is on the meta device (no weights): pass frozen_checkpoints= (one per frozen model, the anchor first) with strategy=\'fsdp\' to load them, or build it over loaded models')

            calm.to(self.device)
            self.model = wrap_for_ddp(calm, self.distributed, find_unused_parameters) if strategy == 'ddp' else shard_frozen_models(calm, self.distributed)

        self.params = [param for param in calm.parameters() if param.requires_grad]
        refuse_float16(calm)

        # AdamW; no weight decay on norms and biases (the usual practice)

        self.optimizer = AdamW([
            dict(params = [param for param in self.params if param.ndim >= 2], weight_decay = weight_decay),
            dict(params = [param for param in self.params if param.ndim < 2], weight_decay = 0.)
        ], lr = learning_rate, betas = betas)

        self.scheduler = warmup_then(
            self.optimizer,
            warmup_steps = warmup_steps,
            num_train_steps = num_train_steps,
            schedule = schedule,
            min_lr_ratio = min_lr_ratio
        )

        # data: every process shuffles with the same seed and takes its own shard; a stream is
        # split between the processes and read in its own order

        dataset = readable_rows(dataset)
        self.streaming = isinstance(dataset, IterableDataset)

        if not self.streaming and not isinstance(dataset, MapDataset):
            raise TypeError(f'dataset: a {type(dataset).__name__} can be read only once; pass a map-style dataset (with __len__ and __getitem__), or an IterableDataset whose __iter__ starts the stream anew for every epoch')

        if self.streaming and shuffle:
            raise ValueError('shuffle=True: a stream (IterableDataset) has no random access; shuffle it yourself, e.g. `dataset.shuffle(seed = 0, buffer_size = 10_000)` for a datasets.IterableDataset')

        self.dataset = shard_stream(dataset, self.distributed.rank, self.distributed.world_size) if self.streaming else dataset

        self.sampler = None if self.streaming else ResumableDistributedSampler(
            dataset,
            num_replicas = self.distributed.world_size,
            rank = self.distributed.rank,
            shuffle = shuffle is not False,
            seed = seed
        )

        # the default collate pads rows and reads Hugging Face's names (training/collate.py).
        # A generator of its own, so that creating a loader iterator does not draw from the global RNG

        self.loader = DataLoader(
            self.dataset,
            batch_size = batch_size,
            sampler = self.sampler,
            drop_last = True,
            num_workers = num_workers,
            collate_fn = collate_fn if exists(collate_fn) else Collator(len(calm.augments), max(calm.pad_id, 0), batch_keys, text_allowed = loss_fn is not next_token_loss),
            pin_memory = self.device.type == 'cuda',
            generator = torch.Generator().manual_seed(seed)
        )

        self.batches_per_epoch = None if self.streaming else len(self.sampler) // batch_size

        if self.batches_per_epoch == 0:
            raise ValueError(
                f'the dataset has {len(dataset)} samples, {len(self.sampler)} per process over {self.distributed.world_size} process(es): '
                f'too few for one batch of {batch_size}; lower batch_size or add data'
            )

        # progress

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches this process took from the current epoch
        self.history: list[dict[str, Any]] = []
        self.batches = None
        self.saved_step: int | None = None  # the step of the last checkpoint written or loaded

        if resume:
            path = Path(resume) if isinstance(resume, (str, os.PathLike)) else latest_checkpoint(self.checkpoint_dir)

            if exists(path):
                self.load_checkpoint(path)
            elif self.distributed.is_main:
                print(f'no checkpoint in {self.checkpoint_dir} to resume from: training starts at step 0')

        # checkpoints past the step this run starts at are another run's (or a future this run
        # abandons): its own would mix with them, and `resume = True` would later pick theirs
        later = [step for step, _ in checkpoints(self.checkpoint_dir) if step > self.step] if exists(self.checkpoint_dir) else []

        if len(later) > 0:
            raise ValueError(
                f'checkpoint_dir {self.checkpoint_dir} holds checkpoints of steps {later}, past the step this run starts at ({self.step}): '
                'resume from the latest (resume = True), or write to another checkpoint_dir, or remove them first'
            )

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.grad_accum_every * self.distributed.world_size

    # data

    def micro_batches(self):
        # epochs follow one another; a resumed run starts partway into one (a stream reads up to
        # that point again: it has no random access)
        while True:
            batches = self.loader

            if self.streaming:
                if hasattr(self.dataset, 'set_epoch'):
                    self.dataset.set_epoch(self.epoch)
                batches = islice(self.loader, self.batch_in_epoch, None)
            else:
                self.sampler.set_epoch(self.epoch, start = self.batch_in_epoch * self.batch_size)

            for batch in batches:
                self.batch_in_epoch += 1
                yield to_device(named(as_kwargs(batch, self.batch_keys)), self.device)

            if self.batch_in_epoch == 0:
                raise ValueError(f'the stream gave this process fewer than batch_size = {self.batch_size} items in an epoch: lower batch_size or add data')

            self.epoch += 1
            self.batch_in_epoch = 0

    # training

    def autocast(self):
        return torch.autocast(self.device.type, dtype = torch.bfloat16) if self.bf16 else nullcontext()

    def micro_step(self, batch: dict, sync: bool) -> tuple[Tensor, Tensor]:
        # gradients are all-reduced on the last micro-batch of a step only
        no_sync = self.model.no_sync() if self.distributed.enabled and self.strategy == 'ddp' and not sync else nullcontext()

        with no_sync:
            with self.autocast():
                out = self.loss_fn(self.model, batch)

            loss, count = out if isinstance(out, tuple) else (out, 1)
            loss.backward()

        return loss.detach().float(), torch.as_tensor(count, device = self.device, dtype = torch.float32)

    def train_step(self) -> dict[str, Any]:
        totals = torch.zeros(2, device = self.device)  # loss summed over tokens, token count

        for index in range(self.grad_accum_every):
            loss, count = self.micro_step(next(self.batches), sync = index == self.grad_accum_every - 1)
            totals += torch.stack((loss, count))

        self.distributed.all_reduce_sum(totals)
        loss_sum, count = totals.tolist()

        if self.strategy == 'fsdp':
            average_gradients(self.params, self.distributed)  # the composition is replicated: DDP's all-reduce, once per step

        # the gradients now hold this step's summed loss, averaged over processes by DDP:
        # scaled, they are the gradient of the mean over every token of the step
        scale = self.distributed.world_size / max(count, 1.)

        for param in self.params:
            if exists(param.grad):
                param.grad.mul_(scale)

        grad_norm = clip_grad_norm_(self.params, self.max_grad_norm).item() if exists(self.max_grad_norm) else None
        lr = self.scheduler.get_last_lr()[0]

        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none = True)
        self.step += 1

        return dict(step = self.step, loss = loss_sum / max(count, 1.), lr = lr, grad_norm = grad_norm)

    @typecheck
    def train(self, num_steps: int | None = None) -> list[dict[str, Any]]:
        """Trains up to `num_train_steps`, or for `num_steps` more steps (at most up to it).
        Returns the history: one dict per step with its loss, learning rate, gradient norm and
        evaluation results."""

        until = self.num_train_steps if not exists(num_steps) else min(self.step + num_steps, self.num_train_steps)
        self.batches = self.batches or self.micro_batches()
        self.model.train()

        bar = tqdm(total = self.num_train_steps, initial = self.step, desc = 'training', dynamic_ncols = True, disable = not (self.progress and self.distributed.is_main))

        try:
            while self.step < until:
                record = self.train_step()
                bar.update(1)
                bar.set_postfix(loss = f'{record["loss"]:.4f}', lr = f'{record["lr"]:.2e}')

                if exists(self.eval_every) and self.step % self.eval_every == 0:
                    results = self.evaluate()
                    record.update(results)

                    if self.distributed.is_main and len(results) > 0:
                        bar.write(f'step {self.step}: ' + ', '.join(f'{key} {value:.4f}' if isinstance(value, float) else f'{key} {value}' for key, value in results.items()))

                self.history.append(record)

                if exists(self.checkpoint_every) and self.step % self.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()

        # the state a run ends in is always worth keeping
        if exists(self.checkpoint_dir) and self.saved_step != self.step and self.step > 0:
            self.save_checkpoint()

        return self.history

    def evaluate(self) -> dict[str, Any]:
        """Runs eval_fn(trainer) on every process, with the CALM in eval mode and without gradients.
        Use `trainer.calm` (not `trainer.model`, the DDP wrapper) for forwards on one process."""

        self.model.eval()

        try:
            with torch.no_grad(), self.autocast():
                results = self.eval_fn(self)
        finally:
            self.model.train()

        return dict(results or {})

    # checkpoints

    def save_checkpoint(self) -> Path | None:
        """Writes a training checkpoint from rank 0 (every process must call this: RNG states are
        gathered). Returns its path on rank 0, None elsewhere."""

        if not exists(self.checkpoint_dir):
            raise ValueError('FineTuner has no checkpoint_dir to save to')

        rng = self.distributed.all_gather_objects(rng_state())
        path = None

        if self.distributed.is_main:
            state = dict(
                step = self.step,
                epoch = self.epoch,
                samples_into_epoch = self.batch_in_epoch * self.batch_size * self.distributed.world_size,
                optimizer = self.optimizer.state_dict(),
                scheduler = self.scheduler.state_dict(),
                rng = rng,
                world_size = self.distributed.world_size,
                batch_size = self.batch_size,
                grad_accum_every = self.grad_accum_every,
                seed = self.seed
            )

            path = save_training_checkpoint(self.checkpoint_dir, self.step, self.calm, state, keep_last = self.keep_last)

        # nobody runs ahead (and maybe resumes from a half-written directory after a crash)
        self.distributed.barrier()
        self.saved_step = self.step
        return path

    @typecheck
    def load_checkpoint(self, path: str | os.PathLike):
        """Restores composition weights, optimizer, scheduler, step, data position and RNG states."""

        path = Path(path)
        state = load_training_state(path)
        self.calm.load(path / COMPOSITION_FILE)

        # the saved optimizer and scheduler carry their own settings, which win over this
        # FineTuner's: a change would be silently ignored
        def settings(groups: list[dict]) -> list[tuple]:
            return [(group.get('initial_lr', group['lr']), group['weight_decay'], tuple(group['betas'])) for group in groups]

        given = dict(seed = self.seed, grad_accum_every = self.grad_accum_every, optimizer = settings(self.optimizer.param_groups))
        saved = dict(seed = state.get('seed'), grad_accum_every = state.get('grad_accum_every'), optimizer = settings(state['optimizer']['param_groups']))
        changed = [name for name in given if given[name] != saved[name]]

        if len(changed) > 0 and self.distributed.is_main:
            warn_user(
                f'resuming from {path} with other settings than it was saved with: {", ".join(f"{name} {given[name]} (saved: {saved[name]})" for name in changed)}. '
                'The learning rate, weight decay and betas stay the saved ones (the optimizer\'s state); another seed or grad_accum_every changes the data order or the steps'
            )

        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        self.step = self.saved_step = state['step']

        # the data position is kept in samples of the whole run, so a run resumed with the same
        # world size and batch size continues with exactly the batches it would have seen
        per_batch = self.batch_size * self.distributed.world_size
        self.epoch = state['epoch']
        self.batch_in_epoch = state['samples_into_epoch'] // per_batch
        self.batches = None

        same_shape = state['world_size'] == self.distributed.world_size and state['batch_size'] == self.batch_size

        if not same_shape and self.distributed.is_main:
            warn_user(
                f'resuming with world size {self.distributed.world_size} and batch size {self.batch_size}, '
                f'saved with {state["world_size"]} and {state["batch_size"]}: the data order differs from an uninterrupted run'
            )

        rng = state['rng']
        set_rng_state(rng[self.distributed.rank] if len(rng) == self.distributed.world_size else rng[0])

        if self.distributed.is_main and self.progress:
            print(f'resumed from {path} at step {self.step}')

    def close(self):
        """Ends the process group, if this FineTuner started it."""
        self.distributed.close()
