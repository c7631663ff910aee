"""The collective check: before a step's graph runs, the ranks compare the collectives they issued.

[Note: the collective check]
A collective that one rank issues and another does not never completes: on a
TPU the job hangs until someone kills it, on CPU XLA devices XLA aborts the
whole process after 10 s. The causes are ordinary code: a data-dependent
branch that skips an FSDP unit on one rank, ``clip_grad_norm_`` or a
checkpoint call under ``if rank == 0``, an exception on one rank. Each leaves
the ranks with different collectives traced before their step marker. So:

1. Each rank *records* the collectives ``xla_fsdp`` issues, where it issues
   them (``ShardingGroup`` in ``_collectives.py``: the units' all-gathers and
   reduce-scatters, ``clip_grad_norm_``'s all-gather, the sharded-checkpoint
   barriers, ``full_state_dict``'s all-gathers; under ``run_on_cpu_devices``
   also what user code issues through ``xm.all_reduce`` / ``all_gather`` /
   ``reduce_scatter``), as ``Collective`` records (op, issuer, channel id,
   shape, dtype, replica groups) in a log per device. The log is per device,
   not per thread: autograd traces the backward's reduce-scatters on its own
   worker threads.
2. At the step marker (``torch_xla.sync()``), *before* the graph is launched,
   the ranks exchange their logs on the host and compare them (``check``). On
   a difference every rank raises the same ``CollectiveMismatchError``, which
   names the first collective where they differ, the FSDP unit's module path,
   what each rank issued there, where each rank reached the step marker, and
   what to do. No rank has launched, so no rank waits in a collective.

The exchange is the only part that differs by platform:

* ``run_on_cpu_devices`` (threads of one process) hands the logs over between
  the rank threads (its host exchange, ``xla_fsdp/testing.py``). That
  exchange is also the barrier every rank passes before any rank launches: a
  rank that raised mid-step stops the others there, with an error naming it.
* Between processes (one per TPU chip), a ``torch.distributed.TCPStore``
  (``StoreExchange``): each rank posts a digest of its log, rank 0 posts the
  verdict, and only on a difference are full logs posted. Every wait has a
  timeout (``XLA_FSDP_CHECK_TIMEOUT``, seconds, default 300): a rank that
  never arrives (it died, or waits somewhere else) is named in a
  ``CollectiveCheckTimeout`` on the others instead of a hang. This path is
  tested with several processes on the host, without XLA collectives; it has
  not run on a TPU.

What is compared is what each rank *traced* since its last step marker, so a
traced collective whose result nothing uses (XLA would drop it) still counts:
the check is stricter than XLA. A host read (``.item()``, ``.cpu()``) before
the step marker executes part of the graph outside this check; the check
sees its collectives only at the next marker.

When it runs: ``XLA_FSDP_CHECK_COLLECTIVES=1`` / ``0`` turns it on / off for
the process; the root unit's ``check_collectives=True`` / ``False`` does the
same from the root's first forward on; otherwise it is on inside
``run_on_cpu_devices`` and off elsewhere. Its cost per step is recording a
record per collective and one host exchange (README, "When ranks disagree").

The API, for code that runs a step without ``torch_xla.sync()`` (a captured
step checks once, at capture): ``is_enabled(device)``, ``pending(device)``
(the log since the last check), ``check(device, where=...)`` (compare now and
raise, clearing the log), ``discard(device)``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Optional, Protocol, Sequence

from ._channels import CHECKPOINT_BARRIER, GRAD_NORM, describe_channel

__all__ = ["Collective", "CollectiveMismatchError", "CollectiveCheckTimeout", "ENABLE_ENV", "TIMEOUT_ENV",
           "PORT_ENV", "is_enabled", "set_enabled", "record", "pending", "discard", "check", "StoreExchange",
           "use_store", "serving"]

ENABLE_ENV = "XLA_FSDP_CHECK_COLLECTIVES"
"""``1``: check at every step marker of the process; ``0``: never; unset: only inside ``run_on_cpu_devices``."""
TIMEOUT_ENV = "XLA_FSDP_CHECK_TIMEOUT"
"""Seconds a rank waits for the others at a step marker between processes (default 300)."""
PORT_ENV = "XLA_FSDP_CHECK_PORT"
"""Port of the check's TCPStore on the master host between processes (default 12356)."""
_DEFAULT_TIMEOUT_S = 300.0
_DEFAULT_PORT = 12356


