"""Save and load one rank's training checkpoint.

Every rank writes ``{prefix}_rank-{r:08d}-of-{N:08d}.pth`` (the layout of
torch_xla's FSDP docs), atomically (see ``_io.py``). A file holds::

    {"model": model.state_dict(),            # this rank's shards and buffers
     "shard_metadata": model.get_shard_metadata(),
     "optimizer": optimizer.state_dict(),    # state of the shards, if given
     "optimizer_param_names": [[state-dict key of each optimizer parameter], ...],
     "step": int, "rng": {...}, "extra": {...}, "format": "xla_fsdp", "version": 1}

Everything is a tensor, a number, a string or a container of those, so the
file loads with ``torch.load(weights_only=True)``. ``python -m consolidate``
turns a set of these files into one full checkpoint.

Exact resume: loading restores the shards, the optimizer state, the step and
the torch and XLA random states, so training continues bit-identically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch_xla
import torch_xla.core.xla_model as xm

from ._io import atomic_write, checkpoint_path
from ._state_dict import METADATA_FORMAT, METADATA_VERSION

__all__ = ["checkpoint_path", "save_sharded_checkpoint", "load_sharded_checkpoint", "CheckpointMismatchError"]


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model it is loaded into."""


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def save_sharded_checkpoint(prefix: str | Path, model, optimizer: Optional[torch.optim.Optimizer] = None,
                            step: Optional[int] = None, extra: Optional[dict] = None) -> Path:
    """Write this rank's checkpoint; every rank calls it. Returns the file written."""
    torch_xla.sync()  # materialise pending updates before reading the tensors
    metadata = model.get_shard_metadata()
    payload = {
        "format": METADATA_FORMAT, "version": METADATA_VERSION,
        "model": _to_cpu(model.state_dict()),
        "shard_metadata": metadata,
        "optimizer": _to_cpu(optimizer.state_dict()) if optimizer is not None else None,
        # Which shard each optimizer parameter is, by state-dict key, so the
        # optimizer state can be consolidated without the model.
        "optimizer_param_names": _optimizer_param_names(model, optimizer),
        "step": step,
        "rng": {"torch": torch.get_rng_state(), "xla": int(xm.get_rng_state(model.xla_device))},
        "extra": extra or {},
    }
    path = checkpoint_path(prefix, metadata["rank"], metadata["world_size"])
    return atomic_write(path, lambda f: torch.save(payload, f))


def _optimizer_param_names(model, optimizer) -> Optional[list[list[str]]]:
    if optimizer is None:
        return None
    names = {id(p): n for n, p in model.named_parameters()}
    try:
        return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    except KeyError:
        raise ValueError("the optimizer holds a parameter that is not one of the wrapped model's shards; "
                         "build it from model.parameters() after wrapping") from None


def _check_fits(saved: dict, current: dict, path: Path) -> None:
    problems = []
    if saved["world_size"] != current["world_size"]:
        problems.append(f"world size {saved['world_size']} in the file, {current['world_size']} now")
    if saved["rank"] != current["rank"]:
        problems.append(f"rank {saved['rank']} in the file, {current['rank']} now")
    missing = sorted(set(current["params"]) - set(saved["params"]))
    unexpected = sorted(set(saved["params"]) - set(current["params"]))
    if missing:
        problems.append(f"parameters missing from the file: {missing[:5]}")
    if unexpected:
        problems.append(f"parameters the model does not have: {unexpected[:5]}")
    for key in sorted(set(saved["params"]) & set(current["params"])):
        was = [(o["name"], o["shape"]) for o in saved["params"][key]["originals"]]
        now = [(o["name"], o["shape"]) for o in current["params"][key]["originals"]]
        if was != now:
            problems.append(f"{key} holds {was} in the file but {now} in the model")
    if problems:
        raise CheckpointMismatchError(f"{path} does not fit this model: " + "; ".join(problems))


def load_sharded_checkpoint(prefix: str | Path, model, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """Load this rank's checkpoint into ``model`` (and ``optimizer``); return its ``step`` and ``extra``.

    Raises ``CheckpointMismatchError`` naming what differs when the file was
    written for another world size, rank, or set of parameters and shapes.
    """
    current = model.get_shard_metadata()
    path = checkpoint_path(prefix, current["rank"], current["world_size"])
    if not path.exists():
        others = sorted(Path(path.parent).glob(f"{Path(prefix).name}_rank-*-of-*.pth"))
        hint = f"; found {[p.name for p in others[:4]]}" if others else ""
        raise FileNotFoundError(f"no checkpoint for rank {current['rank']} of {current['world_size']}: "
                                f"{path} does not exist{hint}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != METADATA_FORMAT:
        raise CheckpointMismatchError(f"{path} is not an xla_fsdp checkpoint")
    _check_fits(payload["shard_metadata"], current, path)
    model.load_state_dict(payload["model"])
    if optimizer is not None:
        if payload["optimizer"] is None:
            raise CheckpointMismatchError(f"{path} holds no optimizer state")
        optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["rng"]["torch"])
    xm.set_rng_state(payload["rng"]["xla"], model.xla_device)
    return {"step": payload["step"], "extra": payload["extra"]}
