"""Find, open and validate the shard files of one sharded checkpoint.

Every problem becomes a ``ConsolidationError`` whose one-line message names the
file and what is wrong; nothing is written before the whole set has passed.
Files are opened with ``torch.load(mmap=True)``: validating them reads the
pickled structure, not the tensor data.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

XLA_FSDP, TORCH_XLA = "xla_fsdp", "torch_xla"


class ConsolidationError(Exception):
    """Bad input or output for a consolidation; the message is one line and names the file."""


@dataclass(frozen=True)
class ShardFile:
    path: Path
    rank: int
    world_size: int
    kind: str           # XLA_FSDP or TORCH_XLA
    metadata: dict

    def load(self, weights_only: bool = True) -> dict:
        """The whole checkpoint, memory-mapped: tensor pages are read when touched."""
        return open_checkpoint(self.path, weights_only)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def open_checkpoint(path: Path, weights_only: bool = True) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
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


def discover(ckpt_prefix: str, ckpt_suffix: str, weights_only: bool = True,
             outputs: tuple[Path, ...] = ()) -> list[ShardFile]:
    """The shard files matching ``ckpt_prefix + ckpt_suffix``, validated and sorted by rank.

    ``outputs`` (files this tool writes) are never inputs: the default output
    ``PREFIX_consolidated.pth`` matches the default glob.
    """
    pattern = ckpt_prefix + ckpt_suffix
    excluded = {p.resolve() for p in outputs}
    paths = sorted(Path(p) for p in glob.glob(pattern) if Path(p).resolve() not in excluded)
    if not paths:
        raise ConsolidationError(f"no files match {pattern!r}")
    files = []
    for path in paths:
        metadata = open_checkpoint(path, weights_only)["shard_metadata"]
        rank, world = metadata.get("rank"), metadata.get("world_size")
        if not isinstance(rank, int) or not isinstance(world, int) or not 0 <= rank < world:
            raise ConsolidationError(f"{path}: shard metadata has no valid rank and world size "
                                     f"(rank={rank!r}, world_size={world!r})")
        files.append(ShardFile(path, rank, world, _kind(path, metadata), metadata))

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
            raise ConsolidationError(f"shard metadata of {f.path} disagrees with {ordered[0].path} "
                                     f"(in {differing})")
    return ordered
