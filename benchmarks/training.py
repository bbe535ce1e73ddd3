"""What a CALM training step costs, against the least it could cost.

A composition step cannot cost less than its parts: the frozen augments' forward up to their
deepest connected layer (no gradients), the anchor's forward and backward (activation gradients
only), and the small cross-attentions. `limit` runs exactly those parts by hand, with no library;
`calm_pytorch` runs the same composition through `CALM`; `calm_pytorch compiled` is the same under
`torch.compile`; `CALM-Pytorch` (the first public implementation) runs the same models and
connections through its own API when it is importable.

    python benchmarks/training.py                 # README sizes and a larger pair (slow on a CPU)
    python benchmarks/training.py --quick         # tiny models, a few steps: a sanity check
    python benchmarks/training.py --sizes readme --modes aligned --augments 1 --steps 10

Step time: the median over `--steps` steps after `--warmup` steps, all variants of one setup
interleaved step by step in one process, so that machine noise hits them alike.
Peak memory: one fresh subprocess per variant; on CUDA `torch.cuda.max_memory_allocated`, on CPU
the process's peak resident set (VmHWM, reset after the warm-up), with large allocations served
by mmap so that freed tensors leave the resident set at once.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.nn import Module, ModuleList
from x_transformers import Decoder, TransformerWrapper

from calm_pytorch import CALM, AugmentParams, CrossAttentionBlock

def exists(value) -> bool:
    return value is not None

# setups

@dataclass(frozen = True)
class Setup:
    size: str
    dim_anchor: int
    dim_augment: int
    depth: int
    heads_anchor: int
    heads_augment: int
    num_tokens: int
    max_seq_len: int
    batch: int
    seq_len: int             # tokens the anchor reads (and the context length in context mode)
    mode: str = 'aligned'    # 'aligned': augments read the anchor's tokens; 'context': their own
    num_augments: int = 1
    every: int = 4           # connect every n-th augment layer (the paper's choice)
    heads: int = 8           # cross-attention heads
    dim_head: int = 64

    @property
    def connections(self) -> tuple[tuple[int, int], ...]:
        # anchor and augments have the same depth here, so augment layer k feeds anchor layer k
        return tuple((layer, layer) for layer in range(self.every, self.depth + 1, self.every))

    @property
    def label(self) -> str:
        return f'{self.size}, {self.mode}, {self.num_augments} augment{"s" if self.num_augments > 1 else ""}'

SIZES = dict(
    # the README's models
    readme = Setup('readme', dim_anchor = 512, dim_augment = 256, depth = 12, heads_anchor = 8, heads_augment = 8, num_tokens = 20000, max_seq_len = 1024, batch = 2, seq_len = 512),
    # a larger pair
    large = Setup('large', dim_anchor = 1024, dim_augment = 512, depth = 12, heads_anchor = 16, heads_augment = 8, num_tokens = 20000, max_seq_len = 1024, batch = 4, seq_len = 512),
    # a sanity check that runs in seconds
    quick = Setup('quick', dim_anchor = 64, dim_augment = 32, depth = 8, heads_anchor = 4, heads_augment = 4, num_tokens = 512, max_seq_len = 128, batch = 2, seq_len = 64, heads = 4, dim_head = 16),
)

# models: the frozen ones are built once per setup and shared (weights, not modules) by all variants

def build_frozen(setup: Setup, device: torch.device, seed: int = 0) -> tuple[Module, list[Module]]:
    torch.manual_seed(seed)

    def decoder(dim, heads):
        model = TransformerWrapper(num_tokens = setup.num_tokens, max_seq_len = setup.max_seq_len, attn_layers = Decoder(dim = dim, depth = setup.depth, heads = heads))
        return model.to(device).eval().requires_grad_(False)

    anchor = decoder(setup.dim_anchor, setup.heads_anchor)
    augments = [decoder(setup.dim_augment, setup.heads_augment) for _ in range(setup.num_augments)]
    return anchor, augments

def sharing_weights(model: Module) -> Module:
    """A new module tree over the same parameters and buffers: each variant hooks its own tree
    without paying for a second copy of the weights."""
    memo = {id(tensor): tensor for tensor in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)

def batch_for(setup: Setup, device: torch.device, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, setup.num_tokens, (setup.batch, setup.seq_len + 1), generator = generator).to(device)
    prompt = torch.randint(0, setup.num_tokens, (setup.batch, setup.seq_len), generator = generator).to(device)
    return dict(seq = seq, prompt = prompt if setup.mode == 'context' else None)

# the limit: the parts run by hand

def sublayers(model: TransformerWrapper):
    """(pre_norm, branch, residual) of each sublayer in execution order, for the plain pre-norm
    stacks built here; anything fancier is refused rather than computed differently."""
    attn_layers = model.attn_layers

    for index in attn_layers.layers_execute_order:
        (pre_norm, post_branch_norm, post_main_norm), branch, residual = attn_layers.layers[index]
        assert post_branch_norm is None and post_main_norm is None and attn_layers.layer_types[index] in ('a', 'f'), 'the hand-written limit covers plain pre-norm decoders only'
        yield pre_norm, branch, residual

def run_block(sublayers_of_block, x: Tensor) -> Tensor:
    for pre_norm, branch, residual in sublayers_of_block:
        x = residual(branch(pre_norm(x)), x)
    return x

def blocks(model: TransformerWrapper) -> list[list]:
    # a block is an attention sublayer and its feedforward
    layers = list(sublayers(model))
    return [layers[i:i + 2] for i in range(0, len(layers), 2)]

def embed(model: TransformerWrapper, tokens: Tensor) -> Tensor:
    x = model.token_emb(tokens) + model.pos_emb(tokens)
    return model.project_emb(model.emb_dropout(model.post_emb_norm(x)))

class Limit(Module):
    """The composition written out by hand: each augment's blocks up to its deepest connected one
    under no_grad, then the anchor's blocks with the cross-attention deltas added after the
    connected ones, then the loss. Nothing is hooked, recorded or checked."""

    def __init__(self, anchor: Module, augments: list[Module], connections: tuple[tuple[int, int], ...], cross_attns: ModuleList, aligned: bool):
        super().__init__()
        self.anchor = anchor
        self.augments = ModuleList(augments)
        self.cross_attns = cross_attns
        self.aligned = aligned
        self.anchor_blocks = blocks(anchor)
        self.augment_blocks = [blocks(augment) for augment in augments]
        self.deepest = max(augment_layer for augment_layer, _ in connections)

        # anchor layer -> [(augment index, augment layer, cross-attention)]
        self.injections = {}
        for index, augment_cross_attns in enumerate(cross_attns):
            for (augment_layer, anchor_layer), cross_attn in zip(connections, augment_cross_attns):
                self.injections.setdefault(anchor_layer, []).append((index, augment_layer, cross_attn))

    def forward(self, seq: Tensor, prompt: Tensor | None = None) -> Tensor:
        inputs, labels = seq[:, :-1], seq[:, 1:]

        hiddens = []  # per augment: layer -> (b, j, dim_augment)

        with torch.no_grad():
            for augment, augment_blocks in zip(self.augments, self.augment_blocks):
                x, recorded = embed(augment, inputs if self.aligned else prompt), {}
                for layer, block in enumerate(augment_blocks[:self.deepest], start = 1):
                    x = recorded[layer] = run_block(block, x)
                hiddens.append(recorded)

        x = embed(self.anchor, inputs)

        for layer, block in enumerate(self.anchor_blocks, start = 1):
            x = run_block(block, x)

            if layer in self.injections:
                delta = 0.
                for index, augment_layer, cross_attn in self.injections[layer]:
                    delta = delta + cross_attn(x, hiddens[index][augment_layer], causal = self.aligned)
                x = x + delta

        logits = self.anchor.to_logits(self.anchor.attn_layers.final_norm(x))
        return F.cross_entropy(rearrange(logits, 'b n c -> (b n) c'), rearrange(labels, 'b n -> (b n)'))

def cross_attns_for(setup: Setup, device: torch.device, seed: int = 2) -> ModuleList:
    torch.manual_seed(seed)
    return ModuleList([
        ModuleList([CrossAttentionBlock(setup.dim_anchor, setup.dim_augment, heads = setup.heads, dim_head = setup.dim_head) for _ in setup.connections])
        for _ in range(setup.num_augments)
    ]).to(device)

# the variants: each returns (module whose call gives the loss, its trainable parameters)

def calm_pytorch_available() -> bool:
    try:
        import CALM_pytorch  # noqa: F401
    except ImportError:
        return False
    return True

def make_limit(setup, anchor, augments):
    cross_attns = cross_attns_for(setup, anchor.token_emb.emb.weight.device)
    limit = Limit(anchor, augments, setup.connections, cross_attns, aligned = setup.mode == 'aligned')
    return limit, list(cross_attns.parameters())

def make_calm(setup, anchor, augments):
    calm = CALM(
        anchor,
        [AugmentParams(model = augment, connections = setup.connections) for augment in augments],
        attn_kwargs = dict(heads = setup.heads, dim_head = setup.dim_head)
    )
    # the same initial weights as the limit's
    calm.cross_attns.load_state_dict(cross_attns_for(setup, anchor.token_emb.emb.weight.device).state_dict())
    return calm, list(calm.cross_attns.parameters())

def make_compiled(setup, anchor, augments):
    calm, params = make_calm(setup, anchor, augments)
    return torch.compile(calm), params

def make_calm_original(setup, anchor, augments):
    from CALM_pytorch import CALM as OriginalCALM, AugmentParams as OriginalAugmentParams

    calm = OriginalCALM(
        anchor,
        [OriginalAugmentParams(model = augment, connections = setup.connections) for augment in augments],
        attn_kwargs = dict(linear_project_context = True, pre_rmsnorm = True, flash = True, heads = setup.heads, dim_head = setup.dim_head)
    )
    calm = calm.to(anchor.token_emb.emb.weight.device)
    return OriginalLoss(calm), list(calm.cross_attns.parameters())

class OriginalLoss(Module):
    """CALM-Pytorch has no aligned mode of its own: its augments are given the anchor's input tokens as prompt."""

    def __init__(self, calm: Module):
        super().__init__()
        self.calm = calm

    def forward(self, seq: Tensor, prompt: Tensor | None = None) -> Tensor:
        return self.calm(seq, prompt = prompt if exists(prompt) else seq[:, :-1])

