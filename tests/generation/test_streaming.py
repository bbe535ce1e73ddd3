from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
import transformers
from hf_models import ENCODERS, LLAMA_LIKE
from text_tokenizers import byte_bpe
from transformers import TextIteratorStreamer

from calm_pytorch import CALM, AugmentParams

# Hugging Face's streaming pattern: `generate` runs in a worker thread and hands each new token to
# a streamer, which the caller reads. The streamed tokens must be the composed ones, exactly the
# tokens of the same generation without a streamer

GREEDY = dict(max_new_tokens = 8, do_sample = False, eos_token_id = None, pad_token_id = 0)

class Tokens:
    """A streamer with Hugging Face's protocol that keeps what it is given; `first_put` can hold
    the worker at its first `put` (the prompt, before any anchor call) until the test releases it."""

    def __init__(self, first_put: threading.Event | None = None):
        self.puts, self.ended, self.first_put = [], False, first_put

    def put(self, tokens):
        if self.first_put is not None and not self.puts:
            assert self.first_put.wait(timeout = 60)
        self.puts.append(tokens)

    def end(self):
        self.ended = True

    def new_tokens(self):
        return torch.stack(self.puts[1:], dim = -1)

@pytest.fixture(scope = 'module')
def setup():
    torch.manual_seed(0)
    tokenizer = byte_bpe()
    anchor = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA_LIKE, 'vocab_size': len(tokenizer)}, num_key_value_heads = 1)).eval()
    calm = CALM(anchor, AugmentParams(model = ENCODERS['bert'].build(), connections = ((1, 1), (2, 2))), attn_kwargs = dict(heads = 2, dim_head = 16))

    with torch.no_grad():
        for param in calm.cross_attns.parameters():
            param.normal_(std = 0.5)

    input_ids = tokenizer(['the cat sat on'], return_tensors = 'pt').input_ids
    document = torch.randint(3, 100, (1, 7))

    with calm.composed(document) as composed:
        expected = composed.generate(input_ids, **GREEDY)[:, input_ids.shape[-1]:]

    plain = anchor.generate(input_ids, **GREEDY)[:, input_ids.shape[-1]:]
    assert not torch.equal(expected, plain)
    return calm, anchor, tokenizer, input_ids, document, expected

def test_a_generate_thread_started_inside_composed_streams_the_composed_tokens(setup):
    calm, anchor, tokenizer, input_ids, document, expected = setup
    text, tokens = TextIteratorStreamer(tokenizer, skip_prompt = True), Tokens()

    with calm.composed(document) as composed:
        workers = [threading.Thread(target = composed.generate, kwargs = dict(input_ids = input_ids, streamer = streamer, **GREEDY)) for streamer in (text, tokens)]
        for worker in workers:
            worker.start()
        streamed = ''.join(text)
        for worker in workers:
            worker.join()

    assert torch.equal(tokens.new_tokens(), expected) and tokens.ended
    assert streamed == tokenizer.decode(expected[0])
    assert len(anchor._forward_pre_hooks) == 0 and len(anchor._forward_hooks) == 0

def test_the_thread_keeps_the_composition_when_the_block_closes_before_it_runs(setup):
    # the caller reads the streamer after the block: the worker's every anchor call comes after the exit
    calm, anchor, _, input_ids, document, expected = setup
    release = threading.Event()
    tokens = Tokens(first_put = release)
    plain_logits = anchor(input_ids).logits

    with calm.composed(document) as composed:
        worker = threading.Thread(target = composed.generate, kwargs = dict(input_ids = input_ids, streamer = tokens, **GREEDY))
        worker.start()

    # the thread that opened the block has the plain anchor again
    assert torch.equal(anchor(input_ids).logits, plain_logits)
    release.set()
    worker.join()
    assert torch.equal(tokens.new_tokens(), expected)

    # once the threads started inside the block have ended, its hooks go at the next anchor call
    assert torch.equal(anchor(input_ids).logits, plain_logits)
    assert len(anchor._forward_pre_hooks) == 0 and len(anchor._forward_hooks) == 0

def test_a_thread_started_while_two_blocks_are_open_is_refused(setup):
    calm, anchor, _, input_ids, document, _ = setup
    opened, done = threading.Event(), threading.Event()

    def other_block():
        with calm.composed(document):
            opened.set()
            done.wait(timeout = 60)

    other = threading.Thread(target = other_block)
    other.start()
    opened.wait(timeout = 60)
    errors = []

    def call_anchor():
        try:
            anchor(input_ids)
        except RuntimeError as error:
            errors.append(str(error))

    with calm.composed(document):
        caller = threading.Thread(target = call_anchor)
        caller.start()
        caller.join()

    done.set()
    other.join()
    assert len(errors) == 1 and 'ambiguous' in errors[0]

