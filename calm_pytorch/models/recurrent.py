from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

from torch import Tensor
from torch.utils.hooks import RemovableHandle

from calm_pytorch.models.sites import Site, output_hidden

# segment-recurrent models (Om LLM's ARCformer, recurrent memory transformers) cut their input
# into segments and call every block once per segment with a short sequence of state tokens:
# block(x, state, offset) -> (output, new_state). The state after the last segment is a
# bounded-size summary of an input of any length.
#
# As an augment, such a model offers two contexts (AugmentParams.recurrent_context):
#   'all_segments' - the hidden states of every segment, concatenated in order along the sequence
#   'final_state'  - the state-token sequence the connected block returned after the last segment

RecurrentContext = Literal['all_segments', 'final_state']

RECURRENT_CONTEXTS = ('all_segments', 'final_state')

def output_state(output: Any) -> Tensor:
    """The state-token sequence of a block's output `(output, state, ...)`."""

    if isinstance(output, (tuple, list)) and len(output) > 1 and isinstance(output[1], Tensor) and output[1].ndim == 3:
        return output[1]

    got = type(output).__name__
    if isinstance(output, (tuple, list)):
        got = f'{got} of ({", ".join(type(element).__name__ for element in output)})'

    raise TypeError(f"recurrent_context='final_state' expects the connected block to return (output, state) with state a (batch, num_state_tokens, dim) tensor, got {got}")

class ReadOutputStateHook:
    # a callable object rather than a closure, so that deepcopy gives a hook of the copied recorder
    def __init__(self, fn: Callable[[Tensor, Tensor], None]):
        self.fn = fn

    def __call__(self, module, args, output):
        self.fn(output_hidden(output), output_state(output))

def register_state_hook(site: Site, fn: Callable[[Tensor, Tensor], None]) -> RemovableHandle:
    """Calls fn(hidden, state) each time the block of the site returns."""
    return site.module.register_forward_hook(ReadOutputStateHook(fn), prepend = True)

def state_widths(adapter, sites: Sequence[Site]) -> dict[tuple[int, str], int]:
    """One dummy forward: site key -> width of the state tokens its block returns."""

    widths = {}
    unique = {site.key: site for site in sites}

    def record(key, hidden, state):
        widths[key] = state.shape[-1]

    handles = [register_state_hook(site, lambda hidden, state, key = key: record(key, hidden, state)) for key, site in unique.items()]

    try:
        adapter.dry_run()
    finally:
        for handle in handles:
            handle.remove()

    return widths
