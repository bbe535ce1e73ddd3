from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers
from conftest import ROOT, decoder
from text_tokenizers import byte_bpe, wordpiece

from calm_pytorch import CALM, AugmentParams, CompositionMismatchError
from calm_pytorch.training.hf_trainer import CALMTrainer

# a composition as a directory (and on the Hub): save_pretrained writes what was trained and how
# to rebuild the rest; from_pretrained rebuilds the frozen models through transformers, checks them
# against the saved fingerprint and loads the composition. No network: hub repos are made in a
# local hub cache, as huggingface_hub lays one out

transformers.logging.set_verbosity_error()

@pytest.fixture(autouse = True)
def offline(monkeypatch):
    # never the network (and no waiting for it): huggingface_hub and transformers read this flag
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)

def llama(vocab: int, seed: int):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size = vocab, hidden_size = 32, num_hidden_layers = 2, num_attention_heads = 2, num_key_value_heads = 1, intermediate_size = 64, max_position_embeddings = 64))

def gpt2(vocab: int, seed: int):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size = vocab, n_embd = 24, n_layer = 4, n_head = 2, n_positions = 64))

def randomized(calm: CALM) -> CALM:
    # trained, as far as a test can tell: the deltas are not zero
    torch.manual_seed(5)
    with torch.no_grad():
        for param in calm.cross_attns.parameters():
            param.normal_(std = 0.2)
    return calm.eval()

def saved_models(tmp_path: Path, anchor_vocab: int = 128, augment_vocab: int = 128) -> tuple[Path, Path]:
    llama(anchor_vocab, 0).save_pretrained(tmp_path / 'anchor')
    gpt2(augment_vocab, 1).save_pretrained(tmp_path / 'augment')
    return tmp_path / 'anchor', tmp_path / 'augment'

def loaded(path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(path)

def fresh_process_logits(code: str, ids: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    torch.save(ids, tmp_path / 'ids.pt')
    script = f"import torch; from calm_pytorch import CALM; torch.save({code}(input_ids = torch.load('ids.pt')).logits, 'logits.pt')"
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]), 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
    result = subprocess.run([sys.executable, '-c', script], cwd = tmp_path, env = env, capture_output = True, text = True, timeout = 300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / 'logits.pt')

def test_a_saved_directory_loads_in_a_fresh_process_to_identical_logits(tmp_path):
    # aligned mode across tokenizers: the tokenizers are part of the composition and saved with it
    anchor_dir, augment_dir = saved_models(tmp_path, len(byte_bpe()), len(wordpiece()))
    calm = randomized(CALM(
        loaded(anchor_dir),
        AugmentParams(model = loaded(augment_dir), connections = ((2, 1), (4, 2)), hidden_position = 'input', tokenizer = wordpiece()),
        anchor_tokenizer = byte_bpe(),
        anchor_hidden_position = ('output', 'input'),
        attn_kwargs = dict(heads = 2, dim_head = 8)
    ))

    calm.save_pretrained(tmp_path / 'calm')
    directory = tmp_path / 'calm'

    # the composition only: its weights, no frozen weight
    composition_bytes = sum(param.numel() * 4 for param in calm.cross_attns.parameters())
    assert composition_bytes < (directory / 'composition.safetensors').stat().st_size < composition_bytes + 20_000
    assert sum(path.stat().st_size for path in directory.rglob('*.safetensors')) == (directory / 'composition.safetensors').stat().st_size

    config = json.loads((directory / 'config.json').read_text())
    assert config['model_type'] == 'calm'
    assert config['anchor'] == dict(library = 'transformers', model_class = 'LlamaForCausalLM', source = str(anchor_dir.resolve()), revision = None, dtype = 'float32')
    assert config['composition']['augments'][0]['connections'] == [[2, 1], [4, 2]]
    assert config['composition']['anchor_hidden_position'] == ['output', 'input']

    # the anchor's tokenizer where transformers looks for it, the augment's beside it
    assert transformers.AutoTokenizer.from_pretrained(directory).get_vocab() == byte_bpe().get_vocab()
    assert (directory / 'augment_0_tokenizer' / 'tokenizer.json').is_file()
    assert isinstance(transformers.AutoConfig.from_pretrained(directory), type(calm.config))

    card = (directory / 'README.md').read_text()
    assert 'library_name: calm-compose' in card and '| 0 | 4 | 2 | input | input |' in card and f'calm = CALM.from_pretrained({str(directory)!r})' in card

    ids = torch.tensor(byte_bpe()(['the cat sat on the mat', 'numbers like 12 and'], padding = True)['input_ids'])

    with torch.no_grad():
        expected = calm(input_ids = ids).logits

    assert torch.equal(fresh_process_logits(f'CALM.from_pretrained({str(directory)!r})', ids, tmp_path), expected)

