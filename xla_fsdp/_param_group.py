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

[Note: placeholders between computes]
Between computes each original parameter's attribute (``block.fc1.weight``)
is an empty tensor, shape ``(0,)``, of the parameter's dtype on the device
the unit computes on, shared by the unit's parameters of that dtype. Model
code reads parameters outside their unit's forward: Hugging Face's ViT casts
its input to ``embeddings.patch_embeddings.projection.weight.dtype`` in the
enclosing model's forward, before the embeddings unit gathers its weights.
torch_xla's FSDP leaves a one-element placeholder of the compute dtype for the
same reason. Holding no data, it keeps the promise above; computing with it
fails on its shape. ``checkpoint.py`` tells placeholders (marked
``_xla_fsdp_placeholder``) from full tensors.

[Note: collectives of a unit]
With ``flatten_parameters=True`` a unit has one flat shard per (dtype,
requires_grad), usually one, and one all-gather moves all of them: the shards
are concatenated into a (S,) buffer, gathered to (world_size, S), and each
shard's padded flat value is its column block. Without flattening, each
parameter has its own all-gather and reduce-scatter, as in torch_xla's FSDP
and the JAX reference: concatenating unflattened shards into one collective
needs a column copy of every gathered parameter and of every gradient, which
measured slower and with a higher peak than the extra collectives on the
benchmark's MLP (see the README's benchmark section). The reduce-scatter mirrors the all-gather, each collective
split further into column buckets of at most ``reduce_scatter_bucket_size_mb``.
Collective k of a unit's op uses channel id ``unit_channel(unit, op, k)``
(see [Note: channel ids] in ``_channels.py``).

[Note: one full tensor per original parameter]
The full tensors are split out of the gathered buffer inside the all-gather's
autograd Function, so autograd sees one output per original parameter and its
backward receives one gradient per original parameter, which the
reduce-scatter concatenates once. Slicing a flat full tensor *outside* the
Function instead would make autograd build each parameter's gradient as a
zero-padded copy of the whole flat tensor and add them all up: k parameters
cost k passes over the unit's gradient, which measured as the largest single
cost of a ViT step on CPU in ``benchmarks/fsdp_bench.py``. The pieces are made
with ``split_with_sizes_copy`` and ``view_copy``: each full tensor is its own
base (not a view), which is what the saved-tensor hooks of resharding look up
(see [Note: resharding after forward]), and the copy variants are cheaper to
trace than views under torch_xla's functionalization.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch_xla

from ._channels import MAX_COLLECTIVES_PER_OP
from ._collectives import ShardingGroup, optimization_barrier
from ._layout import ShardLayout, flat_slots


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


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    # A reshape is a traced op even when it changes nothing; skip it for 1-D tensors.
    return tensor if tensor.dim() == 1 else tensor.reshape(-1)


def _shard_name(flatten: bool, index: int, original: str) -> str:
    return f"flat_param_{index}" if flatten else "_fsdp_shard__" + original.replace(".", "__")


