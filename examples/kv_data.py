"""Data of the key-value arithmetic experiment (Bansal et al. 2024, section 4.1, at toy scale).

Everything is generated in code from a seed: a vocabulary, a table of keys with values, the
training data of the two single models, the composition data and the evaluation sets.

Formats (one token per symbol; `K17` is a single token; answers are written least-significant
digit first and zero-padded to a fixed width, so 13 is written `3 1` and 7 is written `7 0`,
which lets a tiny model add from the first digit on):

    numeric arithmetic    <bos> 4 + 9 + 0 = 3 1 <eos>
    key-value arithmetic  <bos> K17 + K802 + K5 = 3 1 <eos>
    key-value substitution<bos> K17 + K802 + K5 : 4 + 9 + 0 <eos>
    key=value lines       <bos> K17 = 4 ; K802 = 9 <eos>
    key-value listing     <bos> K17 4 K802 9 K5 0 <eos>

The listing format asks for a key's value at the key's own position. Trained on it, the augment
holds each value right where the key is, which is where the anchor (reading the same tokens)
can pick it up; trained on substitution alone it keeps values elsewhere and the composition
falls back to memorising keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# vocabulary

PAD, BOS, EOS, EQUALS, PLUS, COLON, SEMICOLON = range(7)
SYMBOLS = ('<pad>', '<bos>', '<eos>', '=', '+', ':', ';')
FIRST_DIGIT = len(SYMBOLS)
FIRST_KEY = FIRST_DIGIT + 10
MAX_VALUE = 9  # every value is a single digit, the same tokens the anchor adds up

def num_tokens(num_keys: int) -> int:
    return FIRST_KEY + num_keys

def digit_tokens(digits: Tensor) -> Tensor:
    return digits + FIRST_DIGIT

def key_tokens(keys: Tensor) -> Tensor:
    return keys + FIRST_KEY

def answer_width(operands: int) -> int:
    return len(str(MAX_VALUE * operands))

def number_tokens(numbers: Tensor, width: int) -> Tensor:
    """(b,) non-negative integers -> (b, width) digit tokens, least-significant digit first."""
    powers = 10 ** torch.arange(width, device = numbers.device)
    return digit_tokens((numbers[:, None] // powers) % 10)

def to_text(tokens: Tensor | list[int]) -> str:
    """Readable form of one sequence, for printing examples."""
    words = []

    for token in (tokens.tolist() if isinstance(tokens, Tensor) else tokens):
        if token < FIRST_DIGIT:
            words.append(SYMBOLS[token])
        elif token < FIRST_KEY:
            words.append(str(token - FIRST_DIGIT))
        else:
            words.append(f'K{token - FIRST_KEY}')

    return ' '.join(words)

# the world: which key holds which value, and which keys the composition may see

@dataclass
class World:
    values: Tensor     # (num_keys,) the value of each key, 0..9
    held_in: Tensor    # (k,) keys allowed in the composition data
    held_out: Tensor   # (num_keys - k,) keys kept for evaluation only
    operands: int      # keys (or numbers) per expression

    @property
    def num_keys(self) -> int:
        return self.values.shape[0]

def make_world(num_keys: int, held_in_fraction: float, operands: int, generator: torch.Generator) -> World:
    num_held_in = round(num_keys * held_in_fraction)

    if not 0 < num_held_in < num_keys:
        raise ValueError(f'held_in_fraction={held_in_fraction} of {num_keys} keys leaves no held-in or no held-out keys')

    values = torch.randint(0, MAX_VALUE + 1, (num_keys,), generator = generator)
    order = torch.randperm(num_keys, generator = generator)
    return World(values, order[:num_held_in].sort().values, order[num_held_in:].sort().values, operands)

# an example set: prompts and the exact continuations expected (ending in <eos>)

@dataclass
class Examples:
    prompts: Tensor  # (b, p)
    targets: Tensor  # (b, t), the last token is EOS

    def __len__(self) -> int:
        return self.prompts.shape[0]

    def as_training(self) -> Batch:
        tokens = torch.cat((self.prompts, self.targets), dim = -1)
        loss_mask = torch.zeros_like(tokens, dtype = torch.bool)
        loss_mask[:, self.prompts.shape[-1]:] = True  # only the answer is learned: the operands are random
        return Batch(tokens, loss_mask)

@dataclass
class Batch:
    tokens: Tensor     # (b, n)
    loss_mask: Tensor  # (b, n) True where the token is a label to learn

def expression(operand_tokens: Tensor, operator: int = PLUS) -> Tensor:
    """(b, n) operand tokens -> (b, 2n - 1): o1 + o2 + ... + on"""
    b, n = operand_tokens.shape
    out = torch.full((b, 2 * n - 1), operator, dtype = torch.long)
    out[:, ::2] = operand_tokens
    return out

def column(token: int, batch: int) -> Tensor:
    return torch.full((batch, 1), token, dtype = torch.long)

def arithmetic(operand_tokens: Tensor, operand_values: Tensor, operands: int) -> Examples:
    """`<bos> a + b + c =` -> the sum, least-significant digit first, then <eos>"""
    b = operand_tokens.shape[0]
    prompts = torch.cat((column(BOS, b), expression(operand_tokens), column(EQUALS, b)), dim = -1)
    answers = number_tokens(operand_values.sum(dim = -1), answer_width(operands))
    return Examples(prompts, torch.cat((answers, column(EOS, b)), dim = -1))

def substitution(keys: Tensor, world: World) -> Examples:
    """`<bos> K1 + K2 + K3 :` -> `v1 + v2 + v3 <eos>`"""
    b = keys.shape[0]
    prompts = torch.cat((column(BOS, b), expression(key_tokens(keys)), column(COLON, b)), dim = -1)
    values = expression(digit_tokens(world.values[keys]))
    return Examples(prompts, torch.cat((values, column(EOS, b)), dim = -1))

def numeric_arithmetic(batch: int, operands: int, generator: torch.Generator) -> Examples:
    numbers = torch.randint(0, MAX_VALUE + 1, (batch, operands), generator = generator)
    return arithmetic(digit_tokens(numbers), numbers, operands)

def kv_arithmetic(keys: Tensor, world: World) -> Examples:
    return arithmetic(key_tokens(keys), world.values[keys], world.operands)

def sample_keys(pool: Tensor, batch: int, operands: int, generator: torch.Generator) -> Tensor:
    return pool[torch.randint(0, pool.shape[0], (batch, operands), generator = generator)]

# training data of the augment m_A: knowledge of keys, never any arithmetic

def fact_lines(keys: Tensor, world: World) -> Batch:
    """`<bos> K1 = v1 ; K2 = v2 <eos>`: the values are the labels"""
    b, n = keys.shape
    tokens = torch.full((b, 1 + 4 * n), SEMICOLON, dtype = torch.long)
    tokens[:, 0] = BOS
    tokens[:, 1::4] = key_tokens(keys)
    tokens[:, 2::4] = EQUALS
    tokens[:, 3::4] = digit_tokens(world.values[keys])
    tokens[:, -1] = EOS
    loss_mask = torch.zeros_like(tokens, dtype = torch.bool)
    loss_mask[:, 3::4] = True
    return Batch(tokens, loss_mask)

def listing(keys: Tensor, world: World) -> Batch:
    """`<bos> K1 v1 K2 v2 <eos>`: each value is predicted at its key's own position"""
    b, n = keys.shape
    tokens = torch.empty((b, 2 + 2 * n), dtype = torch.long)
    tokens[:, 0] = BOS
    tokens[:, 1:-1:2] = key_tokens(keys)
    tokens[:, 2:-1:2] = digit_tokens(world.values[keys])
    tokens[:, -1] = EOS
    loss_mask = torch.zeros_like(tokens, dtype = torch.bool)
    loss_mask[:, 2::2] = True
    return Batch(tokens, loss_mask)