def publish(folder: Path, repo_id: str, cache: Path, commit: str):
    # a hub repo as huggingface_hub caches it: refs/main names the commit, snapshots/<commit> holds its files
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / 'refs').mkdir(parents = True, exist_ok = True)
    (repo / 'refs' / 'main').write_text(commit)
    shutil.copytree(folder, repo / 'snapshots' / commit)

def hub_cache(tmp_path, monkeypatch) -> tuple[Path, dict]:
    # an empty local hub cache, and the keywords that load from it alone
    cache = tmp_path / 'hub'
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
    return cache, dict(cache_dir = cache, local_files_only = True)

def test_hub_repos_by_id_with_revisions_pinned(tmp_path, monkeypatch):
    cache, hub = hub_cache(tmp_path, monkeypatch)

    anchor_dir, augment_dir = saved_models(tmp_path)
    publish(anchor_dir, 'org/anchor', cache, 'a' * 40)
    publish(augment_dir, 'org/augment', cache, 'b' * 40)

    anchor = transformers.AutoModelForCausalLM.from_pretrained('org/anchor', **hub)
    augment = transformers.AutoModelForCausalLM.from_pretrained('org/augment', **hub)
    calm = randomized(CALM(anchor, augment, attn_kwargs = dict(heads = 2, dim_head = 8)))

    calm.save_pretrained(tmp_path / 'calm')
    config = json.loads((tmp_path / 'calm' / 'config.json').read_text())
    assert (config['anchor']['source'], config['anchor']['revision']) == ('org/anchor', 'a' * 40)
    assert (config['augments'][0]['source'], config['augments'][0]['revision']) == ('org/augment', 'b' * 40)
    assert 'base_model: org/anchor' in (tmp_path / 'calm' / 'README.md').read_text()

    publish(tmp_path / 'calm', 'org/calm', cache, 'c' * 40)

    # the anchor's default branch moves on to other weights: the composition still gets the revision it was trained over
    llama(128, 7).save_pretrained(tmp_path / 'anchor_v2')
    publish(tmp_path / 'anchor_v2', 'org/anchor', cache, 'd' * 40)

    ids = torch.randint(3, 128, (2, 10))

    with torch.no_grad():
        expected = calm(input_ids = ids).logits

    with torch.no_grad():
        assert torch.equal(CALM.from_pretrained('org/calm', cache_dir = cache)(input_ids = ids).logits, expected)

    # a composition over the moved branch's anchor is refused by its fingerprint
    with pytest.raises(CompositionMismatchError, match = "anchor: its weights differ"):
        CALM.from_pretrained('org/calm', anchor = transformers.AutoModelForCausalLM.from_pretrained('org/anchor', **hub), **hub)

