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
from ._layout import split_flat
from ._metadata import Original, ShardedParam, ShardMetadata
from ._unit import is_unit, named_units

if TYPE_CHECKING:
    from .fully_sharded_data_parallel import XlaFullyShardedDataParallel

_WRAPPED = "_fsdp_wrapped_module."


def original_name(key: str) -> str:
    """State-dict key of a wrapped model -> the unwrapped model's name."""
    return key.replace(_WRAPPED, "")


def build_shard_metadata(root: "XlaFullyShardedDataParallel") -> ShardMetadata:
    """The one writer of shard metadata (see ``_metadata.py``)."""
    params = {}
    for prefix, unit in named_units(root):
        module_prefix = original_name(prefix + _WRAPPED)
        for sp in unit._params.sharded:
            originals = tuple(Original(module_prefix + op.name, tuple(op.shape), op.offset,
                                       tuple(module_prefix + a for a in op.aliases)) for op in sp.originals)
            params[prefix + sp.name] = ShardedParam(tuple(sp.layout.shape), sp.layout.world_size,
                                                    sp.layout.shard_on_dim_0, originals)
    buffers = {key: original_name(key) for key in root.state_dict() if key not in params}
    param_order, state_order = _unwrapped_order(root)
    return ShardMetadata(root.world_size, root.rank, params, buffers, tuple(param_order), tuple(state_order))


def shard_metadata(root: "XlaFullyShardedDataParallel") -> dict:
    """``get_shard_metadata()``: the plain-dict form of ``build_shard_metadata``."""
    return build_shard_metadata(root).to_dict()


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


def unflatten(full: torch.Tensor, param: ShardedParam) -> dict[str, torch.Tensor]:
    """One full tensor -> its original parameters (tied ones under every name)."""
    out = {}
    for original, value in zip(param.originals, split_flat(full, param.slots)):
        for name in (original.name, *original.aliases):
            out[name] = value
    return out


def unshard_state_dicts(state_dicts: Sequence[Mapping[str, torch.Tensor]], metadata) -> dict:
    """Every rank's ``state_dict()`` (in rank order) -> the unwrapped model's state dict.

    ``metadata``: a ``ShardMetadata`` or its dict form, which is validated first.
    """
    if not isinstance(metadata, ShardMetadata):
        metadata = ShardMetadata.from_dict(metadata, "shard metadata")
    full = {}
    for key, param in metadata.params.items():
        full.update(unflatten(param.layout.unshard([sd[key] for sd in state_dicts]), param))
    for key, name in metadata.buffers.items():
        full[name] = state_dicts[0][key]
    return full


@torch.no_grad()
def full_state_dict(root: "XlaFullyShardedDataParallel", rank0_only: bool) -> dict[str, torch.Tensor]:
    import torch_xla  # here only: the offline consolidation tool imports this module
    metadata = build_shard_metadata(root)
    local = root.state_dict()
    gathered = {}
    for index, key in enumerate(metadata.params):
        shard = local[key].reshape(-1).to(root.xla_device)  # a host tensor under CPU offload
        gathered[key] = root.group.all_gather(shard, full_state_channel(index), "full_state_dict")
    torch_xla.sync()
    if rank0_only and root.rank != 0:
        return {}
    full = {}
    for key, param in metadata.params.items():
        full.update(unflatten(param.layout.unpad(gathered[key].cpu()), param))
    for key, name in metadata.buffers.items():
        full[name] = local[key].cpu()
    return full
