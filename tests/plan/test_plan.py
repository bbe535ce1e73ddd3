from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import transformers

from calm_pytorch import CALM, AugmentParams
from calm_pytorch.plan import memory_plan
from calm_pytorch.plan.__main__ import main
from calm_pytorch.plan.weights import frozen_bytes, tensor_bytes
from conftest import ROOT

sys.path.insert(0, str(ROOT / 'benchmarks'))
from memory import SavedTensors, held_bytes  # noqa: E402  the benchmark's own accounting

# the plan against what a real composition of tiny models holds, counted the way
# benchmarks/memory.py counts it: parameters and bytes exactly

ATTN = dict(heads = 3, dim_head = 8)
BATCH, SEQ = 2, 32

def llama(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, vocab: int = 512, tied: bool = True) -> dict:
    return dict(
        model_type = 'llama', vocab_size = vocab, hidden_size = hidden, num_hidden_layers = layers, intermediate_size = intermediate,
        num_attention_heads = heads, num_key_value_heads = kv_heads, tie_word_embeddings = tied, max_position_embeddings = 128
    )

ANCHOR = llama(64, 8, 160, 4, 2)
AUGMENT = llama(48, 8, 96, 4, 2, tied = False)

def real(config: dict, dtype: torch.dtype):
    config = dict(config)
    return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(config.pop('model_type'), **config)).to(dtype).eval()

def models_bytes(*models) -> int:
    return sum(held_bytes([*model.parameters(), *model.buffers()]) for model in models)

@pytest.mark.parametrize('checkpointing', [False, True], ids = ['plain', 'checkpointing'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids = ['float32', 'bfloat16'])
def test_the_plan_counts_what_a_real_step_holds(dtype, checkpointing):
    plan = memory_plan(ANCHOR, AUGMENT, dtype = dtype, batch = BATCH, seq_len = SEQ, attn_kwargs = ATTN, activation_checkpointing = checkpointing)

    anchor, augment = real(ANCHOR, dtype), real(AUGMENT, dtype)
    calm = CALM(anchor, AugmentParams(model = augment), attn_kwargs = ATTN)
    trained = [param for param in calm.parameters() if param.requires_grad]

    assert plan.frozen == models_bytes(anchor, augment)
    assert plan.composition_params == sum(param.numel() for param in trained)
    assert plan.composition == plan.gradients == held_bytes(trained)
    assert plan.optimizer == 2 * plan.composition
    assert plan.connections == [list(pairs) for pairs in calm.connections]
    assert plan.anchor_params == sum(param.numel() for param in anchor.parameters())

    if checkpointing:
        calm.gradient_checkpointing_enable()
        assert plan.blocks_with_gradient == len(calm.checkpointed_modules) == 4

    seq = torch.randint(3, ANCHOR['vocab_size'], (BATCH, SEQ + 1))
    with SavedTensors(calm) as saved:
        loss = calm(seq, use_cache = False)

    assert plan.kept == saved.bytes
    assert plan.activations > plan.kept if checkpointing else plan.activations == plan.kept
    loss.backward()

@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids = ['float32', 'bfloat16'])
def test_two_augments_writing_the_same_anchor_layers(dtype):
    # uncast, both blocks of a layer read one saved anchor hidden state
    other = dict(model_type = 'gpt2', vocab_size = 512, n_embd = 32, n_layer = 4, n_head = 2, n_positions = 128)
    plan = memory_plan(ANCHOR, [AUGMENT, other], dtype = dtype, batch = BATCH, seq_len = SEQ, attn_kwargs = ATTN)

    calm = CALM(real(ANCHOR, dtype), [real(AUGMENT, dtype), real(other, dtype)], attn_kwargs = ATTN)
    assert {anchor for _, anchor in calm.connections[0]} & {anchor for _, anchor in calm.connections[1]}

    with SavedTensors(calm) as saved:
        calm(torch.randint(3, ANCHOR['vocab_size'], (BATCH, SEQ + 1)), use_cache = False)

    assert plan.kept == saved.bytes

