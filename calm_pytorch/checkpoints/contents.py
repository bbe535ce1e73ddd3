from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from torch import Tensor
from torch.nn import Module

from calm_pytorch.composition.cross_attention import CrossAttentionBlock
from calm_pytorch.checkpoints.fingerprint import class_name

# a composition checkpoint is one safetensors file: the tensors are the composition weights
# (`cross_attns.*`, and `anchor.*` for anchor parameters trained with them, e.g. LoRA weights;
# nothing of the frozen models) and its string metadata holds
#   calm_format - 'calm-composition'
#   calm_wiring - JSON: which augment layer feeds which anchor layer, at what widths and heads
#   calm_sha256 - a digest of the wiring, the tensor index and every tensor byte: safetensors has
#                 no checksum of its own, and a flipped byte must not load silently
# One file keeps weights and wiring consistent with each other and lets one rename publish both.
# safetensors holds raw tensors only, so loading never unpickles (never runs code).

FORMAT = 'calm-composition'
FORMAT_VERSION = 1
PREFIX = 'cross_attns.'
ANCHOR_PREFIX = 'anchor.'

def library_version() -> str:
    try:
        return version('calm-compose')
    except PackageNotFoundError:
        return 'unknown'

# what is saved

def composition_state_dict(calm: Module) -> dict[str, Tensor]:
    """The composition weights, keyed as in `calm.state_dict()` (`cross_attns.0.1.to_q.weight`, ...),
    and the anchor parameters trained with them (`anchor.*`, e.g. LoRA weights: those the user left
    trainable, see composition/freezing.py)."""

    state = {PREFIX + key: tensor for key, tensor in calm.cross_attns.state_dict().items()}
    state |= {ANCHOR_PREFIX + name: param.detach() for name, param in calm.anchor.named_parameters() if param.requires_grad}
    return state

def block_shape(block: CrossAttentionBlock) -> dict[str, int]:
    return dict(
        dim = block.norm.normalized_shape[0],
        dim_context = block.context_norm.normalized_shape[0],
        heads = block.heads,
        dim_head = block.to_q.out_features // block.heads
    )

def composition_wiring(calm: Module) -> dict[str, Any]:
    """The wiring of a composition, as saved beside its weights: per augment, each connection with
    its layers (1-indexed), hidden positions, widths and heads."""

    augments = []

    for index, (connections, keys, blocks) in enumerate(zip(calm.connections, calm.augment_keys, calm.cross_attns)):
        augments.append(dict(
            model = class_name(calm.augments[index]),
            connections = [
                dict(
                    augment_layer = augment_layer,
                    anchor_layer = anchor_layer,
                    augment_position = position,
                    anchor_position = calm.anchor_positions[anchor_layer - 1],
                    **block_shape(block)
                )
                for (augment_layer, anchor_layer), (_, position), block in zip(connections, keys, blocks)
            ]
        ))

    return dict(
        format = FORMAT,
        format_version = FORMAT_VERSION,
        library_version = library_version(),
        anchor = class_name(calm.anchor),
        augments = augments
    )
