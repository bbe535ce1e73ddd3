"""Prints `name==version` for the lower bound pyproject.toml claims for torch, transformers and
torchao (whose releases follow torch's), so that CI can run the tests under the oldest of each.
The other dependencies resolve to their newest releases in both runs."""

import re
import tomllib
from pathlib import Path

PINNED = ('torch', 'transformers', 'torchao')

project = tomllib.loads((Path(__file__).parent.parent / 'pyproject.toml').read_text())['project']
requirements = [*project['dependencies'], *project['optional-dependencies']['test']]
floors = {}

for requirement in requirements:
    match = re.fullmatch(r'([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)', requirement.strip())

    if match and match.group(1) in PINNED:
        floors[match.group(1)] = match.group(2)

missing = set(PINNED) - set(floors)
if missing:
    raise SystemExit(f'pyproject.toml claims no lower bound (name>=version) for {sorted(missing)}')

for name, version in floors.items():
    print(f'{name}=={version}')
