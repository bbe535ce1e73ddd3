from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import counting_sequences, decoder, free_port
from text_tokenizers import across_spaces_bpe, byte_bpe

from calm_pytorch import CALM, AugmentParams, FineTuner

# generation under FSDP, where every process must run every forward of the sharded models in the
# same order (each gathers its weights from all). Here the processes diverge: different prompts,
# so an augment read across tokenizers re-reads a different number of tokens on each; and one
# process's row ends at its first token while the other's goes on. A process that ran a different
# number of forwards, or left the loop early, would hang the other until the group's timeout
# (kept short here)

PROMPTS = ['the cat sat on the mat, and', 'numbers like 12 and 345 are words too: a_b, x-y']
NEW = 8

def build() -> CALM:
    # x-transformers models: both decode with a cache, so the augment re-reads only the tokens
    # that changed, one forward each (a number that depends on the text)
    torch.manual_seed(0)
    anchor, augment = decoder(dim = 32, depth = 2, num_tokens = len(byte_bpe())), decoder(dim = 16, depth = 2, num_tokens = len(across_spaces_bpe()))
    params = AugmentParams(model = augment, tokenizer = across_spaces_bpe(), connections = ((1, 1), (2, 2)))
    calm = CALM(anchor, params, anchor_tokenizer = byte_bpe(), attn_kwargs = dict(heads = 2, dim_head = 8))

    with torch.no_grad():
        for param in calm.cross_attns.parameters():
            param.normal_(std = 0.5)

    return calm.eval()

def worker(rank: int, world_size: int, port: int, out_dir: str):
    os.environ.update(RANK = str(rank), LOCAL_RANK = str(rank), WORLD_SIZE = str(world_size), MASTER_ADDR = '127.0.0.1', MASTER_PORT = str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', timeout = timedelta(seconds = 60))

    calm = build()
    prompt = byte_bpe()([PROMPTS[rank]], return_tensors = 'pt').input_ids
    settings = dict(max_new_tokens = NEW, temperature = 0.)

    # one process alone, before sharding: what each process must get
    alone = calm.generate(prompt, **settings)
    first_tokens = [None] * world_size
    dist.all_gather_object(first_tokens, int(alone[0, 0]))
    eos_id = first_tokens[0]  # the first process's row ends at once

    alone_eos = calm.generate(prompt, eos_id = eos_id, pad_id = 0, **settings)

    tuner = FineTuner(calm, counting_sequences(vocab = 100), num_train_steps = 1, strategy = 'fsdp', progress = False, device = 'cpu')
    assert all(type(param).__name__ == 'DTensor' for param in calm.anchor.parameters())

    sharded = calm.generate(prompt, **settings)
    assert calm.anchor_adapter.can_cache and calm.augment_adapters[0].can_cache
    sharded_eos = calm.generate(prompt, eos_id = eos_id, pad_id = 0, **settings)

    # a step count that differs cannot be kept in step: refused on every process
    try:
        calm.generate(prompt, max_new_tokens = NEW + rank, temperature = 0.)
        refused = ''
    except ValueError as error:
        refused = str(error)

    results = dict(alone = alone, alone_eos = alone_eos, sharded = sharded, sharded_eos = sharded_eos, refused = refused)
    torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    tuner.close()

@pytest.fixture(scope = 'module')
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp('fsdp_generation')
    mp.start_processes(worker, args = (2, free_port(), str(out_dir)), nprocs = 2, start_method = 'spawn')
    return [torch.load(out_dir / f'rank{rank}.pt', weights_only = True) for rank in range(2)]

def test_diverging_processes_decode_in_lockstep_and_as_alone(ranks):
    first, second = ranks

    # the first process's row ended at once, the second's went on
    assert (first['alone_eos'][0, 1:] == 0).all()
    assert (second['alone_eos'] != 0).sum() > 1

    for results in ranks:
        assert torch.equal(results['sharded'], results['alone'])
        assert torch.equal(results['sharded_eos'], results['alone_eos'])
        assert f'max_new_tokens differs between the processes sharing the sharded (FSDP) models: from {NEW} to {NEW + 1}' in results['refused']
