"""Trains a CALM composition of two small models on synthetic data.

One process:          python examples/train.py
Several processes:    torchrun --nproc_per_node 2 examples/train.py
Resume after a stop:  python examples/train.py --resume    (or the torchrun line with --resume)
Sharded frozen models: torchrun --nproc_per_node 2 examples/train.py --strategy fsdp

The same script runs both ways: under torchrun the FineTuner joins the process group (gloo on
CPU, nccl on GPU), wraps the composition in DistributedDataParallel and shards the data; only
rank 0 writes. With --strategy fsdp each process holds half of the frozen models instead of a
whole copy (FSDP2). The models here are random and tiny so that it runs anywhere in seconds; in real
use, load your pretrained anchor and augment instead (the same weights in every process)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from x_transformers import Decoder, TransformerWrapper

from calm_pytorch import CALM, AugmentParams, FineTuner
from calm_pytorch.training.fsdp import local_and_global_numel

NUM_TOKENS = 256
SEQ_LEN = 32

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type = int, default = 100, help = 'optimizer steps in all')
    parser.add_argument('--batch-size', type = int, default = 16, help = 'per process and micro-batch')
    parser.add_argument('--grad-accum', type = int, default = 1, help = 'micro-batches per optimizer step')
    # 1e-2, not FineTuner's 1e-3: random frozen models and 100 short steps, in which the higher rate
    # shows the loss falling in a few seconds (docs/training.md#starting-points)
    parser.add_argument('--lr', type = float, default = 1e-2)
    parser.add_argument('--max-grad-norm', type = float, default = 1.0, help = 'gradient clipping (FineTuner\'s default)')
    parser.add_argument('--warmup', type = int, default = 10)
    parser.add_argument('--bf16', action = 'store_true', help = 'bf16 autocast')
    parser.add_argument('--out', type = Path, default = Path('runs/calm-example'), help = 'checkpoints and the final composition')
    parser.add_argument('--checkpoint-every', type = int, default = 25)
    parser.add_argument('--eval-every', type = int, default = 25)
    parser.add_argument('--resume', action = 'store_true', help = 'continue from the latest checkpoint in --out')
    parser.add_argument('--seed', type = int, default = 0)
    parser.add_argument('--strategy', choices = ('ddp', 'fsdp'), default = 'ddp', help = 'under torchrun: a whole copy of the frozen models per process, or sharded')
    return parser.parse_args()

def frozen_models(seed: int) -> tuple[TransformerWrapper, TransformerWrapper]:
    # every process must hold the same frozen weights: here the same seed, in real use the same checkpoint
    torch.manual_seed(seed)
    anchor = TransformerWrapper(num_tokens = NUM_TOKENS, max_seq_len = SEQ_LEN, attn_layers = Decoder(dim = 64, depth = 4, heads = 4))
    augment = TransformerWrapper(num_tokens = NUM_TOKENS, max_seq_len = SEQ_LEN, attn_layers = Decoder(dim = 48, depth = 8, heads = 4))
    return anchor, augment

def compose(seed: int) -> CALM:
    anchor, augment = frozen_models(seed)
    return CALM(anchor, AugmentParams(model = augment, connect_every_num_layers = 4), attn_kwargs = dict(heads = 4, dim_head = 16))

def synthetic_data(num: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Chains of a fixed random permutation of the vocabulary (each next token = perm[token]),
    right-padded by 0-7 tokens: a rule the frozen random models do not know and the composition
    can learn by reading the augment's view of the current token."""

    perm = torch.randperm(NUM_TOKENS, generator = torch.Generator().manual_seed(1234))
    generator = torch.Generator().manual_seed(seed)
    data = []

    for _ in range(num):
        seq = torch.empty(SEQ_LEN, dtype = torch.long)
        seq[0] = torch.randint(0, NUM_TOKENS, (), generator = generator)

        for index in range(1, SEQ_LEN):
            seq[index] = perm[seq[index - 1]]

        padding = torch.randint(0, 8, (), generator = generator).item()
        data.append(dict(seq = seq, mask = torch.arange(SEQ_LEN) < SEQ_LEN - padding))

    return data

def main():
    args = parse_args()

    calm = compose(args.seed)
    train_data = synthetic_data(2048, seed = args.seed)
    eval_batch = torch.utils.data.default_collate(synthetic_data(64, seed = args.seed + 1))

    def evaluate(trainer: FineTuner) -> dict:
        # `trainer.calm` is the composition itself (`trainer.model` may be its DDP wrapper)
        batch = {key: value.to(trainer.device) for key, value in eval_batch.items()}
        return dict(eval_loss = trainer.calm(batch['seq'], mask = batch['mask']).item())

    trainer = FineTuner(
        calm,
        train_data,
        num_train_steps = args.steps,
        batch_size = args.batch_size,
        grad_accum_every = args.grad_accum,
        learning_rate = args.lr,
        max_grad_norm = args.max_grad_norm,
        warmup_steps = args.warmup,
        schedule = 'cosine',
        bf16 = args.bf16,
        eval_fn = evaluate,
        eval_every = args.eval_every,
        checkpoint_dir = args.out / 'checkpoints',
        checkpoint_every = args.checkpoint_every,
        keep_last = 2,
        resume = args.resume,
        seed = args.seed,
        strategy = args.strategy
    )

    history = trainer.train()

    # every process takes part in a forward of sharded models, so every process computes these
    seq = eval_batch['seq'][:2].to(trainer.device)

    with torch.no_grad():
        logits = calm(seq, return_loss = False)

    if trainer.distributed.is_main:
        path = calm.save(args.out / 'composition.safetensors')
        size = path.stat().st_size / 2 ** 20
        print(f'processes {trainer.distributed.world_size}, samples per step {trainer.samples_per_step}')
        local, total = map(sum, zip(*(local_and_global_numel(model) for model in (calm.anchor, *calm.augments))))
        print(f'frozen parameters held by this process: {local:,} of {total:,} ({args.strategy})')
        if len(history) > 0:
            print(f'loss {history[0]["loss"]:.3f} at step {history[0]["step"]} -> {history[-1]["loss"]:.3f} at step {history[-1]["step"]}')
        print(f'composition saved to {path} ({size:.2f} MiB; the frozen models are not in it)')

        # the checkpoint restores into a fresh composition over the same frozen models
        restored = compose(args.seed)
        restored.load(path)
        restored.to(trainer.device)

        with torch.no_grad():
            assert torch.allclose(restored(seq, return_loss = False), logits, atol = 1e-5)

        print('reloaded: logits equal')

    trainer.close()

if __name__ == '__main__':
    main()