VARIANTS: dict[str, Callable] = {
    'limit': make_limit,
    'calm_pytorch': make_calm,
    'calm_pytorch compiled': make_compiled,
    'CALM-Pytorch': make_calm_original,
}

class Trainer:
    """One variant: its model, its optimizer, and one training step."""

    def __init__(self, name: str, setup: Setup, anchor: Module, augments: list[Module]):
        self.name = name
        self.model, params = VARIANTS[name](setup, anchor, augments)
        self.optimizer = torch.optim.AdamW(params, lr = 1e-4)

    def step(self, batch: dict) -> Tensor:
        loss = self.model(**batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none = True)
        return loss.detach()

def sync(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)

# timing: every variant in one process, interleaved step by step

def time_setup(setup: Setup, names: list[str], device: torch.device, warmup: int, steps: int) -> dict[str, float]:
    anchor, augments = build_frozen(setup, device)
    trainers = [Trainer(name, setup, sharing_weights(anchor), [sharing_weights(augment) for augment in augments]) for name in names]
    batch = batch_for(setup, device)
    times = {name: [] for name in names}

    for round in range(warmup + steps):
        # rotate the order, so that no variant always runs right after the same one
        shift = round % len(trainers)
        for trainer in trainers[shift:] + trainers[:shift]:
            sync(device)
            start = time.perf_counter()
            trainer.step(batch)
            sync(device)
            if round >= warmup:
                times[trainer.name].append(time.perf_counter() - start)

    return {name: statistics.median(samples) for name, samples in times.items()}

