"""Peak host memory of consolidating a large sharded checkpoint: ours against torch_xla's tool.

    .venv/bin/python -m benchmarks.consolidate_memory --size_gb 1.2 --tensors 300 --world_size 4

Writes a synthetic checkpoint in torch_xla's shard format (which both tools
read) under a temporary directory, then runs each tool in a fresh process and
reads that process's peak resident set size during the consolidation
(``VmHWM`` of ``/proc/self/status``, reset after the imports through
``/proc/self/clear_refs``) and its growth over the RSS after the imports.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

RUN = textwrap.dedent("""
    import sys, time
    tool, prefix, out = sys.argv[1:4]
    if tool == "xla_fsdp":
        from consolidate import consolidate_sharded_model_checkpoints
        kwargs = dict(progress=False)
    else:
        from torch_xla.distributed.fsdp import consolidate_sharded_model_checkpoints
        kwargs = {}
    def status(field):  # kB figures of /proc/self/status
        return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    base = status("VmRSS:")
    start = time.time()
    consolidate_sharded_model_checkpoints(prefix, "_rank-*.pth", out, **kwargs)
    print(base, status("VmHWM:"), time.time() - start)
""")


def write_checkpoint(directory: Path, size_bytes: int, tensors: int, world: int) -> tuple[str, int]:
    """torch_xla-format shard files of ``tensors`` unflattened fp32 parameters; returns (prefix, largest)."""
    numel = size_bytes // 4 // tensors
    rows = max(1, numel // 1000)
    shape = (rows, numel // rows)
    shard = -(-shape[0] * shape[1] // world)
    for rank in range(world):
        model, shard_info = {}, {}
        for i in range(tensors):
            key = f"_fsdp_shard_FSDP_SHARD_SEPARATOR_layer{i}_FSDP_SHARD_SEPARATOR_weight"
            model[key] = torch.full((shard,), float(i + rank))
            shard_info[key] = {"_orig_size": torch.Size(shape), "_orig_name": f"layer{i}.weight"}
        metadata = {"shard_info": {"": shard_info}, "flatten_info": {}, "buffer_info": {},
                    "world_size": world, "rank": rank}
        torch.save({"model": model, "shard_metadata": metadata},
                   directory / f"big_rank-{rank:08d}-of-{world:08d}.pth")
    return str(directory / "big"), shape[0] * shape[1] * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size_gb", type=float, default=1.2, help="total checkpoint size")
    parser.add_argument("--tensors", type=int, default=300, help="number of parameters")
    parser.add_argument("--world_size", type=int, default=4, help="number of shard files")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="consolidate_memory_") as tmp:
        prefix, largest = write_checkpoint(Path(tmp), int(args.size_gb * 2**30), args.tensors, args.world_size)
        total = sum(p.stat().st_size for p in Path(tmp).glob("big_rank-*.pth"))
        print(f"checkpoint: {total / 2**30:.2f} GiB in {args.world_size} files, {args.tensors} tensors, "
              f"largest full tensor {largest / 2**20:.1f} MiB\n")
        print("| tool | peak RSS | growth over imports | time |")
        print("|---|---:|---:|---:|")
        for tool in ("xla_fsdp", "torch_xla"):
            out = Path(tmp) / f"{tool}.pth"
            done = subprocess.run([sys.executable, "-c", RUN, tool, prefix, str(out)], capture_output=True,
                                  text=True)
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
            base, peak, seconds = done.stdout.split()[-3:]
            print(f"| {tool} | {int(peak) / 2**20:.0f} MiB | {(int(peak) - int(base)) / 2**20:.0f} MiB | "
                  f"{float(seconds):.1f} s |")
            out.unlink()
        time.sleep(0)


if __name__ == "__main__":
    main()