def test_sizes_and_connections_are_checked(capsys):
    for name in ('batch', 'seq_len', 'processes'):
        for wrong in (0, -2):
            with pytest.raises(ValueError, match = rf'`{name}` must be a positive integer, got {wrong}'):
                memory_plan(ANCHOR, AUGMENT, **{name: wrong})

    with pytest.raises(ValueError, match = r'`connections` holds 2 entries for 1 augment\(s\)'):
        memory_plan(ANCHOR, AUGMENT, connections = [None, None])

    for wrong, message in (('[]', 'holds 0 entries'), ('[[[4, 2]', 'is not JSON'), ('{"a": 1}', 'must be a JSON list')):
        with pytest.raises((SystemExit, ValueError), match = None) as raised:
            main(['--anchor', json.dumps(ANCHOR), '--augment', json.dumps(AUGMENT), '--connections', wrong])
        assert message in (str(raised.value) if raised.type is ValueError else capsys.readouterr().err)

@pytest.mark.parametrize('checkpointing', [False, True], ids = ['plain', 'checkpointing'])
def test_int8_anchor(checkpointing):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    plan = memory_plan(ANCHOR, AUGMENT, dtype = 'fp32', batch = BATCH, seq_len = SEQ, attn_kwargs = ATTN, anchor_quantization = 'int8', activation_checkpointing = checkpointing)

    anchor, augment = real(ANCHOR, torch.float32), real(AUGMENT, torch.float32)
    quantize_(anchor, Int8WeightOnlyConfig())
    calm = CALM(anchor, AugmentParams(model = augment), attn_kwargs = ATTN)

    assert plan.frozen == models_bytes(anchor, augment)

    if checkpointing:
        calm.gradient_checkpointing_enable()

    # autograd keeps the float copies of the int8 weights of every block the gradient flows through
    # (with checkpointing: of the head only, the blocks' copies are made again in their recompute)
    seq = torch.randint(3, ANCHOR['vocab_size'], (BATCH, SEQ + 1))
    with SavedTensors(calm) as saved:
        calm(seq, use_cache = False)

    assert plan.kept == saved.bytes

def test_fsdp_shards_and_refusals():
    sharded = memory_plan(ANCHOR, AUGMENT, dtype = 'fp32', seq_len = SEQ, attn_kwargs = ATTN, processes = 2, fsdp = True)
    whole = memory_plan(ANCHOR, AUGMENT, dtype = 'fp32', seq_len = SEQ, attn_kwargs = ATTN, processes = 2)

    # dim 0 split in equal parts, the last padded; buffers (the rotary tables) stay whole
    assert tensor_bytes(torch.empty(5, 3), processes = 2) == 3 * 3 * 4
    anchor, augment = real(ANCHOR, torch.float32), real(AUGMENT, torch.float32)
    buffers = sum(buffer.numel() * 4 for model in (anchor, augment) for buffer in model.buffers())
    assert sharded.frozen == (whole.frozen - buffers) // 2 + buffers
    assert sharded.gathered > 0 and whole.gathered == 0
    assert sharded.composition == whole.composition  # replicated

    with pytest.raises(ValueError, match = 'never sharded quantized'):
        memory_plan(ANCHOR, AUGMENT, seq_len = SEQ, processes = 2, fsdp = True, anchor_quantization = 'int8')

    with pytest.raises(ValueError, match = 'Llama-shaped'):
        memory_plan(dict(model_type = 'gpt2', n_embd = 32, n_layer = 2, n_head = 2, vocab_size = 64), AUGMENT, seq_len = SEQ)

    with pytest.raises(ValueError, match = 'model_type'):
        memory_plan(dict(hidden_size = 64), AUGMENT)