class ParamGroup:
    """All sharded parameters of one FSDP unit.

    Built from the parameters of ``module`` that are not inside a nested FSDP
    unit (``nested_module_ids`` holds the ids of those units' modules). The original ``nn.Parameter`` objects are
    removed from their modules; the shards take their place in the unit.
    """

    def __init__(self, module: nn.Module, nested_module_ids: set[int], group: ShardingGroup, *,
                 flatten: bool, shard_on_dim_0: bool, device: torch.device, coalesce_all_gather: bool = False):
        self.group = group
        self.name = "FSDP unit"
        """Who issues the unit's collectives, for the collective check: the root names it with its module path."""
        self.device = torch_xla.device()
        """Where the unit computes (the shards live on ``device``, which is the host under CPU offload)."""
        self.sharded: list[ShardedParam] = []
        self.installed: Optional[list[torch.Tensor]] = None
        """The full tensors set on the modules, one per original parameter, while the unit computes."""

        # Collect (name, parameter, slots) once per parameter object, in module order.
        owned: dict[int, OriginalParam] = {}
        tensors: dict[int, nn.Parameter] = {}
        for mod_name, mod in module.named_modules(remove_duplicate=False):
            if id(mod) in nested_module_ids:
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
                    slots = flat_slots([owned[pid].shape for pid in pids])
                    for pid, slot in zip(pids, slots):
                        owned[pid].offset = slot.offset
                    full = torch.cat([tensors[pid].detach().reshape(-1) for pid in pids]) if pids else None
                    layout = ShardLayout((sum(slot.numel for slot in slots),), group.world_size)
                else:
                    full = first.detach()
                    layout = ShardLayout(first.shape, group.world_size, shard_on_dim_0)
                if device.type == "cpu" and full is not None and full.device.type != "cpu":
                    full = full.cpu()  # a transfer only: never a device computation mid-construction
                shard = layout.shard(full, group.rank).to(device)
            name = _shard_name(flatten, index, owned[pids[0]].name)
            param = nn.Parameter(shard, requires_grad=first.requires_grad)
            self.sharded.append(ShardedParam(name, param, layout, [owned[pid] for pid in pids]))

        # Detach the originals from their modules; forward sets their full tensors instead,
        # and a placeholder stands in between computes ([Note: placeholders between computes]).
        self._placeholders: dict[tuple[nn.Module, str], torch.Tensor] = {}
        empty: dict[torch.dtype, torch.Tensor] = {}
        for pid, info in owned.items():
            tensors[pid]._xla_fsdp_owned = True
            dtype = tensors[pid].dtype
            if dtype not in empty:
                empty[dtype] = torch.empty(0, dtype=dtype).to(self.device)  # a transfer: no graph
                empty[dtype]._xla_fsdp_placeholder = True
            for mod, attr in info.slots:
                del mod._parameters[attr]
                mod.__dict__[attr] = self._placeholders[(mod, attr)] = empty[dtype]

        # Worked out once: the hot path runs for every unit, twice a step.
        self.buckets = [list(range(len(self.sharded)))] if flatten else [[i] for i in range(len(self.sharded))]
        """Shard indices that share one reduce-scatter; see [Note: collectives of a unit]."""
        self.gather_buckets = [list(range(len(self.sharded)))] if coalesce_all_gather else self.buckets
        """Shard indices that share one all-gather: all of them with ``coalesce_all_gather_ops``."""
        if len(self.buckets) > MAX_COLLECTIVES_PER_OP:
            raise ValueError(
                f"an FSDP unit with flatten_parameters=False has {len(self.buckets)} parameters (first: "
                f"'{self.sharded[0].originals[0].name}'), and each needs its own collectives; at most "
                f"{MAX_COLLECTIVES_PER_OP} are supported: wrap submodules in nested units or flatten")
        self._column_offsets = []
        for bucket in self.gather_buckets:
            offsets = [0]
            for i in bucket:
                offsets.append(offsets[-1] + self.sharded[i].layout.shard_numel)
            self._column_offsets.append(offsets)
        self._split_sizes = [[orig.numel for orig in sp.originals] + ([sp.layout.padding] if sp.layout.padding else [])
                             for sp in self.sharded]

    # ----------------------------------------------------------------- layout
    def originals(self) -> Iterator[tuple[ShardedParam, OriginalParam]]:
        for sp in self.sharded:
            for orig in sp.originals:
                yield sp, orig

    def frozen(self) -> list[bool]:
        """Per original parameter, in ``originals()`` order: whether its shard is frozen now.

        Read at every all-gather, so that freezing or unfreezing a shard after
        wrapping (``requires_grad_``) takes effect at the next forward.
        """
        return [not sp.param.requires_grad for sp, _ in self.originals()]

    # -------------------------------------------------------------- all-gather
    def all_gather(self, shards: Sequence[torch.Tensor], compute_dtype: Optional[torch.dtype],
                   channel_id: int, barrier: bool) -> list[torch.Tensor]:
        """Local shards -> one full tensor per original parameter, one collective per bucket.

        Bucket ``b`` uses channel ``channel_id + b``. See [Note: FSDP tensors],
        [Note: one full tensor per original parameter] and [Note: collectives of a unit].
        """
        buffers = []
        for bucket in self.gather_buckets:
            flat = [_flat(shards[i]) if compute_dtype is None else _flat(shards[i]).to(compute_dtype) for i in bucket]
            buffer = flat[0] if len(flat) == 1 else torch.cat(flat)
            shard = shards[bucket[0]]
            if (buffer is shard or buffer._base is shard) and (barrier or self.group.world_size == 1):
                # Never the shard itself: the barrier works in place, and on one
                # device the "gathered" tensor is the buffer.
                buffer = buffer.clone()
            buffers.append(buffer)
        if barrier:
            optimization_barrier(buffers)
        padded: list[torch.Tensor] = [None] * len(self.sharded)  # type: ignore[list-item]
        for b, (bucket, buffer, offs) in enumerate(zip(self.gather_buckets, buffers, self._column_offsets)):
            gathered = self.group.all_gather(buffer, channel_id + b, self.name)
            if len(bucket) == 1:
                padded[bucket[0]] = gathered
            else:
                matrix = gathered.view(self.group.world_size, offs[-1])
                for j, i in enumerate(bucket):
                    padded[i] = matrix[:, offs[j]:offs[j + 1]].reshape(-1)
        fulls: list[torch.Tensor] = []
        for sp, sizes, p in zip(self.sharded, self._split_sizes, padded):
            pieces = torch.split_with_sizes_copy(p, sizes) if len(sizes) > 1 else [p]
            for piece, orig in zip(pieces, sp.originals):
                fulls.append(piece if len(orig.shape) == 1 else torch.ops.aten.view_copy(piece, orig.shape))
        return fulls

    # ---------------------------------------------------------- reduce-scatter
    def reduce_scatter(self, full_grads: Sequence[Optional[torch.Tensor]], *, compute_dtype: Optional[torch.dtype],
                       reduce_dtype: Optional[torch.dtype], untokened_allowed: bool, bucket_bytes: int,
                       channel_id: int, barrier: bool,
                       grad_dtypes: Optional[Sequence[torch.dtype]] = None) -> list[Optional[torch.Tensor]]:
        """Gradients of the original parameters -> this rank's shard of their mean over ranks.

        ``full_grads`` has one entry per original parameter, in ``originals()``
        order (``None`` where it got no gradient). Returns one entry per shard,
        cast to the shard's dtype (or to ``grad_dtypes[i]``), ``None`` for a
        frozen shard. A trainable
        parameter that got no gradient on this rank contributes zeros: another
        rank may have used it (a branch, an expert), and every rank must issue
        the same collectives. Collectives use channels ``channel_id``,
        ``channel_id + 1``, ... in order. ``untokened_allowed``: the
        ``untokened_reduce_scatter`` promise ([Note: the collective token]).
        """
        world = self.group.world_size
        flats: list[Optional[torch.Tensor]] = [None] * len(self.sharded)
        untouched: set[int] = set()  # shards whose flat gradient is one tensor, not a cat or cast of several
        start = 0
        for i, sp in enumerate(self.sharded):
            grads = full_grads[start:start + len(sp.originals)]
            start += len(sp.originals)
            if not sp.param.requires_grad:
                continue
            zeros = functools.partial(torch.zeros, dtype=compute_dtype or sp.param.dtype, device=self.device)
            parts = [_flat(g) if g is not None else zeros(orig.numel) for g, orig in zip(grads, sp.originals)]
            if sp.layout.padding:
                parts.append(zeros(sp.layout.padding))
            flat = parts[0] if len(parts) == 1 else torch.cat(parts)
            if reduce_dtype is None or flat.dtype == reduce_dtype:
                # Decided by the layout alone, never by whether this rank got a
                # gradient: every rank must pick the same collective.
                if len(parts) == 1:
                    untouched.add(i)
            else:
                flat = flat.to(reduce_dtype)
            flats[i] = flat
        # One (world, columns) matrix per bucket, row r what rank r keeps; a
        # single shard's flat gradient is that matrix already, row by row.
        matrices, shards_of_matrix = [], []
        for bucket in self.buckets:
            with_grad = [i for i in bucket if flats[i] is not None]
            if len(with_grad) == 1:
                matrices.append(flats[with_grad[0]])  # its own (world * columns,) layout: no views to trace
                shards_of_matrix.append(with_grad)
            elif with_grad:
                matrices.append(torch.cat([flats[i].view(world, -1) for i in with_grad], dim=1))
                shards_of_matrix.append(with_grad)
        if barrier and matrices:
            optimization_barrier(matrices)
        out: list[Optional[torch.Tensor]] = [None] * len(self.sharded)
        channel = channel_id
        for matrix, shard_ids in zip(matrices, shards_of_matrix):
            total_columns = matrix.numel() // world
            columns_per_collective = (total_columns if bucket_bytes <= 0
                                      else max(1, bucket_bytes // (world * matrix.element_size())))
            split = columns_per_collective < total_columns
            if split:
                matrix = matrix.view(world, total_columns)
            if channel - channel_id + math.ceil(total_columns / columns_per_collective) > MAX_COLLECTIVES_PER_OP:
                raise ValueError(
                    f"reduce-scatter buckets of {bucket_bytes} bytes (reduce_scatter_bucket_size_mb) split the "
                    f"gradients of {[self.sharded[i].name for i in shard_ids]} into more than "
                    f"{MAX_COLLECTIVES_PER_OP} reduce-scatters; use a larger bucket")
            # Only an input no op of ours made pays for torch_xla's token; see
            # [Note: the collective token].
            tokened = not untokened_allowed or split or len(shard_ids) > 1 or shard_ids[0] not in untouched
            pieces = []
            for begin in range(0, total_columns, columns_per_collective):
                # The whole (world * columns,) matrix, or a (world, columns) block of it.
                block = matrix[:, begin:begin + columns_per_collective] if split else matrix
                pieces.append(self.group.reduce_scatter_mean(_flat(block), channel, self.name, tokened=tokened))
                channel += 1
            local = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            begin = 0
            for i in shard_ids:
                sp = self.sharded[i]
                n = sp.layout.shard_numel
                shard_grad = local if len(shard_ids) == 1 else local[begin:begin + n]
                if len(sp.layout.shard_shape) > 1:
                    shard_grad = shard_grad.view(sp.layout.shard_shape)
                dtype = sp.param.dtype if grad_dtypes is None else grad_dtypes[i]
                out[i] = shard_grad if shard_grad.dtype == dtype else shard_grad.to(dtype)
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
        for (_, orig), full in zip(self.originals(), fulls):
            for mod, attr in orig.slots:
                mod.__dict__[attr] = full
        self.installed = list(fulls)

    def uninstall(self) -> None:
        """Put the placeholders back, so no reference to a full tensor survives."""
        for (mod, attr), placeholder in self._placeholders.items():
            mod.__dict__[attr] = placeholder
        self.installed = None
