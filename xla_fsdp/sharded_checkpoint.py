"""Save and load sharded training checkpoints that survive preemption.

``save_sharded_checkpoint(root, model, optimizer, step=N)`` writes one step of
a checkpoint directory (see [Note: checkpoint commit] in ``_steps.py``)::

    ROOT/step_{N:08d}/manifest.json                         # written last: the commit
    ROOT/step_{N:08d}/{name}_rank-{r:08d}-of-{W:08d}.pth     # one per rank; name = ROOT's last component

With several sharding groups the file names also carry the group
(``{name}_group-{g:04d}-of-{G:04d}_rank-...``). A rank's file holds::

    {"model": model.state_dict(),            # this rank's shards and buffers
     "shard_metadata": model.get_shard_metadata(),   # see _metadata.ShardMetadata
     "optimizer": optimizer.state_dict(),    # state of the shards, if given
     "optimizer_type": "torch.optim.adamw.AdamW",
     "optimizer_param_names": [[state-dict key of each optimizer parameter], ...],
     "step": int, "rng": {...}, "extra": {...}, "format": "xla_fsdp", "version": 1}

Everything is a tensor, a number, a string or a container of those, so the
file loads with ``torch.load(weights_only=True)``. ``load_sharded_checkpoint``
reads the newest committed step (or the one asked for); ``python -m
consolidate`` turns a step into one full checkpoint.

Exact resume: loading restores the shards, the optimizer state, the step and
the torch and XLA random states, so training continues bit-identically. A step
saved at another world size loads too, resharded as it is read
(``_reshard.py``); ``xla_fsdp.dcp`` loads a torch.distributed.checkpoint.
"""

from __future__ import annotations

import pickle
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch_xla
import torch_xla.core.xla_model as xm
from torch.utils._pytree import tree_map_only

from ._channels import CHECKPOINT_BARRIER
from ._collectives import ShardingGroup, default_rank_and_world_size
from ._io import atomic_torch_save, checkpoint_path, file_crc32, refuse_url
from ._metadata import (METADATA_FORMAT, METADATA_VERSION, Manifest, ManifestFile, MetadataError, ShardMetadata,
                        check_optimizer_names)
from ._reshard import resharded_payload
from ._steps import (commit_step, committed_steps, latest_step, no_committed_step, rank_file_name, read_committed,
                     staging_dir, step_entries)

__all__ = ["checkpoint_path", "save_sharded_checkpoint", "load_sharded_checkpoint", "wait_for_checkpoint",
           "latest_checkpoint", "committed_steps", "CheckpointMismatchError", "CheckpointError"]


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model (or optimizer) it is loaded into."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, committed or read; the message names the step, file and rank."""


@dataclass(frozen=True)
class _Placement:
    """Where this rank's file goes: its sharding group and rank, among every device of the job."""

    device: int
    devices: int
    group: int
    groups: tuple[tuple[int, ...], ...]
    rank: int
    world_size: int

    @staticmethod
    def of(model) -> "_Placement":
        device, devices = default_rank_and_world_size()
        groups = tuple(g for g in model.group.replica_groups if all(d < devices for d in g))
        if not any(device in g for g in groups):  # world size 1: every device is its own group
            groups = tuple((d,) for d in range(devices))
        group = next(i for i, g in enumerate(groups) if device in g)
        return _Placement(device, devices, group, groups, model.rank, model.world_size)

    def file_name(self, name: str) -> str:
        return rank_file_name(name, self.group, len(self.groups), self.rank, self.world_size)


def _barrier(values: list[int], issuer: str) -> list[list[int]]:
    """Every device's ``values`` (int64), gathered by a collective over every device of the job.

    ``issuer`` (the public call) names it in the collective check's messages.
    torch_xla's ``xm.rendezvous`` dead-locks on CPU devices (shared/PLATFORM.md,
    cause 3); this is the library's own all-gather with an explicit channel id
    over one group holding every device, then a sync and a read to the host.
    The XLA random seed, which every sync advances, is put back afterwards: a
    save leaves training's random stream as if it had not happened, so a run
    resumed from it draws what the straight run draws (stochastic rounding,
    dropout).
    """
    device = torch_xla.device()
    seed = xm.get_rng_state(device)  # a host value: reading it runs nothing on the device
    group = ShardingGroup.create()
    local = torch.tensor(values, dtype=torch.int64).to(device)
    gathered = group.all_gather(local, CHECKPOINT_BARRIER, issuer)
    torch_xla.sync()
    flat = gathered.cpu().tolist()
    xm.set_rng_state(seed, device)
    n = len(values)
    return [flat[i:i + n] for i in range(0, len(flat), n)]


