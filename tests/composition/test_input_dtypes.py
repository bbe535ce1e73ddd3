from __future__ import annotations

import pytest
import torch
from conftest import decoder
from hf_models import VOCAB, gpt2, llama

from calm_pytorch import CALM

# token ids of any integer dtype (int32 from a tokenizer, uint8 / int16 from a compact dataset)
# compose exactly as torch.long ids do

ATTN = dict(heads = 2, dim_head = 8)

COMPOSITIONS = {
    'transformers': lambda: CALM(llama(), gpt2(), attn_kwargs = ATTN),
    'x_transformers': lambda: CALM(decoder(depth = 2, num_tokens = VOCAB), decoder(dim = 24, depth = 2, num_tokens = VOCAB), attn_kwargs = ATTN),
}

DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.uint16, torch.uint32, torch.uint64)

def trained(calm: CALM) -> CALM:
    torch.manual_seed(1)
    with torch.no_grad():
        for param in calm.cross_attns.parameters():
            param.normal_(std = 0.1)
    return calm.eval()

@pytest.mark.parametrize('models', COMPOSITIONS)
def test_every_integer_dtype_of_token_ids_composes_as_long_ids(models):
    torch.manual_seed(0)
    calm = trained(COMPOSITIONS[models]())
    seq = torch.randint(0, 100, (2, 6))

    def outputs(ids):
        with torch.no_grad():
            return dict(
                logits = calm(ids, return_loss = False),
                loss = calm(ids),
                labels_loss = calm(seq, labels = ids),
                hf_loss = calm(input_ids = ids, labels = ids).loss,
                context = calm(seq, prompt = ids, return_loss = False),
                generated = calm.generate(ids, max_new_tokens = 2, temperature = 0.),
                generated_with_context = calm.generate(seq, max_new_tokens = 2, temperature = 0., prompt = ids),
            )

    expected = outputs(seq)

    for dtype in DTYPES:
        got = outputs(seq.to(dtype))
        assert all(torch.equal(got[key], expected[key]) for key in expected), dtype

def test_token_ids_of_a_non_integer_dtype_are_refused_by_name():
    calm = COMPOSITIONS['x_transformers']()

    with pytest.raises(TypeError, match = r'`seq` must hold integer token ids.*got dtype torch.float32'):
        calm(torch.zeros((2, 6)))

    with pytest.raises(TypeError, match = r'`labels` must hold integer token ids.*torch.float32'):
        calm(torch.zeros((2, 6), dtype = torch.long), labels = torch.zeros((2, 6)))