# memory: one fresh process per variant

def rss_bytes(field: str) -> int:
    with open('/proc/self/status') as status:
        for line in status:
            if line.startswith(field + ':'):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f'{field} not found in /proc/self/status')

def reset_peak_rss():
    # writing 5 to clear_refs resets VmHWM, the peak resident set (Linux >= 4.0)
    with open('/proc/self/clear_refs', 'w') as clear_refs:
        clear_refs.write('5')

def measure_memory_child(setup: Setup, name: str, device: torch.device, warmup: int, steps: int) -> dict:
    anchor, augments = build_frozen(setup, device)
    trainer = Trainer(name, setup, anchor, augments)
    batch = batch_for(setup, device)

    for _ in range(warmup):
        trainer.step(batch)

    sync(device)

    if device.type == 'cuda':
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = rss_bytes('VmRSS')
        reset_peak_rss()

    for _ in range(steps):
        trainer.step(batch)

    sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else rss_bytes('VmHWM')
    return dict(peak = peak, base = base)

def measure_memory(setup: Setup, name: str, device: torch.device, warmup: int, steps: int) -> dict:
    # glibc keeps freed blocks of the heap in the resident set; served by mmap, a freed tensor
    # leaves it at once, so the peak measures live memory and not the allocator's history
    env = {**os.environ, 'MALLOC_MMAP_THRESHOLD_': '65536'}
    args = dict(setup = asdict(setup), name = name, device = str(device), warmup = warmup, steps = steps)
    command = [sys.executable, __file__, '--child', json.dumps(args), '--threads', str(torch.get_num_threads())]
    result = subprocess.run(command, env = env, capture_output = True, text = True)

    if result.returncode != 0:
        raise RuntimeError(f'the memory run of {name} on {setup.label} failed:\n{result.stderr[-3000:]}')

    return json.loads(result.stdout.strip().splitlines()[-1])

