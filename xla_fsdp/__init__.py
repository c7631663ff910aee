"""xla_fsdp: Fully Sharded Data Parallel for PyTorch on XLA devices.

A drop-in for ``torch_xla.distributed.fsdp``, with the same names::

    from xla_fsdp import (XlaFullyShardedDataParallel, checkpoint_module,
                          consolidate_sharded_model_checkpoints, consolidate_sharded_state_dicts)
    from xla_fsdp import capture_step   # trace a training step once, replay it (not in torch_xla)
    from xla_fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

The consolidation functions are the ``consolidate`` package's.

``xla_fsdp.patch_torch_xla()`` makes ``torch_xla.distributed.fsdp`` itself
resolve to these names, for code that cannot be edited (Hugging Face's
Trainer, accelerate, old programs); see ``xla_fsdp/_patch.py``.

The names are imported lazily, so that ``xla_fsdp.reference`` (the JAX
reference, run in a process of its own) can use ``xla_fsdp._layout`` without
importing torch_xla.
"""

__all__ = ["XlaFullyShardedDataParallel", "checkpoint_module", "capture_step", "CaptureError",
           "consolidate_sharded_model_checkpoints", "consolidate_sharded_state_dicts", "patch_torch_xla"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "XlaFullyShardedDataParallel":
        from .fully_sharded_data_parallel import XlaFullyShardedDataParallel
        return XlaFullyShardedDataParallel
    if name in ("capture_step", "CaptureError"):
        from . import _capture
        return getattr(_capture, name)
    if name == "checkpoint_module":
        from .checkpoint import checkpoint_module
        return checkpoint_module
    if name == "patch_torch_xla":
        from ._patch import patch_torch_xla
        return patch_torch_xla
    if name in ("consolidate_sharded_model_checkpoints", "consolidate_sharded_state_dicts"):
        import consolidate
        return getattr(consolidate, name)
    raise AttributeError(f"module 'xla_fsdp' has no attribute {name!r}")