class CollectiveMismatchError(RuntimeError):
    """The ranks issued different collectives before a step marker; raised on every rank, before any launch.

    The step's graph is still pending on each rank: a program that catches this and goes on launches it at its
    next step marker, which then hangs. Fix the program instead (the message says where).
    """


class CollectiveCheckTimeout(CollectiveMismatchError):
    """A rank did not reach a step marker that the others reached, within the check's timeout."""


class Collective(NamedTuple):
    """One collective as a rank traced it. Two ranks must trace equal records, in the same order.

    A named tuple: one is made for every collective of every step, and a frozen dataclass costs 4x as much.
    """

    op: str
    """``all-gather``, ``reduce-scatter`` or ``all-reduce``."""
    issuer: str
    """Who issued it: ``FSDP unit 'blocks.1'``, ``clip_grad_norm_``, ``load_sharded_checkpoint``, ``xm.all_reduce``."""
    channel: Optional[int]
    """Its channel id (``_channels.py``), or None."""
    shape: tuple[int, ...]
    """Shape of this rank's input."""
    dtype: str
    groups: tuple[tuple[int, ...], ...]
    """Replica groups, as global device ids."""

    def __str__(self) -> str:
        purpose = "no channel id" if self.channel is None else f"channel {self.channel}"
        if self.channel is not None and describe_channel(self.channel) != self.issuer:
            purpose = f"{describe_channel(self.channel)}, {purpose}"
        shown = ", ".join(str(list(g)) for g in self.groups[:2]) + (
            f" and {len(self.groups) - 2} more" if len(self.groups) > 2 else "")
        return f"{self.op} of {self.issuer} ({purpose}), {self.dtype}{list(self.shape)} over groups {shown}"

    def to_json(self) -> list:
        return [self.op, self.issuer, self.channel, list(self.shape), self.dtype, [list(g) for g in self.groups]]

    @staticmethod
    def from_json(value: list) -> "Collective":
        op, issuer, channel, shape, dtype, groups = value
        return Collective(op, issuer, channel, tuple(shape), dtype, tuple(tuple(g) for g in groups))


@dataclass(frozen=True)
class Report:
    """What one rank brings to a check: where it reached the step marker, and its log."""

    site: str
    records: tuple[Collective, ...]
    call: str = ""
    """The xla_fsdp function the user called that made the step marker (``save_sharded_checkpoint``), if any."""


class Exchange(Protocol):
    def reports_if_different(self, report: Report) -> Optional[list[Report]]:
        """Meet the other ranks; None if every rank's records equal this one's, else every rank's report."""


class _GatherAll:
    """An exchange from a function that hands every rank's report to every rank (threads of one process)."""

    def __init__(self, all_gather: Callable[[Report], Sequence[Report]]):
        self.all_gather = all_gather

    def reports_if_different(self, report: Report) -> Optional[list[Report]]:
        reports = list(self.all_gather(report))
        return None if all(r.records == reports[0].records for r in reports) else reports


# ------------------------------------------------------------------ state
_lock = threading.RLock()
_logs: dict[str, list[Collective]] = {}
"""Per device (``"xla:0"``): the collectives recorded since its last check."""
_markers: dict[str, int] = {}
"""Per device: step markers checked so far."""
_local: dict[str, Exchange] = {}
"""Per device: the exchange of the ``run_on_cpu_devices`` run it belongs to."""
_process: dict[str, Exchange] = {}
"""Per device: the exchange between processes (``StoreExchange``), made at its first check."""
_setting: Optional[bool] = None
"""``check_collectives`` of the last root unit that gave one (None: the environment decides)."""
_recording: dict[str, bool] = {}
"""Per device: ``is_enabled``, as of its last check (``record`` runs for every collective: no parsing there)."""
_DTYPE_NAMES: dict = {}


