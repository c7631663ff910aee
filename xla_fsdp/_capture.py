"""``capture_step``: trace a training step once, then replay its compiled graph.

[Note: capturing a step]
torch_xla traces every op of every step in Python and hashes the graph it
builds before it can look up the compiled program; for a ZeRO-3 model that
host work grows with the number of layers and can take as long as the step
itself. ``capture_step(fn)`` pays it once. Its call ``step(*args)`` means
``fn(*args)`` followed by ``torch_xla.sync()``, and runs in one of three ways:

1. **Lazily, while learning** (the first call, and any call after which the
   step's state changed shape): ``fn`` runs as usual under a ``Recorder``
   (``_capture_state.py``), which notes the modules and optimizers it uses;
   then ``torch_xla.sync()``. Optimizers' own first steps create their state,
   so a second step's graph differs from the first one's anyway.
2. **Capture** (the next call): the state tensors of those modules and
   optimizers are listed with their torch_xla ids ([Note: the state of a
   captured step]); ``fn`` is traced under the ``Recorder``, which refuses
   host reads, syncs and step closures, and hands optimizers their learning
   rates as tensors ([Note: learning rates as graph inputs]). If the state
   after ``fn`` has the shape it had before (a fixed point), the graph of every
   state tensor it changed and every tensor it returns is hashed, compiled and
   run once in place of the sync; every input of that graph is then either an
   argument, a state tensor, a learning rate, the RNG seed or a constant made
   during the trace; anything else is refused by name.
3. **Replay** (every later call whose arguments have the same shapes, dtypes
   and Python values, and whose state passes ``StateGuard``): no Python of
   ``fn`` runs. The inputs are gathered, the compiled graph is launched with
   ``_run_cached_graph``, each changed state tensor gets its new value (in
   place, or as a new ``.grad``), the RNG seed advances as a step marker would,
   the device's step closures run, and ``fn``'s return value is rebuilt from
   the graph's outputs. A changed guard traces again (2); a step whose guard
   changes at every call is traced every time and ``capture_step`` warns.

What runs once and what runs every step: everything in ``fn`` runs at
capture only, including Python code with side effects (printing, counters,
logging) and Python values it reads from elsewhere (globals, attributes),
which are constants of the graph. Only tensors reach a replay: the
arguments, the state above and the learning rates. So a value that changes
between steps must be an argument (a tensor, or a Python value: a new value
captures again) or module or optimizer state.

Randomness: a graph reads the device's RNG seed as an input; ``xm.set_rng_state``
inside the step (``checkpoint_module`` does, to repeat a block's dropout
masks) adds inputs whose values are that seed advanced a fixed number of
times. The capture finds that number for each (``_SeedPlan``), so a replay
draws exactly what the traced step would have drawn from the same seed.

Several devices per process (``run_on_cpu_devices``, a v3 host): every rank
captures its own program. The first to compile a graph caches it for the
others (``_COMPILE_LOCK`` makes them take turns), and the CPU helper orders
replays as it orders step markers. With parameter aliasing on (torch_xla's
default, and so on a TPU) the state updated in place is donated to the graph,
which writes the new values into the same device buffers.
"""

from __future__ import annotations

import enum
import functools
import gc
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch_xla
import torch_xla.core.xla_model as xm
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import _collective_check
from . import _torch_xla_private as _private
from ._capture_state import (CaptureError, Recorder, Roots, StateGuard, StateTensor, inventory, is_xla,
                             refuse_uncapturable, structure, upload_lr)

__all__ = ["capture_step", "CapturedStep", "CaptureError"]

_COMPILE_LOCK = threading.Lock()
_SEED_SEARCH_LIMIT = 1 << 18
"""How many RNG advances a seed input may be from the step's seed (random ops in one step)."""
RECAPTURE_WARNING_AFTER = 4
"""Captures of one call signature after which ``capture_step`` warns that its guard keeps changing."""


