"""python -m calm_pytorch.plan --anchor CONFIG --augment CONFIG [--augment CONFIG ...] [options]

Prints the memory one process holds in a training step of the composition (docs/scaling.md).
A CONFIG is a config.json file, a folder holding one, JSON with a `model_type`, or the name of a
published Llama shape: llama-2-7b, llama-2-13b, llama-2-70b, tinyllama-1.1b, llama-3-8b,
llama-3-70b, llama-3.2-1b."""

from __future__ import annotations

import argparse
import json

from calm_pytorch.plan.memory_plan import DTYPES, memory_plan

def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog = 'python -m calm_pytorch.plan', description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--anchor', required = True, help = 'the anchor\'s config')
    parser.add_argument('--augment', action = 'append', required = True, help = 'an augment\'s config (repeat for several)')
    parser.add_argument('--dtype', default = 'bf16', choices = sorted(DTYPES), help = 'of the frozen models')
    parser.add_argument('--batch', type = int, default = 1, help = 'micro-batch of one process')
    parser.add_argument('--seq-len', type = int, default = 2048)
    parser.add_argument('--processes', type = int, default = 1)
    parser.add_argument('--fsdp', action = 'store_true', help = 'shard the frozen models over the processes')
    parser.add_argument('--checkpointing', action = 'store_true', help = 'activation (gradient) checkpointing')
    parser.add_argument('--anchor-quantization', choices = ['int8', '4bit'], default = None)
    parser.add_argument('--augment-quantization', choices = ['int8', '4bit'], default = None)
    parser.add_argument('--heads', type = int, default = 8, help = 'of each cross-attention')
    parser.add_argument('--dim-head', type = int, default = 64)
    parser.add_argument('--connections', default = None, help = 'JSON: per augment a list of [augment_layer, anchor_layer] pairs, or null for the default')
    args = parser.parse_args(argv)

    try:
        connections = None if args.connections is None else json.loads(args.connections)
    except json.JSONDecodeError as error:
        parser.error(f'--connections is not JSON ({error}): e.g. \'[[[4, 2], [8, 4]]]\' for one augment')

    if connections is not None and not (isinstance(connections, list) and all(pairs is None or isinstance(pairs, list) for pairs in connections)):
        parser.error(f'--connections must be a JSON list with, per augment, a list of [augment_layer, anchor_layer] pairs or null; got {args.connections}')

    plan = memory_plan(
        args.anchor, args.augment, dtype = args.dtype, batch = args.batch, seq_len = args.seq_len, processes = args.processes,
        fsdp = args.fsdp, activation_checkpointing = args.checkpointing, anchor_quantization = args.anchor_quantization,
        augment_quantization = args.augment_quantization, attn_kwargs = dict(heads = args.heads, dim_head = args.dim_head),
        connections = None if connections is None else [None if pairs is None else [tuple(pair) for pair in pairs] for pairs in connections]
    )
    print(plan.table())

if __name__ == '__main__':
    main()
