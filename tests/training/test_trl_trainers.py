from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import transformers
from datasets import Dataset
from text_tokenizers import byte_bpe
from trl import DPOConfig, SFTConfig

from calm_pytorch import CALM
from calm_pytorch.training.trl_trainers import CALMDPOTrainer, CALMSFTTrainer

# TRL's SFT and DPO trainers over a composition: TRL's data handling and losses, the composed
# forward, only the composition trained and saved

PAIRS = [
    ('the cat sat on', ' the mat.', ' a dog.'),
    ('then they went', ' there together.', ' at home.'),
    ('numbers like 12', ' and 345.', ' are words.'),
    ('whitespace runs', ' and new lines.', ' in quotes.'),
]

def build(seed: int = 0) -> tuple[CALM, transformers.PreTrainedTokenizerFast]:
    tokenizer = byte_bpe()
    vocab = len(tokenizer)
    torch.manual_seed(seed)

    anchor = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size = vocab, hidden_size = 32, num_hidden_layers = 2, num_attention_heads = 2, num_key_value_heads = 1, intermediate_size = 64, max_position_embeddings = 64, bos_token_id = 1, eos_token_id = 2, pad_token_id = 0))
    augment = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size = vocab, n_embd = 24, n_layer = 4, n_head = 2, n_positions = 64, bos_token_id = 1, eos_token_id = 2, pad_token_id = 0))
    return CALM(anchor, augment, attn_kwargs = dict(heads = 2, dim_head = 8)), tokenizer

def frozen_state(calm: CALM) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in calm.state_dict().items() if not name.startswith('cross_attns.')}

def composition(calm: CALM) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in calm.composition_state_dict().items()}

def common_args(out) -> dict:
    return dict(output_dir = str(out), per_device_train_batch_size = 2, learning_rate = 1e-2, report_to = [], use_cpu = True, bf16 = False, disable_tqdm = True, logging_steps = 1, seed = 0, max_length = 64)

def losses(trainer) -> list[float]:
    return [entry['loss'] for entry in trainer.state.log_history if 'loss' in entry]

def test_sft_trains_the_composition_with_calms_own_loss_and_saves_it_alone(tmp_path):
    calm, tokenizer = build()
    frozen, before = frozen_state(calm), composition(calm)
    dataset = Dataset.from_list([dict(prompt = prompt, completion = chosen) for prompt, chosen, _ in PAIRS])

    args = SFTConfig(**common_args(tmp_path), max_steps = 6, save_strategy = 'steps', save_steps = 6)
    trainer = CALMSFTTrainer(model = calm, args = args, train_dataset = dataset, processing_class = tokenizer)

    # the loss TRL computes through the composed forward is CALM's own loss on the same batch,
    # over the completion tokens only
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch['labels'] == -100).any() and (batch['labels'] != -100).any()

    with torch.no_grad():
        trl_loss = trainer.compute_loss(calm, dict(batch))
        own = calm(input_ids = batch['input_ids'], attention_mask = batch['attention_mask'], labels = batch['labels']).loss

    assert torch.allclose(trl_loss, own, atol = 1e-6)

    trainer.train()
    history = losses(trainer)

    assert all(math.isfinite(loss) for loss in history) and history[-1] < history[0]
    assert all(torch.equal(frozen[name], tensor) for name, tensor in frozen_state(calm).items())
    assert all(not torch.equal(before[name], tensor) for name, tensor in composition(calm).items() if name.endswith('to_out.weight'))

    # the checkpoint holds the composition, nothing of the frozen models, and loads to the same logits
    checkpoint = tmp_path / 'checkpoint-6'
    assert (checkpoint / 'composition.safetensors').is_file()
    assert not any(checkpoint.glob('model*.safetensors'))

    fresh, _ = build()
    fresh.load(checkpoint / 'composition.safetensors')
    ids = torch.tensor([tokenizer.encode('the cat sat on the mat.')])
    assert torch.equal(fresh(ids, return_loss = False), calm(ids, return_loss = False))

def test_dpo_starts_at_the_anchor_as_reference_and_trains_the_composition_only(tmp_path):
    calm, tokenizer = build()
    frozen, before = frozen_state(calm), composition(calm)
    dataset = Dataset.from_list([dict(prompt = prompt, chosen = chosen, rejected = rejected) for prompt, chosen, rejected in PAIRS])

    args = DPOConfig(**common_args(tmp_path), max_steps = 6, beta = 0.5, save_strategy = 'no')
    trainer = CALMDPOTrainer(model = calm, args = args, train_dataset = dataset, processing_class = tokenizer)
    assert trainer.ref_model is calm.anchor

    trainer.train()
    history = losses(trainer)

    # at the first step the policy is the untrained composition, which is exactly the anchor: the
    # implicit rewards are zero and the loss is -log sigmoid(0)
    assert history[0] == pytest.approx(math.log(2), abs = 1e-5)
    assert all(math.isfinite(loss) for loss in history) and history[-1] < history[0]

    # the anchor served as the reference and stayed frozen; only the composition moved
    assert all(torch.equal(frozen[name], tensor) for name, tensor in frozen_state(calm).items())
    assert all(not torch.equal(before[name], tensor) for name, tensor in composition(calm).items() if name.endswith('to_out.weight'))

    trainer.save_model(str(tmp_path / 'final'))
    assert (tmp_path / 'final' / 'composition.safetensors').is_file()
    assert not any((tmp_path / 'final').glob('model*.safetensors'))

def test_trl_trainers_refuse_what_cannot_work(tmp_path):
    calm, tokenizer = build()
    dataset = Dataset.from_list([dict(prompt = prompt, completion = chosen) for prompt, chosen, _ in PAIRS])

    with pytest.raises(TypeError, match = 'trains a CALM'):
        CALMSFTTrainer(model = calm.anchor, args = SFTConfig(**common_args(tmp_path)), train_dataset = dataset, processing_class = tokenizer)

    with pytest.raises(ValueError, match = 'on the anchor before building'):
        from peft import LoraConfig
        CALMSFTTrainer(model = calm, args = SFTConfig(**common_args(tmp_path)), train_dataset = dataset, processing_class = tokenizer, peft_config = LoraConfig())

    with pytest.raises(NotImplementedError, match = 'DeepSpeed'):
        CALMDPOTrainer(model = calm, args = SimpleNamespace(deepspeed = dict(zero_optimization = dict(stage = 3)), sync_ref_model = False))

    with pytest.raises(ValueError, match = 'sync_ref_model'):
        CALMDPOTrainer(model = calm, args = DPOConfig(**common_args(tmp_path), sync_ref_model = True), train_dataset = dataset, processing_class = tokenizer)
