"""Workarounds for Hugging Face Trainer's XLA FSDP path, applied by ``patch_torch_xla()``.

``Trainer`` (transformers 5.25) with ``fsdp_config={"xla": True}`` delays
creating its optimizer until the model is wrapped, then hands only an
optimizer it never created to ``accelerator.prepare``: training stops in
``create_scheduler`` with ``'NoneType' object has no attribute
'param_groups'``, for torch_xla's FSDP as much as ours. Once it is created,
the default optimizer (``optim="adamw_torch_fused"``) refuses XLA tensors.
And accelerate does not know the wrapped model, so it cannot clip gradients
with the model's own ``clip_grad_norm_`` ([Note: accelerate and sharded
gradients] in ``_patch.py``).

Trainer would also get weight decay wrong if it created that optimizer: it
exempts LayerNorm weights by the type of the module that holds them, and
after wrapping they are shards held by the FSDP units, so every LayerNorm
weight would decay (measured: each one 2.0e-5 off the unsharded run after 4
steps at ``weight_decay=0.01``).

The patch wraps ``Trainer._wrap_model``: right after Trainer wraps the model
in an xla_fsdp unit for training, it creates the optimizer over the wrapped
model's shards if Trainer has none, with the weight decay Trainer's rule gives
the unwrapped model's parameters (read before wrapping) and ``fused=False``
where the shards are on an XLA device (the same AdamW update, unfused); and it
appends the wrapped model to the accelerator's models. Each step is skipped
where it is not needed: if a transformers release creates the optimizer
itself, the patch leaves it alone (and its weight decay to Trainer).

Trainer restores its RNG state on resume inside ``torch.serialization.safe_globals``
(to allow numpy's arrays in ``torch.load(weights_only=True)``), a
process-wide setting whose exit puts back the list it found. Device threads
of one process (a v3 host's two cores, ``run_on_cpu_devices``) resuming at once
interleave it, and one thread's exit removes what another's entry allowed:
``Weights only load failed ... numpy._core._multiarray_umath._reconstruct``
(seen under ``run_on_cpu_devices``, on one rank of two, not on every run). So
the patch also makes ``Trainer._load_rng_state`` take a process-wide lock.

[Note: private names of transformers and accelerate]
This relies on ``Trainer._wrap_model(model, training=..., ...)`` returning the
wrapped model, on ``Trainer._load_rng_state``, on ``Trainer.is_fsdp_xla_enabled``, ``get_decay_parameter_names``,
``create_optimizer(model)`` and ``optimizer_cls_and_kwargs``, and on
``Accelerator._models``, the list
accelerate's ``clip_grad_norm_`` searches (transformers 5.25, accelerate
1.16, pinned in the ``dev`` extra). ``tests/test_hf_trainer.py`` runs the
real Trainer through them, so a release that changes them fails there.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import inspect
import functools
import logging
import sys
import threading
from typing import Any, Callable, Optional

from ._unit import is_unit

__all__ = ["patch_trainer"]

_TRAINER_MODULE = "transformers.trainer"
logger = logging.getLogger("xla_fsdp")


def _on_xla(module) -> bool:
    return any(p.device.type == "xla" for p in module.parameters())


def _shard_decay_names(wrapped, decay: set[str]) -> list[str]:
    """The wrapped model's shard names that get weight decay: those whose parameters Trainer decays.

    Trainer picks the parameters without weight decay from the unwrapped
    model's structure (LayerNorm weights, biases); after wrapping they are
    shards registered on the FSDP units, which that rule cannot see, so it
    would decay them all. A flattened shard holding both kinds gets weight
    decay, as torch_xla's FSDP gives it, with a warning.
    """
    params = wrapped.get_shard_metadata()["params"]
    names = []
    for name, _ in wrapped.named_parameters():
        originals = [{o["name"], *o["aliases"]} for o in params[name]["originals"]]
        decayed = [bool(names_of_one & decay) for names_of_one in originals]
        if any(decayed):
            names.append(name)
        if any(decayed) and not all(decayed):
            logger.warning("shard %s holds parameters with and without weight decay (%s); all of them "
                           "get weight decay (flatten_parameters=True)", name,
                           ", ".join(sorted(min(n) for n in originals)))
    return names


def _create_optimizer(trainer, wrapped, decay: set[str]) -> None:
    """``trainer.create_optimizer(wrapped)``, with the unwrapped model's weight decay and, for XLA shards, unfused."""
    chosen = trainer.optimizer_cls_and_kwargs
    cls, kwargs = chosen if chosen is not None else trainer.get_optimizer_cls_and_kwargs(trainer.args, wrapped)
    if kwargs.get("fused") and _on_xla(wrapped):
        logger.warning("%s(fused=True) (TrainingArguments.optim=%r) does not take XLA tensors; "
                       "using fused=False, the same update", cls.__name__,
                       getattr(trainer.args.optim, "value", trainer.args.optim))
        trainer.optimizer_cls_and_kwargs = (cls, {**kwargs, "fused": False})
    shard_decay = _shard_decay_names(wrapped, decay)
    trainer.get_decay_parameter_names = lambda model: shard_decay  # for this call only
    try:
        trainer.create_optimizer(wrapped)
    finally:
        del trainer.get_decay_parameter_names
        trainer.optimizer_cls_and_kwargs = chosen


