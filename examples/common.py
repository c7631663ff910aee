"""What the examples share: launching ranks, handing rank 0's results back, consolidating.

One launch path. ``launch(fn, num_devices, *args)`` runs ``fn(rank, world_size,
*args)`` on every device by handing a module-level function,
``run_on_device(ordinal, fn, *args)``, to one of two launchers that both call it
the way ``torch_xla.launch`` does, with the device's ordinal first:

* ``PJRT_DEVICE`` set (``TPU`` on a TPU VM, or ``CPU`` to take the TPU path
  here): ``torch_xla.launch``. It spawns worker processes (one per chip on v4,
  one per chip with a thread for each of its two cores on v3; on CPU one
  worker with one device) and pickles ``run_on_device``, ``fn`` and ``args`` for
  them, so ``fn`` must be defined at module level and ``args`` must pickle.
* ``PJRT_DEVICE`` unset: ``--num_devices`` CPU XLA devices as threads of this
  process, through ``xla_fsdp.testing.run_on_cpu_devices`` (it orders the
  ranks' graph launches, which several CPU devices need; see
  ``shared/PLATFORM.md``).

``choose_launcher`` is the one place that tells them apart. Neither launcher
returns the ranks' results (``torch_xla.launch`` discards them), so rank 0
writes what the parent needs to a small JSON file (``write_rank0_summary``),
which the parent reads back (``read_rank0_summary``) on the host that ran
rank 0.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

TORCH_XLA_LAUNCH = "torch_xla.launch"
CPU_DEVICE_THREADS = "run_on_cpu_devices"


def choose_launcher(environ=os.environ) -> str:
    """``torch_xla.launch`` when the user picked a PJRT device, else the CPU-device helper."""
    device = environ.get("PJRT_DEVICE", "")
    if not device:
        return CPU_DEVICE_THREADS
    if device.upper() == "CPU" and int(environ.get("CPU_NUM_DEVICES", "1") or 1) > 1:
        raise SystemExit(
            f"PJRT_DEVICE=CPU with CPU_NUM_DEVICES={environ['CPU_NUM_DEVICES']}: several CPU devices under "
            "torch_xla.launch dead-lock in their collectives. Unset PJRT_DEVICE and CPU_NUM_DEVICES and pass "
            "--num_devices instead (the ranks then run as ordered threads of this process)")
    return TORCH_XLA_LAUNCH


def run_on_device(ordinal: int, fn: Callable[..., Any], *args: Any) -> Any:
    """What every device runs, under either launcher: ``fn(rank, world_size, *args)``."""
    import torch_xla.runtime as xr
    return fn(ordinal, xr.world_size(), *args)


def launch(fn: Callable[..., Any], num_devices: int, *args: Any) -> None:
    """Run ``fn(rank, world_size, *args)`` on every device; see the module docstring.

    ``num_devices`` is the number of CPU XLA devices when no PJRT device is
    set; with one, the launcher uses every device it finds.
    """
    if choose_launcher() == TORCH_XLA_LAUNCH:
        import torch_xla
        torch_xla.launch(run_on_device, args=(fn, *args))
        return
    from xla_fsdp.testing import run_on_cpu_devices
    # Exactly one device per rank, so that xr.world_size() and collectives over
    # "all devices" (xm.all_reduce with no groups) mean all ranks.
    os.environ["CPU_NUM_DEVICES"] = str(num_devices)
    run_on_cpu_devices(run_on_device, num_devices, fn, *args)


def _summary_path(prefix: str) -> Path:
    return Path(f"{prefix}_summary.json")


def write_rank0_summary(prefix: str, launched_at: float, **results: Any) -> None:
    """Rank 0's results for the parent process, with the host that wrote them."""
    record = {"host": socket.gethostname(), "launched_at": launched_at, **results}
    path = _summary_path(prefix)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


def read_rank0_summary(prefix: str, launched_at: float) -> Optional[dict]:
    """The summary of the run launched at ``launched_at``, if rank 0 ran on this host; else None."""
    path = _summary_path(prefix)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record["host"] != socket.gethostname() or record["launched_at"] != launched_at:
        return None  # another host's rank 0 (a pod), or an older run
    return record


def launch_time() -> float:
    """A stamp that tells this run's summary from an older one's."""
    return time.time()


def consolidate(prefix: str, world_size: int, save_path: Path) -> None:
    """``python -m consolidate`` on one run's shard files, as a user would run it."""
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-m", "consolidate", "--ckpt_prefix", prefix,
                    "--ckpt_suffix", f"_rank-*-of-{world_size:08d}.pth",
                    "--save_path", str(save_path), "--overwrite", "--verify", "--no_progress"],
                   check=True, env=env)
