"""xla_fsdp: Fully Sharded Data Parallel for PyTorch on XLA devices.

A drop-in for ``torch_xla.distributed.fsdp``::

    from xla_fsdp import XlaFullyShardedDataParallel, checkpoint_module
    from xla_fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy
"""

from .checkpoint import checkpoint_module
from .fully_sharded_data_parallel import XlaFullyShardedDataParallel

__all__ = ["XlaFullyShardedDataParallel", "checkpoint_module"]
__version__ = "0.1.0"
