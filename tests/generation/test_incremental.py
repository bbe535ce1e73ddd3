from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from hf_models import DECODERS, ENCODERS, TOKENS, VOCAB, gpt2, llama
from text_tokenizers import byte_bpe, wordpiece
from torch import nn

from calm_pytorch import CALM, AugmentParams
from calm_pytorch.text.commit import committed_text

# cached and recomputed decoding give the same tokens, so equality cannot tell a cache that stopped
# working: these tests count the positions each model reads at each step of `generate`

ATTN = dict(heads = 2, dim_head = 16)
NEW = 5
GREEDY = dict(temperature = 0.)

def gemma3():
    # one sliding-window layer (window 4, shorter than the prompt) and one global layer
    config = transformers.Gemma3TextConfig(
        vocab_size = VOCAB, hidden_size = 32, num_hidden_layers = 2, num_attention_heads = 2, num_key_value_heads = 1,
        head_dim = 16, intermediate_size = 64, max_position_embeddings = 64, sliding_window = 4,
        layer_types = ['sliding_attention', 'full_attention'], **TOKENS
    )
    return transformers.Gemma3ForCausalLM(config)

ANCHORS = {'llama': lambda: llama(depth = 2), 'gpt2': lambda: gpt2(dim = 32, depth = 2), 'gemma3': gemma3}

def count_reads(model: nn.Module) -> list[int]:
    # positions per call, as the input embeddings see them
    reads = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: reads.append(args[0].shape[-1]))
    return reads

def trained(calm: CALM) -> CALM:
    # nonzero output projections, so that the augment changes the tokens
    for param in calm.cross_attns.parameters():
        if param.ndim == 2:
            nn.init.normal_(param, std = 0.5)

    return calm.eval()

def prompts(padded: bool):
    prompt = torch.randint(3, VOCAB, (2 if padded else 1, 8), generator = torch.Generator().manual_seed(0))
    mask = None

    if padded:
        mask = torch.ones_like(prompt, dtype = torch.bool)
        mask[1, :3] = False

    return prompt, mask

@pytest.mark.parametrize('padded', (False, True), ids = ('batch_1', 'left_padded'))
@pytest.mark.parametrize('mode', ('aligned', 'context'))
@pytest.mark.parametrize('family', ANCHORS)
def test_anchor_and_augment_read_the_prompt_once_then_one_position_per_step(family, mode, padded):
    torch.manual_seed(0)
    anchor = ANCHORS[family]().eval()
    augment = (ANCHORS[family]() if mode == 'aligned' else ENCODERS['bert'].build()).eval()
    calm = trained(CALM(anchor, AugmentParams(model = augment, connections = ((1, 1), (2, 2))), attn_kwargs = ATTN))

    prompt, mask = prompts(padded)
    document = torch.randint(3, VOCAB, (prompt.shape[0], 7)) if mode == 'context' else None
    anchor_reads, augment_reads = count_reads(anchor), count_reads(augment)

    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no warning that a model recomputes
        cached = calm.generate(prompt, max_new_tokens = NEW, mask = mask, prompt = document, **GREEDY)

    assert anchor_reads == [8] + [1] * (NEW - 1)
    assert augment_reads == ([8] + [1] * (NEW - 1) if mode == 'aligned' else [7])

    recomputed = calm.generate(prompt, max_new_tokens = NEW, mask = mask, prompt = document, use_cache = False, **GREEDY)
    assert torch.equal(cached, recomputed)

def text_composition(anchor_family: str):
    torch.manual_seed(0)
    anchor_tokenizer, augment_tokenizer = byte_bpe(), wordpiece()
    build = {'llama': lambda vocab: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size = vocab, hidden_size = 32, num_hidden_layers = 2, num_attention_heads = 2, num_key_value_heads = 1,
        intermediate_size = 64, max_position_embeddings = 256
    ))}[anchor_family]
    anchor, augment = build(len(anchor_tokenizer)).eval(), build(len(augment_tokenizer)).eval()
    params = AugmentParams(model = augment, tokenizer = augment_tokenizer, connect_every_num_layers = 1)
    return trained(CALM(anchor, params, anchor_tokenizer = anchor_tokenizer, attn_kwargs = ATTN)), anchor, augment

