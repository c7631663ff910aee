"""Find, open and validate the shard files of one sharded checkpoint.

A checkpoint directory of ``save_sharded_checkpoint`` is read through the
manifest of a committed step (see [Note: checkpoint commit] in
``xla_fsdp/_steps.py``), each file's size and CRC-32 checked; a set of files
without a manifest is found by a glob whose prefix is taken literally. xla_fsdp
shard metadata is read by its one reader (``xla_fsdp._metadata``), which
validates it file by file; the files are then checked against each other
(ranks, world size, metadata, dtypes, step).

Every problem becomes a ``ConsolidationError`` whose one-line message names the
file and what is wrong; nothing is written before the whole set has passed.
Files are opened with ``torch.load(mmap=True)``: validating them reads the
pickled structure, not the tensor data.
"""

from __future__ import annotations

import glob
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from xla_fsdp._io import file_crc32
from xla_fsdp._metadata import MANIFEST_NAME, Manifest, MetadataError, ShardMetadata, check_optimizer_names
from xla_fsdp._steps import StepNotCommittedError, committed_steps, read_committed

XLA_FSDP, TORCH_XLA = "xla_fsdp", "torch_xla"


class ConsolidationError(Exception):
    """Bad input or output for a consolidation; the message is one line and names the file."""


@dataclass(frozen=True)
class ShardFile:
    path: Path
    rank: int
    world_size: int
    kind: str           # XLA_FSDP or TORCH_XLA
    metadata: dict      # as stored
    shard_metadata: Optional[ShardMetadata] = None   # xla_fsdp's, validated

    def load(self, weights_only: bool = True) -> dict:
        """The whole checkpoint, memory-mapped: tensor pages are read when touched."""
        return open_checkpoint(self.path, weights_only)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def unpickle_detail(exc: BaseException) -> str:
    """The object torch's weights-only unpickler refused, without its advice to turn the check off."""
    found = re.search(r"(Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+)", str(exc))
    return f" ({found.group(1)})" if found else ""