def augment_batch(world: World, batch: int, generator: torch.Generator) -> Batch:
    """A third each of key=value lines, listings and substitutions, over all keys."""
    all_keys = torch.arange(world.num_keys)
    third = batch // 3
    n = world.operands

    return concat_batches([
        fact_lines(sample_keys(all_keys, third, 2, generator), world),
        listing(sample_keys(all_keys, third, n, generator), world),
        substitution(sample_keys(all_keys, batch - 2 * third, n, generator), world).as_training()
    ])

def anchor_batch(world: World, batch: int, generator: torch.Generator) -> Batch:
    return numeric_arithmetic(batch, world.operands, generator).as_training()

# composition data: arithmetic and substitution over the held-in keys only, plus plain arithmetic

@dataclass
class CompositionData:
    kv_arithmetic: Examples
    kv_substitution: Examples
    numeric: Examples

def make_composition_data(world: World, size: int, generator: torch.Generator, substitution_fraction: float = 0.2, numeric_fraction: float = 0.2) -> CompositionData:
    """`size` examples in all. The plain-number part keeps the anchor's own skill in use: without it
    the cross-attention is free to overwrite the anchor's digits and numeric accuracy collapses."""
    num_substitution = round(size * substitution_fraction)
    num_numeric = round(size * numeric_fraction)
    num_arithmetic = size - num_substitution - num_numeric
    n = world.operands

    return CompositionData(
        kv_arithmetic = kv_arithmetic(sample_keys(world.held_in, num_arithmetic, n, generator), world),
        kv_substitution = substitution(sample_keys(world.held_in, num_substitution, n, generator), world),
        numeric = numeric_arithmetic(num_numeric, n, generator)
    )

