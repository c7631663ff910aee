"""Typed, versioned metadata of a sharded checkpoint: one writer, one reader.

Two structures describe a checkpoint on disk:

* ``ShardMetadata``: how one rank's shards map back to the unwrapped model's
  parameters. It travels inside every rank's ``.pth`` file as a plain dict
  (``to_dict``), so that the files load with ``torch.load(weights_only=True)``
  and ``model.get_shard_metadata()`` keeps returning a dict; ``from_dict`` is
  the only reader and validates everything before anyone allocates or reads a
  tensor.
* ``Manifest``: the commit record of one step (see ``sharded_checkpoint.py``),
  a JSON file written last. ``Manifest.read`` is its only reader.

Every problem is a ``MetadataError`` with a one-line message that names the
file, the rank (where there is one) and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ._layout import FlatSlot, ShardLayout, flat_slot_problem

__all__ = ["MetadataError", "Original", "ShardedParam", "ShardMetadata", "Manifest", "ManifestFile",
           "METADATA_FORMAT", "METADATA_VERSION", "MANIFEST_NAME", "MANIFEST_VERSION", "check_optimizer_names"]

METADATA_FORMAT = "xla_fsdp"
METADATA_VERSION = 1
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1

# Larger than any tensor a host could hold; a claim beyond it is corruption,
# refused before the claim is used to size anything.
_MAX_NUMEL = 1 << 48


class MetadataError(ValueError):
    """Checkpoint metadata that is missing, malformed or inconsistent; the message is one line."""


def _where(source: str, rank: Optional[int]) -> str:
    return f"{source} (rank {rank})" if rank is not None else source


class _Reader:
    """Typed access to one dict of a file, raising ``MetadataError`` naming the field."""

    def __init__(self, data: Any, where: str, path: str):
        if not isinstance(data, Mapping):
            raise MetadataError(f"{where}: field {path or 'metadata'} must be a dict, got {type(data).__name__}")
        self.data, self.where, self.path = data, where, path

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, kind, default=...):
        if key not in self.data:
            if default is not ...:
                return default
            raise MetadataError(f"{self.where}: field {self._name(key)} is missing")
        value = self.data[key]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise MetadataError(f"{self.where}: field {self._name(key)} must be an integer, got {value!r:.80}")
        if kind is not int and not isinstance(value, kind):
            raise MetadataError(f"{self.where}: field {self._name(key)} must be a {kind.__name__}, "
                                f"got {type(value).__name__}")
        return value

    def shape(self, key: str) -> tuple[int, ...]:
        value = self.get(key, (list, tuple))
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
            raise MetadataError(f"{self.where}: field {self._name(key)} must list non-negative integers, "
                                f"got {list(value)!r:.80}")
        if math.prod(value) > _MAX_NUMEL:
            raise MetadataError(f"{self.where}: field {self._name(key)} claims {math.prod(value)} elements "
                                f"(shape {list(value)}), more than any checkpoint holds")
        return tuple(value)

    def sub(self, key: str) -> "_Reader":
        return _Reader(self.get(key, Mapping), self.where, self._name(key))

    def names(self, key: str) -> list[str]:
        value = self.get(key, (list, tuple))
        if not all(isinstance(v, str) for v in value):
            raise MetadataError(f"{self.where}: field {self._name(key)} must list strings")
        return list(value)


@dataclass(frozen=True)
class Original:
    """One parameter of the unwrapped model inside a shard parameter."""

    name: str
    """Its name in the unwrapped model (first use, if tied)."""
    shape: tuple[int, ...]
    offset: int
    """Offset into the flattened full tensor; see [Note: flat layout of several parameters]."""
    aliases: tuple[str, ...] = ()
    """Other names of the same tensor (tied parameters)."""

    @property
    def slot(self) -> FlatSlot:
        return FlatSlot(self.offset, self.shape)


@dataclass(frozen=True)
class ShardedParam:
    """One shard parameter (``flat_param_i`` or ``_fsdp_shard__<name>``) of every rank."""

    shape: tuple[int, ...]
    """Full (unsharded) shape; 1-D for a flat parameter."""
    world_size: int
    shard_on_dim_0: bool
    originals: tuple[Original, ...]

    @property
    def layout(self) -> ShardLayout:
        return ShardLayout(self.shape, self.world_size, self.shard_on_dim_0)

    @property
    def slots(self) -> list[FlatSlot]:
        return [o.slot for o in self.originals]


@dataclass(frozen=True)
class ShardMetadata:
    """How one rank's state dict maps to the unwrapped model. ``to_dict`` is the on-disk form."""

    world_size: int
    """Ranks of the sharding group (shards per tensor)."""
    rank: int
    """This file's rank within its sharding group."""
    params: dict[str, ShardedParam]
    """State-dict key of each shard parameter -> its layout and originals."""
    buffers: dict[str, str]
    """State-dict key of each replicated entry (buffers) -> its name in the unwrapped model."""
    param_order: tuple[str, ...] = ()
    """The unwrapped model's ``named_parameters()`` order."""
    state_order: tuple[str, ...] = ()
    """The unwrapped model's ``state_dict()`` order."""
    version: int = METADATA_VERSION

    def at(self, world_size: int, rank: int) -> "ShardMetadata":
        """The same parameters sharded over ``world_size`` ranks, as rank ``rank`` holds them."""
        return replace(self, world_size=world_size, rank=rank,
                       params={key: replace(p, world_size=world_size) for key, p in self.params.items()})

    def to_dict(self) -> dict:
        """The plain dict stored in checkpoints and returned by ``get_shard_metadata()``."""
        params = {key: {"shape": list(p.shape), "world_size": p.world_size, "shard_on_dim_0": p.shard_on_dim_0,
                        "shard_shape": list(p.layout.shard_shape),
                        "originals": [{"name": o.name, "shape": list(o.shape), "offset": o.offset,
                                       "aliases": list(o.aliases)} for o in p.originals]}
                  for key, p in self.params.items()}
        return {"format": METADATA_FORMAT, "version": self.version, "world_size": self.world_size,
                "rank": self.rank, "params": params, "buffers": {k: {"name": n} for k, n in self.buffers.items()},
                "param_order": list(self.param_order), "state_order": list(self.state_order)}

    @staticmethod
    def from_dict(data: Any, source: str) -> "ShardMetadata":
        """Read and validate the dict written by ``to_dict``; ``source`` names the file in errors."""
        top = _Reader(data, source, "")
        if top.get("format", str, None) != METADATA_FORMAT:
            raise MetadataError(f"{source}: field format must be {METADATA_FORMAT!r}, got "
                                f"{data.get('format')!r:.40}")
        version = top.get("version", int)
        if version != METADATA_VERSION:
            raise MetadataError(f"{source}: field version is {version}; this release reads version "
                                f"{METADATA_VERSION} (written by another xla_fsdp release?)")
        world_size, rank = top.get("world_size", int), top.get("rank", int)
        where = _where(source, rank)
        top = _Reader(data, where, "")  # from here on, errors name the rank too
        if not 0 <= rank < world_size:
            raise MetadataError(f"{where}: field rank {rank} is outside world_size {world_size}")
        params = {}
        for key in top.sub("params").data:
            params[key] = _read_param(top.sub("params").sub(key), world_size)
        buffers = {}
        for key in top.sub("buffers").data:
            buffers[key] = top.sub("buffers").sub(key).get("name", str)
        clash = sorted(set(params) & set(buffers))
        if clash:
            raise MetadataError(f"{where}: field buffers lists {clash[:3]}, which params also lists")
        return ShardMetadata(world_size, rank, params, buffers, tuple(top.names("param_order")),
                             tuple(top.names("state_order")), version)

    def check_shards(self, state_dict: Mapping[str, Any], source: str) -> None:
        """Check a rank's ``model`` state dict against this metadata, from tensor shapes only (no data read)."""
        where = _where(source, self.rank)
        for key, p in self.params.items():
            shard = state_dict.get(key)
            if not isinstance(shard, torch.Tensor):
                raise MetadataError(f"{where}: model has no tensor {key}, which field params lists")
            if shard.numel() != p.layout.shard_numel:
                raise MetadataError(f"{where}: model.{key} has {shard.numel()} elements but field params.{key} "
                                    f"(shape {list(p.shape)} over {p.world_size} ranks) needs "
                                    f"{p.layout.shard_numel}")
        for key in self.buffers:
            if key not in state_dict:
                raise MetadataError(f"{where}: model has no entry {key}, which field buffers lists")


