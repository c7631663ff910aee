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
import errno
import os
import shutil
import threading
import zlib
from pathlib import Path
from typing import Any, Callable, IO, Iterator, Optional

__all__ = ["atomic_path", "atomic_write", "atomic_torch_save", "checkpoint_path", "file_crc32", "fsync_dir",
           "no_space_problem", "refuse_url"]


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


def no_space_problem(directory: Path, needed: int) -> Optional[str]:
    """What is wrong when ``needed`` bytes do not fit in the free space of ``directory``'s device, or None."""
    free = shutil.disk_usage(directory).free
    if needed <= free:
        return None
    return (f"no space left on the device holding {directory}: about {needed / 2**20:.1f} MiB needed, "
            f"{free / 2**20:.1f} MiB free")


class _ErrorKeepingFile:
    """A file whose write errors are kept: ``torch.save`` replaces them with its own "unexpected pos" text."""

    def __init__(self, file: IO[bytes]):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.file.flush()


def _tensor_bytes(obj: Any) -> int:
    import torch
    from torch.utils._pytree import tree_leaves
    return sum(t.numel() * t.element_size() for t in tree_leaves(obj) if isinstance(t, torch.Tensor))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically; a full disk is an ``OSError`` saying so, where, and how much.

    The free space is checked first (the tensors' bytes; a lower bound of the file's size), so that a
    save that cannot fit does not fill the disk for everyone else; a device that fills up during the
    write (other writers) gives the same message instead of torch's "unexpected pos ...".
    """
    import torch
    path = Path(path)
    needed = _tensor_bytes(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    problem = no_space_problem(path.parent, needed)
    if problem:
        raise OSError(errno.ENOSPC, f"{problem}, for {path.name}")
    kept: list[_ErrorKeepingFile] = []

    def write(f: IO[bytes]) -> None:
        kept.append(_ErrorKeepingFile(f))
        torch.save(obj, kept[0])

    try:
        return atomic_write(path, write)
    except Exception as exc:
        cause = kept[0].error if kept and kept[0].error is not None else exc
        code = getattr(cause, "errno", None)
        if code in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(path.parent).free   # the partial file is already removed
            raise OSError(code, f"no space left on the device holding {path.parent}: {path.name} needs about "
                                f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free") from exc
        if code == errno.EFBIG:
            raise OSError(code, f"{path} would be larger than the file size limit of this process (about "
                                f"{needed / 2**20:.1f} MiB needed; see ulimit -f)") from exc
        raise
