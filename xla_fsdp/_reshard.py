"""One rank's shards at another world size, built from the shard files of a step saved by N ranks.

A step saved by N ranks loads at M ranks without consolidating. Rank ``m``'s
shard of a parameter holds the elements ``ShardLayout(shape, M).span(m)`` of
the flattened full tensor (then padding); the N old shards, laid end to end,
hold those elements in at most a few pieces, which ``slot_pieces`` finds (one
slot per old shard). Optimizer state of a shard's shape is resharded the same
way; scalars (``step``) and buffers, which every rank holds alike, come from
old rank 0. Only the old files that hold a piece of this rank's shards are
read, memory-mapped: a rank reads about ``1/M`` of the checkpoint, not all of it.

The result has the form of a rank file of the new world size (with
``shard_metadata`` for rank ``m`` of ``M`` and no random states, which do not
carry over to another number of ranks), so that loading checks and applies it
as it does a file read from disk: all or nothing.
"""

from __future__ import annotations

from typing import Callable

import torch

from ._layout import FlatSlot, ShardLayout, slot_pieces
from ._metadata import ShardMetadata

__all__ = ["resharded_payload", "shard_keys"]


def _new_shard(old_shard: Callable[[int], torch.Tensor], old: ShardLayout, new: ShardLayout,
               rank: int) -> torch.Tensor:
    """Rank ``rank``'s shard in layout ``new``, from the shards of layout ``old`` (``old_shard(r)``)."""
    start, stop = new.span(rank)
    old_slots = [FlatSlot(r * old.shard_numel, (old.shard_numel,)) for r in range(old.world_size)]
    shard = None
    for r, begin, end in slot_pieces(old_slots, start, stop):
        piece = old_shard(r).reshape(-1)[begin:end]
        if shard is None:
            shard = piece.new_zeros(new.shard_numel)   # the padding stays zero, as ShardLayout.shard makes it
        at = old_slots[r].offset + begin - start
        shard[at:at + end - begin] = piece
    if shard is None:                                  # a rank of padding only
        shard = old_shard(0).new_zeros(new.shard_numel)
    return shard.reshape(new.shard_shape)


def shard_keys(payload: dict, metadata: ShardMetadata) -> dict[tuple, str]:
    """The entries of a rank file that are shards -> the params key whose layout they have.

    An entry is ``("model", key)``, or ``("optimizer", "state", index, name)``
    for optimizer state of its parameter's shard shape (``step`` and other
    scalars are not shards).
    """
    keys: dict[tuple, str] = {("model", k): k for k in metadata.params}
    optimizer = payload.get("optimizer")
    if optimizer is not None:
        for group, names in zip(optimizer["param_groups"], payload["optimizer_param_names"]):
            for index, key in zip(group["params"], names):
                shard_shape = metadata.params[key].layout.shard_shape
                for name, value in optimizer["state"].get(index, {}).items():
                    if isinstance(value, torch.Tensor) and tuple(value.shape) == shard_shape:
                        keys[("optimizer", "state", index, name)] = key
    return keys


def resharded_payload(old: Callable[[int], dict], metadata: ShardMetadata, rank: int, world_size: int) -> dict:
    """Rank ``rank`` of ``world_size``'s payload, from the old ranks' payloads ``old(r)`` (read and checked).

    Every old payload is an ``xla_fsdp`` rank file whose shard metadata agrees
    with old rank 0's, ``metadata`` (the caller checks that as it reads them).
    """
    first = old(0)
    new_metadata = metadata.at(world_size, rank)

    def reshard(key: str, old_shard: Callable[[int], torch.Tensor]) -> torch.Tensor:
        return _new_shard(old_shard, metadata.params[key].layout, new_metadata.params[key].layout, rank)

    model = dict(first["model"])           # buffers: rank 0's, as every rank holds them
    for key in metadata.params:
        model[key] = reshard(key, lambda r, key=key: old(r)["model"][key])
    optimizer = first.get("optimizer")
    if optimizer is not None:
        keys = shard_keys(first, metadata)
        state: dict = {}
        for index, entries in optimizer["state"].items():
            state[index] = {}
            for name, value in entries.items():
                key = keys.get(("optimizer", "state", index, name))
                state[index][name] = value if key is None else reshard(
                    key, lambda r, index=index, name=name: old(r)["optimizer"]["state"][index][name])
        optimizer = {"state": {i: s for i, s in state.items() if s}, "param_groups": optimizer["param_groups"]}
    return {**first, "model": model, "optimizer": optimizer, "shard_metadata": new_metadata.to_dict(), "rng": None}