def test_an_anchor_loaded_at_another_revision_than_the_default_branch(tmp_path, monkeypatch):
    # transformers 5 keeps no record of the revision a model was loaded at: with two in the cache,
    # saving says which one config.json names, and loading the other says what to do
    cache, hub = hub_cache(tmp_path, monkeypatch)

    anchor_dir, augment_dir = saved_models(tmp_path)
    publish(anchor_dir, 'org/anchor', cache, 'a' * 40)
    llama(128, 7).save_pretrained(tmp_path / 'anchor_v2')
    publish(tmp_path / 'anchor_v2', 'org/anchor', cache, 'd' * 40)  # the default branch now

    old = transformers.AutoModelForCausalLM.from_pretrained('org/anchor', revision = 'a' * 40, **hub)
    calm = randomized(CALM(old, loaded(augment_dir), attn_kwargs = dict(heads = 2, dim_head = 8)))

    with pytest.warns(UserWarning, match = r"the hub cache holds 2 revisions of org/anchor \(the anchor\).*names the default branch's, d{40}") as record:
        calm.save_pretrained(tmp_path / 'calm')
    assert [warning.filename for warning in record] == [__file__]

    with pytest.raises(CompositionMismatchError, match = r'(?s)anchor: its weights differ.*the anchor, augment 0 came from the recorded source.*pass it in'):
        CALM.from_pretrained(tmp_path / 'calm', **hub)

    ids = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        assert torch.equal(CALM.from_pretrained(tmp_path / 'calm', anchor = old, **hub)(input_ids = ids).logits, calm(input_ids = ids).logits)

def test_wrong_or_missing_models_are_named_in_the_saved_compositions_terms(tmp_path):
    anchor_dir, augment_dir = saved_models(tmp_path)
    calm = randomized(CALM(loaded(anchor_dir), loaded(augment_dir), attn_kwargs = dict(heads = 2, dim_head = 8)))
    calm.save_pretrained(tmp_path / 'calm')

    # one augment may be given as it is, as to CALM itself
    again = CALM.from_pretrained(tmp_path / 'calm', augments = loaded(augment_dir))
    assert again.connections == calm.connections

    # a shallower augment: the saved connections do not fit it
    shallow = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size = 128, n_embd = 24, n_layer = 2, n_head = 2, n_positions = 64))
    with pytest.raises(CompositionMismatchError, match = r'cannot be built over the models given: it composes the anchor LlamaForCausalLM \(2 layers\) with GPT2LMHeadModel \(4 layers\)'):
        CALM.from_pretrained(tmp_path / 'calm', augments = [shallow])

    # the anchor's directory moved away
    shutil.move(anchor_dir, tmp_path / 'moved')
    with pytest.raises(OSError, match = rf'(?s)the anchor \(LlamaForCausalLM\) could not be loaded from its recorded source {anchor_dir.resolve()}.*load it yourself and pass it: CALM.from_pretrained\(..., anchor = model\)'):
        CALM.from_pretrained(tmp_path / 'calm')

def test_models_loaded_from_relative_directories_are_found_from_elsewhere(tmp_path, monkeypatch):
    saved_models(tmp_path)
    monkeypatch.chdir(tmp_path)
    calm = randomized(CALM(loaded('anchor'), loaded('augment'), attn_kwargs = dict(heads = 2, dim_head = 8)))

    # saved after moving to another directory, which holds no `anchor` folder
    (tmp_path / 'elsewhere').mkdir()
    monkeypatch.chdir(tmp_path / 'elsewhere')
    calm.save_pretrained('calm')

    config = json.loads(Path('calm/config.json').read_text())
    assert [config['anchor']['source'], config['augments'][0]['source']] == [str(tmp_path / 'anchor'), str(tmp_path / 'augment')]

    ids = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        assert torch.equal(CALM.from_pretrained('calm')(input_ids = ids).logits, calm(input_ids = ids).logits)

