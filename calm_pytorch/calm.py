"""CALM, the entrance: a composition built over frozen models, and its forward. Generation, composition
checkpoints and activation checkpointing are its mixins, each living in its own room.

May import: calm_pytorch.helpers, calm_pytorch.models, calm_pytorch.text, calm_pytorch.composition, calm_pytorch.generation, calm_pytorch.checkpoints
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module, ModuleList

from calm_pytorch.checkpoints.mixin import CompositionCheckpoints
from calm_pytorch.composition.activation_checkpointing import GradientCheckpointing, disable_checkpointing
from calm_pytorch.composition.build import CompositionDtype, augment_list, derive_wiring, resolve_composition_dtype, vocab_mismatch
from calm_pytorch.composition.capture import HiddenRecorder
from calm_pytorch.composition.contexts import augment_contexts
from calm_pytorch.composition.cross_attention import CompositionInit, CrossAttentionBlock, check_attn_kwargs
from calm_pytorch.composition.forward import check_anchor_inputs, composed_logits
from calm_pytorch.composition.freezing import freeze_models
from calm_pytorch.composition.hf_interface import CALMOutput, CausalLMAttributes, hf_forward
from calm_pytorch.composition.injection import AnchorInjector, AugmentContext, Connection
from calm_pytorch.composition.inputs import check_causal_anchor, check_labels, check_usable, explain_arguments
from calm_pytorch.composition.loss import mean_token_loss, shift_for_next_token, shift_labels
from calm_pytorch.composition.params import AugmentParams
from calm_pytorch.composition.summary import summarize
from calm_pytorch.generation.mixin import GenerationMixin
from calm_pytorch.helpers import exists, typecheck
from calm_pytorch.models.factory import make_adapter, peft_base_model
from calm_pytorch.models.hf_discovery import loaded_from_dir
from calm_pytorch.models.precision import model_device, on_meta
from calm_pytorch.models.sites import HiddenPosition
from calm_pytorch.text.tokenizers import text_readers

# data flows one way:
# augment inputs -> recorded hidden states -> projected keys / values -> anchor hooks -> logits -> loss

class CALM(GenerationMixin, CompositionCheckpoints, GradientCheckpointing, CompositionInit, CausalLMAttributes, Module):
    """Composes a frozen anchor LLM with frozen augmenting models (Bansal et al. 2024).

    Only the cross-attention blocks (with their projections) are trained. The anchor and the
    augments stay registered submodules, so `.to()`, `state_dict()` and `parameters()` keep their
    usual meaning; their parameters have `requires_grad = False` and never get a gradient, except
    anchor parameters the user left trainable in a partly frozen anchor (LoRA weights of a PEFT
    model): those are trained and saved with the composition (composition/freezing.py).

    anchor_llm:                the frozen anchor: x-transformers, Hugging Face, or any module
    augment_llms:              one augment or a list: `AugmentParams` (wiring options) or a bare model
    attn_kwargs:               `heads` and `dim_head` of every cross-attention
    anchor_transformer_blocks: the anchor's blocks (modules, names or glob patterns), found
                               automatically for x-transformers and Hugging Face models
    anchor_extract_blocks_fn:  or a function anchor -> blocks
    anchor_hidden_position:    'output' adds each delta to a block's output, 'input' to its input
                               (one value, or one per anchor layer)
    pad_id:                    labels equal to it are ignored by the loss
    frozen_in_eval_mode:       keep the frozen models in eval mode (no dropout) under `.train()`
    augment_llm, dim_anchor, dim_augment: the seed API's names; given dims are checked
    anchor_logits_fn:          picks the logits from the anchor's output, when they are not a
                               tensor, `.logits`, or the first element of a tuple
    composition_dtype:         dtype of the composition weights, or 'anchor' for the anchor's
    anchor_tokenizer:          the anchor's tokenizer, for augments with a `tokenizer` of their own
                               (aligned mode across tokenizers, docs/tokenizers.md)"""

    @explain_arguments
    @typecheck
    def __init__(
        self,
        anchor_llm: Module,
        augment_llms: AugmentParams | Module | Sequence[AugmentParams | Module] | None = None,
        *,
        attn_kwargs: dict = dict(heads = 8, dim_head = 64),
        anchor_extract_blocks_fn = None,
        anchor_transformer_blocks: str | Sequence[Module | str] | ModuleList | None = None,
        anchor_hidden_position: HiddenPosition | tuple[HiddenPosition, ...] = 'output',
        pad_id: int = -1,
        frozen_in_eval_mode: bool = True,
        augment_llm: AugmentParams | Module | Sequence[AugmentParams | Module] | None = None,
        dim_anchor: int | None = None,
        dim_augment: int | Sequence[int] | None = None,
        anchor_logits_fn: Callable[[Any], Tensor] | None = None,
        composition_dtype: CompositionDtype = torch.float32,
        anchor_tokenizer: Any = None
    ):
        super().__init__()

        augments = augment_list(augment_llms, augment_llm)

        self.pad_id = pad_id
        self.frozen_in_eval_mode = frozen_in_eval_mode
        self.anchor = anchor_llm
        self.augments = ModuleList([augment.model for augment in augments])
        self.anchor_text, self.augment_texts = text_readers(anchor_tokenizer, [augment.tokenizer for augment in augments])

        # where transformers models were loaded from, while a relative path still means the same
        # directory: a composition saved later, from elsewhere, names it (calm.config)
        self.model_dirs = [loaded_from_dir(peft_base_model(model)) for model in (anchor_llm, *self.augments)]

        # adapters: where each model's layers are, in execution order, and how to call it

        self.anchor_adapter = make_adapter(
            anchor_llm,
            name = 'anchor_llm',
            role = 'anchor',
            blocks = anchor_transformer_blocks,
            extract_blocks_fn = anchor_extract_blocks_fn,
            logits_fn = anchor_logits_fn
        )

        self.augment_adapters = [
            make_adapter(
                augment.model,
                name = f'augment_llms[{index}]',
                blocks = augment.transformer_blocks,
                extract_blocks_fn = augment.extract_blocks_fn,
                mask_kwarg = augment.mask_kwarg,
                input_shape = augment.input_shape,
                returns_hiddens = augment.model_return_hiddens
            )
            for index, augment in enumerate(augments)
        ]

        # a bidirectional anchor cannot be trained or generate with next tokens (composition/inputs.py)
        self.anchor_is_causal = None if on_meta(anchor_llm) else self.anchor_adapter.logits_are_causal(strict = False)

        # wiring: which augment layer feeds which anchor layer (1-indexed pairs), at which sites and widths

        wiring = derive_wiring(self.anchor_adapter, augments, self.augment_adapters, anchor_hidden_position, dim_anchor, dim_augment)

        self.connections = wiring.connections
        self.num_augment_layers = wiring.num_augment_layers
        self.anchor_positions = wiring.anchor_positions  # per anchor layer, saved with the wiring
        self.anchor_sites = wiring.anchor_sites
        self.augment_keys = wiring.augment_keys
        self.reads_final_state = wiring.reads_final_state

        # the trainable part: one cross-attention per connection, on the anchor's device, in float32
        # unless asked otherwise (`composition_dtype = 'anchor'` follows the anchor's dtype)

        attn_kwargs = check_attn_kwargs(attn_kwargs)

        self.cross_attns = ModuleList([
            ModuleList([CrossAttentionBlock(dim, dim_context, **attn_kwargs) for dim, dim_context in widths])
            for widths in wiring.widths
        ])

        self.cross_attns.to(device = model_device(anchor_llm), dtype = resolve_composition_dtype(composition_dtype, anchor_llm))

        # freeze the models, remembering their state so that removing the hooks restores them: the
        # train / eval mode of every submodule, and the flags by name, not by parameter object (a
        # record of the objects would keep whole weights alive after FSDP sharding or quantization
        # replaced them)

        self._frozen_state = [
            (module, {name: sub.training for name, sub in module.named_modules()}, {name: param.requires_grad for name, param in module.named_parameters()})
            for module in (anchor_llm, *self.augments)
        ]
        self.recorders, self.injector = [], None

        try:
            self._hook_models(augments)
        except BaseException:
            # nothing to call remove_hooks() on: the models must not stay frozen and hooked
            self._restore_models()
            raise

        self.hooks_removed = False

        self.train(self.training)

    def _hook_models(self, augments: list[AugmentParams]):
        # anchor parameters the user left trainable (e.g. LoRA weights) stay trainable, and are saved with the composition
        self.trainable_anchor_params = freeze_models(self.anchor, self.augments)

        # hooks: recorders on the connected augment sites, one injector over the anchor sites

        self.recorders = [
            HiddenRecorder(adapter, keys, final_state = final_state)
            for adapter, keys, final_state in zip(self.augment_adapters, self.augment_keys, self.reads_final_state)
        ]

        self.injector = AnchorInjector([
            (site, Connection(index, key, cross_attn))
            for index in range(len(augments))
            for site, key, cross_attn in zip(self.anchor_sites[index], self.augment_keys[index], self.cross_attns[index])
        ])

        # augments that read tokens are probed for causality here rather than on the first aligned
        # call: the probe registers hooks, and inside a torch.compile'd forward that is a graph break.
        # A model on `meta` has no values to compare yet: probed at its first aligned call
        self.augment_is_causal: list[bool | None] = [
            None if exists(adapter.input_shape) or on_meta(adapter.model) else adapter.is_causal([] if adapter.returns_hiddens else [adapter.layers[layer].site(position) for layer, position in keys])
            for adapter, keys in zip(self.augment_adapters, self.augment_keys)
        ]
        self.vocab_mismatch = [vocab_mismatch(self.anchor_adapter, adapter, index, augment.same_tokenizer or exists(augment.tokenizer)) for index, (augment, adapter) in enumerate(zip(augments, self.augment_adapters))]

    # modes

    def train(self, mode: bool = True):
        super().train(mode)

        # frozen models run without dropout unless asked otherwise
        if self.frozen_in_eval_mode:
            self.anchor.eval()
            self.augments.eval()

        return self

    def remove_hooks(self):
        """Takes every hook away and restores the models' `requires_grad` flags and train / eval
        modes: the anchor and the augments are again exactly the models they were. This CALM can
        no longer be called."""

        disable_checkpointing(self)
        self._restore_models()
        self.hooks_removed = True

    def _restore_models(self):
        for hooks in (*self.recorders, self.injector):
            if exists(hooks):
                hooks.remove()

        for module, modes, flags in self._frozen_state:
            if isinstance(modes, bool):
                module.train(modes)  # pickled by 0.1.0, which kept the model's own mode only
            else:
                for name, sub in module.named_modules():
                    sub.training = modes.get(name, sub.training)
            for name, param in module.named_parameters():
                if name in flags:
                    param.requires_grad_(flags[name])

    def summary(self) -> str:
        """Which augment layer feeds which anchor layer (by number and module name), and the
        trainable versus frozen parameter counts."""

        return summarize(self)

    # forward

    # Hugging Face's Trainer: the token count it passes is over `labels[..., 1:]` for this loss type
    loss_type = 'ForCausalLM'

    @typecheck
    def forward(
        self,
        seq: Tensor | None = None,
        *,
        prompt: Tensor | Sequence[Tensor | None] | None = None,
        prompt_mask: Tensor | Sequence[Tensor | None] | None = None,
        mask: Tensor | None = None,
        labels: Tensor | None = None,
        return_loss: bool = True,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **anchor_kwargs
    ) -> Tensor | CALMOutput:
        """seq:         (b, n) token ids for the anchor
        prompt:      None for aligned mode (each augment reads `seq`), or a context for every
                     augment: one tensor, or one per augment (None there means aligned)
        prompt_mask: (b, m) True for real context positions, one or one per augment
        mask:        (b, n) True for real tokens of `seq`; the loss ignores masked labels, and labels predicted
                     from a masked position (the first token of a left-padded row)
        labels:      (b, n) the loss's targets, as in Hugging Face: aligned with `seq` (shifted
                     here), -100 where no loss is wanted; given them, only they choose the
                     predicted tokens (`mask` and `pad_id` no longer do): an answer-only loss is
                     `labels = seq.masked_fill(~answer_mask, -100)`
        return_loss: the next-token cross-entropy, else the logits (b, n, num_tokens)
        input_ids, attention_mask: Hugging Face's names for `seq` and `mask`. Called with
                     `input_ids`, CALM is a transformers causal LM (for `Trainer`): the anchor
                     reads all of `input_ids`, and it returns a `CALMOutput` with `.logits` and
                     `.loss` (None without `labels`); see calm_pytorch/composition/hf_interface.py.
                     Beside `seq`, `attention_mask` goes to the anchor as one of its keywords"""

        check_usable(self)

        if exists(input_ids):
            return hf_forward(self, seq, mask, input_ids, attention_mask, labels, anchor_kwargs, prompt = prompt, prompt_mask = prompt_mask)

        # beside `seq`, an attention mask is the anchor's own keyword, as it always was
        if exists(attention_mask):
            anchor_kwargs['attention_mask'] = attention_mask

        if not exists(seq):
            raise TypeError('CALM needs the anchor\'s tokens: `calm(seq)`, or `calm(input_ids = ...)` as a transformers model')

        seq, mask = check_anchor_inputs(self, seq, mask, min_len = 2 if return_loss else 1)

        if exists(labels):
            labels = check_labels(labels, seq, 'seq', self.anchor_adapter.vocab_size)

        if return_loss:
            check_causal_anchor(self, 'its next-token loss')
            seq, mask, labels = shift_labels(seq, mask, labels) if exists(labels) else shift_for_next_token(seq, mask, self.pad_id)
        elif exists(labels):
            raise ValueError('`labels` were given with return_loss = False, which returns the logits only; leave the labels out or ask for the loss')

        logits = composed_logits(self, seq, mask, prompt, prompt_mask, **anchor_kwargs)
        return mean_token_loss(logits, labels) if return_loss else logits

    def augment_contexts(self, seq: Tensor, mask: Tensor | None, prompt, prompt_mask) -> list[AugmentContext]:
        """Runs every augment (frozen, without gradients) and returns what the anchor attends to."""
        return augment_contexts(self, seq, mask, prompt, prompt_mask)
