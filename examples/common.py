"""What the examples share: launching ranks, and consolidating their checkpoints.

On CPU XLA devices (the default here) the ranks are threads of this process,
run by ``xla_fsdp.testing.run_on_cpu_devices``; on a TPU VM (``PJRT_DEVICE=TPU``)
they are torch_xla's processes, started by ``torch_xla.launch``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable


def on_tpu() -> bool:
    return os.environ.get("PJRT_DEVICE", "CPU").upper() == "TPU"


def launch(fn: Callable[..., Any], num_devices: int, *args: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on every device; results by rank (CPU) or [] (TPU)."""
    if on_tpu():
        import torch_xla
        import torch_xla.runtime as xr

        def per_process(*a):
            fn(xr.global_ordinal(), xr.world_size(), *a)

        torch_xla.launch(per_process, args=args)
        return []
    from xla_fsdp.testing import run_on_cpu_devices
    # Exactly one device per rank, so that collectives over "all devices"
    # (xm.all_reduce with no groups) mean all ranks.
    os.environ["CPU_NUM_DEVICES"] = str(num_devices)
    return run_on_cpu_devices(lambda rank: fn(rank, num_devices, *args), num_devices)


def consolidate(prefix: str, save_path: Path) -> None:
    """``python -m consolidate`` on one run's shard files, as a user would run it."""
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-m", "consolidate", "--ckpt_prefix", prefix, "--ckpt_suffix", "_rank-*.pth",
                    "--save_path", str(save_path), "--overwrite", "--verify", "--no_progress"],
                   check=True, env=env)