def open_checkpoint(path: Path, weights_only: bool = True) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        raise ConsolidationError(f"{path}: holds objects other than tensors, numbers, strings and containers; "
                                 f"refused, since loading them could run code{unpickle_detail(exc)}") from None
    except Exception as exc:  # any failure to read is the file's fault, reported as such
        raise ConsolidationError(f"{path}: cannot be read as a torch checkpoint (truncated, corrupted or not "
                                 f"a .pth file): {_first_line(exc)}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) \
            or not isinstance(ckpt.get("shard_metadata"), dict):
        raise ConsolidationError(f"{path}: not a sharded FSDP checkpoint (expected a dict with 'model' and "
                                 "'shard_metadata' entries)")
    return ckpt


def _kind(path: Path, metadata: dict) -> str:
    if metadata.get("format") == XLA_FSDP:
        return XLA_FSDP
    if "shard_info" in metadata and "flatten_info" in metadata:
        return TORCH_XLA
    raise ConsolidationError(f"{path}: unknown shard metadata (neither xla_fsdp's nor torch_xla's FSDP format)")


def _without_rank(metadata: dict) -> dict[str, Any]:
    return {k: v for k, v in metadata.items() if k != "rank"}


def _resolve(path: Path) -> Path:
    try:
        return path.resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise ConsolidationError(f"{path}: cannot be resolved ({exc})") from None


@dataclass(frozen=True)
class Inputs:
    """The shard files of one checkpoint, in rank order, and where they came from."""

    files: list[ShardFile]
    root: Optional[Path]
    """The checkpoint directory (committed step) or None for a set found by glob."""
    step: Optional[int]
    warning: Optional[str]
    """What could not be checked (a set without a manifest), for the user."""


def find_inputs(ckpt_prefix: str, ckpt_suffix: str, weights_only: bool = True, outputs: tuple[Path, ...] = (),
                step: Optional[int] = None, group: int = 0) -> Inputs:
    """A committed step of the checkpoint directory ``ckpt_prefix`` (the newest, or ``step``), else the
    files matching ``ckpt_prefix + ckpt_suffix`` (the prefix taken literally, not as a pattern)."""
    refuse = _url(ckpt_prefix)
    if refuse:
        raise ConsolidationError(refuse)
    root = Path(ckpt_prefix)
    try:
        is_dir = root.is_dir()
    except OSError as exc:
        raise ConsolidationError(f"{root}: {exc}") from None
    # torch_xla's rule (prefix + suffix) also serves a directory that holds no step: Hugging Face's
    # Trainer passes os.path.join(output_dir, "") and a glob suffix.
    if is_dir and (step is not None or (root / MANIFEST_NAME).is_file()
                   or any(p.name.startswith("step_") for p in root.iterdir())):
        return _committed(root, weights_only, step, group)
    if step is not None:
        raise ConsolidationError(f"--step needs a checkpoint directory; {root} is not one")
    pattern = glob.escape(ckpt_prefix) + ckpt_suffix
    excluded = {_resolve(p) for p in outputs}
    paths = sorted(Path(p) for p in glob.glob(pattern) if _resolve(Path(p)) not in excluded)
    if not paths:
        raise ConsolidationError(f"no files match {ckpt_prefix + ckpt_suffix!r} (the prefix is literal) and "
                                 f"{root} is not a checkpoint directory")
    files = _validated(paths, weights_only, ckpt_prefix + ckpt_suffix)
    warning = (f"{ckpt_prefix + ckpt_suffix!r} has no manifest: nothing proves its {len(files)} files were written "
               "by one save (only their shard metadata and steps were compared)")
    return Inputs(files, None, None, warning)


def _url(path: str) -> Optional[str]:
    if "://" in str(path):
        return (f"{path!r} is a URL; only local (or mounted) paths are supported: copy the checkpoint to a local "
                "directory first (e.g. gsutil -m cp -r), or mount the bucket (gcsfuse)")
    return None


def _committed(root: Path, weights_only: bool, step: Optional[int], group: int) -> Inputs:
    if (root / MANIFEST_NAME).is_file():  # a step directory given directly
        try:
            directory, manifest = root, Manifest.read(root / MANIFEST_NAME)
        except MetadataError as exc:
            raise ConsolidationError(str(exc)) from None
    else:
        steps = committed_steps(root)
        if step is None and not steps:
            uncommitted = sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))
            raise ConsolidationError(f"{root}: no committed step (a step is committed once its {MANIFEST_NAME} "
                                     f"is written); found {uncommitted[:4]}")
        try:
            directory, manifest = read_committed(root, steps[-1] if step is None else step)
        except StepNotCommittedError as exc:
            raise ConsolidationError(str(exc)) from None
    entries = [f for f in manifest.files if f.group == group]
    if not entries:
        raise ConsolidationError(f"{directory / MANIFEST_NAME}: no sharding group {group} (the checkpoint has "
                                 f"{len(manifest.sharding_groups)})")
    for f in entries:
        path = directory / f.name
        try:
            size, crc = path.stat().st_size, file_crc32(path)
        except OSError as exc:
            raise ConsolidationError(f"{path} (rank {f.rank}): cannot be read: {exc}") from None
        if (size, crc) != (f.size, f.crc32):
            raise ConsolidationError(f"{path} (rank {f.rank}): has {size} bytes and CRC-32 {crc:#010x}, the "
                                     f"manifest records {f.size} and {f.crc32:#010x}: changed after the commit")
    files = _validated([directory / f.name for f in sorted(entries, key=lambda f: f.rank)], weights_only,
                       str(directory))
    return Inputs(files, directory, manifest.step, None)


def discover(ckpt_prefix: str, ckpt_suffix: str, weights_only: bool = True,
             outputs: tuple[Path, ...] = ()) -> list[ShardFile]:
    """The shard files of a checkpoint, validated and sorted by rank; see ``find_inputs``.

    ``outputs`` (files this tool writes) are never inputs: the default output
    ``PREFIX_consolidated.pth`` matches the default glob.
    """
    return find_inputs(ckpt_prefix, ckpt_suffix, weights_only, outputs).files


