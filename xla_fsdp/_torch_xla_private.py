"""Every private torch_xla API that xla_fsdp uses, behind one small interface.

[Note: private torch_xla APIs]
torch_xla has no public way to do some of what xla_fsdp needs: replay a
compiled step graph without tracing it again (``capture_step``), give a
reduce-scatter no collective token, run a backward callback on the right
device, or (in the CPU test helper) order graph launches across device
threads. Those calls live here and nowhere else, pinned to torch_xla 2.9
(the only torch_xla release the project supports; ``pyproject.toml`` pins it).
``tests/test_torch_xla_private.py`` checks each assumption below, so an
upgrade that breaks one fails there, by name, rather than as a wrong result.

What they assume of torch_xla 2.9 (``torch_xla/csrc/init_python_bindings.cpp``,
``xla_graph_executor.cpp``, ``_dynamo/dynamo_bridge.py``):

* A lazy tensor's *tensor id* (``_xla_get_tensor_id``) changes when an
  in-place op gives it a new value (functionalization makes a new inner
  tensor); device data made by a sync remembers the id of the tensor it was
  made for. ``_get_tensors_xla_device_data_node(outputs)`` lists a graph's
  inputs by those ids: ``SEED_INPUT_ID`` for the device RNG seed (data with no
  owner), ``SCALAR_INPUT_ID`` (-1) for a Python number uploaded from
  torch_xla's scalar cache, else the id of the tensor whose data it is.
* ``_get_graph_hash(outputs)`` is the key under which
  ``_xla_warm_up_cache(outputs, [])`` compiles the graph of ``outputs`` (the
  same hash, with buffer donors in it only while aliasing is on), and
  ``_run_cached_graph(hash, inputs)`` runs that executable on the calling
  thread's default device with ``inputs`` in the order of
  ``_get_tensors_xla_device_data_node``, returning new tensors in the order of
  ``outputs``. An input that is pending IR is refused with a RuntimeError
  that mentions "pending ir".
* The RNG: per device, a host ``seed``; a graph's first random op reads it
  as device data and each further use advances it in the graph as
  ``seed * 214013 + 2531011`` (``RNG_MULTIPLIER``, ``RNG_INCREMENT``); a step
  marker sets ``seed = seed * 7012063 + 1012031`` (mod 2**64);
  ``xm.set_rng_state(s)`` sets the host seed to ``s``, and the next random op
  reads that value as a new device data input (also with ``SEED_INPUT_ID``);
  ``_get_base_seed_as_tensor(device)`` returns the host seed (not the running
  one) as device data.
* ``_xla_tensors_report(0, device)`` prints every live tensor of the device
  that has IR, as ``Tensor: id=N, ... ir_nodes=K`` followed by its IR.
* ``torch_xla.sync()`` runs the per-device step closures kept in
  ``xm._get_device_context().step_closures`` after its step marker.
* ``torch_xla.sync()`` and ``xm.mark_step()`` (and so ``MpDeviceLoader``)
  launch a step through ``_XLAC._xla_step_marker(device, devices, wait=,
  reset_scope=)``, looked up on the module at each call
  (``torch_xla/torch_xla.py``), so replacing that attribute puts a function in
  front of every launch ([Note: the step-marker hook]).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from typing import Callable, Iterator, Sequence

import torch
import torch_xla
import torch_xla.core.xla_model as xm

XLAC = torch_xla._XLAC
"""torch_xla's C++ module. The CPU test helper replaces two of its functions
(``STEP_MARKER``, ``RUN_GRAPH``) to order launches, so those are looked up
on it at every call, never bound once."""
STEP_MARKER = "_xla_step_marker"
RUN_GRAPH = "_run_cached_graph"

SEED_INPUT_ID = XLAC._get_seed_info_id()
SCALAR_INPUT_ID = -1
RNG_MULTIPLIER, RNG_INCREMENT = 214013, 2531011
STEP_MARKER_MULTIPLIER, STEP_MARKER_INCREMENT = 7012063, 1012031
_U64 = (1 << 64) - 1


# ------------------------------------------------------------------ tensors
def tensor_id(tensor: torch.Tensor) -> int:
    """torch_xla's id of the lazy tensor behind ``tensor`` now (it changes with in-place ops)."""
    return XLAC._xla_get_tensor_id(tensor)


def need_materialization(tensors: Sequence[torch.Tensor]) -> list[bool]:
    """Per tensor: whether its value is pending IR that needs a computation."""
    return XLAC._check_tensor_need_materialization(list(tensors))


def data_identity(tensor: torch.Tensor) -> str:
    """Which device data object ``tensor`` holds (equal for tensors sharing it).

    Meaningful for a tensor that holds data and no IR, such as the values
    ``graph_inputs`` returns and any tensor ``sync_tensors`` has made data.
    """
    return XLAC._unique_id_for_ir_and_data(tensor)


def pending_tensor_ids(device: torch.device) -> dict[int, str]:
    """Live tensors of ``device`` whose value needs a computation: id -> torch_xla's description of its IR."""
    report = XLAC._xla_tensors_report(0, str(device))
    pending = {}
    for block in report.split("Tensor: id=")[1:]:
        match = re.match(r"(\d+),", block)
        ir = block.split("IR {", 1)[-1]
        nodes = [line for line in ir.splitlines() if line.strip().startswith("%")]
        if match and not (len(nodes) == 1 and "xla::device_data()" in nodes[0]):
            pending[int(match.group(1))] = block.split("\n", 1)[0]
    return pending


