"""The cross-check's torch side: xla_fsdp on N CPU XLA devices, and the unsharded reference.

Run as ``python -m xla_fsdp.crosscheck._torch_side WORKDIR`` by the
cross-check; reads ``WORKDIR/configs.json`` and ``inputs_*.npz``, writes
``torch_*.npz``. Per step it records the mean loss, every rank's gradient
shard and parameter shard (concatenated in rank order: the padded flat tensor
of each shard), and the unsharded model's loss and parameters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from xla_fsdp.testing import configure_cpu_devices, run_on_cpu_devices

from .models import ADAMW, SGD, build


def _optimizer(name, params):
    import torch
    if name == "sgd":
        return torch.optim.SGD(params, **SGD, foreach=False)
    return torch.optim.AdamW(params, **ADAMW, foreach=False)


def _train_rank(rank, config, inputs):
    import torch
    import torch.nn.functional as F
    import torch_xla

    from xla_fsdp import XlaFullyShardedDataParallel as FSDP
    from xla_fsdp import checkpoint_module

    world = config["world_size"]
    device = torch_xla.device()
    model = build(config["model"])
    layer = checkpoint_module if config["grad_ckpt"] else (lambda m: m)
    flatten = config["flatten"]
    if config["zero"] == 3:
        for i, block in enumerate(model.layers):
            model.layers[i] = FSDP(layer(block), reshard_after_forward=True, flatten_parameters=flatten)
        model = FSDP(model, flatten_parameters=flatten)
    else:
        for block in model.layers:
            layer(block)
        model = FSDP(model, reshard_after_forward=False, flatten_parameters=flatten)
    # A shard is recorded under its first original parameter's name, with the
    # names of all the parameters xla_fsdp says it holds, in its order.
    originals = {key: [o["name"] for o in info["originals"]]
                 for key, info in model.get_shard_metadata()["params"].items()}
    names = {key: members[0] for key, members in originals.items()}
    params = dict(model.named_parameters())
    opt = _optimizer(config["optimizer"], model.parameters())
    per_rank = inputs["x_0"].shape[0] // world
    record = {"loss": [], "grads": [], "params": [], "members": {names[k]: m for k, m in originals.items()}}
    for step in range(config["steps"]):
        x = torch.from_numpy(inputs[f"x_{step}"][rank * per_rank:(rank + 1) * per_rank]).to(device)
        y = torch.from_numpy(inputs[f"y_{step}"][rank * per_rank:(rank + 1) * per_rank]).to(device)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        torch_xla.sync()
        record["loss"].append(loss.item())
        record["grads"].append({names[k]: params[k].grad.cpu().reshape(-1).numpy() for k in names})
        record["params"].append({names[k]: params[k].detach().cpu().reshape(-1).numpy() for k in names})
    return record


def _train_unsharded(rank, config, inputs):
    import torch
    import torch.nn.functional as F
    import torch_xla

    device = torch_xla.device()
    model = build(config["model"]).to(device)
    opt = _optimizer(config["optimizer"], model.parameters())
    losses, params = [], []
    for step in range(config["steps"]):
        opt.zero_grad()
        loss = F.cross_entropy(model(torch.from_numpy(inputs[f"x_{step}"]).to(device)),
                               torch.from_numpy(inputs[f"y_{step}"]).to(device))
        loss.backward()
        opt.step()
        torch_xla.sync()
        losses.append(loss.item())
        params.append({k: v.cpu().numpy() for k, v in model.state_dict().items()})
    return losses, params


def run(workdir: Path) -> None:
    configs = json.loads((workdir / "configs.json").read_text())
    configure_cpu_devices(max(c["world_size"] for c in configs))
    import torch_xla.backends
    torch_xla.backends.set_mat_mul_precision("highest")
    for index, config in enumerate(configs):
        inputs = dict(np.load(workdir / f"inputs_{index}.npz"))
        ranks = run_on_cpu_devices(_train_rank, config["world_size"], config, inputs)
        ref_losses, ref_params = run_on_cpu_devices(_train_unsharded, 1, config, inputs)[0]
        out = {}
        for step in range(config["steps"]):
            out[f"loss/{step}"] = np.float64(np.mean([r["loss"][step] for r in ranks]))
            out[f"ref_loss/{step}"] = np.float64(ref_losses[step])
            for name in ranks[0]["grads"][step]:
                out[f"grad/{step}/{name}"] = np.concatenate([r["grads"][step][name] for r in ranks])
                out[f"param/{step}/{name}"] = np.concatenate([r["params"][step][name] for r in ranks])
            for name, value in ref_params[step].items():
                out[f"ref_param/{step}/{name}"] = value
        for key, members in ranks[0]["members"].items():
            out[f"members/{key}"] = np.array(members)
        np.savez(workdir / f"torch_{index}.npz", **out)


if __name__ == "__main__":
    run(Path(sys.argv[1]))
