"""The benchmark's JAX contenders: the reference FSDP, jit-compiled, on N JAX CPU devices.

Run by ``benchmarks.fsdp_bench`` as ``python -m benchmarks._jax_side CONFIG.json OUT.json`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (never in a torch_xla process).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def main(config_path: str, out_path: str) -> None:
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    from jax.sharding import NamedSharding, PartitionSpec as P

    from xla_fsdp.crosscheck.models import BENCH, Size, build
    from xla_fsdp.reference import fsdp

    from ._hlo import collective_bytes

    cfg = json.loads(Path(config_path).read_text())
    world = cfg["world_size"]
    size = Size(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg["size"].items()}) \
        if cfg.get("size") else BENCH
    variants = [(2, False), (3, False)] if cfg["quick"] else [(2, False), (3, False), (3, True)]
    mesh = fsdp.make_mesh(world)
    out = {}
    for model_name in cfg["models"]:
        full = {k: v.numpy() for k, v in build(model_name, size=size).state_dict().items()}
        rng = np.random.default_rng(0)
        shape = (size.mlp[0],) if model_name == "mlp" else size.image
        batch = cfg["batch_per_device"] * world
        sharding = NamedSharding(mesh, P(fsdp.AXIS))
        x = jax.device_put(rng.standard_normal((batch, *shape), dtype=np.float32), sharding)
        y = jax.device_put(rng.integers(0, 10, batch).astype(np.int32), sharding)
        results = []
        for zero, ckpt in variants:
            shards, layouts = fsdp.shard_params(full, mesh)
            state = fsdp.init_opt_state("sgd", shards, mesh)
            step = fsdp.make_train_step(model_name, layouts, mesh, zero=zero, optimizer="sgd", grad_ckpt=ckpt,
                                        size=size)
            start = time.perf_counter()
            lowered = step.lower(shards, state, x, y)
            traced = time.perf_counter()
            compiled = lowered.compile()
            compile_s = time.perf_counter() - traced
            times, dispatch = [], []
            for i in range(cfg["warmup"] + cfg["steps"]):
                t0 = time.perf_counter()
                shards, state, loss, grads = compiled(shards, state, x, y)
                t1 = time.perf_counter()
                jax.block_until_ready((shards, state, loss, grads))
                if i >= cfg["warmup"]:
                    times.append(time.perf_counter() - t0)
                    dispatch.append(t1 - t0)
            memory = compiled.memory_analysis()
            peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                    - memory.alias_size_in_bytes) if memory is not None else None
            live = jax.tree_util.tree_leaves((shards, state, grads))
            persistent = sum(a.addressable_shards[0].data.nbytes for a in live if a.ndim > 0)
            results.append({
                "contender": f"JAX reference ZeRO-{zero}" + (" +ckpt" if ckpt else ""), "library": "jax",
                "zero": zero, "ckpt": ckpt, "flatten": False,
                "step_s_median": statistics.median(times), "trace_s_median": statistics.median(dispatch),
                "host_s_median": statistics.median(dispatch),  # JAX's dispatch launches the compiled step
                "host_cpu_s_median": None,
                "trace_once_s": traced - start, "compiles": 1, "compile_s": compile_s, "recompiles_after_step_2": 0,
                "persistent_bytes_per_rank": persistent, "compiled_peak_bytes": peak,
                "collective_bytes_per_rank": collective_bytes(compiled.as_text(), world),
                "param_bytes": sum(v.nbytes for v in full.values()),
            })
        out[model_name] = results
    Path(out_path).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
