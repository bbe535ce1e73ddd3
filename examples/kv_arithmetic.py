"""CALM's key-value arithmetic experiment (Bansal et al. 2024, section 4.1), at toy scale, from scratch.

Two small decoders each hold half of a skill:
  m_A (augment) knows the value of every key, and has never seen arithmetic;
  m_B (anchor)  adds numbers, and has never seen a key.
Composed with CALM (both frozen, only cross-attention trained on arithmetic over a subset of the
keys), the composition adds keys it never saw during composition training: it reads their values
from m_A. A control composes m_B with an untrained m_A, trained the same way: it can only memorise.

    python examples/kv_arithmetic.py              # one seed, a few minutes on 2 CPU cores
    python examples/kv_arithmetic.py --seeds 3    # mean and spread over 3 seeds
    python examples/kv_arithmetic.py --quick      # a tiny run of the whole pipeline (tests)

Trained weights are cached in --out; a second run goes straight to evaluation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module
from x_transformers import Decoder, TransformerWrapper

sys.path.insert(0, str(Path(__file__).resolve().parent))  # kv_data.py sits next to this script

import kv_data as data  # noqa: E402
from cli_types import fraction, positive_int  # noqa: E402
from calm_pytorch import CALM, AugmentParams  # noqa: E402

# configuration

@dataclass(frozen = True)
class Config:
    # the world
    num_keys: int = 1000
    held_in_fraction: float = 0.2       # the paper's composition data spans 20% of the keys
    operands: int = 3
    # models: small decoders trained from scratch
    dim_anchor: int = 64
    depth_anchor: int = 4
    dim_augment: int = 64
    depth_augment: int = 4
    heads: int = 4
    max_seq_len: int = 24
    # training
    batch_size: int = 128
    anchor_steps: int = 600
    augment_steps: int = 800
    composition_steps: int = 800
    lr: float = 2e-3
    composition_lr: float = 3e-3
    composition_size: int = 20000       # fixed composition data set, over held-in keys only
    substitution_fraction: float = 0.2  # of the composition data: key-value substitution
    numeric_fraction: float = 0.3       # and plain-number arithmetic, which keeps the anchor's own skill intact
    # composition: m_A's top layer feeds the embedding output of m_B (the input of block 1) and
    # the input of every other block; reaching the embeddings is what makes held-out keys work
    connections: tuple[tuple[int, int], ...] = ((4, 1), (4, 2), (4, 3), (4, 4))
    anchor_hidden_position: str = 'input'
    attn_heads: int = 4
    attn_dim_head: int = 16
    # evaluation
    eval_size: int = 500
    curve_size: int = 256
    eval_every: int = 50

    def key(self) -> str:
        """A short hash naming the cached weights trained under this configuration."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys = True).encode()).hexdigest()[:8]

QUICK = dict(
    num_keys = 200, held_in_fraction = 0.4,
    dim_anchor = 32, depth_anchor = 2, dim_augment = 32, depth_augment = 2, heads = 2,
    batch_size = 64, anchor_steps = 60, augment_steps = 60, composition_steps = 40,
    composition_size = 2000, connections = ((2, 1), (2, 2)),
    attn_heads = 2, eval_size = 64, curve_size = 32, eval_every = 20
)

# models