def capture_step(fn: Optional[Callable] = None, *, modules: tuple = (), optimizers: tuple = ()) -> Any:
    """Trace ``fn`` (a whole training step) once and replay its compiled graph on later calls.

    ``step = capture_step(train_step)``, then ``loss = step(x, y)`` in the
    loop, where ``train_step`` zeroes the gradients, runs forward and
    backward, maybe ``clip_grad_norm_``, steps the optimizer and returns
    tensors (the loss). A call is ``fn(*args)`` followed by
    ``torch_xla.sync()``. See [Note: capturing a step] for what runs once and
    what every step, and ``CaptureError`` for what is refused.

    Args:
        fn: the step function; usable as a decorator (``@capture_step``).
        modules, optimizers: state that ``fn`` uses but that its forward calls
            and ``optimizer.step()`` calls do not reveal (say, an EMA copy of
            the model that ``fn`` updates).
    """
    if fn is None:
        return functools.partial(capture_step, modules=modules, optimizers=optimizers)
    return CapturedStep(fn, modules=modules, optimizers=optimizers)


@dataclass
class _DeviceCaptures:
    """What one device (one rank) has learned and captured."""

    roots: Roots
    programs: dict = field(default_factory=dict)
    captures: dict = field(default_factory=dict)  # call key -> how many times it was captured
    warned: bool = False


class CapturedStep:
    """A step function with its captured programs, one set per device. Call it like the function."""

    def __init__(self, fn: Callable, *, modules: tuple = (), optimizers: tuple = ()):
        self.fn = fn
        self._given = (list(modules), list(optimizers))
        self._devices: dict[str, _DeviceCaptures] = {}
        self._lock = threading.Lock()
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        device = torch_xla.device()
        captures = self._for(device)
        leaves, key = _call_key(args, kwargs)
        program = captures.programs.get(key)
        if program is not None:
            reason = program.guard.stale()
            if reason is None:
                return program.replay(leaves)
            del captures.programs[key]
            self._note_recapture(captures, key, reason)
        return self._trace(captures, key, device, args, kwargs)

    def reset(self) -> None:
        """Forget every captured program (the next call learns and captures again)."""
        with self._lock:
            self._devices.clear()

    @property
    def captured(self) -> int:
        """How many programs this device holds now (for tests and logs)."""
        captures = self._devices.get(str(torch_xla.device()))
        return len(captures.programs) if captures else 0

    @property
    def captures(self) -> int:
        """How many times this device captured a program, re-captures included (for tests and logs)."""
        captures = self._devices.get(str(torch_xla.device()))
        return sum(captures.captures.values()) if captures else 0

    # ----------------------------------------------------------------- internals
    def _for(self, device: torch.device) -> _DeviceCaptures:
        name = str(device)
        captures = self._devices.get(name)
        if captures is None:
            with self._lock:
                captures = self._devices.setdefault(name, _DeviceCaptures(Roots(*map(list, self._given))))
        return captures

    def _note_recapture(self, captures: _DeviceCaptures, key: tuple, reason: str) -> None:
        count = captures.captures.get(key, 0)
        if count >= RECAPTURE_WARNING_AFTER and not captures.warned:
            captures.warned = True
            warnings.warn(f"capture_step({getattr(self.fn, '__name__', 'fn')}): captured {count} times already, so "
                          f"most steps are traced as without it; the last reason: {reason}. See [Note: capturing "
                          "a step] in xla_fsdp/_capture.py for what must stay the same between steps",
                          RuntimeWarning, stacklevel=3)

    def _trace(self, captures: _DeviceCaptures, key: tuple, device: torch.device, args: tuple,
               kwargs: dict) -> Any:
        roots = captures.roots
        before = _Before.take(roots, device, args, kwargs) if (roots.modules or roots.optimizers) else None
        recorder = Recorder(device, lr_inputs=True)
        with recorder:
            result = self.fn(*args, **kwargs)
        if _collective_check.is_enabled(str(device)):
            # Once, where the collectives are traced: a replay issues the same ones ([Note: the collective check]).
            _collective_check.check(str(device), where="capture_step")
        discovered = roots.add(recorder.modules, recorder.optimizers)
        program = None
        if before is not None and not discovered:
            program = _Program.capture(before, recorder, roots, device, args, kwargs, result)
        if program is None:
            torch_xla.sync()
            refuse_uncapturable(roots.modules)  # after the step: it ran correctly, but will not be captured
            return result
        del result, recorder  # the recorder holds the traced learning-rate views
        _refuse_untracked_pending(device, before.start_id)
        captures.programs[key] = program
        captures.captures[key] = captures.captures.get(key, 0) + 1
        first, program.first_result = program.first_result, None
        return first