def _wrap_model_patch(original: Callable) -> Callable:
    signature = inspect.signature(original)

    def _wrap_model(self, model, *args: Any, **kwargs: Any):
        bound = signature.bind(self, model, *args, **kwargs)
        bound.apply_defaults()
        creates_optimizer = (bound.arguments["training"] and getattr(self, "is_fsdp_xla_enabled", False)
                             and self.optimizer is None and not is_unit(model))
        # Trainer's weight-decay rule reads the model's structure, which wrapping moves into the shards.
        decay = set(self.get_decay_parameter_names(model)) if creates_optimizer else set()
        wrapped = original(self, model, *args, **kwargs)
        if wrapped is model or not is_unit(wrapped) or not bound.arguments["training"]:
            return wrapped
        if creates_optimizer and self.optimizer is None:
            _create_optimizer(self, wrapped, decay)
        if wrapped not in self.accelerator._models:
            self.accelerator._models.append(wrapped)
        return wrapped

    _wrap_model.__wrapped__ = original
    _wrap_model.__doc__ = original.__doc__
    return _wrap_model


_RNG_LOAD_LOCK = threading.Lock()


def _load_rng_state_patch(original: Callable) -> Callable:
    @functools.wraps(original)
    def _load_rng_state(self, *args: Any, **kwargs: Any):
        with _RNG_LOAD_LOCK:  # torch.serialization.safe_globals is process-wide: device threads take turns
            return original(self, *args, **kwargs)

    return _load_rng_state


class _TrainerPatch:
    """Patches ``Trainer._wrap_model`` (and ``_load_rng_state``) now if transformers' trainer is imported,
    else when it is."""

    def __init__(self) -> None:
        self._patched: list[tuple[type, str, Callable]] = []  # (Trainer, method name, Trainer's own method)
        self._finder: Optional[_PatchOnImport] = None

    def apply(self) -> None:
        module = sys.modules.get(_TRAINER_MODULE)
        if module is not None:
            self.patch(module)
        elif importlib.util.find_spec("transformers") is not None:
            self._finder = _PatchOnImport(self)
            sys.meta_path.insert(0, self._finder)

    def patch(self, module) -> None:
        trainer = module.Trainer
        original = trainer.__dict__.get("_wrap_model")
        if original is None or "training" not in inspect.signature(original).parameters:
            raise RuntimeError(
                f"transformers {getattr(sys.modules.get('transformers'), '__version__', '?')}: Trainer._wrap_model "
                "is not the method xla_fsdp's Trainer patch was written for (transformers 5.25)")
        load_rng_state = trainer.__dict__.get("_load_rng_state")
        if load_rng_state is None:
            raise RuntimeError(
                f"transformers {getattr(sys.modules.get('transformers'), '__version__', '?')}: Trainer has no "
                "_load_rng_state, which xla_fsdp's Trainer patch was written for (transformers 5.25)")
        trainer._wrap_model = _wrap_model_patch(original)
        trainer._load_rng_state = _load_rng_state_patch(load_rng_state)
        self._patched = [(trainer, "_wrap_model", original), (trainer, "_load_rng_state", load_rng_state)]

    def undo(self) -> None:
        if self._finder is not None:
            if self._finder in sys.meta_path:
                sys.meta_path.remove(self._finder)
            self._finder = None
        for trainer, name, original in reversed(self._patched):
            setattr(trainer, name, original)
        self._patched = []


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Applies the Trainer patch as soon as ``transformers.trainer`` has been executed."""

    def __init__(self, patch: _TrainerPatch):
        self.patch = patch

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRAINER_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader, patch = spec.loader, self.patch

        class PatchingLoader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                patch.patch(module)

        spec.loader = PatchingLoader()
        return spec


def patch_trainer() -> _TrainerPatch:
    patch = _TrainerPatch()
    patch.apply()
    return patch
