"""Compose two x-transformers decoders and train the composition for a few steps on synthetic data.

    python examples/train_xtransformers.py

The synthetic task needs the augment: the anchor must copy a token that only the augment's
context (a prompt the anchor never reads) contains, so the loss can only fall through the
cross-attention."""

from __future__ import annotations

import argparse

import torch
from x_transformers import Decoder, TransformerWrapper

from calm_pytorch import CALM, AugmentParams

def batch(size: int, length: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    # the context holds a key token; the anchor's sequence asks for it again at every position
    key = torch.randint(2, num_tokens, (size, 1))
    prompt = torch.cat((key, torch.randint(2, num_tokens, (size, 7))), dim = -1)
    seq = torch.cat((torch.ones(size, 1, dtype = torch.long), key.expand(size, length - 1)), dim = -1)
    return seq, prompt

def main():
    parser = argparse.ArgumentParser(description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type = int, default = 60)
    parser.add_argument('--seed', type = int, default = 0)
    args = parser.parse_args()

    if args.steps < 1:
        parser.error(f'--steps must be positive, got {args.steps}')

    torch.manual_seed(args.seed)
    num_tokens = 64

    anchor = TransformerWrapper(num_tokens = num_tokens, max_seq_len = 64, attn_layers = Decoder(dim = 64, depth = 4, heads = 4))
    augment = TransformerWrapper(num_tokens = num_tokens, max_seq_len = 64, attn_layers = Decoder(dim = 32, depth = 8, heads = 4))

    calm = CALM(anchor, augment_llms = AugmentParams(model = augment, connect_every_num_layers = 4))
    print(f'connections (augment_layer, anchor_layer): {calm.connections}')

    # 3e-3, above FineTuner's 1e-3: tiny models on synthetic data, trained in a short demonstration run (docs/training.md#starting-points)
    optim = torch.optim.AdamW(calm.parameters(), lr = 3e-3)

    for step in range(1, args.steps + 1):
        seq, prompt = batch(16, 16, num_tokens)
        loss = calm(seq, prompt = prompt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(calm.parameters(), max_norm = 1.0)  # as FineTuner does by default
        optim.step()
        optim.zero_grad()

        if step == 1 or step % 10 == 0:
            print(f'step {step:4d}  loss {loss.item():.3f}')

if __name__ == '__main__':
    main()
