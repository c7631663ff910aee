"""What a captured step reads and writes besides its arguments, and what it must not do.

[Note: the state of a captured step]
A replay (``_capture.py``) runs no Python, so every tensor the step reads must
reach its graph as an input, and every tensor it changes must come back as an
output and be put where the Python code would have put it. Besides its
arguments, a training step reads and writes the state of the modules it calls
and of the optimizers it steps:

* parameters and buffers (``module._parameters`` / ``._buffers``), and
  optimizer state tensors (``optimizer.state[p][key]``): updated in place, so
  their Python objects are kept and only their values replaced;
* gradients (``p.grad``): a new tensor every step after ``zero_grad()``, or the
  same one accumulated into;
* learning rates: numbers in ``optimizer.param_groups`` that a scheduler
  changes between steps ([Note: learning rates as graph inputs]).

Those modules and optimizers are found while the step runs in Python: global
forward and optimizer-step hooks note the outermost modules called and the
optimizers stepped by the capturing thread (``Recorder``). ``inventory()``
then lists their state tensors with where each lives.

A graph is a function of its inputs only, so whatever else decides what the
step computes must not change between the capture and a replay: which state
tensors exist and their shapes, ``train()``/``eval()``, ``requires_grad``,
which gradients exist, the optimizers' param groups and their other
hyperparameters, and the objects holding the state (a
``load_state_dict`` of an optimizer replaces them). ``StateGuard`` checks all
of that before every replay; a difference means the step is traced again.

[Note: learning rates as graph inputs]
An optimizer's update reads ``group["lr"]``, a Python number that a learning
rate scheduler changes every step. Traced, a number becomes a constant of the
graph (torch_xla uploads it as device data of its own), and a replay would
keep the learning rate of the step that was captured. So while a step is
traced, each param group of the optimizers below gets, in place of its number,
a device tensor that is a graph input, and every replay passes the group's
current number in it; the number is put back after the step. The optimizers
must then do all their arithmetic on device tensors, which torch's Adam and
AdamW (and ``xla_fsdp.optim.BF16AdamW``) do with ``capturable=True``: their
step count is a device tensor too, instead of a host number that only Python
advances. ``capture_step`` therefore switches them to ``capturable=True``
(kept in their ``state_dict()``; the update is algebraically the same, not
bit for bit). torch's SGD takes a tensor learning rate through
``param.addcmul_(grad, lr, value=-1)`` when the tensor requires grad (its
"differentiable" branch, run under ``no_grad``), the same update as
``param.add_(grad, alpha=-lr)``. Other optimizers keep their numbers as
constants; changing one re-captures the step.
"""

from __future__ import annotations

import contextlib
import operator
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
import torch.optim.optimizer as optimizer_module
from torch.overrides import TorchFunctionMode

from . import _torch_xla_private as _private
from ._unit import is_unit

__all__ = ["CaptureError", "StateTensor", "inventory", "structure", "StateGuard", "Recorder",
           "refuse_uncapturable"]


class CaptureError(RuntimeError):
    """A step that ``capture_step`` cannot capture, with the reason and what to change."""


def refuse_uncapturable(modules: list[nn.Module]) -> None:
    """Refuse FSDP units whose own backward ends in a sync (it would split the step in two graphs)."""
    for root in modules:
        for module in root.modules():
            if is_unit(module) and module.options.cpu_offload:
                raise CaptureError(
                    "capture_step cannot capture a model built with cpu_offload=True: its gradients are "
                    "downloaded to the host by a sync inside backward, and its optimizer steps on the host, "
                    "neither of which is part of a device graph. Train it without capture_step")
            if is_unit(module) and module.options.sync_on_finalization:
                raise CaptureError(
                    "capture_step cannot capture a model built with sync_on_finalization=True: it runs "
                    "torch_xla.sync() inside backward, which would split the step into two graphs")


