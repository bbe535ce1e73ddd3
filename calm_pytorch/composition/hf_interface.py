from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from calm_pytorch.composition.forward import check_anchor_inputs, composed_logits
from calm_pytorch.composition.inputs import check_causal_anchor, check_labels
from calm_pytorch.composition.loss import token_loss
from calm_pytorch.composition.protocol import Composition
from calm_pytorch.helpers import exists
from calm_pytorch.models.precision import floating_dtype, model_device

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

# a pytree node, as transformers registers its ModelOutputs: torch.export (and anything else that
# flattens outputs) sees the tensors inside it and rebuilds the same dict around the results.
# The keys present (None entries are dropped) are the node's context

def flatten_output(output: CALMOutput) -> tuple[list[Tensor], list[str]]:
    return list(output.values()), list(output.keys())

def unflatten_output(values, keys: list[str]) -> CALMOutput:
    return CALMOutput(zip(keys, values))

def flatten_output_with_keys(output: CALMOutput):
    return [(pytree.MappingKey(key), value) for key, value in output.items()], list(output.keys())

pytree.register_pytree_node(
    CALMOutput,
    flatten_output,
    unflatten_output,
    serialized_type_name = f'{CALMOutput.__module__}.{CALMOutput.__name__}',
    flatten_with_keys_fn = flatten_output_with_keys
)

def config_module():
    try:
        import calm_pytorch.composition.hf_config as hf_config
    except ImportError as error:
        # an AttributeError: a tool's getattr(model, 'config', None) reads "no config", as for any model without one
        raise AttributeError(f'`calm.config` is a transformers config: install transformers (pip install -e ".[hf]"); {error}') from error

    return hf_config

class CausalLMAttributes:
    """Mixin giving CALM the attributes that tools taking a transformers causal LM read of the
    model before they call it (Trainer, TRL, lm_eval, model cards): `.device` and `.dtype` (the
    anchor's, where `input_ids` go and what precision the logits come in), `.config` (a
    `CALMConfig`, composition/hf_config.py; needs transformers), `.name_or_path` and
    `main_input_name`."""

    main_input_name = 'input_ids'

    @property
    def device(self) -> torch.device:
        device = model_device(self.anchor)
        return device if exists(device) else model_device(self.cross_attns)

    @property
    def dtype(self) -> torch.dtype:
        dtype = floating_dtype(self.anchor)
        return dtype if exists(dtype) else floating_dtype(self.cross_attns)

    @property
    def config(self):
        # built once, at the first read: tools set fields on it (Trainer sets `use_cache`) and
        # expect them to stay; kept out of the module's state (a plain attribute, not a buffer)
        if '_calm_config' not in self.__dict__:
            self.__dict__['_calm_config'] = config_module().composition_config(self)

        return self.__dict__['_calm_config']

    def __getattr__(self, name: str):
        # a property raising AttributeError sends Python here, and torch's Module.__getattr__
        # would answer with its generic message: say why `config` is missing
        if name in ('config', 'name_or_path'):
            config_module()

        return super().__getattr__(name)

    @property
    def name_or_path(self) -> str:
        return self.config.name_or_path

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
        labels = check_labels(labels, input_ids, 'input_ids', calm.anchor_adapter.vocab_size)
        check_causal_anchor(calm, 'its next-token loss')

    # the anchor reads all of input_ids: the labels are shifted below, not the tokens
    input_ids, attention_mask = check_anchor_inputs(calm, input_ids, attention_mask, min_len = 1, name = 'input_ids')
    logits = composed_logits(calm, input_ids, attention_mask, **calm_kwargs, **anchor_kwargs)

    loss = None

    if exists(labels):
        # position i predicts the token at i + 1
        loss = token_loss(logits[:, :-1], labels[:, 1:].to(logits.device), num_items)

    return CALMOutput(loss = loss, logits = logits)