def decoder(num_tokens: int, dim: int, depth: int, heads: int, max_seq_len: int) -> TransformerWrapper:
    return TransformerWrapper(
        num_tokens = num_tokens,
        max_seq_len = max_seq_len,
        attn_layers = Decoder(dim = dim, depth = depth, heads = heads, attn_dim_head = dim // heads)
    )

def make_anchor(config: Config) -> TransformerWrapper:
    return decoder(data.num_tokens(config.num_keys), config.dim_anchor, config.depth_anchor, config.heads, config.max_seq_len)

def make_augment(config: Config) -> TransformerWrapper:
    return decoder(data.num_tokens(config.num_keys), config.dim_augment, config.depth_augment, config.heads, config.max_seq_len)

def compose(anchor: Module, augment: Module, config: Config) -> CALM:
    return CALM(
        anchor,
        AugmentParams(model = augment, connections = config.connections),
        anchor_hidden_position = config.anchor_hidden_position,
        attn_kwargs = dict(heads = config.attn_heads, dim_head = config.attn_dim_head),
        pad_id = data.PAD
    )

# training

def progress(iterable: Iterable, desc: str, total: int):
    """tqdm when installed (the `examples` extra), else a line every tenth of the way."""
    try:
        from tqdm.auto import tqdm
        return tqdm(iterable, desc = desc, total = total, leave = True, dynamic_ncols = True)
    except ImportError:
        return PlainProgress(iterable, desc, total)

class PlainProgress:
    def __init__(self, iterable: Iterable, desc: str, total: int):
        self.iterable, self.desc, self.total, self.postfix = iterable, desc, total, ''

    def __iter__(self):
        for index, item in enumerate(self.iterable, start = 1):
            yield item
            if index % max(self.total // 10, 1) == 0 or index == self.total:
                print(f'{self.desc}: {index}/{self.total} {self.postfix}', flush = True)

    def set_postfix_str(self, text: str, refresh: bool = True):
        self.postfix = text

def next_token_loss(embed: Callable[[Tensor], Tensor], to_logits: Module, batch: data.Batch) -> Tensor:
    """Cross-entropy on the labelled tokens only: operands are random and cannot be predicted.
    Logits are computed at those positions alone, since the projection onto a vocabulary of
    about a thousand keys costs more than the rest of these tiny models. (CALM's own loss would
    also train on the operands: its `mask` masks attention as well as labels.)"""
    embeds = embed(batch.tokens[:, :-1])  # (b, n - 1, d), final norm applied
    labelled = batch.loss_mask[:, 1:]
    return F.cross_entropy(to_logits(embeds[labelled]), batch.tokens[:, 1:][labelled])

def embeddings_of(model: TransformerWrapper) -> Callable[[Tensor], Tensor]:
    return lambda tokens: model(tokens, return_embeddings = True)

def train(
    embed: Callable[[Tensor], Tensor],
    to_logits: Module,
    params: list[Tensor],
    next_batch: Callable[[], data.Batch],
    *,
    steps: int,
    lr: float,
    desc: str,
    on_step: Callable[[int], str | None] | None = None
):
    """AdamW with a short warmup and a cosine decay: the settings that got the tiny models there fastest."""
    optimizer = torch.optim.AdamW(params, lr = lr, weight_decay = 0.)
    warmup = max(steps // 20, 1)
    cosine = lambda step: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))  # down to a tenth
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min((step + 1) / warmup, cosine(step)))

    bar = progress(range(1, steps + 1), desc, steps)
    note = ''

    for step in bar:
        loss = next_token_loss(embed, to_logits, next_batch())
        optimizer.zero_grad(set_to_none = True)
        loss.backward()
        optimizer.step()
        schedule.step()

        if on_step is not None:
            note = on_step(step) or note

        bar.set_postfix_str(f'loss {loss.item():.3f} {note}', refresh = False)

# decoding and scoring

@torch.no_grad()
def greedy(model: Module, prompts: Tensor, max_new_tokens: int) -> Tensor:
    """A single model decoded greedily, the way CALM.generate decodes the composition:
    (b, p) prompts -> (b, max_new_tokens) new tokens, padding after <eos>."""
    out = prompts
    done = torch.zeros(prompts.shape[0], dtype = torch.bool)

    for _ in range(max_new_tokens):
        token = model(out)[:, -1].argmax(dim = -1).masked_fill(done, data.PAD)
        out = torch.cat((out, token[:, None]), dim = -1)
        done = done | (token == data.EOS)

        if done.all():
            break

    new = out[:, prompts.shape[-1]:]
    return F.pad(new, (0, max_new_tokens - new.shape[-1]), value = data.PAD)

def calm_decoder(calm: CALM) -> Callable[[Tensor, int], Tensor]:
    return lambda prompts, max_new_tokens: calm.generate(prompts, max_new_tokens = max_new_tokens, temperature = 0., eos_id = data.EOS, pad_id = data.PAD)

def model_decoder(model: Module) -> Callable[[Tensor, int], Tensor]:
    return lambda prompts, max_new_tokens: greedy(model, prompts, max_new_tokens)

def accuracy(decode: Callable[[Tensor, int], Tensor], examples: data.Examples, chunk: int = 500) -> float:
    """Exact match in %, decoding every prompt of the set in batches (a task's prompts share one length)."""
    correct = []
    max_new_tokens = examples.targets.shape[-1] + 1  # room to run past the answer, which is wrong

    for start in range(0, len(examples), chunk):
        part = data.take(examples, torch.arange(start, min(start + chunk, len(examples))))
        correct.append(data.exact_match(decode(part.prompts, max_new_tokens), part.targets))

    return 100. * torch.cat(correct).float().mean().item()

