from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass

from torch import Tensor

from calm_pytorch.capture import LayerKey
from calm_pytorch.cross_attention import CrossAttentionBlock
from calm_pytorch.helpers import exists
from calm_pytorch.sites import Site, register_write_hook

@dataclass
class AugmentContext:
    """What one augment contributes to a composed forward."""
    hiddens: dict[LayerKey, Tensor]  # recorded hidden states, (b, j, dim_augment)
    mask: Tensor | None               # (b, j), True for real positions
    causal: bool                      # aligned mode: anchor position i sees augment positions <= i
    kv: dict[CrossAttentionBlock, tuple[Tensor, Tensor]] | None = None  # keys and values already projected, per block (generation)

@dataclass
class Connection:
    augment_index: int
    augment_key: LayerKey
    cross_attn: CrossAttentionBlock

class AnchorInjector:
    """One write hook per anchor site. Inside `composed(contexts)` it adds to the hidden state the
    sum of its cross-attention deltas, all computed from the same hidden state; outside it does nothing."""

    def __init__(self, connections_at: list[tuple[Site, Connection]]):
        self.contexts: list[AugmentContext] | None = None

        sites, connections = {}, defaultdict(list)

        for site, connection in connections_at:
            sites[site.key] = site
            connections[site.key].append(connection)

        self.handles = [
            register_write_hook(site, partial(self.inject, tuple(connections[key])))
            for key, site in sites.items()
        ]

    def inject(self, connections: tuple[Connection, ...], hidden: Tensor) -> Tensor | None:
        if not exists(self.contexts):
            return None  # the anchor called on its own is left untouched

        delta = 0.

        for connection in connections:
            context = self.contexts[connection.augment_index]
            kv = context.kv.get(connection.cross_attn) if exists(context.kv) else None
            delta = delta + connection.cross_attn(
                hidden,
                None if exists(kv) else context.hiddens[connection.augment_key],
                kv = kv,
                mask = context.mask,
                causal = context.causal
            )

        return hidden + delta

    @contextmanager
    def composed(self, contexts: list[AugmentContext]):
        self.contexts = contexts
        try:
            yield
        finally:
            self.contexts = None

    def remove(self):
        for handle in self.handles:
            handle.remove()

        self.handles.clear()
