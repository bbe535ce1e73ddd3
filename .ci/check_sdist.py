"""Checks that a source distribution carries its tests whole: every file of tests/ (conftest.py and
the helper modules, not only test_*.py) and every file the tests read or run. A sdist that ships
tests without their conftest.py fails at collection.

    python .ci/check_sdist.py dist/calm_compose-0.1.0.tar.gz
"""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NEEDED_FOLDERS = ('tests', 'docs', 'examples', 'benchmarks')
NEEDED_FILES = ('README.md', 'CHANGELOG.md', 'LICENSE', '.ci/run', '.ci/check_layout.py', 'pyproject.toml')

def needed() -> set[str]:
    files = set(NEEDED_FILES)

    for folder in NEEDED_FOLDERS:
        for path in (ROOT / folder).rglob('*'):
            if path.is_file() and '__pycache__' not in path.parts and path.suffix not in ('.pyc', '.pyo'):
                files.add(path.relative_to(ROOT).as_posix())

    return files

def shipped(sdist: Path) -> set[str]:
    with tarfile.open(sdist) as archive:
        # members are <name>-<version>/<path>
        return {member.name.partition('/')[2] for member in archive.getmembers() if member.isfile()}

def main(sdist: Path):
    missing = sorted(needed() - shipped(sdist))

    if missing:
        sys.exit(f'{sdist} lacks {len(missing)} file(s) its tests need: {", ".join(missing)}; include them in MANIFEST.in')

    print(f'{sdist}: carries tests/ whole and every file the tests read')

if __name__ == '__main__':
    if len(sys.argv) != 2:
        sys.exit(__doc__)

    main(Path(sys.argv[1]))
