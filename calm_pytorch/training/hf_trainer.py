from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.nn import Module
from transformers import Trainer
from transformers import __version__ as transformers_version
from transformers.trainer import SCHEDULER_NAME, TRAINING_ARGS_NAME

from calm_pytorch.calm import CALM
from calm_pytorch.checkpoints.pretrained import write_model_card
from calm_pytorch.checkpoints.zero3 import any_partitioned
from calm_pytorch.helpers import exists
from calm_pytorch.training.fsdp import refuse_trained_frozen_params, shard_units
from calm_pytorch.training.step_checkpoints import COMPOSITION_FILE

# Hugging Face Trainer and Accelerate, saving what a composition learned and nothing else.
#
# Trainer trains a CALM as it is (CALM's forward takes `input_ids`, `attention_mask`, `labels`
# and returns `.loss` and `.logits`), but it saves a model that is not a `PreTrainedModel` as
# `model.state_dict()` in one safetensors file: every frozen weight, written again at every
# checkpoint, and a crash when a frozen model ties its embeddings (two names, one tensor).
# transformers 5.23 offers no hook for what a model saves (`Trainer._save` calls
# `save_pretrained` on transformers and PEFT models only, else `state_dict()`; a callback runs
# after the save, too late to prevent the crash), and `state_dict()` keeps its standard meaning,
# so `CALMTrainer` overrides the three places that write or read model weights. Optimizer,
# scheduler, RNG and trainer state stay Trainer's own files.
#
# Under FSDP2 (`TrainingArguments(fsdp = 'full_shard', fsdp_config = {'fsdp_version': 2})`, or
# `accelerate launch` with an FSDP2 config) Accelerate shards the whole CALM: the blocks of the
# frozen models are units of their own (CALMTrainer names their classes when the config does not),
# and the rest (the composition, the models' embeddings, norms and heads) is the root unit. Trainer
# would save the whole model at every checkpoint (`save_fsdp_model`), frozen weights included;
# CALMTrainer writes the composition only: every process gathers the composition's parameters,
# rank 0 writes `calm.save`. The optimizer state (of the composition only) is Accelerate's own FSDP
# file, and a resume loads the composition into the shards (a whole tensor read as replicated,
# each process keeping its rows). Accelerate 1.16 enables FSDP only on accelerators: on CPU it trains with DDP
# instead, silently; CALMTrainer refuses that.

def fsdp_asked(args) -> bool:
    return bool(args.fsdp) or os.environ.get('ACCELERATE_USE_FSDP', 'false').lower() == 'true'

@contextmanager
def gathered_composition(calm: Module):
    """The composition's parameters whole in every process (gathered: every process must enter),
    its shards back after. Only the composition: FSDP2's `unshard` would gather the whole root unit,
    and its gathered tensors live in a buffer safetensors cannot read."""
    from torch.distributed.tensor import DTensor

    swapped = []

    for module in calm.cross_attns.modules():
        for name, param in list(module._parameters.items()):
            if isinstance(param, DTensor):
                swapped.append((module, name, param))
                module._parameters[name] = torch.nn.Parameter(param.full_tensor(), requires_grad = param.requires_grad)

    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param

def replicated_reads():
    # a whole tensor copied into a sharded (DTensor) parameter is read as replicated: each process keeps its rows
    from torch.distributed.tensor.experimental import implicit_replication
    return implicit_replication()

