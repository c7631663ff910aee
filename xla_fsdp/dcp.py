"""Resume from a ``torch.distributed.checkpoint`` (DCP) checkpoint, e.g. one that FSDP2 wrote.

``load_dcp_checkpoint(path, model, optimizer)`` loads, on every rank, the
checkpoint of the *unwrapped* model that DCP wrote as::

    model_sd, optim_sd = get_state_dict(model, optimizer)     # torch.distributed.checkpoint.state_dict
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)

from FSDP2 (``fully_shard``) on any number of ranks, from one process, or from
``python -m consolidate --format dcp``. The model may be wrapped in any way
(ZeRO-2 or ZeRO-3, flattened or not) at any world size; the checkpoint's
names are the unwrapped model's, which ``get_shard_metadata()`` maps to
this rank's shards.

[Note: reading DCP into shards]
A rank's shard of a shard parameter holds the elements ``span(rank)`` of the
flattened full tensor (``_layout.ShardLayout``); those elements lie in at
most a few of the parameter's originals (``slot_pieces``), each as one
contiguous range of the original's flattened elements. DCP reads rectangular
chunks, so each range is asked for as the rows of the original that cover it
(``_CoveringRowsPlanner``: a chunk at an offset, which DCP cuts out of the
chunks that the checkpoint holds, whoever wrote them); the range is then cut
from the rows. A rank thus asks for about ``1/world_size`` of the checkpoint
(DCP's reader loads each stored chunk that overlaps a request whole: FSDP2's
chunks are its ranks' shards, consolidate's are whole tensors). Optimizer
state shaped like its parameter (AdamW's moments) is
read the same way; a scalar (``step``) must be equal for every original in a
shard parameter, since the shard parameter has one.

Loading is all or nothing across the job, as ``load_sharded_checkpoint``'s:
every rank reads and checks what it needs, then the ranks agree before any
model or optimizer changes. Nothing is cast: a dtype that differs from the
model's is refused. Random states and LR schedulers are not in such a
checkpoint and are left as they are.

DCP's own reader unpickles the checkpoint's ``.metadata`` file; non-tensor
values (the optimizer's hyperparameters) are read here with
``torch.load(weights_only=True)``. Load checkpoints you trust, as with any
pickle.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ._io import refuse_url
from ._layout import slot_pieces
from ._metadata import ShardMetadata
from .sharded_checkpoint import (CheckpointError, CheckpointMismatchError, _optimizer_param_names,
                                 load_all_or_nothing, wait_for_checkpoint)

__all__ = ["load_dcp_checkpoint"]


def load_dcp_checkpoint(path: str | Path, model, optimizer: Optional[torch.optim.Optimizer] = None, *,
                        model_key: Optional[str] = "model", optimizer_key: str = "optim") -> None:
    """Load a DCP checkpoint of the unwrapped model into ``model`` (and ``optimizer``); every rank calls it.

    ``model_key`` and ``optimizer_key`` are the top-level keys under which the
    checkpoint holds ``get_model_state_dict`` and ``get_optimizer_state_dict``
    (``model_key=None``: the model's state dict is the whole checkpoint, as
    ``dcp.save(model.state_dict(), ...)`` writes it). The optimizer must be
    built over the wrapped model's parameters (``model.parameters()``) with
    the parameter groups of the one that was saved; its hyperparameters are
    taken from the checkpoint, as ``optimizer.load_state_dict`` takes them.
    See [Note: reading DCP into shards].
    """
    refuse_url(path, "DCP checkpoint")
    wait_for_checkpoint()
    path = Path(path)
    load_all_or_nothing(path, lambda: _read(path, model, optimizer, model_key, optimizer_key), model, optimizer,
                        issuer="load_dcp_checkpoint")


@dataclass
class _Request:
    """Rows ``offsets[0]:offsets[0] + len(buffer)`` of one checkpoint tensor, read into ``buffer``."""

    offsets: tuple[int, ...]
    buffer: torch.Tensor


def _covering_rows(shape: tuple[int, ...], begin: int, end: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """The rows of a tensor of ``shape`` that hold its flattened elements ``[begin, end)``.

    Returns the chunk's offsets and sizes, and where element ``begin`` is in the chunk, flattened.
    """
    if not shape:
        return (), (), 0
    row = math.prod(shape[1:])
    first, last = begin // row, -(-end // row)
    return (first, *(0 for _ in shape[1:])), (last - first, *shape[1:]), begin - first * row


class _Reading:
    """What one rank asks of the checkpoint, and how the answers become its shards."""

    def __init__(self, where: Path, metadata: Any, paths: dict[tuple, str]):
        self.where, self.metadata, self.paths = where, metadata, paths
        self.requests: dict[str, _Request] = {}
        self.bytes: dict[str, Any] = {}

    def key(self, path: tuple) -> str:
        key = self.paths.get(path)
        if key is None:
            raise CheckpointMismatchError(f"{self.where} has no {'.'.join(map(str, path))}")
        return key

    def tensor_metadata(self, path: tuple):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata
        md = self.metadata.state_dict_metadata[self.key(path)]
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointMismatchError(f"{self.where}: {'.'.join(map(str, path))} is not a tensor")
        return md

    def whole(self, path: tuple, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Ask for a whole tensor; it is filled in by ``run``."""
        md = self.tensor_metadata(path)
        self._check_dtype(path, md.properties.dtype, dtype)
        buffer = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        self.requests[self.key(path)] = _Request(tuple(0 for _ in md.size), buffer)
        return buffer

    def piece(self, path: tuple, shape: tuple[int, ...], begin: int, end: int,
              dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, int]:
        """Ask for the flattened elements ``[begin, end)`` of a tensor of ``shape``: (rows buffer, skip)."""
        md = self.tensor_metadata(path)
        if tuple(md.size) != tuple(shape):
            raise CheckpointMismatchError(f"{self.where}: {'.'.join(map(str, path))} has shape {list(md.size)}, "
                                          f"the model's is {list(shape)}")
        self._check_dtype(path, md.properties.dtype, dtype)
        offsets, sizes, skip = _covering_rows(tuple(shape), begin, end)
        buffer = torch.empty(sizes, dtype=md.properties.dtype)
        self.requests[self.key(path)] = _Request(offsets, buffer)
        return buffer, skip

    def _check_dtype(self, path: tuple, saved: torch.dtype, wanted: Optional[torch.dtype]) -> None:
        if wanted is not None and saved != wanted:
            raise CheckpointMismatchError(f"{self.where}: {'.'.join(map(str, path))} is {saved} but the model's is "
                                          f"{wanted}; refusing to cast")

    def run(self) -> None:
        """Read every requested chunk (and byte value) in one pass."""
        import torch.distributed.checkpoint as dcp
        state: dict[str, Any] = {key: request.buffer for key, request in self.requests.items()}
        state.update({key: None for key in self.bytes})
        from torch.distributed.checkpoint.api import CheckpointException
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            try:
                dcp.load(state, storage_reader=dcp.FileSystemReader(self.where),
                         planner=_covering_rows_planner({k: r.offsets for k, r in self.requests.items()}),
                         no_dist=True)
            except CheckpointException as exc:   # a BaseException, which the all-or-nothing barrier misses
                cause = next(iter(exc.failures.values()), (exc, None))[0]
                detail = str(cause).strip().splitlines()[0] if str(cause).strip() else "a data file ends early"
                raise CheckpointError(f"{self.where}: cannot be read (truncated or damaged?): "
                                      f"{type(cause).__name__}: {detail}") from None
        for key in self.bytes:
            self.bytes[key] = state[key]