_SAVE = "save_sharded_checkpoint (its commit)"


def _to_cpu(value: Any) -> Any:
    """A host copy (never a view of memory training may change)."""
    return tree_map_only(torch.Tensor, lambda t: t.detach().to("cpu", copy=True), value)


def _optimizer_param_names(model, optimizer) -> Optional[list[list[str]]]:
    if optimizer is None:
        return None
    names = {id(p): n for n, p in model.named_parameters()}
    try:
        return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    except KeyError:
        raise ValueError("the optimizer holds a parameter that is not one of the wrapped model's shards; "
                         "build it from model.parameters() after wrapping") from None


def _type_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


class _Write:
    """One rank's file of one step, written now or in a background thread; ``join`` gives the outcome."""

    def __init__(self, root: Path, step: int, placement: _Placement, payload: dict, keep_last_n, background):
        self.root, self.step, self.placement, self.keep_last_n = root, step, placement, keep_last_n
        self.path = staging_dir(root, step) / placement.file_name(root.name)
        self.size = self.crc = 0
        self.error: Optional[BaseException] = None
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._run, args=(payload,), name=f"xla_fsdp-save-{step}",
                                            daemon=True)
            self._thread.start()
        else:
            self._run(payload)

    def _run(self, payload: dict) -> None:
        try:
            atomic_torch_save(self.path, payload)
            self.size, self.crc = self.path.stat().st_size, file_crc32(self.path)
        except BaseException as exc:  # reported to every rank at the commit
            self.error = exc

    def commit(self) -> Path:
        """Join the writer, then [Note: checkpoint commit] steps 2-4; every rank calls it."""
        if self._thread is not None:
            self._thread.join()
        p = self.placement
        rows = _barrier([int(self.error is None), p.group, p.rank, p.world_size, self.size, self.crc],
                        _SAVE)
        failed = [device for device, row in enumerate(rows) if not row[0]]
        if failed:
            reason = f": {type(self.error).__name__}: {self.error}" if self.error is not None else ""
            raise CheckpointError(f"step {self.step} was not committed: device(s) {failed} could not write their "
                                  f"files (this rank: {self.path}{reason}); the previous committed step is "
                                  "intact") from self.error
        commit_error = None
        if p.device == 0:
            files = tuple(ManifestFile(rank_file_name(self.root.name, g, len(p.groups), r, w), g, r, w, size, crc)
                          for _, g, r, w, size, crc in sorted({tuple(row) for row in rows}, key=lambda r: r[1:3]))
            manifest = Manifest(self.step, p.devices, p.groups, files)
            try:
                commit_step(self.root, manifest, self.keep_last_n)
            except Exception as exc:
                commit_error = exc
        committed = _barrier([int(commit_error is None)], _SAVE)
        if commit_error is not None:
            raise CheckpointError(f"step {self.step} of {self.root} was not committed: {type(commit_error).__name__}: "
                                  f"{commit_error}") from commit_error
        if not committed[0][0]:
            raise CheckpointError(f"step {self.step} of {self.root} was not committed: rank 0 could not write "
                                  "its manifest (see rank 0's error)")
        return read_committed(self.root, self.step)[0] / p.file_name(self.root.name)


_pending = threading.local()  # the save in flight of this rank (one thread per rank on CPU devices)


def wait_for_checkpoint() -> Optional[Path]:
    """Finish (write and commit) this rank's pending ``async_save``; every rank calls it.

    Returns this rank's committed file, or None if no save was pending. An error
    of the background write is raised here, on every rank.
    """
    write = getattr(_pending, "write", None)
    if write is None:
        return None
    _pending.write = None
    return write.commit()


