from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module, ModuleList

from calm_pytorch.adapters import ModelAdapter, make_adapter, vocab_mismatch
from calm_pytorch.capture import HiddenRecorder
from calm_pytorch.checkpointing import GradientCheckpointing, disable_checkpointing
from calm_pytorch.meta import CompositionInit, on_meta
from calm_pytorch.composed import composed_anchor
from calm_pytorch.cross_attention import CrossAttentionBlock, check_attn_kwargs
from calm_pytorch.generation import check_left_padded, check_sampling, left_pad
from calm_pytorch.generation import generate as generate_tokens
from calm_pytorch.helpers import cast_tuple, default, exists, typecheck
from calm_pytorch.hf_forward import CALMOutput, check_labels, hf_forward
from calm_pytorch.injection import AnchorInjector, AugmentContext, Connection
from calm_pytorch.loss import mean_token_loss, shift_for_next_token, shift_labels
from calm_pytorch.params import AugmentParams, HiddenPosition
from calm_pytorch.precision import CompositionDtype, clean_context, model_device, resolve_composition_dtype, to_model
from calm_pytorch.recurrent import RECURRENT_CONTEXTS, state_widths
from calm_pytorch.summary import summarize
from calm_pytorch.tokenizer_alignment import text_aligned_context, text_readers
from calm_pytorch.trainable import freeze_models
from calm_pytorch.wiring import default_connections, validate_connections

# data flows one way:
# augment inputs -> recorded hidden states -> projected keys / values -> anchor hooks -> logits -> loss

