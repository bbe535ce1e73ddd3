from __future__ import annotations

from itertools import chain

from torch.nn import Module

from calm_pytorch.cross_attention import CrossAttentionBlock

# compositions over models built on the `meta` device (no memory, no values), the big-model
# workflow: build on meta, `calm.to_empty(device = ...)`, load the frozen models' weights, then
# load a composition checkpoint or re-initialise the composition.
#
# The constructor's probes only need shapes and run on meta tensors; the causality probe compares
# values, so on meta it waits for the first aligned call (when the weights are real)

def on_meta(module: Module) -> bool:
    return any(tensor.is_meta for tensor in chain(module.parameters(), module.buffers()))

class CompositionInit:
    """Mixin: re-initialising the composition weights, as a fresh CALM has them."""

    def init_composition_weights(self):
        """Draws the composition weights anew as at construction, output projections at zero: the
        composition again returns exactly the anchor's logits. For a CALM built over `meta`
        models, after `to_empty`, when no composition checkpoint is loaded."""

        for module in self.cross_attns.modules():
            if isinstance(module, CrossAttentionBlock):
                module.reset_parameters()