def test_across_tokenizers_the_augment_reads_only_newly_committed_tokens():
    calm, anchor, augment = text_composition('llama')
    prompt = torch.tensor([byte_bpe()('the cat sat on the mat and then')['input_ids']])
    anchor_reads, augment_reads = count_reads(anchor), count_reads(augment)

    cached = calm.generate(prompt, max_new_tokens = 12, **GREEDY)
    assert anchor_reads == [prompt.shape[-1]] + [1] * 11

    def committed_ids(ids) -> list[int]:
        return calm.augment_texts[0].encode_batch([committed_text(byte_bpe().decode(ids))])[0]

    # the first step reads the prompt as the forward does (each position its own committed
    # prefix) and keeps it in the augment's cache; from then on one new token per call, so that
    # every token of the final committed text is read once. The last sampled token is never read
    final = committed_ids(torch.cat((prompt, cached), dim = -1)[0, :-1])
    assert augment_reads[0] == len(committed_ids(prompt[0]))
    assert sum(augment_reads) == len(final)
    assert all(read == 1 for read in augment_reads[1:])

    assert torch.equal(cached, calm.generate(prompt, max_new_tokens = 12, use_cache = False, **GREEDY))

# the second batch starts with rows that have committed no text: their slots are all gaps
@pytest.mark.parametrize('texts', (('the cat sat on the mat and then', 'a dog ran', 'then they went to the river and saw'), ('then', 'the', 'a dog ran')), ids = ('texts', 'empty_rows'))
def test_across_tokenizers_one_augment_call_a_step_reads_the_new_tokens_of_every_row(texts):
    calm, anchor, augment = text_composition('llama')
    rows = [torch.tensor(byte_bpe()(text)['input_ids']) for text in texts]  # left-padded to one batch
    shapes = []
    augment.get_input_embeddings().register_forward_hook(lambda module, args, output: shapes.append(tuple(args[0].shape)))

    cached = calm.generate(rows, max_new_tokens = 12, **GREEDY)

    # the prompts in one call, then at most one call a step for all rows (none when no row
    # committed a new token), as wide as the most new tokens of a row
    assert shapes[0][0] == len(rows)
    assert 1 <= len(shapes) - 1 <= 11 and all(shape[0] == len(rows) for shape in shapes[1:])

    # the same tokens as recomputing everything, and as each row generated alone
    assert torch.equal(cached, calm.generate(rows, max_new_tokens = 12, use_cache = False, **GREEDY))
    for row, prompt in enumerate(rows):
        assert torch.equal(cached[row], calm.generate(prompt[None], max_new_tokens = 12, **GREEDY)[0])

def test_rows_share_one_augment_cache_only_where_windows_cannot_miscount_a_gap():
    # a window counts cache slots, so across a masked gap it would see fewer tokens than alone;
    # a model that takes no position ids may count them by slot too
    per_row = {'mistral', 'gpt_neo', 'bloom'}  # a sliding window of 4096; local attention layers; no position ids
    for name, family in DECODERS.items():
        calm = CALM(llama(depth = 2), AugmentParams(model = family.build(), connect_every_num_layers = 1), attn_kwargs = ATTN)
        assert calm.augment_adapters[0].decodes_with_gaps == (name not in per_row), name

    calm = CALM(llama(depth = 2), AugmentParams(model = gemma3(), connect_every_num_layers = 1), attn_kwargs = ATTN)
    assert not calm.augment_adapters[0].decodes_with_gaps

class NoCacheLlama(transformers.LlamaForCausalLM):
    # a transformers model whose forward takes no cache
    def forward(self, input_ids = None, attention_mask = None, position_ids = None, **kwargs):
        kwargs.pop('use_cache', None)
        return super().forward(input_ids = input_ids, attention_mask = attention_mask, position_ids = position_ids, use_cache = False, **kwargs)

