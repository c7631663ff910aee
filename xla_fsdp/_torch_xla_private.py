"""The private torch_xla APIs xla_fsdp relies on, each behind one small function with a Note.

torch_xla is pinned to 2.9 (pyproject.toml); a test that exercises each
function fails when the private API it assumes changes.
"""

from __future__ import annotations

import functools
from typing import Callable


# ---------------------------------------------------------------------------
# issue 22: the step-marker hook of the collective check (_collective_check.py)
#
# [Note: the step-marker hook]
# torch_xla has no public hook that runs before a step's graph is launched.
# torch_xla.sync() and xm.mark_step() (and so MpDeviceLoader) launch it through
# torch_xla._XLAC._xla_step_marker(device, devices, wait=, reset_scope=), looked
# up on the module at each call (torch_xla 2.9, torch_xla/torch_xla.py), so
# replacing that attribute puts a function in front of every launch. The CPU
# helper (testing.py) replaces it the same way for its ordered launches. Host
# reads (.item(), .cpu()) launch through C++ and are not seen.
_HOOKED = "_xla_fsdp_before_step_marker"


def wrap_step_marker(before: Callable[[str], None]) -> None:
    """Call ``before(device)`` ahead of every step marker of the process; idempotent."""
    import torch_xla

    current = torch_xla._XLAC._xla_step_marker
    if getattr(current, _HOOKED, None) is before:
        return

    @functools.wraps(current)
    def step_marker(device, devices, wait=False, reset_scope=True):
        before(device)
        return current(device, devices, wait=wait, reset_scope=reset_scope)

    setattr(step_marker, _HOOKED, before)
    torch_xla._XLAC._xla_step_marker = step_marker
