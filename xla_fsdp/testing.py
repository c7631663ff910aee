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
   ``xm.mark_step()`` and ``MpDeviceLoader``) waits until every rank has
   reached its step marker, then launches each step's graph one rank after
   another, and no rank starts tracing its next step, or runs its step
   closures, before every rank has launched this one. Rank 0 compiles each
   distinct graph once; the others find it in torch_xla's compilation cache
   (shared by the threads) and launch within milliseconds, well inside XLA's
   10 s rendezvous limit. Since no rank launches before all have arrived, a
   rank that raises in the middle of a step stops the others at their step
   marker, before any of them waits in a collective, with an error naming it;
4. the collective check, on by default here (``XLA_FSDP_CHECK_COLLECTIVES=0``
   turns it off): at each step marker, before anything launches, the ranks
   compare the collectives they traced, and on a difference every rank raises
   the same ``CollectiveMismatchError`` (see [Note: the collective check] in
   ``_collective_check.py``);
5. channel ids for collectives that user code issues without one
   (``xm.all_reduce``, which takes none, and ``xm.all_gather`` /
   ``xm.reduce_scatter`` called without ``channel_id``): the k-th of a step
   gets ``_channels.user_channel(k)``, so ranks meet by channel id even when
   they run such a graph on their own, as a host read before the step marker
   does. ``xm.all_reduce`` is therefore built here from a reduce-scatter and an
   all-gather, the two halves of a ring all-reduce (same bytes per rank, one
   more collective; its result the same on every rank). The graph must still
   be the same on every rank: make rank-dependent values on the host and move
   them (``torch.full(..., rank).to(device)``), not as device constants.

It also works after the process has run autograd on the host (a reference
model trained on the CPU first): PyTorch's autograd engine sizes its
per-device queues at the first backward of the process, when torch_xla still
reports no devices, and the helper makes the missing queues before ``fn`` runs
(see ``_ensure_autograd_serves_xla_devices``).

Not needed for correctness but for speed, it also makes glibc keep freed host
memory for reuse (``keep_freed_host_memory``): otherwise every step
page-faults XLA's large buffers back in.

The environment must be set before the XLA runtime starts. The first call in a
process sets ``CPU_NUM_DEVICES`` (to ``num_devices``, or more if the variable
is already set); a later call may use any ``num_devices`` up to that. A world
smaller than the device count runs on devices ``0 .. num_devices-1``.

Programs written for a TPU run unchanged: while ``fn`` runs, in its threads
only, ``xr.world_size()``, ``xr.global_ordinal()`` (and so
``xm.is_master_ordinal()``, ``xm.master_print``, ``xm.save``) report the
helper's world and rank; ``xm.rendezvous``, ``xm.xla_rendezvous`` and
``xm.mesh_reduce`` are host exchanges between the threads; ``xm.all_reduce``,
``xm.all_gather`` and ``xm.reduce_scatter`` without ``groups`` reduce over
the helper's world (see ``_torch_xla_replacements``). ``xla_fsdp`` reads its
default rank and world size from ``xr`` too, so it needs nothing else. Reading a value to the
host (``.item()``, ``.cpu()``) works anywhere: before a step marker such a read
runs that rank's pending graph alone, outside the ordered launches, and its
collectives meet the other ranks' by channel id (point 5), provided every rank
makes the same read. A read that one rank alone makes of a collective's result
still waits for ranks that never run it, and XLA aborts the process after 10 s:
the collective check cannot see it (it runs at step markers).

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

import contextlib
import functools
import os
import threading
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from . import _collective_check
from ._channels import user_channel

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


def _autograd_engine_native_calls():
    """(get_default_engine, start_device_threads) from libtorch, or None if not found."""
    import ctypes
    import torch

    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        get_engine = lib._ZN5torch8autograd6Engine18get_default_engineEv
        start_threads = lib._ZN5torch8autograd6Engine20start_device_threadsEv
    except (OSError, AttributeError):
        return None
    get_engine.restype = ctypes.c_void_p
    start_threads.argtypes = [ctypes.c_void_p]
    return get_engine, start_threads


