"""Auto-wrap policies: which submodules become nested FSDP units.

A policy is called as ``policy(module=m, recurse=r, unwrapped_params=n)``,
with the same meaning as in ``torch_xla.distributed.fsdp.wrap``: with
``recurse=True`` it answers "should the traversal descend into ``m``?", with
``recurse=False`` "should ``m`` itself be wrapped?", where ``n`` is the number
of parameters of ``m`` not yet inside a nested unit. Bind options with
``functools.partial``.
"""

from __future__ import annotations

from typing import Callable, Iterable, Type

import torch.nn as nn

from ._unit import is_unit, iter_units

__all__ = ["size_based_auto_wrap_policy", "transformer_auto_wrap_policy", "recursive_wrap"]

# Modules that hold parameters but have no forward of their own, so they can
# never be an FSDP unit; the traversal descends into them instead.
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def size_based_auto_wrap_policy(module: nn.Module, recurse: bool, unwrapped_params: int,
                                min_num_params: int = int(1e8),
                                force_leaf_modules: Iterable[Type[nn.Module]] = (nn.MultiheadAttention,),
                                exclude_wrap_modules: Iterable[Type[nn.Module]] = _CONTAINERS) -> bool:
    """Wrap any module with at least ``min_num_params`` parameters not already wrapped.

    The traversal does not descend into ``force_leaf_modules``; modules of
    ``exclude_wrap_modules`` are never wrapped themselves.
    """
    if recurse:
        return not isinstance(module, tuple(force_leaf_modules))
    return unwrapped_params >= min_num_params and not isinstance(module, tuple(exclude_wrap_modules))


def transformer_auto_wrap_policy(module: nn.Module, recurse: bool, unwrapped_params: int,
                                 transformer_layer_cls: Iterable[Type[nn.Module]]) -> bool:
    """Wrap every instance of the given layer classes (e.g. a transformer block)."""
    if recurse:
        return True
    return isinstance(module, tuple(transformer_layer_cls))


def _unwrapped_numel(module: nn.Module) -> int:
    wrapped = {id(p) for unit in iter_units(module) for p in unit.parameters()}
    return sum(p.numel() for p in module.parameters() if id(p) not in wrapped)


def recursive_wrap(module: nn.Module, policy: Callable, wrap: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Wrap, bottom-up, the children of ``module`` that ``policy`` selects (never ``module`` itself)."""
    for name, child in module.named_children():
        if is_unit(child):
            continue
        if policy(module=child, recurse=True, unwrapped_params=_unwrapped_numel(child)):
            recursive_wrap(child, policy, wrap)
        if (not isinstance(child, _CONTAINERS) and type(child).forward is not nn.Module.forward
                and policy(module=child, recurse=False, unwrapped_params=_unwrapped_numel(child))):
            setattr(module, name, wrap(child))
    return module
