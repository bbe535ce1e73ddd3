from __future__ import annotations

import warnings

import pytest
import torch
from conftest import NUM_TOKENS, decoder, tokens
from hf_models import llama
from torch import nn

from calm_pytorch import CALM, AugmentParams, CrossAttentionBlock

# many tiny steps: one thread avoids the cost of waking others for each small matmul, which on a
# shared machine dominates (60x slower with two busy threads)

@pytest.fixture(autouse = True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# helpers

def untrained_away(calm: CALM) -> CALM:
    # a random output projection, so every cross-attention changes the anchor's logits
    for blocks in calm.cross_attns:
        for block in blocks:
            nn.init.normal_(block.to_out.weight, std = 0.3)

    return calm.eval()

def composition(num_augments: int, anchor = None, **kwargs) -> CALM:
    augments = [decoder(dim = 24, depth = 4)]

    if num_augments == 2:
        # a second, shallower wiring: its recorder stops the augment after layer 2 every step,
        # so its cache only ever holds the layers that ran
        augments.append(AugmentParams(model = decoder(dim = 16, depth = 4), connections = ((1, 1), (2, 2))))

    return untrained_away(CALM(anchor if anchor is not None else decoder(dim = 32, depth = 2), augments, **kwargs))

def generate_with_logits(calm: CALM, seq, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    # the logits of every step, read through filter_fn (with temperature 0 it sees the raw logits)
    steps = []
    new = calm.generate(seq, temperature = 0., filter_fn = lambda logits: steps.append(logits) or logits, **kwargs)
    return new, torch.stack(steps, dim = 1)

def mode_kwargs(mode: str, batch: int = 2, length: int = 6) -> dict:
    return dict() if mode == 'aligned' else dict(prompt = tokens(batch, length))

# 1. cached decoding equals recomputation

@pytest.mark.parametrize('mode', ['aligned', 'context'])
@pytest.mark.parametrize('num_augments', [1, 2])
def test_cached_equals_uncached(mode, num_augments):
    calm = composition(num_augments)
    prompt, kwargs = tokens(2, 5), mode_kwargs(mode)

    cached, cached_logits = generate_with_logits(calm, prompt, max_new_tokens = 10, **kwargs)
    plain, plain_logits = generate_with_logits(calm, prompt, max_new_tokens = 10, use_cache = False, **kwargs)

    assert torch.equal(cached, plain)
    assert torch.allclose(cached_logits, plain_logits, atol = 1e-5)
    assert not torch.allclose(cached_logits, calm.anchor(torch.cat((prompt, cached), dim = -1))[:, 4:-1], atol = 1e-3)  # composed, not the bare anchor

def tiny_llama():
    import transformers
    config = transformers.LlamaConfig(
        vocab_size = NUM_TOKENS, hidden_size = 32, intermediate_size = 64, num_hidden_layers = 2,
        num_attention_heads = 2, num_key_value_heads = 1, max_position_embeddings = 64
    )
    return transformers.LlamaForCausalLM(config).eval()

@pytest.mark.parametrize('mode', ['aligned', 'context'])
def test_cached_equals_uncached_hf_anchor_and_augment(mode):
    anchor, augment = tiny_llama(), tiny_llama()

    calm = untrained_away(CALM(
        anchor,
        [AugmentParams(model = augment, transformer_blocks = augment.model.layers, connections = ((1, 1),)), decoder(dim = 24, depth = 4)],
        anchor_transformer_blocks = anchor.model.layers
    ))

    prompt, kwargs = tokens(2, 5), mode_kwargs(mode)
    cached, cached_logits = generate_with_logits(calm, prompt, max_new_tokens = 8, **kwargs)
    plain, plain_logits = generate_with_logits(calm, prompt, max_new_tokens = 8, use_cache = False, **kwargs)

    assert torch.equal(cached, plain)
    assert torch.allclose(cached_logits, plain_logits, atol = 1e-5)

    # left-padded rows equal each prompt alone on HF models too (positions count real tokens)
    prompts = [tokens(1, 5)[0], tokens(1, 2)[0]]
    contexts = tokens(2, 6)
    context_of = lambda rows: dict(prompt = contexts[rows]) if mode == 'context' else dict()
    batched, batched_logits = generate_with_logits(calm, prompts, max_new_tokens = 6, **context_of(slice(None)))

    for row, prompt in enumerate(prompts):
        alone, alone_logits = generate_with_logits(calm, prompt[None], max_new_tokens = 6, **context_of(slice(row, row + 1)))
        assert torch.equal(batched[row], alone[0])
        assert torch.allclose(batched_logits[row], alone_logits[0], atol = 1e-5)

# 2. a left-padded batch gives each row what its prompt gives alone

@pytest.mark.parametrize('mode', ['aligned', 'context'])
@pytest.mark.parametrize('use_cache', [True, False])
def test_batch_of_different_lengths_equals_each_prompt_alone(mode, use_cache):
    calm = composition(2)
    prompts = [tokens(1, 6)[0], tokens(1, 2)[0], tokens(1, 4)[0]]
    contexts, context_mask = tokens(3, 7), torch.ones(3, 7, dtype = torch.bool)
    context_mask[1, 4:] = False  # a shorter, right-padded context

    def context_of(rows):
        return dict(prompt = contexts[rows], prompt_mask = context_mask[rows]) if mode == 'context' else dict()

    batched, batched_logits = generate_with_logits(calm, prompts, max_new_tokens = 8, use_cache = use_cache, **context_of(slice(None)))

    for row, prompt in enumerate(prompts):
        alone, alone_logits = generate_with_logits(calm, prompt[None], max_new_tokens = 8, use_cache = use_cache, **context_of(slice(row, row + 1)))
        assert torch.equal(batched[row], alone[0])
        assert torch.allclose(batched_logits[row], alone_logits[0], atol = 1e-5)

def test_padded_prompt_tensor_with_mask_equals_list_of_prompts():
    calm = composition(1)
    prompts = [tokens(1, 5)[0], tokens(1, 3)[0]]

    padded = torch.full((2, 5), -1)  # the padding value is never read
    padded[0], padded[1, 2:] = prompts[0], prompts[1]
    mask = padded != -1

    assert torch.equal(
        calm.generate(padded, mask = mask, max_new_tokens = 5, temperature = 0.),
        calm.generate(prompts, max_new_tokens = 5, temperature = 0.)
    )

    with pytest.raises(ValueError, match = 'left-padded'):
        calm.generate(padded, mask = mask.flip(-1), max_new_tokens = 5)

# 3. no off-by-one, eos, sampling filters

class PlusOne(nn.Module):
    """Always predicts `input token + 1`; its block runs (and is hooked) but changes nothing."""

    def __init__(self, num_tokens: int = 64, dim: int = 16):
        super().__init__()
        self.num_tokens = num_tokens
        self.embed = nn.Embedding(num_tokens, dim)
        self.blocks = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x):
        hidden = self.blocks[0](self.embed(x))
        logits = nn.functional.one_hot((x + 1) % self.num_tokens, self.num_tokens).float() * 10.
        return logits + 0. * hidden.sum(dim = -1, keepdim = True)

@pytest.fixture
def plus_one():
    model = PlusOne()
    return CALM(model, decoder(dim = 16, depth = 2), anchor_transformer_blocks = model.blocks)

@pytest.mark.parametrize('use_cache', [True, False])
def test_continues_with_the_next_token(plus_one, use_cache):
    new = plus_one.generate(torch.tensor([[10, 11, 12]]), seq_len = 8, temperature = 0., use_cache = use_cache)
    assert new.tolist() == [[13, 14, 15, 16, 17]]

def test_an_int_temperature_is_a_temperature(plus_one):
    # the docs' "temperature = 0 is greedy", as users write it: an int where a float is asked
    seq = torch.tensor([[10, 11, 12]])
    assert torch.equal(plus_one.generate(seq, seq_len = 8, temperature = 0), plus_one.generate(seq, seq_len = 8, temperature = 0.))

    with pytest.raises(TypeError, match = 'temperature'):
        plus_one.generate(seq, seq_len = 8, temperature = '0')

def test_eos_ends_a_row_with_padding_and_stops_when_all_rows_are_done(plus_one):
    steps = []
    new = plus_one.generate(
        [torch.tensor([10, 11, 12]), torch.tensor([20])],
        max_new_tokens = 30,
        temperature = 0.,
        eos_id = 24,
        pad_id = 0,
        filter_fn = lambda logits: steps.append(logits) or logits
    )

    assert new.shape == (2, 30)
    assert new[0, :12].tolist() == list(range(13, 25)) and (new[0, 12:] == 0).all()
    assert new[1, :4].tolist() == [21, 22, 23, 24] and (new[1, 4:] == 0).all()
    assert len(steps) == 12  # stopped after the last row's eos, not after 30 steps

def test_top_k_top_p_min_p_keep_what_they_define():
    from calm_pytorch.generation.sampling import min_p_filter, top_k_filter, top_p_filter

    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logits = probs.log()
    kept = lambda filtered: torch.isfinite(filtered)[0].tolist()

    assert kept(top_k_filter(logits, 2)) == [True, True, False, False, False]
    assert kept(top_p_filter(logits, 0.7)) == [True, True, False, False, False]    # 0.5 + 0.2 reaches 0.7
    assert kept(top_p_filter(logits, 0.71)) == [True, True, True, False, False]
    assert kept(top_p_filter(logits, 0.5)) == [True, False, False, False, False]
    assert kept(min_p_filter(logits, 0.3)) == [True, True, True, False, False]     # p >= 0.3 * 0.5
    assert kept(min_p_filter(logits, 0.)) == [True] * 5

def test_sampling_is_softmax_of_tempered_filtered_logits():
    from calm_pytorch.generation.sampling import sample

    logits = torch.tensor([[2., 1., 0.5, -1.]]).repeat(4000, 1)

    assert (sample(logits, temperature = 0.) == 0).all()

    for temperature in (0.5, 2.):
        torch.manual_seed(0)
        drawn = sample(logits, temperature = temperature)
        frequencies = torch.bincount(drawn, minlength = 4).float() / len(drawn)
        assert torch.allclose(frequencies, (logits[0] / temperature).softmax(-1), atol = 0.03)

    # temperature comes first: at a high temperature top_p keeps more tokens
    torch.manual_seed(0)
    assert set(sample(logits, temperature = 0.25, top_p = 0.9).tolist()) == {0}
    assert set(sample(logits, temperature = 4., top_p = 0.9).tolist()) == {0, 1, 2, 3}
    assert set(sample(logits, top_k = 2).tolist()) == {0, 1}

def test_a_tiny_temperature_draws_the_argmax():
    # logits / 1e-40 overflow (positive ones to inf, a row of negative ones all to -inf), which
    # gave nan probabilities; the limit a temperature tends to is the argmax, ties drawn evenly
    from calm_pytorch.generation.sampling import sample

    logits = torch.tensor([[2., 1., 0.5, -1.], [-3., -2., -2.5, -4.], [1., 3., 3., 0.]]).repeat(1000, 1)

    for temperature in (1e-40, 5e-324):
        torch.manual_seed(0)
        drawn = sample(logits, temperature = temperature).view(1000, 3)
        assert (drawn[:, 0] == 0).all() and (drawn[:, 1] == 1).all()
        assert set(drawn[:, 2].tolist()) == {1, 2}

    # rows that do not overflow are tempered as they always were, draw for draw
    torch.manual_seed(0)
    drawn = sample(logits, temperature = 0.7)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.multinomial((logits / 0.7).softmax(dim = -1), 1).squeeze(-1))

