from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
import transformers
from safetensors.torch import load_file, save_file

from calm_pytorch import CALM, AugmentParams, FineTuner
from calm_pytorch.training import sharded_loading
from calm_pytorch.training.fsdp import local_and_global_numel
from calm_pytorch.training.sharded_loading import shard_and_load

from hf_models import LLAMA_LIKE, VOCAB
from conftest import assert_close, composition, counting_sequences, decoder, free_port

# A composition built on the meta device whose frozen models are sharded over 2 processes (gloo,
# CPU) and loaded straight from checkpoint files: a transformers anchor saved by save_pretrained
# in several safetensors shards with an index, and an x-transformers augment saved as one
# safetensors file. Each process must read only its rows of the files, and train as one process
# does on the whole models.

LENGTH = 12
PROBE = torch.arange(2 * LENGTH).reshape(2, LENGTH) % VOCAB
CONNECTIONS = ((2, 1), (3, 2))

def models():
    # the anchor ties its head to its embedding: one tensor, stored once under one of its names
    torch.manual_seed(1234)
    anchor = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA_LIKE, 'tie_word_embeddings': True}, num_key_value_heads = 1))
    return anchor, decoder(dim = 16, depth = 4, num_tokens = VOCAB)

def compose(anchor, augment) -> CALM:
    return CALM(anchor, AugmentParams(model = augment, connections = CONNECTIONS), attn_kwargs = dict(heads = 2, dim_head = 8))

def meta_calm(composition_file) -> CALM:
    with torch.device('meta'):
        calm = compose(*models())

    # the composition is small: materialised whole and loaded before the frozen models
    calm.cross_attns.to_empty(device = 'cpu')
    calm.load(composition_file)
    return calm

def finetuner(calm: CALM, **kwargs) -> FineTuner:
    options = dict(num_train_steps = 3, grad_accum_every = 2, learning_rate = 1e-3, warmup_steps = 1, progress = False, device = 'cpu')
    return FineTuner(calm, counting_sequences(vocab = VOCAB), **{**options, **kwargs})

def write_checkpoints(folder) -> tuple[list[str], str]:
    """The frozen models' files and a composition away from the identity, from models built as usual."""

    anchor, augment = models()
    anchor.save_pretrained(folder / 'anchor', max_shard_size = '20KB')  # several shards and an index
    save_file(augment.state_dict(), folder / 'augment.safetensors')

    calm = compose(anchor, augment)

    with torch.no_grad():
        for block in calm.cross_attns[0]:
            block.to_out.weight.normal_(std = 0.02)

    calm.save(folder / 'composition.safetensors')
    return [str(folder / 'anchor'), str(folder / 'augment.safetensors')], str(folder / 'composition.safetensors')

def whole(tensor):
    from torch.distributed.tensor import DTensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

def frozen_weights(calm: CALM) -> dict[str, torch.Tensor]:
    return {name: whole(tensor).clone() for name, tensor in calm.state_dict().items() if not name.startswith('cross_attns.')}

def worker(rank: int, world_size: int, port: int, folder: str):
    os.environ.update(RANK = str(rank), LOCAL_RANK = str(rank), WORLD_SIZE = str(world_size), MASTER_ADDR = '127.0.0.1', MASTER_PORT = str(port))
    torch.set_num_threads(1)

    from pathlib import Path
    folder = Path(folder)
    checkpoints = [str(folder / 'anchor'), str(folder / 'augment.safetensors')]

    # count what this process reads from the files
    read = []
    original = sharded_loading.read_rows

    def counting(files, name, start, count):
        rows = original(files, name, start, count)
        read.append((name, rows.numel()))
        return rows

    sharded_loading.read_rows = counting

    calm = meta_calm(folder / 'composition.safetensors')
    tuner = finetuner(calm, batch_size = 2, strategy = 'fsdp', frozen_checkpoints = checkpoints, checkpoint_dir = folder / 'run')
    sharded_loading.read_rows = original

    numel = [local_and_global_numel(model) for model in (calm.anchor, *calm.augments)]
    loaded = frozen_weights(calm)
    tuner.train()

    with torch.no_grad():
        logits = calm(PROBE, return_loss = False)

    torch.save(dict(
        composition = composition(calm),
        losses = [record['loss'] for record in tuner.history],
        loaded = loaded,
        after = frozen_weights(calm),
        logits = logits,
        numel = numel,
        read = read
    ), folder / f'rank{rank}.pt')

    tuner.close()

