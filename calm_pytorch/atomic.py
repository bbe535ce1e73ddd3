from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

# atomic writes: the new content is written beside the target under a hidden temporary name,
# flushed to disk, and only then renamed over the target. A rename within one filesystem is
# atomic on POSIX and Windows, so a crash at any moment leaves either the old file or the new
# one, never half of either. A crash may leave a hidden `.<name>.*.tmp` behind; it is never read.

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

def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents = True, exist_ok = True)

    fd, tmp = tempfile.mkstemp(dir = path.parent, prefix = f'.{path.name}.', suffix = '.tmp')

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
    return Path(tempfile.mkdtemp(dir = path.parent, prefix = f'.{path.name}.', suffix = '.tmp'))

def publish_dir(tmp: Path, path: str | os.PathLike) -> Path:
    """Renames the filled temporary directory to `path`. An existing `path` is first moved aside
    and removed only after the new one is in place."""

    path = Path(path)
    old = None

    if path.exists():
        old = Path(tempfile.mkdtemp(dir = path.parent, prefix = f'.{path.name}.', suffix = '.old'))
        os.replace(path, old / path.name)

    os.replace(tmp, path)
    fsync_dir(path.parent)

    if old is not None:
        shutil.rmtree(old, ignore_errors = True)

    return path
