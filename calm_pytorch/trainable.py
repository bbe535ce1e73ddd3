from __future__ import annotations

import sys
from collections.abc import Sequence

from torch.nn import Module, Parameter

from calm_pytorch.helpers import exists

# What the composition freezes, and models wrapped by PEFT.
#
# CALM trains its cross-attention only and freezes the models, except for anchor parameters the
# user chose to train: a model of which some parameters are frozen and others not was set up that
# way on purpose (PEFT's get_peft_model freezes the base model and leaves the LoRA weights
# trainable), while a model whose every parameter requires grad is simply fresh, and is frozen
# whole. Those kept parameters are trained with the composition and saved with it.

def user_trainable(model: Module) -> list[str]:
    """Names of the parameters the user left trainable in a partly frozen model; [] when every
    parameter requires grad (the default of any model, not a choice) or none does."""

    # quantized weights (tensor subclasses: torchao, bitsandbytes, quanto) are frozen by the
    # quantizer, not by a choice: a quantized model with its embeddings and norms still trainable
    # is a fresh model, frozen whole
    named = [(name, param) for name, param in model.named_parameters() if type(param) is Parameter]
    trainable = [name for name, param in named if param.requires_grad]
    return trainable if len(trainable) < len(named) else []

def freeze_models(anchor: Module, augments: Sequence[Module]) -> list[str]:
    """Freezes the augments and the anchor, except the anchor parameters the user left trainable
    (see the module comment). Returns their names."""

    kept = user_trainable(anchor)

    for model in (anchor, *augments):
        model.requires_grad_(False)

    params = dict(anchor.named_parameters())

    for name in kept:
        params[name].requires_grad_(True)

    return kept

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
