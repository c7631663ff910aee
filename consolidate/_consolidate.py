"""The consolidation driver: read entry by entry, write, verify, or reshard."""

from __future__ import annotations

import contextlib
import math
import shutil
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from xla_fsdp._io import file_crc32, no_space_problem
from xla_fsdp._metadata import Manifest, ManifestFile
from xla_fsdp._reshard import shard_keys
from xla_fsdp._steps import commit_step, committed_steps, rank_file_name, staging_dir

from ._inputs import XLA_FSDP, ConsolidationError, Inputs, ShardFile, _resolve, _url, find_inputs
from ._optimizer import left_out, optimizer_entries
from ._plan import Entry, model_entries, output_order
from ._writers import (PthStream, get_in, is_dcp_checkpoint, is_orbax_checkpoint, read_dcp, read_orbax,
                       remove_stale_temps, set_in, write_dcp, write_orbax, write_safetensors)

FORMATS = ("pth", "safetensors", "orbax", "dcp")
_SUFFIX = {"pth": ".pth", "safetensors": ".safetensors", "orbax": ".orbax", "dcp": ".dcp"}
_DIRECTORY_FORMATS = {"orbax": is_orbax_checkpoint, "dcp": is_dcp_checkpoint}   # -> "did this tool write it?"
DCP_MODEL_KEY, DCP_OPTIMIZER_KEY = "model", "optim"


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


class GroupLookup:
    """Output path -> its tensor, for a writer that asks tensor by tensor. See [Note: streaming DCP].

    The group of entries holding the path is read when first asked for and
    kept until a path of another group is asked for, so a writer that asks in
    entry order reads every group once and holds one at a time.
    """

    def __init__(self, reader: ShardReader, entries: list[Entry], bar: tqdm):
        self.reader, self.bar = reader, bar
        self.groups = list(reader.groups(entries))
        self.group_of = {o.path: i for i, group in enumerate(self.groups) for e in group for o in e.outputs}
        self.current, self.tensors = None, {}

    def __call__(self, path: tuple) -> torch.Tensor:
        index = self.group_of[path]
        if index != self.current:
            self.tensors = {}            # released before the next group is read
            self.tensors = {p: v for e, full in self.reader.read(self.groups[index]) for p, v in e.split(full)}
            self.current = index
            self.bar.update(len(self.groups[index]))
        return self.tensors[path]


def _specs(files, entries, weights_only) -> dict[tuple, tuple]:
    rank0 = files[0].load(weights_only)
    specs = {}
    for e in entries:
        value = get_in(rank0, e.source)
        dtype = e.cast or value.dtype
        for o in e.outputs:
            specs[o.path] = (tuple(value.shape) if o.shape is None else o.shape, dtype)
    return specs


def _nbytes(specs: dict) -> int:
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in specs.values())


def _budget(memory_budget_mb: float) -> int:
    if not math.isfinite(memory_budget_mb) or memory_budget_mb <= 0:
        raise ConsolidationError(f"--memory_budget_mb must be a positive number, got {memory_budget_mb}")
    return int(memory_budget_mb * 2**20)


def _check_target(target: Path, inputs: Inputs, overwrite: bool, format: str) -> None:
    """Refuse an output that is, holds or sits inside an input, a wrong kind of path, or one that exists."""
    url = _url(str(target))
    if url:
        raise ConsolidationError(url)
    resolved = _resolve(target)
    for f in inputs.files:
        source = _resolve(f.path)
        if source == resolved or resolved in source.parents:
            raise ConsolidationError(f"output {target} is or contains the input {f.path}; choose another "
                                     "--save_path")
    if inputs.root is not None and (_resolve(inputs.root) == resolved or resolved in _resolve(inputs.root).parents):
        raise ConsolidationError(f"output {target} is or contains the input directory {inputs.root}")
    if not target.exists() and not target.is_symlink():
        return
    ours = _DIRECTORY_FORMATS.get(format)
    if target.is_dir() and ours is None:
        raise ConsolidationError(f"--save_path {target} is a directory; give a file name")
    if ours is not None and not target.is_dir():
        raise ConsolidationError(f"--save_path {target} is a file; {format} output is a directory")
    if not overwrite:
        raise ConsolidationError(f"{target} exists; pass --overwrite to replace it")
    if ours is not None and not ours(target):
        raise ConsolidationError(f"{target} exists and is not an {format} checkpoint; refusing to replace a "
                                 "directory this tool did not write")


def _check_space(where: Path, needed: int) -> None:
    problem = no_space_problem(where, needed)
    if problem:
        raise ConsolidationError(problem)


