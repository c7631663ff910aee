"""Output writers: streaming ``.pth``, safetensors and orbax.

[Note: streaming .pth]
``torch.save`` needs every tensor in memory. Instead the ``.pth`` writer first
saves a skeleton of the output with ``torch.serialization.skip_data``
(untouched, uninitialised tensors of the right shapes and dtypes: the file
gets its full size but no data), allocates the file's blocks (``os.posix_fallocate``: a
full disk is an ``OSError`` here, never a SIGBUS from a write through the map of
a sparse file), then fills it group by group through a shared memory map
(``torch.load(mmap=True)`` with ``MAP_SHARED``), dropping the map after each
group so the written pages leave the process. The shards are read the same
way (``_consolidate.ShardReader``): each group of about ``memory_budget_mb``
maps every rank's file once and drops the maps afterwards. Host memory thus
grows by about twice the group size (or twice the largest tensor, if larger),
whatever the checkpoint's size. The file is written under a temporary name
and renamed when complete (``xla_fsdp._io``).

safetensors and orbax are written through their own libraries, which take the
whole state dict at once; their peak memory is the checkpoint's size.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from xla_fsdp._io import atomic_path


def set_in(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get_in(tree: dict, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


@contextlib.contextmanager
def _shared_mmap() -> Iterator[None]:
    torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)
    try:
        yield
    finally:
        torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE)


class PthStream:
    """A ``.pth`` file written entry by entry. See [Note: streaming .pth]."""

    def __init__(self, path: Path, skeleton: dict, specs: dict[tuple, tuple]):
        """``skeleton``: the output with plain values in place; ``specs``: tensor path -> (shape, dtype)."""
        self._atomic = atomic_path(path)
        self.tmp = self._atomic.__enter__()
        # Uninitialised tensors whose pages are never touched (skip_data does
        # not read them), so they cost address space, not resident memory.
        for p, (shape, dtype) in specs.items():
            set_in(skeleton, p, torch.empty(shape, dtype=dtype))
        try:
            with torch.serialization.skip_data():
                torch.save(skeleton, self.tmp)
            for p in specs:
                set_in(skeleton, p, None)
            fd = os.open(self.tmp, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
            finally:
                os.close(fd)
        except BaseException as exc:
            self.abort(exc)
            raise

    def fill(self, items: list[tuple[tuple, torch.Tensor]]) -> None:
        with _shared_mmap():
            out = torch.load(self.tmp, mmap=True, weights_only=True)
            for p, value in items:
                get_in(out, p).copy_(value)
            del out

    def commit(self) -> None:
        self._atomic.__exit__(None, None, None)

    def abort(self, exc: BaseException) -> None:
        with contextlib.suppress(BaseException):
            self._atomic.__exit__(type(exc), exc, exc.__traceback__)


_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(-\d+)?$")


def remove_stale_temps(target: Path) -> None:
    """Remove temporary outputs for ``target`` left by a consolidation that was killed.

    Only names this tool makes (``.NAME.tmp-PID[-TID]``) whose process is gone.
    """
    if not target.parent.is_dir():
        return
    for entry in target.parent.iterdir():
        match = _TEMP.match(entry.name)
        if not match or match.group("name") != target.name or _alive(int(match.group("pid"))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                      check: Callable[[Path], None] = lambda p: None) -> None:
    """Write under a temporary name, ``check`` it, then rename."""
    from safetensors.torch import save
    # safetensors refuses tensors that share memory (tied parameters, slices of
    # one flat parameter): give each its own contiguous copy.
    data = save({k: v.contiguous().clone() for k, v in tensors.items()}, metadata=metadata)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
        del data
        check(tmp)


def to_numpy(tensor: torch.Tensor):
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def is_orbax_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a directory orbax wrote (it holds orbax's metadata file)."""
    return path.is_dir() and any((path / name).exists() for name in ("_CHECKPOINT_METADATA", "_METADATA"))


def write_orbax(path: Path, tensors: dict[str, torch.Tensor], overwrite: bool,
                check: Callable[[Path], None] = lambda p: None) -> None:
    """Write to a temporary directory, ``check`` it, then rename (replacing only an orbax checkpoint)."""
    import orbax.checkpoint as ocp
    tree = {k: to_numpy(v.contiguous()) for k, v in tensors.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        ocp.PyTreeCheckpointer().save(tmp.absolute(), tree)
        check(tmp)
        if path.exists() and overwrite and is_orbax_checkpoint(path):
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_orbax(path: Path) -> dict:
    import orbax.checkpoint as ocp
    return ocp.PyTreeCheckpointer().restore(Path(path).absolute())