def save_sharded_checkpoint(prefix: str | Path, model, optimizer: Optional[torch.optim.Optimizer] = None,
                            step: Optional[int] = None, extra: Optional[dict] = None, *,
                            keep_last_n: Optional[int] = None, async_save: bool = False) -> Path:
    """Save step ``step`` (default 0) of the checkpoint directory ``prefix``; every rank calls it.

    Returns this rank's file in the committed step directory. With
    ``async_save=True`` the call copies the state to the host and returns; a
    background thread writes the file, and the step is committed (and visible)
    at the next ``save_sharded_checkpoint``, ``load_sharded_checkpoint`` or
    ``wait_for_checkpoint`` call. ``keep_last_n`` removes older committed steps
    after a commit, never the newest.
    """
    refuse_url(prefix, "checkpoint directory")
    wait_for_checkpoint()
    if keep_last_n is not None and keep_last_n < 1:
        raise ValueError(f"keep_last_n must be at least 1 (the newest step is always kept), got {keep_last_n}")
    step = 0 if step is None else int(step)
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    torch_xla.sync()  # materialise pending updates before reading the tensors
    payload = {
        "format": METADATA_FORMAT, "version": METADATA_VERSION,
        "model": _to_cpu(model.state_dict()),
        "shard_metadata": model.get_shard_metadata(),
        "optimizer": _to_cpu(optimizer.state_dict()) if optimizer is not None else None,
        "optimizer_type": _type_name(optimizer) if optimizer is not None else None,
        # Which shard each optimizer parameter is, by state-dict key, so the
        # optimizer state can be consolidated without the model.
        "optimizer_param_names": _optimizer_param_names(model, optimizer),
        "step": step,
        "rng": {"torch": torch.get_rng_state(), "xla": int(xm.get_rng_state(model.xla_device))},
        "extra": extra or {},
    }
    placement = _Placement.of(model)
    write = _Write(Path(prefix), step, placement, payload, keep_last_n, background=async_save)
    if async_save:
        _pending.write = write
        return write.path.parent.with_name(f"step_{step:08d}") / write.path.name
    return write.commit()


def latest_checkpoint(prefix: str | Path) -> Optional[Path]:
    """The newest committed step directory under ``prefix``, or None."""
    refuse_url(prefix, "checkpoint directory")
    step = latest_step(Path(prefix))
    return None if step is None else read_committed(Path(prefix), step)[0]


def _check_fits(saved: ShardMetadata, current: ShardMetadata, where: str) -> None:
    problems = []
    if saved.world_size != current.world_size:
        problems.append(f"world size {saved.world_size} in the file, {current.world_size} now")
    if saved.rank != current.rank:
        problems.append(f"rank {saved.rank} in the file, {current.rank} now")
    missing = sorted(set(current.params) - set(saved.params))
    unexpected = sorted(set(saved.params) - set(current.params))
    if missing:
        problems.append(f"parameters missing from the file: {missing[:5]}")
    if unexpected:
        problems.append(f"parameters the model does not have: {unexpected[:5]}")
    for key in sorted(set(saved.params) & set(current.params)):
        was = [(o.name, list(o.shape)) for o in saved.params[key].originals]
        now = [(o.name, list(o.shape)) for o in current.params[key].originals]
        if was != now:
            problems.append(f"{key} holds {was} in the file but {now} in the model")
    if problems:
        raise CheckpointMismatchError(f"{where} does not fit this model: " + "; ".join(problems))


