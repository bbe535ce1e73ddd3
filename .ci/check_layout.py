"""Checks the package's layout: one-way doors between its rooms, and modules of a readable size.

    python .ci/check_layout.py [ROOT]    (ROOT: the folder holding calm_pytorch/, by default this repository)

- No import cycle among the modules of calm_pytorch, counting every import: at the top of a file,
  inside a function (a lazy import) or under `if TYPE_CHECKING`. Importing `a.b.c` also runs the
  `__init__` of the package `a.b` (unless the importer is inside it), so it counts as importing it.
- Doors: every room (a folder of calm_pytorch) says in the docstring of its `__init__.py` which
  other parts of the package it may import, on a line `May import: calm_pytorch.x, calm_pytorch.y`
  (or `May import: nothing`). A top-level module says the same in its own docstring. Imports
  inside one room are free.
- `calm.py` (the entrance) is at most 350 lines, every other module at most 500.

Exits non-zero with one line per problem.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = 'calm_pytorch'
MAX_LINES = 500
MAX_LINES_ENTRANCE = 350
DOORS = re.compile(r'^May import:\s*(.+)$', re.MULTILINE)

def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)

def find_modules(root: Path) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted((root / PACKAGE).rglob('*.py'))}

def resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module

    base = importer.split('.') if is_package else importer.split('.')[:-1]
    base = base[:len(base) - (node.level - 1)]
    return '.'.join(base + ([node.module] if node.module else []))

def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that importing `name` runs, directly."""

    found = set()
    is_package = path.name == '__init__.py'

    def add(target: str):
        # the module itself and every package on its way, but for the packages that hold `name`:
        # those are imported before it
        parts = target.split('.')
        for end in range(2, len(parts) + 1):
            candidate = '.'.join(parts[:end])
            if candidate in modules and candidate != name and not name.startswith(candidate + '.'):
                found.add(candidate)

    for node in ast.walk(ast.parse(path.read_text(), filename = str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + '.'):
                    add(alias.name)

        elif isinstance(node, ast.ImportFrom):
            target = resolve(node, name, is_package)

            if target != PACKAGE and not target.startswith(PACKAGE + '.'):
                continue

            add(target)

            # `from package import submodule` imports the submodule
            for alias in node.names:
                if f'{target}.{alias.name}' in modules:
                    add(f'{target}.{alias.name}')

    return found

def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a cycle or several."""

    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node: str):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)

        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])

        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)

    return found

def room_of(name: str) -> str:
    # calm_pytorch.generation.decoding -> calm_pytorch.generation; calm_pytorch.calm -> itself
    parts = name.split('.')
    return '.'.join(parts[:2])

def declared_doors(name: str, modules: dict[str, Path]) -> set[str] | None:
    room = room_of(name)
    docstring = ast.get_docstring(ast.parse(modules[room].read_text())) or ''
    match = DOORS.search(docstring)

    if match is None:
        return None

    listed = match.group(1).strip()
    return set() if listed == 'nothing' else {door.strip() for door in listed.split(',')}

def problems_of(root: Path) -> list[str]:
    modules = find_modules(root)
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    problems = []

    for component in cycles(graph):
        problems.append(f'import cycle among {", ".join(component)}')

    for name in sorted(modules):
        if name == PACKAGE:
            continue  # the package's __init__ re-exports the public API from every room

        doors = declared_doors(name, modules)
        room = room_of(name)

        if doors is None:
            problems.append(f'{modules[room].relative_to(root)} does not say what it may import (a line "May import: ..." in its docstring)')
            continue

        for target in sorted(graph[name]):
            target_room = room_of(target)
            if target_room != room and target_room not in doors:
                problems.append(f'{name} imports {target}, but {room} may import only {", ".join(sorted(doors)) or "nothing"}')

    for name, path in modules.items():
        limit = MAX_LINES_ENTRANCE if name == f'{PACKAGE}.calm' else MAX_LINES
        lines = len(path.read_text().splitlines())

        if lines > limit:
            problems.append(f'{path.relative_to(root)} has {lines} lines, more than {limit}')

    return problems

def main(root: Path) -> int:
    problems = problems_of(root)

    for problem in problems:
        print(problem)

    if not problems:
        print(f'{len(find_modules(root))} modules: no import cycle, every import through a declared door, none too long')

    return 1 if problems else 0

if __name__ == '__main__':
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT))
