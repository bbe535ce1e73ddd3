from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import decoder, tokens
from segment_model import SegmentLM
from torch import nn

from calm_pytorch import CALM, AugmentParams, CrossAttentionBlock

# segment-recurrent models (Om LLM's shape): every block is called once per segment of the input,
# as block(x, state, offset) -> (output, state). SegmentLM cuts its input into segments of 4

def randomize(calm):
    # a random (not constant) delta, so the composition visibly changes the anchor
    for blocks in calm.cross_attns:
        for block in blocks:
            nn.init.normal_(block.to_out.weight, std = 0.5)
    return calm

def segment_augment(**kwargs):
    model = SegmentLM(dim = 16, depth = 3, segment_len = 4)
    return model, AugmentParams(model = model, transformer_blocks = model.blocks, **kwargs)

def outputs_per_call(module, run):
    calls = []
    handle = module.register_forward_hook(lambda mod, args, output: calls.append(output))
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return calls

# as an augment

def test_augment_hidden_states_of_all_segments_are_concatenated_in_order(anchor):
    model, params = segment_augment(connections = ((2, 2), (3, 4)))
    calm = CALM(anchor, params)
    seq = tokens(length = 10)  # segments [0, 4), [4, 8), [8, 10)

    calls = outputs_per_call(model.blocks[1], lambda: model(seq))
    assert [output[0].shape[1] for output in calls] == [4, 4, 2]

    contexts = calm.augment_contexts(seq, None, None, None)
    recorded = contexts[0].hiddens[(1, 'output')]

    assert recorded.shape == (2, 10, 16)
    assert torch.equal(recorded, torch.cat([output[0] for output in calls], dim = 1))

def test_augment_stops_after_the_last_segment_of_its_deepest_connected_block(anchor):
    model, params = segment_augment(connections = ((2, 4),))
    calm = CALM(anchor, params)
    seq = tokens(length = 10)
    calm(seq)  # the first aligned call also probes the augment for causality

    ran = []
    model.blocks[2].register_forward_hook(lambda *_: ran.append('block 3'))
    model.head.register_forward_hook(lambda *_: ran.append('head'))

    hiddens = calm.augment_contexts(seq, None, None, None)[0].hiddens[(1, 'output')]

    # block 3 runs for the first two segments only, the head never
    assert ran == ['block 3', 'block 3']
    assert hiddens.shape[1] == 10

def test_segment_augment_in_aligned_mode_never_sees_the_future(anchor):
    model, params = segment_augment()
    calm = randomize(CALM(anchor, params)).eval()
    seq = tokens(length = 12)
    logits = calm(seq, return_loss = False)

    assert not torch.allclose(logits, anchor(seq))

    for j in (2, 5, 9):
        changed = seq.clone()
        changed[:, j] = (changed[:, j] + 1) % 256
        changed_logits = calm(changed, return_loss = False)

        assert torch.allclose(changed_logits[:, :j], logits[:, :j], atol = 1e-6)
        assert not torch.allclose(changed_logits[:, j:], logits[:, j:])

# the final state as the context

def test_final_state_is_a_bounded_summary_of_a_long_context(anchor):
    model, params = segment_augment(connections = ((3, 4),), recurrent_context = 'final_state')
    calm = randomize(CALM(anchor, params))
    seq = tokens(length = 8)

    for length in (5, 48):
        prompt = tokens(length = length)
        context = calm.augment_contexts(seq, None, prompt, None)[0]

        # the state tokens the block returned after the last segment, whatever the context length
        with torch.no_grad():
            _, states = model(prompt)

        assert context.hiddens[(2, 'output')].shape == (2, 2, 16)
        assert torch.equal(context.hiddens[(2, 'output')], states[2])
        assert context.mask is None and not context.causal

    assert torch.isfinite(calm(seq, prompt = prompt))
    assert not torch.allclose(calm(seq, prompt = prompt, return_loss = False), anchor(seq))

def test_final_state_ignores_right_padding_through_the_augments_mask(anchor):
    model, params = segment_augment(recurrent_context = 'final_state')
    calm = randomize(CALM(anchor, params))
    seq, prompt = tokens(length = 8), tokens(length = 7)

    logits = calm(seq, prompt = prompt, return_loss = False)

    padded = F.pad(prompt, (0, 6), value = 0)
    padded_mask = F.pad(torch.ones_like(prompt, dtype = torch.bool), (0, 6), value = False)
    padded_logits = calm(seq, prompt = padded, prompt_mask = padded_mask, return_loss = False)

    assert torch.allclose(padded_logits, logits, atol = 1e-5)