# ------------------------------------------------------------ graph replay
def graph_inputs(outputs: Sequence[torch.Tensor]) -> tuple[list[int], list[torch.Tensor]]:
    """The device data the graph of ``outputs`` reads: (owner tensor id, value) per input, in input order."""
    ids, values = XLAC._get_tensors_xla_device_data_node(list(outputs))
    return list(ids), list(values)


def graph_hash(outputs: Sequence[torch.Tensor]) -> bytes:
    return XLAC._get_graph_hash(list(outputs))


def compile_graph(outputs: Sequence[torch.Tensor]) -> None:
    """Compile the graph of ``outputs`` into torch_xla's cache (a cache hit if another device compiled it)."""
    XLAC._xla_warm_up_cache(list(outputs), [])


def run_graph(hash_: bytes, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Run a compiled graph on the calling thread's default device; one new tensor per output."""
    return getattr(XLAC, RUN_GRAPH)(hash_, list(inputs))


def is_pending_input_error(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and "pending ir" in str(error)


def sync_tensors(tensors: Sequence[torch.Tensor]) -> None:
    """Compute ``tensors`` now, without a step marker (the RNG seed and step closures are left alone)."""
    XLAC._xla_sync_multi(list(tensors), devices=[], wait=True, sync_xla_data=True)


def param_aliasing_enabled() -> bool:
    """torch_xla's ``XLA_ENABLE_PARAM_ALIASING`` (default on), read once by its graph executor."""
    return os.environ.get("XLA_ENABLE_PARAM_ALIASING", "1").lower() not in ("0", "false")


def set_buffer_donation(tensor: torch.Tensor, donate: bool) -> None:
    XLAC._set_buffer_donation(tensor, donate)


@contextlib.contextmanager
def aliasing_buffer_donors(enabled: bool) -> Iterator[None]:
    """Within: graphs alias the inputs marked with ``set_buffer_donation`` to outputs (if ``enabled``)."""
    previous = XLAC._xla_get_enable_alias_with_buffer_donor_config()
    XLAC._xla_set_enable_alias_with_buffer_donor_config(enabled)
    try:
        yield
    finally:
        XLAC._xla_set_enable_alias_with_buffer_donor_config(previous)


# --------------------------------------------------------------------- RNG
def running_seed(device: torch.device) -> int:
    """The device's RNG seed as the next random op would advance it (public ``xm.get_rng_state``)."""
    return xm.get_rng_state(str(device))


def host_seed(device: torch.device) -> int:
    """The device's host seed: what a step marker advances, and what a graph's first random op reads."""
    return int(XLAC._get_base_seed_as_tensor(str(device)).cpu().item()) & _U64


def set_seed(device: torch.device, seed: int) -> None:
    """Set the device's host (and running) seed, as a step marker leaves it."""
    xm.set_rng_state(seed & _U64, str(device))


def next_running_seed(seed: int) -> int:
    return (seed * RNG_MULTIPLIER + RNG_INCREMENT) & _U64


def seed_after_step_marker(seed: int) -> int:
    return (seed * STEP_MARKER_MULTIPLIER + STEP_MARKER_INCREMENT) & _U64


def seed_tensor(seed: int, device: torch.device) -> torch.Tensor:
    """A seed as the int64 device data torch_xla's random ops read."""
    signed = seed - (1 << 64) if seed >= (1 << 63) else seed
    return torch.tensor(signed, dtype=torch.int64).to(device)


# ----------------------------------------------------------- devices, steps
def default_device() -> str:
    return XLAC._xla_get_default_device()


def set_default_device(device: str) -> None:
    XLAC._xla_set_default_device(str(device))


def runtime_is_initialized() -> bool:
    return XLAC._xla_runtime_is_initialized()


def clear_pending_irs(device: str) -> None:
    XLAC._clear_pending_irs(str(device))


def step_closures() -> list:
    """The calling thread's device's step closures, which the next ``torch_xla.sync()`` runs (a live list)."""
    devctx = xm._get_device_context()
    closures = getattr(devctx, "step_closures", None)
    if closures is None:
        closures = []
        devctx.step_closures = closures
    return closures


def run_step_closures() -> None:
    """What ``torch_xla.sync()`` does after its step marker: the device's step closures, and a fresh token."""
    devctx = xm._run_step_closures()
    XLAC._set_all_reduce_token(devctx.device, None)


def untokened_reduce_scatter(flat: torch.Tensor, scale: float, world_size: int,
                             replica_groups: list[list[int]]) -> torch.Tensor:
    """A sum reduce-scatter outside torch_xla's token chain ([Note: the collective token])."""
    return XLAC._xla_spmd_reduce_scatter(xm.REDUCE_SUM, flat, scale, 0, world_size, replica_groups)


# [Note: the step-marker hook]
# torch_xla has no public hook that runs before a step's graph is launched.
# Replacing ``_XLAC._xla_step_marker`` puts a function in front of every
# launch (see the module Note); the collective check (``_collective_check.py``)
# uses it, and the CPU helper (``testing.py``) replaces the same attribute for
# its ordered launches. Host reads (``.item()``, ``.cpu()``) launch through C++
# and are not seen; neither are replays of captured graphs (``run_graph``).
_HOOKED = "_xla_fsdp_before_step_marker"


def wrap_step_marker(before: Callable[[str], None]) -> None:
    """Call ``before(device)`` ahead of every step marker of the process; idempotent."""
    current = getattr(XLAC, STEP_MARKER)
    if getattr(current, _HOOKED, None) is before:
        return

    @functools.wraps(current)
    def step_marker(device, devices, wait=False, reset_scope=True):
        before(device)
        return current(device, devices, wait=wait, reset_scope=reset_scope)

    setattr(step_marker, _HOOKED, before)
    setattr(XLAC, STEP_MARKER, step_marker)
