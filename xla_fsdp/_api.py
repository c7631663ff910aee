"""The options of an FSDP unit, held as one frozen object.

``XlaFullyShardedDataParallel`` takes torch_xla's keyword arguments; it
validates them once into ``FsdpOptions``, and a nested unit made by
auto-wrapping inherits that object whole (``FsdpOptions.as_kwargs``), so an
option added here reaches every unit without being re-listed anywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

__all__ = ["FsdpOptions", "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class FsdpOptions:
    """Every option of one FSDP unit; the wrapper's docstring explains each in the user's terms."""

    reshard_after_forward: bool = True
    """Free the full parameters after forward and all-gather them again in backward (ZeRO-3)."""
    flatten_parameters: bool = False
    """One flat shard per (dtype, requires_grad) instead of one shard per parameter."""
    execute_sharding_on_init: bool = True
    """Run the sharding graph at construction when the parameters are already on the device."""
    optimization_barrier_in_forward: bool = True
    """Barriers around the unit's inputs, outputs and all-gather input in forward."""
    optimization_barrier_in_backward: bool = True
    """Barriers around the unit's incoming gradients and reduce-scatter input."""
    sync_on_finalization: bool = False
    """Call ``torch_xla.sync()`` once the root's backward has produced every gradient."""
    disable_reshard_on_root: bool = True
    """Never reshard the root unit, whose backward starts right after its forward."""
    compute_dtype: Optional[torch.dtype] = None
    """Dtype of the full parameters and floating inputs while the unit computes; None: the parameters'."""
    buffer_dtype: Optional[torch.dtype] = None
    """Dtype floating buffers are cast to; None: ``compute_dtype``."""
    fp32_reduce_scatter: bool = False
    """Reduce-scatter gradients in fp32 when ``compute_dtype`` is lower precision."""
    sharding_groups: Optional[tuple[tuple[int, ...], ...]] = None
    """Groups of global device ids that shard independently; None: one group of all devices."""
    sharding_rank: Optional[int] = None
    """This device's index within its sharding group (with ``sharding_groups``)."""
    sharding_world_size: Optional[int] = None
    """Devices per sharding group (with ``sharding_groups``)."""
    shard_param_on_dim_0: bool = False
    """Shard each parameter along dim 0, keeping its N-D shape (unflattened units only)."""
    pin_layout_in_collective_ops: bool = True
    """Accepted for torch_xla; collectives across devices never pin layouts ([Note: collectives on TPU])."""
    reduce_scatter_bucket_size_mb: float = 0
    """Most gradient megabytes one reduce-scatter carries; 0: one per bucket of the unit."""
    coalesce_all_gather_ops: bool = False
    """One all-gather for all of an unflattened unit's parameters instead of one per parameter."""
    param_init_fn: Optional[Callable[[nn.Module], None]] = None
    """Materialises parameters and buffers on the meta device."""
    cpu_offload: bool = False
    """Keep the shards, their gradients and so the optimizer state on the host ([Note: CPU offload])."""
    untokened_reduce_scatter: bool = False
    """A promise that every rank traces the same backward (no parameter unused on some ranks only):
    lets an unflattened gradient skip torch_xla's collective token ([Note: the collective token])."""
    check_collectives: Optional[bool] = None
    """Compare every rank's collectives at each step marker, before the step runs, and raise on a difference
    ([Note: the collective check]); set by the root unit for the process. None: ``XLA_FSDP_CHECK_COLLECTIVES``
    decides (unset: on inside ``run_on_cpu_devices``, off elsewhere)."""

    def __post_init__(self):
        if self.sharding_groups is not None:
            object.__setattr__(self, "sharding_groups", tuple(tuple(int(d) for d in g) for g in self.sharding_groups))
        for name in ("compute_dtype", "buffer_dtype"):
            value = getattr(self, name)
            if value is not None and value not in FLOAT_DTYPES:
                raise ValueError(f"{name} must be one of {FLOAT_DTYPES}, got {value}")
        if self.shard_param_on_dim_0 and self.flatten_parameters:
            raise ValueError("shard_param_on_dim_0=True requires flatten_parameters=False")
        if self.reduce_scatter_bucket_size_mb < 0:
            raise ValueError(f"reduce_scatter_bucket_size_mb must be >= 0, got {self.reduce_scatter_bucket_size_mb}")
        if self.check_collectives not in (None, True, False):
            raise ValueError(f"check_collectives must be None, True or False, got {self.check_collectives!r}")
        if self.param_init_fn is not None and not callable(self.param_init_fn):
            raise ValueError(f"param_init_fn must be callable, got {type(self.param_init_fn).__name__}")

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> "FsdpOptions":
        """The options named in ``kwargs`` (other keys are ignored: the constructor's own arguments)."""
        return cls(**{f.name: kwargs[f.name] for f in dataclasses.fields(cls) if f.name in kwargs})

    def as_kwargs(self) -> dict[str, Any]:
        """These options as the wrapper's keyword arguments, for a nested unit to inherit."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def effective_buffer_dtype(self) -> Optional[torch.dtype]:
        return self.buffer_dtype or self.compute_dtype

    @property
    def reduce_dtype(self) -> Optional[torch.dtype]:
        """Dtype of the reduce-scatter when it differs from the gradients' (``fp32_reduce_scatter``)."""
        return torch.float32 if self.fp32_reduce_scatter and self.compute_dtype is not None else None

    @property
    def reduce_scatter_bucket_bytes(self) -> int:
        return int(self.reduce_scatter_bucket_size_mb * 1024 * 1024)



PRIVATE_TORCH_XLA_DEFAULTS = {
    "_shard_size_multiple": 128,
    "_use_xla_patched_linear": True,
    "_debug_dummy_forward_pass": False,
    "_debug_msg": "xla_fsdp",
    "_debug_print": False,
    "_debug_dummy_all_gather_op": False,
    "_debug_dummy_all_reduce_op": False,
    "_debug_dummy_reduce_scatter_op": False,
    "_debug_dummy_optimization_barrier_op": False,
}
"""torch_xla's private tuning and debugging arguments, with its defaults.

xla_fsdp accepts them so that torch_xla code runs unchanged, and refuses any
value that would ask for behaviour it does not have: ``_shard_size_multiple``
pads torch_xla's shards for its TPU all-gather, while xla_fsdp's layout is
fixed by ``_layout.py``; the ``_debug_dummy_*`` switches replace collectives
with stand-ins. ``_use_xla_patched_linear`` may take either value, since
xla_fsdp never patches ``nn.Linear`` (its resharding hooks already keep
``weight.t()`` from holding full parameters), and ``_debug_msg`` any string.
"""
_ANY_VALUE = {"_use_xla_patched_linear", "_debug_msg"}


def check_private_options(values: dict[str, Any]) -> None:
    for name, default in PRIVATE_TORCH_XLA_DEFAULTS.items():
        value = values[name]
        if name not in _ANY_VALUE and value != default:
            raise ValueError(f"{name}={value!r} is not supported by xla_fsdp (only torch_xla's default "
                             f"{default!r}); see xla_fsdp._api.PRIVATE_TORCH_XLA_DEFAULTS")
