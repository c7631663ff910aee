"""A small JAX implementation of the FSDP algorithm, to cross-check xla_fsdp's numerics.

Run it in a process where ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
was set before JAX was imported (and where torch_xla is not imported: both
read ``XLA_FLAGS``). ``python -m xla_fsdp.crosscheck`` does that for you.

* ``models``: the cross-check models as pure functions of named parameters.
* ``optim``: SGD with momentum and AdamW with torch's exact formulas.
* ``fsdp``: sharding on a one-axis mesh named ``fsdp`` and the ZeRO-2 / ZeRO-3
  training step under ``jax.shard_map``.
"""
