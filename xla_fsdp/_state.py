"""A unit's per-step state and the autograd machinery around its collectives.

The wrapper (``fully_sharded_data_parallel.py``) decides *when* to gather and
reshard; this module holds *how*: the autograd Function whose forward is the
all-gather and whose backward is the reduce-scatter, the saved-tensor hooks of
resharding, the pre- and post-backward hooks, and the gradients accumulated
under ``no_sync``.

[Note: resharding after forward]
With ``reshard_after_forward=True`` (ZeRO-3), a unit must not keep its full
parameters alive from its forward to its backward. Autograd would keep them:
ops save their weight (or a view of it, such as ``weight.t()``) for backward.
So the forward runs under ``saved_tensors_hooks`` that store, instead of any
view of a full tensor, a reference to "view k of the full tensor" plus the view
function (``Tensor._view_func``) that rebuilds it. In backward the first
unpack (or the hook on the unit's output gradient, whichever comes first)
all-gathers the shards again, and each saved view is replayed on the new full
tensor. The backward graph thus uses its own all-gather, and XLA can free the
forward's full parameters as soon as the forward is done with them. The hook
on the output gradient also sets the re-gathered parameters on the submodules,
so that a checkpointed block (``checkpoint_module``) recomputes with them.

[Note: CPU offload]
With ``cpu_offload=True`` the shards that the optimizer steps are host
tensors, so their gradients and the optimizer state live on the host too. A
forward uploads the unit's shards (in ``compute_dtype``) as device tensors that
require grad; the all-gather reads those, and their gradients, the
reduce-scattered shards, accumulate on the device, each written in place
into its uploaded shard (the all-gathers have read the shard by then). With
parameter aliasing on (torch_xla's default, and so on a TPU) the compiled
step then gives each gradient its shard's buffer: a step holds the uploaded
shards, not the shards and their gradients. When the root's backward
is done, one ``torch_xla.sync()`` runs the step graph and each gradient is
downloaded into its host shard's ``.grad``. Only then is a device value read:
reading one in the middle of a step is an execution outside the step graph
(``shared/PLATFORM.md``). The uploaded copies are dropped with it, so between
steps no parameter, gradient or optimizer byte of the model stays on the
device.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch_xla
from torch.utils._pytree import tree_leaves

from . import _torch_xla_private as _private
from ._api import FsdpOptions
from ._channels import BACKWARD_GATHER, REDUCE_SCATTER, unit_channel
from ._collectives import optimization_barrier
from ._param_group import ParamGroup

__all__ = ["UnitState", "tensors_in"]


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) container, in pytree order."""
    return [leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor)]


class _GatherFullParams(torch.autograd.Function):
    """Forward: all-gather a unit's shards into one full tensor per original parameter.
    Backward: reduce-scatter their gradients. See [Note: one full tensor per original parameter]."""

    @staticmethod
    def forward(ctx, state: "UnitState", channel_id: int, *shards: torch.Tensor):
        ctx.state = state
        ctx.set_materialize_grads(False)  # unused parameters: None, not a zero tensor to trace
        params, options = state.params, state.options
        fulls = params.all_gather(shards, options.compute_dtype, channel_id,
                                  barrier=options.optimization_barrier_in_forward)
        ctx.mark_non_differentiable(*[full for full, frozen in zip(fulls, params.frozen()) if frozen])
        return tuple(fulls)

    @staticmethod
    def backward(ctx, *full_grads: Optional[torch.Tensor]):
        return (None, None, *ctx.state.shard_gradients(full_grads))


class _Upload(torch.autograd.Function):
    """Forward: a host shard's copy on the device. Backward: keep its gradient on the device for the unit.

    Not a device leaf: a leaf's AccumulateGrad node would keep the copy alive
    for as long as the user keeps the loss. See [Note: CPU offload].
    """

    @staticmethod
    def forward(ctx, state: "UnitState", index: int, param: torch.Tensor, dtype: torch.dtype):
        ctx.state, ctx.index = state, index
        ctx.set_materialize_grads(False)  # no gradient (under no_sync): nothing to keep, not zeros
        return param.detach().to(device=state.device, dtype=dtype)

    @staticmethod
    def backward(ctx, grad: Optional[torch.Tensor]):
        if grad is not None:
            ctx.state.keep_device_grad(ctx.index, grad)
        return None, None, None, None


class _SavedFullParam:
    """What ``saved_tensors_hooks`` stores in place of a view of a full tensor."""

    __slots__ = ("index", "view_fn")

    def __init__(self, index: int, view_fn: Optional[Callable[[torch.Tensor], torch.Tensor]]):
        self.index = index
        self.view_fn = view_fn


