"""Figures read from compiled HLO text and XLA's buffer-assignment dumps."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}
_SHAPE = re.compile(r"\b(f64|f32|bf16|f16|s64|s32|u32|s8|u8|pred)\[([\d,]*)\]")
_OP = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(all-gather|reduce-scatter|all-reduce)(?:-start)?\(")
_GROUPS = re.compile(r"replica_groups=(\{\{([\d,]*)\}|\{\}|\[(\d+),(\d+)\])")


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        numel = 1
        for d in filter(None, dims.split(",")):
            numel *= int(d)
        total += numel * _BYTES[dtype]
    return total


def _group_size(line: str, world_size: int) -> int:
    match = _GROUPS.search(line)
    if not match or match.group(1) == "{}":
        return world_size
    if match.group(2) is not None:
        return len(match.group(2).split(","))
    return int(match.group(4))


def collective_bytes(hlo_text: str, world_size: int) -> dict[str, int]:
    """Bytes per collective kind in one module, counted on the full (unsharded) side.

    An all-gather's result; a reduce-scatter's operand (its result times the
    group size: optimised HLO omits operand shapes); an all-reduce's operand
    (equal to its result).
    """
    out = {"all-gather": 0, "reduce-scatter": 0, "all-reduce": 0}
    for line in hlo_text.splitlines():
        line = re.sub(r"/\*.*?\*/", "", line)   # HLO prints /*index=5*/ inside long tuples
        match = _OP.search(line)
        if not match:
            continue
        result, kind = match.groups()
        size = _shape_bytes(result)
        out[kind] += size * _group_size(line, world_size) if kind == "reduce-scatter" else size
    return out


def buffer_assignment_peak(path: Path) -> Optional[int]:
    """Peak live bytes of a compiled module, from its ``*buffer-assignment.txt`` dump."""
    text = path.read_text()
    match = re.search(r"peak usage: ([\d ]+) bytes", text)
    if match:
        return int(match.group(1).replace(" ", ""))
    match = re.search(r"Total bytes used: (\d+)", text)
    return int(match.group(1)) if match else None


_GATHER_SCATTER_DTYPE = re.compile(r"=\s*\(?(f64|f32|bf16|f16)\[[^=]*?\s(all-gather|reduce-scatter)(?:-start)?\(")


def collective_dtypes(hlo_text: str) -> set[str]:
    """The all-gathers' and reduce-scatters' element types in one module, as e.g. ``"all-gather bf16"``."""
    found = set()
    for line in hlo_text.splitlines():
        match = _GATHER_SCATTER_DTYPE.search(re.sub(r"/\*.*?\*/", "", line))
        if match:
            found.add(f"{match.group(2)} {match.group(1)}")
    return found
