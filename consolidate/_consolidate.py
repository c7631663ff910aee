"""The consolidation driver: read entry by entry, write, verify, or reshard."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from xla_fsdp._layout import ShardLayout
from xla_fsdp._state_dict import layout_of
from xla_fsdp._io import checkpoint_path

from ._inputs import XLA_FSDP, ConsolidationError, ShardFile, discover
from ._optimizer import optimizer_entries
from ._plan import Entry, model_entries, output_order
from ._writers import PthStream, get_in, read_orbax, set_in, write_orbax, write_safetensors

FORMATS = ("pth", "safetensors", "orbax")
_SUFFIX = {"pth": ".pth", "safetensors": ".safetensors", "orbax": ".orbax"}


def _default_outputs(ckpt_prefix: str) -> tuple[Path, ...]:
    return tuple(Path(ckpt_prefix + "_consolidated" + suffix) for suffix in _SUFFIX.values())


class ShardReader:
    """Full tensors of entries, read in groups of about ``budget_bytes``. See [Note: streaming .pth].

    Each group maps every rank's file once, assembles the group's entries and
    drops the maps, so the pages read leave the process before the next
    group: memory grows by about the budget (or the largest tensor), not by
    the checkpoint. One map per entry would bound memory by the tensor alone,
    but re-parsing a file's pickle per tensor is slow for many tensors.
    """

    def __init__(self, files: list[ShardFile], weights_only: bool, budget_bytes: int = 64 << 20):
        self.files, self.weights_only, self.budget = files, weights_only, budget_bytes
        self._rank0 = files[0].load(weights_only)

    def nbytes(self, entry: Entry) -> int:
        value = get_in(self._rank0, entry.source)
        return value.numel() * value.element_size() * (len(self.files) if entry.sharded else 1)

    def groups(self, entries: list[Entry]) -> Iterator[list[Entry]]:
        group, size = [], 0
        for e in entries:
            if group and size + self.nbytes(e) > self.budget:
                yield group
                group, size = [], 0
            group.append(e)
            size += self.nbytes(e)
        if group:
            yield group

    def read(self, group: list[Entry]) -> Iterator[tuple[Entry, torch.Tensor]]:
        ckpts = [f.load(self.weights_only) for f in self.files]
        for entry in group:
            shards = []
            for f, ckpt in zip(self.files, ckpts if entry.sharded else ckpts[:1]):
                try:
                    shards.append(get_in(ckpt, entry.source))
                except (KeyError, IndexError, TypeError):
                    raise ConsolidationError(f"{f.path}: has no {'/'.join(map(str, entry.source))}, which the "
                                             "shard metadata lists") from None
            try:
                full = entry.assemble(shards)
            except ValueError as exc:
                raise ConsolidationError(f"{'/'.join(map(str, entry.source))} of {self.files[0].path} and the "
                                         f"other ranks: {exc}") from None
            # A sharded entry was joined into new memory; a replicated one is
            # rank 0's mapped tensor, copied so that the map can be released.
            yield entry, full if entry.sharded else full.clone()
        del ckpts

    def read_all(self, entries: list[Entry], progress: bool, desc: str) -> Iterator[list[tuple[Entry, torch.Tensor]]]:
        """Per group, the list of (entry, full tensor), with a progress bar over tensors."""
        with tqdm(total=len(entries), desc=desc, unit="tensor", disable=not progress, leave=False) as bar:
            for group in self.groups(entries):
                yield list(self.read(group))
                bar.update(len(group))


def _specs(files, entries, weights_only) -> dict[tuple, tuple]:
    rank0 = files[0].load(weights_only)
    specs = {}
    for e in entries:
        value = get_in(rank0, e.source)
        dtype = e.cast or value.dtype
        for o in e.outputs:
            specs[o.path] = (tuple(value.shape) if o.shape is None else o.shape, dtype)
    return specs


def consolidate(ckpt_prefix: str, ckpt_suffix: str = "*.pth", save_path: str = "", save_model: bool = True, *,
                optimizer: bool = False, format: str = "pth", verify: bool = False, overwrite: bool = False,
                progress: bool = True, weights_only: bool = True, memory_budget_mb: float = 64):
    if format not in FORMATS:
        raise ConsolidationError(f"--format must be one of {FORMATS}, got {format!r}")
    if optimizer and format != "pth":
        raise ConsolidationError(f"--optimizer writes an optimizer state dict, which only --format pth holds "
                                 f"(got --format {format})")
    target = Path(save_path or ckpt_prefix + "_consolidated" + _SUFFIX[format])
    files = discover(ckpt_prefix, ckpt_suffix, weights_only, outputs=(target, *_default_outputs(ckpt_prefix)))
    if save_model and target.exists() and not overwrite:
        raise ConsolidationError(f"{target} exists; pass --overwrite to replace it")
    entries = model_entries(files)
    groups = None
    if optimizer:
        opt_entries, groups = optimizer_entries(files, weights_only)
        entries += opt_entries
    specs = _specs(files, entries, weights_only)
    order = output_order(files, [e for e in entries if e.source[0] == "model"])
    order += [p for p in specs if p[0] == "optimizer"]

    reader = ShardReader(files, weights_only, int(memory_budget_mb * 2**20))
    if save_model and format == "pth":
        skeleton: dict = {"model": {}}
        if groups is not None:
            skeleton["optimizer"] = {"state": {}, "param_groups": groups}
        stream = PthStream(target, skeleton, {p: specs[p] for p in order})
        try:
            for group in reader.read_all(entries, progress, "consolidating"):
                stream.fill([item for e, full in group for item in e.split(full)])
        except BaseException as exc:
            stream.abort(exc)
            raise
        stream.commit()
        result = torch.load(target, mmap=True, weights_only=True)["model"]
    else:
        result = {}
        for group in reader.read_all(entries, progress, "consolidating"):
            for e, full in group:
                for p, value in e.split(full):
                    set_in(result, p, value)
        result = {name: result["model"][name] for _, name in order if _ == "model"}
        if save_model and format == "safetensors":
            write_safetensors(target, result, {"source": str(files[0].path), "world_size": str(len(files))})
        elif save_model:
            write_orbax(target, result, overwrite)
    if save_model and verify:
        verify_output(files, entries, target, format, progress, weights_only)
    return result, (target if save_model else None)


def _output_reader(target: Path, format: str):
    if format == "pth":
        return lambda p: get_in(torch.load(target, mmap=True, weights_only=True), p)
    if format == "safetensors":
        from safetensors import safe_open
        handle = safe_open(str(target), framework="pt")
        return lambda p: handle.get_tensor(p[1])
    tree = read_orbax(target)
    return lambda p: torch.from_numpy(tree[p[1]].astype("float32") if str(tree[p[1]].dtype) == "bfloat16"
                                      else tree[p[1]])


def verify_output(files, entries, target: Path, format: str, progress: bool, weights_only: bool) -> None:
    """Re-read ``target`` and check every tensor against the shards it came from."""
    read = _output_reader(target, format)
    for group in ShardReader(files, weights_only).read_all(entries, progress, "verifying"):
        for e, full in group:
            for p, expected in e.split(full):
                try:
                    actual = read(p)
                except (KeyError, IndexError):
                    raise ConsolidationError(f"verification failed: {target} lacks "
                                             f"{'/'.join(map(str, p))}") from None
                if format == "orbax" and expected.dtype == torch.bfloat16:
                    expected = expected.float()
                if actual.dtype != expected.dtype or not torch.equal(actual, expected):
                    raise ConsolidationError(f"verification failed: {'/'.join(map(str, p))} in {target} differs "
                                             "from the shards")


def reshard(ckpt_prefix: str, ckpt_suffix: str, new_world_size: int, save_prefix: str = "", *,
            overwrite: bool = False, progress: bool = True, weights_only: bool = True,
            memory_budget_mb: float = 64) -> list[Path]:
    """Write an ``new_world_size``-rank checkpoint (model and optimizer) from an N-rank one."""
    if new_world_size < 1:
        raise ConsolidationError(f"--reshard needs a world size >= 1, got {new_world_size}")
    save_prefix = save_prefix or f"{ckpt_prefix}_world{new_world_size}"
    targets = [checkpoint_path(save_prefix, m, new_world_size) for m in range(new_world_size)]
    files = discover(ckpt_prefix, ckpt_suffix, weights_only, outputs=(*targets, *_default_outputs(ckpt_prefix)))
    if files[0].kind != XLA_FSDP:
        raise ConsolidationError(f"{files[0].path}: --reshard needs xla_fsdp checkpoints")
    for t in targets:
        if t.exists() and not overwrite:
            raise ConsolidationError(f"{t} exists; pass --overwrite to replace it")
    rank0 = files[0].load(weights_only)
    metadata = rank0["shard_metadata"]
    sources = [("model", k) for k in rank0["model"]]
    has_opt = rank0.get("optimizer") is not None
    if has_opt:
        sources += [("optimizer", "state", i, name) for i, state in rank0["optimizer"]["state"].items()
                    for name in state]
    new_layouts = {k: ShardLayout(layout_of(i).shape, new_world_size, layout_of(i).shard_on_dim_0)
                   for k, i in metadata["params"].items()}
    shard_key = _shard_keys(rank0, metadata)   # source -> params key, for sharded sources

    streams = []
    try:
        for m, target in enumerate(targets):
            donor = files[m % len(files)].load(weights_only)
            md = copy.deepcopy(metadata)
            md.update(world_size=new_world_size, rank=m)
            for k, info in md["params"].items():
                info.update(world_size=new_world_size, shard_shape=list(new_layouts[k].shard_shape))
            skeleton = {k: v for k, v in rank0.items() if k not in ("model", "optimizer", "rng", "shard_metadata")}
            skeleton.update(shard_metadata=md, model={}, rng={})
            if has_opt:
                skeleton["optimizer"] = {"state": {}, "param_groups": rank0["optimizer"]["param_groups"]}
            specs = {}
            for s in sources:
                value = get_in(rank0, s)
                shape = new_layouts[shard_key[s]].shard_shape if s in shard_key else tuple(value.shape)
                specs[s] = (shape, value.dtype)
            specs[("rng", "torch")] = (tuple(donor["rng"]["torch"].shape), donor["rng"]["torch"].dtype)
            skeleton["rng"]["xla"] = donor["rng"]["xla"]
            stream = PthStream(target, skeleton, specs)
            streams.append(stream)
            stream.fill([(("rng", "torch"), donor["rng"]["torch"])])
            del donor
        entries = [Entry(s, [], layout=layout_of(metadata["params"][shard_key[s]]) if s in shard_key else None)
                   for s in sources]
        reader = ShardReader(files, weights_only, int(memory_budget_mb * 2**20))
        for group in reader.read_all(entries, progress, "resharding"):
            for m, stream in enumerate(streams):
                stream.fill([(e.source, new_layouts[shard_key[e.source]].shard(full.reshape(e.layout.shape), m)
                              if e.layout is not None else full) for e, full in group])
    except BaseException as exc:
        for stream in streams:
            stream.abort(exc)
        raise
    for stream in streams:
        stream.commit()
    return targets


def _shard_keys(rank0: dict, metadata: dict) -> dict[tuple, str]:
    """Sources that are shards (model shards and shard-shaped optimizer state) -> their params key."""
    keys = {("model", k): k for k in metadata["params"]}
    opt = rank0.get("optimizer")
    if opt is not None:
        for group, names in zip(opt["param_groups"], rank0["optimizer_param_names"]):
            for index, key in zip(group["params"], names):
                shard_shape = layout_of(metadata["params"][key]).shard_shape
                for name, value in opt["state"].get(index, {}).items():
                    if tuple(value.shape) == shard_shape:
                        keys[("optimizer", "state", index, name)] = key
    return keys
