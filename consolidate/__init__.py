"""Merge per-rank FSDP shard files into one full checkpoint, and more.

``--ckpt_prefix`` may name a checkpoint directory of ``save_sharded_checkpoint``
(its newest committed step is read through the manifest), or the prefix of a
set of shard files. Outputs are written beside their target under a temporary
name, verified (``--verify``) and only then renamed into place; nothing that
this tool did not write is ever replaced or deleted.

``python -m consolidate --ckpt_prefix PREFIX [--ckpt_suffix '*.pth'] [--save_path PATH]``
has the flags of torch_xla's ``consolidate_sharded_ckpts`` and reads both
xla_fsdp's shard files (``xla_fsdp.sharded_checkpoint``) and torch_xla's.
Beyond it: ``--optimizer`` (optimizer state for the unwrapped model),
``--reshard M`` (an M-rank checkpoint), ``--format safetensors|orbax|dcp``
(dcp: a ``torch.distributed.checkpoint`` directory, see ``consolidate_to_dcp``),
``--verify``, streaming ``.pth`` output with bounded memory, a progress bar,
and one-line errors for bad input. ``python -m consolidate --help`` explains
every flag.
"""

from __future__ import annotations

from ._consolidate import FORMATS, consolidate, reshard
from ._inputs import ConsolidationError

__all__ = ["consolidate_sharded_model_checkpoints", "consolidate_sharded_state_dicts", "consolidate_to_dcp",
           "reshard_checkpoints", "ConsolidationError", "FORMATS"]


def consolidate_sharded_model_checkpoints(ckpt_prefix: str, ckpt_suffix: str = "*.pth", save_path: str = "",
                                          save_model: bool = True, **options):
    """Consolidate the shard files matching ``ckpt_prefix + ckpt_suffix``.

    Same signature and return value as torch_xla's function of this name:
    ``(full_state_dict, save_path)``, where ``save_path`` defaults to
    ``ckpt_prefix + "_consolidated.pth"`` and is ``None`` when
    ``save_model=False``. The output file is ``{"model": full_state_dict}``
    (plus ``"optimizer"`` with ``optimizer=True``). With ``save_model`` the
    returned state dict is memory-mapped from the written file; with
    ``format="dcp"`` it is None (the checkpoint is streamed to disk; read it
    with ``torch.distributed.checkpoint``, see ``consolidate_to_dcp``).

    Keyword options: ``optimizer`` (bool), ``format`` (one of ``FORMATS``),
    ``verify`` (bool: checked before the output replaces anything),
    ``overwrite`` (bool), ``progress`` (bool), ``step`` and ``sharding_group``
    (which committed step and group of a checkpoint directory),
    ``weights_only`` (bool, default True: loading cannot run code),
    ``memory_budget_mb`` (read/write group size, default 64).
    Raises ``ConsolidationError`` on bad input, before writing anything.
    Unlike torch_xla's, it refuses to replace an existing output unless
    ``overwrite=True``: nothing a user saved is overwritten silently.
    """
    state_dict, path = consolidate(ckpt_prefix, ckpt_suffix, save_path, save_model, **options)
    return state_dict, None if path is None else str(path)  # a str, as torch_xla returns


def consolidate_to_dcp(ckpt_prefix: str, save_path: str = "", ckpt_suffix: str = "*.pth", optimizer: bool = False,
                       **options) -> str:
    """Write the shard files as one ``torch.distributed.checkpoint`` (DCP) directory; returns its path.

    The directory holds ``{"model": state_dict, "optim": optimizer_state}``:
    the unwrapped model's state dict under its original names and, with
    ``optimizer=True``, the optimizer state keyed by parameter name, the way
    ``torch.distributed.checkpoint.state_dict.get_state_dict(model, optimizer)``
    returns them for the unwrapped model. Load it into the plain model, or one
    wrapped with FSDP2's ``fully_shard`` on any number of ranks::

        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    Tensors are streamed, within ``memory_budget_mb`` like ``.pth`` output.
    ``save_path`` defaults to ``PREFIX_consolidated.dcp``; the other keyword
    options are those of ``consolidate_sharded_model_checkpoints``.
    """
    _, path = consolidate(ckpt_prefix, ckpt_suffix, save_path, True, optimizer=optimizer, format="dcp", **options)
    return str(path)


def reshard_checkpoints(ckpt_prefix: str, ckpt_suffix: str = "*.pth", new_world_size: int = 1,
                        save_prefix: str = "", **options):
    """Write a committed M-rank checkpoint directory ``save_prefix`` (see ``reshard``); returns the rank files."""
    return reshard(ckpt_prefix, ckpt_suffix, new_world_size, save_prefix, **options)


def consolidate_sharded_state_dicts(state_dict_list, shard_metadata) -> dict:
    """Every rank's ``model.state_dict()`` (in rank order) and ``get_shard_metadata()`` -> the full state dict.

    torch_xla's function of this name, in memory: the result loads into the
    plain, unwrapped model, in its state-dict order. For xla_fsdp's shard
    metadata; torch_xla's shard files go through
    ``consolidate_sharded_model_checkpoints``.
    """
    from xla_fsdp._state_dict import unshard_state_dicts

    if "params" not in shard_metadata:
        raise ConsolidationError(
            "consolidate_sharded_state_dicts takes xla_fsdp's shard metadata (get_shard_metadata() of an "
            "xla_fsdp model); for torch_xla's shard files use consolidate_sharded_model_checkpoints")
    if len(state_dict_list) != shard_metadata["world_size"]:
        raise ConsolidationError(f"got {len(state_dict_list)} state dicts for a world size of "
                                 f"{shard_metadata['world_size']}: pass every rank's, in rank order")
    on_host = [{k: v.cpu() for k, v in sd.items()} for sd in state_dict_list]
    full = unshard_state_dicts(on_host, shard_metadata)
    order = {name: i for i, name in enumerate(shard_metadata.get("state_order", []))}
    return dict(sorted(full.items(), key=lambda item: (item[0] not in order, order.get(item[0], 0))))