def test_generate_checks_its_arguments(plus_one):
    prompt = torch.tensor([[10, 11, 12]])

    with pytest.raises(ValueError, match = 'exactly one'):
        plus_one.generate(prompt, seq_len = 8, max_new_tokens = 2)

    with pytest.raises(ValueError, match = 'temperature'):
        plus_one.generate(prompt, max_new_tokens = 2, temperature = -1.)

    with pytest.raises(ValueError, match = 'top_p'):
        plus_one.generate(prompt, max_new_tokens = 2, top_p = 0.)

    with pytest.raises(ValueError, match = 'max_seq_len'):
        composition(1).generate(tokens(1, 60), max_new_tokens = 10)

# 4. context keys and values are projected once per call

@pytest.mark.parametrize('num_new', [3, 9])
def test_context_is_projected_once_per_generate_call(monkeypatch, num_new):
    calm = composition(2)
    calls = []
    remember = CrossAttentionBlock.remember
    monkeypatch.setattr(CrossAttentionBlock, 'remember', lambda self, context, folded = None: calls.append(tuple(context.shape)) or remember(self, context, folded))

    calm.generate(tokens(2, 5), max_new_tokens = num_new, prompt = tokens(2, 7))
    assert len(calls) == sum(len(blocks) for blocks in calm.cross_attns)  # one per cross-attention, not per token

    # aligned mode projects each new augment position once: the prompt, then one position per step
    calls.clear()
    calm.generate(tokens(2, 5), max_new_tokens = num_new)
    num_blocks = sum(len(blocks) for blocks in calm.cross_attns)
    assert [shape[1] for shape in calls] == [5] * num_blocks + [1] * num_blocks * (num_new - 1)

