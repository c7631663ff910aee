"""Memory benchmark: what each way of training keeps on the device and on the host, and the largest model it fits.

    .venv/bin/python -m benchmarks.memory_bench            # world sizes 4 and 8, a ~104M-parameter transformer
    .venv/bin/python -m benchmarks.memory_bench --quick    # world size 4, a tiny transformer

Contenders: torch_xla's FSDP (fp32, its only parameter dtype) and xla_fsdp in five modes (``_memory_side.MODES``):
fp32; bf16 compute (fp32 masters, ``compute_dtype=bf16``); pure bf16 (parameters, gradients and optimizer state
in bf16, stepped by ``xla_fsdp.optim.BF16AdamW`` with its Kahan compensation buffer); ``cpu_offload=True``
with fp32 and with bf16 compute. Each trains the
cross-check's ViT-style block stack (``xla_fsdp.crosscheck.models``, one ZeRO-3 unit per block, resharded after
forward) with AdamW, for a few steps on N CPU XLA devices (``xla_fsdp.testing.run_on_cpu_devices``). The sequence
(4 tokens) and batch (1 per device) are tiny on purpose: the figures measured are about parameters, gradients
and optimizer state, and a step must take seconds on two busy cores.

Measured per contender: the live XLA tensors on each device after the last step's sync, with the step's inputs
and outputs deleted (every tensor object on that device, so that a leak shows, not only the ones the model and
optimizer name); the compiled step's peak (XLA's buffer assignment, ``_hlo.py``); the bytes of parameters,
gradients and optimizer state on the host; the bytes moved between host and device per step (offload: each
shard uploaded in compute_dtype and its gradient downloaded in the same dtype, from the shards' shapes); the
collective bytes per rank of the step's HLO with their element types; the step time as a ratio to xla_fsdp fp32's.

The full benchmark runs each configuration in its own process, one after another (a fresh process counts no
tensor another configuration left, and keeps no host memory it freed), so its step-time ratios compare
consecutive processes rather than interleaved steps. ``--quick`` runs every mode of one world size the same way,
each in a process of its own, and subtracts what was live on a device before each mode started.

Settings that make these CPU figures differ from a TPU: parameter aliasing is off (``XLA_ENABLE_PARAM_ALIASING=0``,
needed for collectives across CPU devices, see PLATFORM.md), so the compiled peak holds both the old and the
new copy of everything a step updates on the device; host-device transfers are memory copies within one
machine, so offload's step-time cost here is not a TPU host's PCIe cost.

From the measured bytes per parameter, ``fit`` computes on paper the largest model each mode trains on a v3-8
and a v4-8 (``TPU_SYSTEMS``), under the activation assumption stated in ``ACTIVATIONS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from xla_fsdp.crosscheck.models import Size
from xla_fsdp.testing import KEEP_FREED_HOST_MEMORY_ENV

from ._memory_side import BASELINE, MODES, TORCH_XLA

# About 104M parameters: 6 blocks of width 1472 (17.3M each); 4 tokens of a 3x8x8 image in 4x4 patches.
# Few wide blocks rather than many narrow ones: tracing and compiling, per device, grow with the blocks.
FULL = Size(image=(3, 8, 8), vit_dim=1472, vit_heads=8, vit_patch=4, vit_blocks=6)
QUICK = Size(image=(3, 8, 8), vit_dim=64, vit_heads=2, vit_patch=4, vit_blocks=2)
CPU_SETTINGS = {"env": KEEP_FREED_HOST_MEMORY_ENV, "xla_flags": "--xla_cpu_multi_thread_eigen=false"}

GIB = 2**30
SOURCES = {
    "v3": "https://cloud.google.com/tpu/docs/v3",
    "v4": "https://cloud.google.com/tpu/docs/v4",
    "architecture": "https://cloud.google.com/tpu/docs/system-architecture-tpu-vm",
}
TPU_SYSTEMS = {
    # name: (world size = devices that each hold a shard, HBM per device, host RAM of the TPU VM)
    "v3-8": {"world_size": 8, "hbm_bytes": 16 * GIB, "host_bytes": 335 * 10**9, "device": "TensorCore (16 GiB)"},
    "v4-8": {"world_size": 4, "hbm_bytes": 32 * GIB, "host_bytes": 407 * 10**9, "device": "chip (32 GiB)"},
}
ACTIVATIONS = 0.25
"""Fraction of each device's HBM set aside for what does not scale with the sharded state: activations,
the gathered unit (and the next one, prefetched), XLA's temporaries. The rest holds the state that
persists between steps and, with offload, the step's uploaded shards (each gradient reuses its shard's buffer)."""
HOST_RAM_SOURCE = ("not stated on the stored Google Cloud pages above; v3-8: 335 GB as reported from inside a v3-8 TPU "
                   "VM (https://trisongz.medium.com/, 2021), v4-8: 407 GB, the figure commonly quoted for its "
                   "240-vCPU host, unverified here. The host bound scales linearly with it.")
HOST_USABLE = 0.9
"""Fraction of the TPU VM's RAM that the host-side state may take (the rest: OS, runtime, data loading)."""


