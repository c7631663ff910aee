"""The consolidation driver: read entry by entry, write, verify, or reshard."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

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


def read_full(files: list[ShardFile], entry: Entry, weights_only: bool) -> torch.Tensor:
    """The full tensor of ``entry``, reading each rank's shard through a short-lived memory map."""
    sources = files if entry.sharded else files[:1]
    shards = []
    for f in sources:
        try:
            shards.append(get_in(f.load(weights_only), entry.source))
        except (KeyError, IndexError, TypeError):
            raise ConsolidationError(f"{f.path}: has no {'/'.join(map(str, entry.source))}, which the shard "
                                     "metadata lists") from None
    try:
        full = entry.assemble(shards)
    except ValueError as exc:
        raise ConsolidationError(f"{'/'.join(map(str, entry.source))} of {files[0].path} and the other ranks: "
                                 f"{exc}") from None
    # A sharded entry was joined into new memory; a replicated one is rank 0's
    # mapped tensor, copied so that the file's map is released with ``shards``.
    return full if entry.sharded else full.clone()


def _specs(files, entries, weights_only) -> dict[tuple, tuple]:
    rank0 = files[0].load(weights_only)
    specs = {}
    for e in entries:
        value = get_in(rank0, e.source)
        dtype = e.cast or value.dtype
        for o in e.outputs:
            specs[o.path] = (tuple(value.shape) if o.shape is None else o.shape, dtype)
    return specs


def _progress(items, enabled: bool, desc: str):
    return tqdm(items, desc=desc, unit="tensor", disable=not enabled, leave=False)


def consolidate(ckpt_prefix: str, ckpt_suffix: str = "*.pth", save_path: str = "", save_model: bool = True, *,
                optimizer: bool = False, format: str = "pth", verify: bool = False, overwrite: bool = False,
                progress: bool = True, weights_only: bool = True):
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

    if save_model and format == "pth":
        skeleton: dict = {"model": {}}
        if groups is not None:
            skeleton["optimizer"] = {"state": {}, "param_groups": groups}
        stream = PthStream(target, skeleton, {p: specs[p] for p in order})
        try:
            for e in _progress(entries, progress, "consolidating"):
                stream.fill(e.split(read_full(files, e, weights_only)))
        except BaseException as exc:
            stream.abort(exc)
            raise
        stream.commit()
        result = torch.load(target, mmap=True, weights_only=True)["model"]
    else:
        result = {}
        for e in _progress(entries, progress, "consolidating"):
            for p, value in e.split(read_full(files, e, weights_only)):
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
    for e in _progress(entries, progress, "verifying"):
        for p, expected in e.split(read_full(files, e, weights_only)):
            try:
                actual = read(p)
            except (KeyError, IndexError):
                raise ConsolidationError(f"verification failed: {target} lacks {'/'.join(map(str, p))}") from None
            if format == "orbax" and expected.dtype == torch.bfloat16:
                expected = expected.float()
            if actual.dtype != expected.dtype or not torch.equal(actual, expected):
                raise ConsolidationError(f"verification failed: {'/'.join(map(str, p))} in {target} differs "
                                         "from the shards")


def reshard(ckpt_prefix: str, ckpt_suffix: str, new_world_size: int, save_prefix: str = "", *,
            overwrite: bool = False, progress: bool = True, weights_only: bool = True) -> list[Path]:
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
        for s in _progress(sources, progress, "resharding"):
            layout = layout_of(metadata["params"][shard_key[s]]) if s in shard_key else None
            full = read_full(files, Entry(s, [], layout=layout), weights_only)
            for m, stream in enumerate(streams):
                value = new_layouts[shard_key[s]].shard(full.reshape(layout.shape), m) if layout else full
                stream.fill([(s, value)])
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
