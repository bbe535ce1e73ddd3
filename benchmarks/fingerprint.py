"""Time of the frozen-model fingerprint saved with every composition checkpoint
(calm_pytorch/checkpoints/fingerprint.py), on Llama-like models built from configs (random weights, CPU).

    python benchmarks/fingerprint.py

Its cost grows with the number of tensors, not their size (a fixed sample of each): the 7B
estimate scales the measured time per tensor to Llama-2-7B's 291 parameter tensors."""

from __future__ import annotations

import argparse
import time

import torch
import transformers

from calm_pytorch.checkpoints.fingerprint import frozen_tensors, model_identity

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

LLAMA_7B_TENSORS = 291  # 32 layers x 9, the embeddings, the final norm and the LM head

def llama(hidden: int, layers: int, intermediate: int) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size = 32000, hidden_size = hidden, intermediate_size = intermediate, num_hidden_layers = layers, num_attention_heads = hidden // 128)
    return transformers.LlamaForCausalLM(config).eval()

def main():
    print('| model | parameters | tensors | fingerprint (best of 5) | per tensor | 7B estimate |')
    print('|---|---|---|---|---|---|')

    for name, hidden, layers, intermediate in [('24 layers x 1024', 1024, 24, 2816), ('2 layers of 7B width (4096)', 4096, 2, 11008)]:
        model = llama(hidden, layers, intermediate)
        num_tensors = len(frozen_tensors(model))
        num_params = sum(param.numel() for param in model.parameters())

        times = []
        for _ in range(5):
            start = time.perf_counter()
            model_identity(model, layers = layers, widths = [hidden], vocab_size = 32000)
            times.append(time.perf_counter() - start)

        best = min(times)
        print(f'| {name} | {num_params / 1e6:.0f}M | {num_tensors} | {best * 1e3:.1f} ms | {best / num_tensors * 1e6:.0f} us | {best / num_tensors * LLAMA_7B_TENSORS * 1e3:.0f} ms |')
        del model

if __name__ == '__main__':
    argparse.ArgumentParser(description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter).parse_args()  # --help, before building 667M parameters
    main()