def test_a_model_that_cannot_decode_incrementally_is_named_once():
    torch.manual_seed(0)
    anchor = NoCacheLlama(llama().config).eval()
    calm = CALM(anchor, AugmentParams(model = llama(), connections = ((1, 1),)), attn_kwargs = ATTN)
    prompt, _ = prompts(padded = False)
    reads = count_reads(anchor)

    with pytest.warns(UserWarning, match = r'anchor_llm \(NoCacheLlama\) cannot decode incrementally: its forward takes no cache') as record:
        calm.generate(prompt, max_new_tokens = 3)

    assert reads == [8, 9, 10]  # it recomputes, and says so
    assert [warning.filename for warning in record if 'cannot decode incrementally' in str(warning.message)] == [__file__]

    with warnings.catch_warnings():
        warnings.simplefilter('error')
        calm.generate(prompt, max_new_tokens = 3)  # once per model

@pytest.mark.parametrize('padded', (False, True), ids = ('batch_1', 'left_padded'))
def test_mamba_decodes_incrementally_as_it_recomputes(padded):
    # Mamba multiplies each input position by its mask entry: given the whole sequence's mask with
    # one new token, it broadcast that token over every position, and cached tokens silently
    # differed from recomputed ones. As anchor and as aligned augment
    def mamba():
        return transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size = VOCAB, hidden_size = 32, num_hidden_layers = 2, state_size = 4, pad_token_id = 0)).eval()

    torch.manual_seed(0)
    anchor, augment = mamba(), mamba()
    calm = trained(CALM(anchor, AugmentParams(model = augment, connections = ((1, 1), (2, 2))), attn_kwargs = ATTN))
    anchor_reads, augment_reads = count_reads(anchor), count_reads(augment)
    prompt, mask = prompts(padded)

    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # transformers before 5.25 gave Mamba a cache argument of its own: recomputed, said once
        cached = calm.generate(prompt, mask = mask, max_new_tokens = NEW, **GREEDY)
        recomputed = calm.generate(prompt, mask = mask, max_new_tokens = NEW, use_cache = False, **GREEDY)

    assert torch.equal(cached, recomputed)

    if calm.anchor_adapter.can_cache:
        assert anchor_reads[:NEW] == augment_reads[:NEW] == [8] + [1] * (NEW - 1)

@pytest.mark.parametrize('family', ('llama', 'gpt2'))
def test_a_length_far_beyond_the_anchor_is_refused_before_anything_is_allocated(family):
    # 10**12 positions would need terabytes: the length is checked as a number first. GPT-2 has
    # learned positions (a hard limit), Llama rotary ones (the length its config was made for)
    calm = CALM(ANCHORS[family](), AugmentParams(model = llama(), connections = ((1, 1),)), attn_kwargs = ATTN)
    prompt, _ = prompts(padded = False)

    with pytest.raises(ValueError, match = r'`prompt \+ new tokens - 1` has length 1000000000007, but anchor_llm'):
        calm.generate(prompt, max_new_tokens = 10 ** 12)

@pytest.mark.parametrize('use_cache', (True, False))
def test_a_generation_may_end_one_past_the_anchors_positions(use_cache):
    # the last new token is never read back: a prompt filling GPT-2's 64 learned positions takes
    # one new token (as the anchor's own generate does), and the limit counts what is read
    calm = CALM(gpt2(dim = 32, depth = 2), AugmentParams(model = llama(), connections = ((1, 1),)), attn_kwargs = ATTN)
    positions = calm.anchor.config.n_positions
    full = torch.randint(3, VOCAB, (1, positions), generator = torch.Generator().manual_seed(0))

    last = calm.generate(full, max_new_tokens = 1, use_cache = use_cache, **GREEDY)
    assert torch.equal(last[:, 0], calm(full, return_loss = False)[:, -1].argmax(dim = -1))
    assert calm.generate(full[:, :-4], max_new_tokens = 5, use_cache = use_cache, **GREEDY).shape == (1, 5)

    with pytest.raises(ValueError, match = r'`prompt \+ new tokens - 1` has length 65, but anchor_llm takes at most 64 positions'):
        calm.generate(full[:, :-4], max_new_tokens = 6, use_cache = use_cache, **GREEDY)
