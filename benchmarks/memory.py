"""Peak memory of one CALM training step: plain, with activation checkpointing, with the frozen
models sharded over 2 processes (FSDP2), and with an int8 quantized anchor (each of the last two
also with checkpointing).

A Llama-like anchor of ~1B parameters and a Llama-like augment of ~300M, both built from configs
(random weights), composed with the default connections (every 4th augment layer, spread evenly
over the anchor); one step is forward, backward and an Adam step on the composition weights, at
batch 1 and sequence 1024.

    python benchmarks/memory.py                   # the ~1B anchor (float32: ~8 GiB at the peak, minutes per row)
    python benchmarks/memory.py --small           # tiny models: a check in seconds
    python benchmarks/memory.py --variants 'no checkpointing,checkpointing'
    python benchmarks/memory.py --variants 'fsdp (2 processes),quantized anchor'
    python benchmarks/memory.py --variants 'load from files (1 process),fsdp sharded load from files (2 processes)'

Each variant runs in a fresh subprocess, which reports its peak resident set (VmHWM, reset
before the measured step) with large allocations served by mmap, so that freed tensors leave the
resident set at once. It also reports what autograd saved for the backward (bytes of the distinct
storages that saved-tensor hooks saw), the part of the peak that checkpointing removes.

`limit` is an estimate, not a run: the least a step can hold at once, added up from the measured
parts (see `limit_row`): the interpreter with its libraries, the frozen weights, the composition's
weights with their gradients and the two Adam moments, the tensors the checkpointed backward must
keep (what autograd saved in the checkpointing run), and the activations of one anchor block,
alive while that block is recomputed.

Every row is also compared with the limit (peak / limit), and says how many bytes of frozen weights
each process holds: the raw int8 data and scales of a quantized weight, the local shard of a
sharded one; and compared with the limit for those bytes (the limit with the row's frozen bytes
in place of the whole float32 models).

Variants are a list (`VARIANTS`): a row is a name, a function changing the frozen models before
they are composed, one preparing the composition, and a launcher (default: one subprocess).

- 'fsdp (2 processes)': two subprocesses joined by gloo (as torchrun would start them), the frozen
  models sharded by `calm_pytorch.training.fsdp.shard_frozen_models` (what `FineTuner(strategy = 'fsdp')`
  calls), the replicated composition's gradients averaged as the FineTuner does; the row is the
  larger of the two processes' peaks. Each process builds the whole models before sharding them
  (that transient is before the measured step).
- 'load from files (1 process)' and 'fsdp sharded load from files (2 processes)': the frozen
  models saved once by `save_pretrained` (in `--files`, 1 GB shards with an index), the CALM built
  on meta and loaded by `calm_pytorch.training.sharded_loading.shard_and_load` (what
  `FineTuner(strategy = 'fsdp', frozen_checkpoints = ...)` calls): whole in one process, or each
  process its shards. Every row also reports its peak during load (from the first model built to
  the first step), against the whole load in one process.
- 'quantized anchor': the anchor's Linear weights int8 weight-only (torchao's
  `Int8WeightOnlyConfig`, as tests/test_quantized.py does it), the augment float32.
- '... + checkpointing': `calm.gradient_checkpointing_enable()` first (before sharding).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

# setups

@dataclass(frozen = True)
class Setup:
    name: str
    anchor: dict            # LlamaConfig keywords
    augment: dict
    seq_len: int = 1024
    batch: int = 1
    heads: int = 16         # cross-attention heads and their width
    dim_head: int = 64
    dtype: str = 'float32'  # of the frozen models; the composition stays float32

def llama_config(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, vocab: int = 32000) -> dict:
    return dict(
        vocab_size = vocab, hidden_size = hidden, num_hidden_layers = layers, intermediate_size = intermediate,
        num_attention_heads = heads, num_key_value_heads = kv_heads, max_position_embeddings = 2048,
        tie_word_embeddings = True, bos_token_id = 1, eos_token_id = 2, pad_token_id = 0
    )

SETUPS = dict(
    # Llama-3.2-1B's shape with a 32k vocabulary: 1.04B parameters; the augment 0.28B
    big = Setup('big', anchor = llama_config(2048, 16, 8192, 32, 8), augment = llama_config(1024, 16, 4096, 16, 4)),
    small = Setup('small', anchor = llama_config(256, 8, 1024, 4, 2, vocab = 2048), augment = llama_config(128, 8, 512, 4, 2, vocab = 2048), seq_len = 256, heads = 4, dim_head = 32),
)

# variants: how the composition is prepared before its step, and how the row is measured

@dataclass
class Variant:
    name: str
    models: Callable = lambda anchor, augment: None  # changes the frozen models in place, before composing
    prepare: Callable = lambda calm: None        # calm -> None, or a function called on the gradients after backward
    launch: Callable | None = None               # (setup, variant, threads) -> result dict; None: `run_child` in one subprocess
    options: dict = field(default_factory = dict)  # free-form, for a launcher's own use

def quantize_anchor(anchor, augment):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    quantize_(anchor, Int8WeightOnlyConfig())

def checkpointed(calm, then = lambda calm: None):
    # enabled before sharding, as a FineTuner user would: FineTuner(strategy = 'fsdp') shards
    calm.gradient_checkpointing_enable()
    return then(calm)

def shard(calm):
    # what FineTuner(strategy = 'fsdp') does: shard the frozen models, replicate the composition,
    # and average its gradients over the processes once per step
    from calm_pytorch.training.distributed import setup_distributed
    from calm_pytorch.training.fsdp import average_gradients, shard_frozen_models

    distributed = setup_distributed('cpu')
    shard_frozen_models(calm, distributed)
    return lambda params: average_gradients(params, distributed)

def load_from_files(setup: Setup, variant: Variant):
    """The composition built on meta and its frozen models loaded from the checkpoint files the
    parent wrote, by `shard_and_load` (what `FineTuner(strategy = 'fsdp', frozen_checkpoints = ...)`
    calls): sharded over the processes, or whole in one process."""
    from calm_pytorch.training.distributed import setup_distributed
    from calm_pytorch.training.fsdp import average_gradients
    from calm_pytorch.training.sharded_loading import shard_and_load

    with torch.device('meta'):
        anchor, augment = build_models(setup)
        calm = build_calm(setup, anchor, augment)

    distributed = setup_distributed('cpu')
    folder = variant.options['files']
    shard_and_load(calm, [os.path.join(folder, 'anchor'), os.path.join(folder, 'augment')], distributed = distributed)
    return anchor, augment, calm, lambda params: average_gradients(params, distributed)

VARIANTS = [
    Variant('no checkpointing'),
    Variant('checkpointing', prepare = lambda calm: calm.gradient_checkpointing_enable()),
    Variant('fsdp (2 processes)', prepare = shard, launch = lambda *args: launch_processes(*args), options = dict(processes = 2)),
    Variant('fsdp (2 processes) + checkpointing', prepare = lambda calm: checkpointed(calm, then = shard), launch = lambda *args: launch_processes(*args), options = dict(processes = 2)),
    Variant('load from files (1 process)', options = dict(load = load_from_files)),
    Variant('fsdp sharded load from files (2 processes)', launch = lambda *args: launch_processes(*args), options = dict(processes = 2, load = load_from_files)),
    Variant('quantized anchor', models = quantize_anchor),
    Variant('quantized anchor + checkpointing', models = quantize_anchor, prepare = lambda calm: checkpointed(calm)),
]

# the measured step, in a child process

def rss_bytes(field_name: str) -> int:
    with open('/proc/self/status') as status:
        for line in status:
            if line.startswith(field_name + ':'):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f'{field_name} not found in /proc/self/status')

def reset_peak_rss():
    # writing 5 to clear_refs resets VmHWM, the peak resident set (Linux >= 4.0)
    with open('/proc/self/clear_refs', 'w') as clear_refs:
        clear_refs.write('5')

def build_models(setup: Setup):
    import transformers
    transformers.logging.set_verbosity_error()

    torch.manual_seed(0)
    dtype = getattr(torch, setup.dtype)
    anchor = transformers.LlamaForCausalLM(transformers.LlamaConfig(**setup.anchor)).to(dtype)
    augment = transformers.LlamaForCausalLM(transformers.LlamaConfig(**setup.augment)).to(dtype)
    return anchor, augment

def build_calm(setup: Setup, anchor, augment):
    from calm_pytorch import CALM, AugmentParams
    return CALM(anchor, AugmentParams(model = augment), attn_kwargs = dict(heads = setup.heads, dim_head = setup.dim_head))

def nbytes(tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)

def plain_parts(tensor) -> list[torch.Tensor]:
    """The plain tensors a process holds for `tensor`: a sharded one's local shard, a quantized
    one's int8 data and scales (tensor subclasses flatten into their inner tensors)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return plain_parts(tensor.to_local())

    if type(tensor) in (torch.Tensor, torch.nn.Parameter, torch.nn.Buffer):
        return [tensor]

    names, _ = tensor.__tensor_flatten__()
    return [inner for name in names for inner in plain_parts(getattr(tensor, name))]

