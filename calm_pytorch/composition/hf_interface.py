from __future__ import annotations

from typing import Any

from torch import Tensor

from calm_pytorch.composition.forward import check_anchor_inputs, composed_logits
from calm_pytorch.composition.inputs import check_causal_anchor, check_labels
from calm_pytorch.composition.loss import token_loss
from calm_pytorch.composition.protocol import Composition
from calm_pytorch.helpers import exists

# CALM called with Hugging Face's names (`input_ids`, `attention_mask`, `labels`) behaves as a
# transformers causal LM, so that `Trainer`, Accelerate loops and HF-style datasets work unchanged:
# the anchor reads all of `input_ids`, the labels are aligned with the tokens and shifted here,
# -100 marks an ignored label (whatever the attention mask says), and the output is a dict with
# `.loss` and `.logits`, as `Trainer.compute_loss` reads it (`outputs["loss"]` or `outputs[0]`).
# transformers itself is not needed on this path.

class CALMOutput(dict):
    """The output of CALM called with `input_ids`: `loss` (a scalar, present when `labels` were
    given) and `logits` (b, n, num_tokens). Like transformers' `ModelOutput`: a dict without the
    entries that are None, read by key, by attribute (`.loss` is None when absent) or by position
    (`output[0]` is the loss when there is one, else the logits)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

        # as ModelOutput: an absent value is not an entry, so positions skip it
        for key in [key for key, value in self.items() if value is None]:
            del self[key]

    @property
    def loss(self) -> Tensor | None:
        return self.get('loss')

    @property
    def logits(self) -> Tensor | None:
        return self.get('logits')

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]

        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        return tuple(self.values())

def hf_forward(
    calm: Composition,
    seq: Tensor | None,
    mask: Tensor | None,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    labels: Tensor | None,
    anchor_kwargs: dict[str, Any],
    **calm_kwargs
) -> CALMOutput:
    """CALM's forward called with `input_ids` (see the module comment). `calm_kwargs` are CALM's own
    keywords (`prompt`, `prompt_mask`); `anchor_kwargs` go to the anchor."""

    if exists(seq) or exists(mask):
        raise TypeError(
            'pass the tokens either as `seq` (with `mask`; CALM returns the loss) or as `input_ids` '
            '(with `attention_mask`; CALM returns an output with .loss and .logits, as a transformers model), not both'
        )

    # Trainer passes its token count when the forward takes **kwargs (see `token_loss`)
    num_items = anchor_kwargs.pop('num_items_in_batch', None)

    anchor_kwargs.pop('return_dict', None)  # always a dict

    if exists(labels):
        labels = check_labels(labels, input_ids, 'input_ids')
        check_causal_anchor(calm, 'its next-token loss')

    # the anchor reads all of input_ids: the labels are shifted below, not the tokens
    input_ids, attention_mask = check_anchor_inputs(calm, input_ids, attention_mask, min_len = 1, name = 'input_ids')
    logits = composed_logits(calm, input_ids, attention_mask, **calm_kwargs, **anchor_kwargs)

    loss = None

    if exists(labels):
        # position i predicts the token at i + 1
        loss = token_loss(logits[:, :-1], labels[:, 1:].to(logits.device), num_items)

    return CALMOutput(loss = loss, logits = logits)