# ----------------------------------------------------------------- inventory
@dataclass(eq=False)
class StateTensor:
    """One tensor of a step's state and where it lives. See [Note: the state of a captured step]."""

    kind: str
    """``"param"``, ``"buffer"``, ``"grad"``, ``"optimizer"`` or ``"hyperparameter"`` (a tensor in a param group)."""
    name: str
    """For messages: ``"blocks.0.fc1.weight"``, ``"optimizer 0 state['exp_avg'] of blocks.0.fc1.weight"``."""
    tensor: torch.Tensor
    owner: Any
    """The dict it is an entry of (``module._parameters``, ``optimizer.state[p]``, a param group), or the
    parameter whose ``.grad`` it is."""
    key: Any = None

    def current(self) -> Optional[torch.Tensor]:
        return self.owner.grad if self.kind == "grad" else self.owner.get(self.key)

    def put(self, tensor: torch.Tensor) -> None:
        if self.kind == "grad":
            self.owner.grad = tensor
        else:
            self.owner[self.key] = tensor

    def location(self) -> "StateTensor":
        """The same place without the tensor found there (a program keeps places, not old values)."""
        return StateTensor(self.kind, self.name, None, self.owner, self.key)


def is_xla(value: Any) -> bool:
    """Whether ``value`` is a tensor on an XLA device."""
    return isinstance(value, torch.Tensor) and value.device.type == "xla"