# one seed of the experiment

TASKS = (
    ('kv_substitution', 'key-value substitution (held-out keys)'),
    ('numeric', 'numeric arithmetic'),
    ('kv_arithmetic_held_out', 'key-value arithmetic, held-out keys'),
    ('kv_arithmetic_held_in', 'key-value arithmetic, held-in keys'),
)

SYSTEMS = (
    ('augment', 'm_A alone'),
    ('anchor', 'm_B alone'),
    ('calm', 'CALM'),
    ('control', 'CALM, random m_A (control)'),
)

@dataclass
class SeedResult:
    seed: int
    accuracy: dict[str, dict[str, float]]  # system -> task -> exact match %
    chance: float                           # best constant answer on key-value arithmetic, %
    curves: dict[str, list[tuple[int, float, float]]] = field(default_factory = dict)  # system -> (step, held-out %, held-in %)
    seconds: float = 0.

def seeded(seed: int, phase: int) -> torch.Generator:
    # every phase draws from its own stream, so caching one phase never shifts another's data
    return torch.Generator().manual_seed(seed * 1000 + phase)

def run_seed(config: Config, seed: int, out: Path, retrain: bool) -> SeedResult:
    started = time.time()
    run_dir = out / f'seed{seed}-{config.key()}'
    run_dir.mkdir(parents = True, exist_ok = True)
    (run_dir / 'config.json').write_text(json.dumps({**asdict(config), 'seed': seed}, indent = 2))

    world = data.make_world(config.num_keys, config.held_in_fraction, config.operands, seeded(seed, 0))
    composition = data.make_composition_data(world, config.composition_size, seeded(seed, 1), config.substitution_fraction, config.numeric_fraction)
    evals = data.make_eval_sets(world, config.eval_size, composition, seeded(seed, 2))

    print(f'\nseed {seed}: {config.num_keys} keys, {len(world.held_in)} held in the composition data, {len(world.held_out)} held out; weights in {run_dir}')
    print('  e.g. ' + data.to_text(torch.cat((composition.kv_arithmetic.prompts[0], composition.kv_arithmetic.targets[0]))))

    anchor = cached(run_dir / 'anchor.pt', retrain, lambda: train_anchor(config, world, seed), lambda: make_anchor(config))
    augment = cached(run_dir / 'augment.pt', retrain, lambda: train_augment(config, world, seed), lambda: make_augment(config))

    torch.manual_seed(seed * 1000 + 7)
    random_augment = make_augment(config)  # same architecture as m_A, never trained

    # the single models are scored before any composition wraps them
    accuracy = {
        'augment': evaluate(model_decoder(augment.eval()), evals),
        'anchor': evaluate(model_decoder(anchor.eval()), evals),
    }

    curves = {}

    for system, augment_model in (('calm', augment), ('control', random_augment)):
        calm, curve = composed(config, seed, system, copy_of(anchor, make_anchor(config)), augment_model, composition, evals, run_dir, retrain)
        calm.eval()
        accuracy[system] = evaluate(calm_decoder(calm), evals)
        curves[system] = curve

    result = SeedResult(seed, accuracy, 100. * data.chance_accuracy(world), curves, time.time() - started)
    (run_dir / 'results.json').write_text(json.dumps(asdict(result), indent = 2))
    return result

def evaluate(decode, evals: data.EvalSets) -> dict[str, float]:
    return {task: accuracy(decode, getattr(evals, task)) for task, _ in TASKS}

def copy_of(model: Module, blank: Module) -> Module:
    # each composition gets its own anchor: CALM hooks into the modules it is given
    blank.load_state_dict(model.state_dict())
    return blank

def cached(path: Path, retrain: bool, trainer: Callable[[], Module], blank: Callable[[], Module]) -> Module:
    if path.exists() and not retrain:
        model = blank()
        model.load_state_dict(torch.load(path, weights_only = True))
        print(f'  loaded {path.name}')
        return model

    model = trainer()
    save_atomically(model.state_dict(), path)
    return model

def save_atomically(obj, path: Path):
    # a crash mid-write must not leave a half file that a later run would take for a cache
    tmp = path.with_suffix('.tmp')
    torch.save(obj, tmp)
    os.replace(tmp, path)

