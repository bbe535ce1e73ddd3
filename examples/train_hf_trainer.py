"""Compose two tiny Hugging Face models and train the composition with transformers' Trainer.

    python examples/train_hf_trainer.py --max-steps 60 --out runs/hf_trainer

The data are Hugging Face-style rows (`input_ids`, `attention_mask`, `labels`, plus `prompt`, the
augment's own input), collated by `default_data_collator`, with Trainer's default settings. The
task needs the augment: the answer is a key token that only the augment's prompt holds, and the
labels are -100 everywhere but on the answer. Checkpoints and the final save hold the composition
only (`composition.safetensors`); rerun with --resume to continue from the last checkpoint.
The models are built from configs: nothing is downloaded."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers
from transformers import TrainingArguments, default_data_collator

from calm_pytorch import CALM, AugmentParams
from calm_pytorch.training.hf_trainer import CALMTrainer

NUM_TOKENS = 64
QUESTION = [1, 3, 4, 5]  # a fixed question; the answer follows it

def build(seed: int) -> CALM:
    torch.manual_seed(seed)
    anchor = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size = NUM_TOKENS, hidden_size = 64, num_hidden_layers = 4, num_attention_heads = 4,
        num_key_value_heads = 2, intermediate_size = 128, max_position_embeddings = 64
    ))
    # GPT-2 ties its input and output embeddings: a plain state_dict save of this composition fails
    augment = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size = NUM_TOKENS, n_embd = 32, n_layer = 4, n_head = 4, n_positions = 64))
    return CALM(anchor, AugmentParams(model = augment, connect_every_num_layers = 2), attn_kwargs = dict(heads = 4, dim_head = 16))

def rows(num: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    data = []

    for _ in range(num):
        prompt = torch.randint(6, NUM_TOKENS, (8,), generator = generator)
        key = prompt[0].item()  # the augment's prompt starts with the key
        input_ids = [*QUESTION, key]
        data.append(dict(
            input_ids = input_ids,
            attention_mask = [1] * len(input_ids),
            labels = [-100] * len(QUESTION) + [key],  # the loss is on the answer only
            prompt = prompt.tolist()
        ))

    return data

@torch.no_grad()
def accuracy(calm: CALM, data: list[dict]) -> float:
    batch = default_data_collator(data)
    logits = calm(input_ids = batch['input_ids'], prompt = batch['prompt']).logits
    predicted = logits[:, len(QUESTION) - 1].argmax(dim = -1)
    return (predicted == batch['labels'][:, -1]).float().mean().item()

def main():
    parser = argparse.ArgumentParser(description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--max-steps', type = int, default = 60)
    parser.add_argument('--out', type = Path, default = Path('runs/hf_trainer'))
    parser.add_argument('--resume', action = 'store_true', help = 'continue from the last checkpoint in --out')
    parser.add_argument('--seed', type = int, default = 0)
    args = parser.parse_args()

    if args.max_steps < 1:
        parser.error(f'--max-steps must be positive, got {args.max_steps}')

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()

    calm = build(args.seed)
    print(calm.summary())

    training_args = TrainingArguments(
        output_dir = str(args.out),
        max_steps = args.max_steps,
        per_device_train_batch_size = 16,
        learning_rate = 3e-3,       # tiny random models (docs/training.md#starting-points)
        max_grad_norm = 1.0,        # Trainer's default, and FineTuner's
        lr_scheduler_type = 'constant',
        logging_steps = max(args.max_steps // 6, 1),
        save_steps = max(args.max_steps // 2, 1),
        report_to = [],
        disable_tqdm = True,
        use_cpu = True,
        seed = args.seed
    )

    trainer = CALMTrainer(model = calm, args = training_args, train_dataset = rows(2048, args.seed), data_collator = default_data_collator)
    trainer.train(resume_from_checkpoint = args.resume or None)

    for record in trainer.state.log_history:
        if 'loss' in record:
            print(f'step {record["step"]:4d}  loss {record["loss"]:.3f}')

    final = args.out / 'final'
    trainer.save_model(str(final))

    # the saved composition, loaded into a CALM over the same (frozen) models
    reloaded = build(args.seed)
    reloaded.load(final / 'composition.safetensors')

    held_out = rows(256, args.seed + 1)
    print(f'saved {sorted(path.name for path in final.iterdir())}')
    print(f'accuracy on held-out rows: trained {accuracy(calm, held_out):.2f}, reloaded {accuracy(reloaded, held_out):.2f}, untrained {accuracy(build(args.seed), held_out):.2f}')

if __name__ == '__main__':
    main()