# ---------------------------------------------------------------------- keys
_VALUE_TYPES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, enum.Enum)


def _call_key(args: tuple, kwargs: dict) -> tuple[list, tuple]:
    """The arguments' leaves, and what of them a graph depends on: tensor shapes and dtypes, every Python value."""
    leaves, spec = tree_flatten((args, kwargs))
    key = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            key.append((leaf.shape, leaf.dtype, leaf.device, leaf.requires_grad))
        elif isinstance(leaf, (nn.Module, torch.optim.Optimizer)):
            key.append(("object", id(leaf)))  # its state is followed ([Note: the state of a captured step])
        elif isinstance(leaf, _VALUE_TYPES):
            key.append((type(leaf), leaf))
        else:
            raise CaptureError(
                f"capture_step: an argument of type {type(leaf).__name__}; a captured graph is keyed by its "
                "Python arguments' values, which only plain values (numbers, strings, dtypes, None, tuples, "
                "lists and dicts of them) have. Pass tensors, or such values, or read the object outside "
                "the step")
    return leaves, (spec, tuple(key), torch.is_grad_enabled())


def _arg_tensors(args: tuple, kwargs: dict) -> list:
    return tree_flatten((args, kwargs))[0]


# ---------------------------------------------------------------- the capture
@dataclass
class _Before:
    """The state as a capture starts: its tensors (by the device data they hold) and its structure."""

    state: list[StateTensor]
    by_id: dict[int, StateTensor]
    by_data: dict[str, StateTensor]
    args_by_id: dict[int, int]
    args_by_data: dict[str, int]
    structure: tuple
    start_id: int
    seed: int

    @staticmethod
    def take(roots: Roots, device: torch.device, args: tuple, kwargs: dict) -> "_Before":
        refuse_uncapturable(roots.modules)
        state = inventory(roots.modules, roots.optimizers)
        leaves = _arg_tensors(args, kwargs)
        args_xla = [(i, t) for i, t in enumerate(leaves) if is_xla(t)]
        for i, t in args_xla:
            if t.dim() == 0:
                raise CaptureError(
                    f"capture_step: argument {i} is a 0-dimensional device tensor; torch_xla shares such a tensor's "
                    "device data with every equal number in the graph, so a replay could not give it a new value "
                    "alone. Pass it with shape (1,), or as a Python number (each new number captures again)")
        # Every state tensor and argument must hold device data (not IR) for a graph input to name it:
        # a load_state_dict or an argument computed on the device is computed now, a fresh copy settled.
        _private.sync_tensors([s.tensor for s in state] + [t for _, t in args_xla])
        xm.wait_device_ops(xm.xla_real_devices([str(device)]))  # the last replay's results are in place
        # A graph input names the tensor it came from by id when its data was made by a sync or a copy,
        # and only by the data object itself when a replay made it.
        return _Before(
            state=state,
            by_id={_private.tensor_id(s.tensor): s for s in state},
            by_data={_private.data_identity(s.tensor): s for s in state},
            args_by_id={_private.tensor_id(t): i for i, t in args_xla},
            args_by_data={_private.data_identity(t): i for i, t in args_xla},
            structure=structure(roots.modules, roots.optimizers, state, lr_inputs=True),
            start_id=_private.tensor_id(torch.empty(0, device=device)),
            seed=_private.running_seed(device))


