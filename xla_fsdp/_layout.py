"""The shard layout: how one tensor is flattened, padded and split across ranks.

This module is the single definition of the layout. The wrapper, the state dict,
the shard metadata and the consolidation tool all call it; none re-derives it.

[Note: shard layout]
A tensor of shape ``shape`` is sharded over ``world_size`` ranks like this:

* Flat sharding (the default): flatten to 1-D, pad with zeros at the end to
  ``padded_numel = shard_numel * world_size`` where
  ``shard_numel = ceil(numel / world_size)``, and give rank ``r`` the slice
  ``[r * shard_numel, (r + 1) * shard_numel)``. The local shard is 1-D.
* Dim-0 sharding (``shard_param_on_dim_0=True``, tensors with at least one
  dimension): pad dim 0 with zero rows up to ``rows_per_shard * world_size``
  where ``rows_per_shard = ceil(shape[0] / world_size)``, and give rank ``r``
  rows ``[r * rows_per_shard, (r + 1) * rows_per_shard)``. The local shard
  keeps the N-D shape ``(rows_per_shard, *shape[1:])``.

Both layouts are, once flattened, "a contiguous 1-D slice of the zero-padded
flat tensor"; they differ only in how much padding there is. That is what lets
the all-gather and the reduce-scatter treat every shard as a flat vector, and
what lets anyone rebuild the full tensor offline from ``shape``,
``world_size`` and ``shard_on_dim_0`` alone: concatenate the flattened shards
in rank order, drop everything past ``numel``, reshape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["ShardLayout", "FlatSlot", "concat_unpad", "flat_slots", "split_flat", "flat_slot_problem", "slot_pieces"]


@dataclass(frozen=True)
class ShardLayout:
    """Where one tensor's elements live across ranks. See [Note: shard layout]."""

    shape: tuple[int, ...]
    """Shape of the full, unsharded tensor."""
    world_size: int
    """Number of ranks the tensor is split across."""
    shard_on_dim_0: bool = False
    """Split along dim 0 (the shard keeps N-D shape) instead of flat."""

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if any(s < 0 for s in self.shape):
            raise ValueError(f"shape must be non-negative, got {self.shape}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def _dim0(self) -> bool:
        # A 0-d tensor has no dim 0 to split; it falls back to flat sharding.
        return self.shard_on_dim_0 and len(self.shape) >= 1

    @property
    def shard_shape(self) -> tuple[int, ...]:
        if self._dim0:
            return (math.ceil(self.shape[0] / self.world_size), *self.shape[1:])
        return (math.ceil(self.numel / self.world_size),)

    @property
    def shard_numel(self) -> int:
        return math.prod(self.shard_shape)

    @property
    def padded_numel(self) -> int:
        return self.shard_numel * self.world_size

    @property
    def padding(self) -> int:
        return self.padded_numel - self.numel

    def span(self, rank: int) -> tuple[int, int]:
        """The elements ``[start, stop)`` of the flattened full tensor that ``rank``'s shard holds.

        The shard holds them first and padding after: ``stop - start`` is
        ``shard_numel`` except near the end, where it is less (0 for a rank
        that holds padding only).
        """
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside [0, {self.world_size})")
        start = min(rank * self.shard_numel, self.numel)
        return start, min(start + self.shard_numel, self.numel)

    def pad_flat(self, full: torch.Tensor) -> torch.Tensor:
        """Full tensor -> 1-D zero-padded tensor of ``padded_numel`` elements."""
        if tuple(full.shape) != self.shape:
            raise ValueError(f"expected a tensor of shape {self.shape}, got {tuple(full.shape)}")
        flat = full.reshape(-1)
        if self.padding:
            flat = torch.cat([flat, flat.new_zeros(self.padding)])
        return flat

    def shard(self, full: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank ``rank``'s local shard of ``full`` (a new tensor, shape ``shard_shape``)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside [0, {self.world_size})")
        start = rank * self.shard_numel
        return self.pad_flat(full)[start:start + self.shard_numel].reshape(self.shard_shape).clone()

    def unpad(self, padded_flat: torch.Tensor) -> torch.Tensor:
        """1-D padded tensor (all shards in rank order) -> full tensor of ``shape``."""
        if padded_flat.numel() != self.padded_numel:
            raise ValueError(
                f"expected {self.padded_numel} padded elements for shape {self.shape} over "
                f"{self.world_size} ranks, got {padded_flat.numel()}")
        return padded_flat.reshape(-1)[:self.numel].view(self.shape)

    def unshard(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """Rebuild the full tensor from every rank's shard, given in rank order."""
        if len(shards) != self.world_size:
            raise ValueError(f"expected {self.world_size} shards, got {len(shards)}")
        for rank, shard in enumerate(shards):
            if shard.numel() != self.shard_numel:
                raise ValueError(
                    f"shard of rank {rank} has {shard.numel()} elements, expected "
                    f"{self.shard_numel} (shape {self.shard_shape}) for full shape {self.shape} "
                    f"over {self.world_size} ranks")
        return self.unpad(torch.cat([s.reshape(-1) for s in shards]))


def concat_unpad(shards: Sequence[torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """Full tensor of ``shape`` from shards of any size with all padding at the end.

    The unsharding rule of torch_xla's FSDP checkpoints, whose padding amount is
    not ours to assume; for our own shards ``ShardLayout.unshard`` also checks
    the sizes.
    """
    numel = math.prod(shape)
    flat = torch.cat([s.reshape(-1) for s in shards])
    if flat.numel() < numel:
        raise ValueError(f"shards hold {flat.numel()} elements, fewer than the {numel} of shape {tuple(shape)}")
    return flat[:numel].view(tuple(shape))


# [Note: flat layout of several parameters]
# A flattened unit holds several original parameters in one flat tensor: the
# originals are flattened and laid end to end in registration order, with no
# gap between them and no padding inside (the shard layout's padding comes
# after the last one). An original is therefore fully described by its offset
# into the flat tensor and its shape. ``flat_slots`` builds that layout,
# ``split_flat`` undoes it, and ``flat_slot_problem`` checks a layout read from
# a file (overlaps, gaps, out of range) before any data is touched.


@dataclass(frozen=True)
class FlatSlot:
    """Where one original parameter lives in a flat tensor. See [Note: flat layout of several parameters]."""

    offset: int
    """Index of its first element in the flattened full tensor."""
    shape: tuple[int, ...]
    """Its shape in the unwrapped model."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def flat_slots(shapes: Sequence[Sequence[int]]) -> list[FlatSlot]:
    """Lay tensors of ``shapes`` end to end: their slots in one flat tensor."""
    slots, offset = [], 0
    for shape in shapes:
        slot = FlatSlot(offset, tuple(int(s) for s in shape))
        slots.append(slot)
        offset += slot.numel
    return slots


def split_flat(full: torch.Tensor, slots: Sequence[FlatSlot]) -> list[torch.Tensor]:
    """A full flat tensor (any shape, read flattened) -> one view per slot, of the slot's shape."""
    flat = full.reshape(-1)
    return [flat[s.offset:s.offset + s.numel].view(s.shape) for s in slots]


def flat_slot_problem(slots: Sequence[FlatSlot], numel: int) -> str | None:
    """What is wrong with ``slots`` as the layout of a flat tensor of ``numel`` elements, or None.

    A flat tensor holding several originals must be covered exactly, end to
    end; one holding a single original (an unflattened parameter) must start
    at 0 and fill it.
    """
    end = 0
    for i, s in enumerate(sorted(slots, key=lambda s: s.offset)):
        if any(d < 0 for d in s.shape) or s.offset < 0:
            return f"original {i} has offset {s.offset} and shape {list(s.shape)}"
        if s.offset < end:
            return f"originals overlap at element {s.offset} (the previous one ends at {end})"
        if s.offset > end:
            return f"elements {end}..{s.offset - 1} belong to no original (a gap)"
        end = s.offset + s.numel
    if end != numel:
        return f"the originals cover {end} elements but the tensor has {numel}"
    return None


def slot_pieces(slots: Sequence[FlatSlot], start: int, stop: int) -> list[tuple[int, int, int]]:
    """The elements ``[start, stop)`` of a flat tensor, piece by piece: ``(slot index, begin, end)``.

    ``begin:end`` are elements of the slot's flattened tensor; the piece sits at
    ``slots[i].offset + begin - start`` in the range. With the slots of a flat
    parameter's originals this says which part of which original a rank's
    shard (its ``ShardLayout.span``) holds; with one slot per rank's shard, which
    old shards hold a new one's elements when the world size changes.
    """
    pieces = []
    for i, s in enumerate(slots):
        begin, end = max(start, s.offset), min(stop, s.offset + s.numel)
        if begin < end:
            pieces.append((i, begin - s.offset, end - s.offset))
    return pieces