def test_4bit_keeps_the_head():
    plan = memory_plan(ANCHOR, AUGMENT, dtype = 'bf16', seq_len = SEQ, attn_kwargs = ATTN, anchor_quantization = '4bit')
    plain = memory_plan(ANCHOR, AUGMENT, dtype = 'bf16', seq_len = SEQ, attn_kwargs = ATTN)

    anchor = real(ANCHOR, torch.bfloat16)
    linears = [module.weight.numel() for module in anchor.model.layers.modules() if isinstance(module, torch.nn.Linear)]
    assert plain.frozen - plan.frozen == pytest.approx(sum(linears) * (2 - 0.5 - 1 / 64), rel = 1e-3)

def test_the_command_prints_the_table(tmp_path, capsys):
    path = tmp_path / 'config.json'
    path.write_text(json.dumps(ANCHOR))

    # what `python -m calm_pytorch.plan ...` runs, in this process (a fresh interpreter takes 20 s here)
    main(['--anchor', str(path), '--augment', json.dumps(AUGMENT), '--dtype', 'fp32', '--batch', str(BATCH), '--seq-len', str(SEQ), '--heads', '3', '--dim-head', '8',
          '--connections', '[[[4, 2], [8, 8]]]'])
    output = capsys.readouterr().out

    plan = memory_plan(ANCHOR, AUGMENT, dtype = 'fp32', batch = BATCH, seq_len = SEQ, attn_kwargs = ATTN, connections = [((4, 2), (8, 8))])
    assert 'connections [[(4, 2), (8, 8)]]; 6 of 8 anchor blocks carry the gradient' in output
    assert f'| total | {plan.total / 2 ** 30:.2f} |' in output
    assert f'| frozen weights | {frozen_bytes(real(ANCHOR, torch.float32)) / 2 ** 30 + frozen_bytes(real(AUGMENT, torch.float32)) / 2 ** 30:.2f} |' in output

def torchao_version() -> tuple[int, int]:
    import torchao
    return tuple(int(part) for part in torchao.__version__.split('.')[:2])

def llama_table() -> list[str]:
    table = [line for line in (ROOT / 'docs' / 'scaling.md').read_text().splitlines() if line.startswith('| llama-')]
    assert len(table) == 5
    return table

# the first row always; all five (4 plans each, 2 minutes on 2 cores) with CALM_SLOW_TESTS=1, as in CI
@pytest.mark.parametrize('row', [0, *(pytest.param(row, marks = pytest.mark.skipif(os.environ.get('CALM_SLOW_TESTS') != '1', reason = 'slow: set CALM_SLOW_TESTS=1 to run it')) for row in range(1, 5))])
def test_the_docs_table_of_llama_shapes_is_what_the_plan_says(row):
    # docs/scaling.md's table, from the published shapes (meta models: nothing allocated)
    gib = 2 ** 30

    for line in llama_table()[row:row + 1]:
        anchor, augment = line.split('|')[1].strip().split(' + ')
        plain, checkpointed = memory_plan(anchor, augment), memory_plan(anchor, augment, activation_checkpointing = True)
        int8 = memory_plan(anchor, augment, activation_checkpointing = True, anchor_quantization = 'int8')
        sharded = memory_plan(anchor, augment, processes = 8, fsdp = True, activation_checkpointing = True)

        cells = [
            f'{anchor} + {augment}', f'{plain.anchor_params / 1e9:.2f}B + {plain.augment_params[0] / 1e9:.2f}B',
            f'{plain.composition_params / 1e6:.0f}M ({len(plain.connections[0])})', f'{plain.frozen / gib:.1f}',
            f'{(plain.composition + plain.gradients + plain.optimizer) / gib:.2f}', f'{plain.activations / gib:.1f} / {checkpointed.activations / gib:.1f}',
            f'{plain.total / gib:.1f}', f'{checkpointed.total / gib:.1f}', f'{int8.total / gib:.1f}', f'{sharded.frozen / gib:.1f}', f'{sharded.total / gib:.1f}'
        ]
        # the int8 column is torchao 0.18's (docs/scaling.md): older torchao rounds it otherwise
        written = line.strip('| ').split(' | ')
        if torchao_version() < (0, 18):
            cells[8] = written[8]
        assert written == cells
