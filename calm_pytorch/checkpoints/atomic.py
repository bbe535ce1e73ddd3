from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

# atomic writes: the new content is written beside the target under a hidden temporary name,
# flushed to disk, and only then renamed over the target. A rename within one filesystem is
# atomic on POSIX and Windows, so a crash at any moment leaves either the old file or the new
# one, never half of either. A crash may leave a hidden `.<name>.*.tmp` behind; it is never read.
# Files and directories are created with the permissions of the user's umask (0644 and 0755 under
# the usual 022), as `open` and `mkdir` would: `tempfile.mkstemp` / `mkdtemp` would give 0600 and
# 0700, which other users of a shared filesystem could not read.

CHUNK_SIZE = 1 << 20

def write_chunks(handle: BinaryIO, data: bytes):
    view = memoryview(data)
    for start in range(0, len(view), CHUNK_SIZE):
        handle.write(view[start:start + CHUNK_SIZE])

def fsync_dir(path: Path):
    # the rename itself lives in the directory entry: sync it too, where the OS allows
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return

    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

def create_beside(path: Path, suffix: str, create: Callable[[Path], object]):
    # a fresh hidden name next to `path`; O_EXCL / mkdir fail rather than reuse an existing one
    for _ in range(100):
        candidate = path.parent / f'.{path.name}.{secrets.token_hex(4)}{suffix}'
        try:
            return candidate, create(candidate)
        except FileExistsError:
            continue

    raise FileExistsError(f'could not create a temporary name beside {path}')

def new_file(path: Path) -> int:
    # mode 0o666 and O_EXCL, as `open(path, 'xb')` would: the umask decides the permissions
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_BINARY', 0), 0o666)

def new_dir(path: Path):
    os.mkdir(path, 0o777)  # the umask decides the permissions

def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)

    # the rename would fail naming the temporary file, not the user's path
    if path.is_dir():
        raise IsADirectoryError(f'{path} is a directory; a checkpoint is one file: give a file path (e.g. {path / "composition.safetensors"})')

    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(f'cannot write {path}: {parent} is a file, not a directory')

    path.parent.mkdir(parents = True, exist_ok = True)

    tmp, fd = create_beside(path, '.tmp', new_file)

    try:
        with os.fdopen(fd, 'wb') as handle:
            write_chunks(handle, data)
            handle.flush()
            os.fsync(handle.fileno())

        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok = True)
        raise

    fsync_dir(path.parent)
    return path

def temporary_dir_beside(path: str | os.PathLike) -> Path:
    """A hidden directory next to `path`, on the same filesystem, to fill and then `publish_dir`."""
    path = Path(path)
    path.parent.mkdir(parents = True, exist_ok = True)
    return create_beside(path, '.tmp', new_dir)[0]

def publish_dir(tmp: Path, path: str | os.PathLike) -> Path:
    """Renames the filled temporary directory to `path`. An existing `path` is first moved aside
    and removed only after the new one is in place."""

    path = Path(path)
    old = None

    if path.exists():
        old = create_beside(path, '.old', new_dir)[0]
        os.replace(path, old / path.name)

    os.replace(tmp, path)
    fsync_dir(path.parent)

    if old is not None:
        shutil.rmtree(old, ignore_errors = True)

    return path
