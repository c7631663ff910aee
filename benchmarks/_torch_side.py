"""The benchmark's torch contenders on N CPU XLA devices, interleaved step by step.

Run by ``benchmarks.fsdp_bench`` as ``python -m benchmarks._torch_side CONFIG.json OUT.json``, once per
model and group of contenders, with ``CPU_NUM_DEVICES=N`` and ``XLA_FLAGS=--xla_dump_to=DIR`` (for the
buffer assignments).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from xla_fsdp.crosscheck.models import BENCH, Size, build
from xla_fsdp.testing import configure_cpu_devices, run_on_cpu_devices

from tests.support import live_device_tensors, tensor_bytes

from ._hlo import buffer_assignment_peak, collective_bytes


LOCAL_NAME = "local fwd+bwd, no FSDP (lower bound)"
"""The unwrapped model's forward and backward on each device: no collectives, no optimizer step.
No data-parallel step on torch_xla can be faster, so it bounds what any FSDP here could reach."""


@dataclass(frozen=True)
class Contender:
    library: str      # "xla_fsdp", "torch_xla", "replicated" or "local"
    zero: int         # 2, 3, or 0 for replicated data parallel and the local lower bound
    ckpt: bool = False
    flatten: bool = True
    capture: bool = False     # xla_fsdp: the step through xla_fsdp.capture_step
    untokened: bool = False   # xla_fsdp: untokened_reduce_scatter=True (opt in)

    @property
    def name(self) -> str:
        """The contender and every option it sets; "(defaults)" when it sets none."""
        if self.library == "replicated":
            return "replicated DP (all-reduce)"
        if self.library == "local":
            return LOCAL_NAME
        options = (["flatten_parameters=True"] if self.flatten else []) + \
            (["untokened_reduce_scatter=True"] if self.untokened else []) + \
            (["pin_layout_in_collective_ops=False"] if self.library == "torch_xla" else [])
        return (f"{self.library} ZeRO-{self.zero}" + (" +ckpt" if self.ckpt else "")
                + (" captured" if self.capture else "") + " (" + (", ".join(options) or "defaults") + ")")


def contenders(quick: bool) -> list[Contender]:
    """Per configuration: xla_fsdp as a user gets it, captured, opt-in variants, and torch_xla alike."""
    variants = [(2, False, True), (3, False, True)] if quick else \
        [(2, False, True), (3, False, False), (3, True, False), (3, False, True), (3, True, True)]
    out = []
    for zero, ckpt, flatten in variants:
        out.append(Contender("xla_fsdp", zero, ckpt, flatten))
        if not ckpt and (not quick or zero == 3):
            out.append(Contender("xla_fsdp", zero, ckpt, flatten, capture=True))
        if not ckpt and not flatten:
            out.append(Contender("xla_fsdp", zero, ckpt, flatten, untokened=True))
        # torch_xla's own checkpoint_module dead-locks inside nested FSDP on CPU devices (PLATFORM.md).
        if not ckpt:
            out.append(Contender("torch_xla", zero, ckpt, flatten))
    return out + [Contender("replicated", 0), Contender("local", 0)]


def _wrap(c: Contender, model, world: int):
    import torch_xla
    if c.library in ("replicated", "local"):
        return model.to(torch_xla.device())
    if c.library == "xla_fsdp":
        from xla_fsdp import XlaFullyShardedDataParallel as FSDP
        from xla_fsdp import checkpoint_module
        # The benchmark's models trace the same graph on every rank, so the untokened
        # reduce-scatter's promise holds ([Note: the collective token]); only its opt-in row makes it.
        extra = {"untokened_reduce_scatter": True} if c.untokened else {}
    else:
        from torch_xla.distributed.fsdp import XlaFullyShardedDataParallel as FSDP
        from torch_xla.distributed.fsdp import checkpoint_module
        extra = {"pin_layout_in_collective_ops": False}   # the CPU setting of PLATFORM.md
    if c.zero == 3:
        for i, layer in enumerate(model.layers):
            model.layers[i] = FSDP(checkpoint_module(layer) if c.ckpt else layer, reshard_after_forward=True,
                                   flatten_parameters=c.flatten, **extra)
        return FSDP(model, flatten_parameters=c.flatten, **extra)
    return FSDP(model, reshard_after_forward=False, flatten_parameters=c.flatten, **extra)


def _persistent_bytes(runs: list[dict], device) -> None:
    """Set each run's ``persistent`` to the device bytes that go when it is deleted, after a sync.

    Every live tensor on the device counts (``tests.support.live_device_tensors``),
    wherever it is held, so a full parameter a wrapper keeps is seen; the
    contenders of a group share the device, so each run's figure is the drop
    when it alone is freed. The local lower bound borrows replicated DP's model
    and optimizer, and frees nothing of its own: its figure is None.
    """
    for i, run in enumerate(runs):
        if any(other["model"] is run["model"] for other in runs[:i]):
            run["persistent"] = None
    for run in runs:
        if "persistent" in run:
            del run["model"], run["opt"], run["fn"]
    for run in runs:
        if "model" not in run:
            continue
        before = tensor_bytes(live_device_tensors(device))
        del run["model"], run["opt"], run["fn"]   # a captured step holds the state it updates
        run["persistent"] = before - tensor_bytes(live_device_tensors(device))


def _dumped() -> set[str]:
    directory = os.environ.get("XLA_FSDP_BENCH_DUMP")
    return {p.name for p in Path(directory).glob("*buffer-assignment.txt")} if directory else set()


def groups(quick: bool) -> list[list[Contender]]:
    """The contenders in groups that take turns step by step (one ZeRO stage and flattening); see ``run_group``."""
    by_setting: dict[tuple, list[Contender]] = {}
    for c in contenders(quick):
        by_setting.setdefault((c.zero, c.flatten), []).append(c)
    return list(by_setting.values())


def _step_function(model, opt, c: Contender, world: int):
    """The contender's training step, as a function of the batch (what ``capture_step`` captures)."""
    import torch_xla.core.xla_model as xm

    def train_step(x, y):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if c.library == "replicated":
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            xm.all_reduce(xm.REDUCE_SUM, grads, scale=1.0 / world, pin_layout=False)
        if c.library != "local":
            opt.step()
        return loss.detach()

    if c.capture:
        from xla_fsdp import capture_step
        return capture_step(train_step)
    return train_step


