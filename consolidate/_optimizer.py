"""Optimizer state: from per-rank shard state to the unwrapped model's optimizer.

Each rank's ``optimizer.state_dict()`` holds, per shard parameter, tensors of
the shard's shape (AdamW's ``exp_avg``, ``exp_avg_sq``) and scalars (``step``).
The checkpoint's ``optimizer_param_names`` says which shard each optimizer
parameter is. A shard-shaped state tensor is joined like its parameter and
split into the originals the shard holds; a scalar is copied to each of them.

The consolidated ``param_groups`` keep the original groups and their
hyperparameters; within a group the original parameters are numbered in the
unwrapped model's ``named_parameters()`` order (``param_order`` in the shard
metadata), so the state loads into an optimizer built the same way on the
unwrapped model, e.g. ``torch.optim.AdamW(model.parameters())``.
"""

from __future__ import annotations

from ._inputs import TORCH_XLA, ConsolidationError, ShardFile
from ._plan import Entry, Output


def optimizer_entries(files: list[ShardFile], weights_only: bool) -> tuple[list[Entry], list[dict]]:
    """Entries for every optimizer state tensor, and the consolidated ``param_groups``."""
    first = files[0]
    if first.kind == TORCH_XLA:
        raise ConsolidationError(f"{first.path}: --optimizer needs xla_fsdp checkpoints (torch_xla's do not "
                                 "record which shard each optimizer parameter is)")
    ckpt = first.load(weights_only)
    opt, names = ckpt.get("optimizer"), ckpt.get("optimizer_param_names")
    if opt is None or names is None:
        raise ConsolidationError(f"{first.path}: holds no optimizer state (save it with "
                                 "save_sharded_checkpoint(..., optimizer))")
    params = first.shard_metadata.params
    order = {name: i for i, name in enumerate(first.shard_metadata.param_order)}
    entries, groups, new_index = [], [], {}
    for group, group_names in zip(opt["param_groups"], names):
        originals = [o.name for key in group_names for o in params[key].originals]
        unknown = [n for n in originals if n not in order]
        if unknown:
            raise ConsolidationError(f"{first.path} (rank 0): field shard_metadata.param_order lacks {unknown[:3]}, "
                                     "which the optimizer's parameters hold")
        originals.sort(key=order.__getitem__)
        for name in originals:
            new_index[name] = len(new_index)
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [new_index[n] for n in originals]})
    for group, group_names in zip(opt["param_groups"], names):
        for old_index, key in zip(group["params"], group_names):
            layout = params[key].layout
            for state_name, value in opt["state"].get(old_index, {}).items():
                source = ("optimizer", "state", old_index, state_name)
                sharded = hasattr(value, "shape") and tuple(value.shape) == layout.shard_shape
                outputs = [Output(("optimizer", "state", new_index[o.name], state_name),
                                  o.offset if sharded else 0, o.shape if sharded else tuple(value.shape))
                           for o in params[key].originals]
                entries.append(Entry(source, outputs, layout=layout if sharded else None))
    return entries, groups