@pytest.fixture(scope = 'module')
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp('sharded')
    checkpoints, composition_file = write_checkpoints(folder)
    mp.start_processes(worker, args = (2, free_port(), str(folder)), nprocs = 2, start_method = 'spawn')
    return folder, checkpoints, composition_file, [torch.load(folder / f'rank{rank}.pt', weights_only = True) for rank in range(2)]

def test_sharded_load_trains_as_one_process_over_whole_models(ranks):
    folder, _, composition_file, ranks = ranks

    reference = compose(*models())
    reference.load(composition_file)
    frozen = frozen_weights(reference)

    single = finetuner(reference, batch_size = 4)
    single.train()

    for rank in ranks:
        # each process loaded the files' values exactly, and training left them alone
        assert rank['loaded'].keys() == frozen.keys()
        assert all(torch.equal(rank['loaded'][name], frozen[name]) for name in frozen)
        assert all(torch.equal(rank['after'][name], frozen[name]) for name in frozen)

        assert_close(rank['composition'], composition(reference))
        assert rank['losses'] == pytest.approx([record['loss'] for record in single.history], abs = 1e-5)

    # the checkpoint rank 0 wrote loads in this (undistributed) process over models built as usual
    fresh = compose(*models())
    fresh.load(folder / 'run' / 'step-00000003' / 'composition.safetensors')

    with torch.no_grad():
        logits = fresh(PROBE, return_loss = False)

    assert (logits - ranks[0]['logits']).abs().max() <= 1e-5
    assert (logits - ranks[1]['logits']).abs().max() <= 1e-5

def test_each_process_holds_and_reads_only_its_half(ranks):
    _, checkpoints, _, ranks = ranks

    # the elements of the files, each tensor once
    stored = load_file(checkpoints[1])
    total_stored = sum(tensor.numel() for tensor in stored.values())
    anchor_index = sum(tensor.numel() for file in sorted(os.listdir(checkpoints[0])) if file.endswith('.safetensors') for tensor in load_file(os.path.join(checkpoints[0], file)).values())
    total_stored += anchor_index

    for model in range(2):  # the anchor, the augment
        (local0, total), (local1, _) = ranks[0]['numel'][model], ranks[1]['numel'][model]
        assert local0 + local1 == total and max(local0, local1) <= 0.55 * total

    read = [sum(count for _, count in rank['read']) for rank in ranks]
    assert sum(read) == total_stored                  # every stored element read once, by one process
    assert max(read) <= 0.55 * total_stored, (read, total_stored)

    # the tied embedding and head are one tensor in the file and in the model: read once
    names = [[name for name, _ in rank['read']] for rank in ranks]
    assert all(name.count('model.embed_tokens.weight') + name.count('lm_head.weight') == 1 for name in names)

def test_one_process_loads_the_whole_models_to_the_same_logits(ranks):
    # without a process group shard_and_load loads whole models: the rotary tables (buffers no
    # checkpoint holds) are computed by building the anchor again with its parameters on meta
    _, checkpoints, composition_file, _ = ranks

    calm = shard_and_load(meta_calm(composition_file), checkpoints)
    reference = compose(*models())
    reference.load(composition_file)

    assert not any(tensor.is_meta for tensor in (*calm.parameters(), *calm.buffers()))

    with torch.no_grad():
        assert torch.equal(calm(PROBE, return_loss = False), reference(PROBE, return_loss = False))

def test_clear_errors(ranks, tmp_path):
    _, checkpoints, composition_file, _ = ranks

    with pytest.raises(ValueError, match = 'one checkpoint per frozen model'):
        shard_and_load(meta_calm(composition_file), checkpoints[:1])

    with pytest.raises(ValueError, match = 'built on the meta device.*strategy="fsdp"'):
        shard_and_load(compose(*models()), checkpoints)

    with pytest.raises(ValueError, match = "frozen_checkpoints.*strategy='fsdp'"):
        finetuner(meta_calm(composition_file), frozen_checkpoints = checkpoints)

    with pytest.raises(ValueError, match = 'meta device.*frozen_checkpoints'):
        finetuner(meta_calm(composition_file), strategy = 'fsdp')

    with pytest.raises(FileNotFoundError, match = 'neither model.safetensors nor'):
        shard_and_load(meta_calm(composition_file), [str(tmp_path), checkpoints[1]])

    # a file of another model: the missing weights are named
    partial = load_file(checkpoints[1])
    save_file({name: tensor for name, tensor in partial.items() if 'layers.0' not in name}, tmp_path / 'partial.safetensors')

    with pytest.raises(KeyError, match = r'no tensor for \d+ weights of augments\[0\].*layers\.0'):
        shard_and_load(meta_calm(composition_file), [checkpoints[0], str(tmp_path / 'partial.safetensors')])