class UnitState:
    """What one unit tracks within a step, and across steps under ``no_sync``.

    It is given what it works on (the unit's ``ParamGroup``, its options and
    the device it computes on) and never reaches back into the wrapper; the
    root unit tells it that it is the root and hands it the states of every
    unit below (``set_root``).
    """

    def __init__(self, params: ParamGroup, options: FsdpOptions, device: torch.device):
        self.params = params
        self.options = options
        self.device = device
        self.is_root = False
        """Whether the unit is its model's root (known at its first forward); the root finishes the backward."""
        self.units: list["UnitState"] = [self]
        """The root's: the states of every unit of the model, itself included, in pre-order."""
        self.unit_index = 0
        """Pre-order index of the unit in its root: which channel ids it uses ([Note: channel ids])."""
        self.require_backward_grad_sync = True
        """False inside ``no_sync()``: backward accumulates full gradients instead of reduce-scattering."""
        self.accumulated_grads: Optional[list[Optional[torch.Tensor]]] = None
        """Full gradients accumulated under ``no_sync``, one per original parameter."""
        self._accumulation_marks: list[tuple[Optional[torch.Tensor], int]] = []
        """Each trainable shard's ``.grad`` (and its version) when the accumulation was last added to."""
        self.begin_forward()

    def set_root(self, units: list["UnitState"]) -> None:
        """Make this the root of ``units`` (every unit of the model, pre-order, itself first)."""
        self.is_root = True
        self.units = units
        for index, state in enumerate(units):
            state.unit_index = index

    @property
    def shards(self) -> list[torch.nn.Parameter]:
        """The unit's own shards, as the optimizer sees them."""
        return [sp.param for sp in self.params.sharded]

    def begin_forward(self) -> None:
        self.reset_step()
        self._device_shards: Optional[list[torch.Tensor]] = None  # the uploaded shards, under CPU offload
        self._device_grads: dict[int, torch.Tensor] = {}  # their gradients, by shard index, until downloaded

    def reset_step(self) -> None:
        self._full_index: dict[int, int] = {}  # id(full tensor) -> its index, during a resharding forward
        self._backward_fulls: Optional[list[torch.Tensor]] = None  # the backward's re-gathered full tensors
        self._pre_backward_done = False

    # ------------------------------------------------------------ collectives
    def gather(self, op: int) -> list[torch.Tensor]:
        """All-gather the unit's shards (op ``FORWARD_GATHER`` or ``BACKWARD_GATHER``): a full tensor per parameter."""
        shards = self._computing_shards()
        if not shards:
            return []
        return list(_GatherFullParams.apply(self, unit_channel(self.unit_index, op), *shards))

    def _computing_shards(self) -> list[torch.Tensor]:
        """The shards the all-gather reads: the parameters, or their uploaded copies ([Note: CPU offload])."""
        shards = self.shards
        if not self.options.cpu_offload:
            return shards
        if self._device_shards is None:
            dtype = self.options.compute_dtype
            self._device_shards = [_Upload.apply(self, i, p, dtype or p.dtype) for i, p in enumerate(shards)]
        return self._device_shards

    def keep_device_grad(self, index: int, grad: torch.Tensor) -> None:
        held = self._device_grads.get(index)
        grad = grad if held is None else held + grad
        # Into the uploaded shard's buffer ([Note: CPU offload]). Backward has no later use of the
        # shard: the unit's backward all-gather (or a checkpointed recompute's) ran before its reduce-scatter.
        shard = self._device_shards[index] if self._device_shards is not None else None
        if shard is not None and shard.shape == grad.shape and shard.dtype == grad.dtype:
            with torch.no_grad():
                shard.detach().copy_(grad)
            grad = shard
        self._device_grads[index] = grad

    def download_gradients(self) -> None:
        """Add the gradients kept on the device to the host shards' ``.grad``; drop the copies ([Note: CPU offload])."""
        params = self.shards
        for index, device_grad in self._device_grads.items():
            grad = device_grad.cpu().to(params[index].dtype)
            params[index].grad = grad if params[index].grad is None else params[index].grad.add_(grad)
        self._device_grads = {}
        self._device_shards = None

    def shard_gradients(self, full_grads: Sequence[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
        """Backward of the all-gather: reduce-scatter, or accumulate unsharded under ``no_sync``."""
        full_grads = list(full_grads)
        if self.accumulated_grads is not None and self._gradients_were_cleared():
            self.accumulated_grads = None
        if self.accumulated_grads is not None:
            full_grads = [a if g is None else g if a is None else a + g
                          for a, g in zip(self.accumulated_grads, full_grads)]
        if not self.require_backward_grad_sync:
            self.accumulated_grads = full_grads
            self._mark_accumulation()
            return [None] * len(self.params.sharded)
        self.accumulated_grads = None
        self._accumulation_marks = []  # nothing is accumulated: keep no old .grad alive (capture_step checks)
        options = self.options
        grad_dtypes = [t.dtype for t in self._device_shards] if self._device_shards is not None else None
        return self.params.reduce_scatter(
            full_grads, compute_dtype=options.compute_dtype, reduce_dtype=options.reduce_dtype,
            untokened_allowed=options.untokened_reduce_scatter,
            bucket_bytes=options.reduce_scatter_bucket_bytes, channel_id=unit_channel(self.unit_index, REDUCE_SCATTER),
            barrier=options.optimization_barrier_in_backward, grad_dtypes=grad_dtypes)

    # [Note: no_sync and zero_grad]
    # Under no_sync the unsharded gradients are kept here, not in the shards'
    # .grad (whose shape they do not have), so zero_grad() cannot reach them.
    # To honour it anyway, each trainable shard gets a zero .grad if it has
    # none, and the .grad object and its version are remembered: zero_grad()
    # either sets .grad to None (the default) or zeroes it in place (bumping
    # its version). Either way the next backward sees the change and drops the
    # accumulation, as PyTorch's FSDP, which keeps it in .grad, would.
    def _trainable_shards(self) -> list[torch.nn.Parameter]:
        return [p for p in self.shards if p.requires_grad]

    def _mark_accumulation(self) -> None:
        for p in self._trainable_shards():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._accumulation_marks = [(p.grad, p.grad._version) for p in self._trainable_shards()]

    def _gradients_were_cleared(self) -> bool:
        current = [(p.grad, p.grad._version if p.grad is not None else -1) for p in self._trainable_shards()]
        return any(now is not then or version != then_version
                   for (now, version), (then, then_version) in zip(current, self._accumulation_marks))

    # ------------------------------------- [Note: resharding after forward]
    @contextlib.contextmanager
    def saving_references_to(self, fulls: Sequence[torch.Tensor]) -> Iterator[None]:
        """Within this context, autograd saves references to ``fulls`` (and views of them), not the tensors."""
        self._full_index = {id(f): i for i, f in enumerate(fulls)}
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self._full_index = {}

    def _pack(self, tensor: torch.Tensor) -> Any:
        base = tensor if tensor._base is None else tensor._base
        index = self._full_index.get(id(base))
        if index is None:
            return tensor
        return _SavedFullParam(index, None if base is tensor else tensor._view_func)

    def _unpack(self, saved: Any) -> torch.Tensor:
        if not isinstance(saved, _SavedFullParam):
            return saved
        full = self._regathered()[saved.index].detach()
        return full if saved.view_fn is None else saved.view_fn(full)

    def _regathered(self) -> list[torch.Tensor]:
        if self._backward_fulls is None:
            # Grad mode on, so that a checkpointed recompute using these
            # parameters sends its gradients through this all-gather's backward.
            with torch.enable_grad():
                self._backward_fulls = self.gather(BACKWARD_GATHER)
        return self._backward_fulls

    # --------------------------------------------------------------- backward
    def register_pre_backward_hooks(self, outputs: Any, forward_fulls: Optional[list[torch.Tensor]]) -> None:
        """Hook every output that requires grad, so the unit prepares its backward when the first gradient arrives.

        A unit that does not reshard passes the forward's full tensors: the
        hooks (and so the autograd graph, not the unit) keep them for a
        checkpointed recompute, so a forward that is never followed by a
        backward leaves nothing behind once its outputs are gone.
        """
        # A one-slot holder, emptied by the first hook call: the hooks stay on
        # the outputs (and so alive) for as long as the user keeps them.
        hook = functools.partial(self._pre_backward_hook, [forward_fulls])
        for tensor in tensors_in(outputs):
            if tensor.requires_grad:
                tensor.register_hook(hook)

    def _pre_backward_hook(self, holder: list[Optional[list[torch.Tensor]]], grad: torch.Tensor) -> torch.Tensor:
        forward_fulls, holder[0] = holder[0], None
        if not self._pre_backward_done:
            self._pre_backward_done = True
            torch.autograd.Variable._execution_engine.queue_callback(self._post_backward)
            if forward_fulls is not None:
                self.params.install(forward_fulls)
            else:
                with torch.enable_grad():  # backward runs without grad; the views need it
                    self.params.install(self._regathered())
        if self.options.optimization_barrier_in_backward:
            grad = grad.clone()
            optimization_barrier([grad])
        return grad

    def _post_backward(self) -> None:
        self.params.uninstall()
        self.reset_step()
        if self.is_root and (self.options.sync_on_finalization or self.options.cpu_offload):
            # Queued behind the nested units' callbacks, so that no full
            # parameter is still set on a module (and so materialised) then.
            torch.autograd.Variable._execution_engine.queue_callback(self._finalize_step)

    def _finalize_step(self) -> None:
        # Autograd may run this callback on one of its worker threads, whose
        # default device need not be this unit's (several devices per process).
        previous = _private.default_device()
        _private.set_default_device(str(self.device))
        try:
            torch_xla.sync()
        finally:
            _private.set_default_device(previous)
        if self.options.cpu_offload:
            for state in self.units:
                state.download_gradients()
