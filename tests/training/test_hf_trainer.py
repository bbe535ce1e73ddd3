from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_models import gpt2, llama
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from calm_pytorch import CALM, AugmentParams, CALMOutput
from calm_pytorch.training.hf_trainer import CALMTrainer, register_accelerate_hooks

# the composition as a Hugging Face Trainer model: HF-style batches, the output Trainer reads,
# and saves that hold the composition only

def build(seed: int = 0) -> CALM:
    # the augment is a GPT-2 with tied embeddings: a plain state_dict() of it cannot be written by safetensors
    torch.manual_seed(seed)
    return CALM(llama(), gpt2(), attn_kwargs = dict(heads = 2, dim_head = 8))

def randomize_outputs(calm: CALM):
    # untrained, the composition is the anchor: make the cross-attention count
    with torch.no_grad():
        for blocks in calm.cross_attns:
            for block in blocks:
                block.to_out.weight.normal_(std = 0.5)

def frozen_state(calm: CALM) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in calm.state_dict().items() if not name.startswith('cross_attns.')}

def composition(calm: CALM) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in calm.composition_state_dict().items()}

def hf_dataset(num: int = 16, length: int = 12) -> list[dict]:
    # HF-style rows: the first half of each row is a question (no loss), the last two are padding
    generator = torch.Generator().manual_seed(1)
    rows = []

    for _ in range(num):
        ids = torch.randint(3, 128, (length,), generator = generator)
        mask = torch.ones(length, dtype = torch.long)
        mask[-2:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:length // 2] = -100
        rows.append(dict(input_ids = ids.tolist(), attention_mask = mask.tolist(), labels = labels.tolist()))

    return rows

def training_args(out, **kwargs) -> TrainingArguments:
    defaults = dict(output_dir = str(out), per_device_train_batch_size = 4, report_to = [], use_cpu = True, disable_tqdm = True, save_strategy = 'no', learning_rate = 1e-2, seed = 0)
    return TrainingArguments(**{**defaults, **kwargs})

# the forward with Hugging Face's names

def test_hf_call_returns_loss_and_logits_as_trainer_reads_them():
    calm = build()
    randomize_outputs(calm)
    seq = torch.randint(3, 128, (2, 10))
    mask = torch.ones_like(seq, dtype = torch.bool)
    mask[1, 7:] = False

    out = calm(input_ids = seq, attention_mask = mask.long(), labels = seq.masked_fill(~mask, -100))

    assert isinstance(out, CALMOutput) and isinstance(out, dict)
    assert out.logits.shape == (2, 10, 128) and list(out.keys()) == ['loss', 'logits']
    assert out[0] is out.loss and out['loss'] is out.loss and out[1] is out.logits

    # the same loss as the native call, which shifts `seq` and masks the padding itself
    assert torch.allclose(out.loss, calm(seq, mask = mask), atol = 1e-6)
    # the anchor read all of input_ids: its logits are those of the native call without loss
    assert torch.equal(out.logits, calm(seq, mask = mask, return_loss = False))

    without_labels = calm(input_ids = seq)
    assert without_labels.loss is None and 'loss' not in without_labels and without_labels[0] is without_labels.logits

def test_labels_are_independent_of_the_attention_mask():
    calm = build()
    randomize_outputs(calm)
    seq = torch.randint(3, 128, (2, 10))
    labels = seq.clone()
    labels[:, :6] = -100  # an answer-only loss over a fully attended sequence

    logits = calm(seq, return_loss = False)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1), ignore_index = -100)

    out = calm(input_ids = seq, attention_mask = torch.ones_like(seq), labels = labels)
    assert torch.allclose(out.loss, expected, atol = 1e-6)

    # the native path takes the same labels; the attention mask still shapes the input only
    assert torch.allclose(calm(seq, labels = labels), expected, atol = 1e-6)

    masked = torch.ones_like(seq, dtype = torch.bool)
    masked[:, 2] = False  # a masked token whose label is kept stays in the loss
    kept = labels.clone()
    kept[:, 2] = seq[:, 2]
    loss_masked = calm(seq, mask = masked, labels = kept)
    logits_masked = calm(seq, mask = masked, return_loss = False)
    assert torch.allclose(loss_masked, F.cross_entropy(logits_masked[:, :-1].reshape(-1, 128), kept[:, 1:].reshape(-1), ignore_index = -100), atol = 1e-6)

