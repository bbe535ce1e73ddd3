from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Sequence
from typing import Any, Literal

from torch.nn import Module, ModuleList

from calm_pytorch.models.sites import HiddenPosition

@dataclass
class AugmentParams:
    """How one frozen augmenting model is wired into the composition. CALM never mutates it.

    model:                   the frozen augmenting model
    hidden_position:         read each block's 'input' or 'output' (one value, or one per block)
    transformer_blocks:      the model's blocks, in any order, as modules or module names / glob patterns
                             ("model.layers.*"); found automatically for x-transformers and transformers models
    extract_blocks_fn:       or a function model -> blocks
    model_return_hiddens:    the model's forward already returns a list of per-layer hidden states
    input_shape:             shape of one non-token input (e.g. (3, 224, 224) for images), without batch
    connections:             ((augment_layer, anchor_layer), ...), 1-indexed; derived when None
    connect_every_num_layers: the automatic wiring takes every n-th augment layer; None is the paper's
                             4, or the last layer of an augment shallower than 4. A given n larger
                             than the augment's depth is refused (it would connect no n-th layer)
    mask_kwarg:              name of the forward argument that takes the padding mask
                             (found from the forward signature when None: 'mask' or 'attention_mask')
    recurrent_context:       for a segment-recurrent model (blocks called once per segment, returning
                             (output, state)): 'all_segments' attends to the hidden states of every
                             segment, concatenated in order; 'final_state' to the state-token sequence
                             the connected block returned after the last segment, a bounded-size
                             summary of an input of any length (context mode only)
    same_tokenizer:          aligned mode reads the anchor's token ids, so it refuses an augment whose
                             vocabulary size differs from the anchor's; True declares that both share
                             one tokenizer and only their embedding tables differ in size (padding)
    tokenizer:               the augment's own tokenizer, when it differs from the anchor's: in aligned
                             mode it reads the anchor's text tokenized its own way (give the anchor's
                             as `CALM(..., anchor_tokenizer=...)`; see docs/tokenizers.md)
    """

    model: Module
    hidden_position: HiddenPosition | tuple[HiddenPosition, ...] = 'output'
    transformer_blocks: str | Sequence[Module | str] | ModuleList | None = None
    extract_blocks_fn: Callable[[Module], Sequence[Module]] | None = None
    model_return_hiddens: bool = False
    input_shape: tuple[int, ...] | None = None
    connections: tuple[tuple[int, int], ...] | None = None
    connect_every_num_layers: int | None = None
    mask_kwarg: str | None = None
    recurrent_context: Literal['all_segments', 'final_state'] = 'all_segments'
    same_tokenizer: bool = False
    tokenizer: Any = None
