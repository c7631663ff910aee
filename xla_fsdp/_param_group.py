"""The parameters one FSDP unit owns: their shards, and the all-gather and
reduce-scatter that move between shards and full parameters.

[Note: FSDP tensors]
* ``ShardedParam.param`` is the ``nn.Parameter`` the optimizer sees: this
  rank's shard, in the layout of ``ShardedParam.layout`` (1-D, or N-D when
  sharded on dim 0; zero padding at the end of the last rank's shard). Its
  dtype is the original parameter's (the fp32 "master" copy under mixed
  precision).
* A *full* tensor is one original parameter's all-gathered value in the
  compute dtype, with the original shape. The all-gather returns one per
  original parameter, even when several share a flat shard. Full tensors
  exist only while the unit computes; they are never module parameters, and
  no reference to them survives a step (a live reference would make
  ``torch_xla.sync()`` materialise it as persistent device memory). They are
  set as plain attributes on the submodules that own them for the duration of
  a forward (and of a backward that recomputes).

One all-gather moves every shard of a unit: the shards are flattened and
concatenated into a (S,) buffer, gathered to (world_size, S), and each shard's
padded flat value is its column block. The reduce-scatter is the mirror image,
split into column buckets of at most ``reduce_scatter_bucket_size_mb``.

[Note: one full tensor per original parameter]
The full tensors are split out of the gathered buffer inside the all-gather's
autograd Function, so autograd sees one output per original parameter and its
backward receives one gradient per original parameter, which the
reduce-scatter concatenates once. Slicing a flat full tensor *outside* the
Function instead would make autograd build each parameter's gradient as a
zero-padded copy of the whole flat tensor and add them all up: k parameters
cost k passes over the unit's gradient, which measured as the largest single
cost of a ViT step on CPU (``benchmarks/fsdp_bench.py``). The pieces are made
with ``split_with_sizes_copy`` and ``view_copy``: each full tensor is its own
base (not a view), which is what the saved-tensor hooks of resharding look up
(see [Note: resharding after forward]), and the copy variants are cheaper to
trace than views under torch_xla's functionalization.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn

from ._collectives import ShardingGroup, optimization_barrier
from ._layout import ShardLayout


@dataclass
class OriginalParam:
    """One parameter of the wrapped module, and where it sits in its full tensor."""

    name: str
    """Name relative to the wrapped module, e.g. ``"0.weight"``."""
    shape: tuple[int, ...]
    offset: int
    """Start of this parameter in the flat full tensor (0 when not flattened)."""
    slots: list[tuple[nn.Module, str]]
    """(module, attribute) pairs that use it; more than one for a tied parameter."""
    aliases: list[str] = field(default_factory=list)
    """Other names of a tied parameter (their modules share this parameter object)."""

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


@dataclass
class ShardedParam:
    """A local shard and the original parameters it holds. See [Note: FSDP tensors]."""

    name: str
    """Attribute name under which ``param`` is registered on the FSDP unit."""
    param: nn.Parameter
    layout: ShardLayout
    originals: list[OriginalParam]


def _shard_name(flatten: bool, index: int, original: str) -> str:
    return f"flat_param_{index}" if flatten else "_fsdp_shard__" + original.replace(".", "__")


class ParamGroup:
    """All sharded parameters of one FSDP unit.

    Built from the parameters of ``module`` that are not inside a nested FSDP
    unit (``ignored`` holds those). The original ``nn.Parameter`` objects are
    removed from their modules; the shards take their place in the unit.
    """

    def __init__(self, module: nn.Module, ignored: set[int], group: ShardingGroup, *,
                 flatten: bool, shard_on_dim_0: bool, device: torch.device):
        self.group = group
        self.sharded: list[ShardedParam] = []

        # Collect (name, parameter, slots) once per parameter object, in module order.
        owned: dict[int, OriginalParam] = {}
        tensors: dict[int, nn.Parameter] = {}
        for mod_name, mod in module.named_modules(remove_duplicate=False):
            if id(mod) in ignored:
                continue
            # Registration order, kept for the unwrapped model's parameter order
            # (see ``_state_dict._unwrapped_order``) once the parameters are removed.
            mod._xla_fsdp_param_attrs = [a for a, p in mod._parameters.items() if p is not None]
            for attr, p in list(mod._parameters.items()):
                if p is None:
                    continue
                name = f"{mod_name}.{attr}" if mod_name else attr
                if id(p) in owned:
                    info = owned[id(p)]
                    if (mod, attr) not in [(m, a) for m, a in info.slots]:
                        info.slots.append((mod, attr))
                        info.aliases.append(name)
                    continue
                if not p.is_floating_point():
                    raise TypeError(
                        f"FSDP shards floating-point parameters only; parameter '{name}' has dtype "
                        f"{p.dtype}")
                owner = getattr(p, "_xla_fsdp_owned", False)
                if owner:
                    raise ValueError(
                        f"parameter '{name}' is already managed by a nested FSDP unit (it is tied to a "
                        "parameter inside that unit); tied parameters must be owned by one unit: wrap "
                        "a module that contains every use of them")
                owned[id(p)] = OriginalParam(name, tuple(p.shape), 0, [(mod, attr)])
                tensors[id(p)] = p

        # Group into shards: one per parameter, or one flat tensor per
        # (dtype, requires_grad) when flattening, since a flat tensor has one
        # dtype and is either trained or frozen as a whole.
        buckets: dict[tuple, list[int]] = {}
        for pid in owned:
            p = tensors[pid]
            key = (p.dtype, p.requires_grad) if flatten else (pid,)
            buckets.setdefault(key, []).append(pid)

        for index, pids in enumerate(buckets.values()):
            first = tensors[pids[0]]
            with torch.no_grad():
                if flatten:
                    offset = 0
                    for pid in pids:
                        owned[pid].offset = offset
                        offset += owned[pid].numel
                    full = torch.cat([tensors[pid].detach().reshape(-1) for pid in pids]) if pids else None
                    layout = ShardLayout((offset,), group.world_size)
                else:
                    full = first.detach()
                    layout = ShardLayout(first.shape, group.world_size, shard_on_dim_0)
                shard = layout.shard(full, group.rank).to(device)
            name = _shard_name(flatten, index, owned[pids[0]].name)
            param = nn.Parameter(shard, requires_grad=first.requires_grad)
            self.sharded.append(ShardedParam(name, param, layout, [owned[pid] for pid in pids]))

        # Detach the originals from their modules; forward sets views of the full tensors instead.
        for pid, info in owned.items():
            tensors[pid]._xla_fsdp_owned = True
            for mod, attr in info.slots:
                del mod._parameters[attr]

    # ----------------------------------------------------------------- layout
    def originals(self) -> Iterator[tuple[ShardedParam, OriginalParam]]:
        for sp in self.sharded:
            for op in sp.originals:
                yield sp, op

    @property
    def _column_offsets(self) -> list[int]:
        offsets, total = [], 0
        for sp in self.sharded:
            offsets.append(total)
            total += sp.layout.shard_numel
        return offsets + [total]

    # -------------------------------------------------------------- all-gather
    def all_gather(self, shards: Sequence[torch.Tensor], compute_dtype: Optional[torch.dtype],
                   channel_id: int, barrier: bool) -> list[torch.Tensor]:
        """Local shards -> one full tensor per original parameter, in one collective.

        See [Note: FSDP tensors] and [Note: one full tensor per original parameter].
        """
        flat = [s.reshape(-1) if compute_dtype is None else s.reshape(-1).to(compute_dtype) for s in shards]
        buffer = flat[0] if len(flat) == 1 else torch.cat(flat)
        if barrier:
            buffer = buffer.clone()
            optimization_barrier([buffer])
        gathered = self.group.all_gather(buffer, channel_id)
        if len(self.sharded) == 1:
            padded = [gathered]
        else:
            offs = self._column_offsets
            matrix = gathered.view(self.group.world_size, offs[-1])
            padded = [matrix[:, offs[i]:offs[i + 1]].reshape(-1) for i in range(len(self.sharded))]
        fulls: list[torch.Tensor] = []
        for sp, p in zip(self.sharded, padded):
            sizes = [op.numel for op in sp.originals] + ([sp.layout.padding] if sp.layout.padding else [])
            pieces = torch.split_with_sizes_copy(p, sizes)
            fulls += [torch.ops.aten.view_copy(piece, op.shape) for piece, op in zip(pieces, sp.originals)]
        return fulls

    # ---------------------------------------------------------- reduce-scatter
    def reduce_scatter(self, full_grads: Sequence[Optional[torch.Tensor]], *, reduce_dtype: Optional[torch.dtype],
                       bucket_bytes: int, channel_id: int, barrier: bool) -> list[Optional[torch.Tensor]]:
        """Gradients of the original parameters -> this rank's shard of their mean over ranks.

        ``full_grads`` has one entry per original parameter, in ``originals()``
        order (``None`` where it got no gradient). Returns one entry per shard,
        cast to the shard's dtype; ``None`` for a shard none of whose
        parameters got a gradient, or that is frozen.
        """
        world = self.group.world_size
        columns, live = [], []
        start = 0
        for i, sp in enumerate(self.sharded):
            grads = full_grads[start:start + len(sp.originals)]
            start += len(sp.originals)
            if not sp.param.requires_grad or all(g is None for g in grads):
                continue
            like = next(g for g in grads if g is not None)
            parts = [g.reshape(-1) if g is not None else like.new_zeros(op.numel)
                     for g, op in zip(grads, sp.originals)]
            if sp.layout.padding:
                parts.append(like.new_zeros(sp.layout.padding))
            flat = parts[0] if len(parts) == 1 else torch.cat(parts)
            if reduce_dtype is not None:
                flat = flat.to(reduce_dtype)
            columns.append(flat.view(world, -1))
            live.append(i)
        if not live:
            return [None] * len(self.sharded)
        matrix = columns[0] if len(columns) == 1 else torch.cat(columns, dim=1)
        if barrier:
            optimization_barrier([matrix])
        total = matrix.shape[1]
        step = total if bucket_bytes <= 0 else max(1, bucket_bytes // (world * matrix.element_size()))
        reduced = []
        for begin in range(0, total, step):
            block = matrix[:, begin:begin + step]
            reduced.append(self.group.reduce_scatter_mean(block.reshape(-1), channel_id))
        local = reduced[0] if len(reduced) == 1 else torch.cat(reduced)
        out: list[Optional[torch.Tensor]] = [None] * len(self.sharded)
        begin = 0
        for i in live:
            sp = self.sharded[i]
            n = sp.layout.shard_numel
            out[i] = local[begin:begin + n].view(sp.layout.shard_shape).to(sp.param.dtype)
            begin += n
        return out

    # ------------------------------------------------------------ module views
    def install(self, fulls: Sequence[torch.Tensor]) -> None:
        """Set each original parameter's full tensor on the modules that use it.

        ``fulls`` has one tensor per original parameter, in ``originals()``
        order. Written to the instance ``__dict__``, which is what
        ``nn.Module.__setattr__`` does for a plain tensor, without its checks
        (this runs for every parameter of every unit, twice a step).
        """
        for (_, op), full in zip(self.originals(), fulls):
            for mod, attr in op.slots:
                mod.__dict__[attr] = full

    def uninstall(self) -> None:
        """Drop the module attributes so no reference to a full tensor survives."""
        for _, op in self.originals():
            for mod, attr in op.slots:
                mod.__dict__.pop(attr, None)