def test_num_items_in_batch_divides_the_summed_loss():
    calm = build()
    seq = torch.randint(3, 128, (2, 10))
    labels = seq.clone()
    labels[0, :5] = -100

    mean = calm(input_ids = seq, labels = labels).loss
    summed = calm(input_ids = seq, labels = labels, num_items_in_batch = 1).loss
    counted = (labels[:, 1:] != -100).sum()

    assert torch.allclose(summed, mean * counted, rtol = 1e-5)
    assert torch.allclose(calm(input_ids = seq, labels = labels, num_items_in_batch = 2 * counted).loss, mean / 2, rtol = 1e-5)

def test_bad_hf_calls_are_clear():
    calm = build()
    seq = torch.randint(3, 128, (2, 10))

    with pytest.raises(TypeError, match = 'not both'):
        calm(seq, input_ids = seq)

    with pytest.raises(ValueError, match = 'not shifted'):
        calm(input_ids = seq, labels = seq[:, 1:])

    with pytest.raises(TypeError, match = 'needs the anchor'):
        calm()

    with pytest.raises(ValueError, match = 'return_loss'):
        calm(seq, labels = seq, return_loss = False)

# Trainer

def test_plain_trainer_trains_with_default_settings(tmp_path):
    # remove_unused_columns stays on: CALM's forward names the HF columns
    calm = build()
    frozen = frozen_state(calm)
    before = composition(calm)

    trainer = Trainer(model = calm, args = training_args(tmp_path, max_steps = 3), train_dataset = hf_dataset(), data_collator = default_data_collator)
    assert trainer.args.remove_unused_columns
    result = trainer.train()

    assert torch.isfinite(torch.tensor(result.training_loss))
    assert all(not torch.equal(before[name], tensor) for name, tensor in composition(calm).items() if name.endswith('to_out.weight'))
    assert all(torch.equal(frozen[name], tensor) for name, tensor in frozen_state(calm).items())

def test_trainer_with_gradient_checkpointing_trains_as_without(tmp_path):
    def trained(checkpointing: bool) -> dict:
        # connected low in a deeper anchor: the blocks above carry the gradient and are checkpointed
        torch.manual_seed(0)
        calm = CALM(llama(depth = 4), AugmentParams(model = gpt2(), connections = ((2, 1), (4, 2))), attn_kwargs = dict(heads = 2, dim_head = 8))
        args = training_args(tmp_path, max_steps = 2, gradient_checkpointing = checkpointing)
        Trainer(model = calm, args = args, train_dataset = hf_dataset(), data_collator = default_data_collator).train()
        assert calm.is_activation_checkpointing == checkpointing
        return composition(calm)

    plain, checkpointed = trained(False), trained(True)
    assert all(torch.allclose(plain[name], tensor, atol = 1e-6) for name, tensor in checkpointed.items())

def test_trainer_evaluates():
    calm = build()
    trainer = Trainer(model = calm, args = training_args('unused', per_device_eval_batch_size = 4), eval_dataset = hf_dataset(8), data_collator = default_data_collator)
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics['eval_loss']))

def test_save_model_writes_the_composition_only(tmp_path):
    # plain Trainer cannot save this CALM: its augment ties its embeddings
    calm = build()
    randomize_outputs(calm)

    with pytest.raises(RuntimeError, match = 'share memory'):
        Trainer(model = calm, args = training_args(tmp_path)).save_model(str(tmp_path / 'plain'))

    CALMTrainer(model = calm, args = training_args(tmp_path)).save_model(str(tmp_path / 'saved'))

    # a composition directory (calm.save_pretrained): nothing of the frozen models' weights
    assert sorted(path.name for path in (tmp_path / 'saved').iterdir()) == ['README.md', 'composition.safetensors', 'config.json', 'training_args.bin']

    other = build()  # the same frozen models (a checkpoint refuses others), a fresh composition
    other.load(tmp_path / 'saved' / 'composition.safetensors')
    assert all(torch.equal(calm.composition_state_dict()[name], tensor) for name, tensor in other.composition_state_dict().items())

