"""``checkpoint_module``: activation checkpointing that XLA cannot optimise away.

A checkpointed module runs its forward without keeping activations, and runs
it again in backward to get them. In one fused XLA graph the recomputation is
the same expression as the forward, so XLA's common-subexpression elimination
would merge the two and keep the activations alive after all, silently undoing
the checkpoint. The recomputation therefore starts from an
``optimization_barrier`` over its inputs *and* the incoming gradients: the
barrier makes its outputs opaque to XLA (no merging with the forward), and tying
them to the gradients keeps XLA from scheduling the recomputation before the
backward reaches it.

The recomputation repeats the forward exactly, and its side effects happen once:

* Random numbers (dropout): the forward records the device's RNG seed, and
  the recomputation starts from it, so it draws the same masks; afterwards
  the seed continues as if there had been no recomputation. torch_xla keeps
  the seed on the host (``xm.get_rng_state`` returns the running seed without
  running anything on the device), so this costs no device execution.
  Within the step, the random stream after the backward is the one without
  recomputation; the next steps' seeds derive from the restored one, as with
  torch_xla's own checkpoint (``xm.fork_rng``).
* Autocast: the backward runs in autograd's own thread, outside the
  forward's ``torch.autocast``; the recomputation re-enters the forward's.
* Buffers (BatchNorm's running statistics): the recomputation would update
  them a second time; their values before it are restored after it.

Inside an FSDP unit the block's weights are the unit's full parameters, which
are not leaves but outputs of the unit's all-gather. They are explicit inputs
of the checkpoint: the recomputation runs on detached copies and hands their
gradients back along with the inputs', so every block's weight gradients
reach the all-gather through the one outer backward, and the unit
reduce-scatters once, not once per checkpointed block (the recomputation's
own backward would otherwise run the all-gather's backward each time). Under
ZeRO-3 they are saved like any other full parameter ([Note: resharding after
forward]).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._collectives import optimization_barrier

__all__ = ["checkpoint_module"]


def _get_rng_state(device: torch.device) -> Any:
    if device.type == "xla":
        import torch_xla.core.xla_model as xm
        return xm.get_rng_state(str(device))
    return torch.get_rng_state()


def _set_rng_state(device: torch.device, state: Any) -> None:
    if device.type == "xla":
        import torch_xla.core.xla_model as xm
        xm.set_rng_state(state, str(device))
    else:
        torch.set_rng_state(state)


_AUTOCAST_DEVICES = ("xla", "cpu")


def _autocast_state() -> list[tuple[str, bool, torch.dtype]]:
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES]


@contextlib.contextmanager
def _replaying(module: nn.Module, device: torch.device, rng_state: Any, autocast: list):
    """Run the body with the forward's RNG state and autocast; leave the RNG stream and the buffers as they were."""
    rng_now = _get_rng_state(device)
    buffers = [(b, b.clone()) for b in module.buffers()]
    _set_rng_state(device, rng_state)
    try:
        with contextlib.ExitStack() as stack:
            for device_type, enabled, dtype in autocast:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
            yield
    finally:
        _set_rng_state(device, rng_now)
        with torch.no_grad():
            for buffer, before in buffers:
                buffer.copy_(before)


class _Recompute(torch.autograd.Function):
    """Run ``run(*inputs)`` without saving activations; recompute it in backward."""

    @staticmethod
    def forward(ctx, run: Callable, module: nn.Module, device: torch.device, result: dict,
                slots: list[list[tuple[nn.Module, str]]], anchor: torch.Tensor, *tensors: torch.Tensor):
        ctx.run, ctx.module, ctx.device, ctx.slots = run, module, device, slots
        ctx.rng_state = _get_rng_state(device)
        ctx.autocast = _autocast_state()
        # Recorded now: a full parameter saved by reference comes back detached ([Note: resharding after forward]).
        ctx.grad_needed = [t.requires_grad for t in tensors]
        ctx.save_for_backward(*tensors)
        inputs = tensors[:len(tensors) - len(slots)]
        with torch.no_grad():
            outputs = run(*inputs)
        flat, spec = tree_flatten(outputs)
        result["spec"] = spec
        result["values"] = flat
        tensors = tuple(v for v in flat if isinstance(v, torch.Tensor))
        ctx.mark_non_differentiable(*[t for t in tensors if not t.is_floating_point()])
        return tensors

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        tensors = [t.detach().requires_grad_(needed) for t, needed in zip(ctx.saved_tensors, ctx.grad_needed)]
        inputs, fulls = tensors[:len(tensors) - len(ctx.slots)], tensors[len(tensors) - len(ctx.slots):]
        grads = [g.clone() if g is not None else None for g in grads]
        optimization_barrier(inputs + [g for g in grads if g is not None])
        # The buffers come back after the backward too: BatchNorm's saves them for it.
        with _replaying(ctx.module, ctx.device, ctx.rng_state, ctx.autocast), _installed(ctx.slots, fulls):
            with torch.enable_grad():
                outputs = ctx.run(*inputs)
            outputs = [v for v in tree_flatten(outputs)[0] if isinstance(v, torch.Tensor)]
            pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, None, None, None, None, *[t.grad if t.requires_grad else None for t in tensors])