def _covering_rows_planner(offsets: dict[str, tuple[int, ...]]):
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata
    from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class _CoveringRowsPlanner(DefaultLoadPlanner):
        """Reads each tensor key as the chunk its buffer stands for. See [Note: reading DCP into shards]."""

        def __init__(self):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

        def create_local_plan(self) -> LoadPlan:
            items = []
            for key, buffer in self.state_dict.items():
                md = self.metadata.state_dict_metadata[key]
                if isinstance(md, TensorStorageMetadata):
                    chunk = ChunkStorageMetadata(offsets=torch.Size(offsets[key]), sizes=buffer.size())
                    items += create_read_items_for_chunk_list(key, md, [chunk])
                else:
                    items.append(ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex(key),
                                          dest_offsets=torch.Size((0,)), storage_index=MetadataIndex(key),
                                          storage_offsets=torch.Size((0,)), lengths=torch.Size((0,))))
            return LoadPlan(items)

        def lookup_tensor(self, index):
            return self.state_dict[index.fqn]       # the chunk itself: read items' offsets are relative to it

        def load_bytes(self, read_item, value):
            self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)

    return _CoveringRowsPlanner()


def _read(path: Path, model, optimizer, model_key: Optional[str], optimizer_key: str) -> tuple[dict, str]:
    """This rank's payload (``model`` shards and buffers, ``optimizer`` state dict); nothing is changed yet."""
    import torch.distributed.checkpoint as dcp
    where = f"{path} (DCP checkpoint, rank {model.rank} of {model.world_size})"
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except Exception as exc:
        raise CheckpointError(f"{path}: not a torch.distributed.checkpoint directory (no readable .metadata): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    planner_data = metadata.planner_data or {}
    paths = {tuple(planner_data.get(key, (key,))): key for key in metadata.state_dict_metadata}
    reading = _Reading(path, metadata, paths)
    shard_metadata = ShardMetadata.from_dict(model.get_shard_metadata(), "the model")
    prefix = (model_key,) if model_key is not None else ()
    current = model.state_dict()
    shards, fill = {}, []
    for key, param in shard_metadata.params.items():
        shards[key] = torch.zeros(param.layout.shard_numel, dtype=current[key].dtype)
        fill += _ask_pieces(reading, shards[key], param, model.rank,
                            lambda name: (*prefix, name), current[key].dtype)
    buffers = {key: reading.whole((*prefix, name), current[key].dtype)
               for key, name in shard_metadata.buffers.items()}
    opt_fill = None
    if optimizer is not None:
        opt_fill = _ask_optimizer(reading, model, optimizer, shard_metadata, optimizer_key)
    reading.run()
    for finish in fill:
        finish()
    payload = {"model": {**{k: v.reshape(shard_metadata.params[k].layout.shard_shape) for k, v in shards.items()},
                         **buffers}}
    if opt_fill is not None:
        payload["optimizer"] = opt_fill()
    return payload, where


def _ask_pieces(reading: _Reading, shard: torch.Tensor, param, rank: int, path_of, dtype) -> list:
    """Ask for the pieces of ``param``'s originals in ``rank``'s shard; returns what copies them in."""
    start, stop = param.layout.span(rank)
    fill = []
    for i, begin, end in slot_pieces(param.slots, start, stop):
        original = param.originals[i]
        rows, skip = reading.piece(path_of(original.name), original.shape, begin, end, dtype)
        at = original.offset + begin - start

        def finish(rows=rows, skip=skip, at=at, count=end - begin):
            shard[at:at + count] = rows.reshape(-1)[skip:skip + count]
        fill.append(finish)
    return fill


def _ask_optimizer(reading: _Reading, model, optimizer, shard_metadata: ShardMetadata, optimizer_key: str):
    """Ask for the optimizer state of this rank's shards; returns what builds the optimizer state dict."""
    names = _optimizer_param_names(model, optimizer)
    current = optimizer.state_dict()
    # DCP flattens the groups into one value per option (optim.param_groups.0.lr); a writer that does not
    # flatten stores the list whole.
    group_paths = [path for path in reading.paths if path[:2] == (optimizer_key, "param_groups")]
    if not group_paths:
        raise CheckpointMismatchError(f"{reading.where} holds no optimizer state under {optimizer_key!r}")
    for path in group_paths:
        reading.bytes[reading.key(path)] = None
    state_names: dict[str, list[str]] = {}
    for path in reading.paths:
        if len(path) == 4 and path[:2] == (optimizer_key, "state"):
            state_names.setdefault(path[2], []).append(path[3])
    state, fill = {}, []
    for group, group_names in zip(current["param_groups"], names):
        for index, key in zip(group["params"], group_names):
            param = shard_metadata.params[key]
            found = {tuple(sorted(state_names.get(o.name, []))) for o in param.originals}
            if len(found) > 1:
                raise CheckpointMismatchError(f"{reading.where}: the originals of {key} "
                                              f"({[o.name for o in param.originals][:4]}) hold different optimizer "
                                              f"state ({sorted(found)}); one shard parameter has one state")
            entry: dict[str, Any] = {}
            for state_name in found.pop():
                paths = [(optimizer_key, "state", o.name, state_name) for o in param.originals]
                md = reading.tensor_metadata(paths[0])
                if tuple(md.size) == tuple(param.originals[0].shape) and tuple(md.size):
                    entry[state_name] = torch.zeros(param.layout.shard_numel, dtype=md.properties.dtype)
                    fill += _ask_pieces(reading, entry[state_name], param, model.rank,
                                        lambda name, s=state_name: (optimizer_key, "state", name, s),
                                        md.properties.dtype)
                    fill.append(lambda e=entry, s=state_name, shape=param.layout.shard_shape: e.__setitem__(
                        s, e[s].reshape(shape)))
                elif not tuple(md.size):
                    scalars = [reading.whole(p) for p in paths]
                    fill.append(lambda e=entry, s=state_name, v=scalars, k=key: e.__setitem__(s, _one(v, k, s,
                                                                                                 reading.where)))
                else:
                    raise CheckpointMismatchError(f"{reading.where}: optimizer state {state_name} of "
                                                  f"{param.originals[0].name} has shape {list(md.size)}, neither "
                                                  "the parameter's nor a scalar; it cannot be sharded")
            if entry:
                state[index] = entry

    def build() -> dict:
        for finish in fill:
            finish()
        saved: dict[int, dict] = {}
        for path in group_paths:
            value = reading.bytes[reading.key(path)]
            if len(path) == 2:
                saved.update(enumerate(value))
            else:
                saved.setdefault(path[2], {})[path[3]] = value
        groups = _match_groups(reading.where, current["param_groups"], names, shard_metadata, saved, optimizer_key)
        return {"state": state, "param_groups": groups}

    return build


def _one(values: list[torch.Tensor], key: str, state_name: str, where) -> torch.Tensor:
    if any(not torch.equal(v, values[0]) for v in values[1:]):
        raise CheckpointMismatchError(f"{where}: optimizer state {state_name} differs between the originals of "
                                      f"{key} ({[v.item() for v in values][:4]}); one shard parameter has one")
    return values[0]


def _match_groups(where, groups: list[dict], names: list[list[str]], shard_metadata: ShardMetadata,
                  saved: dict[int, dict], optimizer_key: str) -> list[dict]:
    """The optimizer's parameter groups with the hyperparameters of the saved group holding their originals."""
    by_name = {name: g for g, group in saved.items() for name in group.get("params", [])}
    matched = []
    for g, (group, group_names) in enumerate(zip(groups, names)):
        originals = [o.name for key in group_names for o in shard_metadata.params[key].originals]
        homes = {by_name.get(name) for name in originals}
        if None in homes or len(homes) > 1:
            missing = [name for name in originals if name not in by_name][:3]
            raise CheckpointMismatchError(f"{where}: parameter group {g} of this optimizer holds "
                                          f"{originals[:4]}, which " + (f"no saved group holds ({missing})"
                                                                       if missing else "several saved groups hold")
                                          + f" (saved under {optimizer_key}.param_groups)")
        home = saved[homes.pop()]
        options = {k: v for k, v in home.items() if k != "params"}
        if set(options) != set(group) - {"params"}:
            raise CheckpointMismatchError(f"{where}: parameter group {g} has options {sorted(options)} in the "
                                          f"checkpoint but {sorted(set(group) - {'params'})} in this optimizer "
                                          "(another optimizer type, or an LR scheduler on one side only)")
        matched.append({**options, "params": group["params"]})
    return matched