def _env_setting() -> Optional[bool]:
    value = os.environ.get(ENABLE_ENV, "").strip()
    if value == "":
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{ENABLE_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def is_enabled(device: str) -> bool:
    """Whether collectives on ``device`` are recorded and compared at its step markers."""
    if _setting is not None:
        return _setting
    env = _env_setting()
    return env if env is not None else device in _local


def set_enabled(value: Optional[bool]) -> None:
    """Turn the check on or off for the process (``FsdpOptions.check_collectives``); None: the environment decides."""
    global _setting
    _setting = value
    _recording.clear()
    if value:
        _install_step_marker_hook()


def record(device: str, op: str, issuer: str, channel: Optional[int], shape: Sequence[int], dtype,
           groups: Sequence[Sequence[int]]) -> None:
    """Add a collective to ``device``'s log, if the check is on there."""
    enabled = _recording.get(device)
    if enabled is None:
        enabled = _recording[device] = is_enabled(device)
    if not enabled:
        return
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = _dtype_name(dtype)
    if not isinstance(groups, tuple):
        groups = tuple(tuple(g) for g in groups)
    entry = Collective(op, issuer, channel, tuple(shape), name, groups)
    with _lock:
        _logs.setdefault(device, []).append(entry)


def pending(device: Optional[str] = None) -> tuple[Collective, ...]:
    """The collectives recorded on ``device`` (default: this thread's) since its last check."""
    device = device or _default_device()
    with _lock:
        return tuple(_logs.get(device, ()))


def discard(device: str) -> None:
    """Forget ``device``'s log and marker count (a run that starts, or one that failed)."""
    with _lock:
        _logs.pop(device, None)
        _markers.pop(device, None)
        _recording.pop(device, None)


def check(device: Optional[str] = None, *, where: str = "torch_xla.sync()", site: Optional[str] = None) -> None:
    """Compare ``device``'s collectives since its last check with every other rank's; raise on a difference.

    Every rank must call it at the same point (it is a host barrier). Clears
    the log. Raises ``CollectiveMismatchError`` (the same message on every
    rank) or ``CollectiveCheckTimeout``. ``where`` names the step marker in
    the message; ``site`` says where this rank reached it (default: the first
    caller outside xla_fsdp, torch and torch_xla).
    """
    device = device or _default_device()
    with _lock:
        records = tuple(_logs.pop(device, ()))
        marker = _markers[device] = _markers.get(device, 0) + 1
        _recording.pop(device, None)  # the setting is read again for the next step
    exchange = _local.get(device) or _process_exchange(device)
    if exchange is None:  # a world of one: nothing to compare
        return
    site, call = (site, "") if site else call_site()
    report = Report(site, records, call)
    reports = exchange.reports_if_different(report)
    if reports is not None:
        raise CollectiveMismatchError(mismatch_message(reports, f"{where} #{marker}"))


@contextlib.contextmanager
def serving(exchanges: dict[str, Callable[[Report], Sequence[Report]]]) -> Iterator[None]:
    """Within this context, ``check`` on these devices uses these all-gather functions (``run_on_cpu_devices``)."""
    with _lock:
        for device, all_gather in exchanges.items():
            _local[device] = _GatherAll(all_gather)
            discard(device)
    try:
        yield
    finally:
        with _lock:
            for device in exchanges:
                _local.pop(device, None)
                discard(device)
        set_enabled(None)  # a model's check_collectives lasts as long as its run


# --------------------------------------------------------------- messages
def _dtype_name(dtype) -> str:
    text = str(dtype)
    return text[len("torch."):] if text.startswith("torch.") else text


_SKIPPED_DIRS: Optional[tuple[str, ...]] = None
_PLUMBING = ("testing.py", "_collective_check.py", "_torch_xla_private.py")
"""xla_fsdp modules on the way to a step marker that are not what the user called."""


def call_site() -> tuple[str, str]:
    """(``file:line in function`` of the first caller outside xla_fsdp, torch, torch_xla and the threading modules,
    the xla_fsdp function it called, or "")."""
    global _SKIPPED_DIRS
    if _SKIPPED_DIRS is None:
        import concurrent.futures
        import torch
        import torch_xla
        _SKIPPED_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (sys.modules[__package__], torch,
                                                                            torch_xla, concurrent.futures))
    package = _SKIPPED_DIRS[0]
    frame, via = sys._getframe(1), ""
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_SKIPPED_DIRS) and not filename.endswith(("threading.py", "contextlib.py")):
            inside = f", inside xla_fsdp's {via}()" if via else ""
            return f"{filename}:{frame.f_lineno} in {frame.f_code.co_name}{inside}", via
        if filename.startswith(package) and not filename.endswith(_PLUMBING) and \
                not frame.f_code.co_name.startswith("_"):
            via = frame.f_code.co_name  # the outermost one is the call the user made
        frame = frame.f_back
    return f"thread {threading.current_thread().name!r} (autograd's, at the end of a backward, or xla_fsdp's)", ""


