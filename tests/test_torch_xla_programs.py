"""What TPU programs call in torch_xla works unchanged under ``run_on_cpu_devices``.

Each test runs a world smaller than the process's 8 devices where that matters:
there torch_xla's own answers (device count, all devices in one group) are wrong.
"""

import io
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_xla
import torch_xla.core.xla_model as xm
import torch_xla.distributed.parallel_loader as pl
import torch_xla.runtime as xr

from xla_fsdp import XlaFullyShardedDataParallel as FSDP
from xla_fsdp.testing import run_on_cpu_devices


def test_runtime_reports_the_helpers_rank_and_world_size():
    xr.world_size()  # cached by torch_xla on first use, here outside any world

    def fn(rank):
        return (xr.world_size(), xr.global_ordinal(), xm.get_local_ordinal(),
                xm.is_master_ordinal(), xm.is_master_ordinal(local=False))

    assert run_on_cpu_devices(fn, 2) == [(2, 0, 0, True, True), (2, 1, 1, False, False)]
    assert run_on_cpu_devices(fn, 4)[3] == (4, 3, 3, False, False)


def test_master_print_prints_once():
    out = io.StringIO()  # its default, sys.stdout, is bound when torch_xla is imported
    run_on_cpu_devices(lambda rank: xm.master_print(f"from rank {rank}", fd=out), 4)
    assert out.getvalue() == "from rank 0\n"


def test_rendezvous_exchanges_payloads_in_rank_order():
    def fn(rank):
        return (xm.rendezvous("tag", f"r{rank}".encode()),
                xm.xla_rendezvous(bytes([rank] * (rank + 1))),
                xm.rendezvous("barrier"))

    results = run_on_cpu_devices(fn, 4)
    for named, sized, empty in results:
        assert named == [b"r0", b"r1", b"r2", b"r3"]
        assert sized == [bytes([r] * (r + 1)) for r in range(4)]
        assert empty == [b""] * 4


def test_mesh_reduce_reduces_host_values_and_device_tensors():
    def fn(rank):
        value = torch.full((2,), float(rank)).to(torch_xla.device()) * 2
        return (xm.mesh_reduce("accuracy", 10.0 * rank, np.mean),
                xm.mesh_reduce("tensor", value, lambda vs: torch.stack(vs).sum(0)))

    results = run_on_cpu_devices(fn, 4)
    for accuracy, total in results:
        assert accuracy == 15.0
        assert total.device.type == "cpu"
        assert total.tolist() == [12.0, 12.0]


def test_save_writes_per_rank_files_or_only_the_masters(tmp_path):
    def fn(rank):
        state = {"w": torch.full((3,), float(rank)).to(torch_xla.device())}
        torch_xla.sync()
        xm.save(state, tmp_path / f"rank{rank}.pt", master_only=False)
        xm.save(state, tmp_path / "master.pt")
        xm.rendezvous("saved")

    run_on_cpu_devices(fn, 4)
    for rank in range(4):
        assert torch.load(tmp_path / f"rank{rank}.pt")["w"].tolist() == [float(rank)] * 3
    assert torch.load(tmp_path / "master.pt")["w"].tolist() == [0.0] * 3


def test_per_rank_files_are_all_written_when_save_returns(tmp_path):
    # torch_xla's MNIST FSDP test consolidates on the master right after xm.save.
    def fn(rank):
        if rank:
            time.sleep(0.5)  # ranks other than 0 come late
        xm.save({"rank": rank}, tmp_path / f"rank{rank}.pt", master_only=False)
        return sorted(p.name for p in tmp_path.iterdir())

    assert run_on_cpu_devices(fn, 4)[0] == [f"rank{r}.pt" for r in range(4)]


def test_a_save_called_on_the_master_only_does_not_wait_for_the_others(tmp_path):
    def fn(rank):
        if xm.is_master_ordinal():
            xm.save({"rank": rank}, tmp_path / "master.pt", master_only=False)
        torch_xla.sync()
        return rank

    assert run_on_cpu_devices(fn, 4) == [0, 1, 2, 3]


