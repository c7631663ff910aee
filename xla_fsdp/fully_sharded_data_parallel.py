"""``XlaFullyShardedDataParallel``: the public wrapper.

The path of data: the constructor shards (``ParamGroup``, ``_param_group.py``);
``forward`` all-gathers the unit's full parameters, sets them on the
submodules and runs the module; autograd's backward of that all-gather is the
reduce-scatter that leaves each rank's gradient on its shard; the optimizer
steps the shards. The hooks and per-step state that make this work live in
``_state.py`` ([Note: resharding after forward]).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch_xla
from torch.utils._pytree import tree_map_only

from . import _state_dict
from ._api import FsdpOptions
from ._channels import FORWARD_GATHER, MAX_UNITS
from ._collectives import ShardingGroup, optimization_barrier
from ._param_group import ParamGroup
from ._state import UnitState, tensors_in
from ._unit import FsdpUnit, is_unit, iter_units
from .wrap import recursive_wrap

__all__ = ["XlaFullyShardedDataParallel"]

# Set on a unit's outputs once they are behind its output barrier, so that the
# next unit does not put the same tensors behind a second one (a hint only:
# a barrier changes no value).
_BEHIND_BARRIER = "_xla_fsdp_behind_barrier"


class XlaFullyShardedDataParallel(FsdpUnit):
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
        # Every keyword above except the wrapping policy is an FsdpOptions field.
        options = FsdpOptions.from_kwargs(locals())
        if args:
            raise TypeError(f"{type(self).__name__} takes the module as its only positional argument; "
                            f"pass options by keyword (got {len(args)} extra positional arguments)")
        if is_unit(module):
            raise ValueError("module is already wrapped in XlaFullyShardedDataParallel; wrap it once")
        if type(module).forward is nn.Module.forward:
            raise TypeError(f"cannot wrap a {type(module).__name__}: it has no forward(); wrap the module "
                            "that calls it, or each of its children")
        super().__init__()
        self.options = options
        _materialise_meta_tensors(module, param_init_fn)

        self.group = ShardingGroup.create(sharding_groups, sharding_rank, sharding_world_size,
                                          pin_layout_in_collective_ops)
        self.xla_device = torch_xla.device()

        if auto_wrap_policy is not None:
            wrapper = auto_wrapper_callable or XlaFullyShardedDataParallel
            module = recursive_wrap(module, auto_wrap_policy, functools.partial(wrapper, **options.as_kwargs()))

        nested_units = list(iter_units(module))
        nested_module_ids = {id(m) for unit in nested_units for m in unit.modules()}
        for unit in nested_units:
            unit._is_root = False
        self._is_root: Optional[bool] = None

        self._params = ParamGroup(module, nested_module_ids, self.group, flatten=flatten_parameters,
                                  shard_on_dim_0=shard_param_on_dim_0, device=self.xla_device)
        self._fsdp_wrapped_module = module
        for sp in self._params.sharded:
            self.register_parameter(sp.name, sp.param)

        self._move_buffers(module, nested_module_ids)
        if execute_sharding_on_init and any(p.device.type == "xla" for p in _params_and_buffers(module)):
            torch_xla.sync()
        self._state = UnitState(self)

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

    @property
    def reshard_after_forward(self) -> bool:
        return self.options.reshard_after_forward

    @property
    def flatten_parameters(self) -> bool:
        return self.options.flatten_parameters

    @property
    def compute_dtype(self) -> Optional[torch.dtype]:
        return self.options.compute_dtype

    @property
    def buffer_dtype(self) -> Optional[torch.dtype]:
        return self.options.effective_buffer_dtype

    @property
    def optimization_barrier_in_forward(self) -> bool:
        return self.options.optimization_barrier_in_forward

    @property
    def _reshards(self) -> bool:
        if self._is_root and self.options.disable_reshard_on_root:
            return False
        return self.options.reshard_after_forward

    def _move_buffers(self, module: nn.Module, nested_module_ids: set[int]) -> None:
        for mod in module.modules():
            if id(mod) in nested_module_ids:
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
            units = list(iter_units(self))
            if len(units) > MAX_UNITS:
                raise ValueError(f"the model has {len(units)} FSDP units; at most {MAX_UNITS} are supported "
                                 "(each needs its own collective channel ids)")
            for index, unit in enumerate(units):
                unit._state.unit_index = index

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._lazy_init()
        state = self._state
        state.reset_step()
        if self.compute_dtype is not None:
            cast = lambda t: t.to(self.compute_dtype) if t.is_floating_point() else t  # noqa: E731
            args, kwargs = tree_map_only(torch.Tensor, cast, (args, kwargs))
        if self.options.optimization_barrier_in_forward:
            # An input that is another unit's output is already behind a barrier.
            optimization_barrier([t for t in tensors_in((args, kwargs)) if not getattr(t, _BEHIND_BARRIER, False)])

        fulls = state.gather(FORWARD_GATHER)
        self._params.install(fulls)
        reshard = self._reshards and torch.is_grad_enabled()
        with state.saving_references_to(fulls) if reshard else contextlib.nullcontext():
            outputs = self.module(*args, **kwargs)
        del fulls
        if reshard or not torch.is_grad_enabled():
            self._params.uninstall()

        if self.options.optimization_barrier_in_forward:
            behind = tensors_in(outputs)
            optimization_barrier(behind)
            for t in behind:
                setattr(t, _BEHIND_BARRIER, True)
        if torch.is_grad_enabled():
            state.register_pre_backward_hooks(outputs)
        return outputs

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients unsharded, with no reduce-scatter, inside this context.

        The first backward after it reduce-scatters the sum of everything
        accumulated. This trades memory (a full gradient per unit) for
        communication, as in PyTorch's FSDP.
        """
        states = [u._state for u in iter_units(self)]
        previous = [s.require_backward_grad_sync for s in states]
        for s in states:
            s.require_backward_grad_sync = False
        try:
            yield
        finally:
            for s, p in zip(states, previous):
                s.require_backward_grad_sync = p

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
        return _state_dict.shard_metadata(self)

    def full_state_dict(self, rank0_only: bool = True) -> dict[str, torch.Tensor]:
        """The unsharded state dict, with the wrapped module's own names, on the host.

        Every rank must call it (it all-gathers). With ``rank0_only`` the other
        ranks get ``{}``. Meant for models that fit in host memory.
        """
        return _state_dict.full_state_dict(self, rank0_only)

    def extra_repr(self) -> str:
        return (f"world_size={self.world_size}, rank={self.rank}, "
                f"reshard_after_forward={self.reshard_after_forward}, "
                f"flatten_parameters={self.flatten_parameters}, compute_dtype={self.compute_dtype}")


def _materialise_meta_tensors(module: nn.Module, param_init_fn: Optional[Callable[[nn.Module], None]]) -> None:
    if not any(t.is_meta for t in _params_and_buffers(module)):
        return
    if param_init_fn is None:
        raise ValueError("the module has parameters on the meta device; pass param_init_fn to materialise them")
    param_init_fn(module)
    meta = [n for n, t in _named_params_and_buffers(module) if t.is_meta]
    if meta:
        raise ValueError(f"param_init_fn left tensors on the meta device: {meta[:5]}")


def _named_params_and_buffers(module: nn.Module):
    yield from module.named_parameters()
    yield from module.named_buffers()


def _params_and_buffers(module: nn.Module):
    return (t for _, t in _named_params_and_buffers(module))
