"""Optimizer state: from per-rank shard state to the unwrapped model's optimizer.

Each rank's ``optimizer.state_dict()`` holds, per shard parameter, tensors of
the shard's shape (AdamW's ``exp_avg``, ``exp_avg_sq``) and scalars (``step``).
Which shard each optimizer parameter is comes from the checkpoint's
``optimizer_param_names`` (``save_sharded_checkpoint`` writes it), or, for a
file that torch_xla's programs write (``{"model", "shard_metadata",
"optimizer"}`` through ``xm.save``), from the order of the parameters when
that order settles it: see [Note: optimizer state without names]. A
shard-shaped state tensor is joined like its parameter and split into the
originals the shard holds; a scalar is copied to each of them.

The consolidated ``param_groups`` keep the original groups and their
hyperparameters; within a group the original parameters are numbered in the
unwrapped model's ``named_parameters()`` order (``param_order`` in the shard
metadata), so the state loads into an optimizer built the same way on the
unwrapped model, e.g. ``torch.optim.AdamW(model.parameters())``. Keyed by
name (``key_by_name``), the state is what
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` returns
for the unwrapped model: ``state`` and each group's ``params`` by parameter
name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch

from xla_fsdp._metadata import ShardMetadata

from ._inputs import TORCH_XLA, ConsolidationError, ShardFile
from ._plan import Entry, Output

# [Note: optimizer state without names]
# torch.optim numbers the parameters it was given 0, 1, ... in its state dict,
# group after group. A program that builds its optimizer as torch_xla's do,
# ``SGD(model.parameters(), ...)``, gives the wrapped model's parameters in
# ``named_parameters()`` order, which is the order of ``shard_metadata``'s
# ``params`` (units in pre-order, each unit's shard parameters in order). The
# state is matched by that order only when nothing else could have been meant:
# one parameter group, numbered 0..n-1, as many parameters as the model has
# shard parameters, and every state tensor that is not a scalar of exactly the
# shard shape of the parameter it is matched with. An optimizer over a subset
# (only the trainable parameters), several groups (weight decay on some), or a
# shape that does not fit is not guessed at: the state is left out, or refused
# when it was asked for.


def optimizer_param_names(ckpt: dict, metadata: ShardMetadata) -> tuple[Optional[list[list[str]]], str]:
    """Which shard parameter each optimizer parameter is, and how that was found; ``(None, why not)``.

    The file's ``optimizer_param_names`` if it has them (checked when the
    file was opened), else the order of the parameters, per [Note: optimizer
    state without names].
    """
    names = ckpt.get("optimizer_param_names")
    if names is not None:
        return names, "optimizer_param_names"
    opt = ckpt.get("optimizer")
    groups = opt.get("param_groups") if isinstance(opt, Mapping) else None
    state = opt.get("state") if isinstance(opt, Mapping) else None
    if not isinstance(groups, list) or not isinstance(state, Mapping) \
            or not all(isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups):
        return None, "field optimizer is not an optimizer state dict"
    if len(groups) != 1:
        return None, (f"it has {len(groups)} parameter groups, and without optimizer_param_names nothing says which "
                      "parameters each group holds")
    params, keys = groups[0]["params"], list(metadata.params)
    if params != list(range(len(params))):
        return None, f"its parameter group numbers its parameters {params[:6]}, not 0..{len(params) - 1}"
    if len(params) != len(keys):
        return None, (f"it holds {len(params)} parameters but the model has {len(keys)} shard parameters (an "
                      "optimizer over some of them, e.g. only the trainable ones, cannot be matched by order)")
    for index, key in zip(params, keys):
        shard_shape = metadata.params[key].layout.shard_shape
        for name, value in (state.get(index) or {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != shard_shape:
                return None, (f"its state {name} of parameter {index} has shape {list(value.shape)}, but the "
                              f"shard parameter {index} in the model's order, {key}, has shape {list(shard_shape)}")
    unknown = sorted(set(state) - set(params), key=str)
    if unknown:
        return None, f"its state lists parameters {unknown[:3]} that no parameter group holds"
    return [keys], "the order of the model's parameters (one group over model.parameters())"


def optimizer_entries(files: list[ShardFile], weights_only: bool,
                      key_by_name: bool = False, root: str = "optimizer") -> tuple[list[Entry], list[dict]]:
    """Entries for every optimizer state tensor under ``root``, and the consolidated ``param_groups``."""
    first = files[0]
    if first.kind == TORCH_XLA:
        raise ConsolidationError(f"{first.path}: --optimizer needs xla_fsdp checkpoints (torch_xla's do not "
                                 "record which shard each optimizer parameter is)")
    ckpt = first.load(weights_only)
    opt = ckpt.get("optimizer")
    if opt is None:
        raise ConsolidationError(f"{first.path}: holds no optimizer state (save it with "
                                 "save_sharded_checkpoint(..., optimizer))")
    names, how = optimizer_param_names(ckpt, first.shard_metadata)
    if names is None:
        raise ConsolidationError(f"{first.path} (rank 0): --optimizer: its optimizer state cannot be matched to "
                                 f"parameters: it has no optimizer_param_names and {how}")
    params = first.shard_metadata.params
    order = {name: i for i, name in enumerate(first.shard_metadata.param_order)}
    entries, groups, new_key = [], [], {}
    for group, group_names in zip(opt["param_groups"], names):
        originals = [o.name for key in group_names for o in params[key].originals]
        unknown = [n for n in originals if n not in order]
        if unknown:
            raise ConsolidationError(f"{first.path} (rank 0): field shard_metadata.param_order lacks {unknown[:3]}, "
                                     "which the optimizer's parameters hold")
        originals.sort(key=order.__getitem__)
        for name in originals:
            new_key[name] = name if key_by_name else len(new_key)
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [new_key[n] for n in originals]})
    for group, group_names in zip(opt["param_groups"], names):
        for old_index, key in zip(group["params"], group_names):
            layout = params[key].layout
            for state_name, value in opt["state"].get(old_index, {}).items():
                source = ("optimizer", "state", old_index, state_name)
                sharded = hasattr(value, "shape") and tuple(value.shape) == layout.shard_shape
                outputs = [Output((root, "state", new_key[o.name], state_name),
                                  o.offset if sharded else 0, o.shape if sharded else tuple(value.shape))
                           for o in params[key].originals]
                entries.append(Entry(source, outputs, layout=layout if sharded else None))
    return entries, groups


def left_out(files: list[ShardFile], weights_only: bool) -> Optional[str]:
    """The line to show when a set that was not asked for its optimizer state carries some without names."""
    first = files[0]
    ckpt = first.load(weights_only)
    if ckpt.get("optimizer") is None or ckpt.get("optimizer_param_names") is not None:
        return None
    if first.kind == TORCH_XLA:
        return (f"{first.path}: its optimizer state was left out: torch_xla's shard metadata does not record which "
                "parameter each optimizer parameter is; only the model was consolidated")
    names, how = optimizer_param_names(ckpt, first.shard_metadata)
    if names is None:
        return (f"{first.path}: its optimizer state was left out: it has no optimizer_param_names and {how}; only "
                "the model was consolidated")
    return (f"{first.path}: its optimizer state was left out (only the model was consolidated); it matches the "
            "parameters by their order, so --optimizer (optimizer=True) would merge it")
