from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import decoder, tokens
from x_transformers import Decoder, TransformerWrapper

from calm_pytorch import CALM, AugmentParams

ATTN = dict(heads = 2, dim_head = 16)

def compose(**kwargs) -> CALM:
    calm = CALM(decoder(dim = 32, depth = 2), AugmentParams(model = decoder(dim = 24, depth = 4)), attn_kwargs = kwargs.pop('attn_kwargs', ATTN), **kwargs)

    # random output projections: every composition weight then takes part in the loss
    with torch.no_grad():
        for param in calm.cross_attns.parameters():
            param.normal_(std = 0.2)

    return calm

# a batch without any label to learn from

def no_labels(calm: CALM, case: str) -> dict:
    seq = tokens(batch = 2, length = 8)

    if case == 'mask all False':
        return dict(seq = seq, mask = torch.zeros_like(seq, dtype = torch.bool))

    if case == 'every label is pad_id':
        seq[:, 1:] = calm.pad_id
        return dict(seq = seq)

    return dict(seq = seq[:0])

@pytest.mark.parametrize('case', ['mask all False', 'every label is pad_id', 'batch of size 0'])
def test_a_batch_without_labels_gives_a_zero_loss_with_zero_gradients(case):
    calm = compose(pad_id = 0)
    loss = calm(**no_labels(calm, case))

    assert torch.equal(loss, torch.tensor(0.))
    assert loss.requires_grad

    loss.backward()

    grads = [param.grad for param in calm.cross_attns.parameters()]
    assert all(grad is not None and not grad.any() for grad in grads)

def test_the_loss_of_a_partly_masked_batch_is_still_the_mean_over_its_labels():
    calm = compose()
    seq = tokens(batch = 2, length = 8)
    mask = torch.ones_like(seq, dtype = torch.bool)
    mask[0, 5:] = False

    logits = calm(seq[:, :-1], mask = mask[:, :-1], return_loss = False)
    labels = seq[:, 1:].masked_fill(~mask[:, 1:], -100)
    expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index = -100)

    assert torch.allclose(calm(seq, mask = mask), expected, atol = 1e-6)

# attn_kwargs

@pytest.mark.parametrize('attn_kwargs, error, message', [
    (dict(heads = 0, dim_head = 16), ValueError, r"`attn_kwargs\['heads'\]` must be a positive int, got 0"),
    (dict(heads = 2, dim_head = 0), ValueError, r"`attn_kwargs\['dim_head'\]` must be a positive int, got 0"),
    (dict(heads = -2, dim_head = 16), ValueError, r"`attn_kwargs\['heads'\]` must be a positive int, got -2"),
    (dict(heads = 2, dim_head = 16.), TypeError, r"`attn_kwargs\['dim_head'\]` must be a positive int, got 16.0 of type float"),
    (dict(heads = True, dim_head = 16), TypeError, r"`attn_kwargs\['heads'\]` must be a positive int, got True of type bool"),
    (dict(heads = '2', dim_head = 16), TypeError, r"got '2' of type str"),
    (dict(heads = 2, dim_heads = 16), TypeError, r"`attn_kwargs` takes \('heads', 'dim_head'\), got unknown key\(s\) \['dim_heads'\]"),
])
def test_bad_attn_kwargs_are_refused_at_construction(attn_kwargs, error, message):
    with pytest.raises(error, match = message):
        compose(attn_kwargs = attn_kwargs)

def test_numpy_integers_and_one_key_are_fine_in_attn_kwargs():
    calm = compose(attn_kwargs = dict(heads = np.int64(4)))
    block = calm.cross_attns[0][0]

    assert type(block.heads) is int and block.heads == 4
    assert block.to_q.out_features == 4 * 64  # dim_head keeps its default

# sampling

@pytest.mark.parametrize('temperature', [float('nan'), float('inf'), -1.])
def test_temperature_must_be_finite_and_not_negative(temperature):
    calm = compose()

    with pytest.raises(ValueError, match = r'`temperature` must be a finite number >= 0 \(0 is greedy\), got'):
        calm.generate(tokens(length = 4), max_new_tokens = 2, temperature = temperature)

# token ids outside the vocabulary

def out_of_range(vocab: int, value: str, length: int = 6) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, length))
    ids[1, 3] = vocab if value == 'too large' else -1
    return ids

def test_vocab_sizes_are_learned_from_the_models():
    from hf_models import VOCAB, gpt2

    from calm_pytorch.models.factory import make_adapter

    assert make_adapter(decoder(), name = 'x').vocab_size == 256
    assert make_adapter(gpt2(), name = 'x').vocab_size == VOCAB
    generic = nn_model()
    assert make_adapter(generic, name = 'x', blocks = generic.blocks).vocab_size is None  # unknown: unchecked

def nn_model():
    from conftest import TupleModel
    return TupleModel()

