"""Compose Hugging Face transformers models: a Llama-style anchor reads a BERT-style encoder's
view of a context it never sees itself. Train the composition on a synthetic task, then generate
with the anchor's own `generate()` inside `calm.composed(...)`.

    python examples/compose_hf.py

Models are built from configs (random weights, nothing downloaded). The task needs the augment:
the anchor must repeat a key token that only the encoder's context holds, so the loss can only
fall through the cross-attention."""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, BertConfig, BertModel, LlamaConfig

from calm_pytorch import CALM, AugmentParams

def batch(size: int, length: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # the context holds a key token among distractors, right-padded to 10; the anchor's sequence asks for it again and again
    key = torch.randint(3, num_tokens, (size, 1))
    context = torch.cat((key, torch.randint(3, num_tokens, (size, 9))), dim = -1)
    context_mask = torch.arange(10) < torch.randint(6, 11, (size, 1))
    context = context.masked_fill(~context_mask, 0)
    seq = torch.cat((torch.ones(size, 1, dtype = torch.long), key.expand(size, length - 1)), dim = -1)
    return seq, context, context_mask

def main():
    parser = argparse.ArgumentParser(description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type = int, default = 200)
    parser.add_argument('--seed', type = int, default = 0)
    args = parser.parse_args()

    if args.steps < 1:
        parser.error(f'--steps must be positive, got {args.steps}')

    torch.manual_seed(args.seed)
    num_tokens = 64

    anchor = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size = num_tokens, hidden_size = 64, intermediate_size = 128, num_hidden_layers = 4,
        num_attention_heads = 4, num_key_value_heads = 2, bos_token_id = 1, eos_token_id = 2, pad_token_id = 0
    ))
    encoder = BertModel(BertConfig(vocab_size = num_tokens, hidden_size = 32, num_hidden_layers = 4, num_attention_heads = 4, intermediate_size = 64, pad_token_id = 0))

    calm = CALM(anchor, AugmentParams(model = encoder, connections = ((2, 2), (4, 4))), attn_kwargs = dict(heads = 4, dim_head = 16))
    print(calm.summary())

    # 3e-3, above FineTuner's 1e-3: tiny models on synthetic data, trained in a short demonstration run (docs/training.md#starting-points)
    optim = torch.optim.AdamW(calm.parameters(), lr = 3e-3)

    for step in range(1, args.steps + 1):
        seq, context, context_mask = batch(16, 12, num_tokens)
        loss = calm(seq, prompt = context, prompt_mask = context_mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(calm.parameters(), max_norm = 1.0)  # as FineTuner does by default
        optim.step()
        optim.zero_grad()

        if step == 1 or step % 40 == 0:
            print(f'step {step:4d}  loss {loss.item():.3f}')

    # the anchor's own generate(), composed: it should repeat each context's key token
    seq, context, context_mask = batch(4, 12, num_tokens)

    with calm.composed(prompt = context, prompt_mask = context_mask):
        out = anchor.generate(seq[:, :2], max_new_tokens = 6, do_sample = False)

    print('keys      ', context[:, 0].tolist())
    print('generated ', out[:, 2:].tolist())

if __name__ == '__main__':
    main()
