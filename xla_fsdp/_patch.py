"""``patch_torch_xla()``: code that imports torch_xla's FSDP names gets xla_fsdp's.

Programs written for torch_xla, and libraries that import its FSDP on their
own (Hugging Face's ``Trainer`` in ``transformers/integrations/tpu.py``,
accelerate, a user's old script), cannot be edited to import ``xla_fsdp``.
This switch puts modules of xla_fsdp's names in ``sys.modules`` under
torch_xla's module names, so that an ``import`` or ``from ... import`` that
runs after it finds ours:

* ``torch_xla.distributed.fsdp``: ``XlaFullyShardedDataParallel``,
  ``checkpoint_module``, ``consolidate_sharded_model_checkpoints``,
  ``consolidate_sharded_state_dicts``;
* ``torch_xla.distributed.fsdp.wrap``: the four auto-wrap policies;
* ``torch_xla.distributed.fsdp.xla_fully_sharded_data_parallel``:
  ``XlaFullyShardedDataParallel``;
* ``torch_xla.distributed.fsdp.state_dict_utils``: the two consolidation functions;
* ``torch_xla.distributed.fsdp.utils``: ``checkpoint_module``.

Any other torch_xla FSDP name (``recursive_wrap``, whose arguments differ;
``XlaFlattenParamsWrapper``) or submodule is refused while the switch is on
(torch_xla's submodules already imported are hidden), rather than mixing
torch_xla's internals with ours.

It also makes accelerate treat the gradients as already reduced ([Note:
accelerate and sharded gradients]) and works around the problems of
transformers' XLA FSDP path in Trainer (``_hf_trainer.py``).

Nothing changes until ``patch_torch_xla()`` is called, and ``undo()`` (or
leaving its ``with`` block) puts back exactly what was there: the
``sys.modules`` entries, the ``fsdp`` attribute of ``torch_xla.distributed``,
the environment variable and the Trainer method. Names that a module bound
while the switch was on stay bound in that module: undoing affects later
imports only.

[Note: accelerate and sharded gradients]
accelerate's XLA path (``AcceleratedOptimizer.step`` and
``Accelerator.clip_grad_norm_``, accelerate 1.16) all-reduces every gradient of
the optimizer's parameters, averaging them over the devices, unless
``ACCELERATE_USE_FSDP`` is true. Data parallelism needs that; under FSDP the
parameters are shards, rank r's gradient is the gradient of shard r (already
averaged by the reduce-scatter), and the all-reduce averages the gradients of
*different* shards: wrong training at world size > 1 (measured with
torch_xla's FSDP as much as ours: the loss of step 2 already differs from the
unsharded model's). With the variable set, accelerate skips the all-reduce and
clips with ``model.clip_grad_norm_`` (the global norm over all shards) for a
model it knows; the Trainer patch lets it know the wrapped model. Without the
latter it would clip each rank's shards by their own local norm.
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
import types
from typing import Any, Callable, Optional

from .fully_sharded_data_parallel import XlaFullyShardedDataParallel

__all__ = ["patch_torch_xla", "TorchXlaPatch", "TorchXlaFullyShardedDataParallel"]

_PACKAGE = "torch_xla.distributed.fsdp"
_CONSTRUCTOR = inspect.signature(XlaFullyShardedDataParallel.__init__)
ACCELERATE_FLAG = "ACCELERATE_USE_FSDP"


class _TorchXlaModuleLevel:
    """torch_xla's ``model.module``: the level between the wrapper and the wrapped module.

    torch_xla puts a flatten-params wrapper between its FSDP unit and the
    user's module, so its ``model.module`` is that wrapper and
    ``model.module.module`` the user's module (which is what Trainer reads).
    xla_fsdp has no such level; this object stands in for it: ``.module`` is
    the wrapped module, and attributes, indexing and calls reach it, as they
    do through torch_xla's wrapper.
    """

    __slots__ = ("module",)

    def __init__(self, module):
        object.__setattr__(self, "module", module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.module, name, value)

    def __getitem__(self, key: Any) -> Any:
        return self.module[key]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.module!r})"


class TorchXlaFullyShardedDataParallel(XlaFullyShardedDataParallel):
    """xla_fsdp's wrapper as ``torch_xla.distributed.fsdp`` hands it out while patched.

    The same class in everything but ``module``: here, as in torch_xla,
    ``model.module`` is the level torch_xla's flatten-params wrapper occupies and
    ``model.module.module`` the wrapped module. Code written against torch_xla
    (Trainer's ``model.module.module``) reads what it expects; code that
    imports ``xla_fsdp`` gets ``XlaFullyShardedDataParallel``, whose
    ``module`` is the wrapped module itself, as in DDP and PyTorch's FSDP.
    Nested units built by its auto-wrap policy are of this class too, unless
    ``auto_wrapper_callable`` says otherwise.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        bound = _CONSTRUCTOR.bind(self, *args, **kwargs)
        if bound.arguments.get("auto_wrapper_callable") is None:
            bound.arguments["auto_wrapper_callable"] = TorchXlaFullyShardedDataParallel
        super().__init__(*bound.args[1:], **bound.kwargs)

    __init__.__signature__ = _CONSTRUCTOR

    @property
    def module(self) -> _TorchXlaModuleLevel:
        return _TorchXlaModuleLevel(self._fsdp_wrapped_module)


def _names() -> dict[str, dict[str, Any]]:
    """torch_xla module name -> the names it gets while patched."""
    from consolidate import consolidate_sharded_model_checkpoints, consolidate_sharded_state_dicts

    from . import wrap
    from .checkpoint import checkpoint_module

    fsdp = TorchXlaFullyShardedDataParallel
    consolidation = {"consolidate_sharded_model_checkpoints": consolidate_sharded_model_checkpoints,
                     "consolidate_sharded_state_dicts": consolidate_sharded_state_dicts}
    return {
        _PACKAGE: {"XlaFullyShardedDataParallel": fsdp, "checkpoint_module": checkpoint_module, **consolidation},
        f"{_PACKAGE}.wrap": {name: getattr(wrap, name) for name in (
            "always_wrap_policy", "lambda_auto_wrap_policy", "size_based_auto_wrap_policy",
            "transformer_auto_wrap_policy")},
        f"{_PACKAGE}.xla_fully_sharded_data_parallel": {"XlaFullyShardedDataParallel": fsdp},
        f"{_PACKAGE}.state_dict_utils": consolidation,
        f"{_PACKAGE}.utils": {"checkpoint_module": checkpoint_module},
    }


def _module(name: str, names: dict[str, Any]) -> types.ModuleType:
    module = types.ModuleType(name, f"xla_fsdp's names under torch_xla's module {name} (xla_fsdp.patch_torch_xla)")
    module.__dict__.update(names)
    module.__all__ = sorted(names)
    module.__file__ = __file__  # where its code is: `from ... import` errors show this path

    def missing(attribute: str) -> Any:
        raise AttributeError(
            f"module {name!r} is xla_fsdp's while xla_fsdp.patch_torch_xla() is on, and has no {attribute!r} "
            f"(it has {sorted(names)}); undo the patch to use torch_xla's own")

    module.__getattr__ = missing
    return module


_lock = threading.RLock()
_active: Optional["TorchXlaPatch"] = None
_ABSENT = object()


def _set_item(mapping, key: str, value: Any) -> Callable[[], None]:
    """``mapping[key] = value`` (``_ABSENT``: remove it); returns what puts back the previous value or absence."""
    previous = mapping.get(key, _ABSENT)
    if value is _ABSENT:
        mapping.pop(key, None)
    else:
        mapping[key] = value

    def restore() -> None:
        if previous is _ABSENT:
            mapping.pop(key, None)
        else:
            mapping[key] = previous
    return restore


class TorchXlaPatch:
    """The switch turned on by ``patch_torch_xla()``; ``undo()`` or a ``with`` block turns it off."""

    def __init__(self) -> None:
        self._undo_steps: list[Callable[[], None]] = []  # applied in reverse by undo()

    def _apply(self) -> None:
        import torch_xla.distributed as distributed

        from . import _hf_trainer

        modules = {name: _module(name, names) for name, names in _names().items()}
        package = modules[_PACKAGE]
        package.__path__ = []  # a package, whose other submodules cannot be found
        for name, module in modules.items():
            if name != _PACKAGE:
                setattr(package, name.rsplit(".", 1)[1], module)
        for name in [n for n in sys.modules if n.startswith(_PACKAGE + ".") and n not in modules]:
            self._undo_steps.append(_set_item(sys.modules, name, _ABSENT))  # hidden: torch_xla's own submodules
        for name, module in modules.items():
            self._undo_steps.append(_set_item(sys.modules, name, module))
        # `import torch_xla.distributed.fsdp as m` reads the attribute, not sys.modules.
        self._undo_steps.append(_set_item(distributed.__dict__, "fsdp", package))
        # [Note: accelerate and sharded gradients]
        self._undo_steps.append(_set_item(os.environ, ACCELERATE_FLAG, "true"))
        self._undo_steps.append(_hf_trainer.patch_trainer().undo)

    def undo(self) -> None:
        """Put back what ``patch_torch_xla()`` replaced. Calling it again does nothing."""
        global _active
        with _lock:
            while self._undo_steps:
                self._undo_steps.pop()()
            if _active is self:
                _active = None

    def __enter__(self) -> "TorchXlaPatch":
        return self

    def __exit__(self, *exc_info) -> None:
        self.undo()


def patch_torch_xla() -> TorchXlaPatch:
    """Make ``torch_xla.distributed.fsdp`` (and its ``wrap``, consolidation and checkpoint names) xla_fsdp's.

    For code that imports them after this call: Hugging Face's Trainer with
    ``TrainingArguments(fsdp=..., fsdp_config={"xla": True})``, accelerate,
    or a program written for torch_xla. It also sets ``ACCELERATE_USE_FSDP``
    ([Note: accelerate and sharded gradients]) and patches Trainer's XLA FSDP
    path (``_hf_trainer.py``). Returns the switch: call ``undo()`` on it, or
    use it as a context manager. Refused while a previous call is still on.
    """
    global _active
    with _lock:
        if _active is not None:
            raise RuntimeError("torch_xla is already patched by xla_fsdp.patch_torch_xla(); undo() that switch "
                               "before patching again")
        switch = TorchXlaPatch()
        _active = switch
        try:
            switch._apply()
        except BaseException:
            switch.undo()  # puts back whatever the failed call had replaced
            raise
        return switch