def pretrain(config: Config, world: data.World, seed: int, stream: int, make: Callable[[Config], Module], make_batch, steps: int, desc: str) -> Module:
    """Trains one model from scratch on its own data (m_B: numbers, m_A: key values)."""
    torch.manual_seed(seed * 1000 + stream)
    model = make(config).train()
    generator = seeded(seed, stream)

    train(
        embeddings_of(model), model.to_logits, list(model.parameters()),
        lambda: make_batch(world, config.batch_size, generator),
        steps = steps, lr = config.lr, desc = desc
    )
    return model.eval()

def train_anchor(config: Config, world: data.World, seed: int) -> Module:
    return pretrain(config, world, seed, 3, make_anchor, data.anchor_batch, config.anchor_steps, 'm_B (anchor): numeric arithmetic')

def train_augment(config: Config, world: data.World, seed: int) -> Module:
    return pretrain(config, world, seed, 4, make_augment, data.augment_batch, config.augment_steps, 'm_A (augment): key values')

def composed(config: Config, seed: int, system: str, anchor: Module, augment: Module, composition: data.CompositionData, evals: data.EvalSets, run_dir: Path, retrain: bool) -> tuple[CALM, list]:
    """Composes m_B with an augment and trains (or loads) the cross-attention; returns the
    learning curve on key-value arithmetic: (step, held-out %, held-in %)."""
    torch.manual_seed(seed * 1000 + 5)
    calm = compose(anchor, augment, config)
    path, curve_path = run_dir / f'{system}.safetensors', run_dir / f'{system}.curve.json'

    if path.exists() and curve_path.exists() and not retrain:
        calm.load(path)
        print(f'  loaded {path.name}')
        return calm, [tuple(point) for point in json.loads(curve_path.read_text())]

    generator = seeded(seed, 5)
    curve_held_out = data.take(evals.kv_arithmetic_held_out, torch.arange(min(config.curve_size, len(evals.kv_arithmetic_held_out))))
    curve_held_in = data.take(evals.kv_arithmetic_held_in, torch.arange(min(config.curve_size, len(evals.kv_arithmetic_held_in))))
    curve = [(0, accuracy(calm_decoder(calm), curve_held_out), accuracy(calm_decoder(calm), curve_held_in))]

    def on_step(step: int) -> str | None:
        if step % config.eval_every != 0 and step != config.composition_steps:
            return None

        calm.eval()
        curve.append((step, accuracy(calm_decoder(calm), curve_held_out), accuracy(calm_decoder(calm), curve_held_in)))
        calm.train()
        return f'held-out {curve[-1][1]:.0f}% held-in {curve[-1][2]:.0f}%'

    calm.train()
    label = 'trained m_A' if system == 'calm' else 'random m_A (control)'

    train(
        # the anchor's keyword `return_embeddings` passes through CALM to the x-transformers model
        lambda tokens: calm(tokens, return_loss = False, return_embeddings = True), anchor.to_logits,
        list(calm.cross_attns.parameters()),
        lambda: data.composition_batch(composition, config.batch_size, generator),
        steps = config.composition_steps, lr = config.composition_lr, desc = f'CALM with {label}', on_step = on_step
    )

    # only what was learned is saved, as a composition checkpoint; the frozen models are cached on their own
    calm.save(path)
    curve_path.write_text(json.dumps(curve))
    return calm.eval(), curve

# reporting

def table(results: list[SeedResult]) -> str:
    """The paper's table as markdown: one seed, or mean ± sd over seeds."""
    def cell(system: str, task: str) -> str:
        values = [result.accuracy[system][task] for result in results]
        if len(values) == 1:
            return f'{values[0]:.1f}'
        return f'{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}'

    lines = [
        '| task | ' + ' | '.join(name for _, name in SYSTEMS) + ' |',
        '|---|' + '---:|' * len(SYSTEMS),
        *(f'| {name} | ' + ' | '.join(cell(system, task) for system, _ in SYSTEMS) + ' |' for task, name in TASKS)
    ]
    return '\n'.join(lines)

def chance_note(results: list[SeedResult]) -> str:
    chances = [result.chance for result in results]
    return f'chance on key-value arithmetic (always answering the most likely sum): {statistics.mean(chances):.1f}%'

