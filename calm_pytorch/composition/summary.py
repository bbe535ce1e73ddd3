from __future__ import annotations

from torch.nn import Module

from calm_pytorch.composition.protocol import Composition
from calm_pytorch.models.adapter import ModelAdapter

# a readable account of a composition: the models, which augment layer feeds which anchor layer
# (by number and by module name), and what is trained versus frozen

def count(module: Module) -> int:
    return sum(param.numel() for param in module.parameters())

def site_name(adapter: ModelAdapter, layer: int, position: str) -> str:
    if adapter.returns_hiddens:
        return f'returned hidden state {layer + 1}'

    module = adapter.layers[layer].site(position).module
    names = {id(submodule): name for name, submodule in adapter.model.named_modules()}
    return f'{names.get(id(module)) or type(module).__name__} {position}'

def summarize(calm: Composition) -> str:
    anchor = calm.anchor_adapter
    anchor_trainable = sum(param.numel() for param in calm.anchor.parameters() if param.requires_grad)
    state = f'{anchor_trainable:,} of them trainable, left so by you' if anchor_trainable > 0 else 'frozen'
    lines = [f'anchor: {type(calm.anchor).__name__}, {len(anchor.layers)} layers, {count(calm.anchor):,} parameters ({state})']

    for index, (adapter, connections, keys, cross_attns) in enumerate(zip(calm.augment_adapters, calm.connections, calm.augment_keys, calm.cross_attns)):
        lines.append(f'augment {index}: {type(adapter.model).__name__}, {calm.num_augment_layers[index]} layers, {count(adapter.model):,} parameters (frozen)')

        for (augment_layer, anchor_layer), (layer, position), anchor_site, cross_attn in zip(connections, keys, calm.anchor_sites[index], cross_attns):
            anchor_name = site_name(anchor, anchor_layer - 1, anchor_site.position)
            width_in, width_out = cross_attn.to_context.in_features, cross_attn.to_context.out_features
            lines.append(
                f'  augment layer {augment_layer:>3} ({site_name(adapter, layer, position)}, width {width_in}) -> '
                f'anchor layer {anchor_layer:>3} ({anchor_name}, width {width_out}): {cross_attn.heads} heads, {count(cross_attn):,} parameters'
            )

    trainable = sum(param.numel() for param in calm.parameters() if param.requires_grad)
    frozen = sum(param.numel() for param in calm.parameters() if not param.requires_grad)
    share = trainable / max(trainable + frozen, 1)

    where = f'{sum(len(blocks) for blocks in calm.cross_attns)} cross-attention blocks' + (' and the anchor' if anchor_trainable > 0 else '')
    lines.append(f'trainable: {trainable:,} parameters ({share:.2%}) in {where}; frozen: {frozen:,}')
    return '\n'.join(lines)
