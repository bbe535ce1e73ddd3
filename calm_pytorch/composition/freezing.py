from __future__ import annotations

from collections.abc import Sequence

from torch.nn import Module, Parameter

# What the composition freezes (models wrapped by PEFT are unwrapped in models/factory.py).
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
