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
    flatten_parameters: bool = True
    """One flat shard per (dtype, requires_grad) instead of one shard per parameter."""
    execute_sharding_on_init: bool = True
    """Run the sharding graph at construction when the parameters are already on the device."""
    optimization_barrier_in_forward: bool = True
    """Barriers around the unit's inputs, outputs and all-gather input in forward."""
    optimization_barrier_in_backward: bool = True
    """Barriers around the unit's incoming gradients and reduce-scatter input."""
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
    """Pin the collectives' layouts (forced off on CPU devices, see ``_collectives.py``)."""
    reduce_scatter_bucket_size_mb: float = 0
    """Most gradient megabytes one reduce-scatter carries; 0: one per bucket of the unit."""
    param_init_fn: Optional[Callable[[nn.Module], None]] = None
    """Materialises parameters and buffers on the meta device."""

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