def _run(cfg: dict, env: dict, workdir: Path, tag: str) -> list[dict]:
    cfg_path, out_path = workdir / f"{tag}.cfg.json", workdir / f"{tag}.out.json"
    cfg_path.write_text(json.dumps(cfg))
    done = subprocess.run([sys.executable, "-m", "benchmarks._memory_side", str(cfg_path), str(out_path)],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"benchmarks._memory_side failed ({tag}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(out_path.read_text())


def run(world_sizes, size: Size, steps: int, warmup: int, batch: int, one_process: bool,
        modes: list[str] | None = None, partial: Path | None = None) -> dict:
    """Results by world size, a list of one dict per mode; written to ``partial`` after each configuration."""
    base_env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PJRT_DEVICE", "CPU_NUM_DEVICES")}
    base_env.update(CPU_SETTINGS["env"])
    results: dict = {}
    modes = modes or [m.name for m in MODES]
    with tempfile.TemporaryDirectory(prefix="memory_bench_") as tmp:
        for world in world_sizes:
            results[world] = []
            for i, names in enumerate([modes] if one_process else [[m] for m in modes]):
                dump = Path(tmp) / f"dump_{world}_{i}"
                env = {**base_env, "CPU_NUM_DEVICES": str(world), "XLA_FSDP_BENCH_DUMP": str(dump),
                       "XLA_FLAGS": f"--xla_dump_to={dump} {CPU_SETTINGS['xla_flags']}"}
                cfg = {"world_size": world, "modes": names, "steps": steps, "warmup": warmup,
                       "batch_per_device": batch, "size": dataclasses.asdict(size)}
                results[world] += _run(cfg, env, Path(tmp), f"w{world}_{i}")
                if partial is not None:
                    partial.write_text(json.dumps(results, indent=1))
    return results



def per_param(row: dict) -> dict:
    """The row's figures per parameter of the model (P): the unit the largest-model estimate scales."""
    P, ranks = row["params"], row["per_rank"]
    device = max(r["live_device_bytes"] for r in ranks)
    return {
        # On the device, per device: what stays between steps, and what a step adds that scales with P
        # (offload: the uploaded shards, which live until the step's sync). With parameter aliasing, the
        # TPU default assumed throughout (on-device modes update their state in its own buffers), each
        # gradient takes its uploaded shard's buffer ([Note: CPU offload]): half the transfer bytes.
        "device_persistent": device / P,
        "device_in_step": (device + max(r["transfer_bytes"] for r in ranks) / 2) / P,
        "host": sum(r["host_bytes"] for r in ranks) / P,          # one host serves every device
        "transfer": max(r["transfer_bytes"] for r in ranks) / P,  # per device and step
    }


def fit(rows: list[dict], system: dict) -> list[dict]:
    """The largest model each mode trains on ``system``, from rows measured at its world size.

    P_max = min(device bound, host bound); device bound = (1 - ACTIVATIONS) * HBM / (device bytes per
    parameter in a step); host bound = HOST_USABLE * host RAM / (host bytes per parameter).
    """
    out = []
    for row in rows:
        b = per_param(row)
        device = b["device_in_step"]
        device_bound = (1 - ACTIVATIONS) * system["hbm_bytes"] / device if device > 0 else float("inf")
        host_bound = HOST_USABLE * system["host_bytes"] / b["host"] if b["host"] > 0 else float("inf")
        params = min(device_bound, host_bound)
        out.append({"mode": row["mode"]["name"], "device_bytes_per_param": device, "host_bytes_per_param": b["host"],
                    "max_params": params, "bound": "device" if device_bound <= host_bound else "host",
                    "host_needed_bytes": params * b["host"]})
    base = next((r["max_params"] for r in out if r["mode"] == TORCH_XLA), None)
    for r in out:
        r["vs_torch_xla"] = r["max_params"] / base if base else None
    return out


def _mib(x) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f}"


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _billions(x: float) -> str:
    return f"{x / 1e9:.1f}B"


