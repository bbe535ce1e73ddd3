from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from torch.nn import Module, ModuleList

if TYPE_CHECKING:
    from calm_pytorch.composition.capture import HiddenRecorder
    from calm_pytorch.composition.injection import AnchorInjector
    from calm_pytorch.models.adapter import ModelAdapter
    from calm_pytorch.models.sites import HiddenPosition, Site
    from calm_pytorch.text.tokenizers import AnchorText, AugmentText

# What the parts of the package below `CALM` (the contexts, the forward, generation, checkpoints,
# the summary) read of a composition. `CALM` builds these once, in its constructor; the functions
# that take a `Composition` never import `CALM` itself, so the doors between the rooms open one
# way only: CALM calls them, they never call back.

class Composition(Protocol):
    # the frozen models and how to call them (model_dirs: for the anchor, then each augment, the
    # absolute directory a transformers model was loaded from, or None)
    anchor: Module
    augments: ModuleList
    model_dirs: list[str | None]
    anchor_adapter: ModelAdapter
    augment_adapters: list[ModelAdapter]

    # the wiring, per augment: (augment_layer, anchor_layer) pairs (1-indexed), the recorded
    # augment layer keys (0-based layer, position), the anchor sites written and their layers' positions
    connections: tuple[tuple[tuple[int, int], ...], ...]
    augment_keys: list[list[tuple[int, HiddenPosition]]]
    anchor_sites: list[list[Site]]
    anchor_positions: tuple[HiddenPosition, ...]
    num_augment_layers: list[int]

    # the trained part, and the hooks that read the augments and write into the anchor
    cross_attns: ModuleList
    recorders: list[HiddenRecorder]
    injector: AnchorInjector
    trainable_anchor_params: list[str]

    # how each augment may be read: its final state (segment-recurrent), whether it is causal (None
    # until probed), why it cannot read the anchor's ids (None if it can), its tokenizer's reader
    reads_final_state: list[bool]
    anchor_is_causal: bool | None  # next-token training needs it; None until probed
    augment_is_causal: list[bool | None]
    vocab_mismatch: list[str | None]
    anchor_text: AnchorText | None
    augment_texts: list[AugmentText | None]

    pad_id: int
    hooks_removed: bool
    checkpointed_modules: Any
