"""Host time per step with and without ``capture_step``, as the model grows deeper.

    .venv/bin/python -m benchmarks.capture_bench                 # ViT stack, 6/12/24 blocks, world size 4
    .venv/bin/python -m benchmarks.capture_bench --quick         # 2/4 blocks, world size 2: under a minute

For each depth, one process runs four contenders on N CPU XLA devices,
taking turns step by step: xla_fsdp ZeRO-3 (one unit per block) at its
defaults (unflattened) and with ``flatten_parameters=True``, each traced
every step (lazy) and through ``capture_step``. The step is
``zero_grad, forward, backward, SGD(momentum) step`` on a fixed batch.

Per contender, on rank 0:

* **host ms**: wall time from the start of a step until its graph is
  launched (lazy: the step function and ``torch_xla.sync()`` returning;
  captured: the call returning), with the devices idle at its start. It is
  what the host spends before the device can run the step. Under
  ``run_on_cpu_devices`` the N ranks are threads sharing one interpreter, so
  rank 0's figure includes waiting for the other ranks to launch too.
* **CPU ms**: rank 0's own thread CPU time in that span. Exact for a replay,
  which runs in the calling thread only; a lazy step's backward is traced on
  autograd's device thread, which this leaves out (so it understates the
  lazy step).
* **step ms**: until the step's graph has run (median).
* **first steps s**: the first two calls each (the first graph, then the
  steady one: lazily compiled, or captured and compiled).

Writes ``capture_bench[_quick].md`` and ``.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from xla_fsdp.testing import KEEP_FREED_HOST_MEMORY_ENV

CONTENDERS = (("defaults (unflattened)", False, False), ("defaults (unflattened)", False, True),
              ("flatten_parameters=True", True, False), ("flatten_parameters=True", True, True))
XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false"


def _rank(rank: int, depth: int, cfg: dict) -> list[dict]:
    import torch
    import torch.nn.functional as F
    import torch_xla
    import torch_xla.core.xla_model as xm

    from xla_fsdp import XlaFullyShardedDataParallel as FSDP
    from xla_fsdp import capture_step
    from xla_fsdp.crosscheck.models import BENCH, build

    size = dataclasses.replace(BENCH, vit_blocks=depth)
    device = torch_xla.device()
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(cfg["batch"], *size.image, generator=gen).to(device)
    y = torch.randint(0, 10, (cfg["batch"],), generator=gen).to(device)
    runs = []
    for options, flatten, captured in CONTENDERS:
        model = build("vit", size=size)
        for i, layer in enumerate(model.layers):
            model.layers[i] = FSDP(layer, flatten_parameters=flatten)
        model = FSDP(model, flatten_parameters=flatten)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def train_step(x, y, model=model, opt=opt):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss.detach()

        runs.append({"options": options, "captured": captured, "run": capture_step(train_step) if captured
                     else train_step, "host": [], "cpu": [], "step": [], "first": []})
    for step in range(cfg["warmup"] + cfg["steps"]):
        for run in runs:
            xm.wait_device_ops(xm.xla_real_devices([str(device)]))
            start, cpu = time.perf_counter(), time.thread_time()
            run["run"](x, y)
            if not run["captured"]:
                torch_xla.sync()
            launched, cpu = time.perf_counter(), time.thread_time() - cpu
            xm.wait_device_ops(xm.xla_real_devices([str(device)]))
            done = time.perf_counter()
            if step < 2:
                run["first"].append(done - start)
            elif step >= cfg["warmup"]:
                run["host"].append(launched - start)
                run["cpu"].append(cpu)
                run["step"].append(done - start)
    if rank:
        return []
    return [{"depth": depth, "options": r["options"], "captured": r["captured"],
             "host_ms": 1e3 * statistics.median(r["host"]), "cpu_ms": 1e3 * statistics.median(r["cpu"]),
             "step_ms": 1e3 * statistics.median(r["step"]), "first_steps_s": r["first"],
             "captures": r["run"].captures if r["captured"] else None} for r in runs]


def _child(cfg_path: str, out_path: str) -> None:
    from xla_fsdp.testing import configure_cpu_devices, run_on_cpu_devices

    cfg = json.loads(Path(cfg_path).read_text())
    configure_cpu_devices(cfg["world_size"])
    rows = run_on_cpu_devices(_rank, cfg["world_size"], cfg["depth"], cfg)[0]
    Path(out_path).write_text(json.dumps(rows))


def run(depths, world: int, steps: int, warmup: int, batch: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PJRT_DEVICE", "CPU_NUM_DEVICES")}
    env.update(KEEP_FREED_HOST_MEMORY_ENV, XLA_FLAGS=XLA_FLAGS, CPU_NUM_DEVICES=str(world))
    rows = []
    with tempfile.TemporaryDirectory(prefix="capture_bench_") as tmp:
        for depth in depths:
            cfg = {"world_size": world, "depth": depth, "steps": steps, "warmup": warmup, "batch": batch}
            cfg_path, out_path = Path(tmp) / f"{depth}.json", Path(tmp) / f"{depth}.out.json"
            cfg_path.write_text(json.dumps(cfg))
            done = subprocess.run([sys.executable, "-m", "benchmarks.capture_bench", "--child", str(cfg_path),
                                   str(out_path)], env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"depth {depth} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            rows += json.loads(out_path.read_text())
    return rows


def report(rows: list[dict], world: int, depths, steps: int, warmup: int, batch: int) -> str:
    import torch
    import torch_xla

    lines = [
        "# capture_step: host time per step against depth", "",
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}; torch "
        f"{torch.__version__}, torch_xla {torch_xla.__version__}. World size {world} (CPU XLA devices, threads of "
        f"one process), ViT-style stack (width 192) of {', '.join(map(str, depths))} blocks, one ZeRO-3 unit per "
        f"block, batch {batch} per device, SGD with momentum. Medians of {steps} steps after {warmup}. "
        f"XLA_FLAGS={XLA_FLAGS}; glibc keeps freed memory. See benchmarks/capture_bench.py for what each column "
        "measures.", "",
        "| blocks | options | step | host ms | CPU ms | step ms | first two steps s | captures |",
        "|---:|---|---|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['depth']} | {r['options']} | {'captured' if r['captured'] else 'lazy'} | "
                     f"{r['host_ms']:.2f} | {r['cpu_ms']:.2f} | {r['step_ms']:.1f} | "
                     f"{' + '.join(f'{s:.1f}' for s in r['first_steps_s'])} | {r['captures'] or '-'} |")
    lines += ["", "Ratios (same run):", ""]
    shallow, deep = min(depths), max(depths)

    def each(pairs, value) -> str:
        return ", ".join(f"{value(lazy, cap)} at {d}" for d, lazy, cap in pairs)

    for options in dict.fromkeys(r["options"] for r in rows):
        by = {(r["depth"], r["captured"]): r for r in rows if r["options"] == options}
        pairs = [(d, by[(d, False)], by[(d, True)]) for d in depths]
        cap_shallow, cap_deep = by[(shallow, True)], by[(deep, True)]
        lines.append(
            f"- {options}: captured host ms at {deep} / at {shallow} blocks "
            f"{cap_deep['host_ms'] / cap_shallow['host_ms']:.2f} (CPU ms "
            f"{cap_deep['cpu_ms'] / cap_shallow['cpu_ms']:.2f}); lazy / captured host ms "
            + each(pairs, lambda lazy, cap: f"{lazy['host_ms'] / cap['host_ms']:.0f}x")
            + "; captured / lazy step time " + each(pairs, lambda lazy, cap: f"{cap['step_ms'] / lazy['step_ms']:.2f}")
            + "; second step (captured and compiled / lazily compiled) "
            + each(pairs, lambda lazy, cap: f"{cap['first_steps_s'][1] / lazy['first_steps_s'][1]:.2f}"))
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[6, 12, 24], help="numbers of blocks")
    parser.add_argument("--world_size", type=int, default=4, help="CPU XLA devices")
    parser.add_argument("--steps", type=int, default=8, help="steps timed, after the warm-up")
    parser.add_argument("--warmup", type=int, default=3, help="steps not timed (the first two compile)")
    parser.add_argument("--batch", type=int, default=8, help="images per device")
    parser.add_argument("--quick", action="store_true", help="2 and 4 blocks on 2 devices, 3 timed steps")
    parser.add_argument("--out", default="benchmarks/results", help="directory for the .md and .json")
    args = parser.parse_args()
    if args.quick:
        args.depths, args.world_size, args.steps = [2, 4], 2, 3
    rows = run(args.depths, args.world_size, args.steps, args.warmup, args.batch)
    name = "capture_bench_quick" if args.quick else "capture_bench"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    text = report(rows, args.world_size, args.depths, args.steps, args.warmup, args.batch)
    (out / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