def _read(path: Path, where: str, mmap: bool = False) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        found = re.search(r"(Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+)", str(exc))
        raise CheckpointError(f"{where}: holds objects other than tensors, numbers, strings and containers; "
                              "refused, since loading them could run code"
                              + (f" ({found.group(1)})" if found else "")) from None
    except Exception as exc:
        raise CheckpointError(f"{where}: cannot be read (truncated or corrupted): {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if isinstance(payload, dict) and "shard_info" in (payload.get("shard_metadata") or {}):
        raise CheckpointMismatchError(f"{where} is a torch_xla FSDP checkpoint, whose shards are laid out "
                                      "differently: merge it with python -m consolidate and load the full state "
                                      "dict into the model before wrapping it")
    if not isinstance(payload, dict) or payload.get("format") != METADATA_FORMAT:
        raise CheckpointMismatchError(f"{where} is not an xla_fsdp checkpoint")
    return payload


def _check_optimizer(payload: dict, model, optimizer, metadata: ShardMetadata, where: str) -> None:
    saved = payload.get("optimizer")
    if saved is None:
        raise CheckpointMismatchError(f"{where} holds no optimizer state")
    try:
        check_optimizer_names(saved, payload.get("optimizer_param_names"), metadata, where)
    except MetadataError as exc:
        raise CheckpointMismatchError(str(exc)) from None
    saved_type, now = payload.get("optimizer_type"), _type_name(optimizer)
    if saved_type is not None and saved_type != now:
        raise CheckpointMismatchError(f"{where} holds the state of a {saved_type}, not of this {now}")
    for g, (was, names) in enumerate(zip(payload["optimizer_param_names"], _optimizer_param_names(model, optimizer))):
        if was != names:  # torch.optim matches state to parameters by position only
            raise CheckpointMismatchError(f"{where}: parameter group {g} holds {was[:4]} in the file but {names[:4]} "
                                          "in this optimizer (built over other parameters, or in another order)")
    current = optimizer.state_dict()
    if len(saved["param_groups"]) != len(current["param_groups"]):
        raise CheckpointMismatchError(f"{where} has {len(saved['param_groups'])} parameter groups, the optimizer "
                                      f"{len(current['param_groups'])}")
    for g, (was, now_group) in enumerate(zip(saved["param_groups"], current["param_groups"])):
        if set(was) != set(now_group):
            raise CheckpointMismatchError(f"{where}: parameter group {g} has options {sorted(set(was) - {'params'})} "
                                          f"in the file but {sorted(set(now_group) - {'params'})} in this "
                                          f"optimizer (another optimizer type)")
        if len(was["params"]) != len(now_group["params"]):
            raise CheckpointMismatchError(f"{where}: parameter group {g} has {len(was['params'])} parameters in "
                                          f"the file, {len(now_group['params'])} in the optimizer")
    saved_keys = {k for state in saved["state"].values() for k in state}
    current_keys = {k for state in current["state"].values() for k in state}
    if current_keys and saved_keys and saved_keys != current_keys:
        raise CheckpointMismatchError(f"{where} holds optimizer state {sorted(saved_keys)}, this optimizer has "
                                      f"{sorted(current_keys)}")


@dataclass(frozen=True)
class _Located:
    """This rank's file of a committed step or of a set without a manifest; or, for a step saved at another
    world size, the step's files of this rank's sharding group (``reshard_from``), in rank order."""

    path: Optional[Path]
    entry: Optional[ManifestFile]
    where: str
    reshard_from: tuple[tuple[Path, ManifestFile], ...] = ()


def _locate(prefix: Path, step: Optional[int], placement: _Placement) -> _Located:
    """This rank's file: from a committed step, else from a single-step set without a manifest."""
    steps = committed_steps(prefix)
    if step is not None or steps:
        if step is None:
            step = steps[-1]
        directory, manifest = read_committed(prefix, step)
        name = placement.file_name(prefix.name)
        entry = next((f for f in manifest.files if f.name == name), None)
        if entry is not None and (manifest.world_size, manifest.sharding_groups) == (placement.devices,
                                                                                    placement.groups):
            return _Located(directory / name, entry, f"{directory / name} (rank {placement.rank})")
        old = sorted((f for f in manifest.files if f.group == placement.group), key=lambda f: f.rank)
        if not old:
            groups = [list(g) for g in manifest.sharding_groups]
            raise FileNotFoundError(f"no checkpoint for rank {placement.rank} of {placement.world_size} in sharding "
                                    f"group {placement.group}: {directory} holds sharding groups {groups} (world "
                                    f"size {manifest.world_size}), none numbered {placement.group}")
        where = (f"{directory} (saved by {len(old)} ranks, read by rank {placement.rank} of "
                 f"{placement.world_size})")
        return _Located(None, None, where, tuple((directory / f.name, f) for f in old))
    if step_entries(prefix):  # a checkpoint directory whose saves never committed: not a set of old files
        raise no_committed_step(prefix)
    path = checkpoint_path(prefix, placement.rank, placement.world_size)
    if not path.exists():
        others = sorted(Path(path.parent).glob(f"{prefix.name}_rank-*-of-*.pth"))
        hint = f"; found {[p.name for p in others[:4]]}" if others else ""
        raise FileNotFoundError(f"no checkpoint for rank {placement.rank} of {placement.world_size}: "
                                f"{path} does not exist{hint}")
    return _Located(path, None, f"{path} (rank {placement.rank})")


def _check_crc(path: Path, entry: ManifestFile, where: str) -> None:
    size, crc = path.stat().st_size, file_crc32(path)
    if (size, crc) != (entry.size, entry.crc32):
        raise CheckpointError(f"{where}: has {size} bytes and CRC-32 {crc:#010x}, its manifest records "
                              f"{entry.size} bytes and {entry.crc32:#010x}: the file changed after the commit")


def _checked_metadata(payload: dict, source: str) -> ShardMetadata:
    """The payload's shard metadata, checked against its model shards."""
    try:
        metadata = ShardMetadata.from_dict(payload.get("shard_metadata"), source)
        metadata.check_shards(payload.get("model") or {}, source)
    except MetadataError as exc:
        raise CheckpointMismatchError(str(exc)) from None
    return metadata


def _read_checked(path: Path, entry: Optional[ManifestFile], where: str,
                  mmap: bool = False) -> tuple[dict, ShardMetadata]:
    """A rank file, its size and CRC-32 checked against its manifest entry (if any), and its shard metadata."""
    if entry is not None:
        _check_crc(path, entry, where)
    payload = _read(path, where, mmap=mmap)
    return payload, _checked_metadata(payload, str(path))


def _read_resharded(located: _Located, placement: _Placement) -> dict:
    """This rank's payload at the current world size, from the files of a step saved at another one."""
    read: dict[int, tuple[dict, ShardMetadata]] = {}

    def old(rank: int) -> dict:
        """Old rank ``rank``'s file, read (memory-mapped) and checked once, when a piece of it is needed."""
        if rank not in read:
            path, entry = located.reshard_from[rank]
            where = f"{path} (rank {rank})"
            payload, metadata = _read_checked(path, entry, where, mmap=True)
            if rank and (metadata.rank, metadata.params) != (rank, old_metadata(0).params):
                raise CheckpointMismatchError(f"{where}: its shard metadata disagrees with rank 0's "
                                              f"{located.reshard_from[0][0]}")
            read[rank] = payload, metadata
        return read[rank][0]

    def old_metadata(rank: int) -> ShardMetadata:
        old(rank)
        return read[rank][1]

    payload = resharded_payload(old, old_metadata(0), placement.rank, placement.world_size)
    if len(located.reshard_from) == placement.world_size:   # same ranks, other file names (a renamed directory)
        payload["rng"] = old(placement.rank)["rng"]
    return payload


def _check_same_step(prefix: Path, placement: _Placement) -> None:
    """Without a manifest, at least refuse a set whose ranks hold different steps.

    Every rank compares each file with rank 0's, so every rank that refuses
    names the same two files, whichever of them raises first.
    """
    if placement.rank == 0:
        warnings.warn(f"{prefix}: loading shard files without a manifest (written before the commit protocol, or "
                      "by hand): nothing proves they were written together; only their steps are compared",
                      stacklevel=4)
    paths = [checkpoint_path(prefix, r, placement.world_size) for r in range(placement.world_size)]
    steps = []
    for r, path in enumerate(paths):
        try:
            steps.append(torch.load(path, map_location="cpu", mmap=True, weights_only=True).get("step"))
        except Exception as exc:
            raise CheckpointError(f"{path} (rank {r}): cannot be read (truncated or corrupted): "
                                  f"{type(exc).__name__}") from None
    for r, step in enumerate(steps):
        if step != steps[0]:
            raise CheckpointError(f"{paths[r]} (rank {r}) holds step {step} but {paths[0]} (rank 0) holds step "
                                  f"{steps[0]}: a mixed set of two saves, refused")


def load_all_or_nothing(source: Path, read: Callable[[], tuple[dict, str]], model,
                        optimizer: Optional[torch.optim.Optimizer], issuer: str = "load_sharded_checkpoint") -> dict:
    """Load what ``read()`` returns, ``(payload, where)``, into ``model`` and ``optimizer`` on every rank or none.

    Every rank reads and checks its payload, then the ranks agree (a collective) before any of them
    changes its model: one rank's error is raised there, and every other rank raises ``CheckpointError``
    naming the devices at fault, its model and optimizer unchanged. Returns the payload. ``issuer`` names
    the agreement in the collective check ([Note: the collective check]).
    """
    try:
        payload, where = read()
        error = None
    except Exception as exc:  # raised after the others know, so that none of them loads
        error = exc
    rows = _barrier([int(error is None)], issuer)
    if error is not None:
        raise error
    failed = [device for device, (ok,) in enumerate(rows) if not ok]
    if failed:
        changed = "model and optimizer are" if optimizer is not None else "model is"
        raise CheckpointError(f"{source}: not loaded on any device: device(s) {failed} of {len(rows)} could not "
                              "read or check their files (their own errors name the file and the reason); this "
                              f"device's {changed} unchanged")
    try:
        model.load_state_dict(payload["model"])
        if optimizer is not None:
            optimizer.load_state_dict(payload["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointMismatchError(f"{where}: {str(exc).splitlines()[0]}") from None
    return payload


def load_sharded_checkpoint(prefix: str | Path, model, optimizer: Optional[torch.optim.Optimizer] = None,
                            step: Optional[int] = None) -> dict:
    """Load the newest committed step (or ``step``) into ``model`` (and ``optimizer``); every rank calls it.

    Returns the step's ``step`` and ``extra``. A committed step saved at another
    world size (or with other sharding groups) is resharded as it loads: each
    rank builds its shards, model and optimizer, from the pieces of the old
    files that hold them (``_reshard.py``); random states are then not
    restored. Falls back, with a warning, to a set of ``{prefix}_rank-*.pth``
    files without a manifest (older releases), which must fit the world size.
    Raises ``CheckpointMismatchError`` naming what differs when the file was
    written for another set of parameters and shapes, or optimizer, and
    ``CheckpointError`` naming the file and rank when it cannot be read.

    All or nothing across the job: every rank reads and checks its file, then
    the ranks agree (a collective) before any of them changes its model. If
    one rank cannot load, every rank raises and no model or optimizer changes,
    so a job never trains on with some ranks restored and others not, or
    hangs in its next collective because one rank stopped here.
    """
    refuse_url(prefix, "checkpoint directory")
    wait_for_checkpoint()
    prefix = Path(prefix)
    payload = load_all_or_nothing(prefix, lambda: _read_and_check(prefix, model, optimizer, step), model, optimizer)
    if payload["rng"] is not None:   # None: a step saved at another world size, whose ranks' streams do not map
        torch.set_rng_state(payload["rng"]["torch"])
        xm.set_rng_state(payload["rng"]["xla"], model.xla_device)
    return {"step": payload["step"], "extra": payload["extra"]}


def _read_and_check(prefix: Path, model, optimizer: Optional[torch.optim.Optimizer],
                    step: Optional[int]) -> tuple[dict, str]:
    """This rank's payload, read and checked against ``model`` and ``optimizer``; nothing is changed yet."""
    placement = _Placement.of(model)
    located = _locate(prefix, step, placement)
    path, where = located.path, located.where
    if located.reshard_from:
        payload, path = _read_resharded(located, placement), located.reshard_from[0][0]
        saved = _checked_metadata(payload, str(path))
    else:
        payload, saved = _read_checked(path, located.entry, where)
    current = ShardMetadata.from_dict(model.get_shard_metadata(), "the model")
    _check_fits(saved, current, where)
    if optimizer is not None:
        _check_optimizer(payload, model, optimizer, saved, where)
    if located.entry is None and not located.reshard_from:
        _check_same_step(prefix, placement)
    return payload, where
