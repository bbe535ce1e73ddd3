"""The memory plan (`calm_pytorch.plan`) against what benchmarks/memory.py measures: the same
setups and variants, each measured in a fresh process (two for FSDP), beside the plan for the
same configs and options.

    python benchmarks/plan_vs_memory.py --small          # tiny models: seconds
    python benchmarks/plan_vs_memory.py                  # the ~1B float32 anchor: minutes per row, ~8 GiB
    python benchmarks/plan_vs_memory.py --dtype bfloat16 --variants 'no checkpointing,checkpointing'

The plan counts what a step holds on the accelerator; a CPU process also holds the interpreter
and its libraries, measured here before the models are built, and added to the plan's total to
compare with the peak resident set.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

import torch

import memory
from calm_pytorch.plan import memory_plan

OPTIONS = {
    'no checkpointing': dict(),
    'checkpointing': dict(activation_checkpointing = True),
    'fsdp (2 processes)': dict(processes = 2, fsdp = True),
    'fsdp (2 processes) + checkpointing': dict(processes = 2, fsdp = True, activation_checkpointing = True),
    'quantized anchor': dict(anchor_quantization = 'int8'),
    'quantized anchor + checkpointing': dict(anchor_quantization = 'int8', activation_checkpointing = True),
}

def plan_for(setup: memory.Setup, variant: str):
    return memory_plan(
        dict(model_type = 'llama', **setup.anchor), dict(model_type = 'llama', **setup.augment), dtype = getattr(torch, setup.dtype),
        batch = setup.batch, seq_len = setup.seq_len, attn_kwargs = dict(heads = setup.heads, dim_head = setup.dim_head), **OPTIONS[variant]
    )

def main():
    parser = argparse.ArgumentParser(description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--small', action = 'store_true')
    parser.add_argument('--variants', default = ','.join(OPTIONS))
    parser.add_argument('--seq-len', type = int, default = None)
    parser.add_argument('--dtype', default = None)
    parser.add_argument('--threads', type = int, default = 1)
    args = parser.parse_args()

    setup = memory.SETUPS['small' if args.small else 'big']
    overrides = {key: value for key, value in dict(seq_len = args.seq_len, dtype = args.dtype).items() if value is not None}
    setup = memory.Setup(**{**asdict(setup), **overrides})
    by_name = {variant.name: variant for variant in memory.VARIANTS}

    print(f'machine: {memory.machine()}; {setup.dtype}, batch {setup.batch}, sequence {setup.seq_len}\n')
    print('| variant | peak (measured) | plan + interpreter | plan / measured | kept for backward (measured) | plan | frozen held (measured) | plan | above resting (measured) | plan: activations + temporaries + gathered |')
    print('|---|---|---|---|---|---|---|---|---|---|')

    for name in [name for name in args.variants.split(',') if name]:
        variant = by_name[name]
        row = variant.launch(setup, variant, args.threads) if variant.launch is not None else memory.run_in_subprocess(setup, variant, args.threads)
        plan = plan_for(setup, name)
        predicted = plan.total + row['interpreter']
        step = plan.activations + plan.temporaries + plan.gathered
        gib = memory.gib
        print(f'| {name} | {gib(row["peak"])} | {gib(predicted)} | {predicted / row["peak"]:.2f} | {gib(row["saved"])} | {gib(plan.kept)} | '
              f'{gib(row["frozen_held"])} | {gib(plan.frozen)} | {gib(row["peak"] - row["before"])} | {gib(step)} |', flush = True)

if __name__ == '__main__':
    main()
