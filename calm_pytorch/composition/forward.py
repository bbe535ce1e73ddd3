from __future__ import annotations

from torch import Tensor

from calm_pytorch.composition.contexts import augment_contexts
from calm_pytorch.composition.inputs import check_mask, check_tokens
from calm_pytorch.composition.protocol import Composition
from calm_pytorch.helpers import exists

# one composed forward, the one data path every entrance shares (`calm(seq)`, `calm(input_ids=...)`):
# augment inputs -> recorded hidden states -> projected keys / values -> anchor hooks -> logits

def check_anchor_inputs(calm: Composition, seq: Tensor, mask: Tensor | None, min_len: int, name: str = 'seq') -> tuple[Tensor, Tensor | None]:
    """Checks the anchor's tokens (dtype, shape, ids in its vocabulary) and their mask; returns the
    tokens as torch.long and the mask as bool."""

    seq = check_tokens(seq, name, min_len = min_len)
    calm.anchor_adapter.check_token_ids(seq, name)
    return seq, (check_mask(mask, seq, 'mask', name) if exists(mask) else None)

def composed_logits(calm: Composition, seq: Tensor, mask: Tensor | None, prompt, prompt_mask, **anchor_kwargs) -> Tensor:
    """The anchor's logits (b, n, num_tokens) over `seq`, its cross-attentions reading every augment
    (run on `prompt`, or on `seq` in aligned mode). `anchor_kwargs` go to the anchor."""

    calm.anchor_adapter.check_length(seq, 'seq')
    contexts = augment_contexts(calm, seq, mask, prompt, prompt_mask)

    # a segment-recurrent anchor reads seq over several calls of each block; the injector
    # counts them to put each segment's queries at their positions
    with calm.injector.composed(contexts, query_len = seq.shape[-1]):
        return calm.anchor_adapter.logits(calm.anchor_adapter(seq, mask, **anchor_kwargs))
