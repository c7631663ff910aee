"""``XlaFullyShardedDataParallel``: the wrapper, its forward and backward hooks.

The path of data: the constructor shards (``ParamGroup``); ``forward``
all-gathers the unit's full parameters, sets them on the submodules and runs
the module; autograd's backward of that all-gather is the reduce-scatter that
leaves each rank's gradient on its shard; the optimizer steps the shards.

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
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch_xla

from ._collectives import ShardingGroup, optimization_barrier
from ._param_group import MAX_COLLECTIVES_PER_OP, ParamGroup

__all__ = ["XlaFullyShardedDataParallel"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Set on a unit's outputs once they are behind its output barrier, so that the
# next unit does not put the same tensors behind a second one (a hint only:
# a barrier changes no value).
_BEHIND_BARRIER = "_xla_fsdp_behind_barrier"
# Channel ids are C ints, 1 and those from 2**30 up are taken (see _channel
# and GRAD_NORM_CHANNEL): (2**30 - 2) / 4 ops per unit / MAX_COLLECTIVES_PER_OP.
_MAX_UNITS = ((1 << 30) - 2) // (4 * MAX_COLLECTIVES_PER_OP)


def _map_tensors(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        mapped = [_map_tensors(fn, v) for v in value]
        return type(value)(*mapped) if hasattr(value, "_fields") else type(value)(mapped)
    if isinstance(value, dict):
        return {k: _map_tensors(fn, v) for k, v in value.items()}
    return value


def _tensors(value: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _map_tensors(found.append, value)
    return found


class _GatherFullParams(torch.autograd.Function):
    """Forward: all-gather a unit's shards into one full tensor per original parameter.
    Backward: reduce-scatter their gradients. See [Note: one full tensor per original parameter]."""

    @staticmethod
    def forward(ctx, unit: "XlaFullyShardedDataParallel", channel_id: int, *shards: torch.Tensor):
        ctx.unit = unit
        ctx.set_materialize_grads(False)  # unused parameters: None, not a zero tensor to trace
        fulls = unit._params.all_gather(shards, unit.compute_dtype, channel_id,
                                        barrier=unit.optimization_barrier_in_forward)
        ctx.mark_non_differentiable(*[full for full, frozen in zip(fulls, unit._params.frozen) if frozen])
        return tuple(fulls)

    @staticmethod
    def backward(ctx, *full_grads: Optional[torch.Tensor]):
        return (None, None, *ctx.unit._shard_gradients(full_grads))


class _SavedFullParam:
    """What ``saved_tensors_hooks`` stores in place of a view of a full tensor."""

    __slots__ = ("index", "view_fn")

    def __init__(self, index: int, view_fn: Optional[Callable[[torch.Tensor], torch.Tensor]]):
        self.index = index
        self.view_fn = view_fn


class XlaFullyShardedDataParallel(nn.Module):
    """Shards a module's parameters across data-parallel XLA devices.

    A drop-in for ``torch_xla.distributed.fsdp.XlaFullyShardedDataParallel``:
    same name, same arguments, same meanings, except where stated below.

    Args:
        module: the module to wrap. It must define ``forward``.
        reshard_after_forward: free the full parameters after forward and
            all-gather them again in backward (ZeRO-3). ``False`` keeps them
            from forward to backward (ZeRO-2 when only the root is wrapped).
        flatten_parameters: concatenate the unit's parameters into one flat
            parameter per (dtype, requires_grad) (``flat_param_0``, ...); else
            each parameter is sharded on its own, keeps its name and has its
            own collectives (see ``_param_group.py``).
        execute_sharding_on_init: if the module's parameters are already on
            the XLA device, run the sharding graph at once (``torch_xla.sync()``)
            so their full copies can be freed. Parameters on the host are
            sharded on the host and need no execution.
        optimization_barrier_in_forward: put ``xm.optimization_barrier_`` on
            the unit's inputs, outputs and all-gather input, so XLA cannot fuse
            or merge the forward's all-gather with other computation (notably
            with the backward's re-gather).
        optimization_barrier_in_backward: the same for the unit's incoming
            gradients and the reduce-scatter input.
        disable_reshard_on_root: never reshard the root unit, whose backward
            starts right after its forward.
        compute_dtype: dtype of the full parameters and of the unit's floating
            inputs during computation; shards (and so the optimizer) stay in
            the parameters' own dtype. Default: the parameters' dtype.
        buffer_dtype: dtype buffers are cast to. Default: ``compute_dtype``.
        fp32_reduce_scatter: reduce-scatter gradients in fp32 when
            ``compute_dtype`` is lower precision.
        sharding_groups, sharding_rank, sharding_world_size: shard over a
            subset of devices; each group shards independently (no reduction
            across groups). Give all three or none. Default: all devices.
        shard_param_on_dim_0: shard each parameter along dim 0 (the shard
            keeps N-D shape) rather than flat. Requires
            ``flatten_parameters=False``.
        pin_layout_in_collective_ops: pin the layout of the collectives. On
            CPU XLA devices it is forced off: torch_xla lowers a pinned
            all-gather with the rank as a constant, which makes every rank
            compile a different graph (see ``_collectives.py``).
        reduce_scatter_bucket_size_mb: the most gradient (in MB, before
            sharding) one reduce-scatter carries; a unit's gradients are split
            into as many collectives as needed. ``0`` (default): one per unit
            (flattened) or per parameter (unflattened).
        auto_wrap_policy: ``policy(module=, recurse=, unwrapped_params=)``, as in
            ``xla_fsdp.wrap``: wraps submodules in nested units first.
        auto_wrapper_callable: how a submodule chosen by the policy is wrapped:
            ``callable(module, *args, **kwargs)``; default this class.
        param_init_fn: called on the module when it has parameters or buffers
            on the ``meta`` device; it must materialise them (for example
            ``module.to_empty(device="cpu")`` then initialise).
    """

    def __init__(
        self,
        module: nn.Module,
        *args,
        reshard_after_forward: bool = True,
        flatten_parameters: bool = True,
        execute_sharding_on_init: bool = True,
        optimization_barrier_in_forward: bool = True,
        optimization_barrier_in_backward: bool = True,
        disable_reshard_on_root: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
        buffer_dtype: Optional[torch.dtype] = None,
        fp32_reduce_scatter: bool = False,
        sharding_groups: Optional[Sequence[Sequence[int]]] = None,
        sharding_rank: Optional[int] = None,
        sharding_world_size: Optional[int] = None,
        shard_param_on_dim_0: bool = False,
        pin_layout_in_collective_ops: bool = True,
        reduce_scatter_bucket_size_mb: float = 0,
        auto_wrap_policy: Optional[Callable] = None,
        auto_wrapper_callable: Optional[Callable] = None,
        param_init_fn: Optional[Callable[[nn.Module], None]] = None,
    ):
        if args:
            raise TypeError(f"{type(self).__name__} takes the module as its only positional argument; "
                            f"pass options by keyword (got {len(args)} extra positional arguments)")
        if isinstance(module, XlaFullyShardedDataParallel):
            raise ValueError("module is already wrapped in XlaFullyShardedDataParallel; wrap it once")
        if type(module).forward is nn.Module.forward:
            raise TypeError(f"cannot wrap a {type(module).__name__}: it has no forward(); wrap the module "
                            "that calls it, or each of its children")
        for name, value in (("compute_dtype", compute_dtype), ("buffer_dtype", buffer_dtype)):
            if value is not None and value not in _FLOAT_DTYPES:
                raise ValueError(f"{name} must be one of {_FLOAT_DTYPES}, got {value}")
        if shard_param_on_dim_0 and flatten_parameters:
            raise ValueError("shard_param_on_dim_0=True requires flatten_parameters=False")
        if reduce_scatter_bucket_size_mb < 0:
            raise ValueError(f"reduce_scatter_bucket_size_mb must be >= 0, got {reduce_scatter_bucket_size_mb}")
        super().__init__()

        if param_init_fn is not None and any(t.is_meta for t in _params_and_buffers(module)):
            param_init_fn(module)
            meta = [n for n, t in _named_params_and_buffers(module) if t.is_meta]
            if meta:
                raise ValueError(f"param_init_fn left tensors on the meta device: {meta[:5]}")
        elif any(t.is_meta for t in _params_and_buffers(module)):
            raise ValueError("the module has parameters on the meta device; pass param_init_fn to "
                             "materialise them")

        self.group = ShardingGroup.create(sharding_groups, sharding_rank, sharding_world_size,
                                          pin_layout_in_collective_ops)
        self.reshard_after_forward = reshard_after_forward
        self.flatten_parameters = flatten_parameters
        self.optimization_barrier_in_forward = optimization_barrier_in_forward
        self.optimization_barrier_in_backward = optimization_barrier_in_backward
        self.disable_reshard_on_root = disable_reshard_on_root
        self.compute_dtype = compute_dtype
        self.buffer_dtype = buffer_dtype or compute_dtype
        self.fp32_reduce_scatter = fp32_reduce_scatter
        self.shard_param_on_dim_0 = shard_param_on_dim_0
        self.reduce_scatter_bucket_size_mb = reduce_scatter_bucket_size_mb
        self.xla_device = torch_xla.device()

        if auto_wrap_policy is not None:
            from .wrap import recursive_wrap
            child_kwargs = dict(
                reshard_after_forward=reshard_after_forward, flatten_parameters=flatten_parameters,
                execute_sharding_on_init=execute_sharding_on_init,
                optimization_barrier_in_forward=optimization_barrier_in_forward,
                optimization_barrier_in_backward=optimization_barrier_in_backward,
                disable_reshard_on_root=disable_reshard_on_root, compute_dtype=compute_dtype,
                buffer_dtype=buffer_dtype, fp32_reduce_scatter=fp32_reduce_scatter,
                sharding_groups=sharding_groups, sharding_rank=sharding_rank,
                sharding_world_size=sharding_world_size, shard_param_on_dim_0=shard_param_on_dim_0,
                pin_layout_in_collective_ops=pin_layout_in_collective_ops,
                reduce_scatter_bucket_size_mb=reduce_scatter_bucket_size_mb, param_init_fn=param_init_fn)
            wrapper = auto_wrapper_callable or XlaFullyShardedDataParallel
            module = recursive_wrap(module, auto_wrap_policy, functools.partial(wrapper, **child_kwargs))

        nested = [m for m in module.modules() if isinstance(m, XlaFullyShardedDataParallel)]
        ignored = {id(m) for unit in nested for m in unit.modules()}
        for unit in nested:
            unit._is_root = False
        self._is_root: Optional[bool] = None
        self._unit_index = 0

        self._params = ParamGroup(module, ignored, self.group, flatten=flatten_parameters,
                                  shard_on_dim_0=shard_param_on_dim_0, device=self.xla_device)
        self._fsdp_wrapped_module = module
        for sp in self._params.sharded:
            self.register_parameter(sp.name, sp.param)

        self._move_buffers(module, ignored)
        if execute_sharding_on_init and any(p.device.type == "xla" for p in _params_and_buffers(module)):
            torch_xla.sync()

        self._require_backward_grad_sync = True
        self._accumulated_grads: Optional[list[Optional[torch.Tensor]]] = None
        self._reset_step_state()

    # ------------------------------------------------------------- properties
    @property
    def module(self) -> nn.Module:
        """The wrapped module."""
        return self._fsdp_wrapped_module

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def world_size(self) -> int:
        return self.group.world_size

    @property
    def sharded_params(self) -> list[nn.Parameter]:
        """This unit's own shards (not those of nested units)."""
        return [sp.param for sp in self._params.sharded]

    def _units(self) -> Iterator["XlaFullyShardedDataParallel"]:
        return (m for m in self.modules() if isinstance(m, XlaFullyShardedDataParallel))

    def _move_buffers(self, module: nn.Module, ignored: set[int]) -> None:
        for mod in module.modules():
            if id(mod) in ignored:
                continue
            for name, buf in list(mod._buffers.items()):
                if buf is None:
                    continue
                cast = self.buffer_dtype if buf.is_floating_point() and self.buffer_dtype else buf.dtype
                mod._buffers[name] = buf.to(device=self.xla_device, dtype=cast)

    # ---------------------------------------------------------------- forward
    def _lazy_init(self) -> None:
        if self._is_root is None:
            self._is_root = True
            units = list(self._units())
            if len(units) > _MAX_UNITS:
                raise ValueError(f"the model has {len(units)} FSDP units; at most {_MAX_UNITS} are supported "
                                 "(each needs its own collective channel ids)")
            for index, unit in enumerate(units):
                unit._unit_index = index

    def _channel(self, op: int) -> int:
        # [Note: collectives on CPU XLA devices]: a constant per unit and op;
        # the op's collective k (see [Note: collectives of a unit]) adds k.
        # Channel 1 is left to untokened reduce-scatters ([Note: the collective token]).
        return 2 + (4 * self._unit_index + op) * MAX_COLLECTIVES_PER_OP

    @property
    def _reshards(self) -> bool:
        if self._is_root and self.disable_reshard_on_root:
            return False
        return self.reshard_after_forward

    def _reset_step_state(self) -> None:
        self._full_index: dict[int, int] = {}
        self._backward_fulls: Optional[list[torch.Tensor]] = None
        self._pre_backward_done = False

    def _gather(self, channel_op: int) -> list[torch.Tensor]:
        shards = [sp.param for sp in self._params.sharded]
        if not shards:
            return []
        return list(_GatherFullParams.apply(self, self._channel(channel_op), *shards))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._lazy_init()
        self._reset_step_state()
        if self.compute_dtype is not None:
            cast = lambda t: t.to(self.compute_dtype) if t.is_floating_point() else t  # noqa: E731
            args, kwargs = _map_tensors(cast, args), _map_tensors(cast, kwargs)
        if self.optimization_barrier_in_forward:
            # An input that is another unit's output is already behind a barrier.
            optimization_barrier([t for t in _tensors((args, kwargs)) if not getattr(t, _BEHIND_BARRIER, False)])

        fulls = self._gather(channel_op=0)
        self._params.install(fulls)
        reshard = self._reshards and torch.is_grad_enabled()
        if reshard:
            self._full_index = {id(f): i for i, f in enumerate(fulls)}
            hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        else:
            hooks = contextlib.nullcontext()
        with hooks:
            outputs = self.module(*args, **kwargs)
        del fulls
        self._full_index = {}
        if reshard or not torch.is_grad_enabled():
            self._params.uninstall()

        if self.optimization_barrier_in_forward:
            behind = _tensors(outputs)
            optimization_barrier(behind)
            for t in behind:
                setattr(t, _BEHIND_BARRIER, True)
        if torch.is_grad_enabled():
            outputs = _map_tensors(self._register_pre_backward_hook, outputs)
        return outputs

    # ------------------------------------- [Note: resharding after forward]
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
                self._backward_fulls = self._gather(channel_op=1)
        return self._backward_fulls

    # --------------------------------------------------------------- backward
    def _register_pre_backward_hook(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.requires_grad:
            tensor.register_hook(self._pre_backward_hook)
        return tensor

    def _pre_backward_hook(self, grad: torch.Tensor) -> torch.Tensor:
        if not self._pre_backward_done:
            self._pre_backward_done = True
            torch.autograd.Variable._execution_engine.queue_callback(self._post_backward)
            if self._reshards:
                with torch.enable_grad():  # backward runs without grad; the views need it
                    self._params.install(self._regathered())
        if self.optimization_barrier_in_backward:
            grad = grad.clone()
            optimization_barrier([grad])
        return grad

    def _post_backward(self) -> None:
        self._params.uninstall()
        self._reset_step_state()

    def _shard_gradients(self, full_grads: Sequence[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
        """Backward of the all-gather: reduce-scatter, or accumulate unsharded under ``no_sync``."""
        full_grads = list(full_grads)
        if self._accumulated_grads is not None:
            full_grads = [a if g is None else g if a is None else a + g
                          for a, g in zip(self._accumulated_grads, full_grads)]
        if not self._require_backward_grad_sync:
            self._accumulated_grads = full_grads
            return [None] * len(self._params.sharded)
        self._accumulated_grads = None
        reduce_dtype = torch.float32 if self.fp32_reduce_scatter and self.compute_dtype is not None else None
        return self._params.reduce_scatter(
            full_grads, reduce_dtype=reduce_dtype,
            bucket_bytes=int(self.reduce_scatter_bucket_size_mb * 1024 * 1024),
            channel_id=self._channel(2), barrier=self.optimization_barrier_in_backward)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients unsharded, with no reduce-scatter, inside this context.

        The first backward after it reduce-scatters the sum of everything
        accumulated. This trades memory (a full gradient per unit) for
        communication, as in PyTorch's FSDP.
        """
        units = list(self._units())
        previous = [u._require_backward_grad_sync for u in units]
        for u in units:
            u._require_backward_grad_sync = False
        try:
            yield
        finally:
            for u, p in zip(units, previous):
                u._require_backward_grad_sync = p

    # ------------------------------------------------------------ utilities
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the gradients of all shards by their global norm; return that norm.

        Equal to ``torch.nn.utils.clip_grad_norm_`` on the unsharded model:
        padding holds zero gradient, and each parameter lives in one shard.
        Call it on the root unit, on every rank.
        """
        if self._is_root is False:
            raise RuntimeError("clip_grad_norm_ must be called on the root FSDP unit")
        norm_type = float(norm_type)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.xla_device)
        if norm_type == float("inf"):
            local = torch.stack([g.detach().abs().max().float() for g in grads]).max()
            total = self.group.all_reduce_scalar(local, op="max")
        else:
            local = torch.stack([g.detach().float().pow(norm_type).sum() for g in grads]).sum()
            total = self.group.all_reduce_scalar(local).pow(1.0 / norm_type)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return total

    def get_shard_metadata(self) -> dict:
        """Everything needed to rebuild full tensors offline from every rank's ``state_dict()``."""
        from ._state_dict import shard_metadata
        return shard_metadata(self)

    def full_state_dict(self, rank0_only: bool = True) -> dict[str, torch.Tensor]:
        """The unsharded state dict, with the wrapped module's own names, on the host.

        Every rank must call it (it all-gathers). With ``rank0_only`` the other
        ranks get ``{}``. Meant for models that fit in host memory.
        """
        from ._state_dict import full_state_dict
        return full_state_dict(self, rank0_only)

    def extra_repr(self) -> str:
        return (f"world_size={self.world_size}, rank={self.rank}, "
                f"reshard_after_forward={self.reshard_after_forward}, "
                f"flatten_parameters={self.flatten_parameters}, compute_dtype={self.compute_dtype}")


def _named_params_and_buffers(module: nn.Module):
    yield from module.named_parameters()
    yield from module.named_buffers()


def _params_and_buffers(module: nn.Module):
    return (t for _, t in _named_params_and_buffers(module))
