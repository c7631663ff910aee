"""torch.distributed.checkpoint (DCP) out and in: consolidate to DCP and load it into the plain model and into
FSDP2; resume xla_fsdp from what FSDP2 saved. The FSDP2 side runs in a 2-process gloo world on the CPU, once."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from consolidate import consolidate_sharded_model_checkpoints, consolidate_to_dcp
from support import (FP32, OPTIMIZERS, Config, assert_state_close, make_batches, make_net, run_reference,
                     train_steps, wrap_net)
from xla_fsdp.dcp import load_dcp_checkpoint
from xla_fsdp.sharded_checkpoint import CheckpointMismatchError, save_sharded_checkpoint
from xla_fsdp.testing import run_on_cpu_devices

CONFIG = Config(wrap="zero3", optimizer="adamw", steps=4)
BATCHES = make_batches(4)                # run_reference(CONFIG)'s batches

FSDP2 = textwrap.dedent("""
    import socket, sys
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    import torch.nn.functional as F
    sys.path.insert(0, sys.argv[1])
    from support import OPTIMIZERS, make_batches, make_net

    def fully_sharded(model, mesh):
        from torch.distributed.fsdp import fully_shard
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    def step(model, opt, x, y, rank, world):
        per_rank = x.shape[0] // world
        opt.zero_grad()
        F.cross_entropy(model(x[rank * per_rank:(rank + 1) * per_rank]),
                        y[rank * per_rank:(rank + 1) * per_rank]).backward()
        opt.step()

    def run(rank, world, port, consolidated, saved, stepped):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                             set_state_dict)
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (world,))
        batches = make_batches(4)
        # What python -m consolidate --format dcp --optimizer wrote, into FSDP2 (the DCP recipe), one step.
        model = fully_sharded(make_net(seed=9), mesh)
        opt = OPTIMIZERS["adamw"](model.parameters())
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=consolidated)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        step(model, opt, *batches[2], rank, world)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save(full, stepped)
        # Two steps under FSDP2 from the start, saved with DCP, for xla_fsdp to resume.
        model = fully_sharded(make_net(), mesh)
        opt = OPTIMIZERS["adamw"](model.parameters())
        for x, y in batches[:2]:
            step(model, opt, x, y, rank, world)
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=saved)
        dist.destroy_process_group()

    if __name__ == "__main__":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(run, args=(2, port, *sys.argv[2:5]), nprocs=2, start_method="fork")
