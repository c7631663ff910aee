"""How long a save stops training: synchronous against asynchronous save.

    .venv/bin/python -m benchmarks.checkpoint_stall --world_size 2 --width 1024 --saves 5

Trains an MLP (ZeRO-3 over ``--world_size`` CPU XLA devices, AdamW) and saves
a checkpoint every ``--every`` steps, once with ``async_save=False`` and once
with ``async_save=True``. The stall of a save is the time from the call until
the training loop gets control back; for asynchronous saves that is the host
copy plus the commit of the previous save (joined at the next call), and the
write runs while the next steps train. Prints a markdown table (median and
maximum stall per save, the checkpoint size, and the whole run's time).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from xla_fsdp.testing import run_on_cpu_devices


def run(world_size: int, width: int, saves: int, every: int, async_save: bool, root: str) -> dict:
    import torch
    import torch.nn as nn
    import torch_xla
    import torch_xla.core.xla_model as xm

    from xla_fsdp import XlaFullyShardedDataParallel as FSDP
    from xla_fsdp.sharded_checkpoint import save_sharded_checkpoint, wait_for_checkpoint

    def rank_fn(rank):
        gen = torch.Generator().manual_seed(0)
        layers = [nn.Linear(width, width) for _ in range(4)]
        with torch.no_grad():
            for layer in layers:
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * width ** -0.5)
        model = FSDP(nn.Sequential(*[m for layer in layers for m in (layer, nn.Tanh())]))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randn(8, width, generator=gen).to(torch_xla.device())
        stalls = []
        start = time.perf_counter()
        for step in range(1, saves * every + 1):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            torch_xla.sync()
            if step % every == 0:
                # torch_xla.sync() only queues a step: wait for the queued steps, which
                # are training time, so that the timer sees the save alone.
                xm.wait_device_ops()
                t = time.perf_counter()
                save_sharded_checkpoint(root, model, opt, step=step, keep_last_n=2, async_save=async_save)
                stalls.append(time.perf_counter() - t)
        wait_for_checkpoint()
        return stalls, time.perf_counter() - start

    results = run_on_cpu_devices(rank_fn, world_size)
    stalls = [max(r[0][i] for r in results) for i in range(saves)]   # the slowest rank holds everyone
    return {"stalls": stalls, "total": max(r[1] for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world_size", type=int, default=2)
    parser.add_argument("--width", type=int, default=1024, help="MLP width (4 layers of width x width)")
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--every", type=int, default=3, help="training steps between saves")
    args = parser.parse_args()
    params = 4 * (args.width * args.width + args.width)
    print(f"MLP of {params / 1e6:.1f}M parameters (checkpoint with AdamW state about "
          f"{params * 12 / 2**20:.0f} MiB), world size {args.world_size}, a save every {args.every} steps\n")
    print("| save | median stall (ms) | max stall (ms) | run time (s) |")
    print("|---|---|---|---|")
    for async_save in (False, True):
        with tempfile.TemporaryDirectory() as root:
            r = run(args.world_size, args.width, args.saves, args.every, async_save, f"{root}/ckpt")
        print(f"| {'async' if async_save else 'sync'} | {statistics.median(r['stalls']) * 1e3:.0f} | "
              f"{max(r['stalls']) * 1e3:.0f} | {r['total']:.2f} |")


if __name__ == "__main__":
    main()
