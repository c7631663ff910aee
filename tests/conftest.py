"""Every test process gets 8 CPU XLA devices, enough for world sizes 1, 2, 4 and 8.

The environment must be set before the XLA runtime starts, so it is set here,
at collection time, before any test imports torch_xla's runtime.
"""

from xla_fsdp.testing import configure_cpu_devices

configure_cpu_devices(8)