def test_an_augment_declared_to_share_the_tokenizer_keeps_it(tmp_path):
    # one tokenizer, embedding tables padded to different sizes
    anchor_dir, augment_dir = saved_models(tmp_path, anchor_vocab = 128, augment_vocab = 160)
    calm = randomized(CALM(loaded(anchor_dir), AugmentParams(model = loaded(augment_dir), same_tokenizer = True), attn_kwargs = dict(heads = 2, dim_head = 8)))
    calm.save_pretrained(tmp_path / 'calm')

    ids = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        assert torch.equal(CALM.from_pretrained(tmp_path / 'calm')(input_ids = ids).logits, calm(input_ids = ids).logits)

def test_the_model_card_counts_an_anchors_lora_weights_as_trained(tmp_path):
    from peft import LoraConfig, get_peft_model

    anchor_dir, augment_dir = saved_models(tmp_path)
    anchor = get_peft_model(loaded(anchor_dir), LoraConfig(r = 4, target_modules = ['q_proj', 'v_proj'], task_type = 'CAUSAL_LM'))
    calm = CALM(anchor, loaded(augment_dir), attn_kwargs = dict(heads = 2, dim_head = 8))
    calm.save_pretrained(tmp_path / 'calm')

    lora = sum(param.numel() for name, param in anchor.named_parameters() if 'lora_' in name)
    composition = sum(param.numel() for param in calm.cross_attns.parameters())
    frozen = sum(param.numel() for model in (anchor, calm.augments[0]) for param in model.parameters()) - lora

    card = (tmp_path / 'calm' / 'README.md').read_text()
    assert lora > 0
    assert f"Trained: {composition + lora:,} (the composition and the anchor's own trainable parameters (e.g. LoRA)). Frozen: {frozen:,}" in card
    assert 'pass it in, with the same adapters in place' in card

def test_other_frozen_models_are_refused(tmp_path):
    anchor_dir, augment_dir = saved_models(tmp_path)
    randomized(CALM(loaded(anchor_dir), loaded(augment_dir), attn_kwargs = dict(heads = 2, dim_head = 8))).save_pretrained(tmp_path / 'calm')

    # the augment's directory now holds other weights of the same shapes
    gpt2(128, 9).save_pretrained(augment_dir)

    with pytest.raises(CompositionMismatchError, match = 'augment 0: its weights differ'):
        CALM.from_pretrained(tmp_path / 'calm')

    with pytest.warns(UserWarning, match = 'augment 0: its weights differ'):
        CALM.from_pretrained(tmp_path / 'calm', strict_models = False)

def test_dtype_and_device_map_pass_through(tmp_path):
    anchor_dir, augment_dir = saved_models(tmp_path)
    calm = randomized(CALM(loaded(anchor_dir), loaded(augment_dir), attn_kwargs = dict(heads = 2, dim_head = 8)))
    calm.save_pretrained(tmp_path / 'calm')

    # cast on purpose: everything but the weights' values is still checked
    with pytest.warns(UserWarning, match = 'cannot be compared'):
        half = CALM.from_pretrained(tmp_path / 'calm', torch_dtype = torch.bfloat16, device_map = 'cpu')

    assert half.anchor.dtype == half.augments[0].dtype == torch.bfloat16
    assert half.cross_attns[0][0].to_q.weight.dtype == torch.float32  # the composition keeps its own dtype
    assert all(torch.equal(half.composition_state_dict()[key], value) for key, value in calm.composition_state_dict().items())

    ids = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(half(input_ids = ids).logits.float(), calm(input_ids = ids).logits, atol = 0.1, rtol = 0.05)