def _validated(paths: list[Path], weights_only: bool, pattern: str) -> list[ShardFile]:
    files, ckpts = [], {}
    for path in paths:
        ckpt = open_checkpoint(path, weights_only)
        metadata = ckpt["shard_metadata"]
        kind = _kind(path, metadata)
        typed = None
        if kind == XLA_FSDP:
            try:
                typed = ShardMetadata.from_dict(metadata, str(path))
                typed.check_shards(ckpt["model"], str(path))
                if ckpt.get("optimizer") is not None:
                    check_optimizer_names(ckpt["optimizer"], ckpt.get("optimizer_param_names"), typed, str(path))
            except MetadataError as exc:
                raise ConsolidationError(str(exc)) from None
            rank, world = typed.rank, typed.world_size
        else:
            rank, world = metadata.get("rank"), metadata.get("world_size")
            if not isinstance(rank, int) or not isinstance(world, int) or not 0 <= rank < world:
                raise ConsolidationError(f"{path}: shard metadata has no valid rank and world size "
                                         f"(rank={rank!r}, world_size={world!r})")
        files.append(ShardFile(path, rank, world, kind, metadata, typed))
        ckpts[path] = ckpt

    first = files[0]
    for f in files[1:]:
        if f.kind != first.kind:
            raise ConsolidationError(f"{f.path} is a {f.kind} checkpoint but {first.path} is {first.kind}: "
                                     f"{pattern!r} matches files of different runs")
        if f.world_size != first.world_size:
            raise ConsolidationError(f"{f.path} has world size {f.world_size} but {first.path} has "
                                     f"{first.world_size}: {pattern!r} matches files of different runs")
    by_rank: dict[int, ShardFile] = {}
    for f in files:
        if f.rank in by_rank:
            raise ConsolidationError(f"rank {f.rank} appears twice: {by_rank[f.rank].path} and {f.path}")
        by_rank[f.rank] = f
    missing = [r for r in range(first.world_size) if r not in by_rank]
    if missing:
        raise ConsolidationError(f"rank(s) {missing} of world size {first.world_size} missing: no file matching "
                                 f"{pattern!r} holds them")
    ordered = [by_rank[r] for r in range(first.world_size)]
    reference = _without_rank(ordered[0].metadata)
    for f in ordered[1:]:
        if _without_rank(f.metadata) != reference:
            differing = sorted(k for k in set(reference) | set(f.metadata)
                               if k != "rank" and reference.get(k) != f.metadata.get(k))
            raise ConsolidationError(f"shard metadata of {f.path} (rank {f.rank}) disagrees with "
                                     f"{ordered[0].path} (in {differing})")
    _check_same_dtypes_and_step(ordered, [ckpts[f.path] for f in ordered])
    return ordered


def _tensors(ckpt: dict) -> dict[str, torch.Tensor]:
    found = {f"model.{k}": v for k, v in ckpt["model"].items() if isinstance(v, torch.Tensor)}
    opt = ckpt.get("optimizer")
    if isinstance(opt, dict) and isinstance(opt.get("state"), dict):
        for index, state in opt["state"].items():
            for name, value in (state.items() if isinstance(state, dict) else ()):
                if isinstance(value, torch.Tensor):
                    found[f"optimizer.state.{index}.{name}"] = value
    return found


def _check_same_dtypes_and_step(files: list[ShardFile], ckpts: list[dict]) -> None:
    """Every rank's tensors have rank 0's dtypes (never cast silently), and its step."""
    reference = _tensors(ckpts[0])
    for f, ckpt in zip(files[1:], ckpts[1:]):
        for key, value in _tensors(ckpt).items():
            if key in reference and value.dtype != reference[key].dtype:
                raise ConsolidationError(f"{f.path} (rank {f.rank}): field {key} is {value.dtype} but "
                                         f"{files[0].path} (rank 0) has {reference[key].dtype}; refusing to cast")
        if files[0].kind == XLA_FSDP and ckpt.get("step") != ckpts[0].get("step"):
            raise ConsolidationError(f"{f.path} (rank {f.rank}) holds step {ckpt.get('step')} but "
                                     f"{files[0].path} (rank 0) holds step {ckpts[0].get('step')}: files of two "
                                     "saves")
