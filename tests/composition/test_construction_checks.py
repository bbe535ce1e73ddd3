from __future__ import annotations

import pytest
import torch
import transformers
from conftest import NUM_TOKENS, decoder, encoder, tokens
from hf_models import LLAMA_LIKE, VOCAB

from calm_pytorch import CALM, AugmentParams

# what construction finds out about the models and refuses, before a wrong result can be trained

def bert_for_masked_lm():
    return transformers.BertForMaskedLM(transformers.BertConfig(**{**LLAMA_LIKE, 'hidden_size': 16})).eval()

BIDIRECTIONAL_ANCHORS = {
    'xt_encoder': (lambda: encoder(dim = 32, depth = 2), NUM_TOKENS),
    'bert_for_masked_lm': (bert_for_masked_lm, VOCAB),
}

@pytest.mark.parametrize('anchor', BIDIRECTIONAL_ANCHORS)
def test_a_bidirectional_anchor_is_refused_for_next_token_training_and_generation(anchor):
    build, vocab = BIDIRECTIONAL_ANCHORS[anchor]
    calm = CALM(build(), decoder(dim = 24, depth = 2, num_tokens = vocab), attn_kwargs = dict(heads = 2, dim_head = 16))
    seq = torch.randint(0, vocab, (2, 8))

    with pytest.raises(ValueError, match = r'anchor .* is not causal.*bidirectional.*its next-token loss would see the token it predicts'):
        calm(seq)

    with pytest.raises(ValueError, match = r'not causal.*next-token loss'):
        calm(input_ids = seq, labels = seq)

    with pytest.raises(ValueError, match = r'not causal.*generation would see'):
        calm.generate(seq, max_new_tokens = 2)

    # its logits alone are no next-token prediction: still available
    assert calm(seq, return_loss = False).shape == (2, 8, vocab)

def test_a_causal_anchor_is_recorded_as_causal():
    calm = CALM(decoder(dim = 32, depth = 2), decoder(dim = 24, depth = 2), attn_kwargs = dict(heads = 2, dim_head = 16))
    assert calm.anchor_is_causal is True
    assert torch.isfinite(calm(tokens()))

# the automatic wiring's spacing

def test_a_spacing_deeper_than_the_augment_is_refused():
    with pytest.raises(ValueError, match = r'connect_every_num_layers = 8, but augment 0 has 6 layers.*at most 6.*connections = \(\(6, anchor_layer\),\)'):
        CALM(decoder(dim = 32, depth = 4), AugmentParams(model = decoder(dim = 24, depth = 6), connect_every_num_layers = 8))

    # a spacing the augment honours wires every n-th layer
    calm = CALM(decoder(dim = 32, depth = 4), AugmentParams(model = decoder(dim = 24, depth = 6), connect_every_num_layers = 3))
    assert calm.connections == (((3, 2), (6, 4)),)

def test_the_default_spacing_is_the_papers_and_feeds_a_shallow_augment_its_last_layer():
    deep = CALM(decoder(dim = 32, depth = 4), decoder(dim = 24, depth = 8))
    assert deep.connections == (((4, 2), (8, 4)),)

    shallow = CALM(decoder(dim = 32, depth = 4), decoder(dim = 24, depth = 2))
    assert shallow.connections == (((2, 4),),)

# a newcomer's mistakes: one line that says what was given, what is expected, and the fix

def test_a_hub_id_where_a_model_belongs_says_to_load_it_first():
    with pytest.raises(TypeError, match = r"^`anchor_llm` is 'HuggingFaceTB/SmolLM2-135M', a name or path.*AutoModelForCausalLM\.from_pretrained\('HuggingFaceTB/SmolLM2-135M'\)"):
        CALM('HuggingFaceTB/SmolLM2-135M', decoder(dim = 24, depth = 2))

    with pytest.raises(TypeError, match = r"^`augment_llms` is 'gpt2', a name or path.*Load it first"):
        CALM(decoder(dim = 32, depth = 2), 'gpt2')

    with pytest.raises(TypeError, match = r"^`augment_llms\[0\]\.model` is 'gpt2', a name or path"):
        CALM(decoder(dim = 32, depth = 2), AugmentParams(model = 'gpt2'))

def test_a_tokenizer_where_a_model_belongs_says_where_tokenizers_go():
    from text_tokenizers import byte_bpe

    with pytest.raises(TypeError, match = r'^`anchor_llm` is a tokenizer \(\w+\), where a model is expected.*anchor_tokenizer='):
        CALM(byte_bpe(), decoder(dim = 24, depth = 2))

    with pytest.raises(TypeError, match = r'^`augment_llms\[1\]` is a tokenizer.*AugmentParams\(model=\.\.\., tokenizer=\.\.\.\)'):
        CALM(decoder(dim = 32, depth = 2), [decoder(dim = 24, depth = 2), byte_bpe()])

@pytest.mark.parametrize('given, fix', [('bf16', 'torch.bfloat16'), ('fp16', 'torch.float16'), ('float32', 'torch.float32'), ('int8', 'a floating point torch.dtype')])
def test_a_composition_dtype_written_as_a_string_names_the_torch_dtype(given, fix):
    with pytest.raises(TypeError, match = rf"^`composition_dtype` is the string '{given}'.*write composition_dtype = {fix}"):
        CALM(decoder(dim = 32, depth = 2), decoder(dim = 24, depth = 2), composition_dtype = given)

def test_composed_without_a_prompt_shows_the_call():
    calm = CALM(decoder(dim = 32, depth = 2), decoder(dim = 24, depth = 2), attn_kwargs = dict(heads = 2, dim_head = 16))

    for call in (lambda: calm.composed(), lambda: calm.composed(None)):
        with pytest.raises(TypeError, match = r'^`composed\(\)` was given no prompt.*calm\.composed\(prompt = document\).*calm\.generate'):
            with call():
                pass