def consolidate(ckpt_prefix: str, ckpt_suffix: str = "*.pth", save_path: str = "", save_model: bool = True, *,
                optimizer: bool = False, format: str = "pth", verify: bool = False, overwrite: bool = False,
                progress: bool = True, weights_only: bool = True, memory_budget_mb: float = 64,
                step=None, sharding_group: int = 0):
    if format not in FORMATS:
        raise ConsolidationError(f"--format must be one of {FORMATS}, got {format!r}")
    if optimizer and format not in ("pth", "dcp"):
        raise ConsolidationError(f"--optimizer writes an optimizer state dict, which only --format pth and dcp hold "
                                 f"(got --format {format})")
    budget = _budget(memory_budget_mb)
    if _url(save_path):  # before Path() turns "gs://b" into the local "gs:/b"
        raise ConsolidationError(_url(save_path))
    target = Path(save_path or str(ckpt_prefix).rstrip("/") + "_consolidated" + _SUFFIX[format])
    inputs = find_inputs(ckpt_prefix, ckpt_suffix, weights_only, (target, *_default_outputs(ckpt_prefix)),
                         step, sharding_group)
    files = inputs.files
    if inputs.warning:
        warnings.warn(inputs.warning, stacklevel=3)
    if save_model:
        _check_target(target, inputs, overwrite, format)
    entries = model_entries(files)
    groups = None
    if optimizer:
        opt_entries, groups = optimizer_entries(files, weights_only, key_by_name=format == "dcp",
                                                root=DCP_OPTIMIZER_KEY if format == "dcp" else "optimizer")
        entries += opt_entries
    else:
        not_written = left_out(files, weights_only)
        if not_written:
            warnings.warn(not_written, stacklevel=3)
    specs = _specs(files, entries, weights_only)
    order = output_order(files, [e for e in entries if e.source[0] == "model"])
    order += [p for p in specs if p[0] != "model"]
    if save_model:
        remove_stale_temps(target)
        _check_space(target.parent if target.parent.exists() else Path("."), _nbytes(specs))

    reader = ShardReader(files, weights_only, budget)
    check = (lambda written: verify_output(files, entries, written, format, progress, weights_only)) if verify \
        else (lambda written: None)
    try:
        if save_model and format == "pth":
            skeleton: dict = {"model": {}}
            if groups is not None:
                skeleton["optimizer"] = {"state": {}, "param_groups": groups}
            stream = PthStream(target, skeleton, {p: specs[p] for p in order})
            try:
                for group in reader.read_all(entries, progress, "consolidating"):
                    stream.fill([item for e, full in group for item in e.split(full)])
                check(stream.tmp)
            except BaseException as exc:
                stream.abort(exc)
                raise
            stream.commit()
            result = torch.load(target, mmap=True, weights_only=True)["model"]
        elif save_model and format == "dcp":
            try:
                _write_dcp_output(target, reader, entries, specs, groups, overwrite, progress, check)
            except RuntimeError as exc:  # torch.save's text for a failed write; the temporary output is removed
                problem = no_space_problem(target.parent, _nbytes(specs))
                raise ConsolidationError(f"cannot write {target}: {problem or str(exc).strip().splitlines()[0]}") \
                    from None
            result = None   # in the checkpoint, streamed: read it with torch.distributed.checkpoint
        else:
            result = {}
            for group in reader.read_all(entries, progress, "consolidating"):
                for e, full in group:
                    for p, value in e.split(full):
                        set_in(result, p, value)
            result = {name: result["model"][name] for _, name in order if _ == "model"}
            if save_model and format == "safetensors":
                write_safetensors(target, result, {"source": str(files[0].path), "world_size": str(len(files))},
                                  check)
            elif save_model:
                write_orbax(target, result, overwrite, check)
    except OSError as exc:  # a full disk, a read-only directory: the temporary output is already removed
        raise ConsolidationError(f"cannot write {target}: {exc}") from None
    return result, (target if save_model else None)


def _write_dcp_output(target: Path, reader: ShardReader, entries: list[Entry], specs: dict, groups, overwrite: bool,
                      progress: bool, check) -> None:
    """The model under ``"model"`` and the optimizer, by parameter name, under ``"optim"``: what
    ``torch.distributed.checkpoint.state_dict.get_state_dict`` returns for the unwrapped model."""
    skeleton: dict = {DCP_MODEL_KEY: {}}
    for e in entries:               # in read order, so that the writer asks for the groups one after another
        for o in e.outputs:
            shape, dtype = specs[o.path]
            set_in(skeleton, o.path, torch.empty(shape, dtype=dtype, device="meta"))
    if groups is not None:
        skeleton.setdefault(DCP_OPTIMIZER_KEY, {}).setdefault("state", {})
        skeleton[DCP_OPTIMIZER_KEY]["param_groups"] = groups
    with tqdm(total=len(entries), desc="consolidating", unit="tensor", disable=not progress, leave=False) as bar:
        write_dcp(target, skeleton, GroupLookup(reader, entries, bar), overwrite, check)


