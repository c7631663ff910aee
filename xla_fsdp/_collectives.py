"""The sharding group and the three collectives FSDP needs on it.

[Note: collectives on CPU XLA devices]
Several CPU XLA devices in one process can run a collective only if every
participant launches an identical op (see ``shared/PLATFORM.md``). Each call
here therefore:

* passes an explicit ``channel_id`` with ``use_global_device_ids=True`` and
  explicit replica groups, so that ranks meet by channel id rather than by the
  unique id of the module each compiled for itself. The id is a constant of the
  FSDP unit and the op (never of the rank or the step; the plan is
  [Note: channel ids] in ``_channels.py``), so the step graph is
  the same on every rank and across steps, and compiles once;
* never bakes the rank into the graph, and so never pins layouts across
  devices, on CPU or TPU (see [Note: collectives on TPU]);
* gives XLA replica groups that partition every device of the process, as its
  HLO verifier requires in global-device-id mode. Devices outside this run
  (say ranks 4-7 of an 8-device process running a world of 4) form groups of
  their own that never execute.

[Note: collectives on TPU]
The TPU path runs exactly the collectives the CPU tests run: unpinned layouts,
explicit channel ids with global device ids, replica groups that tile the
devices. ``pin_layout_in_collective_ops`` is accepted (torch_xla's default is
True) and has no effect across devices. Why, from torch_xla 2.9's
``xla_model.py``: a pinned ``xm.all_gather`` is not an all-gather. It zero-pads
the shard to the full size with the rank's offset as a constant and all-reduces
it with ``all_reduce``'s defaults, dropping ``channel_id`` and
``use_global_device_ids``. That costs, per gather of n elements per rank over W
ranks: an all-reduce of W*n elements instead of an all-gather, about twice the
bytes on the wire (2(W-1)n against (W-1)n per rank for a ring), a full-size
padded temporary, and a different program on every rank. On two CPU devices
here it aborts after XLA's 10 s rendezvous timeout (the two ranks' all-reduces
get op ids 0 and 1). torch_xla's own FSDP defaults to pinning but its ImageNet
and MNIST FSDP tests run unpinned unless asked, and its FSDP notes that pinning
all three collectives together is not supported yet. A pinned
``xm.reduce_scatter`` does keep the channel id and ran correctly on two CPU
devices (tests/test_tpu_collectives.py), but pinning it alone buys nothing the
unpinned one lacks here and would keep gradients in the token chain (next
note). What unpinned layouts give up: XLA's guard against two processes
compiling the same collective with different operand layouts, which can only
happen if they compile different programs; every rank traces the same step
graph, so on a pod every process compiles the same program. Parameter aliasing
(``XLA_ENABLE_PARAM_ALIASING=1``, on by default on TPU) is tested at world size
1 (training matches the unsharded reference, and the compiled steps do alias
buffers); at world size 2 on CPU devices it aborts in the first all-gather's
rendezvous (shared/PLATFORM.md, point 4), so the CPU helper turns it off and
aliasing across devices is first run on a TPU.

[Note: the collective token]
torch_xla chains its collectives through a numeric token: it adds a device
scalar 0.0 to every collective's input. Where that input is made by an
elementwise op or a concatenation, XLA fuses the add into it; where it comes
straight from a matmul (the gradient of an unflattened parameter), the add is
one more read and write of the whole gradient before the reduce-scatter. The
only reduce-scatter torch_xla builds without a token,
``_xla_spmd_reduce_scatter``, takes no channel id (it gives every call channel
1, which FSDP units leave free) and does not pin its layout, so
``reduce_scatter_mean(..., tokened=False)`` uses it only when layout pinning is
off (always on CPU devices), and only for a unit built with
``untokened_reduce_scatter=True``. That option is a promise that every rank
traces the same backward: the untokened reduce-scatters share one channel id
and are ordered by nothing but XLA's schedule, so on ranks whose graphs differ
(a parameter that one rank uses and another zero-fills) they can meet the
wrong partner or none. Tokened collectives run in trace order on every rank. All-gathers keep the token, and so does a
reduce-scatter fed by a concatenation: there the add costs no pass, and the
chain keeps XLA from postponing the reduce-scatters (the README's benchmark
section gives the measured effect of both choices).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch_xla.core.xla_model as xm
import torch_xla.runtime as xr

from . import _collective_check
from . import _torch_xla_private as _private
from ._channels import GRAD_NORM, UNTOKENED_REDUCE_SCATTER


def default_rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the default sharding group: the runtime's ordinal and world size.

    The one source of both for the whole package. On a TPU they come from the
    runtime; under ``xla_fsdp.testing.run_on_cpu_devices`` the helper makes
    ``xr.global_ordinal()`` and ``xr.world_size()`` answer for the calling
    device thread, so the same code runs unchanged.
    """
    return xr.global_ordinal(), xr.world_size()


def _num_replication_devices() -> int:
    return max(1, xr.global_runtime_device_count())


def _complete_replica_groups(groups: Sequence[Sequence[int]]) -> list[list[int]]:
    """Add groups of the same size for devices that no group names."""
    size = len(groups[0])
    named = {d for g in groups for d in g}
    rest = [d for d in range(_num_replication_devices()) if d not in named]
    if len(rest) % size:
        raise ValueError(
            f"sharding groups of size {size} cannot tile the {_num_replication_devices()} devices of "
            f"this process: {len(rest)} devices are in no group")
    return [list(g) for g in groups] + [rest[i:i + size] for i in range(0, len(rest), size)]