def inventory(modules: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> list[StateTensor]:
    """Every device tensor of the step's state, each once, in a fixed order."""
    entries: list[StateTensor] = []
    seen: set[int] = set()
    names: dict[int, str] = {}

    def add(entry: StateTensor) -> None:
        if id(entry.tensor) not in seen:
            seen.add(id(entry.tensor))
            entries.append(entry)

    params: list[tuple[str, nn.Parameter]] = []
    for root in modules:
        for path, module in root.named_modules():
            prefix = f"{path}." if path else ""
            for attr, p in module._parameters.items():
                if is_xla(p):
                    add(StateTensor("param", prefix + attr, p, module._parameters, attr))
                    names.setdefault(id(p), prefix + attr)
                    params.append((prefix + attr, p))
            for attr, b in module._buffers.items():
                if is_xla(b):
                    add(StateTensor("buffer", prefix + attr, b, module._buffers, attr))
    for index, opt in enumerate(optimizers):
        for g, group in enumerate(opt.param_groups):
            for i, p in enumerate(group["params"]):
                name = names.setdefault(id(p), f"optimizer {index} param group {g} parameter {i}")
                params.append((name, p))
                for key, value in opt.state.get(p, {}).items():
                    if is_xla(value):
                        add(StateTensor("optimizer", f"optimizer {index} state[{key!r}] of {name}", value,
                                        opt.state[p], key))
            for key, value in group.items():
                if key != "params" and is_xla(value):
                    add(StateTensor("hyperparameter", f"optimizer {index} param group {g}[{key!r}]", value,
                                    group, key))
    done: set[int] = set()
    for name, p in params:
        if id(p) not in done and is_xla(p.grad):
            done.add(id(p))
            add(StateTensor("grad", f"{name}.grad", p.grad, p))
    return entries


def _hyperparameters(group: dict) -> tuple:
    """A param group's settings other than its parameters, comparable across steps ([Note: learning rates ...])."""
    values = []
    for key, value in group.items():
        if key == "params" or is_xla(value):
            continue
        if isinstance(value, torch.Tensor):
            value = ("tensor", tuple(value.detach().reshape(-1).tolist()))  # on the host: no device read
        elif isinstance(value, list):
            value = tuple(value)
        values.append((key, value))
    return tuple(values)


def structure(modules: list[nn.Module], optimizers: list[torch.optim.Optimizer],
              state: list[StateTensor], lr_inputs: bool) -> tuple:
    """Everything besides tensor values that decides what the step computes (see the Note)."""
    tensors = tuple((s.kind, s.name, tuple(s.tensor.shape), s.tensor.dtype, str(s.tensor.device)) for s in state)
    training = tuple(m.training for root in modules for m in root.modules())
    requires_grad = tuple(s.tensor.requires_grad for s in state if s.kind == "param")
    groups = tuple(tuple(_without_lr(_hyperparameters(g), lr_inputs and tensor_lr_supported(opt))
                         + (len(g["params"]),) for g in opt.param_groups) for opt in optimizers)
    return tensors, training, requires_grad, groups


def _without_lr(values: tuple, drop: bool) -> tuple:
    return tuple(kv for kv in values if not (drop and kv[0] == "lr")) if drop else values


_TRAINING = operator.attrgetter("training")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_GRAD = operator.attrgetter("grad")


class StateGuard:
    """Checks before a replay that the step would still compute the captured graph (see the Note).

    Cheap by construction: list comprehensions over objects gathered at
    capture time, no module walk. ``stale()`` returns why a replay would be
    wrong, or ``None``.
    """

    def __init__(self, modules: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                 state: list[StateTensor], lr_inputs: bool):
        self._modules = [m for root in modules for m in root.modules()]
        self._training = [m.training for m in self._modules]
        self._slots = [s for s in state if s.kind != "grad"]
        self._slot_owners = [s.owner for s in self._slots]   # the dicts they are entries of
        self._slot_keys = [s.key for s in self._slots]
        self._slot_tensors = [s.tensor for s in self._slots]
        self._params = [s.tensor for s in state if s.kind == "param"]
        self._requires_grad = [p.requires_grad for p in self._params]
        self._grad_params = _optimizer_and_module_params(modules, optimizers)
        self._has_grad = [p.grad is not None for p in self._grad_params]
        self._optimizers = [(opt, opt.state, opt.param_groups, len(opt.param_groups),
                             [(g, g["params"], len(g["params"]),
                               _without_lr(_hyperparameters(g), lr_inputs and tensor_lr_supported(opt)))
                              for g in opt.param_groups], lr_inputs and tensor_lr_supported(opt))
                            for opt in optimizers]

    def stale(self) -> Optional[str]:
        if list(map(_TRAINING, self._modules)) != self._training:
            changed = next(type(m).__name__ for m, t in zip(self._modules, self._training) if m.training != t)
            return f"train()/eval() changed (first: a {changed})"
        if list(map(_REQUIRES_GRAD, self._params)) != self._requires_grad:
            return "requires_grad of a parameter changed"
        if not all(map(operator.is_, map(dict.get, self._slot_owners, self._slot_keys), self._slot_tensors)):
            replaced = next(s for s in self._slots if s.owner.get(s.key) is not s.tensor)
            return f"{replaced.name} was replaced by another tensor"
        if [g is not None for g in map(_GRAD, self._grad_params)] != self._has_grad:
            return "which parameters have a .grad changed (zero_grad(set_to_none=...) differs from the capture)"
        for opt, state, groups, count, group_info, drop_lr in self._optimizers:
            if opt.state is not state or opt.param_groups is not groups or len(groups) != count:
                return f"the state or param groups of {type(opt).__name__} were replaced (load_state_dict?)"
            for index, (group, params, n, values) in enumerate(group_info):
                if group["params"] is not params or len(params) != n:
                    return f"the parameters of {type(opt).__name__} param group {index} changed"
                now = _without_lr(_hyperparameters(group), drop_lr)
                if now != values:
                    diff = next(f"{k!r}: {v!r} -> {dict(now).get(k)!r}" for k, v in values if dict(now).get(k) != v)
                    return f"{type(opt).__name__} param group {index} changed ({diff})"
        return None


def _optimizer_and_module_params(modules, optimizers) -> list[nn.Parameter]:
    """The modules' parameters, then the optimizers' others, each once."""
    seen, out = set(), []
    for p in [*(p for root in modules for p in root.parameters()),
              *(p for opt in optimizers for group in opt.param_groups for p in group["params"])]:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


# -------------------------------------------- [Note: learning rates as graph inputs]
def _optimizer_classes() -> tuple[type, ...]:
    from .optim import BF16AdamW
    return (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, BF16AdamW)


def _capturable_classes() -> tuple[type, ...]:
    from .optim import BF16AdamW
    return (torch.optim.Adam, torch.optim.AdamW, BF16AdamW)


def tensor_lr_supported(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` takes its learning rate as a graph input ([Note: learning rates as graph inputs])."""
    return type(optimizer) in _optimizer_classes()


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Switch Adam-like optimizers to ``capturable=True``, moving host step counts to the device."""
    if not isinstance(optimizer, _capturable_classes()):
        return
    for group in optimizer.param_groups:
        group["capturable"] = True
        for p in group["params"]:
            state = optimizer.state.get(p)
            step = state.get("step") if state else None
            if isinstance(step, torch.Tensor) and step.device.type != "xla":
                state["step"] = step.to(device=p.device if p.device.type == "xla" else device,
                                        dtype=torch.float32)


@dataclass
class LearningRate:
    """The device tensor standing for one param group's ``lr`` while the step is traced."""

    optimizer: torch.optim.Optimizer
    group: int
    tensor: torch.Tensor
    tensor_id: int
    """torch_xla's id of the graph input: the one-element tensor that ``tensor`` views."""


def upload_lr(value: float, device: torch.device) -> torch.Tensor:
    """A learning rate as graph input data: shape (1,), never shared.

    torch_xla uploads a 0-dim tensor through its scalar cache, which hands
    the same device data to every equal number of the graph (and makes 0 and 1
    constants), so a 0-dim learning rate could not be told from, say, a 0.1
    in the model's forward.
    """
    return torch.tensor([float(value)], dtype=torch.float32).to(device)


# ------------------------------------------------------------- the recorder
_HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__bool__,
               torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.__repr__,
               torch.Tensor.__str__, torch.Tensor.__format__, torch.Tensor.__array__, torch.equal, torch.allclose,
               torch.Tensor.equal, torch.Tensor.allclose, torch.is_nonzero, torch.Tensor.is_nonzero}


def _to_host(func, args, kwargs) -> bool:
    if func is not torch.Tensor.to:
        return func in _HOST_READS
    targets = [*args[1:], kwargs.get("device")]
    return any((isinstance(t, str) and t.startswith("cpu")) or (isinstance(t, torch.device) and t.type == "cpu")
               or (isinstance(t, torch.Tensor) and t.device.type == "cpu") for t in targets)


# Keyword arguments that aten always takes as a number: a device tensor there is read with .item() in C++,
# where no TorchFunctionMode sees it (torch's foreach SGD passes alpha=-lr).
_NUMBER_KWARGS = ("alpha", "value")


class _NoHostReads(TorchFunctionMode):
    """Refuse, while a step is traced, any read of a device value on the host (it would not happen on replay)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for name in _NUMBER_KWARGS:
            if is_xla(kwargs.get(name)):
                raise CaptureError(
                    f"capture_step: {getattr(func, '__name__', func)}(..., {name}=<device tensor>) reads that tensor "
                    f"on the host ({name} takes a number), which a replay would not do; multiply by the tensor "
                    "instead")
        if args and is_xla(args[0]) and _to_host(func, args, kwargs):
            name = getattr(func, "__name__", str(func))
            raise CaptureError(
                f"capture_step: the step function reads a device value on the host ({name} of a tensor of shape "
                f"{tuple(args[0].shape)}). A captured step replays its graph without running Python, so there "
                "would be nothing to read. Return the tensor from the function and read it after the call "
                "(loss = step(x, y); print(loss.item())), or use xm.add_step_closure outside the function")
        return func(*args, **kwargs)


class Recorder:
    """While a step is traced in this thread: the modules and optimizers it uses, and what it must not do.

    Process-wide hooks that call the recorder of their own thread only (other
    device threads may trace at the same time, or train lazily) note the
    outermost modules called and every optimizer stepped. The optimizer-step
    hooks are installed once, at import: torch calls them while iterating its
    hook dicts lazily, so adding one while another thread steps would fail that
    step ("OrderedDict mutated during iteration"), and they cost nothing
    outside ``step()``. The module hooks, which would slow every module call,
    are there only while some thread traces a captured step
    (``_module_hooks``): ``nn.Module.__call__`` copies the global hook dicts
    before calling them, and iterates them lazily only after a forward raised,
    for hooks marked ``always_call``, which ours are not. With ``lr_inputs``, each
    stepped optimizer that ``tensor_lr_supported`` accepts reads its learning rates from
    device tensors during its step ([Note: learning rates as graph inputs]).
    Host reads are refused as they happen (``_NoHostReads``); a
    ``torch_xla.sync()`` inside the step, a step closure it adds and an op that
    torch_xla runs on the host are found on exit.
    """

    def __init__(self, device: torch.device, lr_inputs: bool):
        self.device = device
        self.lr_inputs = lr_inputs
        self.modules: list[nn.Module] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.learning_rates: list[LearningRate] = []
        self._depth = 0
        self._swapped: list[tuple[dict, str, Any]] = []  # (param group, key, value to put back)
        self._stack = contextlib.ExitStack()
        self._sentinel_ran = False

    # -- hooks (called by the process-wide hooks below, in this recorder's thread only)
    def _forward_pre(self, module: nn.Module) -> None:
        if self._depth == 0 and not any(module is m for m in self.modules):
            self.modules.append(module)
        self._depth += 1

    def _forward_post(self, module: nn.Module) -> None:
        self._depth = max(0, self._depth - 1)

    def _step_pre(self, optimizer: torch.optim.Optimizer) -> None:
        if not any(optimizer is o for o in self.optimizers):
            self.optimizers.append(optimizer)
        if not all(is_xla(p) for group in optimizer.param_groups for p in group["params"]):
            return  # it steps host tensors (cpu_offload): nothing of it is in a device graph
        make_capturable(optimizer, self.device)
        if self.lr_inputs and tensor_lr_supported(optimizer):
            for index, group in enumerate(optimizer.param_groups):
                if isinstance(optimizer, torch.optim.SGD) and group.get("foreach"):
                    # foreach SGD passes the learning rate as alpha= (a host read); the loop is the same update.
                    self._swapped.append((group, "foreach", group["foreach"]))
                    group["foreach"] = False
                value = group["lr"]
                if isinstance(value, torch.Tensor):
                    continue  # the user's own tensor: state, already an input
                data = upload_lr(value, self.device)
                tensor = data.view(())
                if isinstance(optimizer, torch.optim.SGD):
                    tensor.requires_grad_()  # SGD's branch that takes a tensor learning rate (see the Note)
                self._swapped.append((group, "lr", value))
                group["lr"] = tensor
                self.learning_rates.append(LearningRate(optimizer, index, tensor, _private.tensor_id(data)))

    def _step_post(self, optimizer: torch.optim.Optimizer) -> None:
        self._restore_learning_rates()

    def _restore_learning_rates(self) -> None:
        for group, key, value in reversed(self._swapped):
            group[key] = value
        self._swapped = []

    # -- sentinel for syncs and closures
    def _sentinel(self) -> None:
        self._sentinel_ran = True

    def __enter__(self) -> "Recorder":
        if getattr(_active, "recorder", None) is not None:
            raise CaptureError("capture_step: a captured step function called another captured step function; "
                               "capture the outer one only")
        _active.recorder = self
        stack = self._stack
        stack.enter_context(_module_hooks())
        stack.callback(setattr, _active, "recorder", None)
        stack.callback(self._restore_learning_rates)
        self._closures = _private.step_closures()
        self._closures_before = len(self._closures)
        self._closures.append(self._sentinel)
        self._fallbacks_before = _fallback_counts()
        stack.enter_context(_NoHostReads())
        return self

    # ``aten::_local_scalar_dense`` is ``.item()``'s host fallback: refused as it happens in this thread by
    # _NoHostReads, and counted for every thread (another device thread reading its loss is no fault of ours).
    _FALLBACKS_OF_HOST_READS = ("aten::_local_scalar_dense",)

    def __exit__(self, *exc_info) -> None:
        self._stack.close()
        closures = _private.step_closures()
        synced = self._sentinel_ran or closures is not self._closures or self._sentinel not in closures
        added = []
        if not synced:
            position = closures.index(self._sentinel)
            added = closures[position + 1:]
            del closures[position]
        if exc_info[0] is not None:
            return
        if synced:
            refuse_uncapturable(self.modules)
            raise CaptureError(
                "capture_step: torch_xla.sync() (or xm.mark_step()) ran inside the step function. A captured "
                "step is one graph: move the sync out of the function (capture_step's call ends with one). "
                "FSDP runs one inside backward with sync_on_finalization=True or cpu_offload=True")
        if added:
            raise CaptureError(
                f"capture_step: the step function added {len(added)} step closure(s) (xm.add_step_closure); a "
                "replay does not run Python, so they would run only once. Return the tensors they read and "
                "add the closure after the call")
        fallbacks = {op: n for op, n in _fallback_counts().items()
                     if n > self._fallbacks_before.get(op, 0) and op not in self._FALLBACKS_OF_HOST_READS}
        if fallbacks:
            raise CaptureError(
                f"capture_step: torch_xla ran {sorted(fallbacks)} on the host (no XLA lowering), so the step "
                "reads device values in the middle; their results would be constants of a captured graph. "
                "Replace those ops, or move them out of the step function")


_active = threading.local()  # .recorder: the Recorder of this thread's step being traced, or None


def _forward_pre_hook(module: nn.Module, args: Any) -> None:
    recorder = getattr(_active, "recorder", None)
    if recorder is not None:
        recorder._forward_pre(module)


def _forward_hook(module: nn.Module, args: Any, output: Any) -> None:
    recorder = getattr(_active, "recorder", None)
    if recorder is not None:
        recorder._forward_post(module)


def _step_pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    recorder = getattr(_active, "recorder", None)
    if recorder is not None:
        recorder._step_pre(optimizer)


def _step_post_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    recorder = getattr(_active, "recorder", None)
    if recorder is not None:
        recorder._step_post(optimizer)


optimizer_module.register_optimizer_step_pre_hook(_step_pre_hook)
optimizer_module.register_optimizer_step_post_hook(_step_post_hook)

_module_hooks_lock = threading.Lock()
_module_hooks_users = 0
_module_hook_handles: list[Any] = []


@contextlib.contextmanager
def _module_hooks() -> Iterator[None]:
    """The process-wide module-forward hooks, installed while any thread traces a captured step.

    Only then: a global module hook takes every module call in the process, ours or not, off
    ``nn.Module.__call__``'s fast path (measured: 0.9 -> 2.6 us a call). Device threads trace at
    once, so they are counted in and out.
    """
    global _module_hooks_users
    with _module_hooks_lock:
        if _module_hooks_users == 0:
            _module_hook_handles.extend([
                nn.modules.module.register_module_forward_pre_hook(_forward_pre_hook),
                nn.modules.module.register_module_forward_hook(_forward_hook),
            ])
        _module_hooks_users += 1
    try:
        yield
    finally:
        with _module_hooks_lock:
            _module_hooks_users -= 1
            if _module_hooks_users == 0:
                for handle in _module_hook_handles:
                    handle.remove()
                _module_hook_handles.clear()


def _fallback_counts() -> dict[str, int]:
    import torch_xla.debug.metrics as met
    return {op: int(met.counter_value(op) or 0) for op in met.executed_fallback_ops()}


@dataclass
class Roots:
    """The modules and optimizers whose state a step uses, found so far (see ``Recorder``)."""

    modules: list[nn.Module] = field(default_factory=list)
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)

    def add(self, modules: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> bool:
        """Add what is new; return whether anything was."""
        added = False
        for m in modules:
            if not any(m is r or _contains(r, m) for r in self.modules):
                self.modules = [r for r in self.modules if not _contains(m, r)] + [m]
                added = True
        for o in optimizers:
            if not any(o is r for r in self.optimizers):
                self.optimizers.append(o)
                added = True
        return added


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(inner is m for m in outer.modules())


def iter_tensors(value: Any) -> Iterator[torch.Tensor]:
    from torch.utils._pytree import tree_leaves
    return (leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor))
