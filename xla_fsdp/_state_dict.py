"""Shard metadata, and the full (unsharded) state dict.

``state_dict()`` of a wrapped model is the ordinary ``nn.Module`` one: each
rank's shards (``flat_param_0`` or ``_fsdp_shard__<name>``) and its buffers.
``get_shard_metadata()`` says how those shards map back to the unwrapped
model's parameters; with every rank's state dict and this metadata,
``unshard_state_dicts`` rebuilds the full state dict offline, through the one
shard layout of ``_layout.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from ._channels import full_state_channel
from ._layout import ShardLayout
from ._unit import is_unit, named_units

if TYPE_CHECKING:
    from .fully_sharded_data_parallel import XlaFullyShardedDataParallel

_WRAPPED = "_fsdp_wrapped_module."
METADATA_FORMAT = "xla_fsdp"
METADATA_VERSION = 1


def original_name(key: str) -> str:
    """State-dict key of a wrapped model -> the unwrapped model's name."""
    return key.replace(_WRAPPED, "")


def shard_metadata(root: "XlaFullyShardedDataParallel") -> dict:
    params = {}
    for prefix, unit in named_units(root):
        module_prefix = original_name(prefix + _WRAPPED)
        for sp in unit._params.sharded:
            params[prefix + sp.name] = {
                "shape": list(sp.layout.shape),
                "world_size": sp.layout.world_size,
                "shard_on_dim_0": sp.layout.shard_on_dim_0,
                "shard_shape": list(sp.layout.shard_shape),
                "originals": [{"name": module_prefix + op.name, "shape": list(op.shape), "offset": op.offset,
                               "aliases": [module_prefix + a for a in op.aliases]} for op in sp.originals],
            }
    shard_keys = set(params)
    buffers = {key: {"name": original_name(key)} for key in root.state_dict() if key not in shard_keys}
    return {"format": METADATA_FORMAT, "version": METADATA_VERSION, "world_size": root.world_size,
            "rank": root.rank, "params": params, "buffers": buffers,
            **dict(zip(("param_order", "state_order"), _unwrapped_order(root)))}


def _unwrapped_order(root) -> tuple[list[str], list[str]]:
    """Names in the unwrapped model's ``named_parameters()`` and ``state_dict()`` orders.

    The wrapped tree is the unwrapped one with FSDP nodes inserted, so a
    pre-order walk that emits each module's original parameters (in their
    registration order) and then its persistent buffers reproduces both:
    ``named_parameters()`` names a tied parameter once (first use),
    ``state_dict()`` under every name.
    """
    slot_names: dict[int, dict[str, str]] = {}
    first_use: set[str] = set()
    for prefix, unit in named_units(root):
        module_prefix = original_name(prefix + _WRAPPED)
        for _, op in unit._params.originals():
            first_use.add(module_prefix + op.name)
            for (mod, attr), name in zip(op.slots, [op.name, *op.aliases]):
                slot_names.setdefault(id(mod), {})[attr] = module_prefix + name
    params, state = [], []
    for path, module in root.named_modules():
        if is_unit(module):
            continue
        names = slot_names.get(id(module), {})
        for attr in getattr(module, "_xla_fsdp_param_attrs", []):
            if attr in names:
                state.append(names[attr])
                if names[attr] in first_use:
                    params.append(names[attr])
        for attr, buf in module._buffers.items():
            if buf is not None and attr not in module._non_persistent_buffers_set:
                state.append(original_name(f"{path}.{attr}" if path else attr))
    return params, state


def layout_of(info: Mapping) -> ShardLayout:
    return ShardLayout(tuple(info["shape"]), info["world_size"], info["shard_on_dim_0"])


def unflatten(full: torch.Tensor, info: Mapping) -> dict[str, torch.Tensor]:
    """One full tensor -> its original parameters (tied ones under every name)."""
    out = {}
    for op in info["originals"]:
        numel = int(torch.Size(op["shape"]).numel())
        value = full.reshape(-1)[op["offset"]:op["offset"] + numel].view(op["shape"])
        for name in [op["name"], *op["aliases"]]:
            out[name] = value
    return out


def unshard_state_dicts(state_dicts: Sequence[Mapping[str, torch.Tensor]], metadata: Mapping) -> dict:
    """Every rank's ``state_dict()`` (in rank order) -> the unwrapped model's state dict."""
    full = {}
    for key, info in metadata["params"].items():
        tensor = layout_of(info).unshard([sd[key] for sd in state_dicts])
        full.update(unflatten(tensor, info))
    for key, info in metadata["buffers"].items():
        full[info["name"]] = state_dicts[0][key]
    return full


@torch.no_grad()
def full_state_dict(root: "XlaFullyShardedDataParallel", rank0_only: bool) -> dict[str, torch.Tensor]:
    import torch_xla  # here only: the offline consolidation tool imports this module
    metadata = shard_metadata(root)
    local = root.state_dict()
    gathered = {}
    for index, key in enumerate(metadata["params"]):
        shard = local[key].reshape(-1).to(root.xla_device)  # a host tensor under CPU offload
        gathered[key] = root.group.all_gather(shard, full_state_channel(index))
    torch_xla.sync()
    if rank0_only and root.rank != 0:
        return {}
    full = {}
    for key, info in metadata["params"].items():
        full.update(unflatten(layout_of(info).unpad(gathered[key].cpu()), info))
    for key, info in metadata["buffers"].items():
        full[info["name"]] = local[key].cpu()
    return full