def _step(run: dict, rank: int, world: int, x, y, device) -> None:
    """One training step of one contender; rank 0 records its timings and compilations.

    ``trace``: until the step function has traced its graph (a replay: until it returned, launched);
    ``host``: until the graph is launched (``torch_xla.sync()`` returned, or the captured call);
    ``host_cpu``: this thread's CPU time in that span (a lazy step's backward, traced on autograd's
    thread, is not in it; a replay runs in this thread only).
    """
    import torch_xla
    import torch_xla.core.xla_model as xm
    import torch_xla.debug.metrics as met

    c = run["contender"]
    before_files = _dumped() if rank == 0 else set()
    compiles0 = met.counter_value("UncachedCompile") or 0
    compile_ns0 = (met.metric_data("CompileTime") or (0, 0.0))[1]
    start, cpu = time.perf_counter(), time.thread_time()
    run["fn"](x, y)
    traced = time.perf_counter()
    if not c.capture:
        torch_xla.sync()
    launched, cpu = time.perf_counter(), time.thread_time() - cpu
    xm.wait_device_ops(xm.xla_real_devices([str(device)]))
    done = time.perf_counter()
    if rank == 0:
        run["times"].append(done - start)
        run["trace"].append(traced - start)
        run["host"].append(launched - start)
        run["host_cpu"].append(cpu)
        run["compiles"].append((met.counter_value("UncachedCompile") or 0) - compiles0)
        run["compile_s"].append(((met.metric_data("CompileTime") or (0, 0.0))[1] - compile_ns0) / 1e9)
        run["modules"].append(sorted(_dumped() - before_files))