@dataclass
class _SeedPlan:
    """How the step's RNG seed inputs and the seed it leaves behind follow from the seed it starts with.

    Each entry is how many times the start seed is advanced (``None``: a
    constant the step set, e.g. with ``torch.manual_seed``). See the Note.
    """

    inputs: list[tuple[int, Optional[int], int]]  # (input position, advances, constant seed)
    end: Optional[int]
    end_constant: int

    @staticmethod
    def find(start: int, values: list[int]) -> list[Optional[int]]:
        wanted = {v: None for v in values}
        seed, left = start, len(wanted)
        if not left:
            return []
        for advances in range(_SEED_SEARCH_LIMIT):
            if seed in wanted and wanted[seed] is None:
                wanted[seed] = advances
                left -= 1
                if not left:
                    break
            seed = _private.next_running_seed(seed)
        return [wanted[v] for v in values]

    @staticmethod
    def advanced(seed: int, times: int) -> int:
        for _ in range(times):
            seed = _private.next_running_seed(seed)
        return seed


class _Program:
    """One captured graph and how to feed it and use its results."""

    # How each graph input is found at a replay: a fixed tensor (state updated in place, or a
    # constant), an argument, a state entry read again (a gradient), a learning rate, or a seed.
    def __init__(self):
        self.hash: bytes = b""
        self.template: list[Optional[torch.Tensor]] = []
        self.arg_inputs: list[tuple[int, int]] = []          # (input position, flat argument index)
        self.entry_inputs: list[tuple[int, StateTensor]] = []
        self.lr_inputs: list[tuple[int, dict, list]] = []    # (input position, param group, [value, tensor] cache)
        self.seeds: Optional[_SeedPlan] = None
        self.inplace_outputs: list[torch.Tensor] = []        # outputs [0, n): state objects updated in place
        self.entry_outputs: list[StateTensor] = []           # then: state entries given a new tensor
        self.arg_outputs: list[int] = []                     # then: arguments the step changed in place
        self.result_leaves: list[tuple[str, Any]] = []       # fn's return value: ("output", k) / ("arg", i) / ...
        self.result_spec = None
        self.guard: Optional[StateGuard] = None
        self.device: Optional[torch.device] = None
        self.first_result: Any = None

    # ------------------------------------------------------------ capture
    @classmethod
    def capture(cls, before: _Before, recorder: Recorder, roots: Roots, device: torch.device, args: tuple,
                kwargs: dict, result: Any) -> Optional["_Program"]:
        """Make the program of the step ``fn`` just traced, run it once, or return None (not a fixed point)."""
        self = cls()
        self.device = device
        after = inventory(roots.modules, roots.optimizers)
        if structure(roots.modules, roots.optimizers, after, lr_inputs=True) != before.structure:
            return None
        leaves, self.result_spec = tree_flatten(result)
        for leaf in leaves:
            if leaf is not None and not isinstance(leaf, torch.Tensor):
                raise CaptureError(f"capture_step: the step function returns a {type(leaf).__name__}; a replay "
                                   "can only return tensors (and None), since it runs no Python")
        arg_leaves = _arg_tensors(args, kwargs)

        # The graph's outputs: changed state (in place first, then replaced), then returned tensors.
        before_by_slot = {(s.kind, s.name): s for s in before.state}
        changed = [s for s, p in zip(after, _private.need_materialization([s.tensor for s in after])) if p]
        inplace = [s for s in changed if _same(before_by_slot.get((s.kind, s.name)), s)]
        replaced = [s for s in changed if not _same(before_by_slot.get((s.kind, s.name)), s)]
        outputs = [s.tensor for s in inplace + replaced]
        # Arguments the step changed in place (FSDP's input barrier is an in-place op): updated like state.
        args_xla = [(i, t) for i, t in enumerate(arg_leaves) if is_xla(t)]
        self.arg_outputs = [i for (i, _), p in zip(args_xla, _private.need_materialization([t for _, t in args_xla]))
                            if p]
        outputs += [arg_leaves[i] for i in self.arg_outputs]
        index_of = {id(t): i for i, t in enumerate(outputs)}
        returned = [t for t in leaves if is_xla(t)]
        for t, pending in zip(returned, _private.need_materialization(returned)):
            if pending and id(t) not in index_of:
                index_of[id(t)] = len(outputs)
                outputs.append(t)

        state_ids = {id(s.tensor): s for s in after}
        arg_positions = {id(t): i for i, t in enumerate(arg_leaves)}
        for leaf in leaves:
            if leaf is None or not isinstance(leaf, torch.Tensor):
                self.result_leaves.append(("const", leaf))
            elif id(leaf) in index_of:
                self.result_leaves.append(("output", index_of[id(leaf)]))
            elif id(leaf) in arg_positions:
                self.result_leaves.append(("arg", arg_positions[id(leaf)]))
            elif id(leaf) in state_ids:
                self.result_leaves.append(("entry", state_ids[id(leaf)].location()))
            else:
                self.result_leaves.append(("const", leaf))
        self.inplace_outputs = [s.tensor for s in inplace]
        self.entry_outputs = [before_by_slot.get((s.kind, s.name), s).location() for s in replaced]

        ids, values = _private.graph_inputs(outputs)
        donors = self._map_inputs(ids, values, before, recorder, roots)
        if not _private.param_aliasing_enabled():
            donors = []
        with _private.aliasing_buffer_donors(bool(donors)):
            for t in donors:
                _private.set_buffer_donation(t, True)
            self.hash = _private.graph_hash(outputs)
            with _COMPILE_LOCK:
                _private.compile_graph(outputs)
        end_seed = _private.host_seed(device)
        self.seeds.end = _SeedPlan.find(before.seed, [end_seed])[0]
        self.seeds.end_constant = end_seed
        kept = [s for s in before.state if s.kind != "grad" and s.current() is s.tensor]
        self.guard = StateGuard(roots.modules, roots.optimizers, kept, lr_inputs=True)

        # The first run: the traced values as inputs; the traced tensors take the results, except that a
        # replaced entry (a new .grad) gets the result itself, so the traced tensor and whatever
        # functionalization keeps alive with it (the base of a view) go.
        results = _private.run_graph(self.hash, values)
        replaced_ids = {id(s.tensor) for s in replaced}
        for t, r in zip(outputs, results):
            if id(t) not in replaced_ids:
                t.data = r
        for entry, r in zip(replaced, results[len(inplace):]):
            entry.put(r)
        self._advance_seed(before.seed)
        _private.run_step_closures()
        self.first_result = result
        return self

    def _map_inputs(self, ids: list[int], values: list[torch.Tensor], before: _Before, recorder: Recorder,
                    roots: Roots) -> list[torch.Tensor]:
        """Decide where a replay finds each graph input; return the values that state updated in place reads
        (donated to the graph when aliasing is on)."""
        lrs = {lr.tensor_id: lr for lr in recorder.learning_rates}
        seeds, donors = [], []
        self.template = list(values)
        for position, (tid, value) in enumerate(zip(ids, values)):
            data = _private.data_identity(value)
            entry = before.by_id.get(tid) if tid >= 0 else None
            entry = entry or before.by_data.get(data)
            arg = before.args_by_id.get(tid) if tid >= 0 else None
            arg = before.args_by_data.get(data) if arg is None else arg
            if entry is not None:
                if entry.kind == "grad" or entry.current() is not entry.tensor:
                    self.entry_inputs.append((position, entry.location()))
                    self.template[position] = None
                else:
                    self.template[position] = entry.tensor
                    if any(entry.tensor is t for t in self.inplace_outputs):
                        donors.append(value)
            elif arg is not None:
                self.arg_inputs.append((position, arg))
                self.template[position] = None
            elif tid in lrs:
                lr = lrs[tid]
                group = lr.optimizer.param_groups[lr.group]
                self.lr_inputs.append((position, group, [None, None]))
                self.template[position] = None
            elif tid == _private.SEED_INPUT_ID and value.dtype == torch.int64 and value.dim() == 0:
                seeds.append((position, int(value.cpu().item()) & ((1 << 64) - 1)))
                self.template[position] = None
            elif tid == _private.SCALAR_INPUT_ID or tid >= before.start_id:
                pass  # a constant of the step: a Python number, or a tensor made from host data
            else:
                modules = ", ".join(type(m).__name__ for m in roots.modules) or "none"
                raise CaptureError(
                    f"capture_step: the step reads a device tensor of shape {tuple(value.shape)} and dtype "
                    f"{value.dtype} that is neither an argument nor a parameter, buffer, gradient or optimizer "
                    f"state of the modules ({modules}) and optimizers it uses, so a replay could not pass its "
                    "current value. Pass it as an argument, register it as a buffer, or name its module in "
                    "capture_step(..., modules=[...])")
        advances = _SeedPlan.find(before.seed, [v for _, v in seeds])
        self.seeds = _SeedPlan([(p, a, v) for (p, v), a in zip(seeds, advances)], None, 0)
        return donors

    # ------------------------------------------------------------- replay
    def replay(self, leaves: list) -> Any:
        """Run the program on the call's argument leaves (``_call_key``); return what the step function would."""
        inputs = list(self.template)
        for position, index in self.arg_inputs:
            inputs[position] = leaves[index]
        for position, entry in self.entry_inputs:
            inputs[position] = entry.current()
        for position, group, cache in self.lr_inputs:
            value = group["lr"]
            if cache[0] != value:
                cache[0], cache[1] = value, upload_lr(value, self.device)
            inputs[position] = cache[1]
        seed = _private.running_seed(self.device)
        for position, advances, constant in self.seeds.inputs:
            value = constant if advances is None else _SeedPlan.advanced(seed, advances)
            inputs[position] = _private.seed_tensor(value, self.device)
        try:
            results = _private.run_graph(self.hash, inputs)
        except RuntimeError as error:
            if not _private.is_pending_input_error(error):
                raise
            # An input was changed outside the step (load_state_dict copies into parameters): compute it first.
            _private.sync_tensors([t for t, p in zip(inputs, _private.need_materialization(inputs)) if p])
            results = _private.run_graph(self.hash, inputs)
        n, m = len(self.inplace_outputs), len(self.inplace_outputs) + len(self.entry_outputs)
        for t, r in zip(self.inplace_outputs, results):
            t.data = r
        for entry, r in zip(self.entry_outputs, results[n:m]):
            entry.put(r)
        for index, r in zip(self.arg_outputs, results[m:]):
            leaves[index].data = r
        self._advance_seed(seed)
        _private.run_step_closures()
        returned = []
        for kind, value in self.result_leaves:
            if kind == "output":
                returned.append(results[value])
            elif kind == "arg":
                returned.append(leaves[value])
            elif kind == "entry":
                returned.append(value.current())
            else:
                returned.append(value)
        return tree_unflatten(returned, self.result_spec)

    def _advance_seed(self, start: int) -> None:
        """Leave the seed where the traced step's ``torch_xla.sync()`` would (see [Note: capturing a step])."""
        end = self.seeds.end_constant if self.seeds.end is None else _SeedPlan.advanced(start, self.seeds.end)
        _private.set_seed(self.device, _private.seed_after_step_marker(end))


def _same(before: Optional[StateTensor], after: StateTensor) -> bool:
    return before is not None and before.tensor is after.tensor


def _refuse_untracked_pending(device: torch.device, start_id: int) -> None:
    """Refuse a step that made tensors still waiting for a computation after its graph ran.

    Checked after the first run, once every tensor the graph updated holds its
    result: what is left was made during the step (its id is past
    ``start_id``) and is neither returned nor state, so a replay would leave
    it with the captured step's value (a tensor kept by the model, say
    ``self.last_logits = logits``). Tensors from before the call are the
    caller's business.
    """
    def leftovers() -> dict[int, str]:
        return {i: d for i, d in _private.pending_tensor_ids(device).items() if i >= start_id}

    extra = leftovers()
    if extra:
        gc.collect()  # garbage of the trace (reference cycles) holds pending tensors too
        extra = leftovers()
    if extra:
        shown = "; ".join(list(extra.values())[:3])
        raise CaptureError(
            f"capture_step: the step leaves {len(extra)} computed tensor(s) that it neither returns nor keeps as "
            f"state of its modules and optimizers ({shown}); a replay would not update them, so they would go "
            "stale. Return them from the step function, or keep them in a registered buffer. (This step ran "
            "once, correctly; it was not captured)")
