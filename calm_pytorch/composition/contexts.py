from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from calm_pytorch.composition.injection import AugmentContext
from calm_pytorch.composition.inputs import check_tokens, per_augment
from calm_pytorch.composition.protocol import Composition
from calm_pytorch.helpers import exists
from calm_pytorch.models.adapter import DecodeState
from calm_pytorch.models.precision import to_model
from calm_pytorch.text.alignment import Alignment, align

# running the augments: each reads its prompt (context mode) or the anchor's tokens (aligned mode),
# frozen and without gradients, and what its connected layers recorded becomes the context the
# anchor's cross-attentions read. The forward, generation and `composed()` all start here

def augment_contexts(
    calm: Composition,
    seq: Tensor,
    mask: Tensor | None,
    prompt,
    prompt_mask
) -> list[AugmentContext]:
    """Runs every augment (frozen, without gradients) and returns what the anchor attends to."""

    num_augments = len(calm.augments)
    prompts = per_augment(prompt, num_augments, 'prompt')
    prompt_masks = per_augment(prompt_mask, num_augments, 'prompt_mask')

    contexts = []

    for index, (augment_prompt, augment_prompt_mask) in enumerate(zip(prompts, prompt_masks)):
        arg = f'prompt[{index}]' if isinstance(prompt, (list, tuple)) else 'prompt'
        contexts.append(augment_context(calm, index, seq, mask, augment_prompt, augment_prompt_mask, arg))

    return contexts

def augment_context(
    calm: Composition,
    index: int,
    seq: Tensor,
    mask: Tensor | None,
    augment_prompt,
    augment_prompt_mask,
    arg: str = 'prompt'
) -> AugmentContext:
    """Runs augment `index` on its prompt, or on `seq` when the prompt is None (aligned)."""

    adapter, recorder = calm.augment_adapters[index], calm.recorders[index]
    aligned = not exists(augment_prompt)

    if aligned:
        if exists(augment_prompt_mask):
            raise ValueError(f'a prompt_mask was given for augment {index} but no prompt; pass the prompt too, or leave the mask out for aligned mode')

        check_aligned(calm, index)

        if exists(calm.augment_texts[index]):
            return text_aligned_context(calm, index, seq, mask)

        inputs, inputs_mask = seq, mask
    else:
        augment_prompt = check_prompt(calm, index, augment_prompt, augment_prompt_mask, seq, arg)
        inputs, inputs_mask = augment_prompt, augment_prompt_mask.bool() if exists(augment_prompt_mask) else None

    adapter.check_length(inputs, 'seq' if aligned else arg)

    # aligned inputs were checked against the anchor's vocabulary: check again only against another
    # one (declared with same_tokenizer, or an anchor whose vocabulary is unknown)
    if not exists(adapter.input_shape) and (not aligned or adapter.vocab_size != calm.anchor_adapter.vocab_size):
        adapter.check_token_ids(inputs, 'seq' if aligned else arg)

    # each augment reads its input on its own device (and a float input in its own dtype)
    inputs = to_model(inputs, adapter.model, 'seq' if aligned else arg)
    inputs_mask = inputs_mask.to(inputs.device) if exists(inputs_mask) else None

    # token inputs may be cut into segments by a segment-recurrent augment: the recorder
    # stops its forward once the segments cover them
    expected_len = inputs.shape[-1] if not exists(adapter.input_shape) else None

    check_padding_is_masked(calm, index, inputs_mask, 'mask' if aligned else f'{arg}_mask')

    with torch.no_grad():
        hiddens = recorder(lambda: adapter(inputs, inputs_mask), expected_len)

    if aligned:
        check_one_per_token(hiddens, inputs.shape[-1], index)

    if calm.reads_final_state[index]:
        # every state token is real; the augment saw the padding through its mask argument
        return AugmentContext(clean_context(hiddens, None, f'augment {index}'), None, causal = False)

    if exists(inputs_mask) and not aligned:
        length = next(iter(hiddens.values())).shape[-2]
        if inputs_mask.shape[-1] != length:
            raise ValueError(f'`{arg}_mask` covers {inputs_mask.shape[-1]} positions, but augment {index} produced {length} hidden positions')

    hiddens = clean_context(hiddens, inputs_mask, f'augment {index}')
    return AugmentContext(hiddens, inputs_mask, causal = aligned)