def _read_param(r: _Reader, world_size: int) -> ShardedParam:
    shape = r.shape("shape")
    param_world = r.get("world_size", int)
    if param_world != world_size:
        raise MetadataError(f"{r.where}: field {r.path}.world_size is {param_world} but the file's world_size "
                            f"is {world_size}")
    dim0 = r.get("shard_on_dim_0", bool)
    originals = []
    entries = r.get("originals", (list, tuple))
    if not entries:
        raise MetadataError(f"{r.where}: field {r.path}.originals is empty")
    for i, _ in enumerate(entries):
        o = _Reader(entries[i], r.where, f"{r.path}.originals[{i}]")
        originals.append(Original(o.get("name", str), o.shape("shape"), o.get("offset", int),
                                  tuple(o.names("aliases"))))
    param = ShardedParam(shape, param_world, dim0, tuple(originals))
    saved_shard_shape = r.shape("shard_shape")
    if saved_shard_shape != param.layout.shard_shape:
        raise MetadataError(f"{r.where}: field {r.path}.shard_shape is {list(saved_shard_shape)} but shape "
                            f"{list(shape)} over {world_size} ranks gives {list(param.layout.shard_shape)}")
    problem = flat_slot_problem(param.slots, param.layout.numel)
    if problem:
        raise MetadataError(f"{r.where}: field {r.path}.originals: {problem}")
    return param