def test_gradient_accumulation_weighs_every_token_the_same(tmp_path):
    # rows with 1 to 8 predicted tokens: a mean of per-micro-batch means would weigh them differently.
    # The label at position 0 is never predicted (nothing comes before it) and must not be counted
    data = hf_dataset(8)
    for index, row in enumerate(data):
        ids = row['input_ids']
        row['labels'] = ids[:1] + [-100] * (10 - index) + ids[11 - index:]

    def one_step(batch_size: int, accumulate: int) -> dict:
        calm = build()
        args = training_args(tmp_path, max_steps = 1, per_device_train_batch_size = batch_size, gradient_accumulation_steps = accumulate, optim = 'sgd', learning_rate = 1., max_grad_norm = 0.)
        Trainer(model = calm, args = args, train_dataset = data, data_collator = default_data_collator).train()
        return composition(calm)

    # the same step by hand: the mean over every predicted token of the 8 rows
    calm = build()
    batch = default_data_collator(data)
    calm(**batch).loss.backward()

    with torch.no_grad():
        for param in calm.cross_attns.parameters():
            param -= param.grad

    expected = composition(calm)

    for steps in (one_step(8, 1), one_step(2, 4)):
        assert all(torch.allclose(expected[name], tensor, atol = 1e-5) for name, tensor in steps.items())

class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True

def test_resume_from_a_periodic_checkpoint_equals_an_uninterrupted_run(tmp_path):
    data = hf_dataset()
    args = dict(max_steps = 6, save_strategy = 'steps', save_steps = 2)

    straight = build()
    CALMTrainer(model = straight, args = training_args(tmp_path / 'straight', **args), train_dataset = data, data_collator = default_data_collator).train()

    # interrupted after step 4 (as a crash would leave it), then resumed by a fresh process's objects
    interrupted = build()
    CALMTrainer(model = interrupted, args = training_args(tmp_path / 'resumed', **args), train_dataset = data, data_collator = default_data_collator, callbacks = [StopAt(4)]).train()

    checkpoint = tmp_path / 'resumed' / 'checkpoint-4'
    assert {'composition.safetensors', 'optimizer.pt', 'scheduler.pt', 'rng_state.pth', 'trainer_state.json'} <= {path.name for path in checkpoint.iterdir()}
    assert not (checkpoint / 'model.safetensors').exists()

    resumed = build()
    randomize_outputs(resumed)  # whatever it holds is replaced by the checkpoint
    trainer = CALMTrainer(model = resumed, args = training_args(tmp_path / 'resumed', **args), train_dataset = data, data_collator = default_data_collator)
    trainer.train(resume_from_checkpoint = True)

    assert trainer.state.global_step == 6
    expected = composition(straight)
    assert all(torch.allclose(expected[name], tensor, atol = 1e-6) for name, tensor in composition(resumed).items())

def test_best_model_is_loaded_from_the_composition(tmp_path):
    calm = build()
    args = training_args(tmp_path, max_steps = 4, save_strategy = 'steps', eval_strategy = 'steps', save_steps = 2, eval_steps = 2, load_best_model_at_end = True, per_device_eval_batch_size = 4)
    trainer = CALMTrainer(model = calm, args = args, train_dataset = hf_dataset(), eval_dataset = hf_dataset(8), data_collator = default_data_collator)
    trainer.train()

    best = build()  # the same frozen models (a checkpoint refuses others), a fresh composition
    best.load(f'{trainer.state.best_model_checkpoint}/composition.safetensors')
    assert all(torch.equal(best.composition_state_dict()[name], tensor) for name, tensor in calm.composition_state_dict().items())

# Accelerate

def test_accelerate_save_and_load_state_hold_the_composition(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu = True)
    calm = build()
    optimizer = torch.optim.AdamW([param for param in calm.parameters() if param.requires_grad], lr = 1e-2)
    calm, optimizer = accelerator.prepare(calm, optimizer)
    handles = register_accelerate_hooks(accelerator)

    seq = torch.randint(3, 128, (2, 10))

    def step():
        accelerator.backward(calm(input_ids = seq, labels = seq).loss)
        optimizer.step()
        optimizer.zero_grad()

    step()
    accelerator.save_state(str(tmp_path / 'state'))
    saved, saved_optimizer = composition(calm), optimizer.state_dict()['state'][0]['exp_avg'].clone()

    files = {path.name for path in (tmp_path / 'state').iterdir()}
    assert 'composition.safetensors' in files and not any(name.startswith('model') for name in files)

    step()
    accelerator.load_state(str(tmp_path / 'state'))

    assert all(torch.equal(saved[name], tensor) for name, tensor in composition(calm).items())
    assert torch.equal(optimizer.state_dict()['state'][0]['exp_avg'], saved_optimizer)

    for handle in handles:
        handle.remove()
