"""New tokens per second when generating from a composition, on the README's model sizes.

    python benchmarks/generation.py --quick     # 64 total tokens only, about a minute on one core
    python benchmarks/generation.py            # 64, 256 and 1024 total tokens (several minutes)

Columns, for each mode (aligned: the augments read the generated sequence; context: they read a
prompt once) and each number of augments:
    (a) the bare anchor decoding with its own KV cache (x-transformers' AutoregressiveWrapper)
    (b) the composition with caches: `calm.generate(..., use_cache = True)`
    (c) the composition recomputed every step: `calm.generate(..., use_cache = False)`
    (d) `CALM-Pytorch`'s `generate` (context mode: its augments read the anchor's prompt), when
        that package is importable; it is never a dependency of calm_pytorch
The prompt is a quarter of the total length, the context (context mode) is the prompt itself.
(c) and (d) recompute everything, so a step costs more the longer the sequence: their rates are
the mean over `--uncached-samples` steps timed at evenly spaced lengths (a full run at 1024 tokens
would take an hour on a CPU). Decoding is greedy. Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import platform
import time
from contextlib import redirect_stderr
from io import StringIO

import torch
from torch import nn
from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper

from calm_pytorch import CALM, AugmentParams

NUM_TOKENS = 20000
MAX_SEQ_LEN = 1024

def anchor_model() -> TransformerWrapper:
    return TransformerWrapper(num_tokens = NUM_TOKENS, max_seq_len = MAX_SEQ_LEN, attn_layers = Decoder(dim = 512, depth = 12, heads = 8))

def augment_model() -> TransformerWrapper:
    return TransformerWrapper(num_tokens = NUM_TOKENS, max_seq_len = MAX_SEQ_LEN, attn_layers = Decoder(dim = 256, depth = 12, heads = 8))

def trained_away(calm: nn.Module) -> nn.Module:
    # a nonzero output projection: an untrained composition would still do all the work, but
    # this keeps the benchmark honest about the numbers flowing through
    for name, param in calm.named_parameters():
        if param.requires_grad and param.ndim == 2:
            nn.init.normal_(param, std = 0.02)

    return calm.eval()

def timed(fn, reps: int) -> float:
    best = float('inf')

    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)

    return best

def uncached_rate(step_at, prompt_len: int, total: int, samples: int, batch: int) -> float:
    # tokens / s of a generation from prompt_len to total when each step recomputes everything:
    # the mean step time over evenly spaced lengths
    lengths = torch.linspace(prompt_len, total - 1, samples).round().long().tolist()
    mean_step = sum(timed(lambda: step_at(length), 1) for length in lengths) / len(lengths)
    return batch / mean_step

def main():
    parser = argparse.ArgumentParser(description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action = 'store_true', help = '64 total tokens only')
    parser.add_argument('--totals', type = int, nargs = '+', default = None, help = 'total lengths, prompt included')
    parser.add_argument('--batch', type = int, default = 1)
    parser.add_argument('--threads', type = int, default = 1, help = 'torch threads (one is steadiest on a shared machine)')
    parser.add_argument('--reps', type = int, default = 1, help = 'best of this many runs for (a) and (b)')
    parser.add_argument('--uncached-samples', type = int, default = 3)
    parser.add_argument('--no-reference', action = 'store_true', help = 'skip CALM-Pytorch even when importable')
    args = parser.parse_args()

    totals = args.totals or ((64,) if args.quick else (64, 256, 1024))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    try:
        import CALM_pytorch as reference
    except ImportError:
        reference = None

    if args.no_reference:
        reference = None

    print(f'# torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), batch {args.batch}, greedy')
    header = '| mode | augments | total | (a) anchor, own cache | (b) CALM cached | (c) CALM uncached | ' + ('(d) CALM-Pytorch | ' if reference else '') + 'b / a | b / c |'
    print(header)
    print('|' + '---|' * (header.count('|') - 1))

    anchor = anchor_model()
    augments = [augment_model() for _ in range(3)]
    # the bare anchor is a copy without our hooks, so (a) pays for nothing of the composition
    bare_anchor = anchor_model()
    bare_anchor.load_state_dict(anchor.state_dict())
    bare = AutoregressiveWrapper(bare_anchor).eval()

    for num_augments in (1, 3):
        calm = trained_away(CALM(anchor, [AugmentParams(model = augment, connect_every_num_layers = 4) for augment in augments[:num_augments]]))

        ref = None
        if reference:
            # its own copies of the models: its hooks must not meet ours
            ref_anchor = anchor_model()
            ref_anchor.load_state_dict(anchor.state_dict())
            ref_augments = []
            for augment in augments[:num_augments]:
                copy = augment_model()
                copy.load_state_dict(augment.state_dict())
                ref_augments.append(reference.AugmentParams(model = copy, connect_every_num_layers = 4))
            ref = trained_away(reference.CALM(ref_anchor, ref_augments))

        for mode in ('aligned', 'context'):
            for total in totals:
                prompt_len = total // 4
                num_new = total - prompt_len
                seq = torch.randint(0, NUM_TOKENS, (args.batch, total))
                prompt = seq[:, :prompt_len]
                context = lambda length: dict(augment_prompt = seq[:, :prompt_len]) if mode == 'context' else dict()

                # warm up once: allocators, kernels
                calm.generate(prompt, max_new_tokens = 2, temperature = 0., **context(prompt_len))

                a = args.batch * num_new / timed(lambda: bare.generate(prompt, num_new, temperature = 0., cache_kv = True), args.reps)
                b = args.batch * num_new / timed(lambda: calm.generate(prompt, max_new_tokens = num_new, temperature = 0., show_progress = False, **context(prompt_len)), args.reps)
                c = uncached_rate(
                    lambda length: calm.generate(seq[:, :length], max_new_tokens = 1, temperature = 0., use_cache = False, **context(length)),
                    prompt_len, total, args.uncached_samples, args.batch
                )

                row = f'| {mode} | {num_augments} | {total} | {a:.1f} | {b:.1f} | {c:.2f} | '

                if ref:
                    if mode == 'context':
                        # its augments read its prompt; one step from length L is generate(seq[:, :L], seq_len = L + 1)
                        with redirect_stderr(StringIO()):  # its progress bar
                            d = uncached_rate(lambda length: ref.generate(seq[:, :length], seq_len = length + 1), prompt_len, total, args.uncached_samples, args.batch)
                        row += f'{d:.2f} | '
                    else:
                        row += 'n/a | '

                print(row + f'{b / a:.2f} | {b / c:.0f} |', flush = True)

        calm.remove_hooks()

        if ref and hasattr(ref, 'remove_hooks'):
            ref.remove_hooks()

if __name__ == '__main__':
    main()
