from __future__ import annotations

import copy
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn import Module
from transformers import GenerationConfig
from trl import DPOTrainer, SFTTrainer
from trl.trainer.utils import FusedCausalLMOutput

from calm_pytorch.calm import CALM
from calm_pytorch.helpers import exists
from calm_pytorch.training.hf_trainer import CALMTrainer

# TRL's SFT and DPO trainers over a composition, saving what it learned and nothing else.
#
# `SFTTrainer(model = calm)` and `DPOTrainer(model = calm)` cannot work as they are: both patch a
# "fused LM head" onto the model's forward (`trl.trainer.utils.add_fused_lm_head`) that runs the
# model's transformers backbone and multiplies its last hidden state by the LM head weight, which
# would score the anchor and skip the composition altogether; and they tag the model for its
# model card (`add_model_tags`, a `PreTrainedModel` method). The trainers below keep everything
# else of TRL (datasets, chat templates, completion-only loss, packing, metrics, DPO's losses) and
# give the CALM a forward that answers TRL's `fused_lm_head = True` from the composed logits, with
# the fields TRL reads (`log_probs`, `entropy`, `is_top1`, `mean_logits`, `label_mask`, `loss`).
# Saving, resuming and the best model are `CALMTrainer`'s: the composition only.
#
# DPO's reference model is the frozen anchor, called directly: outside a CALM call its hooks do
# nothing, and a composition at initialisation is exactly the anchor (its output projections are
# zero), so the reference is the policy DPO starts from, with no copy of any model.

def check_calm(model: Any, trainer: str) -> CALM:
    if not isinstance(model, CALM):
        raise TypeError(f'{trainer} trains a CALM, got {type(model).__name__}; use TRL\'s own trainer for other models')

    return model

def composed_fused_forward(calm: CALM, *args, fused_lm_head: bool = False, labels = None, shift_labels = None, num_items_in_batch = None, **kwargs):
    """CALM's forward, answering TRL's `fused_lm_head = True` (the output of
    `trl.trainer.utils.add_fused_lm_head`) from the composed logits; otherwise CALM's own."""

    if exists(shift_labels):
        raise ValueError('`shift_labels` (context or sequence parallelism) is not supported for a CALM: the anchor and the augments read whole sequences')

    if not fused_lm_head:
        extra = dict(num_items_in_batch = num_items_in_batch) if exists(num_items_in_batch) else dict()
        return CALM.forward(calm, *args, labels = labels, **extra, **kwargs)

    if kwargs.pop('output_router_logits', False):
        raise ValueError('router logits (an MoE auxiliary loss) are not supported for a CALM anchor: set router_aux_loss_coef = 0')

    kwargs.pop('use_cache', None)  # CALM runs no cache in training
    logits = CALM.forward(calm, *args, **kwargs).logits[:, :-1]

    labels = labels[:, 1:].to(logits.device)
    mask = labels != -100
    logprobs = F.log_softmax(logits.float(), dim = -1)
    picked = logprobs.gather(-1, labels.masked_fill(~mask, 0)[..., None]).squeeze(-1)

    # every per-token field is zero where the label is ignored, as TRL's own
    log_probs = picked.masked_fill(~mask, 0.)

    with torch.no_grad():
        entropy = -(logprobs.exp() * logprobs).sum(-1).masked_fill(~mask, 0.)
        is_top1 = (logits.argmax(-1) == labels) & mask
        mean_logits = logits.float().mean(-1).masked_fill(~mask, 0.)

    count = mask.sum().clamp(min = 1) if not exists(num_items_in_batch) else num_items_in_batch
    loss = -log_probs.sum() / count

    return FusedCausalLMOutput(loss = loss, log_probs = log_probs, entropy = entropy, mean_logits = mean_logits, is_top1 = is_top1, label_mask = mask)

def record_model_tags(calm: CALM, tags: str | list[str]):
    # `PreTrainedModel.add_model_tags`: names for the model card
    tags = [tags] if isinstance(tags, str) else list(tags)
    calm.model_tags = list(dict.fromkeys([*(getattr(calm, 'model_tags', None) or []), *tags]))