class CALMTrainer(Trainer):
    """`transformers.Trainer` for a CALM. Training is Trainer's own; `save_model()`, the periodic
    checkpoints and the best model are composition directories written by `calm.save_pretrained`
    (`composition.safetensors`: the cross-attention weights, any anchor parameters the user left
    trainable such as LoRA weights, and the wiring; `config.json`, a model card `README.md`, and the
    tokenizer Trainer was given), so `CALM.from_pretrained(output_dir)` loads one; and
    `train(resume_from_checkpoint = ...)` and `load_best_model_at_end` read the composition back
    with `calm.load`. `create_model_card()` (and so `push_to_hub()`) writes the composition's card,
    with the training run. Under FSDP2 (through Accelerate, on GPUs) the same files are written, by
    rank 0, and read back into the shards."""


    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

        if fsdp_asked(self.args) and not self.is_fsdp_enabled:
            raise ValueError(
                'FSDP was asked for (TrainingArguments(fsdp=...) or ACCELERATE_USE_FSDP), but Accelerate runs '
                f'{self.accelerator.distributed_type.value} here: it enables FSDP on accelerators only (GPUs, ...), and on CPU it would '
                f'train with DDP, every process holding the whole frozen models. On CPU, shard the frozen models with '
                f"FineTuner(strategy='fsdp'); or leave fsdp unset to train with DDP"
            )

        if self.is_fsdp_enabled:
            self.prepare_fsdp()

    def prepare_fsdp(self):
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        plugin = self.accelerator.state.fsdp_plugin
        calm = self.unwrapped_calm()

        if plugin.fsdp_version != 2:
            raise ValueError(f"CALMTrainer runs FSDP2 only, got fsdp_version {plugin.fsdp_version}: pass fsdp_config={{'fsdp_version': 2}}")

        refuse_trained_frozen_params(calm, 'CALMTrainer under FSDP', "DDP (no fsdp), or FineTuner(strategy='ddp', train_anchor_params=True)")

        # the units: the blocks of every frozen model, unless the config names its own
        if plugin.transformer_cls_names_to_wrap is None and plugin.auto_wrap_policy in (None, transformer_auto_wrap_policy):
            adapters = ((calm.anchor, calm.anchor_adapter), *zip(calm.augments, calm.augment_adapters))
            plugin.auto_wrap_policy = transformer_auto_wrap_policy
            plugin.transformer_cls_names_to_wrap = sorted({type(unit).__name__ for model, adapter in adapters for unit in shard_units(model, adapter)})

        # an augment stopped after its deepest connected layer (by an exception) would skip FSDP's
        # post-forward hook and stay gathered: augments run to their end (training/fsdp.py)
        for recorder in calm.recorders:
            recorder.stop_early = False

    def unwrapped_calm(self, model: Module | None = None) -> CALM:
        # DistributedDataParallel and torch.compile wrap the module they are given
        model = self.accelerator.unwrap_model(model if exists(model) else self.model, keep_torch_compile = False)

        if not isinstance(model, CALM):
            raise TypeError(f'CALMTrainer trains a CALM, got {type(model).__name__}; use transformers.Trainer for other models')

        return model

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        calm = self.unwrapped_calm()

        if self.is_fsdp_enabled:
            # Trainer would gather the whole model (FULL_STATE_DICT) or save nothing (SHARDED_STATE_DICT)
            with gathered_composition(calm):
                self._save(output_dir)

            self.accelerator.wait_for_everyone()
            return

        # DeepSpeed ZeRO-3 partitions every weight: Trainer would gather all of them, frozen models
        # included, or write DeepSpeed's own sharded checkpoint. `calm.save` gathers the composition
        # and fingerprints the frozen models one tensor at a time, a collective every process joins
        # (checkpoints/zero3.py); the first process writes
        if not (self.is_deepspeed_enabled and any_partitioned(calm)):
            return super().save_model(output_dir, _internal_call)

        output_dir = output_dir if exists(output_dir) else self.args.output_dir

        if self.args.should_save:
            self._save(output_dir)
        else:
            calm.save(Path(output_dir) / COMPOSITION_FILE)  # gathers with the others, writes nothing

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None):
        # state_dict: Trainer gathers one under FSDP / DeepSpeed; the composition is read from the model
        if not self.args.should_save:
            return

        output_dir = Path(output_dir if exists(output_dir) else self.args.output_dir)
        output_dir.mkdir(parents = True, exist_ok = True)

        self.unwrapped_calm().save_pretrained(output_dir, tokenizer = self.processing_class)
        torch.save(self.args, output_dir / TRAINING_ARGS_NAME)

    def create_model_card(self, model_name: str | None = None, dataset: str | list[str] | None = None, **kwargs):
        """The composition's model card (see `calm.save_pretrained`) in `args.output_dir/README.md`,
        with this run's hyperparameters and last logged losses. Trainer's other card options
        (language, license, tags, ...) are for transformers models and are not used."""

        if not self.is_world_process_zero():
            return

        output_dir = Path(self.args.output_dir)
        output_dir.mkdir(parents = True, exist_ok = True)
        write_model_card(self.unwrapped_calm(), output_dir, model_name or self.args.hub_model_id, self.training_summary(dataset))

    def training_summary(self, dataset: str | list[str] | None) -> list[str]:
        args = self.args
        lines = [
            f'Trained with `CALMTrainer` (transformers {transformers_version}) for {self.state.global_step} steps: learning rate {args.learning_rate}, '
            f'{args.per_device_train_batch_size} per device, gradient accumulation {args.gradient_accumulation_steps}, seed {args.seed}.'
        ]

        if exists(dataset):
            lines.append(f'Data: {", ".join([dataset] if isinstance(dataset, str) else dataset)}.')

        losses = [entry for entry in self.state.log_history if 'loss' in entry or 'eval_loss' in entry]

        if len(losses) > 0:
            last = losses[-1]
            lines.append('Last logged: ' + ', '.join(f'{key} {value:.4g}' for key, value in last.items() if key in ('loss', 'eval_loss', 'step', 'epoch')) + '.')

        return lines

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Module | None = None):
        path = Path(resume_from_checkpoint) / COMPOSITION_FILE

        if not path.is_file():
            raise FileNotFoundError(f'{resume_from_checkpoint} holds no {COMPOSITION_FILE}: resume from a checkpoint written by CALMTrainer')

        self.load_composition(path, model)

    def _load_best_model(self):
        self.load_composition(Path(self.state.best_model_checkpoint) / COMPOSITION_FILE)

    def load_composition(self, path: Path, model: Module | None = None):
        with replicated_reads() if self.is_fsdp_enabled else nullcontext():
            self.unwrapped_calm(model).load(path)

    def _save_optimizer_and_scheduler(self, output_dir: str):
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)

        # Trainer's own writes the whole sharded model too (`save_fsdp_model`): the optimizer and scheduler only
        from accelerate.utils import save_fsdp_optimizer

        save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model, output_dir)

        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