def _full_params_in(module: nn.Module) -> tuple[list[torch.Tensor], list[list[tuple[nn.Module, str]]]]:
    """The FSDP full parameters set on ``module``'s submodules now, and the (module, attribute) slots of each."""
    fulls: dict[int, torch.Tensor] = {}
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in module.modules():
        for attr in getattr(m, "_xla_fsdp_param_attrs", ()):
            value = m.__dict__.get(attr)
            if isinstance(value, torch.Tensor) and not getattr(value, "_xla_fsdp_placeholder", False):
                fulls.setdefault(id(value), value)
                slots.setdefault(id(value), []).append((m, attr))
    return list(fulls.values()), list(slots.values())


@contextlib.contextmanager
def _installed(slots: list[list[tuple[nn.Module, str]]], fulls: list[torch.Tensor]):
    """Set ``fulls`` in their slots for the recomputation; put back what was there."""
    before = [[m.__dict__.get(attr) for m, attr in group] for group in slots]
    for group, full in zip(slots, fulls):
        for m, attr in group:
            m.__dict__[attr] = full
    try:
        yield
    finally:
        for group, values in zip(slots, before):
            for (m, attr), value in zip(group, values):
                if value is None:
                    m.__dict__.pop(attr, None)
                else:
                    m.__dict__[attr] = value


def _device_of(module: nn.Module, tensors: list[torch.Tensor]) -> torch.device:
    for t in [*tensors, *module.parameters(), *module.buffers()]:
        return t.device
    import torch_xla
    return torch_xla.device()


def _checkpointed_forward(module: nn.Module, forward: Callable, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    flat, spec = tree_flatten((args, kwargs))
    positions = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor)]
    tensors = [flat[i] for i in positions]

    def run(*tensors: torch.Tensor) -> Any:
        values = list(flat)
        for i, t in zip(positions, tensors):
            values[i] = t
        call_args, call_kwargs = tree_unflatten(values, spec)
        return forward(*call_args, **call_kwargs)

    result: dict = {}
    # An input that requires grad, so the outputs do even when no real input
    # does: the gradients this function produces are the parameters'.
    anchor = torch.zeros((), requires_grad=True)
    fulls, slots = _full_params_in(module)
    outputs = iter(_Recompute.apply(run, module, _device_of(module, tensors), result, slots, anchor,
                                    *tensors, *fulls))
    values = [next(outputs) if isinstance(v, torch.Tensor) else v for v in result["values"]]
    return tree_unflatten(values, result["spec"])


def checkpoint_module(module: nn.Module) -> nn.Module:
    """Make ``module``'s forward checkpointed (in place) and return it.

    Use it on the blocks inside an FSDP unit, typically through
    ``auto_wrapper_callable=lambda m, *a, **k: XlaFullyShardedDataParallel(checkpoint_module(m), *a, **k)``.
    """
    if getattr(module, "_xla_fsdp_checkpointed", False):
        raise ValueError(f"{type(module).__name__} is already checkpointed")
    if type(module).forward is nn.Module.forward:
        raise TypeError(f"cannot checkpoint a {type(module).__name__}: it has no forward()")
    module.forward = functools.partial(_checkpointed_forward, module, module.forward)
    module._xla_fsdp_checkpointed = True
    return module