def _output_reader(target: Path, format: str) -> Callable[[dict], dict]:
    """``read(expected)``: the output's tensors at the paths of ``expected`` (a dict path -> tensor)."""
    if format == "pth":
        ckpt = torch.load(target, mmap=True, weights_only=True)
        return lambda expected: {p: get_in(ckpt, p) for p in expected}
    if format == "safetensors":
        from safetensors import safe_open
        handle = safe_open(str(target), framework="pt")
        return lambda expected: {p: handle.get_tensor(p[1]) for p in expected}
    if format == "dcp":
        def read(expected: dict) -> dict:
            try:
                return read_dcp(target, expected)
            except Exception as exc:  # DCP wraps a missing key in its own exceptions
                raise ConsolidationError(f"verification failed: {target} cannot be read back for "
                                         f"{'/'.join(map(str, next(iter(expected))))} ...: "
                                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc)}") \
                    from None
        return read
    tree = read_orbax(target)
    return lambda expected: {p: torch.from_numpy(tree[p[1]].astype("float32") if str(tree[p[1]].dtype) == "bfloat16"
                                                 else tree[p[1]]) for p in expected}


def same_values(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Same dtype, shape and bits, NaN equal to NaN (``torch.equal`` calls a NaN different from itself)."""
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return False
    if torch.equal(actual, expected):
        return True
    if not (actual.is_floating_point() or actual.is_complex()):
        return False
    return bool(((actual == expected) | (actual.isnan() & expected.isnan())).all())


def verify_output(files, entries, target: Path, format: str, progress: bool, weights_only: bool) -> None:
    """Re-read ``target`` and check every tensor against the shards it came from."""
    read = _output_reader(target, format)
    for group in ShardReader(files, weights_only).read_all(entries, progress, "verifying"):
        expected = {p: value for e, full in group for p, value in e.split(full)}
        try:
            actual = read(expected)
        except (KeyError, IndexError) as exc:
            raise ConsolidationError(f"verification failed: {target} lacks {exc}") from None
        for p, value in expected.items():
            if format == "orbax" and value.dtype == torch.bfloat16:
                value = value.float()
            if not same_values(actual[p], value):
                raise ConsolidationError(f"verification failed: {'/'.join(map(str, p))} in {target} differs "
                                         "from the shards")


def reshard(ckpt_prefix: str, ckpt_suffix: str, new_world_size: int, save_prefix: str = "", *,
            overwrite: bool = False, progress: bool = True, weights_only: bool = True,
            memory_budget_mb: float = 64, verify: bool = False, step=None, sharding_group: int = 0) -> list[Path]:
    """Write a committed ``new_world_size``-rank checkpoint directory (model and optimizer) from an N-rank one.

    The output is ``save_prefix`` (default ``PREFIX_worldM``), laid out like
    ``save_sharded_checkpoint``'s (``step_N/`` with a manifest, same step), so
    ``load_sharded_checkpoint(save_prefix, ...)`` reads it.
    """
    if new_world_size < 1:
        raise ConsolidationError(f"--reshard needs a world size >= 1, got {new_world_size}")
    budget = _budget(memory_budget_mb)
    if _url(save_prefix):
        raise ConsolidationError(_url(save_prefix))
    root = Path(save_prefix or f"{str(ckpt_prefix).rstrip('/')}_world{new_world_size}")
    inputs = find_inputs(ckpt_prefix, ckpt_suffix, weights_only, _default_outputs(ckpt_prefix), step,
                         sharding_group)
    files = inputs.files
    if inputs.warning:
        warnings.warn(inputs.warning, stacklevel=3)
    if files[0].kind != XLA_FSDP:
        raise ConsolidationError(f"{files[0].path}: --reshard needs xla_fsdp checkpoints")
    rank0 = files[0].load(weights_only)
    missing = [k for k in ("format", "rng", "step") if k not in rank0]
    if missing or (rank0.get("optimizer") is not None and rank0.get("optimizer_param_names") is None):
        raise ConsolidationError(f"{files[0].path}: --reshard needs the files of save_sharded_checkpoint; this one "
                                 f"lacks {missing or ['optimizer_param_names']} (saved by xm.save?): consolidate it, "
                                 "load the result into the unwrapped model and save it wrapped for the new world size")
    new_step = inputs.step if inputs.step is not None else int(rank0.get("step") or 0)
    _check_reshard_root(root, inputs, new_step, overwrite)
    metadata = files[0].shard_metadata
    sources = [("model", k) for k in rank0["model"]]
    has_opt = rank0.get("optimizer") is not None
    if has_opt:
        sources += [("optimizer", "state", i, name) for i, state in rank0["optimizer"]["state"].items()
                    for name in state]
    new_layouts = {k: p.layout for k, p in metadata.at(new_world_size, 0).params.items()}
    shard_key = shard_keys(rank0, metadata)   # source -> params key, for sharded sources
    staging = staging_dir(root, new_step)
    names = [rank_file_name(root.name, 0, 1, m, new_world_size) for m in range(new_world_size)]
    targets = [staging / name for name in names]

    streams = []
    created_root = not root.exists()
    try:
        staging.mkdir(parents=True, exist_ok=True)
        for m, target in enumerate(targets):
            donor = files[m % len(files)].load(weights_only)
            md = metadata.at(new_world_size, m)
            skeleton = {k: v for k, v in rank0.items() if k not in ("model", "optimizer", "rng", "shard_metadata")}
            skeleton.update(shard_metadata=md.to_dict(), model={}, rng={}, step=new_step)
            if has_opt:
                skeleton["optimizer"] = {"state": {}, "param_groups": rank0["optimizer"]["param_groups"]}
            specs = {}
            for s in sources:
                value = get_in(rank0, s)
                shape = new_layouts[shard_key[s]].shard_shape if s in shard_key else tuple(value.shape)
                specs[s] = (shape, value.dtype)
            specs[("rng", "torch")] = (tuple(donor["rng"]["torch"].shape), donor["rng"]["torch"].dtype)
            skeleton["rng"]["xla"] = donor["rng"]["xla"]
            if m == 0:
                _check_space(root.parent if root.parent.exists() else Path("."), _nbytes(specs) * new_world_size)
            stream = PthStream(target, skeleton, specs)
            streams.append(stream)
            stream.fill([(("rng", "torch"), donor["rng"]["torch"])])
            del donor
        entries = [Entry(s, [], layout=metadata.params[shard_key[s]].layout if s in shard_key else None)
                   for s in sources]
        reader = ShardReader(files, weights_only, budget)
        for group in reader.read_all(entries, progress, "resharding"):
            for m, stream in enumerate(streams):
                stream.fill([(e.source, new_layouts[shard_key[e.source]].shard(full.reshape(e.layout.shape), m)
                              if e.layout is not None else full) for e, full in group])
        if verify:
            _verify_reshard(files, entries, [s.tmp for s in streams], new_layouts, shard_key, progress,
                            weights_only)
        for stream in streams:
            stream.commit()
        manifest = Manifest(new_step, new_world_size, (tuple(range(new_world_size)),),
                            tuple(ManifestFile(name, 0, m, new_world_size, t.stat().st_size, file_crc32(t))
                                  for m, (name, t) in enumerate(zip(names, targets))))
        final = commit_step(root, manifest)
    except BaseException as exc:
        for stream in streams:
            stream.abort(exc)
        shutil.rmtree(staging, ignore_errors=True)
        if created_root:
            with contextlib.suppress(OSError):
                root.rmdir()  # only if empty: nothing but what this run made
        if isinstance(exc, OSError):
            raise ConsolidationError(f"cannot write {root}: {exc}") from None
        raise
    return [final / name for name in names]


def _check_reshard_root(root: Path, inputs: Inputs, step: int, overwrite: bool) -> None:
    url = _url(str(root))
    if url:
        raise ConsolidationError(url)
    resolved = _resolve(root)
    sources = [_resolve(f.path) for f in inputs.files]
    if any(resolved == s or resolved in s.parents for s in sources):
        raise ConsolidationError(f"output {root} is or contains the input {inputs.files[0].path}; choose another "
                                 "--save_path")
    if root.exists() and not root.is_dir():
        raise ConsolidationError(f"--save_path {root} is a file; --reshard writes a checkpoint directory")
    if root.is_dir():
        foreign = [p.name for p in root.iterdir() if not p.name.startswith("step_")]
        if foreign:
            raise ConsolidationError(f"{root} holds {foreign[:3]}, which are not checkpoint steps; refusing to "
                                     "write a checkpoint into it")
        if step in committed_steps(root) and not overwrite:
            raise ConsolidationError(f"{root} already holds step {step}; pass --overwrite to replace it")


def _verify_reshard(files, entries, written: list[Path], new_layouts, shard_key, progress, weights_only) -> None:
    """Re-read the new shards, join them, and compare with the old ones, before the commit."""
    for group in ShardReader(files, weights_only).read_all(entries, progress, "verifying"):
        news = [torch.load(w, mmap=True, weights_only=True) for w in written]
        for e, full in group:
            if e.layout is not None:
                actual = new_layouts[shard_key[e.source]].unshard([get_in(n, e.source) for n in news])
                expected = full.reshape(e.layout.shape)
            else:
                actual, expected = get_in(news[0], e.source), full
            if not same_values(actual, expected):
                raise ConsolidationError(f"verification failed: {'/'.join(map(str, e.source))} of the resharded "
                                         "files differs from the shards")
        del news