class MasklessSegmentLM(SegmentLM):
    # the docs' segment model takes no mask: it reads whatever it is given
    def forward(self, tokens):
        return super().forward(tokens)

def test_padding_a_model_without_a_mask_argument_cannot_read_is_refused(anchor):
    model = MasklessSegmentLM(dim = 16, depth = 3, segment_len = 4)
    seq, prompt = tokens(length = 8), tokens(length = 8)
    right = torch.ones_like(prompt, dtype = torch.bool)
    right[0, 5:] = False

    # its final state would summarise the padding too
    final_state = CALM(anchor, AugmentParams(model = model, transformer_blocks = model.blocks, recurrent_context = 'final_state'))
    with pytest.raises(ValueError, match = r'`prompt_mask` marks padding for augment 0 \(MasklessSegmentLM\), whose forward takes no mask argument.*final state'):
        final_state(seq, prompt = prompt, prompt_mask = right)

    final_state(seq, prompt = prompt, prompt_mask = torch.ones_like(right))  # no padding: nothing to mask
    final_state.remove_hooks()

    # its hidden states: a causal model padded on the right keeps its real positions, padded on the left it does not
    all_segments = CALM(anchor, AugmentParams(model = model, transformer_blocks = model.blocks))
    all_segments(seq, prompt = prompt, prompt_mask = right)

    with pytest.raises(ValueError, match = 'the padding comes before real tokens'):
        all_segments(seq, prompt = prompt, prompt_mask = right.flip(-1))

def test_final_state_needs_a_prompt(anchor):
    _, params = segment_augment(recurrent_context = 'final_state')
    calm = CALM(anchor, params)

    with pytest.raises(ValueError, match = r"recurrent_context='final_state'.*see the future.*`prompt=`"):
        calm(tokens())

def test_final_state_needs_blocks_returning_a_state(anchor):
    with pytest.raises(TypeError, match = r"'final_state' expects the connected block to return \(output, state\)"):
        CALM(anchor, AugmentParams(model = decoder(dim = 24), recurrent_context = 'final_state'))

    with pytest.raises(ValueError, match = r"augment_llms\[0\]\.recurrent_context.*hidden_position = 'output'"):
        CALM(anchor, segment_augment(recurrent_context = 'final_state', hidden_position = 'input')[1])

    with pytest.raises(ValueError, match = r"augment_llms\[0\]\.recurrent_context` must be one of \('all_segments', 'final_state'\), got 'last'"):
        CALM(anchor, segment_augment(recurrent_context = 'last')[1])

# as the anchor

def segment_anchor():
    model = SegmentLM(dim = 32, depth = 4, segment_len = 4)
    return model, dict(anchor_transformer_blocks = model.blocks)

def test_segment_anchor_returning_logits_and_state_is_the_identity_at_init():
    anchor, kwargs = segment_anchor()
    calm = CALM(anchor, decoder(dim = 24), **kwargs)
    seq = tokens(length = 11)

    # the anchor returns (logits, states): the logits are picked from the tuple
    assert torch.equal(calm(seq, return_loss = False), anchor(seq)[0])
    assert torch.equal(calm(seq, prompt = tokens(length = 6), return_loss = False), anchor(seq)[0])

def test_each_segment_of_the_anchor_attends_to_augment_positions_up_to_its_own():
    anchor, kwargs = segment_anchor()
    calm = randomize(CALM(anchor, AugmentParams(model = decoder(dim = 24), connections = ((4, 2),)), **kwargs))

    offsets = []
    calm.cross_attns[0][0].register_forward_pre_hook(lambda module, args, kwargs: offsets.append((args[0].shape[1], kwargs['query_offset'])), with_kwargs = True)

    seq = tokens(length = 10)
    logits = calm(seq, return_loss = False)

    # segments [0, 4), [4, 8), [8, 10) start at positions 0, 4 and 8 of the augment's 10
    assert offsets == [(4, 0), (4, 4), (2, 8)]
    assert not torch.allclose(logits, anchor(seq)[0])

    for j in (1, 4, 6, 9):
        changed = seq.clone()
        changed[:, j] = (changed[:, j] + 1) % 256
        changed_logits = calm(changed, return_loss = False)

        assert torch.allclose(changed_logits[:, :j], logits[:, :j], atol = 1e-6)
        assert not torch.allclose(changed_logits[:, j:], logits[:, j:])

