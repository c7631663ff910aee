"""What to build: every output tensor, from which entry of the rank state dicts.

An ``Entry`` is one key of the per-rank ``model`` state dicts (or one
optimizer state tensor): either sharded, in which case the rank shards are
joined into a full tensor, or replicated, in which case rank 0's copy is used.
A full tensor then yields one or more outputs (slices of a flat parameter,
or a tied parameter under several names). Two adapters build entries: one for
xla_fsdp's metadata (through ``xla_fsdp._layout``) and one for torch_xla's,
which reproduces torch_xla's own consolidation key for key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from xla_fsdp._layout import ShardLayout, concat_unpad, split_flat, FlatSlot
from xla_fsdp._metadata import ShardMetadata

from ._inputs import TORCH_XLA, ShardFile


@dataclass
class Output:
    path: tuple          # where in the output: ("model", name) or ("optimizer", "state", i, key)
    offset: int          # into the flattened full tensor
    shape: Optional[tuple[int, ...]]   # None: the whole full tensor, whatever its shape


@dataclass
class Entry:
    source: tuple        # where in each rank checkpoint: ("model", key) or ("optimizer", "state", i, key)
    outputs: list[Output]
    layout: Optional[ShardLayout] = None    # xla_fsdp shards
    full_shape: Optional[tuple] = None      # torch_xla shards (padding amount not assumed)
    cast: Optional[torch.dtype] = None      # torch_xla buffers saved in a compute dtype
    sharded: bool = field(init=False)

    def __post_init__(self):
        self.sharded = self.layout is not None or self.full_shape is not None

    def assemble(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """Rank tensors (all of them if sharded, else rank 0's only) -> the full tensor."""
        if self.layout is not None:
            return self.layout.unshard(shards)
        if self.full_shape is not None:
            return concat_unpad(shards, self.full_shape)
        value = shards[0]
        return value.to(self.cast) if self.cast is not None else value

    def split(self, full: torch.Tensor) -> list[tuple[tuple, torch.Tensor]]:
        sliced = [o for o in self.outputs if o.shape is not None]
        views = dict(zip(map(id, sliced), split_flat(full, [FlatSlot(o.offset, o.shape) for o in sliced])))
        return [(o.path, full if o.shape is None else views[id(o)]) for o in self.outputs]


def model_entries(files: list[ShardFile]) -> list[Entry]:
    return _torch_xla_entries(files) if files[0].kind == TORCH_XLA else _xla_fsdp_entries(files[0].shard_metadata)


def _xla_fsdp_entries(metadata: ShardMetadata) -> list[Entry]:
    entries = []
    for key, param in metadata.params.items():
        outputs = [Output(("model", name), o.offset, o.shape) for o in param.originals
                   for name in (o.name, *o.aliases)]
        entries.append(Entry(("model", key), outputs, layout=param.layout))
    for key, name in metadata.buffers.items():
        entries.append(Entry(("model", key), [Output(("model", name), 0, None)]))
    return entries


def output_order(files: list[ShardFile], entries: list[Entry]) -> list[tuple]:
    """Output paths in the order of the consolidated state dict."""
    paths = [o.path for e in entries for o in e.outputs]
    if files[0].kind == TORCH_XLA:
        return paths
    rank = {("model", name): i for i, name in enumerate(files[0].shard_metadata.state_order)}
    return sorted(paths, key=lambda p: (p not in rank, rank.get(p, 0)))


_WRAPPED, _FPW = "_fsdp_wrapped_module.", "_fpw_module."


def _strip(name: str) -> str:
    return name.replace(_WRAPPED, "").replace(_FPW, "")


def _torch_xla_entries(files: list[ShardFile]) -> list[Entry]:
    """torch_xla's ``consolidate_sharded_state_dicts``, as entries, in its key order.

    Its rules (from its documented metadata): a key with a component starting
    with ``_fsdp_shard`` is sharded, described by ``shard_info[prefix][suffix]``
    (``_orig_name``, ``_orig_size``); other keys come from rank 0, buffers cast
    back to ``buffer_info[key]['_orig_dtype']``; a consolidated
    ``..._fsdp_wrapped_module.flat_param_i`` is then split by
    ``flatten_info`` into its parameters, which move to the end; finally the
    wrapper components are removed from every name.
    """
    metadata = files[0].metadata
    rank0 = files[0].load()["model"]
    buffer_info = metadata.get("buffer_info", {})
    flat_entries, entries = [], []
    for key, value in rank0.items():
        parts = key.split(".")
        index = next((i for i, part in enumerate(parts) if part.startswith("_fsdp_shard")), None)
        if index is None:
            cast = buffer_info.get(key, {}).get("_orig_dtype")
            name, entry = key, Entry(("model", key), [], cast=cast)
            shape = tuple(value.shape)
        else:
            prefix, suffix = ".".join(parts[:index]), ".".join(parts[index:])
            info = metadata["shard_info"][prefix][suffix]
            shape = tuple(info["_orig_size"])
            name = f"{prefix}.{info['_orig_name']}" if prefix else info["_orig_name"]
            entry = Entry(("model", key), [], full_shape=shape)
        if f"{_WRAPPED}flat_param_" in name:
            names, shapes, numels = metadata["flatten_info"][name]
            prefix = ".".join(name.split(".")[:-1])
            offset = 0
            for n, s, k in zip(names, shapes, numels):
                full_name = f"{prefix}.{n}" if prefix else n
                entry.outputs.append(Output(("model", _strip(full_name)), offset, tuple(s)))
                offset += k
            flat_entries.append(entry)
        else:
            entry.outputs.append(Output(("model", _strip(name)), 0, shape))
            entries.append(entry)
    return entries + flat_entries
