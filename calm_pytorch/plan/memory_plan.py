from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from calm_pytorch.calm import CALM
from calm_pytorch.composition.activation_checkpointing import first_block_with_gradients
from calm_pytorch.composition.params import AugmentParams
from calm_pytorch.plan.activations import AnchorShape, cross_attention, cross_attention_mask
from calm_pytorch.plan.configs import load_config, meta_model, meta_masks
from calm_pytorch.plan.weights import Quantization, dtype_size, frozen_bytes, linear_numel, trainable

DTYPES = dict(bf16 = torch.bfloat16, bfloat16 = torch.bfloat16, fp16 = torch.float16, float16 = torch.float16, fp32 = torch.float32, float32 = torch.float32)
GIB = 2 ** 30

@dataclass
class MemoryPlan:
    """Bytes one process holds in one training step (forward, backward, AdamW step on the
    composition), by part; `total` is their sum. `activations` is what autograd keeps for the
    backward (with checkpointing: the checkpointed blocks' inputs and one block recomputing), with
    the float copies a quantized anchor hands autograd; `temporaries` the logits and their
    gradient, alive together at the start of the backward; `gathered` the frozen units FSDP
    gathers whole at a time. Not counted: the framework itself (CUDA context, allocator caches,
    the interpreter), and DDP's gradient buckets."""

    frozen: int
    composition: int
    gradients: int
    optimizer: int
    activations: int
    temporaries: int
    gathered: int
    kept: int  # what autograd keeps for the backward: benchmarks/memory.py's "kept for backward"
    anchor_params: int
    augment_params: list[int]
    composition_params: int
    connections: list
    blocks_with_gradient: int
    anchor_blocks: int
    settings: dict = field(default_factory = dict)

    @property
    def total(self) -> int:
        return self.frozen + self.composition + self.gradients + self.optimizer + self.activations + self.temporaries + self.gathered

    def rows(self) -> list[tuple[str, int]]:
        return [
            ('frozen weights', self.frozen),
            ('composition weights', self.composition),
            ('gradients', self.gradients),
            ('optimizer state (AdamW)', self.optimizer),
            ('activations', self.activations),
            ('temporaries (logits, their gradient)', self.temporaries),
            ('gathered by FSDP', self.gathered),
            ('total', self.total)
        ]

    def table(self) -> str:
        settings = ', '.join(f'{key} {value}' for key, value in self.settings.items())
        lines = [
            f'anchor {self.anchor_params / 1e9:.2f}B parameters, augments {", ".join(f"{count / 1e9:.2f}B" for count in self.augment_params)}, '
            f'composition {self.composition_params / 1e6:.1f}M; connections {self.connections}; '
            f'{self.blocks_with_gradient} of {self.anchor_blocks} anchor blocks carry the gradient',
            settings,
            '',
            '| per process | GiB |',
            '|---|---|'
        ]
        lines += [f'| {name} | {value / GIB:.2f} |' for name, value in self.rows()]
        return '\n'.join(lines)

def composition_over(anchor, augments: list, connections, attn_kwargs: dict, composition_dtype) -> CALM:
    augment_params = [
        AugmentParams(model = augment, **({} if connections is None or connections[index] is None else dict(connections = connections[index])))
        for index, augment in enumerate(augments)
    ]

    with meta_masks():
        return CALM(anchor, augment_params, attn_kwargs = attn_kwargs, composition_dtype = composition_dtype)