@dataclass(frozen=True)
class ShardingGroup:
    """The ranks one FSDP unit shards over, and how collectives reach them."""

    rank: int
    """This rank's index within its group: which shard it holds."""
    world_size: int
    """Ranks per group: how many shards each tensor is split into."""
    replica_groups: tuple[tuple[int, ...], ...]
    """All groups of the job, as global device ids (see [Note: collectives on CPU XLA devices])."""
    pin_layout: bool
    """Whether collectives pin their layout: never across devices (see [Note: collectives on TPU])."""

    @staticmethod
    def create(sharding_groups: Optional[Sequence[Sequence[int]]] = None,
               sharding_rank: Optional[int] = None,
               sharding_world_size: Optional[int] = None,
               pin_layout: bool = True) -> "ShardingGroup":
        given = [sharding_groups is not None, sharding_rank is not None, sharding_world_size is not None]
        if any(given) and not all(given):
            raise ValueError(
                "sharding_groups, sharding_rank and sharding_world_size must be given together; got "
                f"sharding_groups={sharding_groups}, sharding_rank={sharding_rank}, "
                f"sharding_world_size={sharding_world_size}")
        if sharding_groups is None:
            rank, world_size = default_rank_and_world_size()
            groups = [list(range(world_size))]
        else:
            rank, world_size = sharding_rank, sharding_world_size
            groups = [list(g) for g in sharding_groups]
            if not groups or any(len(g) != world_size for g in groups):
                raise ValueError(
                    f"every sharding group must have sharding_world_size={world_size} ranks, got "
                    f"sharding_groups={groups}")
            flat = [d for g in groups for d in g]
            if len(set(flat)) != len(flat):
                raise ValueError(f"a rank appears in more than one sharding group: {groups}")
            # The shard a rank holds must be its place in its group: a permuted
            # sharding_rank would gather the shards in the wrong order.
            device = xr.global_ordinal()
            mine = [g for g in groups if device in g]
            if not mine or mine[0].index(device) != rank:
                place = f"position {mine[0].index(device)} of group {mine[0]}" if mine else "in no group"
                raise ValueError(
                    f"sharding_rank={rank} does not match this device's place in sharding_groups={groups}: "
                    f"device {device} is {place}")
        if not 0 <= rank < world_size:
            raise ValueError(f"sharding rank {rank} is outside [0, {world_size})")
        if world_size > 1:
            groups = _complete_replica_groups(groups)
            pin_layout = False  # on every device type: see [Note: collectives on TPU]
        return ShardingGroup(rank, world_size, tuple(tuple(g) for g in groups), pin_layout)

    def _record(self, op: str, tensor: torch.Tensor, channel_id: int, issuer: str) -> None:
        """Log the collective for the check across ranks ([Note: the collective check] in ``_collective_check.py``)."""
        _collective_check.record(str(tensor.device), op, issuer, channel_id, tensor.shape, tensor.dtype,
                                 self.replica_groups)

    def all_gather(self, flat: torch.Tensor, channel_id: int, issuer: str) -> torch.Tensor:
        """1-D tensor of n elements on each rank -> the (world_size * n,) concatenation in rank order.

        ``issuer`` names who asks, for the collective check's messages.
        """
        if self.world_size == 1:
            return flat
        self._record("all-gather", flat, channel_id, issuer)
        return xm.all_gather(flat, 0, groups=[list(g) for g in self.replica_groups],
                             pin_layout=self.pin_layout, channel_id=channel_id,
                             use_global_device_ids=True)

    def reduce_scatter_mean(self, flat: torch.Tensor, channel_id: int, issuer: str,
                            tokened: bool = True) -> torch.Tensor:
        """(world_size * n,) on each rank -> this rank's n-slice of the mean over ranks.

        ``tokened=False`` leaves the op out of torch_xla's token chain where the
        layout is not pinned; see [Note: the collective token].
        """
        if self.world_size == 1:
            return flat
        untokened = not tokened and not self.pin_layout
        self._record("reduce-scatter", flat, UNTOKENED_REDUCE_SCATTER if untokened else channel_id, issuer)
        if untokened:
            # Takes no channel id; it always uses UNTOKENED_REDUCE_SCATTER ([Note: channel ids]).
            return _private.untokened_reduce_scatter(flat, 1.0 / self.world_size, self.world_size,
                                                     [list(g) for g in self.replica_groups])
        return xm.reduce_scatter(xm.REDUCE_SUM, flat, 1.0 / self.world_size, 0, self.world_size,
                                 groups=[list(g) for g in self.replica_groups],
                                 pin_layout=self.pin_layout, channel_id=channel_id,
                                 use_global_device_ids=True)

    def all_reduce_scalar(self, value: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or max) of a scalar over the group.

        Built from an all-gather, which takes a channel id (``xm.all_reduce``
        does not), and reduced in rank order, so every rank gets the same bits.
        """
        gathered = self.all_gather(value.reshape(1), GRAD_NORM, "clip_grad_norm_")
        return gathered.max() if op == "max" else gathered.sum()


def optimization_barrier(tensors: Sequence[torch.Tensor]) -> None:
    """Keep XLA from fusing, moving or merging computation across these tensors (in place)."""
    tensors = [t for t in tensors if isinstance(t, torch.Tensor) and t.device.type == "xla"]
    if tensors:
        xm.optimization_barrier_(tensors)