# 5. aligned generation sees no later augment position: the full forward gives the same logits

@pytest.mark.parametrize('mode', ['aligned', 'context'])
def test_step_logits_equal_the_full_composition_forward(mode):
    calm = composition(2)
    prompt, kwargs = tokens(2, 4), mode_kwargs(mode)

    new, step_logits = generate_with_logits(calm, prompt, max_new_tokens = 10, **kwargs)
    seq = torch.cat((prompt, new), dim = -1)

    forward_kwargs = dict(prompt = kwargs['prompt']) if mode == 'context' else dict()
    logits = calm(seq[:, :-1], return_loss = False, **forward_kwargs)

    assert torch.allclose(step_logits, logits[:, 3:], atol = 1e-5)

# 7. generate's names agree with the forward's; the names of 0.1.0 still work, with a FutureWarning

def test_generate_names_the_anchor_tokens_seq_and_the_augments_input_prompt():
    calm = composition(1)
    padded, document = tokens(2, 5), tokens(2, 7)
    mask = torch.ones_like(padded, dtype = torch.bool)
    mask[1, :2] = False
    document_mask = torch.ones_like(document, dtype = torch.bool)
    document_mask[0, 5:] = False

    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the new names warn nothing
        new = calm.generate(padded, mask = mask, prompt = document, prompt_mask = document_mask, max_new_tokens = 4, temperature = 0.)
        aligned = calm.generate(seq = padded, mask = mask, max_new_tokens = 4, temperature = 0.)

    old_calls = [
        lambda: calm.generate(padded, prompt_mask = mask, augment_prompt = document, augment_prompt_mask = document_mask, max_new_tokens = 4, temperature = 0.),
        lambda: calm.generate(prompt = padded, prompt_mask = mask, augment_prompt = document, augment_prompt_mask = document_mask, max_new_tokens = 4, temperature = 0.),
    ]

    for old in old_calls:
        with pytest.warns(FutureWarning, match = r'renamed.*`seq` and `mask` \(were `prompt` and `prompt_mask`\).*`augment_prompt`'):
            assert torch.equal(old(), new)

    with pytest.warns(FutureWarning, match = 'renamed'):
        assert torch.equal(calm.generate(padded, prompt_mask = mask, max_new_tokens = 4, temperature = 0.), aligned)

    with pytest.raises(TypeError, match = r"the anchor's tokens are `seq` and the augments' input `prompt`"):
        calm.generate(padded, prompt = document, augment_prompt = document, max_new_tokens = 4)

    with pytest.raises(TypeError, match = r"needs the anchor's tokens"):
        calm.generate(max_new_tokens = 4)