def memory_plan(
    anchor: Any,
    augments: Any | Sequence[Any],
    *,
    dtype: str | torch.dtype = 'bf16',
    batch: int = 1,
    seq_len: int = 2048,
    processes: int = 1,
    fsdp: bool = False,
    activation_checkpointing: bool = False,
    anchor_quantization: Quantization | None = None,
    augment_quantization: Quantization | None = None,
    attn_kwargs: dict = dict(heads = 8, dim_head = 64),
    connections: Sequence | None = None,
    composition_dtype: torch.dtype = torch.float32
) -> MemoryPlan:
    """The memory one process holds in a training step of `CALM(anchor, augments)`.

    anchor, augments: model configs: transformers configs, dicts with a `model_type`, config.json
                      paths or JSON strings (one augment or a list)
    dtype:            of the frozen models ('bf16', 'fp16', 'fp32' or a torch dtype)
    batch, seq_len:   the micro-batch of one process, in anchor tokens (aligned mode: the augments
                      read the same tokens)
    processes, fsdp:  with FSDP the frozen weights are sharded over the processes (without it
                      every process holds them whole)
    activation_checkpointing: `calm.gradient_checkpointing_enable()`
    anchor_quantization, augment_quantization: 'int8' (torchao, weight-only) or '4bit'
                      (bitsandbytes NF4; a formula, never run here)
    attn_kwargs, connections, composition_dtype: as `CALM` and `AugmentParams` take them
                      (connections: one entry per augment, None for the default)"""

    for name, value in dict(batch = batch, seq_len = seq_len, processes = processes).items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f'`{name}` must be a positive integer, got {value!r}')

    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    augments = list(augments) if isinstance(augments, (list, tuple)) else [augments]

    if connections is not None and len(connections) != len(augments):
        raise ValueError(f'`connections` holds {len(connections)} entries for {len(augments)} augment(s): one per augment (None for the default)')
    shards = processes if fsdp else 1

    anchor_config = load_config(anchor)
    augment_configs = [load_config(augment) for augment in augments]
    shape = AnchorShape.of(anchor_config, dtype_size(dtype))

    anchor_model = meta_model(anchor_config, dtype)
    augment_models = [meta_model(config, dtype) for config in augment_configs]
    calm = composition_over(anchor_model, augment_models, connections, attn_kwargs, composition_dtype)

    frozen = frozen_bytes(anchor_model, anchor_quantization, shards) + sum(frozen_bytes(model, augment_quantization, shards) for model in augment_models)
    composition_params, composition = trainable(calm)

    # activations

    units = calm.anchor_adapter.checkpoint_units()
    first = first_block_with_gradients(calm)
    with_gradient = len(units) - first
    tokens = batch * seq_len

    cross = 0
    readers: dict = {}
    for sites, blocks in zip(calm.anchor_sites, calm.cross_attns):
        for site, block in zip(sites, blocks):
            element = block.to_q.weight.element_size()
            dim_head = block.to_q.out_features // block.heads
            cross += tokens * cross_attention(block.to_context.out_features, block.to_context.in_features, block.heads, dim_head, element)
            cross += cross_attention_mask(seq_len, element)
            readers.setdefault(site.key, []).append(block)

    # blocks of several augments writing one anchor site read the same hidden state: uncast (the
    # composition in the anchor's dtype) autograd keeps it once, not once per block
    for blocks in readers.values():
        uncast = [block for block in blocks if block.to_q.weight.dtype == dtype]
        if len(uncast) > 1:
            cross -= (len(uncast) - 1) * tokens * uncast[0].norm.normalized_shape[0] * uncast[0].to_q.weight.element_size()

    head = tokens * shape.head() + shape.loss()
    one_block = tokens * shape.block()
    rotary = shape.rotary(seq_len) if with_gradient > 0 else 0

    if activation_checkpointing:
        kept = with_gradient * tokens * shape.hidden * shape.element + cross + head
        activations = kept + one_block + rotary
    else:
        kept = activations = with_gradient * one_block + rotary + cross + head

    # torchao's int8 Linear hands autograd a float copy of its weight, kept for the backward of
    # every block the gradient flows through (with checkpointing: of one block at a time) and of the head
    if anchor_quantization == 'int8':
        head_linear = anchor_model.get_output_embeddings()
        copied = units[first:first + 1] if activation_checkpointing else units[first:]
        blocks = [module for unit in copied for module in unit]
        copies = linear_numel(blocks) + head_linear.weight.numel()
        activations += copies * shape.element
        kept += (copies if not activation_checkpointing else head_linear.weight.numel()) * shape.element

    gathered = 0
    if shards > 1:
        # the largest unit (an anchor block) and the rest of the anchor (embeddings, head), gathered whole
        block_bytes = sum(param.numel() * param.element_size() for module in units[0] for param in module.parameters())
        rest = frozen_bytes(anchor_model) - len(units) * block_bytes
        gathered = block_bytes + rest

    return MemoryPlan(
        frozen = frozen,
        composition = composition,
        gradients = composition,
        optimizer = 2 * composition,
        activations = activations,
        temporaries = tokens * shape.logits(),
        gathered = gathered,
        kept = kept,
        anchor_params = sum(param.numel() for param in anchor_model.parameters()),
        augment_params = [sum(param.numel() for param in model.parameters()) for model in augment_models],
        composition_params = composition_params,
        connections = [list(pairs) for pairs in calm.connections],
        blocks_with_gradient = with_gradient,
        anchor_blocks = len(units),
        settings = dict(dtype = str(dtype).removeprefix('torch.'), batch = batch, seq_len = seq_len, processes = processes, fsdp = fsdp,
                        activation_checkpointing = activation_checkpointing, anchor_quantization = anchor_quantization,
                        augment_quantization = augment_quantization, attn_kwargs = attn_kwargs)
    )
