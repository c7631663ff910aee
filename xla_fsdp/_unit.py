"""What "an FSDP unit" is, for the modules that must recognise one.

The wrapper, the auto-wrap traversal and the state-dict code all need to tell
an FSDP unit from an ordinary module and to walk the units of a model. They
ask this module, which imports nothing of the package, so every import in
``xla_fsdp`` points one way: towards the wrapper, never back from it.
"""

from __future__ import annotations

from typing import Iterator

import torch.nn as nn

__all__ = ["FsdpUnit", "is_unit", "named_units", "iter_units"]


class FsdpUnit(nn.Module):
    """Base class of ``XlaFullyShardedDataParallel``; it adds nothing but a type to test against."""


def is_unit(module: nn.Module) -> bool:
    return isinstance(module, FsdpUnit)


def named_units(root: nn.Module) -> Iterator[tuple[str, FsdpUnit]]:
    """``(prefix, unit)`` for every unit under ``root`` (itself included), in pre-order.

    The prefix is the unit's path with a trailing dot (``""`` for the root), so
    ``prefix + key`` is the unit's state-dict key ``key`` as seen from the root.
    """
    for name, module in root.named_modules():
        if is_unit(module):
            yield (name + "." if name else ""), module


def iter_units(root: nn.Module) -> Iterator[FsdpUnit]:
    """Every unit under ``root`` (itself included), in pre-order."""
    return (module for module in root.modules() if is_unit(module))