def prepare_for_trl(calm: CALM):
    if not callable(getattr(calm, 'add_model_tags', None)):
        calm.add_model_tags = types.MethodType(record_model_tags, calm)

    # TRL writes the tokenizer's pad and eos ids into it: a copy of the anchor's, so the anchor's stays its own
    if not hasattr(calm, 'generation_config'):
        anchor_config = getattr(calm.anchor, 'generation_config', None)
        calm.generation_config = copy.deepcopy(anchor_config) if exists(anchor_config) else GenerationConfig()

def compose_after_trl(calm: CALM):
    # in place of the fused LM head TRL patched onto the instance
    calm.forward = types.MethodType(composed_fused_forward, calm)

class CALMSFTTrainer(CALMTrainer, SFTTrainer):
    """TRL's `SFTTrainer` for a CALM: TRL's data handling (text, conversational and
    prompt-completion datasets, completion-only loss, packing) and metrics, the composed forward,
    and composition-only checkpoints (`composition.safetensors`, as `CALMTrainer`).

        trainer = CALMSFTTrainer(model = calm, args = SFTConfig(...), train_dataset = dataset, processing_class = tokenizer)

    A PEFT adapter goes on the anchor before the CALM is built (its trainable weights are trained
    and saved with the composition); `peft_config` is refused."""

    def __init__(self, model: CALM, args = None, *positional, peft_config = None, **kwargs):
        calm = check_calm(model, type(self).__name__)

        if exists(peft_config):
            raise ValueError('`peft_config` would wrap the whole CALM; put the adapter on the anchor before building the CALM (get_peft_model(anchor, config), then CALM(anchor, ...))')

        prepare_for_trl(calm)
        super().__init__(calm, args, *positional, **kwargs)
        compose_after_trl(calm)

class CALMDPOTrainer(CALMTrainer, DPOTrainer):
    """TRL's `DPOTrainer` for a CALM, the frozen anchor as the reference model (see the module
    comment: exactly the composition at initialisation). Composition-only checkpoints.

        trainer = CALMDPOTrainer(model = calm, args = DPOConfig(...), train_dataset = pairs, processing_class = tokenizer)

    ref_model: by default `calm.anchor`, which needs a Hugging Face causal LM as the anchor. The
               reference is fixed: `sync_ref_model` is refused (the anchor cannot move)."""

    def __init__(self, model: CALM, ref_model: Module | None = None, args = None, *positional, peft_config = None, **kwargs):
        calm = check_calm(model, type(self).__name__)

        if exists(peft_config):
            raise ValueError('`peft_config` would wrap the whole CALM; put the adapter on the anchor before building the CALM (get_peft_model(anchor, config), then CALM(anchor, ...))')

        if exists(args) and getattr(args, 'sync_ref_model', False):
            raise ValueError('sync_ref_model = True would copy the policy into the reference, here the frozen anchor; leave it False')

        if not exists(ref_model):
            if exists(getattr(args, 'deepspeed', None)):
                # TRL would wrap the reference in a DeepSpeed engine of its own, over the very
                # anchor the policy's engine holds (and under ZeRO-3 has partitioned): untested
                raise NotImplementedError('CALMDPOTrainer with the anchor as reference is not supported under DeepSpeed (untested: TRL would wrap the anchor in a second engine); train without `deepspeed`, or pass a separate `ref_model`')

            ref_model = calm.anchor

            if not callable(getattr(ref_model, 'get_output_embeddings', None)) or not hasattr(ref_model, 'config'):
                raise TypeError(f'the reference model of a CALM is its anchor, which TRL must call as a transformers causal LM; this anchor is a {type(ref_model).__name__}: pass `ref_model` yourself')

        prepare_for_trl(calm)
        super().__init__(calm, ref_model, args, *positional, **kwargs)
        compose_after_trl(calm)

__all__ = ['CALMSFTTrainer', 'CALMDPOTrainer']