# report

def machine() -> str:
    if torch.cuda.is_available():
        return f'{torch.cuda.get_device_name()}, torch {torch.__version__}'

    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            cpu = next(line.split(':', 1)[1].strip() for line in cpuinfo if line.startswith('model name'))
    except (OSError, StopIteration):
        pass

    return f'{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}'

def ratio(value: float, limit: float) -> str:
    return f'{value / limit:.2f}x'

def main():
    parser = argparse.ArgumentParser(description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action = 'store_true', help = 'tiny models and few steps, a sanity check (minutes on a CPU: most of it compiles the torch.compile variant; add --variants limit,calm_pytorch for seconds)')
    parser.add_argument('--sizes', default = 'readme,large', help = 'comma-separated: readme, large, quick')
    parser.add_argument('--modes', default = 'aligned,context')
    parser.add_argument('--augments', default = '1,3', help = 'comma-separated numbers of augments')
    parser.add_argument('--variants', default = ','.join(VARIANTS), help = 'comma-separated, from: ' + ', '.join(VARIANTS))
    parser.add_argument('--warmup', type = int, default = 3)
    parser.add_argument('--steps', type = int, default = 10)
    parser.add_argument('--batch', type = int, default = None, help = 'override every size\'s batch')
    parser.add_argument('--seq-len', type = int, default = None, help = 'override every size\'s sequence length')
    parser.add_argument('--no-memory', action = 'store_true', help = 'skip the per-variant memory runs')
    parser.add_argument('--device', default = 'cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type = int, default = None, help = 'CPU threads for torch (on a shared machine, fewer threads than cores avoids spinning on contention)')
    parser.add_argument('--child', default = None, help = argparse.SUPPRESS)
    args = parser.parse_args()

    device = torch.device(args.device)

    if exists(args.threads):
        torch.set_num_threads(args.threads)

    if exists(args.child):
        child = json.loads(args.child)
        setup = Setup(**child['setup'])
        print(json.dumps(measure_memory_child(setup, child['name'], device, child['warmup'], child['steps'])))
        return

    if args.quick:
        args.sizes, args.warmup, args.steps = 'quick', 2, 5

    names = [name for name in args.variants.split(',') if name]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f'unknown variants {unknown}; choose from {list(VARIANTS)}')

    if 'CALM-Pytorch' in names and not calm_pytorch_available():
        print('CALM-Pytorch is not installed (`pip install CALM-Pytorch` to compare with it); its rows are left out\n')
        names.remove('CALM-Pytorch')

    if names[0] != 'limit':
        names = ['limit', *[name for name in names if name != 'limit']]

    setups = []
    for size in args.sizes.split(','):
        for mode in args.modes.split(','):
            for num_augments in map(int, args.augments.split(',')):
                setup = replace(SIZES[size], mode = mode, num_augments = num_augments)
                setup = replace(setup, batch = args.batch or setup.batch, seq_len = args.seq_len or setup.seq_len)
                setups.append(setup)

    print(f'machine: {machine()}')
    print(f'step: forward + backward + AdamW step; median of {args.steps} steps after {args.warmup} warm-up steps, variants interleaved')
    memory_kind = 'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'peak RSS of a process running only that variant (weights included)'
    print(f'peak memory: {memory_kind}; above resting: that peak less the memory held between steps (weights, optimizer state)\n')

    header = '| setup | variant | step | vs limit | peak memory | vs limit | above resting | vs limit |'
    print(header)
    print('|' + '---|' * (header.count('|') - 1))

    for setup in setups:
        times = time_setup(setup, names, device, args.warmup, args.steps)
        memory = {} if args.no_memory else {name: measure_memory(setup, name, device, warmup = 2, steps = 2) for name in names}
        sizes = f'{setup.label} (b={setup.batch}, n={setup.seq_len})'

        for name in names:
            row = [sizes, name, f'{times[name] * 1e3:.0f} ms', ratio(times[name], times['limit'])]

            if name in memory:
                peak, above = memory[name]['peak'], memory[name]['peak'] - memory[name]['base']
                limit_peak, limit_above = memory['limit']['peak'], memory['limit']['peak'] - memory['limit']['base']
                row += [f'{peak / 2 ** 20:.0f} MiB', ratio(peak, limit_peak), f'{above / 2 ** 20:.0f} MiB', ratio(above, limit_above)]
            else:
                row += ['', '', '', '']

            print('| ' + ' | '.join(row) + ' |', flush = True)

if __name__ == '__main__':
    main()