def table(results: dict) -> list[str]:
    lines = []
    for world, rows in results.items():
        base = next((r for r in rows if r["mode"]["name"] == BASELINE), None)
        missing = [m.name for m in MODES if m.name not in {r["mode"]["name"] for r in rows}]
        lines += [f"## World size {world}", ""]
        if missing:
            lines += ["Not measured at this world size (the run was cut short): " + "; ".join(missing) + ".", ""]
        lines += ["| mode | device B/param persisting (per device) | live MiB/device (state MiB) | compiled peak MiB | "
                  "host B/param (all ranks) | host<->device MiB/step/device | step s | x fp32 | "
                  "all-gather MiB/rank | reduce-scatter MiB/rank | collective dtypes | optimizer |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for r in rows:
            b = per_param(r)
            live = max(x["live_device_bytes"] for x in r["per_rank"])
            state = max(x["state_device_bytes"] for x in r["per_rank"])
            coll = r["collective_bytes_per_rank"] or {}
            # A mode measured in a later batch (added to saved results) is compared with that batch's fp32 run.
            base_s = r.get("step_s_median_fp32_same_batch") or (base["step_s_median"] if base else None)
            ratio = r["step_s_median"] / base_s if base_s else None
            lines.append(
                f"| {r['mode']['name']} | {b['device_persistent']:.3f} | {_mib(live)} ({_mib(state)}) | "
                f"{_mib(r['compiled_peak_bytes'])} | {b['host']:.2f} | {_mib(b['transfer'] * r['params'])} | "
                f"{r['step_s_median']:.2f} | {_ratio(ratio)} | "
                f"{_mib(coll.get('all-gather'))} | {_mib(coll.get('reduce-scatter'))} | "
                f"{', '.join(coll.get('dtypes', [])) or '-'} | {r['optimizer']} |")
        lines.append("")
    return lines


def fit_table(results: dict) -> list[str]:
    lines = ["## Largest trainable model, on paper", "",
             f"Device bound: (1 - {ACTIVATIONS}) x HBM per device / (device bytes per parameter in a step): "
             f"{ACTIVATIONS:.0%} of each device's HBM is set aside for activations, the gathered unit (and the "
             "prefetched next one) and XLA's temporaries, none of which scale with the sharded state; the rest "
             "holds what persists between steps and, with offload, the step's uploaded shards. This assumes "
             "parameter aliasing, torch_xla's default on a TPU: the on-device modes update their state in its "
             "own buffers, and offload writes each gradient into its uploaded shard's buffer (tested at world "
             "size 1, tests/test_offload.py; these CPU runs have aliasing off, so their compiled peaks hold both). "
             f"Host bound: {HOST_USABLE:.0%} of the TPU VM's RAM / (host bytes per parameter, all "
             "ranks together). Bytes per parameter are this run's, at the system's world size. HBM: "
             f"{SOURCES['v3']} (v3: 32 GiB per chip, two TensorCores, one XLA device each: 16 GiB), "
             f"{SOURCES['v4']} (v4: 32 GiB per chip, one XLA device per chip), {SOURCES['architecture']}. "
             "Host RAM (" + ", ".join(f"{n}: {s['host_bytes'] / 2**30:.0f} GiB" for n, s in TPU_SYSTEMS.items())
             + f"): {HOST_RAM_SOURCE}", ""]
    for name, system in TPU_SYSTEMS.items():
        rows = results.get(str(system["world_size"]))
        if not rows:
            lines += [f"{name}: not measured (no world size {system['world_size']} in this run).", ""]
            continue
        lines += [f"### {name}: {system['world_size']} devices x {system['hbm_bytes'] / 2**30:.0f} GiB HBM, "
                  f"{system['host_bytes'] / 2**30:.0f} GiB host RAM", "",
                  "| mode | device B/param in a step (per device) | host B/param | largest model | limited by | "
                  "host RAM needed | x torch_xla FSDP |", "|---|---:|---:|---:|---|---:|---:|"]
        for r in fit(rows, system):
            lines.append(f"| {r['mode']} | {r['device_bytes_per_param']:.3f} | {r['host_bytes_per_param']:.2f} | "
                         f"{_billions(r['max_params'])} | {r['bound']} | {r['host_needed_bytes'] / 2**30:.0f} GiB | "
                         f"{_ratio(r['vs_torch_xla'])} |")
        lines.append("")
    return lines


def report(results: dict, args, size: Size) -> str:
    import torch
    import torch_xla
    any_rows = [r for rows in results.values() for r in rows]
    params = any_rows[0]["params"] if any_rows else 0
    lines = ["# Memory benchmark" + (" (--quick)" if args.quick else ""), "",
             f"Machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python "
             f"{platform.python_version()}; torch {torch.__version__}, torch_xla {torch_xla.__version__}. CPU XLA "
             "devices; XLA_ENABLE_PARAM_ALIASING=0; torch_xla FSDP with pin_layout_in_collective_ops=False. Every "
             "process: " + " ".join(f"{k}={v}" for k, v in CPU_SETTINGS["env"].items())
             + f", XLA_FLAGS {CPU_SETTINGS['xla_flags']}.", "",
             f"Model: the cross-check's ViT-style stack, {params / 1e6:.1f}M parameters ({dataclasses.asdict(size)}), "
             "one ZeRO-3 unit per layer (reshard_after_forward=True) under a root unit; AdamW (lr 1e-4); batch "
             f"{args.batch_per_device} per device, {(size.image[1] // size.vit_patch) ** 2} tokens. Step time: "
             f"median of {args.steps} steps after {args.warmup} warm-up steps. "
             + ("Each mode in a process of its own, one after another (--quick too)." if args.quick else
                "Each configuration in its own process, one after another: the ratios compare consecutive "
                "processes on a shared, busy machine, not interleaved steps.")
             + (" Modes added to saved results from a later batch (their own process each, beside a fresh fp32 "
                "run) are compared with that batch's fp32 step time." if any("step_s_median_fp32_same_batch" in r
                                                                             for r in any_rows) else ""), "",
             "Columns: *device B/param persisting*: bytes of all live XLA tensors on a device after the last step's "
             "sync, inputs and outputs deleted, per parameter of the model (the worst device); *live MiB/device*: "
             "the same in MiB, with the bytes of the parameters, gradients and optimizer state the wrapper and "
             "optimizer name in brackets (a difference is held by something else); *compiled peak*: the largest "
             "buffer-assignment peak among the step's graphs (aliasing off: a graph's updated state is counted "
             "twice); *host B/param*: parameters, gradients and optimizer state on the host, all ranks; "
             "*host<->device*: offload's uploaded shards plus downloaded gradients per step and device (from their "
             "shapes and dtypes); *collectives*: per rank per step, from the step's HLO (an all-gather's result, "
             "a reduce-scatter's operand).", ""]
    lines += table(results)
    lines += fit_table(results)
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="world size 4, a tiny transformer, every mode in one process, 3 steps")
    parser.add_argument("--world_sizes", type=int, nargs="+", default=[4, 8], help="numbers of devices")
    parser.add_argument("--modes", nargs="+", choices=[m.name for m in MODES], metavar="MODE",
                        help="run only these modes, in this order (default: all: "
                             + "; ".join(m.name for m in MODES) + ")")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    parser.add_argument("--batch_per_device", type=int, default=1, help="batch size per device")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="folder for the report")
    parser.add_argument("--from_json", type=Path,
                        help="write the report from saved results (e.g. a .partial.json) instead of running")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    if args.quick:
        args.world_sizes, args.steps, args.warmup = [4], 1, 2
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("memory_bench_quick" if args.quick else "memory_bench")
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        # A process per mode, --quick too: in one process a mode freed what an earlier one had left on the
        # device while it was being measured. (One such process also ended in "double free or corruption";
        # the ranks then counted live tensors at the same time, which resurrects tensors that another
        # rank's thread is freeing, the cause later seen in CI; they now take turns, tests.support.in_turn.)
        results = run(args.world_sizes, size, args.steps, args.warmup, args.batch_per_device, False,
                      args.modes, partial=stem.with_suffix(".partial.json"))
    results = {str(world): rows for world, rows in results.items()}
    text = report(results, args, size)
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    if not args.from_json:
        stem.with_suffix(".partial.json").unlink(missing_ok=True)
    print(text)


if __name__ == "__main__":
    main()
