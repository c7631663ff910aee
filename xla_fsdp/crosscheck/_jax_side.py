"""The cross-check's JAX side: the reference FSDP on N JAX CPU devices.

Run as ``python -m xla_fsdp.crosscheck._jax_side WORKDIR`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` in the environment
(the cross-check sets it; this process never imports torch_xla). Writes
``jax_*.npz`` with the same keys as the torch side; a unit's shards are keyed by
the name of its first parameter (``xla_fsdp.reference.fsdp``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def run(workdir: Path) -> None:
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    from xla_fsdp.reference import fsdp

    configs = json.loads((workdir / "configs.json").read_text())
    for index, config in enumerate(configs):
        inputs = dict(np.load(workdir / f"inputs_{index}.npz"))
        names = [str(n) for n in inputs["param_names"]]   # torch's registration order
        full = {n: inputs[f"param:{n}"] for n in names}
        mesh = fsdp.make_mesh(config["world_size"])
        units = fsdp.plan_units(names, zero=config["zero"], flatten=config["flatten"])
        shards, layouts = fsdp.shard_params(full, mesh, units)
        opt_state = fsdp.init_opt_state(config["optimizer"], shards, mesh)
        step_fn = fsdp.make_train_step(config["model"], layouts, mesh, zero=config["zero"],
                                       optimizer=config["optimizer"], grad_ckpt=config["grad_ckpt"])
        batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(fsdp.AXIS))
        out = {}
        for step in range(config["steps"]):
            x = jax.device_put(inputs[f"x_{step}"], batch_sharding)
            y = jax.device_put(inputs[f"y_{step}"].astype(np.int32), batch_sharding)
            shards, opt_state, loss, grads = step_fn(shards, opt_state, x, y)
            out[f"loss/{step}"] = np.float64(loss)
            for key in shards:
                out[f"grad/{step}/{key}"] = np.asarray(grads[key])
                out[f"param/{step}/{key}"] = np.asarray(shards[key])
        for key, layout in layouts.items():
            out[f"members/{key}"] = np.array(layout.names)
        np.savez(workdir / f"jax_{index}.npz", **out)


if __name__ == "__main__":
    run(Path(sys.argv[1]))
