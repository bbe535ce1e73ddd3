from __future__ import annotations

import pytest
import torch
import transformers

from calm_pytorch import CALM, AugmentParams

# a context augment's padding, on either side, must not move the positions its real tokens are
# read at: RoBERTa's kin count learned positions after their pad id, BART's encoder from its first
# position, whatever the mask says

ENCODERS = {
    'roberta': lambda: transformers.RobertaModel(transformers.RobertaConfig(vocab_size = 128, hidden_size = 16, num_hidden_layers = 2, num_attention_heads = 2, intermediate_size = 32, max_position_embeddings = 72, pad_token_id = 1)),
    'mpnet': lambda: transformers.MPNetModel(transformers.MPNetConfig(vocab_size = 128, hidden_size = 16, num_hidden_layers = 2, num_attention_heads = 2, intermediate_size = 32, max_position_embeddings = 72, pad_token_id = 1)),
}

def composed(encoder) -> CALM:
    torch.manual_seed(0)
    anchor = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size = 128, hidden_size = 32, intermediate_size = 64, num_hidden_layers = 2, num_attention_heads = 2, num_key_value_heads = 1))
    calm = CALM(anchor, AugmentParams(model = encoder, connections = ((2, 2),)), attn_kwargs = dict(heads = 2, dim_head = 8))

    with torch.no_grad():
        for param in calm.cross_attns.parameters():
            param.normal_(std = 0.3)

    return calm.eval()

def batch_and_alone():
    seq, document = torch.randint(3, 128, (2, 6)), torch.randint(3, 128, (2, 10))  # the padding holds no pad id
    mask = torch.ones_like(document, dtype = torch.bool)
    mask[1, :4] = False
    return seq, document, mask

@pytest.mark.parametrize('family', ENCODERS)
def test_a_left_padded_prompt_reads_as_alone(family):
    calm = composed(ENCODERS[family]())
    seq, document, mask = batch_and_alone()

    batch = calm(seq, prompt = document, prompt_mask = mask, return_loss = False)
    alone = calm(seq[1:], prompt = document[1:, 4:], return_loss = False)
    assert torch.allclose(batch[1], alone[0], atol = 1e-5)

    # no padding: the positions the model counts itself, exactly
    assert torch.equal(calm(seq, prompt = document, return_loss = False), calm(seq, prompt = document, prompt_mask = torch.ones_like(mask), return_loss = False))

def test_an_augment_taking_no_positions_refuses_left_padding():
    bart = transformers.BartModel(transformers.BartConfig(
        vocab_size = 128, d_model = 16, encoder_layers = 2, decoder_layers = 2, encoder_attention_heads = 2, decoder_attention_heads = 2,
        encoder_ffn_dim = 32, decoder_ffn_dim = 32, max_position_embeddings = 64, pad_token_id = 0, bos_token_id = 1, eos_token_id = 2
    ))
    calm = composed(bart)
    seq, document, mask = batch_and_alone()

    with pytest.raises(ValueError, match = r'augment_llms\[0\] \(BartModel\) has padding before real tokens'):
        calm(seq, prompt = document, prompt_mask = mask, return_loss = False)

    right = mask.flip(-1)
    batch = calm(seq, prompt = document.flip(-1), prompt_mask = right, return_loss = False)
    assert torch.allclose(batch[1], calm(seq[1:], prompt = document.flip(-1)[1:, :6], return_loss = False)[0], atol = 1e-5)

def test_a_roberta_decoder_generates_what_its_forward_gives():
    # decoding passed positions from 0 to a model that counts them after its pad id: cached and
    # recomputed generation both read other positions than the forward
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size = 128, hidden_size = 32, num_hidden_layers = 2, num_attention_heads = 2, intermediate_size = 64, max_position_embeddings = 72, pad_token_id = 1, is_decoder = True)
    augment = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size = 128, hidden_size = 32, intermediate_size = 64, num_hidden_layers = 2, num_attention_heads = 2, num_key_value_heads = 1))
    calm = CALM(transformers.RobertaForCausalLM(config), AugmentParams(model = augment, connections = ((1, 1),)), attn_kwargs = dict(heads = 2, dim_head = 8)).eval()
    prompt = torch.randint(3, 128, (1, 6))

    seq = prompt
    for _ in range(5):
        seq = torch.cat((seq, calm(seq, return_loss = False)[:, -1].argmax(dim = -1, keepdim = True)), dim = -1)

    for use_cache in (True, False):
        assert torch.equal(calm.generate(prompt, max_new_tokens = 5, temperature = 0., use_cache = use_cache), seq[:, 6:])
