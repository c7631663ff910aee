"""Atomic file writes: a temporary file in the same directory, then a rename.

A writer killed part-way leaves at most a hidden ``.NAME.tmp-*`` file, never a
truncated file under the final name, and the file previously under that name
stays intact until the rename replaces it in one step (``os.replace`` is
atomic on POSIX within one file system, which is why the temporary file lives
beside the target). The data is fsync'ed before the rename and the directory
after it, so a crash cannot leave the new name pointing at unwritten blocks.
"""

from __future__ import annotations

import contextlib
import os
import threading
import zlib
from pathlib import Path
from typing import Callable, IO, Iterator

__all__ = ["atomic_path", "atomic_write", "checkpoint_path", "file_crc32", "fsync_dir", "refuse_url"]


def checkpoint_path(prefix: str | os.PathLike, rank: int, world_size: int) -> Path:
    """``{prefix}_rank-{r:08d}-of-{N:08d}.pth``: one rank's file, the layout of torch_xla's FSDP docs."""
    return Path(f"{prefix}_rank-{rank:08d}-of-{world_size:08d}.pth")


def refuse_url(path: str | os.PathLike, what: str) -> None:
    """Refuse ``gs://...`` and any other ``scheme://`` path: ``Path`` would make it a local folder ``gs:``."""
    text = os.fspath(path)
    if "://" in text:
        raise ValueError(f"{what} {text!r} is a URL; only local (or mounted) paths are supported: write to a "
                         "local directory and copy it (e.g. with gsutil), or mount the bucket (gcsfuse)")


def file_crc32(path: str | os.PathLike, chunk: int = 8 << 20) -> int:
    """zlib.crc32 of a whole file, read in chunks."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file, then move it to ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
    return Path(path)