def run_group(rank: int, world: int, model_name: str, size: Size, cfg: dict) -> dict:
    """Time one group of contenders, taking turns step by step.

    A group is one ZeRO stage and flattening: xla_fsdp and torch_xla in the
    same configuration, and xla_fsdp's checkpointed variant (the ratios the
    targets compare), or replicated DP with the local lower bound
    (``LOCAL_NAME``). A contender timed on its own was seen to run slower than
    the same contender taking turns (ViT ZeRO-3 on 8 devices: 1045 against
    833 ms), so no FSDP contender is timed alone.
    Each group runs in a process of its own (``fsdp_bench.run``): the process
    keeps the host memory it freed (``keep_freed_host_memory``), and all groups
    of the 48M-parameter MLP in one process outgrew 24 GiB at world size 8.
    """
    import torch_xla

    device = torch_xla.device()
    gen = torch.Generator().manual_seed(rank)
    shape = (size.mlp[0],) if model_name == "mlp" else size.image
    x = torch.randn(cfg["batch_per_device"], *shape, generator=gen).to(device)
    y = torch.randint(0, 10, (cfg["batch_per_device"],), generator=gen).to(device)
    runs = []
    for c in groups(cfg["quick"])[cfg["group"]]:
        replicated = next((r for r in runs if r["contender"].library == "replicated"), None) \
            if c.library == "local" else None
        if replicated:
            # The same unwrapped model, not a second copy: the replicated 48M-parameter
            # MLP on 8 devices with a copy beside it outgrew 24 GiB. The local step
            # never steps the optimizer, and replicated DP's step needs no state from it.
            model, opt = replicated["model"], replicated["opt"]
        else:
            model = _wrap(c, build(model_name, size=size), world)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=True)
        runs.append({"contender": c, "model": model, "opt": opt, "fn": _step_function(model, opt, c, world),
                     "times": [], "trace": [], "host": [], "host_cpu": [], "compiles": [], "compile_s": [],
                     "modules": []})
    for step in range(cfg["warmup"] + cfg["steps"]):
        for run in runs:
            _step(run, rank, world, x, y, device)
    _persistent_bytes(runs, device)
    if rank != 0:
        return {}
    results = []
    for run in runs:
        c = run["contender"]
        steady = run["times"][cfg["warmup"]:]
        graph = next((m for mods in reversed(run["modules"][:2]) for m in reversed(mods)), None)
        peak = collectives = None
        if graph:
            dump = Path(os.environ["XLA_FSDP_BENCH_DUMP"])
            peak = buffer_assignment_peak(dump / graph)
            hlo = dump / graph.replace("-buffer-assignment.txt", ".txt")
            collectives = collective_bytes(hlo.read_text(), world) if hlo.exists() else None
        results.append({
            "contender": c.name, **asdict(c),
            "step_s_median": statistics.median(steady),
            "trace_s_median": statistics.median(run["trace"][cfg["warmup"]:]),
            "host_s_median": statistics.median(run["host"][cfg["warmup"]:]),
            "host_cpu_s_median": statistics.median(run["host_cpu"][cfg["warmup"]:]),
            "first_steps_s": run["times"][:2],
            "compiles": sum(run["compiles"]), "compile_s": sum(run["compile_s"]),
            "recompiles_after_step_2": sum(run["compiles"][2:]),
            "persistent_bytes_per_rank": run["persistent"],
            "compiled_peak_bytes": peak, "collective_bytes_per_rank": collectives,
            "param_bytes": sum(p.numel() * 4 for p in build(model_name, size=size).parameters()),
        })
    return {"results": results}


def main(config_path: str, out_path: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
    world = cfg["world_size"]
    configure_cpu_devices(world)
    size = Size(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg["size"].items()}) \
        if cfg.get("size") else BENCH
    results = run_on_cpu_devices(run_group, world, world, cfg["model"], size, cfg)[0]["results"]
    Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
