from __future__ import annotations

import pytest
import torch
from hf_models import gpt2, llama
from peft import LoraConfig, PrefixTuningConfig, get_peft_model

from calm_pytorch import CALM, CompositionMismatchError, FineTuner

# LoRA on the anchor before wrapping: wired like the base model, the LoRA weights stay trainable,
# train with the composition and are saved with it; nothing else of the models changes

ATTN = dict(heads = 2, dim_head = 8)

def lora_anchor(seed: int = 0):
    torch.manual_seed(seed)
    return get_peft_model(llama(depth = 4), LoraConfig(r = 4, target_modules = ['q_proj', 'v_proj'], task_type = 'CAUSAL_LM'))

def augment(seed: int = 1):
    torch.manual_seed(seed)
    return gpt2()

def is_lora(name: str) -> bool:
    return 'lora_' in name

def snapshot(calm: CALM) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in calm.state_dict().items()}

def test_a_peft_anchor_is_wired_like_its_base_model():
    torch.manual_seed(0)
    base = CALM(llama(depth = 4), augment(), attn_kwargs = ATTN)
    peft = CALM(lora_anchor(), augment(), attn_kwargs = ATTN)

    assert peft.connections == base.connections
    # every line naming layers (augment and connections) is the same; the anchor's line says what is trainable
    assert peft.summary().splitlines()[1:-1] == base.summary().splitlines()[1:-1]
    assert 'model.layers.3 output' in peft.summary()
    assert 'trainable, left so by you' in peft.summary().splitlines()[0]

def test_lora_weights_stay_trainable_and_the_rest_stays_frozen():
    anchor = lora_anchor()
    calm = CALM(anchor, augment(), attn_kwargs = ATTN)

    trainable = {name for name, param in calm.anchor.named_parameters() if param.requires_grad}
    assert len(trainable) == 16 and all(map(is_lora, trainable))  # A and B of q and v in 4 layers
    assert calm.trainable_anchor_params == sorted(trainable, key = list(dict(anchor.named_parameters())).index)
    assert not any(param.requires_grad for param in calm.augments.parameters())

    # an anchor whose every parameter requires grad (any fresh model) is frozen whole, as before
    fresh = CALM(llama(), augment(), attn_kwargs = ATTN)
    assert not any(param.requires_grad for param in fresh.anchor.parameters()) and fresh.trainable_anchor_params == []

    # removing the hooks gives the flags back as PEFT left them
    calm.remove_hooks()
    assert {name for name, param in anchor.named_parameters() if param.requires_grad} == trainable

def test_identity_at_init_through_the_peft_anchor():
    anchor = lora_anchor()
    calm = CALM(anchor, augment(), attn_kwargs = ATTN)
    seq = torch.randint(3, 128, (2, 10))

    assert torch.equal(calm(seq, return_loss = False), anchor(input_ids = seq).logits)

def test_composed_generation_with_a_peft_anchor_matches_its_base_model():
    # generate() of a PeftModel calls its base model: the composition must follow it there
    anchor = lora_anchor()
    torch.manual_seed(0)
    plain = llama(depth = 4)
    plain.load_state_dict(anchor.get_base_model().state_dict(), strict = False)  # LoRA B is zero: the same function

    lora_calm = CALM(anchor, augment(), attn_kwargs = ATTN)
    plain_calm = CALM(plain, augment(), attn_kwargs = ATTN)

    with torch.no_grad():
        for block in lora_calm.cross_attns[0]:
            block.to_out.weight.normal_(std = 2.)

    plain_calm.cross_attns.load_state_dict(lora_calm.cross_attns.state_dict())

    prompt, document = torch.randint(3, 128, (2, 4)), torch.randint(3, 128, (2, 6))

    with lora_calm.composed(prompt = document) as composed:
        lora_out = composed.generate(input_ids = prompt, max_new_tokens = 4, do_sample = False, num_beams = 2)

    with plain_calm.composed(prompt = document) as composed:
        plain_out = composed.generate(input_ids = prompt, max_new_tokens = 4, do_sample = False, num_beams = 2)

    with torch.no_grad():
        plain_anchor_out = plain.generate(input_ids = prompt, max_new_tokens = 4, do_sample = False, num_beams = 2)

    assert torch.equal(lora_out, plain_out)
    assert not torch.equal(lora_out, plain_anchor_out)  # the composition did change the output

