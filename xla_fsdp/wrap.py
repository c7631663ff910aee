"""Auto-wrap policies: which submodules become nested FSDP units.

A policy is called as ``policy(module=m, recurse=r, unwrapped_params=n)``,
with the same meaning as in ``torch_xla.distributed.fsdp.wrap``: with
``recurse=True`` it answers "should the traversal descend into ``m``?", with
``recurse=False`` "should ``m`` itself be wrapped?", where ``n`` is the number
of parameters of ``m`` not yet inside a nested unit. Bind options with
``functools.partial``.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Type

import torch.nn as nn

from ._unit import is_unit, iter_units

__all__ = ["always_wrap_policy", "lambda_auto_wrap_policy", "size_based_auto_wrap_policy",
           "transformer_auto_wrap_policy", "recursive_wrap"]

# Modules that hold parameters but have no forward of their own, so they can
# never be an FSDP unit; the traversal descends into them instead.
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def always_wrap_policy(*args, **kwargs) -> bool:
    """Wrap every submodule (that has a forward) as its own unit."""
    return True


def lambda_auto_wrap_policy(module: nn.Module, recurse: bool, unwrapped_params: int,
                            lambda_fn: Callable[[nn.Module], bool]) -> bool:
    """Wrap every submodule for which ``lambda_fn(submodule)`` is true."""
    if recurse:
        return True
    return bool(lambda_fn(module))


def size_based_auto_wrap_policy(module: nn.Module, recurse: bool, unwrapped_params: int,
                                min_num_params: int = int(1e8),
                                force_leaf_modules: Optional[Iterable[Type[nn.Module]]] = None,
                                exclude_wrap_modules: Optional[Iterable[Type[nn.Module]]] = None) -> bool:
    """Wrap any module with at least ``min_num_params`` parameters not already wrapped.

    The traversal does not descend into ``force_leaf_modules`` (default
    ``size_based_auto_wrap_policy.FORCE_LEAF_MODULES``: ``nn.MultiheadAttention``);
    modules of ``exclude_wrap_modules`` (default ``.EXCLUDE_WRAP_MODULES``: the
    module and parameter containers) are never wrapped themselves. ``None``
    means the default, as in torch_xla.
    """
    if force_leaf_modules is None:
        force_leaf_modules = size_based_auto_wrap_policy.FORCE_LEAF_MODULES
    if exclude_wrap_modules is None:
        exclude_wrap_modules = size_based_auto_wrap_policy.EXCLUDE_WRAP_MODULES
    if recurse:
        return not isinstance(module, tuple(force_leaf_modules))
    return unwrapped_params >= min_num_params and not isinstance(module, tuple(exclude_wrap_modules))


size_based_auto_wrap_policy.FORCE_LEAF_MODULES = {nn.MultiheadAttention}
size_based_auto_wrap_policy.EXCLUDE_WRAP_MODULES = set(_CONTAINERS)


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