@pytest.mark.parametrize('value', ['too large', 'negative'])
def test_out_of_range_ids_are_named_for_an_x_transformers_composition(value):
    calm = compose()
    seq = out_of_range(256, value)
    bad = 256 if value == 'too large' else -1
    message = rf'holds the token id {bad}, outside the vocabulary of .* \(TransformerWrapper\), whose 256 tokens have ids 0 to 255'

    with pytest.raises(ValueError, match = r'`seq` ' + message):
        calm(seq)

    with pytest.raises(ValueError, match = r'`seq` ' + message):
        calm(seq, return_loss = False)

    with pytest.raises(ValueError, match = r'`prompt` ' + message):
        calm(tokens(), prompt = seq)

    with pytest.raises(ValueError, match = r'`prompt\[0\]` ' + message):
        calm(tokens(), prompt = [seq])

    with pytest.raises(ValueError, match = r'`seq` ' + message):
        calm.generate(seq, max_new_tokens = 2)

    # the padding of a masked generate prompt is never read, its real positions are
    padded = torch.cat([torch.full((2, 2), -1), seq], dim = -1)
    with pytest.raises(ValueError, match = r'`seq` ' + message):
        calm.generate(padded, mask = torch.arange(padded.shape[-1]).expand_as(padded) >= 2, max_new_tokens = 2)

    with pytest.raises(ValueError, match = r'`prompt` ' + message):
        calm.generate(tokens(length = 4), max_new_tokens = 2, prompt = seq)

    with pytest.raises(ValueError, match = r'`prompt\[0\]` ' + message):
        with calm.composed(seq):
            pass

def test_out_of_range_ids_are_named_for_hugging_face_models():
    from hf_models import VOCAB, gpt2, llama

    anchor, augment = llama(), gpt2()
    calm = CALM(anchor, AugmentParams(model = augment), attn_kwargs = ATTN)
    seq = out_of_range(VOCAB, 'too large')

    with pytest.raises(ValueError, match = rf'`seq` holds the token id {VOCAB}, outside the vocabulary of anchor_llm \(LlamaForCausalLM\), whose {VOCAB} tokens'):
        calm(seq)

    with pytest.raises(ValueError, match = rf'`prompt` holds the token id {VOCAB}, outside the vocabulary of augment_llms\[0\] \(GPT2LMHeadModel\)'):
        calm(torch.randint(0, VOCAB, (2, 6)), prompt = seq)

    with pytest.raises(ValueError, match = rf'`seq` holds the token id {VOCAB}, outside the vocabulary of anchor_llm'):
        calm.generate(seq, max_new_tokens = 2)

    # in range: composes as before
    assert calm(torch.randint(0, VOCAB, (2, 6))).isfinite()

def test_a_generic_anchor_is_not_checked_but_an_aligned_augment_with_a_vocabulary_is():
    model = nn_model()
    calm = CALM(model, AugmentParams(model = decoder(dim = 24, depth = 4)), anchor_transformer_blocks = model.blocks, attn_kwargs = ATTN)

    # the anchor's own table is larger than the augment's: the augment's check names the id
    model.emb = torch.nn.Embedding(512, 16)
    seq = tokens()
    seq[0, 2] = 300

    with pytest.raises(ValueError, match = r'`seq` holds the token id 300, outside the vocabulary of augment_llms\[0\]'):
        calm(seq)

# an aligned augment over another vocabulary

def mismatched(**params) -> CALM:
    anchor = decoder(dim = 32, depth = 2)
    augment = TransformerWrapper(num_tokens = 512, max_seq_len = 64, attn_layers = Decoder(dim = 24, depth = 4, heads = 2, attn_dim_head = 16))
    return CALM(anchor, AugmentParams(model = augment, **params), attn_kwargs = ATTN)

def test_an_aligned_augment_over_another_vocabulary_is_refused_on_its_first_aligned_call():
    calm = mismatched()  # construction is fine: the augment may be used in context mode
    message = (
        r'augment 0 \(TransformerWrapper\) has a vocabulary of 512 tokens, the anchor \(TransformerWrapper\) 256\. '
        r"In aligned mode \(no prompt\) the augment reads the anchor's token ids, which means one tokenizer for both\. "
        r'Give the augment the text in its own tokens as `prompt=` \(context mode\)'
    )

    with pytest.raises(ValueError, match = message):
        calm(tokens())

    with pytest.raises(ValueError, match = message):
        calm.generate(tokens(length = 4), max_new_tokens = 2)

    # context mode reads the augment's own tokens, ids of its own vocabulary included
    document = torch.randint(0, 512, (2, 10))
    assert calm(tokens(), prompt = document).isfinite()
    assert calm.generate(tokens(length = 4), max_new_tokens = 2, prompt = document).shape == (2, 2)

    with calm.composed(document) as anchor:
        anchor(tokens())

def test_same_tokenizer_declares_tables_of_different_sizes_fine():
    calm = mismatched(same_tokenizer = True)
    seq = tokens()

    assert calm(seq).isfinite()
    assert calm.generate(seq[:, :4], max_new_tokens = 2).shape == (2, 2)