def test_models_only_the_user_can_build_are_passed_in(tmp_path):
    torch.manual_seed(0)
    anchor, augment = decoder(dim = 32, depth = 2), decoder(dim = 24, depth = 4)
    calm = randomized(CALM(anchor, AugmentParams(model = augment, connections = ((2, 1), (4, 2))), attn_kwargs = dict(heads = 2, dim_head = 8), pad_id = 0))
    calm.save_pretrained(tmp_path / 'calm')

    config = json.loads((tmp_path / 'calm' / 'config.json').read_text())
    assert config['anchor']['library'] == 'x_transformers' and config['anchor']['model_class'] == 'TransformerWrapper'
    assert 'pass the model to `from_pretrained`' in (tmp_path / 'calm' / 'README.md').read_text()

    with pytest.raises(ValueError, match = r'only you can build; pass it: CALM.from_pretrained\(..., anchor = model\)'):
        CALM.from_pretrained(tmp_path / 'calm')

    # the saved wiring is applied, even over AugmentParams that say otherwise
    again = CALM.from_pretrained(tmp_path / 'calm', anchor = anchor, augments = [AugmentParams(model = augment, connections = ((1, 1),))])
    assert again.connections == calm.connections and again.pad_id == 0

    seq = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(again(seq, return_loss = False), calm(seq, return_loss = False))

def test_without_transformers_saving_a_directory_says_what_to_install(tmp_path, monkeypatch):
    calm = CALM(decoder(dim = 32, depth = 2), decoder(dim = 24, depth = 4), attn_kwargs = dict(heads = 2, dim_head = 8))
    monkeypatch.setitem(sys.modules, 'calm_pytorch.composition.hf_config', None)  # as if transformers were not installed

    with pytest.raises(ImportError, match = r'install transformers.*or save the composition alone with calm.save\(path\)'):
        calm.save_pretrained(tmp_path / 'calm')

    assert not (tmp_path / 'calm').exists()

def test_not_a_composition_directory(tmp_path):
    anchor_dir, _ = saved_models(tmp_path)

    with pytest.raises(FileNotFoundError, match = 'not a composition directory'):
        CALM.from_pretrained(anchor_dir)

    with pytest.raises(FileNotFoundError, match = 'neither a composition directory'):
        CALM.from_pretrained(tmp_path / 'nothing' / 'here')

def test_push_to_hub_goes_through_huggingface_hub(tmp_path):
    # no network here: offline, huggingface_hub refuses the upload after the directory was written
    anchor_dir, augment_dir = saved_models(tmp_path)
    calm = CALM(loaded(anchor_dir), loaded(augment_dir), attn_kwargs = dict(heads = 2, dim_head = 8))

    with pytest.raises(Exception, match = '(?i)offline'):
        calm.push_to_hub('org/calm')

def test_calm_trainer_saves_the_directory_and_its_model_card(tmp_path):
    anchor_dir, augment_dir = saved_models(tmp_path)
    calm = CALM(loaded(anchor_dir), loaded(augment_dir), attn_kwargs = dict(heads = 2, dim_head = 8))

    generator = torch.Generator().manual_seed(0)
    rows = [dict(input_ids = ids, labels = ids) for ids in torch.randint(3, 128, (8, 10), generator = generator).tolist()]
    args = transformers.TrainingArguments(output_dir = str(tmp_path / 'run'), max_steps = 2, per_device_train_batch_size = 4, learning_rate = 1e-2, report_to = [], use_cpu = True, disable_tqdm = True, save_strategy = 'no', logging_steps = 1)

    trainer = CALMTrainer(model = calm, args = args, train_dataset = rows)
    trainer.train()

    # the card needs no saved directory; then save_model writes the directory, as push_to_hub does before its card
    trainer.create_model_card(dataset = 'counting')
    assert 'Trained with `CALMTrainer`' in (tmp_path / 'run' / 'README.md').read_text()
    trainer.save_model()
    trainer.create_model_card(dataset = 'counting')

    card = (tmp_path / 'run' / 'README.md').read_text()
    assert 'Trained with `CALMTrainer`' in card and 'for 2 steps' in card and 'Data: counting.' in card and 'Last logged: loss' in card

    again = CALM.from_pretrained(tmp_path / 'run')
    ids = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        assert torch.equal(again(input_ids = ids).logits, calm.eval()(input_ids = ids).logits)