def held_bytes(tensors) -> int:
    # distinct storages: tied weights (the embedding and the head) count once
    storages = {}
    for tensor in tensors:
        for part in plain_parts(tensor):
            storages[part.untyped_storage().data_ptr()] = part.untyped_storage().nbytes()
    return sum(storages.values())

class SavedTensors:
    """Bytes of the distinct storages autograd saves for the backward while active, but for those
    of the module's weights (a linear layer saves its weight, which is held anyway). The weights
    are looked up at each save: FSDP2 swaps a block's shards for whole gathered tensors during its
    forward, and those are weights too."""

    def __init__(self, module):
        self.module = module
        self.storages = {}

    def weights(self) -> set[int]:
        tensors = [*self.module.parameters(), *self.module.buffers()]
        return {part.untyped_storage().data_ptr() for tensor in tensors for part in plain_parts(tensor)}

    def pack(self, tensor):
        parts = plain_parts(tensor)
        weights = self.weights()
        for part in parts:
            storage = part.untyped_storage()
            if storage.data_ptr() not in weights:
                self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

def run_child(setup: Setup, variant: Variant) -> dict:
    # the libraries are loaded before the interpreter's share is read (transformers loads a model's
    # code on first use of its name)
    import calm_pytorch  # noqa: F401
    import transformers
    transformers.LlamaForCausalLM, transformers.LlamaConfig

    interpreter = rss_bytes('VmRSS')
    reset_peak_rss()

    if 'load' in variant.options:
        anchor, augment, calm, after_backward = variant.options['load'](setup, variant)
        unsharded = sum(param.numel() for model in (anchor, augment) for param in model.parameters()) * torch.empty((), dtype = getattr(torch, setup.dtype)).element_size()
    else:
        anchor, augment = build_models(setup)
        unsharded = held_bytes([*anchor.parameters(), *anchor.buffers(), *augment.parameters(), *augment.buffers()])
        variant.models(anchor, augment)

        calm = build_calm(setup, anchor, augment)
        after_backward = variant.prepare(calm) or (lambda params: None)

    # building and loading: the peak before the first step
    load_peak = rss_bytes('VmHWM')
    gc.collect()

    composition = list(calm.cross_attns.parameters())
    optimizer = torch.optim.Adam(composition, lr = 1e-4)
    generator = torch.Generator().manual_seed(0)
    seq = torch.randint(3, setup.anchor['vocab_size'], (setup.batch, setup.seq_len + 1), generator = generator)

    def step(tokens) -> SavedTensors:
        with SavedTensors(calm) as saved:
            loss = calm(tokens, use_cache = False)
        loss.backward()
        after_backward(composition)
        optimizer.step()
        optimizer.zero_grad(set_to_none = False)  # gradients stay allocated, as in a training loop
        return saved

    # a short warm-up step creates the Adam state and the gradients
    step(seq[:, :9])

    gc.collect()
    before = rss_bytes('VmRSS')
    reset_peak_rss()
    saved = step(seq)
    peak = rss_bytes('VmHWM')

    units = calm.anchor_adapter.checkpoint_units()

    return dict(
        peak = peak,
        load_peak = load_peak,
        before = before,
        interpreter = interpreter,
        saved = saved.bytes,
        frozen = unsharded,
        frozen_held = held_bytes([*anchor.parameters(), *anchor.buffers(), *augment.parameters(), *augment.buffers()]),
        composition = nbytes(composition),
        anchor_params = sum(param.numel() for param in anchor.parameters()),
        augment_params = sum(param.numel() for param in augment.parameters()),
        checkpointed_blocks = len(calm.checkpointed_modules),
        anchor_blocks = len(units),
        block_input = setup.batch * setup.seq_len * setup.anchor['hidden_size'] * torch.empty((), dtype = getattr(torch, setup.dtype)).element_size()
    )