def test_all_reduce_and_all_gather_with_default_groups_and_layout_cover_the_helpers_world():
    def fn(rank):
        x = torch.full((2,), float(rank + 1)).to(torch_xla.device())
        total = xm.all_reduce(xm.REDUCE_SUM, x)
        gathered = xm.all_gather(x)  # pin_layout=True by default
        torch_xla.sync()
        return total.cpu().tolist(), gathered.cpu().tolist()

    for total, gathered in run_on_cpu_devices(fn, 4):
        assert total == [10.0, 10.0]
        assert gathered == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0]


def _loader(rank, world, batches, train):
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(batches * 4 * world, 6, generator=gen),
                                          torch.randint(0, 3, (batches * 4 * world,), generator=gen))
    sampler = torch.utils.data.distributed.DistributedSampler(
        data, num_replicas=xr.world_size(), rank=xr.global_ordinal(), shuffle=train)
    loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler)
    return pl.MpDeviceLoader(loader, torch_xla.device())


def _seeded(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _tiny_classifier():
    return _seeded(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), seed=1)


def test_a_train_and_eval_loop_with_mp_device_loader_step_closures_and_mesh_reduce():
    def fn(rank):
        world = xr.world_size()
        model = FSDP(_tiny_classifier().to(torch_xla.device()))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        logged = []
        for step, (x, y) in enumerate(_loader(rank, world, 3, train=True)):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            xm.add_step_closure(lambda s, l: logged.append((s, l.item())), args=(step, loss))
        model.eval()
        correct, total = 0, 0
        for x, y in _loader(rank, world, 2, train=False):  # accumulated on the device
            correct += model(x).argmax(1).eq(y).sum()
            total += x.shape[0]
        accuracy = 100.0 * correct.item() / total
        return logged, accuracy, xm.mesh_reduce("test_accuracy", accuracy, np.mean)

    results = run_on_cpu_devices(fn, 4)
    for logged, _, mean_accuracy in results:
        assert [s for s, _ in logged] == [0, 1, 2]
        assert all(np.isfinite(loss) for _, loss in logged)
        assert mean_accuracy == pytest.approx(np.mean([r[1] for r in results]))


def test_a_host_item_outside_step_markers_reads_values_without_collectives():
    def fn(rank):
        x = torch.full((3,), float(rank)).to(torch_xla.device())
        return (x * 2).sum().item(), (x + 1).cpu().tolist()

    assert run_on_cpu_devices(fn, 2) == [(0.0, [1.0, 1.0, 1.0]), (6.0, [2.0, 2.0, 2.0])]


def test_calls_with_different_world_sizes_in_one_process_each_see_their_own():
    def fn(rank):
        total = xm.all_reduce(xm.REDUCE_SUM, torch.ones(1).to(torch_xla.device()))
        torch_xla.sync()
        return xr.world_size(), total.item()

    assert run_on_cpu_devices(fn, 2) == [(2, 2.0)] * 2
    assert run_on_cpu_devices(fn, 4) == [(4, 4.0)] * 4
    assert run_on_cpu_devices(fn, 1) == [(1, 1.0)]


def test_xla_fsdp_exports_every_name_of_torch_xla_distributed_fsdp():
    import torch_xla.distributed.fsdp as torch_xla_fsdp

    import xla_fsdp
    import consolidate

    assert set(torch_xla_fsdp.__all__) <= set(xla_fsdp.__all__)
    for name in torch_xla_fsdp.__all__:
        assert callable(getattr(xla_fsdp, name)), name
    from xla_fsdp import consolidate_sharded_model_checkpoints, consolidate_sharded_state_dicts
    assert consolidate_sharded_model_checkpoints is consolidate.consolidate_sharded_model_checkpoints
    assert consolidate_sharded_state_dicts is consolidate.consolidate_sharded_state_dicts


def _wrapped_classifier_states(rank):
    model = FSDP(_tiny_classifier().to(torch_xla.device()))
    torch_xla.sync()
    return ({k: v.cpu() for k, v in model.state_dict().items()}, model.get_shard_metadata(),
            model.full_state_dict(rank0_only=False))


