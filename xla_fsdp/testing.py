"""Run FSDP code on several CPU XLA devices in one process, as a TPU host runs them.

``run_on_cpu_devices(fn, num_devices, *args)`` calls ``fn(rank, *args)`` in one
thread per device and returns the results in rank order. It applies what
``shared/PLATFORM.md`` found necessary for collectives across CPU XLA devices:

1. a thread pool larger than the number of devices (``XLA_THREAD_POOL_SIZE``),
   since each device's execution blocks a worker while it waits in a
   collective;
2. no parameter aliasing (``XLA_ENABLE_PARAM_ALIASING=0``): a rank waiting on a
   donated buffer holds the GIL that the other ranks need to reach the
   collective. Memory figures taken with it off are not TPU figures;
3. ordered launches: while ``fn`` runs, ``torch_xla.sync()`` (and so
   ``xm.mark_step()`` and ``MpDeviceLoader``) launches each step's graph one
   rank after another, and no rank starts tracing its next step, or runs its
   step closures, before every rank has launched this one. Rank 0 compiles
   each distinct graph once; the others find it in torch_xla's compilation
   cache (shared by the threads) and launch within milliseconds, well inside
   XLA's 10 s rendezvous limit. Collectives that take
   no channel id (``xm.all_reduce`` in user code) then meet as well, provided
   the graph is the same on every rank: make rank-dependent values on the host
   and move them (``torch.full(..., rank).to(device)``), not as device constants.

Not needed for correctness but for speed, it also makes glibc keep freed host
memory for reuse (``keep_freed_host_memory``): otherwise every step
page-faults XLA's large buffers back in.

The environment must be set before the XLA runtime starts. The first call in a
process sets ``CPU_NUM_DEVICES`` (to ``num_devices``, or more if the variable
is already set); a later call may use any ``num_devices`` up to that. A world
smaller than the device count runs on devices ``0 .. num_devices-1``, and
``xla_fsdp`` learns its rank and world size from this helper (``xr.world_size()``
still reports the device count, so use the ``rank`` argument and
``num_devices`` in ``fn``).

Example::

    from xla_fsdp.testing import run_on_cpu_devices

    def train(rank, steps):
        model = XlaFullyShardedDataParallel(build_model().to(torch_xla.device()))
        ...
        return loss.item()

    if __name__ == "__main__":
        print(run_on_cpu_devices(train, 4, 10))   # [loss of rank 0, ..., rank 3]
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

R = TypeVar("R")

__all__ = ["run_on_cpu_devices", "configure_cpu_devices", "keep_freed_host_memory", "KEEP_FREED_HOST_MEMORY_ENV"]

_WAIT_SECONDS = 600.0


# glibc's mallopt() parameters (malloc.h) and the values keep_freed_host_memory sets.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_KEEP_FREED = {_M_ARENA_MAX: 1, _M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: -1, _M_TOP_PAD: 256 << 20}

KEEP_FREED_HOST_MEMORY_ENV = {
    "MALLOC_ARENA_MAX": str(_KEEP_FREED[_M_ARENA_MAX]),
    "MALLOC_MMAP_MAX_": str(_KEEP_FREED[_M_MMAP_MAX]),
    "MALLOC_TRIM_THRESHOLD_": str(2**63 - 1),  # "never": mallopt's -1, as an unsigned size
    "MALLOC_TOP_PAD_": str(_KEEP_FREED[_M_TOP_PAD]),
}
"""``keep_freed_host_memory``'s settings as glibc's environment variables, for
a process started with them (a benchmark's subprocess, say): then they hold
from its first allocation, whatever it imports."""


def keep_freed_host_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS.

    XLA's CPU runtime allocates every execution's buffers with ``malloc`` and
    frees them after it. glibc serves any block over 32 MB with a fresh
    ``mmap`` and unmaps it on ``free``, so every training step page-faults its
    whole working set back in, zero-filling it page by page: on this
    project's 2-core machine that was half the CPU time of a step of a
    48M-parameter MLP (``perf``: ``exc_page_fault``, ``clear_page_erms``), a
    cost a TPU does not have. With one arena that never uses ``mmap`` and
    never trims, freed blocks are reused from the next step on. The process
    then keeps its peak host memory until it exits.

    Process-wide and permanent, and only for glibc. Call it before importing
    torch: glibc fixes its number of arenas when a second thread first
    allocates, and importing torch starts a thread; called later, blocks
    that other threads allocate are still mapped and unmapped each time.
    ``configure_cpu_devices`` calls it. Returns whether it was applied.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return all(libc.mallopt(option, value) == 1 for option, value in _KEEP_FREED.items())


def configure_cpu_devices(num_devices: int) -> None:
    """Set the environment for ``num_devices`` CPU XLA devices, if the runtime has not started."""
    keep_freed_host_memory()
    import torch_xla
    if torch_xla._XLAC._xla_runtime_is_initialized():
        return
    os.environ["PJRT_DEVICE"] = "CPU"
    current = int(os.environ.get("CPU_NUM_DEVICES", "0") or 0)
    os.environ["CPU_NUM_DEVICES"] = str(max(current, num_devices))
    os.environ.setdefault("XLA_THREAD_POOL_SIZE", str(max(16, 2 * num_devices)))
    os.environ["XLA_ENABLE_PARAM_ALIASING"] = "0"


class _Aborted(RuntimeError):
    pass


class _OrderedLaunch:
    """Turnstile for ``torch_xla.sync``: see point 3 of the module docstring."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.launched = 0  # syncs launched so far, over all ranks
        self.calls = [0] * world_size
        self.failed = False
        self.cond = threading.Condition()

    def _wait(self, predicate: Callable[[], bool]) -> None:
        if not self.cond.wait_for(lambda: self.failed or predicate(), timeout=_WAIT_SECONDS):
            raise TimeoutError(f"a rank did not reach torch_xla.sync() within {_WAIT_SECONDS:.0f} s; "
                               "every rank must call it the same number of times")
        if self.failed:
            raise _Aborted("another rank failed")

    def sync(self, rank: int, launch: Callable[[], None]) -> None:
        with self.cond:
            turn = self.calls[rank] * self.world_size + rank
            self._wait(lambda: self.launched == turn)
        try:
            launch()
        finally:
            with self.cond:
                self.calls[rank] += 1
                self.launched += 1
                self.cond.notify_all()
        with self.cond:
            self._wait(lambda: self.launched >= self.calls[rank] * self.world_size)

    def fail(self) -> None:
        with self.cond:
            self.failed = True
            self.cond.notify_all()


_thread_rank = threading.local()
_run_lock = threading.Lock()


def run_on_cpu_devices(fn: Callable[..., R], num_devices: int, *args: Any) -> list[R]:
    """Run ``fn(rank, *args)`` on ``num_devices`` CPU XLA devices; return results by rank.

    An exception on any rank stops the others at their next ``torch_xla.sync()``
    and is re-raised here, with a note naming the failing rank.
    """
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    configure_cpu_devices(num_devices)
    import torch
    import torch_xla
    import torch_xla.core.xla_model as xm
    import torch_xla.runtime as xr
    from . import _collectives

    if xr.device_type() != "CPU":
        raise RuntimeError(f"run_on_cpu_devices needs PJRT_DEVICE=CPU; this process uses {xr.device_type()}")
    devices = xm.get_xla_supported_devices()
    if len(devices) < num_devices or len(devices) % num_devices:
        raise ValueError(
            f"this process has {len(devices)} CPU XLA devices (CPU_NUM_DEVICES is read once, when the "
            f"runtime starts); cannot run {num_devices} ranks on them. Set CPU_NUM_DEVICES to a multiple "
            f"of {num_devices} before the first XLA call")

    turnstile = _OrderedLaunch(num_devices)
    # The turnstile wraps the launch itself (torch_xla.sync's step marker), not
    # all of torch_xla.sync: step closures, which may read values (.item()),
    # run after it, once every rank has launched; a rank blocking on its own
    # results inside the turnstile would keep the others from launching.
    original_marker = torch_xla._XLAC._xla_step_marker

    def ordered_marker(device, devices, wait=False, reset_scope=True):
        rank = getattr(_thread_rank, "value", None)
        if rank is None:  # a thread that is not one of ours
            return original_marker(device, devices, wait=wait, reset_scope=reset_scope)
        turnstile.sync(rank, lambda: original_marker(device, devices, wait=False, reset_scope=reset_scope))
        if wait:
            xm.wait_device_ops(xm.xla_real_devices([device]))

    def run_rank(rank: int) -> R:
        device = devices[rank]
        torch_xla._XLAC._xla_set_default_device(device)
        xm.set_replication(torch.device(device), devices)
        _thread_rank.value = rank
        _collectives._thread_world.value = (rank, num_devices)
        try:
            return fn(rank, *args)
        except _Aborted:
            raise
        except BaseException as exc:
            turnstile.fail()
            note = f"(raised on rank {rank} of {num_devices} in run_on_cpu_devices)"
            if hasattr(exc, "add_note"):
                exc.add_note(note)
            else:  # Python 3.10: keep it where add_note would (its tracebacks do not print it)
                exc.__notes__ = [*getattr(exc, "__notes__", []), note]
            raise
        finally:
            _thread_rank.value = None
            _collectives._thread_world.value = None

    with _run_lock:
        torch_xla._XLAC._xla_step_marker = ordered_marker
        try:
            with ThreadPoolExecutor(max_workers=num_devices, thread_name_prefix="xla-rank") as pool:
                futures = [pool.submit(run_rank, r) for r in range(num_devices)]
                errors = [f.exception() for f in futures]
            real = [e for e in errors if e is not None and not isinstance(e, _Aborted)]
            if real:
                raise real[0]
            if any(errors):
                raise next(e for e in errors if e is not None)
            return [f.result() for f in futures]
        finally:
            torch_xla._XLAC._xla_step_marker = original_marker
