"""The channel-id plan: which collective of a step graph uses which channel id.

[Note: channel ids]
On CPU XLA devices the ranks of a collective meet by channel id (see
[Note: collectives on CPU XLA devices] in ``_collectives.py``). Two
collectives of one graph that could be in flight at the same time must
therefore never share an id, and the id must be a constant of the model (never
of the rank or the step) so that every rank compiles the same graph, once.
This module is the only place that hands out ids. A graph may use:

* ``1``: reserved for torch_xla's untokened reduce-scatter
  (``_xla_spmd_reduce_scatter``), which takes no channel id and puts 1 on
  every call ([Note: the collective token]). Those reduce-scatters share the
  id with each other; they are the backward of different units, run in the
  order every rank's identical executable runs them, and no device can leave
  a collective before every device has entered it, so no two of them are
  outstanding with the same participants at once. This was seen to hold at
  world sizes 2-8 in the test suite and the benchmark.
* ``unit_channel(unit, op, k)`` for FSDP unit ``unit`` (its pre-order index
  in the root, ``< MAX_UNITS``), ``op`` one of ``FORWARD_GATHER``,
  ``BACKWARD_GATHER`` and ``REDUCE_SCATTER``, and ``k < MAX_COLLECTIVES_PER_OP``
  the op's k-th collective (a bucket, see [Note: collectives of a unit]).
  These ids run from 2 up to just below ``2**30`` and are unique by
  construction: ``(unit, op, k)`` is a mixed-radix number.
* ``GRAD_NORM``: the scalar all-gather of ``clip_grad_norm_``.
* ``CHECKPOINT_BARRIER``: the all-gather that commits a sharded checkpoint
  (``sharded_checkpoint.py``), in a graph of its own.
* ``full_state_channel(k)``: the k-th all-gather of ``full_state_dict``.
* ``user_channel(k)``: the k-th collective that user code issues through
  ``xm.all_reduce`` / ``all_gather`` / ``reduce_scatter`` without a channel id
  in one step under ``xla_fsdp.testing.run_on_cpu_devices``, which gives them
  one (see its docstring); they sit at ``2**30 + 2**29`` and above.

The last four sit at ``2**30`` and above, past every unit channel, and each is
used by graphs of their own (clipping and the full state dict are built
between steps' backward passes, and ``full_state_dict`` syncs before it
returns), so they never meet a unit's collectives either. A user collective
may share a graph with a unit's, but never its id.
"""

from __future__ import annotations

__all__ = ["MAX_COLLECTIVES_PER_OP", "MAX_UNITS", "FORWARD_GATHER", "BACKWARD_GATHER", "REDUCE_SCATTER",
           "UNTOKENED_REDUCE_SCATTER", "GRAD_NORM", "CHECKPOINT_BARRIER", "unit_channel",
           "full_state_channel", "user_channel", "describe_channel"]

UNTOKENED_REDUCE_SCATTER = 1
"""What torch_xla's untokened reduce-scatter uses; see [Note: channel ids]."""

FORWARD_GATHER, BACKWARD_GATHER, REDUCE_SCATTER = 0, 1, 2
"""The collective ops of one unit, each with its own block of ids."""
_OPS_PER_UNIT = 3

MAX_COLLECTIVES_PER_OP = 1 << 12
"""Collectives one op of one unit may issue (buckets, or parameters when not flattened)."""

_FIRST_UNIT_CHANNEL = UNTOKENED_REDUCE_SCATTER + 1
_GLOBAL_BASE = 1 << 30
"""First id past every unit channel; the ids of whole-model collectives start here."""

MAX_UNITS = (_GLOBAL_BASE - _FIRST_UNIT_CHANNEL) // (_OPS_PER_UNIT * MAX_COLLECTIVES_PER_OP)
"""FSDP units one model may have, so that every unit channel stays below ``2**30``."""

GRAD_NORM = _GLOBAL_BASE
CHECKPOINT_BARRIER = _GLOBAL_BASE + 1
"""The all-gather over every device of the job that commits a sharded checkpoint."""
_FULL_STATE_BASE = _GLOBAL_BASE + 2
_USER_BASE = _GLOBAL_BASE + (1 << 29)
_MAX_CHANNEL = (1 << 31) - 1  # channel ids are C ints
_OP_NAMES = {FORWARD_GATHER: "forward all-gather", BACKWARD_GATHER: "backward all-gather",
             REDUCE_SCATTER: "reduce-scatter"}


def unit_channel(unit_index: int, op: int, collective: int = 0) -> int:
    """Channel id of collective ``collective`` of op ``op`` of the unit with pre-order index ``unit_index``."""
    if not 0 <= unit_index < MAX_UNITS:
        raise ValueError(f"unit index {unit_index} is outside [0, {MAX_UNITS})")
    if op not in (FORWARD_GATHER, BACKWARD_GATHER, REDUCE_SCATTER):
        raise ValueError(f"unknown collective op {op}")
    if not 0 <= collective < MAX_COLLECTIVES_PER_OP:
        raise ValueError(f"collective {collective} is outside [0, {MAX_COLLECTIVES_PER_OP})")
    return _FIRST_UNIT_CHANNEL + (_OPS_PER_UNIT * unit_index + op) * MAX_COLLECTIVES_PER_OP + collective


def full_state_channel(index: int) -> int:
    """Channel id of the ``index``-th all-gather of ``full_state_dict``."""
    channel = _FULL_STATE_BASE + index
    if not 0 <= index or channel >= _USER_BASE:
        raise ValueError(f"full_state_dict all-gather {index} has no channel id left")
    return channel


def user_channel(index: int) -> int:
    """Channel id of the ``index``-th collective that user code issues in one step (``run_on_cpu_devices``)."""
    channel = _USER_BASE + index
    if not 0 <= index or channel > _MAX_CHANNEL:
        raise ValueError(f"user collective {index} of one step has no channel id left")
    return channel


def describe_channel(channel: int) -> str:
    """What a channel id is for, in words (for error messages): the inverse of the plan above."""
    if channel == UNTOKENED_REDUCE_SCATTER:
        return "untokened reduce-scatter"
    if _FIRST_UNIT_CHANNEL <= channel < _GLOBAL_BASE:
        block, collective = divmod(channel - _FIRST_UNIT_CHANNEL, MAX_COLLECTIVES_PER_OP)
        unit, op = divmod(block, _OPS_PER_UNIT)
        return f"{_OP_NAMES[op]} {collective} of unit #{unit}"
    if channel == GRAD_NORM:
        return "clip_grad_norm_"
    if channel == CHECKPOINT_BARRIER:
        return "sharded-checkpoint barrier"
    if _FULL_STATE_BASE <= channel < _USER_BASE:
        return f"full_state_dict all-gather {channel - _FULL_STATE_BASE}"
    if _USER_BASE <= channel <= _MAX_CHANNEL:
        return f"user collective {channel - _USER_BASE} of the step"
    return f"channel {channel}"