def _backward_reaches(device: str) -> bool:
    """Whether a backward on ``device`` gets a queue from the autograd engine."""
    import torch

    leaf = torch.zeros((), device=device, requires_grad=True)
    try:
        (leaf * 2).backward()
    except RuntimeError as exc:
        if "device_ready_queues_" not in str(exc):
            raise
        return False
    return True


def _ensure_autograd_serves_xla_devices(devices: list[str]) -> None:
    """Give PyTorch's autograd engine a queue per XLA device if it started without them.

    The engine makes one ready queue and worker thread per accelerator device
    at the first backward of the process, sized by the device count each
    backend reports then, and never again. torch_xla reports 0 devices until
    its runtime starts, so a process whose first backward ran on the host (a
    reference model trained on the CPU first) fails its first XLA backward
    with ``device.index() < device_ready_queues_.size()`` (pytorch/xla issue
    4174). The engine's own start routine, called once more now that the
    runtime is up, makes the missing queues; it is only called when the engine
    has none (it would otherwise wait for threads it already counted).
    """
    if _backward_reaches(devices[-1]):
        return
    native = _autograd_engine_native_calls()
    if native is None:
        raise RuntimeError(
            "PyTorch's autograd engine started before the XLA runtime (a backward ran on the host "
            "first), so it has no queue for XLA devices, and this torch build does not expose "
            "Engine::start_device_threads to restart it. Start the runtime before the first "
            "backward: call torch_xla.device() first")
    get_engine, start_threads = native
    start_threads(get_engine())
    if not _backward_reaches(devices[-1]):
        raise RuntimeError("could not give PyTorch's autograd engine queues for the XLA devices")


def configure_cpu_devices(num_devices: int) -> None:
    """Set the environment for ``num_devices`` CPU XLA devices, if the runtime has not started."""
    keep_freed_host_memory()
    from . import _torch_xla_private as _private
    if _private.runtime_is_initialized():
        return
    os.environ["PJRT_DEVICE"] = "CPU"
    current = int(os.environ.get("CPU_NUM_DEVICES", "0") or 0)
    os.environ["CPU_NUM_DEVICES"] = str(max(current, num_devices))
    os.environ.setdefault("XLA_THREAD_POOL_SIZE", str(max(16, 2 * num_devices)))
    os.environ["XLA_ENABLE_PARAM_ALIASING"] = "0"


_STEP_MARKER = "torch_xla.sync()"
"""The host exchange's tag at a step marker (every rank meets there before any launches)."""
_MEET_THE_SAME_WAY = ("Every rank must call torch_xla.sync() and the rendezvous the same number of times, in "
                      "the same order")


class _Aborted(BaseException):
    """Raised in a rank waiting to launch once another rank has failed.

    A ``BaseException``, as ``KeyboardInterrupt`` is, so that a rank's own
    ``except Exception`` cannot turn it into an error of its own that would be
    reported instead of the failure that stopped the run.
    """


