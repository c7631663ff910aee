"""What the collective check costs per training step ([Note: the collective check]).

    .venv/bin/python -m benchmarks.collective_check_cost --world_size 4 --blocks 12 --steps 20

Part 1 trains a stack of ``--blocks`` MLP blocks, each its own unflattened
ZeRO-3 unit (4 parameters, so 12 collectives per block and step), on
``--world_size`` CPU XLA devices under ``run_on_cpu_devices``, in two
processes taking turns: one with ``XLA_FSDP_CHECK_COLLECTIVES=0`` (the ranks
still meet before launching, without comparing) and one with the check on.
It reports the median step time of each, and, measured inside the checked
run, the host time the check itself spends per step and rank: recording each
collective, finding the caller's line, and comparing the logs (the wait for
the slowest rank at the step marker is not counted: the ranks wait there for
each other anyway).

Part 2 measures the exchange between processes that a TPU job would use:
``--world_size`` processes on this host meet through a TCPStore for
``--rounds`` checks of a log as long as the model's; it reports the median
time of a round. On a TPU pod the store's round trips cross the network.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time


def train(world_size: int, blocks: int, steps: int, width: int) -> dict:
    """Median step ms and, if the check is on, its host µs per step and rank (this process's setting)."""
    from xla_fsdp.testing import run_on_cpu_devices
    import torch
    import torch.nn as nn
    import torch_xla
    import torch_xla.core.xla_model as xm

    from xla_fsdp import XlaFullyShardedDataParallel as FSDP
    from xla_fsdp import _collective_check as check

    spent = {"record": 0, "site": 0, "compare": 0, "records": 0}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter_ns() - start
        return wrapper

    original_compare = check._GatherAll.reports_if_different

    def compare_only(self, report):   # the exchange itself is a wait, not counted
        reports = list(self.all_gather(report))
        start = time.perf_counter_ns()
        equal = all(r.records == reports[0].records for r in reports)
        spent["compare"] += time.perf_counter_ns() - start
        spent["records"] += len(report.records)
        return None if equal else reports

    check.record, check.call_site = timed("record", check.record), timed("site", check.call_site)
    check._GatherAll.reports_if_different = compare_only

    def rank_fn(rank):
        gen = torch.Generator().manual_seed(0)

        def block():
            b = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
            with torch.no_grad():
                for p in b.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * width ** -0.5)
            return FSDP(b)

        model = FSDP(nn.Sequential(*[block() for _ in range(blocks)]))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        x = torch.randn(8, width, generator=gen).to(torch_xla.device())
        times = []
        for step in range(steps):
            start = time.perf_counter()
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            torch_xla.sync()
            xm.wait_device_ops()
            times.append(time.perf_counter() - start)
        return times

    per_rank = run_on_cpu_devices(rank_fn, world_size)
    check._GatherAll.reports_if_different = original_compare
    warm = steps // 4
    step_ms = statistics.median(max(t[s] for t in per_rank) for s in range(warm, steps)) * 1e3
    checks = steps * world_size
    return {"step_ms": step_ms, "collectives_per_step": spent["records"] / checks if spent["records"] else 0,
            "check_us": {k: spent[k] / checks / 1e3 for k in ("record", "site", "compare")}}


STORE_ROUNDS = """
import datetime, json, sys, time, torch.distributed as dist
from xla_fsdp import _collective_check as check
rank, world, port, rounds, length = map(int, sys.argv[1:6])
store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=datetime.timedelta(seconds=60))
exchange = check.StoreExchange(store, rank, world, timeout_s=60)
log = tuple(check.Collective("all-gather", f"FSDP unit 'blocks.{i}'", 16386 + i, (4096,), "float32", ((0, 1, 2, 3),))
            for i in range(length))
times = []
for _ in range(rounds):
    start = time.perf_counter()
    assert exchange.reports_if_different(check.Report("here", log)) is None
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


def store_rounds(world_size: int, rounds: int, length: int) -> float:
    """Median ms of one check round through a TCPStore between ``world_size`` processes on this host."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", STORE_ROUNDS, str(r), str(world_size), str(port), str(rounds),
                               str(length)], stdout=subprocess.PIPE, text=True) for r in range(world_size)]
    per_rank = [json.loads(p.communicate(timeout=600)[0]) for p in procs]
    return statistics.median(max(t[i] for t in per_rank) for i in range(rounds // 4, rounds)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world_size", type=int, default=4, help="CPU XLA devices (ranks), and store processes")
    parser.add_argument("--blocks", type=int, default=12, help="ZeRO-3 units of two Linear layers each")
    parser.add_argument("--width", type=int, default=256, help="width of each Linear layer")
    parser.add_argument("--steps", type=int, default=20, help="training steps per run (the first quarter is warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each setting, taking turns")
    parser.add_argument("--rounds", type=int, default=200, help="check rounds through the store (part 2)")
    parser.add_argument("--_child", choices=["0", "1"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child is not None:
        print(json.dumps(train(args.world_size, args.blocks, args.steps, args.width)))
        return
    results = {"0": [], "1": []}
    for _ in range(args.repeats):
        for setting in ("0", "1"):
            env = {**os.environ, "XLA_FSDP_CHECK_COLLECTIVES": setting}
            env.pop("CPU_NUM_DEVICES", None)
            done = subprocess.run([sys.executable, "-m", "benchmarks.collective_check_cost", "--_child", setting,
                                   "--world_size", str(args.world_size), "--blocks", str(args.blocks),
                                   "--width", str(args.width), "--steps", str(args.steps)],
                                  env=env, capture_output=True, text=True, check=True)
            results[setting].append(json.loads(done.stdout.strip().splitlines()[-1]))
    off = statistics.median(r["step_ms"] for r in results["0"])
    on = statistics.median(r["step_ms"] for r in results["1"])
    cost = {k: statistics.median(r["check_us"][k] for r in results["1"]) for k in ("record", "site", "compare")}
    collectives = results["1"][0]["collectives_per_step"]
    store_ms = store_rounds(args.world_size, args.rounds, int(collectives))
    print(f"{args.world_size} ranks, {args.blocks} ZeRO-3 units, {collectives:.0f} collectives per step and rank\n")
    print("| check | step ms (median) | check's host µs per step and rank: record / caller's line / compare |")
    print("|---|---:|---|")
    print(f"| off (XLA_FSDP_CHECK_COLLECTIVES=0) | {off:.1f} | - |")
    print(f"| on (run_on_cpu_devices's default) | {on:.1f} | {sum(cost.values()):.0f}: "
          f"{cost['record']:.0f} / {cost['site']:.0f} / {cost['compare']:.0f} |")
    print(f"\nBetween {args.world_size} processes on this host, through a TCPStore: {store_ms:.2f} ms per check "
          f"(median of {args.rounds} rounds, a log of {collectives:.0f} collectives)")


if __name__ == "__main__":
    main()