def child_options(variant: Variant) -> dict:
    # what a child needs of the parent's options: where the checkpoint files are
    return {key: value for key, value in variant.options.items() if key == 'files'}

def write_checkpoints(setup: Setup, folder: str):
    """The frozen models' files as transformers saves them (safetensors shards and an index), once."""
    if os.path.isfile(os.path.join(folder, 'augment', 'config.json')):
        return

    anchor, augment = build_models(setup)
    anchor.save_pretrained(os.path.join(folder, 'anchor'), max_shard_size = '1GB')
    augment.save_pretrained(os.path.join(folder, 'augment'), max_shard_size = '1GB')

def run_in_subprocess(setup: Setup, variant: Variant, threads: int) -> dict:
    # glibc keeps freed heap blocks resident; served by mmap, a freed tensor leaves the resident set at once
    env = {**os.environ, 'MALLOC_MMAP_THRESHOLD_': '65536'}
    command = [sys.executable, __file__, '--child', json.dumps(dict(setup = asdict(setup), variant = variant.name, options = child_options(variant))), '--threads', str(threads)]
    result = subprocess.run(command, env = env, capture_output = True, text = True)

    if result.returncode != 0:
        raise RuntimeError(f'the run of {variant.name!r} failed:\n{result.stderr[-3000:]}')

    return json.loads(result.stdout.strip().splitlines()[-1])