class CALM(GradientCheckpointing, CompositionInit, Module):
    """Composes a frozen anchor LLM with frozen augmenting models (Bansal et al. 2024).

    Only the cross-attention blocks (with their projections) are trained. The anchor and the
    augments stay registered submodules, so `.to()`, `state_dict()` and `parameters()` keep their
    usual meaning; their parameters have `requires_grad = False` and never get a gradient, except
    anchor parameters the user left trainable in a partly frozen anchor (LoRA weights of a PEFT
    model): those are trained and saved with the composition (calm_pytorch/trainable.py).

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

        # the seed API names a single `augment_llm`

        if exists(augment_llm) and exists(augment_llms):
            raise TypeError('pass the augmenting models as `augment_llms` or `augment_llm`, not both')

        augment_llms = default(augment_llms, augment_llm)

        if not exists(augment_llms):
            raise TypeError('CALM needs at least one augmenting model: `augment_llms=AugmentParams(model=...)`')

        augments = [augment_llms] if isinstance(augment_llms, (AugmentParams, Module)) else list(augment_llms)

        if len(augments) == 0:
            raise ValueError('`augment_llms` is empty; pass at least one augmenting model')

        augments = [augment if isinstance(augment, AugmentParams) else AugmentParams(model = augment) for augment in augments]

        self.pad_id = pad_id
        self.frozen_in_eval_mode = frozen_in_eval_mode
        self.anchor = anchor_llm
        self.augments = ModuleList([augment.model for augment in augments])
        self.anchor_text, self.augment_texts = text_readers(anchor_tokenizer, [augment.tokenizer for augment in augments])

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

        num_anchor_layers = len(self.anchor_adapter.layers)
        anchor_positions = positions_per_layer(anchor_hidden_position, num_anchor_layers, 'anchor_hidden_position')
        self.num_augment_layers = [count_layers(adapter) for adapter in self.augment_adapters]

        # wiring: (augment_layer, anchor_layer) pairs per augment, 1-indexed

        self.connections = tuple(
            validate_connections(augment.connections, num_layers, num_anchor_layers, index) if exists(augment.connections)
            else default_connections(num_layers, num_anchor_layers, augment.connect_every_num_layers)
            for index, (augment, num_layers) in enumerate(zip(augments, self.num_augment_layers))
        )

        # widths come from one dummy forward through each model, at the sites actually used

        anchor_sites = [
            [self.anchor_adapter.layers[anchor_layer - 1].site(anchor_positions[anchor_layer - 1]) for _, anchor_layer in connections]
            for connections in self.connections
        ]

        anchor_dims = self.anchor_adapter.probe([site for sites in anchor_sites for site in sites]).dims
        dims_anchor = {anchor_dims[site.key] for sites in anchor_sites for site in sites}

        if exists(dim_anchor) and dims_anchor != {dim_anchor}:
            raise ValueError(f'dim_anchor={dim_anchor} does not match the anchor, whose hidden width is {sorted(dims_anchor)}; leave dim_anchor out to derive it')

        augment_keys = []

        for index, (augment, adapter, connections) in enumerate(zip(augments, self.augment_adapters, self.connections)):
            positions = positions_per_layer(augment.hidden_position, self.num_augment_layers[index], f'augment_llms[{index}].hidden_position')
            augment_keys.append([(augment_layer - 1, positions[augment_layer - 1]) for augment_layer, _ in connections])

        # a segment-recurrent augment may offer its final state tokens instead of its hidden states
        self.reads_final_state = [check_recurrent_context(augment, adapter, keys, index) for index, (augment, adapter, keys) in enumerate(zip(augments, self.augment_adapters, augment_keys))]

        augment_dims = [
            final_state_widths(adapter, keys) if final_state else augment_widths(adapter, keys)
            for adapter, keys, final_state in zip(self.augment_adapters, augment_keys, self.reads_final_state)
        ]

        if exists(dim_augment):
            given = cast_tuple(dim_augment, len(augments))
            derived = [sorted(set(dims.values())) for dims in augment_dims]

            if len(given) != len(augments) or any(dims != [dim] for dim, dims in zip(given, derived)):
                raise ValueError(f'dim_augment={dim_augment} does not match the augments, whose hidden widths are {derived}; leave dim_augment out to derive it')

        # the trainable part: one cross-attention per connection

        self.cross_attns = ModuleList([
            ModuleList([
                CrossAttentionBlock(anchor_dims[site.key], augment_dims[index][key], **check_attn_kwargs(attn_kwargs))
                for site, key in zip(anchor_sites[index], augment_keys[index])
            ])
            for index in range(len(augments))
        ])

        # the composition lives on the anchor's device, in float32 unless asked otherwise
        # (`composition_dtype = 'anchor'` follows the anchor's dtype)

        self.cross_attns.to(device = model_device(anchor_llm), dtype = resolve_composition_dtype(composition_dtype, anchor_llm))

        # freeze the models, remembering their state so that removing the hooks restores them;
        # flags by name, not by parameter object: a record of the objects would keep whole weights
        # alive after FSDP sharding or quantization replaced them

        frozen = [anchor_llm, *self.augments]
        self._frozen_state = [
            (module, module.training, {name: param.requires_grad for name, param in module.named_parameters()})
            for module in frozen
        ]

        # anchor parameters the user left trainable (e.g. LoRA weights) stay trainable, and are saved with the composition
        self.trainable_anchor_params = freeze_models(anchor_llm, self.augments)

        # hooks: recorders on the connected augment sites, one injector over the anchor sites

        self.recorders = [
            HiddenRecorder(adapter, keys, final_state = final_state)
            for adapter, keys, final_state in zip(self.augment_adapters, augment_keys, self.reads_final_state)
        ]

        self.injector = AnchorInjector([
            (site, Connection(index, key, cross_attn))
            for index in range(len(augments))
            for site, key, cross_attn in zip(anchor_sites[index], augment_keys[index], self.cross_attns[index])
        ])

        self.augment_keys = augment_keys
        self.anchor_positions = anchor_positions  # per anchor layer, saved with the wiring
        self.anchor_sites = anchor_sites

        # augments that read tokens are probed for causality here rather than on the first aligned
        # call: the probe registers hooks, and inside a torch.compile'd forward that is a graph break.
        # A model on `meta` has no values to compare yet: probed at its first aligned call
        self.augment_is_causal: list[bool | None] = [
            None if exists(adapter.input_shape) or on_meta(adapter.model) else adapter.is_causal([] if adapter.returns_hiddens else [adapter.layers[layer].site(position) for layer, position in keys])
            for adapter, keys in zip(self.augment_adapters, augment_keys)
        ]
        self.vocab_mismatch = [vocab_mismatch(self.anchor_adapter, adapter, index, augment.same_tokenizer or exists(augment.tokenizer)) for index, (augment, adapter) in enumerate(zip(augments, self.augment_adapters))]
        self.hooks_removed = False

        self.train(self.training)

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

        for hooks in (*self.recorders, self.injector):
            hooks.remove()

        disable_checkpointing(self)

        for module, training, flags in self._frozen_state:
            module.train(training)
            for name, param in module.named_parameters():
                if name in flags:
                    param.requires_grad_(flags[name])

        self.hooks_removed = True

    # composition checkpoints: the learned weights and the wiring, nothing of the frozen models
    # (see calm_pytorch/checkpoint.py; imported here lazily, as it imports this module)

    def composition_state_dict(self) -> dict[str, Tensor]:
        """The composition weights only, keyed as in `state_dict()`: `cross_attns.0.1.to_q.weight`, ..."""
        from calm_pytorch.checkpoint import composition_state_dict
        return composition_state_dict(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the composition weights (safetensors) and wiring (JSON in its metadata) to `path`, atomically."""
        from calm_pytorch.checkpoint import save_composition
        return save_composition(self, path)

    def load(self, path: str | os.PathLike, strict_models: bool = True) -> dict[str, Any]:
        """Loads a checkpoint written by `save` into this composition over the same frozen models.
        A mismatched wiring, other frozen models (unless `strict_models = False`: then a warning)
        or a damaged file is an error, and then nothing is loaded."""
        from calm_pytorch.checkpoint import load_composition
        return load_composition(self, path, strict_models = strict_models)

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
        mask:        (b, n) True for real tokens of `seq`; masked labels are ignored by the loss
        labels:      (b, n) the loss's targets, as in Hugging Face: aligned with `seq` (shifted
                     here), -100 where no loss is wanted; given them, only they choose the
                     predicted tokens (`mask` and `pad_id` no longer do): an answer-only loss is
                     `labels = seq.masked_fill(~answer_mask, -100)`
        return_loss: the next-token cross-entropy, else the logits (b, n, num_tokens)
        input_ids, attention_mask: Hugging Face's names for `seq` and `mask`. Called with
                     `input_ids`, CALM is a transformers causal LM (for `Trainer`): the anchor
                     reads all of `input_ids`, and it returns a `CALMOutput` with `.logits` and
                     `.loss` (None without `labels`); see calm_pytorch/hf_forward.py. Beside `seq`,
                     `attention_mask` goes to the anchor as one of its keywords"""

        if self.hooks_removed:
            raise RuntimeError('this CALM had its hooks removed with `remove_hooks()`; build a new CALM to compose the models again')

        if exists(input_ids):
            return hf_forward(self, seq, mask, input_ids, attention_mask, labels, anchor_kwargs, prompt = prompt, prompt_mask = prompt_mask)

        # beside `seq`, an attention mask is the anchor's own keyword, as it always was
        if exists(attention_mask):
            anchor_kwargs['attention_mask'] = attention_mask

        if not exists(seq):
            raise TypeError('CALM needs the anchor\'s tokens: `calm(seq)`, or `calm(input_ids = ...)` as a transformers model')

        check_tokens(seq, 'seq', min_len = 2 if return_loss else 1)
        self.anchor_adapter.check_token_ids(seq, 'seq')

        if exists(mask):
            mask = check_mask(mask, seq, 'mask', 'seq')

        if exists(labels):
            check_labels(labels, seq, 'seq')

        if return_loss:
            seq, mask, labels = shift_labels(seq, mask, labels) if exists(labels) else shift_for_next_token(seq, mask, self.pad_id)
        elif exists(labels):
            raise ValueError('`labels` were given with return_loss = False, which returns the logits only; leave the labels out or ask for the loss')

        self.anchor_adapter.check_length(seq, 'seq')

        contexts = self.augment_contexts(seq, mask, prompt, prompt_mask)

        # a segment-recurrent anchor reads seq over several calls of each block; the injector
        # counts them to put each segment's queries at their positions
        with self.injector.composed(contexts, query_len = seq.shape[-1]):
            logits = self.anchor_adapter.logits(self.anchor_adapter(seq, mask, **anchor_kwargs))

        if not return_loss:
            return logits

        return mean_token_loss(logits, labels)

    @torch.no_grad()
    @typecheck
    def generate(
        self,
        prompt: Tensor | Sequence[Tensor],
        seq_len: int | None = None,
        *,
        max_new_tokens: int | None = None,
        prompt_mask: Tensor | None = None,
        augment_prompt: Tensor | Sequence[Tensor | None] | None = None,
        augment_prompt_mask: Tensor | Sequence[Tensor | None] | None = None,
        temperature: float = 1.,
        filter_fn: Callable[[Tensor], Tensor] | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        use_cache: bool = True,
        show_progress: bool | None = None
    ) -> Tensor:
        """Continues `prompt` through the composition; returns the new tokens (b, n_new).

        prompt:              (b, n) token ids, or a list of 1-d prompts of different lengths
                             (left-padded here)
        seq_len:             total length, prompt included; or give `max_new_tokens` (exactly one)
        prompt_mask:         (b, n) True for real tokens of a left-padded `prompt`
        augment_prompt:      context mode: the augments' input (one, or one per augment; None there
                             means aligned). Without it every augment reads the sequence being
                             generated (aligned mode)
        augment_prompt_mask: (b, m) True for real positions of `augment_prompt` (right-padded)
        temperature:         divides the logits; 0 is greedy
        filter_fn, top_k, top_p, min_p: applied to the tempered logits in that order
                             (see `calm_pytorch.generation.sample`)
        eos_id:              a row ends at its first `eos_id`; `pad_id` follows it, and generation
                             stops once every row has ended
        pad_id:              fills rows after their eos (default: the CALM's pad_id, or 0 if negative)
        use_cache:           decode one token per step with KV caches (anchor and each aligned
                             augment separately, context keys and values projected once);
                             False recomputes the whole composition every step (for checking)
        show_progress:       a progress bar; None shows it for 256 new tokens or more on a terminal"""

        if self.hooks_removed:
            raise RuntimeError('this CALM had its hooks removed with `remove_hooks()`; build a new CALM to compose the models again')

        if not isinstance(prompt, Tensor):
            if exists(prompt_mask):
                raise ValueError('`prompt_mask` is for a padded prompt tensor; a list of prompts is padded here and needs none')

            prompt, prompt_mask = left_pad(list(prompt))

        check_tokens(prompt, 'prompt')

        if exists(prompt_mask):
            prompt_mask = check_mask(prompt_mask, prompt, 'prompt_mask', 'prompt')
            check_left_padded(prompt_mask)

            if bool(prompt_mask.all()):
                prompt_mask = None

        self.anchor_adapter.check_token_ids(prompt, 'prompt', prompt_mask)  # padding is never read

        if exists(seq_len) == exists(max_new_tokens):
            raise ValueError('pass exactly one of `seq_len` (total length, prompt included) and `max_new_tokens`')

        num_new = max_new_tokens if exists(max_new_tokens) else seq_len - prompt.shape[-1]

        if num_new < 1:
            raise ValueError(f'nothing to generate: `seq_len`={seq_len} is not longer than the prompt ({prompt.shape[-1]} tokens)' if exists(seq_len) else f'`max_new_tokens` must be at least 1, got {max_new_tokens}')

        check_sampling(temperature, top_k, top_p, min_p)

        num_augments = len(self.augments)
        augment_prompts = per_augment(augment_prompt, num_augments, 'augment_prompt')
        augment_prompt_masks = per_augment(augment_prompt_mask, num_augments, 'augment_prompt_mask')

        # every position generated must fit the anchor, and each augment reading the sequence

        total = prompt.shape[-1] + num_new
        full_length = torch.empty((1, total))
        self.anchor_adapter.check_length(full_length, 'prompt + new tokens')

        for index, (adapter, aligned_prompt) in enumerate(zip(self.augment_adapters, augment_prompts)):
            if not exists(aligned_prompt) and not exists(self.augment_texts[index]):
                adapter.check_length(full_length, 'prompt + new tokens')

        return generate_tokens(
            self,
            prompt,
            prompt_mask,
            num_new,
            augment_prompts = augment_prompts,
            augment_prompt_masks = augment_prompt_masks,
            temperature = temperature,
            filter_fn = filter_fn,
            top_k = top_k,
            top_p = top_p,
            min_p = min_p,
            eos_id = eos_id,
            pad_id = pad_id if exists(pad_id) else max(self.pad_id, 0),
            use_cache = use_cache,
            show_progress = show_progress
        )

    @typecheck
    def composed(
        self,
        prompt: Tensor | Sequence[Tensor | None],
        prompt_mask: Tensor | Sequence[Tensor | None] | None = None
    ) -> AbstractContextManager[Module]:
        """A context in which the anchor itself is composed (context mode): the augments read
        `prompt` once, and every anchor call inside, its own `generate()` included (cache, beams,
        sampling, num_return_sequences), cross-attends to them. Yields the anchor; on exit, even by
        an exception, the anchor is plain again.

            with calm.composed(prompt = document, prompt_mask = document_mask) as anchor:
                out = anchor.generate(input_ids, max_new_tokens = 20)"""

        return composed_anchor(self, prompt, prompt_mask)

    def summary(self) -> str:
        """Which augment layer feeds which anchor layer (by number and module name), and the
        trainable versus frozen parameter counts."""

        return summarize(self)

    def augment_contexts(
        self,
        seq: Tensor,
        mask: Tensor | None,
        prompt,
        prompt_mask
    ) -> list[AugmentContext]:
        """Runs every augment (frozen, without gradients) and returns what the anchor attends to."""

        num_augments = len(self.augments)
        prompts = per_augment(prompt, num_augments, 'prompt')
        prompt_masks = per_augment(prompt_mask, num_augments, 'prompt_mask')

        contexts = []

        for index, (augment_prompt, augment_prompt_mask) in enumerate(zip(prompts, prompt_masks)):
            arg = f'prompt[{index}]' if isinstance(prompt, (list, tuple)) else 'prompt'
            contexts.append(self.augment_context(index, seq, mask, augment_prompt, augment_prompt_mask, arg))

        return contexts

    def augment_context(
        self,
        index: int,
        seq: Tensor,
        mask: Tensor | None,
        augment_prompt,
        augment_prompt_mask,
        arg: str = 'prompt'
    ) -> AugmentContext:
        """Runs augment `index` on its prompt, or on `seq` when the prompt is None (aligned)."""

        adapter, recorder = self.augment_adapters[index], self.recorders[index]
        aligned = not exists(augment_prompt)

        if aligned:
            if exists(augment_prompt_mask):
                raise ValueError(f'a prompt_mask was given for augment {index} but no prompt; pass the prompt too, or leave the mask out for aligned mode')

            self.check_aligned(index)

            if exists(self.augment_texts[index]):
                return text_aligned_context(self, index, seq, mask)

            inputs, inputs_mask = seq, mask
        else:
            self.check_prompt(index, augment_prompt, augment_prompt_mask, seq, arg)
            inputs, inputs_mask = augment_prompt, augment_prompt_mask.bool() if exists(augment_prompt_mask) else None

        adapter.check_length(inputs, 'seq' if aligned else arg)

        # aligned inputs were checked against the anchor's vocabulary: check again only against another
        # one (declared with same_tokenizer, or an anchor whose vocabulary is unknown)
        if not exists(adapter.input_shape) and (not aligned or adapter.vocab_size != self.anchor_adapter.vocab_size):
            adapter.check_token_ids(inputs, 'seq' if aligned else arg)

        # each augment reads its input on its own device (and a float input in its own dtype)
        inputs = to_model(inputs, adapter.model, 'seq' if aligned else arg)
        inputs_mask = inputs_mask.to(inputs.device) if exists(inputs_mask) else None

        # token inputs may be cut into segments by a segment-recurrent augment: the recorder
        # stops its forward once the segments cover them
        expected_len = inputs.shape[-1] if not exists(adapter.input_shape) else None

        with torch.no_grad():
            hiddens = recorder(lambda: adapter(inputs, inputs_mask), expected_len)

        if self.reads_final_state[index]:
            # every state token is real; the augment saw the padding through its mask argument
            return AugmentContext(clean_context(hiddens, None, f'augment {index}'), None, causal = False)

        if exists(inputs_mask) and not aligned:
            length = next(iter(hiddens.values())).shape[-2]
            if inputs_mask.shape[-1] != length:
                raise ValueError(f'`{arg}_mask` covers {inputs_mask.shape[-1]} positions, but augment {index} produced {length} hidden positions')

        hiddens = clean_context(hiddens, inputs_mask, f'augment {index}')
        return AugmentContext(hiddens, inputs_mask, causal = aligned)

    def check_aligned(self, index: int):
        adapter = self.augment_adapters[index]

        if self.reads_final_state[index]:
            raise ValueError(
                f"augment {index} has recurrent_context='final_state': its final state summarises the whole input, "
                'so in aligned mode (no prompt) the anchor would see the future. Pass its input as `prompt=` (context mode)'
            )

        if exists(self.vocab_mismatch[index]):
            raise ValueError(self.vocab_mismatch[index])

        if exists(adapter.input_shape):
            raise ValueError(f'augment {index} takes inputs of shape {adapter.input_shape}, not tokens, so it cannot read `seq`; pass its input as `prompt=`')

        if self.augment_is_causal[index] is None:
            sites = [] if adapter.returns_hiddens else [adapter.layers[layer].site(position) for layer, position in self.augment_keys[index]]
            self.augment_is_causal[index] = adapter.is_causal(sites)

        if not self.augment_is_causal[index]:
            raise ValueError(
                f'augment {index} ({type(adapter.model).__name__}) is not causal: its hidden states at a position depend on later tokens, '
                'so in aligned mode (no prompt) the anchor would see the future. Pass its input as `prompt=` (context mode) instead'
            )

    def check_prompt(self, index: int, prompt: Tensor, prompt_mask: Tensor | None, seq: Tensor, arg: str):
        if not isinstance(prompt, Tensor):
            raise TypeError(f'`{arg}` must be a tensor, got {type(prompt).__name__}')

        adapter = self.augment_adapters[index]

        if exists(adapter.input_shape):
            if tuple(prompt.shape[1:]) != tuple(adapter.input_shape):
                raise ValueError(f'`{arg}` must have shape (batch, *{tuple(adapter.input_shape)}) for augment {index}, got {tuple(prompt.shape)}')
        else:
            check_tokens(prompt, arg)

        if prompt.shape[0] != seq.shape[0]:
            raise ValueError(f'`{arg}` has batch size {prompt.shape[0]} but `seq` has batch size {seq.shape[0]}; they must match')

        if exists(prompt_mask):
            if not isinstance(prompt_mask, Tensor) or prompt_mask.ndim != 2 or prompt_mask.shape[0] != prompt.shape[0]:
                shape = tuple(prompt_mask.shape) if isinstance(prompt_mask, Tensor) else type(prompt_mask).__name__
                raise ValueError(f'`{arg}_mask` must have shape (batch, context_len) with batch {prompt.shape[0]}, got {shape}')

            if prompt_mask.dtype.is_floating_point:
                raise TypeError(f'`{arg}_mask` must be a bool tensor (True for real positions), got dtype {prompt_mask.dtype}')

            if not exists(adapter.input_shape) and prompt_mask.shape != prompt.shape:
                raise ValueError(f'`{arg}_mask` must have the shape of `{arg}` {tuple(prompt.shape)}, got {tuple(prompt_mask.shape)}')

# helpers for the constructor

def count_layers(adapter: ModelAdapter) -> int:
    if adapter.returns_hiddens:
        with torch.no_grad():
            return len(adapter(adapter.dummy_input()))

    return len(adapter.layers)

def augment_widths(adapter: ModelAdapter, keys) -> dict:
    if adapter.returns_hiddens:
        with torch.no_grad():
            hiddens = adapter(adapter.dummy_input())
        return {key: hiddens[key[0]].shape[-1] for key in keys}

    sites = {key: adapter.layers[key[0]].site(key[1]) for key in keys}
    dims = adapter.probe(list(sites.values())).dims
    return {key: dims[site.key] for key, site in sites.items()}

def check_recurrent_context(augment: AugmentParams, adapter: ModelAdapter, keys, index: int) -> bool:
    """True when the augment offers its final state tokens as the context."""

    name = f'augment_llms[{index}].recurrent_context'

    if augment.recurrent_context not in RECURRENT_CONTEXTS:
        raise ValueError(f"`{name}` must be one of {RECURRENT_CONTEXTS}, got {augment.recurrent_context!r}")

    if augment.recurrent_context == 'all_segments':
        return False

    if adapter.returns_hiddens:
        raise ValueError(f"`{name}` = 'final_state' reads the state its blocks return, so it needs the blocks; it cannot be used with model_return_hiddens = True")

    if any(position != 'output' for _, position in keys):
        raise ValueError(f"`{name}` = 'final_state' reads the state a block returns: the connected layers need hidden_position = 'output'")

    return True

def final_state_widths(adapter: ModelAdapter, keys) -> dict:
    sites = {key: adapter.layers[key[0]].site(key[1]) for key in keys}
    dims = state_widths(adapter, list(sites.values()))
    return {key: dims[site.key] for key, site in sites.items()}

def positions_per_layer(position, num_layers: int, name: str) -> tuple[HiddenPosition, ...]:
    positions = cast_tuple(position, num_layers)

    if len(positions) != num_layers:
        raise ValueError(f'`{name}` must be one position or one per layer ({num_layers} layers), got {len(positions)}')

    if not all(p in ('input', 'output') for p in positions):
        raise ValueError(f"`{name}` must be 'input' or 'output', got {position!r}")

    return positions

# helpers for the forward

def check_tokens(tokens: Tensor, name: str, min_len: int = 1):
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f'`{name}` must hold integer token ids (e.g. torch.long), got dtype {tokens.dtype}')

    if tokens.ndim != 2:
        raise ValueError(f'`{name}` must have shape (batch, seq_len), got {tuple(tokens.shape)}')

    if tokens.shape[1] < min_len:
        raise ValueError(f'`{name}` must have at least {min_len} token(s) (a loss needs 2: inputs and next-token labels), got shape {tuple(tokens.shape)}')

def check_mask(mask: Tensor, like: Tensor, name: str, like_name: str) -> Tensor:
    if mask.shape != like.shape:
        raise ValueError(f'`{name}` must have the shape of `{like_name}` {tuple(like.shape)}, got {tuple(mask.shape)}')

    if mask.dtype.is_floating_point:
        raise TypeError(f'`{name}` must be a bool tensor (True for real tokens), got dtype {mask.dtype}')

    return mask.bool()

def per_augment(value, num_augments: int, name: str) -> list:
    if not isinstance(value, (list, tuple)):
        return [value] * num_augments

    if len(value) != num_augments:
        raise ValueError(f'`{name}` holds {len(value)} entries but there are {num_augments} augments; pass one per augment, or a single tensor for all')

    return list(value)