""")


def _host_step(model, opt, batch):
    opt.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """xla_fsdp: 2 steps on 4 devices, saved, consolidated to .pth and to DCP (with the optimizer); FSDP2: that
    DCP loaded and stepped once, and 2 steps of its own saved with DCP."""
    d = tmp_path_factory.mktemp("dcp")

    def train(rank):
        model = wrap_net(make_net(), CONFIG)
        opt = OPTIMIZERS["adamw"](model.parameters())
        train_steps(model, opt, BATCHES[:2], rank, 4)
        save_sharded_checkpoint(d / "ckpt", model, opt, step=2)

    run_on_cpu_devices(train, 4)
    consolidate_sharded_model_checkpoints(str(d / "ckpt"), save_path=str(d / "ckpt.pth"), optimizer=True,
                                          progress=False)
    assert consolidate_to_dcp(str(d / "ckpt"), str(d / "ckpt.dcp"), optimizer=True, verify=True,
                              progress=False) == str(d / "ckpt.dcp")
    done = subprocess.run([sys.executable, "-c", FSDP2, str(Path(__file__).parent), str(d / "ckpt.dcp"),
                           str(d / "fsdp2.dcp"), str(d / "fsdp2_stepped.pt")], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = torch.load(d / "ckpt.pth", weights_only=True)
    model = make_net(seed=9)
    model.load_state_dict(ckpt["model"])
    opt = OPTIMIZERS["adamw"](model.parameters())
    opt.load_state_dict(ckpt["optimizer"])
    return {"dir": d, "pth_model": ckpt["model"], "pth_step": _host_step(model, opt, BATCHES[2])}


def test_the_dcp_output_loads_into_the_plain_model_and_steps_exactly_like_the_pth_output(runs):
    model = make_net(seed=9)
    opt = OPTIMIZERS["adamw"](model.parameters())
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=runs["dir"] / "ckpt.dcp", no_dist=True)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert_state_close(model.state_dict(), runs["pth_model"], rtol=0, atol=0)
    assert model.decode.weight is model.embed.weight               # the tie survives set_state_dict
    assert_state_close(_host_step(model, opt, BATCHES[2]), runs["pth_step"], rtol=0, atol=0)


def test_the_dcp_output_loads_into_an_fsdp2_model_on_2_ranks_and_steps_like_the_pth_output(runs):
    stepped = torch.load(runs["dir"] / "fsdp2_stepped.pt", weights_only=True)
    # gloo's averaged gradients of two half batches against one whole batch: fp32 rounding only.
    assert_state_close(stepped, runs["pth_step"], **FP32)


@pytest.mark.parametrize("config", [CONFIG, CONFIG.replace(wrap="zero2", fsdp=(("flatten_parameters", False),))],
                         ids=["zero3-flat", "zero2-unflat"])
def test_xla_fsdp_resumes_from_what_fsdp2_saved_and_matches_the_unsharded_run(runs, config):
    def resume(rank):
        model = wrap_net(make_net(seed=5), config)
        opt = OPTIMIZERS["adamw"](model.parameters())
        load_dcp_checkpoint(runs["dir"] / "fsdp2.dcp", model, opt)
        losses = train_steps(model, opt, BATCHES[2:], rank, 4).losses
        return losses, model.full_state_dict(rank0_only=False)

    results = run_on_cpu_devices(resume, 4)
    reference = run_reference(CONFIG)
    losses = [sum(r[0][i] for r in results) / 4 for i in range(2)]
    torch.testing.assert_close(losses, reference.losses[2:], **FP32)
    assert_state_close(results[0][1], reference.params, **FP32)


def test_a_dcp_checkpoint_that_does_not_fit_the_model_loads_on_no_rank(runs):
    def load(rank):
        net = make_net(seed=5)
        net.head = torch.nn.Parameter(torch.zeros(15, 2))
        model = wrap_net(net, CONFIG)
        before = [p.detach().cpu().clone() for p in model.parameters()]
        try:
            load_dcp_checkpoint(runs["dir"] / "fsdp2.dcp", model)
            error = None
        except Exception as exc:
            error = exc
        return error, all(torch.equal(b, p.detach().cpu()) for b, p in zip(before, model.parameters()))

    results = run_on_cpu_devices(load, 2)
    assert all(error is not None and unchanged for error, unchanged in results), results
    own = [e for e, _ in results if isinstance(e, CheckpointMismatchError)]
    assert own and all("model.head has shape [15, 3], the model's is [15, 2]" in str(e) for e in own), results


def test_a_damaged_data_file_loads_on_no_rank_and_no_rank_hangs(runs, tmp_path):
    import shutil
    shutil.copytree(runs["dir"] / "fsdp2.dcp", tmp_path / "damaged.dcp")
    victim = tmp_path / "damaged.dcp" / "__1_0.distcp"
    victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])

    def load(rank):
        model = wrap_net(make_net(seed=5), CONFIG)
        opt = OPTIMIZERS["adamw"](model.parameters())
        before = [p.detach().cpu().clone() for p in model.parameters()]
        try:
            load_dcp_checkpoint(tmp_path / "damaged.dcp", model, opt)
            error = None
        except Exception as exc:
            error = str(exc)
        return error, all(torch.equal(b, p.detach().cpu()) for b, p in zip(before, model.parameters()))

    results = run_on_cpu_devices(load, 2)
    assert all(error is not None and "\n" not in error and unchanged for error, unchanged in results), results
    assert any("damaged.dcp" in error and "cannot be read" in error for error, _ in results), results