def test_the_injector_reset_its_count_after_a_failed_forward():
    anchor, kwargs = segment_anchor()
    calm = randomize(CALM(anchor, decoder(dim = 24), **kwargs))
    seq = tokens(length = 10)
    logits = calm(seq, return_loss = False)

    handle = anchor.head.register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError('boom')))
    with pytest.raises(RuntimeError, match = 'boom'):
        calm(seq)
    handle.remove()

    assert calm.injector.call.positions_seen == {} and calm.injector.call.query_len is None
    assert torch.equal(calm(seq, return_loss = False), logits)

def test_segment_models_composed_both_ways_train():
    anchor, kwargs = segment_anchor()
    augment, params = segment_augment()
    summary, summary_params = segment_augment(recurrent_context = 'final_state')
    calm = CALM(anchor, [params, summary_params], **kwargs)

    frozen = {name: tensor.clone() for name, tensor in [*anchor.state_dict().items(), *augment.state_dict().items()]}
    optim = torch.optim.Adam(calm.parameters(), lr = 1e-2)
    seq, document = tokens(length = 10), tokens(length = 30)

    losses = []
    for _ in range(4):
        loss = calm(seq, prompt = [None, document])
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())

    assert losses[-1] < losses[0]
    assert all(torch.equal(tensor, {**anchor.state_dict(), **augment.state_dict()}[name]) for name, tensor in frozen.items())

    new = calm.generate(tokens(length = 5), max_new_tokens = 3, prompt = [None, document], temperature = 0.)
    assert new.shape == (2, 3)

# anchors returning extra structure: which output is the logits

@dataclass
class Output:
    logits: torch.Tensor
    state: list

class ObjectOutput(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        logits, state = self.model(x)
        return Output(logits, state)

class StateFirst(ObjectOutput):
    def forward(self, x):
        logits, state = self.model(x)
        return {'state': state, 'scores': logits}

def test_logits_of_an_output_object_are_found():
    anchor = ObjectOutput(SegmentLM(dim = 32))
    calm = CALM(anchor, decoder(dim = 24), anchor_transformer_blocks = anchor.model.blocks)
    seq = tokens(length = 9)
    assert torch.equal(calm(seq, return_loss = False), anchor(seq).logits)

def test_anchor_logits_fn_picks_the_logits():
    anchor = StateFirst(SegmentLM(dim = 32))
    blocks = dict(anchor_transformer_blocks = anchor.model.blocks)
    seq = tokens(length = 9)

    with pytest.raises(TypeError, match = r'could not find logits in the output of anchor_llm \(dict\).*anchor_logits_fn='):
        CALM(anchor, decoder(dim = 24), **blocks)(seq)

    calm = CALM(anchor, decoder(dim = 24), anchor_logits_fn = lambda output: output['scores'], **blocks)
    assert torch.equal(calm(seq, return_loss = False), anchor(seq)['scores'])
    assert calm(seq).ndim == 0

    wrong = CALM(anchor, decoder(dim = 24), anchor_logits_fn = lambda output: output['state'], **blocks)
    with pytest.raises(TypeError, match = r'logits_fn of anchor_llm must return the logits tensor, got list'):
        wrong(seq)

def test_cross_attention_query_offset_defaults_to_the_last_positions():
    block = CrossAttentionBlock(8, 8, heads = 2, dim_head = 4)
    nn.init.normal_(block.to_out.weight)
    x, context = torch.randn(1, 3, 8), torch.randn(1, 7, 8)

    # three queries at the end of seven positions, or explicitly at positions 4..6
    assert torch.equal(block(x, context, causal = True), block(x, context, causal = True, query_offset = 4))
    assert not torch.allclose(block(x, context, causal = True), block(x, context, causal = True, query_offset = 0))

def test_generation_with_a_segment_recurrent_anchor_matches_the_full_forward():
    # every generated token is the argmax of the composed forward over the sequence so far,
    # with each segment of the anchor seeing the augment up to its own positions
    anchor, kwargs = segment_anchor()
    augment, params = segment_augment()
    calm = CALM(anchor, params, **kwargs)

    for blocks in calm.cross_attns:
        for block in blocks:
            block.to_out.weight.data.normal_()

    prompt = tokens(length = 5)
    new = calm.generate(prompt, max_new_tokens = 6, temperature = 0.)

    seq = prompt
    for _ in range(6):
        next_token = calm(seq, return_loss = False)[:, -1].argmax(dim = -1)
        seq = torch.cat((seq, next_token[:, None]), dim = -1)

    assert torch.equal(new, seq[:, 5:])