class _OrderedLaunch:
    """Turnstile for ``torch_xla.sync``: see point 3 of the module docstring."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.launched = 0  # syncs launched so far, over all ranks
        self.calls = [0] * world_size
        self.failed = False
        self.cond = threading.Condition()
        # What each rank waits for here (None: it runs), and whether it has left fn:
        # for xm.save's wait, and to tell a dead-lock from a slow rank.
        self.waiting: list = [None] * world_size
        self.finished = [False] * world_size
        self.saves = [0] * world_size
        self.dead_lock: str = ""
        self.failure = "another rank failed"  # what the ranks that stop because of it are told

    def _check_dead_lock(self) -> None:
        """Fail every rank if each one has returned or waits for something no other rank can do."""
        if self.failed or all(self.finished):  # a rank that raised already stops the others
            return
        for r in range(self.world_size):
            if not self.finished[r] and (self.waiting[r] is None or self.waiting[r][1]()):
                return
        where = "; ".join(
            f"rank {r} {'has returned from fn' if self.finished[r] else 'waits in ' + self.waiting[r][0]} "
            f"after {self.calls[r]} torch_xla.sync() calls" for r in range(self.world_size))
        self.dead_lock = f"the ranks can no longer meet: {where}. {_MEET_THE_SAME_WAY}"
        self.failed = True
        self.cond.notify_all()

    def wait(self, rank: int, predicate: Callable[[], bool], what: str = "torch_xla.sync()") -> None:
        """Wait (holding ``cond``) until ``predicate()``; the other ranks see this rank as waiting."""
        self.waiting[rank] = (what, predicate)
        self.cond.notify_all()
        self._check_dead_lock()
        try:
            if not self.cond.wait_for(lambda: self.failed or predicate(), timeout=_WAIT_SECONDS):
                raise TimeoutError(f"a rank did not reach {what} within {_WAIT_SECONDS:.0f} s; "
                                   "every rank must call it the same number of times")
        finally:
            self.waiting[rank] = None
        if self.dead_lock:
            raise RuntimeError(self.dead_lock)
        if self.failed:
            raise _Aborted(f"{self.failure}; this rank stopped in {what}")

    def saved(self, rank: int) -> None:
        """Return once every other rank has saved as often, or waits for others, or has finished.

        Processes on a TPU save at about the same time; threads need not, and a
        program that consolidates on the master right after ``xm.save`` (as
        torch_xla's MNIST FSDP test does) would find files missing. A rank that
        never saves (a master-only ``xm.save``) releases this wait as soon as it
        waits anywhere else, so it cannot dead-lock.
        """
        with self.cond:
            self.saves[rank] += 1
            self.cond.notify_all()
            mine = self.saves[rank]
            done = lambda r: self.saves[r] >= mine or self.waiting[r] is not None or self.finished[r]  # noqa: E731
            if not self.cond.wait_for(lambda: self.failed or all(done(r) for r in range(self.world_size)),
                                      timeout=_WAIT_SECONDS):
                raise TimeoutError(f"rank {rank} waited {_WAIT_SECONDS:.0f} s for the others after xm.save")

    def finish(self, rank: int) -> None:
        with self.cond:
            self.finished[rank] = True
            self.cond.notify_all()
            self._check_dead_lock()

    def sync(self, rank: int, launch: Callable[[], None], arrive: Callable[[], None]) -> None:
        """Launch this rank's step in turn; ``arrive()`` first, which returns once every rank has arrived.

        No rank launches before every rank has arrived: a rank that fails on
        the way stops the others here, before any of them waits in a
        collective that the failed rank will never join.
        """
        arrive()
        with self.cond:
            turn = self.calls[rank] * self.world_size + rank
            self.wait(rank, lambda: self.launched == turn, f"torch_xla.sync() #{self.calls[rank] + 1}")
        try:
            launch()
        finally:
            with self.cond:
                self.calls[rank] += 1
                self.launched += 1
                self.cond.notify_all()
        with self.cond:
            self.wait(rank, lambda: self.launched >= self.calls[rank] * self.world_size,
                      f"torch_xla.sync() #{self.calls[rank]} for the others to launch")

    def fail(self, rank: int, exc: BaseException) -> None:
        with self.cond:
            if not self.failed:
                self.failure = (f"rank {rank} of {self.world_size} failed ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''})")
            self.failed = True
            self.cond.notify_all()


class _HostExchange:
    """All ranks hand in a value under a tag and get every rank's value back, in rank order."""

    def __init__(self, turnstile: _OrderedLaunch):
        self.turnstile = turnstile  # shares its lock and its failure flag
        self.round = 0
        self.arrived: dict[int, tuple[str, Any]] = {}
        self.last_values: list = []

    def exchange(self, rank: int, tag: str, value: Any) -> list:
        t = self.turnstile
        with t.cond:
            this_round = self.round
            self.arrived[rank] = (tag, value)
            if len(self.arrived) == t.world_size:
                places: dict[str, list[int]] = {}
                for r in range(t.world_size):
                    places.setdefault(self._place(r, self.arrived[r][0]), []).append(r)
                if len(places) > 1:
                    where = ", ".join(f"{_collective_check._ranks(rs)} {'waits' if len(rs) == 1 else 'wait'} in {place}"
                                      for place, rs in places.items())
                    t.failure = f"the ranks can no longer meet: {where}. {_MEET_THE_SAME_WAY}"
                    t.failed = True
                    t.cond.notify_all()
                    raise RuntimeError(t.failure)
                self.last_values = [self.arrived[r][1] for r in range(t.world_size)]
                self.arrived = {}
                self.round += 1
                t.cond.notify_all()
            else:
                try:
                    t.wait(rank, lambda: self.round > this_round, self._place(rank, tag))
                except _Aborted:
                    # The round completed before the failure: this rank gets its values (and the
                    # collective check on them raises its own error, the same on every rank).
                    if self.round != this_round + 1:
                        raise
            return self.last_values

    def _place(self, rank: int, tag: str) -> str:
        if tag == _STEP_MARKER:
            return f"torch_xla.sync() #{self.turnstile.calls[rank] + 1}"
        return f"rendezvous {tag!r}"


@dataclass(frozen=True)
class _RankContext:
    rank: int
    world_size: int
    num_process_devices: int
    exchange: _HostExchange
    user_collectives: list
    """Per rank: collectives user code issued since the rank's last step marker (their channel ids)."""

    def next_user_channel(self) -> int:
        index = self.user_collectives[self.rank]
        self.user_collectives[self.rank] = index + 1
        return user_channel(index)

    def replica_groups(self) -> list[list[int]]:
        """This world's group, plus groups of the same size tiling the process's other devices."""
        size = self.world_size
        return [list(range(start, start + size)) for start in range(0, self.num_process_devices, size)]


_thread_rank = threading.local()  # .value: the calling thread's _RankContext, None outside fn
_run_lock = threading.Lock()


def _rank_context() -> _RankContext | None:
    return getattr(_thread_rank, "value", None)


def _torch_xla_replacements() -> list[tuple[Any, str, Callable]]:
    """(module, name, function) for the torch_xla calls that programs make and that need the helper.

    Each replacement acts only in the helper's rank threads and calls the
    original anywhere else:

    * ``xr.world_size``, ``xr.global_ordinal``, ``xr.local_ordinal``: the
      helper's world, not the process's device count (torch_xla also caches the
      world size at its first call, possibly before any world existed);
    * ``xm.rendezvous``, ``xm.xla_rendezvous``, ``xm.mesh_reduce``: torch_xla
      builds them from ``all_gather`` with a pinned layout, whose graph holds
      the rank (PLATFORM.md, cause 3) and so never meets across CPU devices.
      They are pure host exchanges of bytes or objects, so here they are one:
      a ``torch_xla.sync()`` (as torch_xla's do), then the values handed over
      between the threads;
    * ``xp.StepTrace``'s flag that tells ``MpDeviceLoader`` the step is
      already marked: a global in torch_xla, so one rank's trace would make
      another rank's loader skip its ``torch_xla.sync()``; here, one per rank;
    * ``xm.save``: returns once the other ranks have saved too, or wait
      elsewhere (see ``_OrderedLaunch.saved``);
    * ``xm.all_reduce``, ``xm.all_gather``, ``xm.reduce_scatter`` without
      ``groups``: torch_xla puts every device of the process in the group;
      here, the helper's world (devices beyond it form groups of their own).
      ``xm.all_gather`` runs unpinned, for the same reason as above. Without a
      channel id they get one, and are logged for the collective check (point
      5 of the module docstring); ``xm.all_reduce`` becomes a reduce-scatter
      and an all-gather with channel ids (in place for its list form).
    """
    import io

    import torch
    import torch_xla
    import torch_xla.core.xla_model as xm
    import torch_xla.debug.profiler as xp
    import torch_xla.runtime as xr

    from ._collectives import _complete_replica_groups

    def in_ranks(original: Callable, replacement: Callable) -> Callable:
        @functools.wraps(original)
        def dispatch(*args, **kwargs):
            context = _rank_context()
            if context is None:
                return original(*args, **kwargs)
            return replacement(context, *args, **kwargs)
        return dispatch

    def exchange_bytes(context: _RankContext, tag: str, payload: bytes, ordinals) -> list[bytes]:
        if ordinals and sorted(ordinals) != list(range(context.world_size)):
            raise ValueError(f"only a rendezvous of all {context.world_size} ranks is supported, got {ordinals}")
        if not isinstance(payload, bytes):
            raise TypeError(f"`payload` must be bytes, not {type(payload).__name__}")
        torch_xla.sync()
        return list(context.exchange.exchange(context.rank, tag, payload))

    def rendezvous(context, tag, payload=b"", replicas=()):
        return exchange_bytes(context, tag, payload, replicas)

    def xla_rendezvous(context, payload=b"", ordinals=None, tag=None):
        return exchange_bytes(context, tag or "", payload, ordinals)

    def mesh_reduce(context, tag, data, reduce_fn):
        torch_xla.sync()
        buffer = io.BytesIO()
        torch.save(xm._maybe_convert_to_cpu(data), buffer)
        payloads = context.exchange.exchange(context.rank, tag, buffer.getvalue())
        return reduce_fn([torch.load(io.BytesIO(p), weights_only=False) for p in payloads])

    def record(name, tensor, channel_id, groups):
        op = name[len("xm."):].replace("_", "-")
        _collective_check.record(str(tensor.device), op, name, channel_id, tensor.shape, tensor.dtype, groups)

    def with_channel(name, context, tensor, groups, channel_id, use_global_device_ids):
        """(groups, channel id, use_global_device_ids): a channel id of the step's user block, and groups that
        tile the devices, unless the caller gave an id. Only such collectives are logged for the collective
        check here: xla_fsdp's own come with their ids and are logged where xla_fsdp issues them."""
        groups = groups or context.replica_groups()
        if channel_id is not None:
            return groups, channel_id, use_global_device_ids
        groups, channel_id = _complete_replica_groups(groups), context.next_user_channel()
        record(name, tensor, channel_id, groups)
        return groups, channel_id, True

    def all_reduce(context, reduce_type, inputs, scale=1.0, groups=None, pin_layout=True):
        if context.world_size == 1:  # torch_xla's copy
            return xm_all_reduce(reduce_type, inputs, scale, groups, pin_layout)
        groups = _complete_replica_groups(groups or context.replica_groups())
        tensors = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
        reduced = [all_reduce_one(context, reduce_type, t, scale, groups) for t in tensors]
        if isinstance(inputs, torch.Tensor):
            return reduced[0]
        for tensor, value in zip(tensors, reduced):  # the list form reduces in place
            tensor.copy_(value)
        return inputs

    def all_reduce_one(context, reduce_type, tensor, scale, groups):
        # A reduce-scatter and an all-gather, which take channel ids (xm.all_reduce does not): see the docstring.
        shards = len(groups[0])
        flat = tensor.reshape(-1)
        padding = -flat.numel() % shards if flat.numel() else shards   # no empty shards
        if padding:
            flat = torch.cat([flat, flat.new_zeros(padding)])
        scatter_channel, gather_channel = context.next_user_channel(), context.next_user_channel()
        record("xm.all_reduce", tensor, scatter_channel, groups)
        shard = xm_reduce_scatter(reduce_type, flat, scale, 0, shards, groups=groups, pin_layout=False,
                                  channel_id=scatter_channel, use_global_device_ids=True)
        full = xm_all_gather(shard, 0, groups=groups, pin_layout=False, channel_id=gather_channel,
                             use_global_device_ids=True)
        return full[:tensor.numel()].reshape(tensor.shape)

    def all_gather(context, value, dim=0, groups=None, output=None, pin_layout=True, channel_id=None,
                   use_global_device_ids=None):
        groups, channel_id, use_global_device_ids = with_channel("xm.all_gather", context, value, groups, channel_id,
                                                                 use_global_device_ids)
        return xm_all_gather(value, dim, groups, output, False, channel_id, use_global_device_ids)

    def reduce_scatter(context, reduce_type, input, scale, scatter_dim, shard_count, groups=None, output=None,
                       pin_layout=True, channel_id=None, use_global_device_ids=None):
        groups, channel_id, use_global_device_ids = with_channel("xm.reduce_scatter", context, input, groups,
                                                                 channel_id, use_global_device_ids)
        return xm_reduce_scatter(reduce_type, input, scale, scatter_dim, shard_count, groups, output, pin_layout,
                                 channel_id, use_global_device_ids)

    def save(context, data, file_or_path, master_only=True, global_master=False):
        xm_save(data, file_or_path, master_only, global_master)
        context.exchange.turnstile.saved(context.rank)

    tracer_marked_step: dict[int, bool] = {}

    def set_tracer_marked_step(context, value):
        tracer_marked_step[context.rank] = value

    def get_tracer_marked_step(context):
        return tracer_marked_step.get(context.rank, False)

    xm_all_reduce, xm_all_gather, xm_reduce_scatter = xm.all_reduce, xm.all_gather, xm.reduce_scatter
    xm_save = xm.save
    replacements = {
        xr: {"world_size": lambda context: context.world_size,
             "global_ordinal": lambda context: context.rank,
             "local_ordinal": lambda context: context.rank},
        xm: {"rendezvous": rendezvous, "xla_rendezvous": xla_rendezvous, "mesh_reduce": mesh_reduce,
             "all_reduce": all_reduce, "all_gather": all_gather, "reduce_scatter": reduce_scatter,
             "save": save},
        xp: {"set_tracer_marked_step": set_tracer_marked_step, "get_tracer_marked_step": get_tracer_marked_step},
    }
    return [(module, name, in_ranks(getattr(module, name), replacement))
            for module, by_name in replacements.items() for name, replacement in by_name.items()]


@contextlib.contextmanager
def _patched(replacements: list[tuple[Any, str, Callable]]):
    originals = [(module, name, getattr(module, name)) for module, name, _ in replacements]
    for module, name, function in replacements:
        setattr(module, name, function)
    try:
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


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

    from . import _torch_xla_private as _private

    if xr.device_type() != "CPU":
        raise RuntimeError(f"run_on_cpu_devices needs PJRT_DEVICE=CPU; this process uses {xr.device_type()}")
    devices = xm.get_xla_supported_devices()
    if len(devices) < num_devices or len(devices) % num_devices:
        raise ValueError(
            f"this process has {len(devices)} CPU XLA devices (CPU_NUM_DEVICES is read once, when the "
            f"runtime starts); cannot run {num_devices} ranks on them. Set CPU_NUM_DEVICES to a multiple "
            f"of {num_devices} before the first XLA call")

    _ensure_autograd_serves_xla_devices(devices)

    turnstile = _OrderedLaunch(num_devices)
    exchange = _HostExchange(turnstile)
    # The turnstile wraps the launch itself (torch_xla.sync's step marker), not
    # all of torch_xla.sync: step closures, which may read values (.item()),
    # run after it, once every rank has launched; a rank blocking on its own
    # results inside the turnstile would keep the others from launching.
    original_marker = getattr(_private.XLAC, _private.STEP_MARKER)
    original_run_graph = getattr(_private.XLAC, _private.RUN_GRAPH)
    # A sync may also come from a thread that is not a rank's own: autograd
    # runs backward callbacks on its device worker threads. The device synced
    # says which rank it is.
    rank_of_device = {str(d): r for r, d in enumerate(devices[:num_devices])}
    user_collectives = [0] * num_devices
    # The collective check's exchange of each rank's log is the host exchange
    # (see [Note: the collective check] in _collective_check.py).
    check_exchanges = {str(d): functools.partial(exchange.exchange, r, _STEP_MARKER)
                       for r, d in enumerate(devices[:num_devices])}

    def arrive(rank: int, device: str) -> None:
        """Meet every rank at this step marker; compare their collectives if the check is on."""
        if _collective_check.is_enabled(device):
            returned = getattr(_thread_rank, "returned", False)
            _collective_check.check(device, site="the end of run_on_cpu_devices's fn" if returned else None)
        else:
            exchange.exchange(rank, _STEP_MARKER, None)
        user_collectives[rank] = 0

    def ordered_marker(device, devices, wait=False, reset_scope=True):
        context = _rank_context()
        rank = context.rank if context is not None else rank_of_device.get(str(device))
        if rank is None:  # a device outside this run
            return original_marker(device, devices, wait=wait, reset_scope=reset_scope)
        turnstile.sync(rank, lambda: original_marker(device, devices, wait=False, reset_scope=reset_scope),
                       lambda: arrive(rank, str(device)))
        if wait:
            xm.wait_device_ops(xm.xla_real_devices([device]))

    def ordered_run_graph(hash_, inputs):
        # A replayed graph (capture_step) launches in the same order as a step marker would.
        context = _rank_context()
        rank = context.rank if context is not None else rank_of_device.get(_private.default_device())
        if rank is None:
            return original_run_graph(hash_, inputs)
        results = []
        device = str(devices[rank])
        turnstile.sync(rank, lambda: results.append(original_run_graph(hash_, inputs)), lambda: arrive(rank, device))
        return results[0]

    def run_rank(rank: int) -> R:
        device = devices[rank]
        _private.set_default_device(device)
        xm.set_replication(torch.device(device), devices)
        _thread_rank.value = _RankContext(rank, num_devices, len(devices), exchange, user_collectives)
        _thread_rank.returned = False
        try:
            result = fn(rank, *args)
            # Leave nothing pending on the device: a tensor of this run that is
            # still alive (a reference cycle not yet collected, a result) would
            # otherwise join the next run's first graph on this device only,
            # with whatever collectives it carries.
            _thread_rank.returned = True
            torch_xla.sync()
            return result
        except _Aborted:
            _private.clear_pending_irs(device)
            raise
        except BaseException as exc:
            turnstile.fail(rank, exc)
            _private.clear_pending_irs(device)  # this run's graph is abandoned
            note = f"(raised on rank {rank} of {num_devices} in run_on_cpu_devices)"
            if hasattr(exc, "add_note"):
                exc.add_note(note)
            else:  # Python 3.10: keep it where add_note would (its tracebacks do not print it)
                exc.__notes__ = [*getattr(exc, "__notes__", []), note]
            raise
        finally:
            turnstile.finish(rank)
            _thread_rank.value = None

    launches = [(_private.XLAC, _private.STEP_MARKER, ordered_marker),
                (_private.XLAC, _private.RUN_GRAPH, ordered_run_graph)]
    with _run_lock, _collective_check.serving(check_exchanges), _patched(_torch_xla_replacements() + launches):
        with ThreadPoolExecutor(max_workers=num_devices, thread_name_prefix="xla-rank") as pool:
            futures = [pool.submit(run_rank, r) for r in range(num_devices)]
            errors = [f.exception() for f in futures]
    real = [e for e in errors if e is not None and not isinstance(e, _Aborted)]
    if real:
        raise real[0]
    if any(errors):
        raise next(e for e in errors if e is not None)
    return [f.result() for f in futures]