def test_calm_generate_streams_its_tokens_to_hugging_face_streamers(setup):
    calm, _, tokenizer, input_ids, document, _ = setup
    prompt = torch.cat([input_ids, input_ids.flip(-1)])
    expected = calm.generate(prompt, max_new_tokens = 8, temperature = 0., prompt = document.expand(2, -1))

    # the second row ends at its second token: the streamer gets pad_id after it, as returned
    eos_id = int(expected[1, 1])
    ended = calm.generate(prompt, max_new_tokens = 8, temperature = 0., prompt = document.expand(2, -1), eos_id = eos_id, pad_id = 0)
    tokens = Tokens()
    streamed = calm.generate(prompt, max_new_tokens = 8, temperature = 0., prompt = document.expand(2, -1), eos_id = eos_id, pad_id = 0, streamer = tokens)

    assert torch.equal(streamed, ended) and tokens.ended
    assert torch.equal(tokens.puts[0], prompt)
    assert torch.equal(tokens.new_tokens(), ended[:, :tokens.new_tokens().shape[-1]])
    assert (ended[1, 2:] == 0).all()

    # the documented thread pattern, with text
    text = TextIteratorStreamer(tokenizer, skip_prompt = True)
    worker = threading.Thread(target = calm.generate, args = (input_ids,), kwargs = dict(max_new_tokens = 8, temperature = 0., prompt = document, streamer = text))
    worker.start()
    assert ''.join(text) == tokenizer.decode(expected[0])
    worker.join()

@pytest.mark.parametrize('refused, error', [
    (dict(prompt = torch.full((1, 3), 10**6)), ValueError),  # while decoding
    (dict(max_new_tokens = 10**6), ValueError),               # longer than the anchor: before any token
    (dict(top_p = 1.5), ValueError),
    (dict(temperature = 'hot'), TypeError),                   # by the type check, before the body
])
def test_the_streamer_ends_even_when_generation_fails(setup, refused, error):
    calm, _, tokenizer, input_ids, _, _ = setup
    tokens = Tokens()

    with pytest.raises(error):
        calm.generate(input_ids, **{'max_new_tokens': 4, **refused}, streamer = tokens)

    assert tokens.ended

    # Hugging Face's pattern: the reader in the caller's thread finishes, instead of waiting forever
    text, errors = TextIteratorStreamer(tokenizer, skip_prompt = True, timeout = 60), []

    def run():
        try:
            calm.generate(input_ids, **{'max_new_tokens': 4, **refused}, streamer = text)
        except error as refusal:
            errors.append(refusal)

    worker = threading.Thread(target = run)
    worker.start()
    assert ''.join(text) == ''
    worker.join()
    assert len(errors) == 1

def test_a_streamer_without_put_is_refused(setup):
    calm, _, _, input_ids, _, _ = setup

    with pytest.raises(TypeError, match = 'put'):
        calm.generate(input_ids, max_new_tokens = 4, streamer = print)

def test_the_anchor_is_copied_and_pickled_inside_a_block(setup):
    # the block's record of threads is not copied with the model (threads cannot be)
    calm, anchor, _, input_ids, document, _ = setup

    with calm.composed(document) as composed:
        copied = pickle.loads(pickle.dumps(copy.deepcopy(composed)))

    assert torch.equal(copied(input_ids).logits, anchor(input_ids).logits)

def test_a_block_exited_by_another_thread_leaves_its_opener_plain(setup):
    # an ExitStack handed to another thread exits the block there: the opener's own state is reset
    # at its next anchor call, never left composed
    calm, anchor, _, input_ids, document, expected = setup
    plain = anchor.generate(input_ids, **GREEDY)

    for next_call in ('anchor', 'composed'):
        block = calm.composed(document)
        composed = block.__enter__()
        assert torch.equal(composed.generate(input_ids, **GREEDY)[:, input_ids.shape[-1]:], expected)

        exiting = threading.Thread(target = block.__exit__, args = (None, None, None))
        exiting.start()
        exiting.join()

        if next_call == 'anchor':
            assert torch.equal(anchor.generate(input_ids, **GREEDY), plain)
        else:
            with calm.composed(document) as again:
                assert torch.equal(again.generate(input_ids, **GREEDY)[:, input_ids.shape[-1]:], expected)

            assert torch.equal(anchor.generate(input_ids, **GREEDY), plain)

        assert len(anchor._forward_pre_hooks) == 0 and len(anchor._forward_hooks) == 0
