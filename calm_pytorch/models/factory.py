from __future__ import annotations

import sys

from torch.nn import Module

from calm_pytorch.helpers import exists
from calm_pytorch.models.adapter import ModelAdapter
from calm_pytorch.models.hf_adapter import HFAdapter
from calm_pytorch.models.xtransformers import XTransformersAdapter

# which adapter a model gets: a transformers model, an x-transformers model, or any module whose
# blocks are given. A model wrapped by PEFT is wired like its base model

def make_adapter(model: Module, *, role: str = 'augment', **kwargs) -> ModelAdapter:
    # role ('anchor' or 'augment') matters to transformers models only: an augment's padding
    # mask also gives its position ids, and an encoder-decoder can only be an augment
    model = peft_base_model(model)

    if HFAdapter.matches(model):
        return HFAdapter(model, role = role, **kwargs)

    if XTransformersAdapter.matches(model):
        return XTransformersAdapter(model, role = role, **kwargs)

    return ModelAdapter(model, **kwargs)

def peft_base_model(model: Module) -> Module:
    """The model inside a PEFT wrapper, else `model`. LoRA and PEFT's other adapter methods change
    the base model's modules in place, so the base model's blocks are the ones to wire, by their
    usual names, and calling it runs the adapters. `peft` is never imported here: a model can only
    be a PeftModel if peft was already imported."""

    peft = sys.modules.get('peft')
    peft_model = getattr(peft, 'PeftModel', None) if exists(peft) else None

    if not isinstance(peft_model, type) or not isinstance(model, peft_model):
        return model

    if model.active_peft_config.is_prompt_learning:
        raise ValueError(
            f'{type(model).__name__} uses {model.active_peft_config.peft_type}, a prompt-learning method whose virtual tokens '
            'only its own forward adds; CALM composes PEFT models whose adapters live inside the layers (LoRA, IA3, ...)'
        )

    return model.get_base_model()
