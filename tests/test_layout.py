from __future__ import annotations

import ast
import importlib
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
import torch

from conftest import ROOT

# the package's layout (docs/architecture.md): one-way doors checked by .ci/check_layout.py, and
# the module paths of calm-compose 0.1.0, whose package was one flat folder, still working

CHECK = ROOT / '.ci' / 'check_layout.py'
FIXTURES = ROOT / 'tests' / 'fixtures'

def check(root) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), str(root)], capture_output = True, text = True)

def test_the_package_has_one_way_doors():
    result = check(ROOT)
    assert result.returncode == 0, result.stdout
    assert 'no import cycle' in result.stdout

def test_the_check_finds_cycles_undeclared_doors_and_long_files(tmp_path):
    shutil.copytree(ROOT / 'calm_pytorch', tmp_path / 'calm_pytorch', ignore = shutil.ignore_patterns('__pycache__'))
    package = tmp_path / 'calm_pytorch'

    # a lazy import from a lower room into a higher one, and a CALM imported for a type hint only
    adapter = package / 'models' / 'adapter.py'
    adapter.write_text(adapter.read_text() + '\ndef late():\n    from calm_pytorch.composition.contexts import augment_contexts\n')

    decoding = package / 'generation' / 'decoding.py'
    decoding.write_text(decoding.read_text() + '\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from calm_pytorch.calm import CALM\n')

    calm = package / 'calm.py'
    calm.write_text(calm.read_text() + '\n' * 100)

    result = check(tmp_path)
    assert result.returncode == 1
    problems = result.stdout.splitlines()

    assert any(line.startswith('import cycle among') and 'calm_pytorch.models.adapter' in line and 'calm_pytorch.composition.contexts' in line for line in problems)
    assert any(line.startswith('import cycle among') and 'calm_pytorch.calm' in line and 'calm_pytorch.generation.decoding' in line for line in problems)
    assert 'calm_pytorch.models.adapter imports calm_pytorch.composition.contexts, but calm_pytorch.models may import only calm_pytorch.helpers' in problems
    assert any(line.startswith('calm_pytorch.generation.decoding imports calm_pytorch.calm, but calm_pytorch.generation may import only') for line in problems)
    assert any(line.startswith('calm_pytorch/calm.py has') and line.endswith('more than 350') for line in problems)

def module_level_imports(path) -> set[str]:
    # the top-level names a module imports when it is imported (not inside functions: those are optional)
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split('.')[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split('.')[0])
    return names

def test_every_library_imported_by_importing_the_package_is_declared():
    # a library that only arrives through another's dependencies (numpy, through x-transformers'
    # einx) is gone the day that dependency drops it
    declared = {re.split(r'[<>=!~ ;\[]', requirement)[0].lower().replace('_', '-') for requirement in tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['dependencies']}
    distributions = importlib.metadata.packages_distributions()

    # the package's modules, without those that import an extra's library at the top, which `import
    # calm_pytorch` never imports (lm_eval: evaluation; transformers: hf_config, hf_cache, the trainers)
    optional = ('evaluation', 'hf_config.py', 'hf_cache.py', 'hf_trainer.py', 'trl_trainers.py')
    imported = set()
    for path in (ROOT / 'calm_pytorch').rglob('*.py'):
        if not any(part in path.parts or path.name == part for part in optional):
            imported |= module_level_imports(path)

    third_party = imported - set(sys.stdlib_module_names) - {'calm_pytorch', '__future__'}
    undeclared = {name: distributions.get(name) for name in third_party if not any(dist.lower().replace('_', '-') in declared for dist in distributions.get(name, [name]))}
    assert undeclared == {}

def test_every_module_path_of_0_1_0_still_imports():
    # each name a module of 0.1.0 defined, from its old path, is the object at its new home
    old = json.loads((FIXTURES / 'names-0.1.0.json').read_text())
    assert len(old) == 32

    for module_name, names in old.items():
        module = importlib.import_module(f'calm_pytorch.{module_name}')

        for name in names:
            assert hasattr(module, name), f'calm_pytorch.{module_name}.{name}'
            value = getattr(module, name)
            home = getattr(value, '__module__', None)

            if isinstance(home, str) and home.startswith('calm_pytorch.') and hasattr(value, '__name__'):
                assert getattr(importlib.import_module(home), value.__name__) is value

def test_documented_old_paths_in_a_fresh_interpreter():
    # the first import of the process names the old path: the package installs its finder first
    code = (
        'from calm_pytorch.hf_trainer import CALMTrainer, register_accelerate_hooks\n'
        'from calm_pytorch.fsdp import local_and_global_numel, shard_frozen_models\n'
        'import calm_pytorch.checkpoint as checkpoint\n'
        'from calm_pytorch.generation import sample, top_k_filter\n'
        'from calm_pytorch.training.hf_trainer import CALMTrainer as moved\n'
        'from calm_pytorch.checkpoints.save_load import save_composition\n'
        'assert CALMTrainer is moved and checkpoint.save_composition is save_composition\n'
        'print("ok")\n'
    )
    result = subprocess.run([sys.executable, '-c', code], capture_output = True, text = True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'ok'

def test_an_unknown_module_is_still_an_import_error():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module('calm_pytorch.no_such_module')

def test_a_calm_pickled_by_0_1_0_loads_and_composes(tmp_path):
    # its pickle names calm_pytorch.adapters, .capture, .injection, .sites, ... (the flat layout)
    saved = torch.load(FIXTURES / 'calm-0.1.0.pt', weights_only = False)
    calm, seq, logits = saved['calm'], saved['seq'], saved['logits']

    assert torch.equal(calm(seq, return_loss = False), logits)
    assert not torch.equal(calm.anchor(seq), logits)  # the composition changes the anchor's output

    # and it keeps working as a composition of today: save, load, generate, remove its hooks
    path = calm.save(tmp_path / 'again.safetensors')
    calm.load(path)
    assert calm.generate(seq, max_new_tokens = 3, temperature = 0.).shape == (2, 3)

    # the flags it recorded when composing (its models were fresh: all trainable) come back
    calm.remove_hooks()
    assert all(param.requires_grad for model in (calm.anchor, *calm.augments) for param in model.parameters())

def test_a_composition_checkpoint_of_0_1_0_loads_into_a_new_calm():
    from calm_pytorch import CALM, AugmentParams

    pickled = torch.load(FIXTURES / 'calm-0.1.0.pt', weights_only = False)
    old = pickled['calm']
    old.remove_hooks()

    calm = CALM(
        old.anchor,
        AugmentParams(model = old.augments[0], transformer_blocks = ['1', '2', '3', '4'], connect_every_num_layers = 2),
        anchor_transformer_blocks = ['1', '2'],
        attn_kwargs = dict(heads = 2, dim_head = 8)
    )

    assert not torch.equal(calm(pickled['seq'], return_loss = False), pickled['logits'])

    wiring = calm.load(FIXTURES / 'composition-0.1.0.safetensors')
    assert wiring['library_version'] == '0.1.0'
    assert torch.equal(calm(pickled['seq'], return_loss = False), pickled['logits'])
