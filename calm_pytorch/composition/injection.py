from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

from torch import Tensor

from calm_pytorch.composition.capture import LayerKey
from calm_pytorch.composition.cross_attention import ContextMemory, CrossAttentionBlock
from calm_pytorch.helpers import PerThread, exists
from calm_pytorch.models.sites import Site, register_write_hook

@dataclass
class AugmentContext:
    """What one augment contributes to a composed forward."""
    hiddens: dict[LayerKey, Tensor]  # recorded hidden states, (b, j, dim_augment)
    mask: Tensor | None               # (b, j), True for real positions
    causal: bool                      # aligned mode: anchor position i sees augment positions <= i
    memory: dict[CrossAttentionBlock, ContextMemory] | None = None  # what decoding keeps of the context, per block
    visible: Tensor | None = None     # (b, n, j): which keys each of the forward's n positions sees (aligned across tokenizers)

@dataclass
class Connection:
    augment_index: int
    augment_key: LayerKey
    cross_attn: CrossAttentionBlock

class InjectionState(PerThread):
    """What one composed call of this thread hands its anchor hooks."""

    def __init__(self):
        self.contexts: list[AugmentContext] | None = None
        self.query_len: int | None = None
        self.positions_seen: dict[tuple[int, str], int] = {}  # per site, within one composed forward

class AnchorInjector:
    """One write hook per anchor site. Inside `composed(contexts)` it adds to the hidden state the
    sum of its cross-attention deltas, all computed from the same hidden state; outside it does
    nothing. The contexts are the calling thread's: a call in another thread sees its own, or none."""

    def __init__(self, connections_at: list[tuple[Site, Connection]]):
        self.call = InjectionState()  # the calling thread's

        sites, connections = {}, defaultdict(list)

        for site, connection in connections_at:
            sites[site.key] = site
            connections[site.key].append(connection)

        self.handles = [
            register_write_hook(site, partial(self.inject, key, tuple(connections[key])))
            for key, site in sites.items()
        ]

    def inject(self, site_key: tuple[int, str], connections: tuple[Connection, ...], hidden: Tensor) -> Tensor | None:
        call = self.call

        if not exists(call.contexts):
            return None  # the anchor called on its own is left untouched

        # where this call's queries sit, for the causal mask of aligned mode. A segment-recurrent
        # anchor calls each block once per segment, so a call may cover positions [s, e) of the
        # forward's `query_len`; the forward's queries end where the context ends (for a
        # one-call forward this is the offset j - i)

        num_queries = hidden.shape[-2]

        if exists(call.query_len):
            seen = call.positions_seen.get(site_key, 0)
            call.positions_seen[site_key] = seen + num_queries
            total = max(seen + num_queries, call.query_len)
        else:
            # no count kept: under torch.compile an integer that changes per call recompiles per call
            seen, total = 0, num_queries

        delta = 0.

        for connection in connections:
            context = call.contexts[connection.augment_index]
            memory = context.memory.get(connection.cross_attn) if exists(context.memory) else None
            context_hiddens = None if exists(memory) else context.hiddens[connection.augment_key]
            context_len = memory.length if exists(memory) else context_hiddens.shape[-2]
            delta = delta + connection.cross_attn(
                hidden,
                context_hiddens,
                memory = memory,
                mask = context.mask,
                causal = context.causal,
                query_offset = seen + context_len - total,
                visible = query_rows(context.visible, seen, num_queries, total)
            )

        return hidden + delta

    @contextmanager
    def composed(self, contexts: list[AugmentContext], query_len: int | None = None):
        """query_len: how many positions the anchor reads in this forward (a segment-recurrent
        anchor reads them over several calls of each block); None: each call's queries are the
        last positions of the context."""

        call = self.call
        call.contexts, call.query_len, call.positions_seen = contexts, query_len, {}
        try:
            yield
        finally:
            call.contexts, call.query_len, call.positions_seen = None, None, {}

    def remove(self):
        for handle in self.handles:
            handle.remove()

        self.handles.clear()

def query_rows(visible: Tensor | None, seen: int, num_queries: int, total: int) -> Tensor | None:
    # this call's queries are positions [seen, seen + num_queries) of the forward's `total`,
    # which are the last of the rows of `visible`
    if not exists(visible):
        return None

    start = seen + visible.shape[-2] - total
    return visible[:, start:start + num_queries]
