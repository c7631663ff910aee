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

[Note: streaming DCP]
``torch.distributed.checkpoint.save`` plans a checkpoint from the shapes and
dtypes of the state dict's tensors, and asks its planner for a tensor's data
(``SavePlanner.resolve_data``) only when its writer writes that tensor. So the
state dict handed to it holds meta tensors (a shape and a dtype, no data), and
``_StreamingSavePlanner`` produces each tensor from the group of shards that
holds it, read when the writer first asks (``_consolidate.GroupLookup``).
torch 2.9's ``FileSystemWriter`` keeps every tensor of a data file alive until
that file is closed, so the checkpoint gets one data file per tensor
(``single_file_per_rank=False``): memory grows by a group of shards and a
tensor, as for ``.pth``, not by the model. DCP reads either layout. The
directory is written under a temporary name, verified, and renamed into place.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from xla_fsdp._io import atomic_path, fsync_dir


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


def is_dcp_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a directory torch.distributed.checkpoint wrote (it holds its ``.metadata`` file)."""
    return path.is_dir() and (path / ".metadata").is_file()


@contextlib.contextmanager
def _directory_output(path: Path, overwrite: bool, ours: Callable[[Path], bool]) -> Iterator[Path]:
    """A temporary directory beside ``path``; once the block succeeds it replaces ``path`` (only if ``ours``)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if path.exists() and overwrite and ours(path):
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_orbax(path: Path, tensors: dict[str, torch.Tensor], overwrite: bool,
                check: Callable[[Path], None] = lambda p: None) -> None:
    """Write to a temporary directory, ``check`` it, then rename (replacing only an orbax checkpoint)."""
    import orbax.checkpoint as ocp
    tree = {k: to_numpy(v.contiguous()) for k, v in tensors.items()}
    with _directory_output(path, overwrite, is_orbax_checkpoint) as tmp:
        ocp.PyTreeCheckpointer().save(tmp.absolute(), tree)
        check(tmp)


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    """Without DCP's warnings that do not apply here: one process on purpose, torch's own TypedStorage use."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        yield


@contextlib.contextmanager
def dcp_failure() -> Iterator[None]:
    """DCP's own failure, raised as it is: DCP wraps it in ``CheckpointException``, a ``BaseException``."""
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        yield
    except CheckpointException as exc:       # one process: one failure, of rank 0
        failures = list(exc.failures.values())
        if not failures:
            raise RuntimeError(str(exc).strip().splitlines()[0]) from None
        raise failures[0][0] from None


def _streaming_save_planner(tensor: Callable[[tuple], torch.Tensor]):
    from torch.distributed.checkpoint import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

    class _StreamingSavePlanner(DefaultSavePlanner):
        """Each tensor's data from ``tensor(path)`` when DCP writes it. See [Note: streaming DCP]."""

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            return tensor(self.mappings[write_item.index.fqn])

    return _StreamingSavePlanner()


def write_dcp(path: Path, skeleton: dict, tensor: Callable[[tuple], torch.Tensor], overwrite: bool,
              check: Callable[[Path], None] = lambda p: None) -> None:
    """A DCP checkpoint of ``skeleton`` (meta tensors in place), each tensor's data from ``tensor(path)``.

    Written to a temporary directory, ``check``-ed, then renamed (replacing only a DCP checkpoint).
    """
    import torch.distributed.checkpoint as dcp
    with _directory_output(path, overwrite, is_dcp_checkpoint) as tmp, _quiet_dcp():
        writer = dcp.FileSystemWriter(tmp, single_file_per_rank=False, overwrite=False)
        with dcp_failure():
            dcp.save(skeleton, storage_writer=writer, planner=_streaming_save_planner(tensor), no_dist=True)
        check(tmp)


def read_dcp(path: Path, templates: dict[tuple, torch.Tensor]) -> dict[tuple, torch.Tensor]:
    """The tensors at ``templates``' paths of a DCP checkpoint, read into tensors like the templates."""
    import torch.distributed.checkpoint as dcp
    tree: dict = {}
    for p, like in templates.items():
        set_in(tree, p, torch.empty_like(like))
    with _quiet_dcp(), dcp_failure():
        dcp.load(tree, checkpoint_id=path, no_dist=True)
    return {p: get_in(tree, p) for p in templates}


def read_orbax(path: Path) -> dict:
    import orbax.checkpoint as ocp
    return ocp.PyTreeCheckpointer().restore(Path(path).absolute())
