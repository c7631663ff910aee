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

from . import _collective_check, _state_dict
from . import _torch_xla_private as _private
from ._api import FsdpOptions, check_private_options
from ._channels import FORWARD_GATHER, MAX_UNITS
from ._collectives import ShardingGroup, optimization_barrier
from ._param_group import ParamGroup
from ._state import UnitState, tensors_in
from ._state_dict import original_name
from ._unit import FsdpUnit, is_unit, iter_units, named_units
from .wrap import recursive_wrap

__all__ = ["XlaFullyShardedDataParallel"]

# Set on a unit's outputs once they are behind its output barrier, so that the
# next unit does not put the same tensors behind a second one (a hint only:
# a barrier changes no value).
_BEHIND_BARRIER = "_xla_fsdp_behind_barrier"


class XlaFullyShardedDataParallel(FsdpUnit):
    """Shards a module's parameters across data-parallel XLA devices.

    A drop-in for ``torch_xla.distributed.fsdp.XlaFullyShardedDataParallel``:
    same name, same arguments in the same order with the same defaults, same
    meanings, except where stated below. Differences on purpose:

    * Full parameters exist only while a unit computes; they are never
      ``nn.Parameter`` objects (``full_params`` is empty between steps).
    * A trainable parameter that gets no gradient on some rank (a branch, an
      unused expert) contributes zeros there, so every rank issues the same
      collectives; its shard gets a gradient (possibly zero) on every rank.
    * ``zero_grad()`` (of the optimizer or the model) also discards gradients
      accumulated under ``no_sync``.
    * torch_xla's private ``_shard_size_multiple`` and ``_debug_*`` arguments
      are accepted at their defaults only (``xla_fsdp._api``).
    * ``untokened_reduce_scatter`` (not in torch_xla) trades a promise for
      speed; see below.

    Args:
        module: the module to wrap. It must define ``forward``.
        reshard_after_forward: free the full parameters after forward and
            all-gather them again in backward (ZeRO-3). ``False`` keeps them
            from forward to backward (ZeRO-2 when only the root is wrapped).
        flatten_parameters: concatenate the unit's parameters into one flat
            parameter per (dtype, requires_grad) (``flat_param_0``, ...); else
            (the default, as in torch_xla) each parameter is sharded on its
            own, keeps its name and has its own collectives (see
            ``_param_group.py``).
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
        sync_on_finalization: call ``torch_xla.sync()`` once the root's
            backward has produced every gradient.
        disable_reshard_on_root: never reshard the root unit, whose backward
            starts right after its forward.
        compute_dtype: dtype of the full parameters and of the unit's floating
            inputs during computation; shards (and so the optimizer) stay in
            the parameters' own dtype. Default: the parameters' dtype.
        buffer_dtype: dtype floating buffers are kept in. Default:
            ``compute_dtype``. State dicts hold them in their original dtype.
        fp32_reduce_scatter: reduce-scatter gradients in fp32 when
            ``compute_dtype`` is lower precision.
        sharding_groups, sharding_rank, sharding_world_size: shard over a
            subset of devices; each group shards independently (no reduction
            across groups). Give all three or none; ``sharding_rank`` must be
            this device's position in its group. Default: all devices.
        shard_param_on_dim_0: shard each parameter along dim 0 (the shard
            keeps N-D shape) rather than flat. Requires
            ``flatten_parameters=False``.
        pin_layout_in_collective_ops: accepted, but collectives across
            devices never pin their layout, on any device type: torch_xla
            lowers a pinned all-gather as a rank-dependent, zero-padded
            all-reduce without the channel id (see [Note: collectives on TPU]
            in ``_collectives.py``).
        reduce_scatter_bucket_size_mb: the most gradient (in MB, before
            sharding) one reduce-scatter carries; a unit's gradients are split
            into as many collectives as needed. ``0`` (default): one per unit
            (flattened) or per parameter (unflattened).
        coalesce_all_gather_ops: gather all of an unflattened unit's
            parameters with one all-gather (reduce-scatters stay per
            parameter).
        auto_wrap_policy: ``policy(module=, recurse=, unwrapped_params=)``, as in
            ``xla_fsdp.wrap``: wraps submodules in nested units first.
        auto_wrapper_callable: how a submodule chosen by the policy is wrapped:
            ``callable(module, *args, **kwargs)``; default this class.
        param_init_fn: called on the unit's module, after its nested units
            are built, when it still has parameters or buffers on the
            ``meta`` device; it must materialise exactly those (a change to a
            nested unit's shards is refused). Without it, each submodule that
            owns meta tensors gets real ones and its ``reset_parameters()``.
        _shard_size_multiple, _use_xla_patched_linear, _debug_*: accepted
            for torch_xla compatibility; see ``xla_fsdp._api``.
        cpu_offload: keep the shards, their gradients and so the optimizer
            state on the host (``model.parameters()`` are CPU tensors that an
            ordinary torch optimizer steps on the host); each forward uploads
            the unit's shards in ``compute_dtype``, and the gradients are
            downloaded when the root's backward ends ([Note: CPU offload] in
            ``_state.py``). Not in torch_xla.
        untokened_reduce_scatter: promise that every rank traces the same
            backward (no parameter used on some ranks only). Then, with
            unpinned layouts (CPU devices), an unflattened gradient is
            reduce-scattered outside torch_xla's token chain, saving a pass
            over it ([Note: the collective token] in ``_collectives.py``).
        check_collectives: compare every rank's collectives at each step
            marker before the step runs, and raise the same
            ``CollectiveMismatchError`` on every rank when they differ,
            instead of a hang ([Note: the collective check] in
            ``_collective_check.py``). Given on the root, it holds for the
            process from the root's first forward on. ``None`` (default): the
            environment variable ``XLA_FSDP_CHECK_COLLECTIVES`` decides; unset,
            the check is on inside ``xla_fsdp.testing.run_on_cpu_devices`` and
            off elsewhere. Not in torch_xla.
    """

    def __init__(
        self,
        module: nn.Module,
        reshard_after_forward: bool = True,
        flatten_parameters: bool = False,
        execute_sharding_on_init: bool = True,
        optimization_barrier_in_forward: bool = True,
        optimization_barrier_in_backward: bool = True,
        sync_on_finalization: bool = False,
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
        coalesce_all_gather_ops: bool = False,
        auto_wrap_policy: Optional[Callable] = None,
        auto_wrapper_callable: Optional[Callable] = None,
        param_init_fn: Optional[Callable[[nn.Module], None]] = None,
        _shard_size_multiple: int = 128,
        _use_xla_patched_linear: bool = True,
        _debug_dummy_forward_pass: bool = False,
        _debug_msg: str = "xla_fsdp",
        _debug_print: bool = False,
        _debug_dummy_all_gather_op: bool = False,
        _debug_dummy_all_reduce_op: bool = False,
        _debug_dummy_reduce_scatter_op: bool = False,
        _debug_dummy_optimization_barrier_op: bool = False,
        cpu_offload: bool = False,
        untokened_reduce_scatter: bool = False,
        check_collectives: Optional[bool] = None,
    ):
        # The arguments are torch_xla's, in its order. All but the wrapping
        # policy and the private ones are FsdpOptions fields.
        arguments = locals()
        options = FsdpOptions.from_kwargs(arguments)
        check_private_options(arguments)
        if is_unit(module):
            raise ValueError("module is already wrapped in XlaFullyShardedDataParallel; wrap it once")
        if type(module).forward is nn.Module.forward:
            raise TypeError(f"cannot wrap a {type(module).__name__}: it has no forward(); wrap the module "
                            "that calls it, or each of its children")
        super().__init__()
        self.options = options
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
        # After the nested units, as in torch_xla: each materialises its own module first.
        materialise_meta_tensors(module, param_init_fn, nested_units, nested_module_ids)

        shard_device = torch.device("cpu") if cpu_offload else self.xla_device
        self._params = ParamGroup(module, nested_module_ids, self.group, flatten=flatten_parameters,
                                  shard_on_dim_0=shard_param_on_dim_0, device=shard_device,
                                  coalesce_all_gather=coalesce_all_gather_ops)
        self._fsdp_wrapped_module = module
        for sp in self._params.sharded:
            self.register_parameter(sp.name, sp.param)

        self._move_buffers(module, nested_module_ids)
        if execute_sharding_on_init and any(p.device.type == "xla" for p in _params_and_buffers(module)):
            torch_xla.sync()
        self._state = UnitState(self._params, options, self.xla_device)

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
        """Move this unit's buffers to the device, floating ones cast to ``buffer_dtype``.

        The state dict keeps each buffer in its original dtype (as torch_xla
        does), so checkpoints and consolidated files hold, say, BatchNorm
        statistics in fp32 even while they are kept in bf16 for computation.
        """
        self._buffer_dtypes: dict[str, torch.dtype] = {}  # state-dict key under the unit -> original dtype
        for path, mod in module.named_modules():
            if id(mod) in nested_module_ids:
                continue
            for name, buf in list(mod._buffers.items()):
                if buf is None:
                    continue
                cast = self.buffer_dtype if buf.is_floating_point() and self.buffer_dtype else buf.dtype
                if cast != buf.dtype:
                    self._buffer_dtypes[f"_fsdp_wrapped_module.{path}.{name}" if path
                                        else f"_fsdp_wrapped_module.{name}"] = buf.dtype
                mod._buffers[name] = buf.to(device=self.xla_device, dtype=cast)
        if self._buffer_dtypes:
            self._register_state_dict_hook(_buffers_in_original_dtypes)

    # ---------------------------------------------------------------- forward
    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper lacks come from the wrapped module (``model.config``), as in torch_xla."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            wrapped = self._modules.get("_fsdp_wrapped_module")
            if wrapped is None:
                raise
            return getattr(wrapped, name)

    def __getitem__(self, key: Any) -> Any:
        """Indexing reaches the wrapped module (``model[0]`` of a wrapped ``nn.Sequential``)."""
        return self.module[key]

    @property
    def has_full_params(self) -> bool:
        """Whether this unit's full parameters are set on its modules: only while it computes."""
        return self._params.installed is not None

    @property
    def full_params(self) -> list[torch.Tensor]:
        """This unit's full parameters while it computes, one per original parameter; else ``[]``.

        Unlike torch_xla's, they are not ``nn.Parameter`` objects that persist
        with freed storage: between steps only the shards exist.
        """
        return list(self._params.installed or [])

    @property
    def params_with_grad(self) -> list[nn.Parameter]:
        """The shards (of this unit and nested ones) that have a gradient."""
        return [p for p in self.parameters() if p.grad is not None]

    def get_original_names_and_sharded_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, shard)`` for every shard under this unit, named as in the unwrapped model.

        An unflattened shard takes its parameter's name (``blocks.0.fc1.weight``);
        a flattened one holds several parameters and keeps its own name, with
        the unwrapped module's prefix (``blocks.0.flat_param_0``).
        """
        named = []
        for prefix, unit in named_units(self):
            for sp in unit._params.sharded:
                name = sp.originals[0].name if not unit.flatten_parameters else sp.name
                named.append((original_name(prefix + "_fsdp_wrapped_module." + name), sp.param))
        return named

    def _lazy_init(self) -> None:
        if self._is_root is None:
            self._is_root = True
            named = list(named_units(self))
            units = [unit for _, unit in named]
            if len(units) > MAX_UNITS:
                raise ValueError(f"the model has {len(units)} FSDP units; at most {MAX_UNITS} are supported "
                                 "(each needs its own collective channel ids)")
            self._state.set_root([unit._state for unit in units])
            # Issue 22: name each unit's collectives for the collective check ([Note: the collective check]).
            for prefix, unit in named:
                unit._params.name = f"FSDP unit '{original_name(prefix).rstrip('.') or '(root)'}'"
            if self.options.check_collectives is not None:
                _collective_check.set_enabled(self.options.check_collectives)
            else:
                _collective_check.install_from_environment()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._lazy_init()
        state = self._state
        state.begin_forward()
        if self.compute_dtype is not None:
            cast = lambda t: t.to(self.compute_dtype) if t.is_floating_point() else t  # noqa: E731
            args, kwargs = tree_map_only(torch.Tensor, cast, (args, kwargs))
        if self.options.optimization_barrier_in_forward:
            # An input that is another unit's output is already behind a barrier.
            optimization_barrier([t for t in tensors_in((args, kwargs)) if not getattr(t, _BEHIND_BARRIER, False)])

        fulls = state.gather(FORWARD_GATHER)
        self._params.install(fulls)
        reshard = self._reshards and torch.is_grad_enabled()
        try:
            with state.saving_references_to(fulls) if reshard else contextlib.nullcontext():
                outputs = self.module(*args, **kwargs)
        finally:
            # Never left on the modules: a forward that no backward follows
            # would keep them alive (see register_pre_backward_hooks).
            self._params.uninstall()

        if self.options.optimization_barrier_in_forward:
            behind = tensors_in(outputs)
            optimization_barrier(behind)
            for t in behind:
                setattr(t, _BEHIND_BARRIER, True)
        if torch.is_grad_enabled():
            state.register_pre_backward_hooks(outputs, forward_fulls=None if reshard else fulls)
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
        op = "max" if norm_type == float("inf") else "sum"
        if op == "max":
            local = torch.stack([g.detach().abs().max().float() for g in grads]).max()
        else:
            local = torch.stack([g.detach().float().pow(norm_type).sum() for g in grads]).sum()
        on_host = local.device.type == "cpu"  # CPU offload: gradients live on the host
        total = self.group.all_reduce_scalar(local.to(self.xla_device), op=op)
        if on_host:
            torch_xla.sync()  # the collective runs in a step graph, never from a host read ([Note: CPU offload])
            total = total.cpu()
        if op == "sum":
            total = total.pow(1.0 / norm_type)
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


def materialise_meta_tensors(module: nn.Module, param_init_fn: Optional[Callable[[nn.Module], None]],
                             nested_units: list[FsdpUnit], nested_module_ids: set[int]) -> None:
    """Materialise the tensors of ``module`` (outside nested units) that are on the meta device.

    With ``param_init_fn``, call it on ``module``, as torch_xla does. Without
    it, give each submodule that owns meta tensors real (uninitialised) ones
    and call its ``reset_parameters()``, as PyTorch's FSDP does.
    """
    own = [m for m in module.modules() if id(m) not in nested_module_ids]
    meta_owners = [m for m in own if any(t.is_meta for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])]
    if not meta_owners:
        return
    if param_init_fn is not None:
        before = {id(u): [_identity(p) for p in u.parameters()] for u in nested_units}
        param_init_fn(module)
        for name, unit in module.named_modules():
            if id(unit) in before and [_identity(p) for p in unit.parameters()] != before[id(unit)]:
                raise ValueError(
                    f"param_init_fn changed the parameters of nested FSDP unit '{name}', which were sharded "
                    "already; it is called on each unit's module after that module's nested units are built, "
                    "so it must materialise only tensors still on the meta device")
    else:
        names = {id(m): n for n, m in module.named_modules()}
        with torch.no_grad():
            for m in meta_owners:
                if not callable(getattr(m, "reset_parameters", None)):
                    raise ValueError(
                        f"submodule '{names[id(m)]}' ({type(m).__name__}) has tensors on the meta device and no "
                        "reset_parameters(); pass param_init_fn to materialise them")
                m.to_empty(device="cpu", recurse=False)
                m.reset_parameters()
    left = [n for n, t in _named_params_and_buffers(module) if t.is_meta]
    if left:
        raise ValueError(f"tensors are still on the meta device after materialisation: {left[:5]}")


def _identity(t: torch.Tensor) -> tuple:
    """What changes when a tensor's storage is replaced (``to_empty``, ``.data = ...``)."""
    if t.device.type == "xla":
        return (t.device.type, _private.tensor_id(t))
    return (t.device.type, t.data_ptr())


def _buffers_in_original_dtypes(unit: "XlaFullyShardedDataParallel", state_dict: dict, prefix: str,
                                local_metadata: dict) -> None:
    for key, dtype in unit._buffer_dtypes.items():
        if prefix + key in state_dict:
            state_dict[prefix + key] = state_dict[prefix + key].to(dtype)


def _named_params_and_buffers(module: nn.Module):
    yield from module.named_parameters()
    yield from module.named_buffers()


def _params_and_buffers(module: nn.Module):
    return (t for _, t in _named_params_and_buffers(module))