def _advice(entries: Sequence[Optional[Collective]]) -> list[str]:
    """What to do, once per kind of collective among ``entries``."""
    units = [e.issuer[len("FSDP unit "):] for e in entries if e is not None and e.issuer.startswith("FSDP unit")]
    advice = []
    if units:
        advice.append(f"run FSDP unit{'s' if len(units) > 1 else ''} {' and '.join(units)} on every rank, as many "
                      "times, with inputs of the same shapes: on a rank with nothing for a unit, run it anyway on "
                      "an input that contributes nothing (e.g. add 0 * its output's sum to the loss), so that its "
                      "forward and backward collectives happen there too")
    advice += [_advice_for(e) for e in entries if e is not None and not e.issuer.startswith("FSDP unit")]
    return list(dict.fromkeys(advice))


def _advice_for(entry: Collective) -> str:
    if entry.channel == GRAD_NORM:
        return "call clip_grad_norm_ on every rank, or on none"
    if entry.channel == CHECKPOINT_BARRIER:
        return (f"{entry.issuer} is collective: call it on every rank (each rank writes or reads its own file), "
                "not under `if rank == 0`")
    if entry.issuer == "full_state_dict":
        return "call full_state_dict() on every rank (with rank0_only=True the others get {})"
    return f"issue {entry.issuer} on every rank, in the same order"


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def mismatch_message(reports: Sequence[Report], where: str) -> str:
    """The error every rank raises: the first collective where the ranks differ, what each issued, what to do."""
    length = max(len(r.records) for r in reports)
    first = next(i for i in range(length + 1)
                 if len({r.records[i] if i < len(r.records) else None for r in reports}) > 1)
    entries = [r.records[first] if first < len(r.records) else None for r in reports]
    groups: dict[Optional[Collective], list[int]] = {}
    for rank, entry in enumerate(entries):
        groups.setdefault(entry, []).append(rank)
    lines = [f"the ranks issued different collectives before {where}, so none of them ran it (it would wait "
             f"forever in a collective that some rank never joins). First difference: collective {first} "
             "of the step:"]
    for entry, ranks in groups.items():
        lines.append(f"  {_ranks(ranks)}: " + (str(entry) if entry is not None else
                                              f"nothing (it issued {first} collectives and reached the step marker)"))
    sites: dict[str, list[int]] = {}
    for rank, report in enumerate(reports):
        sites.setdefault(report.site, []).append(rank)
    lines.append("The step marker was reached at: " + "; ".join(f"{_ranks(r)}: {s}" for s, r in sites.items()))
    advice = _advice(list(groups))
    calls = [r.call for r in reports if r.call]
    if len(sites) > 1 and calls:   # a call that makes a step marker, on some ranks only: the likely cause
        names = list(dict.fromkeys(calls))
        verb = "makes a step marker and is" if len(names) == 1 else "make step markers and are"
        advice = [f"{' and '.join(names)} {verb} collective: call it on every rank, at the same point, not under "
                  "`if rank == 0`"] + [a for a in advice if not a.startswith(tuple(names))]
    lines.append("Every rank must issue the same collectives in the same order: " + "; ".join(advice) + ".")
    return "\n".join(lines)