def check_aligned(calm: Composition, index: int):
    adapter = calm.augment_adapters[index]

    if calm.reads_final_state[index]:
        raise ValueError(
            f"augment {index} has recurrent_context='final_state': its final state summarises the whole input, "
            'so in aligned mode (no prompt) the anchor would see the future. Pass its input as `prompt=` (context mode)'
        )

    if exists(calm.vocab_mismatch[index]):
        raise ValueError(calm.vocab_mismatch[index])

    if exists(adapter.input_shape):
        raise ValueError(f'augment {index} takes inputs of shape {adapter.input_shape}, not tokens, so it cannot read `seq`; pass its input as `prompt=`')

    if calm.augment_is_causal[index] is None:
        sites = [] if adapter.returns_hiddens else [adapter.layers[layer].site(position) for layer, position in calm.augment_keys[index]]
        calm.augment_is_causal[index] = adapter.is_causal(sites)

    if calm.augment_is_causal[index] is None:
        raise ValueError(
            f'augment {index} ({type(adapter.model).__name__}) produced NaN or inf hidden states on a 3-token probe, so whether it is causal '
            'cannot be told: it overflows (a float16 model? load it in bfloat16 or float32)'
        )

    if not calm.augment_is_causal[index]:
        raise ValueError(
            f'augment {index} ({type(adapter.model).__name__}) is not causal: its hidden states at a position depend on later tokens, '
            'so in aligned mode (no prompt) the anchor would see the future. Pass its input as `prompt=` (context mode) instead'
        )

def check_one_per_token(hiddens: dict, length: int, index: int):
    # aligned mode pairs the augment's position i with the anchor's position i: hidden states of
    # another length (an x-transformers model's memory tokens, prepended) would shift every pair
    # size by size: under torch.compile or export they are symbolic, and a set of them would hash
    # them, pinning the sequence length to a constant
    for hidden in hiddens.values():
        if hidden.shape[-2] != length:
            raise ValueError(
                f'augment {index} produced {hidden.shape[-2]} hidden positions for {length} tokens; aligned mode (no prompt) pairs each of its '
                'positions with the anchor\'s, so it needs one per token (a model with memory tokens prepends its own). Pass its input as `prompt=` (context mode)'
            )

def check_padding_is_masked(calm: Composition, index: int, mask: Tensor | None, mask_arg: str):
    # an augment without a mask argument reads padding as tokens. That is harmless only when no real
    # position reads it: a causal model, padded after its tokens (aligned augments are causal)
    adapter = calm.augment_adapters[index]

    if exists(adapter.mask_kwarg) or exists(adapter.input_shape) or not exists(mask) or bool(mask.all()):
        return

    right_padded = bool((mask.int().cummin(dim = -1).values == mask.int()).all())

    if calm.reads_final_state[index]:
        why = 'its final state summarises every position it reads'
    elif not right_padded:
        why = 'the padding comes before real tokens'
    elif calm.augment_is_causal[index] is False:
        why = 'it is not causal, so its real positions read later ones'
    else:
        return

    raise ValueError(
        f'`{mask_arg}` marks padding for augment {index} ({type(adapter.model).__name__}), whose forward takes no mask argument, so it '
        f'reads the padding as tokens, and {why}. Give it a `mask` or `attention_mask` argument (or name yours with '
        'AugmentParams(mask_kwarg = ...)), or pass unpadded rows one at a time'
    )