def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]

def launch_processes(setup: Setup, variant: Variant, threads: int) -> dict:
    """The variant in `options['processes']` subprocesses joined as torchrun would join them; the
    row holds the largest peak and resting memory of any process, each process's in `ranks`."""

    world_size = variant.options['processes']
    env = {**os.environ, 'MALLOC_MMAP_THRESHOLD_': '65536', 'WORLD_SIZE': str(world_size), 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(free_port())}
    command = [sys.executable, __file__, '--child', json.dumps(dict(setup = asdict(setup), variant = variant.name, options = child_options(variant))), '--threads', str(threads)]

    processes = [
        subprocess.Popen(command, env = {**env, 'RANK': str(rank), 'LOCAL_RANK': str(rank)}, stdout = subprocess.PIPE, stderr = subprocess.PIPE, text = True)
        for rank in range(world_size)
    ]
    outputs = [process.communicate() for process in processes]

    for rank, (process, (_, stderr)) in enumerate(zip(processes, outputs)):
        if process.returncode != 0:
            raise RuntimeError(f'rank {rank} of {variant.name!r} failed:\n{stderr[-3000:]}')

    ranks = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]
    row = {key: max(rank[key] for rank in ranks) for key in ('peak', 'load_peak', 'interpreter', 'before', 'saved', 'frozen_held')}
    return {**ranks[0], **row, 'ranks': ranks}

# the limit, from the measured parts

def limit_row(plain: dict, checkpointed: dict) -> dict:
    """The least one step can hold: interpreter + frozen weights + composition weights, their
    gradients and two Adam moments + what the checkpointed backward keeps (autograd's saved
    tensors in the checkpointing run: each checkpointed block's input, the cross-attentions,
    the logits for the loss, ...) + one block's activations during its recompute (the
    activations checkpointing removed, divided among the checkpointed blocks)."""

    blocks = max(checkpointed['checkpointed_blocks'], 1)
    one_block = (plain['saved'] - checkpointed['saved']) / blocks + checkpointed['block_input']
    activations = checkpointed['saved'] + one_block
    static = plain['interpreter'] + plain['frozen'] + 4 * plain['composition']
    return dict(peak = static + activations, before = static, saved = activations, frozen_held = plain['frozen'], frozen = plain['frozen'])

# report

def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            cpu = next(line.split(':', 1)[1].strip() for line in cpuinfo if line.startswith('model name'))
    except (OSError, StopIteration):
        pass

    with open('/proc/meminfo') as meminfo:
        total = int(next(line for line in meminfo if line.startswith('MemTotal')).split()[1]) * 1024

    return f'{cpu}, {os.cpu_count()} cores, {total / 2 ** 30:.0f} GiB, {torch.get_num_threads()} threads, torch {torch.__version__}'

def gib(value: float) -> str:
    return f'{value / 2 ** 30:.2f} GiB'