def composition_batch(data: CompositionData, batch: int, generator: torch.Generator) -> Batch:
    """Draws rows from each part in proportion to its size."""
    parts = [data.kv_arithmetic, data.kv_substitution, data.numeric]
    sizes = torch.tensor([len(part) for part in parts], dtype = torch.float)
    counts = torch.bincount(torch.multinomial(sizes, batch, replacement = True, generator = generator), minlength = len(parts))

    return concat_batches([
        take(part, torch.randint(0, len(part), (int(count),), generator = generator)).as_training()
        for part, count in zip(parts, counts) if count > 0
    ])

def take(examples: Examples, index: Tensor) -> Examples:
    return Examples(examples.prompts[index], examples.targets[index])

def concat_batches(batches: list[Batch]) -> Batch:
    """Right-pads to a common length: in a causal model, padding after a sequence changes nothing
    before it, and padded positions carry no label."""
    length = max(batch.tokens.shape[-1] for batch in batches)
    pad = lambda t, value: torch.nn.functional.pad(t, (0, length - t.shape[-1]), value = value)
    return Batch(
        torch.cat([pad(batch.tokens, PAD) for batch in batches]),
        torch.cat([pad(batch.loss_mask, False) for batch in batches])
    )

# evaluation sets: the paper's three tasks, key tasks on held-out keys

@dataclass
class EvalSets:
    kv_substitution: Examples        # held-out keys
    numeric: Examples
    kv_arithmetic_held_out: Examples  # keys never seen in composition training
    kv_arithmetic_held_in: Examples   # keys seen in composition training, new expressions

def make_eval_sets(world: World, size: int, composition: CompositionData, generator: torch.Generator) -> EvalSets:
    n = world.operands
    seen = {tuple(row) for row in composition.kv_arithmetic.prompts.tolist()}

    held_in = kv_arithmetic(sample_keys(world.held_in, 2 * size, n, generator), world)
    unseen = torch.tensor([tuple(row) not in seen for row in held_in.prompts.tolist()])
    held_in = take(held_in, unseen.nonzero().squeeze(-1)[:size])

    if len(held_in) == 0:
        raise ValueError(
            f'the composition data holds every expression of {n} keys drawn from the {len(world.held_in)} held-in keys: no new '
            'held-in expression is left to evaluate; use more keys (--num-keys) or a larger --held-in-fraction'
        )

    return EvalSets(
        kv_substitution = substitution(sample_keys(world.held_out, size, n, generator), world),
        numeric = numeric_arithmetic(size, n, generator),
        kv_arithmetic_held_out = kv_arithmetic(sample_keys(world.held_out, size, n, generator), world),
        kv_arithmetic_held_in = held_in
    )

# scoring

def exact_match(generated: Tensor, targets: Tensor) -> Tensor:
    """(b, m) generated tokens, (b, t) targets ending in <eos> -> (b,) bool.

    A prediction is right when its tokens up to and including its first <eos> are exactly the
    target; whatever follows <eos> (padding) is ignored. Too short an output is wrong."""
    t = targets.shape[-1]

    if generated.shape[-1] < t:
        return torch.zeros(targets.shape[0], dtype = torch.bool)

    return (generated[:, :t] == targets).all(dim = -1)

def chance_accuracy(world: World, operands: int | None = None) -> float:
    """Best accuracy without knowing any held-out value: always answer the most likely sum of
    `operands` values drawn like the held-out keys' values (exact, by convolution)."""
    operands = operands if operands is not None else world.operands
    counts = torch.bincount(world.values[world.held_out], minlength = MAX_VALUE + 1).double()
    single = counts / counts.sum()
    total = torch.ones(1, dtype = torch.double)

    for _ in range(operands):
        total = torch.nn.functional.conv1d(total[None, None], single.flip(0)[None, None], padding = MAX_VALUE)[0, 0]

    return total.max().item()