def plot(results: list[SeedResult], path: Path):
    """CALM's accuracy on held-out keys against composition steps, with the single models as lines."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed (pip install -e ".[examples]"): no plot')
        return

    fig, ax = plt.subplots(figsize = (7, 4.2))
    task = 'kv_arithmetic_held_out'

    for result in results:
        alpha = 1. if len(results) == 1 else 0.6
        first = result is results[0]
        steps, held_out, held_in = zip(*result.curves['calm'])
        ax.plot(steps, held_out, color = 'tab:blue', alpha = alpha, label = 'CALM, held-out keys' if first else None)
        ax.plot(steps, held_in, color = 'tab:blue', alpha = alpha * 0.5, linestyle = ':', label = 'CALM, held-in keys' if first else None)
        steps, held_out, _ = zip(*result.curves['control'])
        ax.plot(steps, held_out, color = 'tab:red', alpha = alpha, linestyle = '--', label = 'CALM with random m_A, held-out keys' if first else None)

    mean = lambda system: statistics.mean(result.accuracy[system][task] for result in results)
    ax.axhline(mean('augment'), color = 'tab:green', linewidth = 1, label = f'm_A alone ({mean("augment"):.1f}%)')
    ax.axhline(mean('anchor'), color = 'tab:orange', linewidth = 1, label = f'm_B alone ({mean("anchor"):.1f}%)')
    ax.axhline(statistics.mean(result.chance for result in results), color = 'gray', linewidth = 1, linestyle = ':', label = f'chance ({statistics.mean(result.chance for result in results):.1f}%)')

    ax.set_xlabel('composition training steps')
    ax.set_ylabel('exact match on key-value arithmetic (%)')
    ax.set_ylim(-2, 102)
    ax.set_title('Key-value arithmetic: composing m_A (keys) with m_B (arithmetic)')
    ax.legend(loc = 'upper left', fontsize = 8)
    fig.tight_layout()
    path.parent.mkdir(parents = True, exist_ok = True)
    fig.savefig(path, dpi = 120)
    plt.close(fig)
    print(f'plot written to {path}')

# command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type = Path, default = Path('runs/kv_arithmetic'), help = 'directory caching the trained m_A, m_B and composition weights (default: %(default)s)')
    parser.add_argument('--seed', type = int, default = 0, help = 'first seed (default: %(default)s)')
    parser.add_argument('--seeds', type = positive_int, default = 1, help = 'number of seeds to run, from --seed on; the table then shows mean ± sd (default: %(default)s)')
    parser.add_argument('--quick', action = 'store_true', help = 'a tiny configuration of the whole pipeline, in seconds (for tests; its numbers mean nothing)')
    parser.add_argument('--threads', type = positive_int, default = 1, help = 'CPU threads for torch; these models are too small to gain much from more, and on a shared machine extra threads slow everything down (default: %(default)s)')
    parser.add_argument('--plot', type = Path, default = None, help = 'where to write the PNG plot (default: <out>/kv_arithmetic.png)')
    parser.add_argument('--retrain', action = 'store_true', help = 'ignore cached weights and train everything again')
    parser.add_argument('--num-keys', type = positive_int, default = None, help = f'number of keys (default: {Config.num_keys})')
    parser.add_argument('--held-in-fraction', type = fraction, default = None, help = f'fraction of keys used in composition data (default: {Config.held_in_fraction})')
    parser.add_argument('--composition-steps', type = positive_int, default = None, help = f'composition training steps (default: {Config.composition_steps})')
    return parser.parse_args(argv)

def make_config(args: argparse.Namespace) -> Config:
    config = Config(**QUICK) if args.quick else Config()
    overrides = dict(num_keys = args.num_keys, held_in_fraction = args.held_in_fraction, composition_steps = args.composition_steps)
    return replace(config, **{name: value for name, value in overrides.items() if value is not None})

def main(argv: list[str] | None = None) -> list[SeedResult]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = make_config(args)
    started, cpu_started = time.time(), time.process_time()

    results = [run_seed(config, seed, args.out, args.retrain) for seed in range(args.seed, args.seed + args.seeds)]

    print(f'\nExact match (%), greedy decoding; {len(results)} seed(s){", mean ± sd" if len(results) > 1 else ""}; m_A and m_B alone decoded by a plain greedy loop, compositions by CALM.generate\n')
    print(table(results))
    print(f'\n{chance_note(results)}')
    # CPU time says what the run costs on an unshared machine; wall time also counts other processes
    print(f'time: {time.time() - started:.0f}s wall, {time.process_time() - cpu_started:.0f}s CPU ({", ".join(f"seed {r.seed}: {r.seconds:.0f}s wall" for r in results)})')

    plot(results, args.plot if args.plot is not None else args.out / 'kv_arithmetic.png')
    return results

if __name__ == '__main__':
    main()