def main():
    parser = argparse.ArgumentParser(description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--small', action = 'store_true', help = 'tiny models: a check in seconds')
    parser.add_argument('--variants', default = ','.join(variant.name for variant in VARIANTS), help = 'comma-separated, from: ' + ', '.join(variant.name for variant in VARIANTS))
    parser.add_argument('--seq-len', type = int, default = None)
    parser.add_argument('--dtype', default = None, help = 'of the frozen models: float32 (default) or bfloat16')
    parser.add_argument('--threads', type = int, default = 1, help = 'torch threads (1 on a shared machine)')
    parser.add_argument('--files', default = os.path.join(os.path.expanduser('~'), '.cache', 'calm_pytorch', 'memory-benchmark'), help = 'where the load rows write (once) and read the frozen models\' checkpoint files')
    parser.add_argument('--child', default = None, help = argparse.SUPPRESS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    by_name = {variant.name: variant for variant in VARIANTS}

    if args.child is not None:
        child = json.loads(args.child)
        variant = by_name[child['variant']]
        variant.options = {**variant.options, **child.get('options', {})}
        print(json.dumps(run_child(Setup(**child['setup']), variant)))
        return

    setup = SETUPS['small' if args.small else 'big']
    overrides = {key: value for key, value in dict(seq_len = args.seq_len, dtype = args.dtype).items() if value is not None}
    setup = Setup(**{**asdict(setup), **overrides})

    names = [name for name in args.variants.split(',') if name]
    unknown = [name for name in names if name not in by_name]
    if unknown:
        parser.error(f'unknown variants {unknown}; choose from {list(by_name)}')

    files = os.path.join(args.files, f'{setup.name}-{setup.dtype}')
    if any('load' in by_name[name].options for name in names):
        write_checkpoints(setup, files)

    results = {}
    for name in names:
        variant = by_name[name]
        variant.options = {**variant.options, 'files': files} if 'load' in variant.options else variant.options
        results[name] = variant.launch(setup, variant, args.threads) if variant.launch is not None else run_in_subprocess(setup, variant, args.threads)
        print(f'{name}: peak {gib(results[name]["peak"])}, resting {gib(results[name]["before"])}', file = sys.stderr, flush = True)  # progress, on long runs

    first = next(iter(results.values()))
    print(f'machine: {machine()}')
    print(f'anchor {first["anchor_params"] / 1e9:.2f}B parameters, augment {first["augment_params"] / 1e9:.2f}B, {setup.dtype}; '
          f'composition {first["composition"] / 4 / 1e6:.1f}M float32 parameters; batch {setup.batch}, sequence {setup.seq_len}; '
          f'checkpointed anchor blocks: {max(row["checkpointed_blocks"] for row in results.values())} of {first["anchor_blocks"]}')
    print('peak: peak RSS of the step (of the larger process with FSDP); vs limit: peak / the limit row; frozen held: bytes of frozen weights '
          'one process holds (vs unsharded: / the float32 models); limit with the frozen held: the limit, its frozen weights replaced by the row\'s; above resting: the peak less the RSS between steps (weights, optimizer state); '
          'kept for backward: the tensors autograd saved (for the limit, with one block recomputing)\n')

    rows = dict(results)
    if 'no checkpointing' in results and 'checkpointing' in results:
        rows['limit (estimate)'] = limit_row(results['no checkpointing'], results['checkpointing'])

    reference = results.get('no checkpointing')
    limit = rows.get('limit (estimate)')
    header = '| variant | peak | peak vs limit | frozen held | frozen vs unsharded | peak vs limit with the frozen held | above resting | kept for backward | above resting vs no checkpointing |'
    print(header)
    print('|' + '---|' * (header.count('|') - 1))

    for name, row in rows.items():
        versus = f'{(row["peak"] - row["before"]) / (reference["peak"] - reference["before"]):.2f}x' if reference else '-'
        versus_limit = f'{row["peak"] / limit["peak"]:.2f}x' if limit else '-'
        # the same limit, with the frozen bytes this row holds in place of the whole float32 models
        versus_own = f'{row["peak"] / (limit["peak"] - limit["frozen"] + row["frozen_held"]):.2f}x' if limit else '-'
        print(f'| {name} | {gib(row["peak"])} | {versus_limit} | {gib(row["frozen_held"])} | {row["frozen_held"] / row["frozen"]:.2f}x | {versus_own} | '
              f'{gib(row["peak"] - row["before"])} | {gib(row["saved"])} | {versus} |')

    # building and loading the models, before the first step: whole in one process against each
    # process's part, read from the files
    whole_load = results.get('load from files (1 process)')
    print('\npeak during load: peak RSS from the first model built to the first step (the interpreter included); above the interpreter: less the RSS of the '
          'interpreter with its libraries, before any model; vs whole load: / the same for loading the whole models from the files in one process\n')
    print('| variant | peak during load | above the interpreter | vs whole load | peak vs whole load | peak during the step |')
    print('|---|---|---|---|---|---|')

    for name, row in results.items():
        above = row['load_peak'] - row['interpreter']
        versus_whole = f'{above / (whole_load["load_peak"] - whole_load["interpreter"]):.2f}x' if whole_load else '-'
        versus_peak = f'{row["load_peak"] / whole_load["load_peak"]:.2f}x' if whole_load else '-'
        print(f'| {name} | {gib(row["load_peak"])} | {gib(above)} | {versus_whole} | {versus_peak} | {gib(row["peak"])} |')

    print()

    for name, row in results.items():
        for rank, one in enumerate(row.get('ranks', [])):
            print(f'{name}, rank {rank}: peak {gib(one["peak"])}, during load {gib(one["load_peak"])}, resting {gib(one["before"])}, frozen held {gib(one["frozen_held"])} of {gib(one["frozen"])}, kept for backward {gib(one["saved"])}')

if __name__ == '__main__':
    main()