# Accelerate: `accelerator.save_state` / `load_state` write each prepared model's `state_dict()`.
# Accelerate's own extension point, a pair of pre-hooks, lets a composition be written by
# `calm.save` instead and taken off the list Accelerate saves (or loads) itself.

def composition_file(index: int) -> str:
    return COMPOSITION_FILE if index == 0 else f'composition_{index}.safetensors'

def register_accelerate_hooks(accelerator) -> tuple:
    """Makes `accelerator.save_state(dir)` write every prepared CALM as a composition checkpoint
    (`dir/composition.safetensors`, `composition_1.safetensors` for a second CALM, ...) and
    `accelerator.load_state(dir)` load it back; optimizer, scheduler, RNG and other models stay
    Accelerate's. Returns the two hook handles (`.remove()` them to undo)."""

    def calms(models) -> list[tuple[int, CALM]]:
        found = []

        for index, model in enumerate(models):
            model = accelerator.unwrap_model(model)
            if isinstance(model, CALM):
                found.append((index, model))

        return found

    def save_hook(models, weights, output_dir):
        # under FSDP and DeepSpeed Accelerate saves models its own way and passes no weights
        if len(weights) != len(models):
            return

        for index, calm in reversed(calms(models)):
            if accelerator.is_main_process:
                calm.save(Path(output_dir) / composition_file(index))

            del weights[index]

    def load_hook(models, input_dir):
        for index, calm in reversed(calms(models)):
            calm.load(Path(input_dir) / composition_file(index))
            del models[index]

    return accelerator.register_save_state_pre_hook(save_hook), accelerator.register_load_state_pre_hook(load_hook)

__all__ = ['CALMTrainer', 'register_accelerate_hooks']