def check_prompt(calm: Composition, index: int, prompt: Tensor, prompt_mask: Tensor | None, seq: Tensor, arg: str) -> Tensor:
    """Checks an augment's own input; returns it, token ids as torch.long."""

    if not isinstance(prompt, Tensor):
        raise TypeError(f'`{arg}` must be a tensor, got {type(prompt).__name__}')

    adapter = calm.augment_adapters[index]

    if exists(adapter.input_shape):
        if tuple(prompt.shape[1:]) != tuple(adapter.input_shape):
            raise ValueError(f'`{arg}` must have shape (batch, *{tuple(adapter.input_shape)}) for augment {index}, got {tuple(prompt.shape)}')

        # raw pixels (0 to 255) would be read as they are, or fail in a float layer: the model's
        # processor scales and normalises them
        if prompt.dtype in (torch.uint8, torch.bool) or prompt.is_complex():
            raise TypeError(
                f'`{arg}` for augment {index} has dtype {prompt.dtype}; its model reads floats: scale and normalise raw pixels as its '
                "processor does (e.g. transformers' image processor), then pass the float tensor"
            )
    else:
        prompt = check_tokens(prompt, arg)

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

    return prompt

def text_aligned_context(calm: Composition, index: int, seq: Tensor, mask: Tensor | None) -> AugmentContext:
    """Runs augment `index` on its own tokenization of the text of `seq` (the rule: text/alignment.py)."""

    alignment = align(seq, mask, calm.anchor_text, calm.augment_texts[index])
    hiddens = read_alignment(calm, index, alignment)
    hiddens = {key: rearrange(hidden, '(b r) m d -> b (r m) d', r = alignment.runs) for key, hidden in hiddens.items()}
    return AugmentContext(hiddens, None, causal = False, visible = alignment.visible)

def read_alignment(calm: Composition, index: int, alignment: Alignment, state: DecodeState | None = None) -> dict:
    """The augment's hidden states (b * r, m, d) of every run of an alignment; with a decode
    state, its cache keeps the runs (generation's first step, generation/text_stream.py)."""

    adapter, recorder = calm.augment_adapters[index], calm.recorders[index]
    adapter.check_length(alignment.ids, f'the augment tokenization of `seq` (augment {index})')
    adapter.check_token_ids(alignment.ids, f'the augment tokenization of `seq` (augment {index}; is its tokenizer the one of its model?)')
    inputs = to_model(alignment.ids, adapter.model, 'seq')
    inputs_mask = alignment.mask.to(inputs.device)

    # a batch of no rows has no padding to mask (and x-transformers cannot mask zero rows)
    model_mask = inputs_mask if inputs.shape[0] > 0 else None

    with torch.no_grad():
        run = (lambda: adapter.decode(inputs, inputs_mask, state)) if exists(state) else (lambda: adapter(inputs, model_mask))
        hiddens = recorder(run, inputs.shape[-1])

    return clean_context(hiddens, inputs_mask, f'augment {index}')

def clean_context(hiddens: dict, mask: Tensor | None, what: str) -> dict:
    """Zeroes the padded positions of recorded hidden states (masked keys are never attended to,
    but a NaN there would still reach the output through a zero attention weight: 0 * NaN = NaN),
    then refuses NaN / inf at the real ones."""

    if exists(mask):
        hiddens = {key: hidden.masked_fill(~mask.to(hidden.device)[..., None], 0.) for key, hidden in hiddens.items()}

    if torch.compiler.is_compiling():
        return hiddens  # as in models/precision.py, check_finite

    finite = [torch.isfinite(hidden).all() for hidden in hiddens.values()]

    # one reduction and one device sync for all layers
    if len(finite) > 0 and not bool(torch.stack([flag.to(finite[0].device) for flag in finite]).all()):
        layers = [key[0] + 1 for key, flag in zip(hiddens, finite) if not bool(flag)]
        raise ValueError(f'{what} produced NaN or inf hidden states at layer(s) {layers} (1-indexed) for real, unpadded positions; its input was finite, so the augment itself overflowed (an fp16 model? try bfloat16 or float32)')

    return hiddens