# ---------------------------------------------------- between processes
class StoreExchange:
    """The check's exchange between processes, through a ``torch.distributed`` store. See [Note: the collective check].

    Round n: each rank posts ``(digest of its log, site)``; rank 0 waits for
    every rank's (with the timeout), posts the list as the verdict, and the
    others read it. If the digests differ, each rank posts its whole log and
    reads one log per distinct digest, so every rank builds the same message.
    A rank deletes its own key of round n-1 in round n (rank 0 has read it by
    then), so the store holds two rounds at most.
    """

    KEY_PREFIX = "xla_fsdp_check"

    def __init__(self, store, rank: int, world_size: int, timeout_s: float):
        self.store, self.rank, self.world_size, self.timeout_s = store, rank, world_size, timeout_s
        self.round = 0

    def _key(self, n: int, *parts) -> str:
        return "/".join([self.KEY_PREFIX, str(n), *map(str, parts)])

    def _wait(self, keys: list[str], timeout_s: float) -> bool:
        try:
            self.store.wait(keys, datetime.timedelta(seconds=timeout_s))
        except RuntimeError as exc:  # torch.distributed.DistStoreError, a RuntimeError
            if "timeout" not in str(exc).lower() and "timed out" not in str(exc).lower():
                raise
            return False
        return True

    def _get(self, key: str):
        return json.loads(self.store.get(key).decode())

    def reports_if_different(self, report: Report) -> Optional[list[Report]]:
        n, rank, world = self.round, self.rank, self.world_size
        self.round += 1
        digest = hashlib.blake2b(json.dumps([c.to_json() for c in report.records]).encode(), digest_size=16).hexdigest()
        if n > 0:
            self.store.delete_key(self._key(n - 1, rank))
        self.store.set(self._key(n, rank), json.dumps([digest, report.site, report.call]))
        verdict_key = self._key(n, "verdict")
        if rank == 0:
            keys = [self._key(n, r) for r in range(world)]
            if self._wait(keys, self.timeout_s):
                verdict = {"arrived": [self._get(k) for k in keys]}
            else:
                verdict = {"missing": [r for r, k in enumerate(keys) if not self.store.check([k])]}
            self.store.set(verdict_key, json.dumps(verdict))
            if n > 0:
                self.store.delete_key(self._key(n - 1, "verdict"))
        else:
            # Longer than rank 0's own wait, so that rank 0's verdict on a missing rank arrives first.
            if not self._wait([verdict_key], 2 * self.timeout_s + 10):
                raise CollectiveCheckTimeout(
                    f"rank {rank} waited {2 * self.timeout_s + 10:.0f} s at step marker #{n + 1} for rank 0's "
                    f"verdict ({TIMEOUT_ENV}={self.timeout_s:g}): rank 0 has died, or waits somewhere no other rank "
                    "does (a collective, a host read, a rendezvous)")
            verdict = self._get(verdict_key)
        if "missing" in verdict:
            missing = verdict["missing"]
            raise CollectiveCheckTimeout(
                f"{_ranks(missing)} did not reach step marker #{n + 1} within {self.timeout_s:g} s "
                f"({TIMEOUT_ENV}) while the other ranks waited there: {'they have' if len(missing) > 1 else 'it has'} "
                "died (see its own error), or wait somewhere no other rank does. Every rank must reach the same "
                "step markers")
        arrived = verdict["arrived"]
        if len({d for d, _, _ in arrived}) == 1:
            return None
        self.store.set(self._key(n, "log", rank), json.dumps([c.to_json() for c in report.records]))
        logs = {}
        for r, (d, _, _) in enumerate(arrived):
            if d not in logs:
                key = self._key(n, "log", r)
                if not self._wait([key], self.timeout_s):
                    raise CollectiveCheckTimeout(f"rank {r} did not post its collectives within {self.timeout_s:g} s")
                logs[d] = tuple(Collective.from_json(c) for c in self._get(key))
        return [Report(site, logs[d], call) for d, site, call in arrived]


def _timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        return float(value) if value else _DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {value!r}") from None


def use_store(store, rank: int, world_size: int, device: Optional[str] = None) -> None:
    """Check ``device``'s step markers (default: this thread's) through ``store``, not the check's own TCPStore."""
    _process[device or _default_device()] = StoreExchange(store, rank, world_size, _timeout_s())


def _process_exchange(device: str) -> Optional[Exchange]:
    """The exchange between processes for ``device``: a TCPStore served by rank 0, made at the first check."""
    exchange = _process.get(device)
    if exchange is not None:
        return exchange
    import torch.distributed as dist
    import torch_xla.runtime as xr

    rank, world = xr.global_ordinal(), xr.world_size()
    if world == 1:
        return None
    host = os.environ.get("MASTER_ADDR") or (xr.get_master_ip() if xr.device_type() == "TPU" else "localhost")
    port = int(os.environ.get(PORT_ENV, _DEFAULT_PORT))
    timeout = _timeout_s()
    store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=datetime.timedelta(seconds=timeout),
                          wait_for_workers=False)
    exchange = _process[device] = StoreExchange(store, rank, world, timeout)
    return exchange


def _default_device() -> str:
    from ._torch_xla_private import default_device
    return str(default_device())


# ------------------------------------------------------- the step marker
def _install_step_marker_hook() -> None:
    """Check before every step marker of the process (outside ``run_on_cpu_devices``, which checks itself)."""
    from ._torch_xla_private import wrap_step_marker
    wrap_step_marker(_before_step_marker)


def _before_step_marker(device: str) -> None:
    device = str(device)
    if device not in _local and is_enabled(device):
        check(device)


def install_from_environment() -> None:
    """Install the step-marker hook if ``XLA_FSDP_CHECK_COLLECTIVES=1`` (called when a root unit starts)."""
    if _env_setting():
        _install_step_marker_hook()