def check_optimizer_names(optimizer_state: Any, names: Any, metadata: ShardMetadata, source: str) -> None:
    """Check ``optimizer_param_names`` against the optimizer state dict and the shard parameters."""
    where = _where(source, metadata.rank)
    if not isinstance(optimizer_state, Mapping) or not isinstance(optimizer_state.get("param_groups"), list) \
            or not isinstance(optimizer_state.get("state"), Mapping):
        raise MetadataError(f"{where}: field optimizer is not an optimizer state dict")
    groups = optimizer_state["param_groups"]
    if not isinstance(names, list) or len(names) != len(groups):
        count = len(names) if isinstance(names, list) else "?"
        raise MetadataError(f"{where}: field optimizer_param_names must list one list per parameter group "
                            f"({len(groups)}), got {type(names).__name__} of {count}")
    for g, (group, group_names) in enumerate(zip(groups, names)):
        params = group.get("params") if isinstance(group, Mapping) else None
        if not isinstance(params, list) or not isinstance(group_names, list) or len(group_names) != len(params):
            raise MetadataError(f"{where}: field optimizer_param_names[{g}] names "
                                f"{len(group_names) if isinstance(group_names, list) else '?'} parameters but "
                                f"parameter group {g} has {len(params) if isinstance(params, list) else '?'}")
        unknown = [n for n in group_names if n not in metadata.params]
        if unknown:
            raise MetadataError(f"{where}: field optimizer_param_names[{g}] names {unknown[:3]}, which are not "
                                "shard parameters of field shard_metadata.params")


@dataclass(frozen=True)
class ManifestFile:
    """One rank's file of a committed step."""

    name: str
    """File name, relative to the step directory."""
    group: int
    """Index of the sharding group (0 when there is one)."""
    rank: int
    """Rank within the sharding group."""
    world_size: int
    """Ranks of the sharding group."""
    size: int
    """Bytes."""
    crc32: int
    """zlib.crc32 of the whole file."""


@dataclass(frozen=True)
class Manifest:
    """The commit record of one step, written last: a step without it does not exist."""

    step: int
    world_size: int
    """Devices of the job (all sharding groups)."""
    sharding_groups: tuple[tuple[int, ...], ...]
    """Global device ids of each sharding group."""
    files: tuple[ManifestFile, ...] = field(default=())
    format: str = METADATA_FORMAT
    version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def file(self, group: int, rank: int) -> ManifestFile:
        for f in self.files:
            if f.group == group and f.rank == rank:
                return f
        raise KeyError((group, rank))

    @staticmethod
    def read(path: Path) -> "Manifest":
        """Read and validate ``path``; ``MetadataError`` names the file and field."""
        source = str(path)
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MetadataError(f"{source}: cannot be read as a checkpoint manifest: {exc}") from None
        top = _Reader(data, source, "")
        if top.get("format", str) != METADATA_FORMAT:
            raise MetadataError(f"{source}: field format must be {METADATA_FORMAT!r}")
        version = top.get("version", int)
        if version != MANIFEST_VERSION:
            raise MetadataError(f"{source}: field version is {version}; this release reads version "
                                f"{MANIFEST_VERSION}")
        groups = top.get("sharding_groups", list)
        if not groups or not all(isinstance(g, list) and g and all(isinstance(d, int) for d in g) for g in groups):
            raise MetadataError(f"{source}: field sharding_groups must list lists of device ids")
        files = []
        for i, entry in enumerate(top.get("files", list)):
            f = _Reader(entry, source, f"files[{i}]")
            files.append(ManifestFile(f.get("name", str), f.get("group", int), f.get("rank", int),
                                      f.get("world_size", int), f.get("size", int), f.get("crc32", int)))
            if "/" in files[-1].name or files[-1].name.startswith("."):
                raise MetadataError(f"{source}: field files[{i}].name {files[-1].name!r} is not a plain file name")
        manifest = Manifest(top.get("step", int), top.get("world_size", int),
                            tuple(tuple(g) for g in groups), tuple(files), METADATA_FORMAT, version)
        expected = {(g, r) for g, members in enumerate(manifest.sharding_groups) for r in range(len(members))}
        found = [(f.group, f.rank) for f in manifest.files]
        if sorted(found) != sorted(expected):
            raise MetadataError(f"{source}: field files lists (group, rank) {sorted(found)[:8]} but "
                                f"sharding_groups needs {sorted(expected)[:8]}")
        return manifest

