from __future__ import annotations

import os

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from text_tokenizers import ALPHABET, across_spaces_bpe, byte_bpe, wordpiece
from torch import nn
from x_transformers import Decoder, TransformerWrapper

from calm_pytorch import CALM, AugmentParams, FineTuner
from calm_pytorch.generation import text_stream
from calm_pytorch.text.alignment import align, common_prefix_len
from calm_pytorch.text.commit import committed_text
from calm_pytorch.text.tokenizers import AnchorText, AugmentText

# aligned mode across tokenizers: the anchor (a byte-level BPE) and an augment with its own
# tokenizer read the same text; anchor position i sees the augment's reading of the committed
# text of its own prefix, so nothing it has not read can leak

MAX_EXAMPLES = int(os.environ.get('CALM_PROPERTY_EXAMPLES', 25))
PROPERTY = settings(max_examples = MAX_EXAMPLES, deadline = None, suppress_health_check = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

AUGMENT_TOKENIZERS = {'wordpiece': wordpiece, 'across_spaces': across_spaces_bpe}

texts = st.text(alphabet = st.sampled_from([*ALPHABET, '東', '😀', ' ', ' ']), min_size = 1, max_size = 40)

def xt_decoder(num_tokens: int, dim: int, depth: int = 2) -> TransformerWrapper:
    return TransformerWrapper(num_tokens = num_tokens, max_seq_len = 256, attn_layers = Decoder(dim = dim, depth = depth, heads = 2, attn_dim_head = 16))

def hf_decoder(num_tokens: int, dim: int, depth: int = 2):
    config = transformers.LlamaConfig(vocab_size = num_tokens, hidden_size = dim, num_hidden_layers = depth, num_attention_heads = 2, num_key_value_heads = 1, intermediate_size = 2 * dim, max_position_embeddings = 256)
    return transformers.LlamaForCausalLM(config).eval()

def trained(calm: CALM) -> CALM:
    # nonzero output projections: an untrained composition is the anchor itself
    for param in calm.cross_attns.parameters():
        if param.ndim == 2:
            nn.init.normal_(param, std = 0.2)

    return calm.eval()

def composition(augment_tokenizer, augment_family: str = 'xt', anchor_family: str = 'xt', seed: int = 0) -> CALM:
    torch.manual_seed(seed)
    build = {'xt': xt_decoder, 'hf': hf_decoder}
    anchor = build[anchor_family](len(byte_bpe()), 32)
    augment = build[augment_family](len(augment_tokenizer), 24)
    params = AugmentParams(model = augment, tokenizer = augment_tokenizer, connect_every_num_layers = 1)
    return trained(CALM(anchor, params, anchor_tokenizer = byte_bpe(), attn_kwargs = dict(heads = 2, dim_head = 16)))

def ids(text: str) -> torch.Tensor:
    return torch.tensor([byte_bpe()(text)['input_ids']])

# the rule

def test_committed_text_stops_before_the_piece_being_read():
    assert committed_text('then the') == 'then'
    assert committed_text('then the ') == 'then the'
    assert committed_text('a_b, x-y') == 'a_b, x-'       # a piece: word characters, or other non-space characters
    assert committed_text('there �') == 'there'           # an incomplete UTF-8 character is not text yet
    assert committed_text('word') == ''

def test_each_position_sees_the_augment_reading_of_its_committed_prefix():
    anchor_tokens = byte_bpe()('then the cat')['input_ids']
    assert byte_bpe().convert_ids_to_tokens(anchor_tokens) == ['the', 'n', 'Ġthe', 'Ġ', 'cat']

    alignment = align(torch.tensor([anchor_tokens]), None, AnchorText(byte_bpe()), AugmentText(wordpiece(), 'augment'))
    augment_tokens = wordpiece().convert_ids_to_tokens(alignment.ids[0].tolist())

    # the augment reads [CLS] then the (the committed text of the last position), not the [SEP] after it
    assert augment_tokens == ['[CLS]', 'then', 'the']
    assert alignment.visible[0].sum(-1).tolist() == [1, 1, 2, 3, 3]  # "", "", "then", "then the", "then the"

def test_a_tokenizer_reading_across_words_gets_its_own_run_where_it_re_tokenized():
    # this BPE merges across spaces: the committed text "the cat sat on" reads " on" differently
    # once " the" follows, so the position that read it sees its own run, exactly
    text = 'the cat sat on the mat, and'
    alignment = align(ids(text), None, AnchorText(byte_bpe()), AugmentText(across_spaces_bpe(), 'augment'))
    assert alignment.runs > 1

    augment = AugmentText(across_spaces_bpe(), 'augment')
    anchor_tokens = ids(text)[0].tolist()

    for position in range(len(anchor_tokens)):
        prefix_text = committed_text(byte_bpe().decode(anchor_tokens[:position + 1]))
        expected = augment.encode_batch([prefix_text])[0]
        seen = alignment.ids[alignment.visible[0, position].nonzero().squeeze(-1) // alignment.ids.shape[-1], alignment.visible[0, position].nonzero().squeeze(-1) % alignment.ids.shape[-1]]
        assert seen.tolist() == expected

# forward

@pytest.mark.parametrize('augment_tokenizer', AUGMENT_TOKENIZERS)
@PROPERTY
@given(text = texts, cut = st.floats(0., 1.), other = texts)
def test_nothing_after_a_position_leaks_into_it(augment_tokenizer, text, cut, other):
    calm = composition(AUGMENT_TOKENIZERS[augment_tokenizer]())
    tokens = ids(text + other)
    last = int(cut * (tokens.shape[-1] - 1))  # the positions <= last keep their tokens

    perturbed = torch.cat((tokens[:, :last + 1], ids(other[::-1] + text)), dim = -1)[:, :tokens.shape[-1] + 3]

    with torch.no_grad():
        logits, perturbed_logits = (calm(seq, return_loss = False) for seq in (tokens, perturbed))

    assert torch.allclose(logits[:, :last + 1], perturbed_logits[:, :last + 1], atol = 1e-5)

@pytest.mark.parametrize('augment_tokenizer', AUGMENT_TOKENIZERS)
def test_the_augment_changes_the_logits_once_text_is_committed(augment_tokenizer):
    calm = composition(AUGMENT_TOKENIZERS[augment_tokenizer]())
    tokens = ids('the cat sat on the mat')

    with torch.no_grad():
        composed = calm(tokens, return_loss = False)
        alone = calm.anchor(tokens)

    assert not torch.allclose(composed, alone, atol = 1e-3)

@PROPERTY
@given(text = texts)
def test_same_tokenizer_equals_token_aligned_mode(text):
    tokens = ids(text)
    logits = []

    for tokenizers in ((None, None), (byte_bpe(), byte_bpe())):
        torch.manual_seed(0)
        anchor, augment = xt_decoder(len(byte_bpe()), 32), xt_decoder(len(byte_bpe()), 24)
        calm = trained(CALM(anchor, AugmentParams(model = augment, tokenizer = tokenizers[1]), anchor_tokenizer = tokenizers[0], attn_kwargs = dict(heads = 2, dim_head = 16)))

        with torch.no_grad():
            logits.append(calm(tokens, return_loss = False))

    assert torch.equal(*logits)

@pytest.mark.parametrize('augment_tokenizer', AUGMENT_TOKENIZERS)
@PROPERTY
@given(rows = st.lists(texts, min_size = 2, max_size = 3))
def test_padded_batch_equals_each_row_alone(augment_tokenizer, rows):
    # right-padded, as in training (left-padded batches are generation's, tested there)
    calm = composition(AUGMENT_TOKENIZERS[augment_tokenizer]())
    sequences = [ids(text)[0] for text in rows]
    length = max(len(seq) for seq in sequences)

    def pad(seq, value):
        padding = torch.full((length - len(seq),), value, dtype = seq.dtype)
        return torch.cat((seq, padding))

    batch = torch.stack([pad(seq, 0) for seq in sequences])
    mask = torch.stack([pad(torch.ones_like(seq, dtype = torch.bool), False) for seq in sequences])

    with torch.no_grad():
        logits = calm(batch, mask = mask, return_loss = False)

        for row, seq in enumerate(sequences):
            alone = calm(seq[None], return_loss = False)[0]
            assert torch.allclose(logits[row][mask[row]], alone, atol = 1e-5)

def test_training_reaches_the_composition_only():
    calm = composition(wordpiece())
    frozen = {name: param.clone() for name, param in calm.named_parameters() if not param.requires_grad}
    optimizer = torch.optim.AdamW([param for param in calm.parameters() if param.requires_grad], lr = 1e-2)

    tokens = torch.cat([ids('the cat sat on the mat, and there the dog saw it.')] * 2)
    mask = torch.ones_like(tokens, dtype = torch.bool)
    mask[1, -5:] = False
    losses = []

    for _ in range(3):
        loss = calm(tokens, mask = mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())

    assert losses[-1] < losses[0]
    assert all(torch.equal(param, frozen[name]) for name, param in calm.named_parameters() if not param.requires_grad)

def test_finetuner_trains_a_cross_tokenizer_composition():
    calm = composition(wordpiece())
    before = {key: tensor.clone() for key, tensor in calm.composition_state_dict().items()}
    frozen = {key: tensor.clone() for key, tensor in calm.state_dict().items() if not key.startswith('cross_attns.')}

    texts = ['the cat sat on the mat, and', 'then they went there together;', 'the other one stayed at home.', 'numbers like 12 and 345 are']
    data = []
    for text in texts:
        tokens = ids(text)[0][:8]
        data.append(dict(seq = torch.nn.functional.pad(tokens, (0, 8 - len(tokens))), mask = torch.arange(8) < len(tokens)))

    FineTuner(calm, data, num_train_steps = 3, batch_size = 2, learning_rate = 1e-2, progress = False, device = 'cpu').train()

    after = calm.composition_state_dict()
    assert any(not torch.equal(before[key], after[key]) for key in before)
    assert all(torch.equal(tensor, frozen[key]) for key, tensor in calm.state_dict().items() if key in frozen)

def test_an_augment_tokenizer_needs_the_anchor_tokenizer():
    anchor, augment = xt_decoder(len(byte_bpe()), 32), xt_decoder(len(wordpiece()), 24)

    with pytest.raises(ValueError, match = 'anchor_tokenizer'):
        CALM(anchor, AugmentParams(model = augment, tokenizer = wordpiece()))

def test_augments_with_and_without_a_tokenizer_mix():
    torch.manual_seed(0)
    anchor = xt_decoder(len(byte_bpe()), 32)
    params = [
        AugmentParams(model = xt_decoder(len(wordpiece()), 24), tokenizer = wordpiece()),
        AugmentParams(model = xt_decoder(len(byte_bpe()), 16)),                      # reads the anchor's ids
        AugmentParams(model = xt_decoder(len(across_spaces_bpe()), 16)),             # context mode: its own tokens
    ]
    calm = trained(CALM(anchor, params, anchor_tokenizer = byte_bpe(), attn_kwargs = dict(heads = 2, dim_head = 16)))
    document = torch.tensor([across_spaces_bpe()('the mat and the dog')['input_ids']])

    seq = ids('the cat sat on the mat')
    with torch.no_grad():
        logits = calm(seq, prompt = [None, None, document], return_loss = False)

    assert logits.shape == (1, seq.shape[-1], len(byte_bpe()))

    cached = calm.generate(seq, max_new_tokens = 6, temperature = 0., prompt = [None, None, document])
    uncached = calm.generate(seq, max_new_tokens = 6, temperature = 0., prompt = [None, None, document], use_cache = False)
    assert torch.equal(cached, uncached)

# generation

def step_logits(calm, prompt, forced = None, **kwargs):
    # the logits of every step, read through filter_fn (temperature 0 shows the raw logits);
    # `forced` (b, n) makes step t choose forced[:, t], to write a chosen text
    steps = []

    def read(logits):
        steps.append(logits)

        if forced is None:
            return logits

        return torch.full_like(logits, float('-inf')).scatter(-1, forced[:, len(steps) - 1:len(steps)], 0.)

    new = calm.generate(prompt, temperature = 0., filter_fn = read, **kwargs)
    return new, steps

CONTINUATIONS = ([' the mat, and there the dog saw it.', 'ere the other one stayed at'], None)

@pytest.mark.parametrize('continuations', CONTINUATIONS, ids = ('written', 'sampled'))
@pytest.mark.parametrize('augment_family', ('xt', 'hf'))
@pytest.mark.parametrize('augment_tokenizer', AUGMENT_TOKENIZERS)
def test_cached_generation_equals_uncached_and_the_forward_at_every_step(augment_tokenizer, augment_family, continuations, monkeypatch):
    calm = composition(AUGMENT_TOKENIZERS[augment_tokenizer](), augment_family = augment_family)
    prompts = [ids('the cat sat on')[0], ids('then they went th')[0]]  # different lengths: left-padded

    forced = None

    if continuations is not None:
        forced = [ids(text)[0] for text in continuations]
        length = min(len(tokens) for tokens in forced)
        forced = torch.stack([tokens[:length] for tokens in forced])

    num_new = forced.shape[-1] if forced is not None else 24

    # tokens of the augment's cache that a row no longer shares (re-tokenized text), per step
    dropped = []

    def prefix_len(tokens, target):
        keep = common_prefix_len(tokens, target)
        dropped.append(len(tokens) - keep)
        return keep

    monkeypatch.setattr(text_stream, 'common_prefix_len', prefix_len)

    cached, cached_steps = step_logits(calm, prompts, forced, max_new_tokens = num_new)
    uncached, uncached_steps = step_logits(calm, prompts, forced, max_new_tokens = num_new, use_cache = False)

    assert torch.equal(cached, uncached)

    # every step's logits equal the whole composition recomputed on the text so far
    for row, prompt in enumerate(prompts):
        for step, logits in enumerate(cached_steps):
            seq = torch.cat((prompt, cached[row, :step]))[None]

            with torch.no_grad():
                expected = calm(seq, return_loss = False)[0, -1]

            assert torch.allclose(logits[row], expected, atol = 1e-5)
            assert torch.allclose(uncached_steps[step][row], expected, atol = 1e-5)

    if augment_tokenizer == 'across_spaces' and continuations is not None:
        assert max(dropped) > 0  # the augment's cache was rolled back where the text was re-tokenized

def test_another_vocabulary_without_tokenizers_points_to_them():
    calm = CALM(xt_decoder(len(byte_bpe()), 32), AugmentParams(model = xt_decoder(len(wordpiece()), 24)))

    with pytest.raises(ValueError, match = r'AugmentParams\(tokenizer = augment_tokenizer\) and CALM\(\.\.\., anchor_tokenizer = anchor_tokenizer\)'):
        calm(ids('the cat'))