def test_lora_and_composition_train_together_and_nothing_else_changes(tmp_path):
    calm = CALM(lora_anchor(), augment(), attn_kwargs = ATTN)
    before = snapshot(calm)
    dataset = [dict(seq = torch.randint(3, 128, (12,))) for _ in range(8)]

    with pytest.raises(ValueError, match = 'train_anchor_params=True'):
        FineTuner(calm, dataset, num_train_steps = 2, batch_size = 4, progress = False)

    trainer = FineTuner(calm, dataset, num_train_steps = 3, batch_size = 4, learning_rate = 1e-2, train_anchor_params = True, progress = False)
    trainer.train()

    after = snapshot(calm)
    changed = {name for name in before if not torch.equal(before[name], after[name])}

    lora = {name for name in before if is_lora(name)}
    trained = {name for name in before if name.startswith('cross_attns.') and name.endswith('to_out.weight')}
    assert lora <= changed and trained <= changed
    # every other tensor of the anchor and the augment is bit-identical
    assert all(name.startswith('cross_attns.') or is_lora(name) for name in changed)

    # the LoRA weights are saved with the composition and loaded back
    path = calm.save(tmp_path / 'composition.safetensors')
    fresh = CALM(lora_anchor(), augment(), attn_kwargs = ATTN)

    with torch.no_grad():
        for name, param in fresh.anchor.named_parameters():
            if is_lora(name):
                param.normal_()  # whatever they hold is replaced by the checkpoint

    fresh.load(path)

    reloaded = snapshot(fresh)
    assert all(torch.equal(after[name], reloaded[name]) for name in lora | {name for name in after if name.startswith('cross_attns.')})

    seq = torch.randint(3, 128, (2, 10))
    assert torch.equal(fresh(seq, return_loss = False), calm(seq, return_loss = False))

    # a composition without the LoRA weights does not fit it
    torch.manual_seed(0)
    with pytest.raises(CompositionMismatchError, match = 'lora_A'):
        CALM(llama(depth = 4), augment(), attn_kwargs = ATTN).load(path)

def test_prompt_learning_peft_anchors_are_refused():
    anchor = get_peft_model(llama(), PrefixTuningConfig(num_virtual_tokens = 2, task_type = 'CAUSAL_LM'))

    with pytest.raises(ValueError, match = 'prompt-learning'):
        CALM(anchor, augment(), attn_kwargs = ATTN)

def test_lora_with_trainer_and_gradient_checkpointing_trains_as_without(tmp_path):
    from transformers import Trainer, TrainingArguments, default_data_collator

    rows = [dict(input_ids = ids.tolist(), labels = ids.tolist()) for ids in torch.randint(3, 128, (8, 12))]

    def trained(checkpointing: bool) -> dict:
        calm = CALM(lora_anchor(), augment(), attn_kwargs = ATTN)
        args = TrainingArguments(output_dir = str(tmp_path), max_steps = 2, per_device_train_batch_size = 4, learning_rate = 1e-2, gradient_checkpointing = checkpointing, report_to = [], use_cpu = True, disable_tqdm = True, save_strategy = 'no')
        Trainer(model = calm, args = args, train_dataset = rows, data_collator = default_data_collator).train()
        assert calm.is_activation_checkpointing == checkpointing
        return snapshot(calm)

    plain, checkpointed = trained(False), trained(True)
    assert any(not torch.equal(plain[name], lora_anchor().state_dict()[name[len('anchor.'):]]) for name in plain if is_lora(name))
    assert all(torch.allclose(plain[name], tensor, atol = 1e-6) for name, tensor in checkpointed.items())