def test_consolidate_sharded_state_dicts_gives_the_unwrapped_models_state_dict():
    from xla_fsdp import consolidate_sharded_state_dicts

    results = run_on_cpu_devices(_wrapped_classifier_states, 4)
    full = consolidate_sharded_state_dicts([r[0] for r in results], results[0][1])
    expected = _tiny_classifier().state_dict()
    assert list(full) == list(expected)
    for name in expected:
        torch.testing.assert_close(full[name], expected[name], rtol=0, atol=0)


def test_consolidate_sharded_state_dicts_wants_every_rank():
    from xla_fsdp import consolidate_sharded_state_dicts

    results = run_on_cpu_devices(_wrapped_classifier_states, 2)
    with pytest.raises(Exception, match="got 1 state dicts for a world size of 2"):
        consolidate_sharded_state_dicts([results[0][0]], results[0][1])


# ------------------------------------------- torch_xla's FSDP programs' checkpoints, with xla_fsdp's wrapper
def _deep_classifier():
    return _seeded(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)), seed=2)


def _labelled_points():
    """A learnable task: labels from a fixed linear teacher; 64 training and 64 test points."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(128, 6, generator=gen)
    y = (x @ torch.randn(6, 3, generator=gen)).argmax(1)
    return x[:64], y[:64], x[64:], y[64:]


def _torch_xla_mnist_program(rank, prefix, flatten, nested):
    """What torch_xla's test_train_mp_mnist_fsdp_with_ckpt.py does, on a small model, with xla_fsdp's wrapper.

    Nested: each hidden layer is its own unit and the root holds the head (its MNIST nests conv1, conv2,
    fc1, fc2). SGD with momentum; after training every rank saves exactly its file, then the master
    consolidates with its call and every rank evaluates the consolidated model. One more step follows,
    for the optimizer tests. Returns the sharded model's accuracy, the consolidated model's (on the host),
    the full state at the save, the batch of the next step and the full state after it.
    """
    from xla_fsdp import consolidate_sharded_model_checkpoints

    device, world_size = torch_xla.device(), xr.world_size()
    x_train, y_train, x_test, y_test = _labelled_points()
    model = _deep_classifier().to(device)
    if nested:
        model[0] = FSDP(model[0], flatten_parameters=flatten)
        model[2] = FSDP(model[2], flatten_parameters=flatten)
    model = FSDP(model, flatten_parameters=flatten)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    per_rank = 16 // world_size

    def step(i):
        xs = x_train[i * 16 + rank * per_rank:i * 16 + (rank + 1) * per_rank].to(device)
        ys = y_train[i * 16 + rank * per_rank:i * 16 + (rank + 1) * per_rank].to(device)
        optimizer.zero_grad()
        F.cross_entropy(model(xs), ys).backward()
        optimizer.step()
        torch_xla.sync()

    for i in range(3):
        step(i)
    sharded_accuracy = (model(x_test.to(device)).argmax(1).cpu() == y_test).float().mean().item()
    ckpt_path = f"{prefix}_rank-{rank:08d}-of-{world_size:08d}.pth"
    ckpt = {
        "model": model.state_dict(),
        "shard_metadata": model.get_shard_metadata(),
        "optimizer": optimizer.state_dict(),  # not needed in ckpt consolidation
    }
    xm.save(ckpt, ckpt_path, master_only=False)
    if xm.is_master_ordinal(local=False):
        consolidate_sharded_model_checkpoints(ckpt_prefix=prefix, ckpt_suffix="_rank-*-of-*.pth")
    xm.rendezvous("ckpt_consolidation")
    plain = _deep_classifier()
    plain.load_state_dict(torch.load(f"{prefix}_consolidated.pth")["model"])
    plain_accuracy = (plain(x_test).argmax(1) == y_test).float().mean().item()
    saved = model.full_state_dict(rank0_only=False)
    step(3)
    return sharded_accuracy, plain_accuracy, saved, (x_train[48:64], y_train[48:64]), \
        model.full_state_dict(rank0_only=False)


@pytest.fixture(scope="module", params=[(True, True), (True, False), (False, True), (False, False)],
                ids=["flat-nested", "flat-root", "unflat-nested", "unflat-root"])
def torch_xla_program_run(request, tmp_path_factory):
    flatten, nested = request.param
    directory = tmp_path_factory.mktemp("txla_program")
    prefix = str(directory / "mnist")
    results = run_on_cpu_devices(lambda rank: _torch_xla_mnist_program(rank, prefix, flatten, nested), 4)
    return prefix, results[0]


def test_a_torch_xla_programs_checkpoint_with_its_optimizer_consolidates_to_the_sharded_accuracy(
        torch_xla_program_run):
    prefix, (sharded_accuracy, plain_accuracy, saved, _, _) = torch_xla_program_run
    assert sharded_accuracy > 0.5 and plain_accuracy == sharded_accuracy
    consolidated = torch.load(f"{prefix}_consolidated.pth", weights_only=True)
    assert list(consolidated) == ["model"]         # as torch_xla's tool writes it
    assert list(consolidated["model"]) == list(_deep_classifier().state_dict())
    for name, value in saved.items():
        assert torch.equal(consolidated["model"][name], value), name


def test_its_optimizer_state_matched_by_parameter_order_gives_the_same_next_step(torch_xla_program_run, tmp_path):
    from consolidate.__main__ import main
    prefix, (_, _, _, (x, y), after) = torch_xla_program_run
    out = tmp_path / "with_optimizer.pth"
    assert main(["--ckpt_prefix", prefix, "--ckpt_suffix", "_rank-*-of-*.pth", "--optimizer", "--verify",
                 "--save_path", str(out), "--no_progress"]) == 0
    ckpt = torch.load(out, weights_only=True)
    model = _deep_classifier()
    model.load_state_dict(ckpt["model"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    optimizer.load_state_dict(ckpt["optimizer"])
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    for name, value in after.items():   # host CPU against XLA CPU: the same fp32 math, rounding may differ
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1.3e-6, atol=1e-5, msg=name)


def test_its_model_consolidates_in_every_format(torch_xla_program_run, tmp_path):
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from consolidate.__main__ import main
    from consolidate._writers import read_orbax
    prefix, (_, _, saved, _, _) = torch_xla_program_run
    for fmt in ("safetensors", "orbax", "dcp"):
        out = tmp_path / f"out.{fmt}"
        assert main(["--ckpt_prefix", prefix, "--ckpt_suffix", "_rank-*-of-*.pth", "--format", fmt, "--verify",
                     "--save_path", str(out), "--no_progress"]) == 0, fmt
        if fmt == "safetensors":
            loaded = load_file(out)
        elif fmt == "orbax":
            loaded = {k: torch.from_numpy(v) for k, v in read_orbax(out).items()}
        else:
            loaded = {"model": _deep_classifier().state_dict()}
            dcp.load(loaded, checkpoint_id=out, no_dist=True)
            loaded = loaded["model"]
        model = _deep_classifier()
        model.load_state_dict(loaded)
        for name, value in saved.items():
            assert torch.equal(model.state_dict()[name], value), (fmt, name)


def _two_parameter_groups(ckpt):
    """What a program that gave its optimizer two parameter groups would have saved."""
    params = ckpt["optimizer"]["param_groups"][0]["params"]
    group = {k: v for k, v in ckpt["optimizer"]["param_groups"][0].items() if k != "params"}
    ckpt["optimizer"]["param_groups"] = [{**group, "params": params[:1]}, {**group, "params": params[1:]}]


def test_an_optimizer_state_that_order_cannot_match_is_left_out_with_one_line_or_refused_when_asked_for(
        torch_xla_program_run, tmp_path, capsys):
    from pathlib import Path
    from consolidate.__main__ import main
    prefix = torch_xla_program_run[0]
    for rank in range(4):
        name = f"{Path(prefix).name}_rank-{rank:08d}-of-00000004.pth"
        ckpt = torch.load(Path(prefix).parent / name, weights_only=True)
        _two_parameter_groups(ckpt)
        torch.save(ckpt, tmp_path / name)
    copy = str(tmp_path / Path(prefix).name)
    assert main(["--ckpt_prefix", copy, "--ckpt_suffix", "_rank-*-of-*.pth", "--no_progress"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "optimizer state" in line]
    assert len(warnings) == 1 and "left out" in warnings[0] and "2 parameter groups" in warnings[0], warnings
    assert list(torch.load(f"{copy}_consolidated.pth", weights_only=True)["model"]) == \
        list(_deep_classifier().state_dict())
    assert main(["--ckpt_prefix", copy, "--ckpt_suffix", "_rank-*-of-*.pth", "--optimizer", "--overwrite",
                 "--save_path", str(tmp_path / "opt.pth"), "--no_progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("consolidate: error: ") and "\n" not in err
    assert "rank-00000000-of-00000004.pth (rank 0)" in err and "no optimizer_param_names" in err \
        and "2 parameter groups" in err, err
    assert not (tmp_path / "opt.pth").exists()
    # --reshard writes files for load_sharded_checkpoint, which these do not have what it takes to be.
    assert main(["--ckpt_prefix", copy, "--ckpt_suffix", "_rank-*-of-*.pth", "--reshard", "2", "--no_progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--reshard needs the files of save_sharded_checkpoint" in err and "\n" not in err, err


def test_hugging_face_trainers_consolidation_call_reads_the_rank_files_of_its_output_directory(tmp_path):
    """transformers' Trainer under torch_xla FSDP (``_save_tpu``): a directory prefix and a glob suffix."""
    import os
    from xla_fsdp import consolidate_sharded_model_checkpoints
    output_dir, weights_name = str(tmp_path / "output"), "pytorch_model.bin"

    def save(rank):
        model = FSDP(_deep_classifier().to(torch_xla.device()))
        torch_xla.sync()
        if xm.is_master_ordinal(local=False):
            os.makedirs(output_dir, exist_ok=True)
            torch.save({"learning_rate": 0.1}, os.path.join(output_dir, "training_args.bin"))
        xm.rendezvous("saving_checkpoint")
        ckpt = {"model": model.state_dict(), "shard_metadata": model.get_shard_metadata()}
        ckpt_path = os.path.join(output_dir, f"rank{rank}-of-{xr.world_size()}-{weights_name}")
        xm.save(ckpt, ckpt_path, master_only=False)
        xm.rendezvous("save_full_checkpoints")
        if xm.is_master_ordinal(local=False):
            full_state_dict, _ = consolidate_sharded_model_checkpoints(
                ckpt_prefix=os.path.join(output_dir, ""),
                ckpt_suffix=f"rank*-of-*-{weights_name}",
                save_model=False,
            )
            return full_state_dict

    with pytest.warns(UserWarning, match="has no manifest"):
        full = run_on_cpu_devices(save, 4)[0]
    expected = _deep_classifier().state_dict()
    assert list(full) == list(expected)
    for name in expected:
        assert torch.equal(full[name], expected[name]), name
    assert sorted(os.listdir(output_dir)) == sorted([f"rank{r}-of-4-{weights_name}" for r in range(4)]
                                                    + ["training_args.bin"])   # save_model=False: nothing new


def test_ranks_that_call_sync_a_different_number_of_times_get_an_error_not_a_hang():
    def fn(rank):
        torch_xla.sync()
        if rank == 0:
            torch_xla.sync()
        xm.rendezvous("after the step")

    with pytest.raises(RuntimeError, match="can no longer meet: rank 0 waits in torch_xla.sync"):
        run_on_cpu_devices(fn, 4)


def test_a_train_loop_under_step_trace_with_mp_device_loader_keeps_the_ranks_in_step():
    import torch_xla.debug.profiler as xp

    def fn(rank):
        model = FSDP(_tiny_classifier().to(torch_xla.device()))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step, (x, y) in enumerate(_loader(rank, xr.world_size(), 4, train=True)):
            with xp.StepTrace("train", step_num=step):  # marks the step itself; the loader then does not
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        return xm.mesh_reduce("done", rank, sum)

    assert run_on_cpu_devices(fn, 4) == [6] * 4