# what a user hands generate is checked where it would otherwise decide tokens silently

def test_what_filter_fn_returns_is_checked():
    calm = composition(1)
    seq = tokens(length = 6)
    generate = lambda filter_fn, **kwargs: calm.generate(seq, max_new_tokens = 3, filter_fn = filter_fn, **kwargs)

    # one row for the batch would be broadcast to every row; a wider row gives ids past the vocabulary
    for wrong in (lambda logits: logits[0], lambda logits: torch.cat((logits, logits[:, :1]), dim = -1), lambda logits: logits.argmax(-1)):
        with pytest.raises(ValueError, match = r'`filter_fn` must return float logits of the shape it was given, \(2, 256\)'):
            generate(wrong, temperature = 0.)

    no_token = lambda logits: torch.full_like(logits, float('-inf'))
    with_nan = lambda logits: logits.index_fill(-1, torch.tensor([5]), float('nan'))

    for unsound in (no_token, with_nan):
        for temperature in (0., 1.):
            with pytest.raises(ValueError, match = r'`filter_fn` returned logits with a nan, or with every token at -inf, in row\(s\) \[0, 1\]'):
                generate(unsound, temperature = temperature)

    only_five = lambda logits: torch.full_like(logits, float('-inf')).index_fill(-1, torch.tensor([5]), 0.)
    assert (generate(only_five, temperature = 1.) == 5).all()

def test_an_eos_id_outside_the_vocabulary_is_refused():
    calm = composition(1)

    for eos_id in (-1, NUM_TOKENS):
        with pytest.raises(ValueError, match = rf'`eos_id` {eos_id} is outside the anchor\'s vocabulary of {NUM_TOKENS} tokens'):
            calm.generate(tokens(), max_new_tokens = 2, eos_id = eos_id)

def test_bools_are_not_sampling_settings():
    calm = composition(1)

    for setting in ('temperature', 'top_k', 'top_p', 'min_p'):
        with pytest.raises(TypeError, match = f'`{setting}` must be a number, got True'):
            calm.generate(tokens(), max_new_tokens = 2, **{setting: True})

def test_a_batch_of_no_rows_gives_no_rows_whatever_the_anchor():
    # transformers models refuse a batch of none; x-transformers ones take it
    for anchor in (decoder(dim = 32, depth = 2), llama(depth = 2)):
        calm = untrained_away(CALM(anchor, AugmentParams(model = decoder(dim = 24, depth = 2))))
        empty = torch.zeros((0, 5), dtype = torch.long)

        for use_cache in (True, False):
            assert calm.generate(empty, max_new_tokens = 3, use_cache = use_cache, pad_id = 7).shape == (0, 3)
