"""Per-rank checkpoints: exact resume, refusal of checkpoints that do not fit, atomic writes."""

import functools
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from support import (FP32, OPTIMIZERS, Config, RunResult, assert_state_close, make_batches, make_net,
                     run_fsdp, train_steps, wrap_net)
from xla_fsdp import XlaFullyShardedDataParallel as FSDP
from xla_fsdp.sharded_checkpoint import (CheckpointMismatchError, checkpoint_path, load_sharded_checkpoint,
                                         save_sharded_checkpoint)
from xla_fsdp.testing import run_on_cpu_devices

WORLD = 4


def _train(model, opt, batches, rank, losses, world=WORLD):
    losses += train_steps(model, opt, batches, rank, world).losses


@pytest.mark.parametrize("wrap, fsdp", [("zero2", ()), ("zero3", ()), ("zero3", (("cpu_offload", True),))],
                         ids=["zero2", "zero3", "zero3-cpu_offload"])
def test_resume_from_checkpoint_is_bit_identical(tmp_path, wrap, fsdp):
    config = Config(wrap=wrap, optimizer="adamw", fsdp=fsdp)
    batches = make_batches(6)
    prefix = tmp_path / "ckpt"

    def straight(rank):
        model = wrap_net(make_net(), config)
        opt = OPTIMIZERS["adamw"](model.parameters())
        losses = []
        _train(model, opt, batches, rank, losses)
        return losses, model.full_state_dict(rank0_only=False)

    def resumed(rank):
        model = wrap_net(make_net(), config)
        opt = OPTIMIZERS["adamw"](model.parameters())
        losses = []
        _train(model, opt, batches[:3], rank, losses)
        save_sharded_checkpoint(prefix, model, opt, step=3, extra={"note": "half way"})
        del model, opt
        model = wrap_net(make_net(seed=99), config)           # different weights, fresh optimizer
        opt = OPTIMIZERS["adamw"](model.parameters())
        info = load_sharded_checkpoint(prefix, model, opt)
        _train(model, opt, batches[3:], rank, losses)
        return losses, model.full_state_dict(rank0_only=False), info

    expected = run_on_cpu_devices(straight, WORLD)
    actual = run_on_cpu_devices(resumed, WORLD)
    for (want_losses, want_params), (got_losses, got_params, info) in zip(expected, actual):
        assert got_losses == want_losses
        assert info == {"step": 3, "extra": {"note": "half way"}}
        for name, value in want_params.items():
            assert torch.equal(got_params[name], value), name
    # One committed step directory: the rank files and the manifest, nothing else (issue 13 changed the
    # layout from WORLD files beside the prefix to this).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_00000003"]
    assert sorted(p.name for p in (tmp_path / "ckpt" / "step_00000003").iterdir()) == \
        [checkpoint_path("ckpt", r, WORLD).name for r in range(WORLD)] + ["manifest.json"]


def test_a_load_restores_the_torch_random_state_of_the_save(tmp_path):
    # One rank: the device threads share torch's global generator, so two would draw in turns.
    def draws(rank):
        model = FSDP(make_net())
        save_sharded_checkpoint(tmp_path / "c", model, step=1)
        after_save = torch.rand(4)
        torch.rand(100)                               # training goes on, drawing
        load_sharded_checkpoint(tmp_path / "c", model)
        return after_save, torch.rand(4)

    after_save, after_load = run_on_cpu_devices(draws, 1)[0]
    assert torch.equal(after_load, after_save)


def test_a_set_without_a_manifest_for_another_world_size_is_refused(tmp_path):
    run_on_cpu_devices(lambda r: save_sharded_checkpoint(tmp_path / "c", FSDP(make_net())), 4)
    (tmp_path / "old").mkdir()
    for f in (tmp_path / "c").glob("step_*/*.pth"):          # the layout of earlier releases: no manifest
        shutil.copy(f, tmp_path / "old" / f.name)
    # Whichever rank reaches the missing file first raises; the other is stopped
    # at its next sync, so the error may name either rank.
    with pytest.raises(FileNotFoundError,
                       match=r"no checkpoint for rank [01] of 2: .*c_rank-0000000[01]-of-00000002\.pth does not "
                             r"exist; found \['c_rank-00000000-of-00000004\.pth"):
        run_on_cpu_devices(lambda r: load_sharded_checkpoint(tmp_path / "old" / "c", FSDP(make_net())), 2)


# --------------------------------------------- issue 21: resume at another world size, without consolidating
BATCHES_24 = make_batches(4, batch=24)     # a global batch that 2, 3, 4 and 8 ranks split evenly


def _save_after(world, config, batches, root, step):
    def train_and_save(rank):
        model = wrap_net(make_net(), config)
        opt = OPTIMIZERS[config.optimizer](model.parameters())
        train_steps(model, opt, batches, rank, world, config)
        save_sharded_checkpoint(root, model, opt, step=step)

    run_on_cpu_devices(train_and_save, world)


def _resume(world, config, batches, root, save_as=None):
    """Load the newest step into a fresh model at ``world`` ranks and train on; (step, mean losses, state)."""
    def resume(rank):
        model = wrap_net(make_net(seed=7), config)
        opt = OPTIMIZERS[config.optimizer](model.parameters())
        step = load_sharded_checkpoint(root, model, opt)["step"]
        losses = train_steps(model, opt, batches, rank, world, config).losses
        if save_as is not None:
            save_sharded_checkpoint(root, model, opt, step=save_as)
        return step, losses, model.full_state_dict(rank0_only=False)

    results = run_on_cpu_devices(resume, world)
    losses = [sum(r[1][i] for r in results) / world for i in range(len(batches))]
    return results[0][0], losses, results[0][2]


RESHARD = Config(wrap="zero3", optimizer="adamw")


@functools.lru_cache(maxsize=None)
def _reference() -> RunResult:
    """The unsharded run on the 4 batches; the same for every wrapping (each is compared with it)."""
    return run_fsdp(1, RESHARD.replace(wrap="none", steps=len(BATCHES_24)), BATCHES_24)


def test_a_step_saved_at_8_devices_resumes_at_4_and_what_4_save_resumes_at_8_like_the_unsharded_run(tmp_path):
    _save_after(8, RESHARD, BATCHES_24[:2], tmp_path / "c", step=2)
    step, losses_at_4, _ = _resume(4, RESHARD, BATCHES_24[2:3], tmp_path / "c", save_as=3)
    assert step == 2
    step, losses_at_8, state = _resume(8, RESHARD, BATCHES_24[3:], tmp_path / "c")
    assert step == 3
    torch.testing.assert_close(losses_at_4 + losses_at_8, _reference().losses[2:], **FP32)
    assert_state_close(state, _reference().params, **FP32)


def _two_then_three(directory: str) -> None:
    """Save at 2 devices, resume at 3 (in a process of 6 devices); unflattened, so fc1.bias (7) pads differently."""
    config = RESHARD.replace(fsdp=(("flatten_parameters", False),))
    _save_after(2, config, BATCHES_24[:2], f"{directory}/c", step=2)
    step, losses, state = _resume(3, config, BATCHES_24[2:], f"{directory}/c")
    torch.save({"step": step, "losses": losses, "state": state}, f"{directory}/results.pt")


def test_a_step_saved_at_2_devices_resumes_at_3_with_other_padding_like_the_unsharded_run(tmp_path):
    # 3 ranks need a process whose device count 3 divides (the test process has 8).
    script = f"import test_sharded_checkpoint as t; t._two_then_three({str(tmp_path)!r})"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CPU_NUM_DEVICES": "6",
                               "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), *sys.path])})
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(tmp_path / "results.pt", weights_only=True)
    assert results["step"] == 2
    torch.testing.assert_close(results["losses"], _reference().losses[2:], **FP32)
    assert_state_close(results["state"], _reference().params, **FP32)


def test_a_renamed_checkpoint_directory_still_loads_through_its_manifest(tmp_path):
    def save(rank):
        model = FSDP(make_net(seed=rank + 1))     # each rank's shards differ from a fresh model's
        save_sharded_checkpoint(tmp_path / "c", model, step=4)
        return {k: v.cpu() for k, v in model.state_dict().items()}

    saved = run_on_cpu_devices(save, 2)
    os.replace(tmp_path / "c", tmp_path / "renamed")     # the files keep their names, c_rank-...

    def load(rank):
        model = FSDP(make_net(seed=9))
        step = load_sharded_checkpoint(tmp_path / "renamed", model)["step"]
        return step, {k: v.cpu() for k, v in model.state_dict().items()}

    for rank, (step, loaded) in enumerate(run_on_cpu_devices(load, 2)):
        assert step == 4 and all(torch.equal(loaded[k], v) for k, v in saved[rank].items()), rank


def test_a_damaged_file_of_a_step_saved_at_another_world_size_loads_on_no_device(tmp_path):
    run_on_cpu_devices(lambda r: save_sharded_checkpoint(tmp_path / "c", FSDP(make_net(), flatten_parameters=True),
                                                         step=1), 2)
    victim = next((tmp_path / "c").glob("step_*/c_rank-00000001-of-00000002.pth"))
    victim.write_bytes(victim.read_bytes() + b"!")

    def load(rank):
        model = FSDP(make_net(seed=3), flatten_parameters=True)
        before = [p.detach().cpu().clone() for p in model.parameters()]
        error = _error_of(lambda: load_sharded_checkpoint(tmp_path / "c", model))
        return error, all(torch.equal(b, p.detach().cpu()) for b, p in zip(before, model.parameters()))

    results = run_on_cpu_devices(load, 4)
    # The new ranks whose shards hold elements of old rank 1's (the last ones) name it; every other rank
    # names them. No model changed.
    readers = [rank for rank, (error, _) in enumerate(results) if str(victim) in error]
    assert 3 in readers and 0 not in readers, results
    for rank, (error, unchanged) in enumerate(results):
        assert unchanged and error is not None and "\n" not in error, (rank, error)
        if rank in readers:
            assert "changed after the commit" in error, (rank, error)
        else:
            assert f"not loaded on any device: device(s) {readers} of 4" in error, (rank, error)


def test_a_checkpoint_with_other_parameters_is_refused_naming_them(tmp_path):
    run_on_cpu_devices(lambda r: save_sharded_checkpoint(tmp_path / "c", FSDP(make_net(), flatten_parameters=True)), 2)

    def load_into_smaller(rank):
        net = make_net()
        net.head = torch.nn.Parameter(torch.zeros(15, 2))
        load_sharded_checkpoint(tmp_path / "c", FSDP(net, flatten_parameters=True))

    with pytest.raises(CheckpointMismatchError, match=r"flat_param_0 holds .*\('head', \[15, 3\]\).* in the file"):
        run_on_cpu_devices(load_into_smaller, 2)

    def load_unflattened(rank):
        load_sharded_checkpoint(tmp_path / "c", FSDP(make_net(), flatten_parameters=False))

    with pytest.raises(CheckpointMismatchError, match="parameters missing from the file"):
        run_on_cpu_devices(load_unflattened, 2)


WRITER = textwrap.dedent("""
    import sys, time, torch
    from xla_fsdp._io import atomic_write

    class SlowFile:  # a slow disk: keeps the save in progress long enough to kill it
        def __init__(self, f):
            self.f = f
        def write(self, data):
            time.sleep(0.005)
            return self.f.write(data)
        def flush(self):
            self.f.flush()

    state = {f"t{i}": torch.ones(16384) for i in range(1000)}  # 64 MB in 1000 records
    print("writing", flush=True)
    atomic_write(sys.argv[1], lambda f: torch.save(state, SlowFile(f)))
""")

def test_a_writer_killed_mid_save_leaves_the_previous_checkpoint_intact(tmp_path):
    target = tmp_path / "ckpt_rank-00000000-of-00000001.pth"
    torch.save({"version": 1}, target)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    deadline = time.time() + 120
    while not any(p.name.startswith(f".{target.name}.tmp-") and p.stat().st_size > 1 << 20
                  for p in tmp_path.iterdir()):
        assert time.time() < deadline and writer.poll() is None, "the writer finished before it could be killed"
        time.sleep(0.01)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert torch.load(target, weights_only=True) == {"version": 1}


# --------------------------------------------------------- issue 13: one commit across all ranks
def _rank_files(directory):
    return sorted(directory.rglob("*_rank-*.pth"))


def test_a_save_that_fails_on_one_rank_leaves_every_rank_at_the_previous_step(tmp_path):
    def save_twice(rank):
        model = FSDP(make_net())
        save_sharded_checkpoint(tmp_path / "c", model, step=1)
        # Rank 1 cannot write step 2 (its extra cannot be pickled); rank 0 can.
        extra = {"bad": (lambda: None)} if rank == 1 else {}
        save_sharded_checkpoint(tmp_path / "c", model, step=2, extra=extra)

    with pytest.raises(Exception):
        run_on_cpu_devices(save_twice, 2)
    steps = run_on_cpu_devices(lambda r: load_sharded_checkpoint(tmp_path / "c", FSDP(make_net()))["step"], 2)
    assert steps == [1, 1]


def test_sharding_groups_save_and_load_their_own_shards(tmp_path):
    groups = [[0, 1], [2, 3]]

    def model_of(rank, seed):
        return FSDP(make_net(seed=seed), sharding_groups=groups, sharding_rank=rank % 2, sharding_world_size=2)

    def save(rank):
        model = model_of(rank, seed=rank // 2)           # the two groups hold different weights
        save_sharded_checkpoint(tmp_path / "c", model, step=5)
        return {k: v.cpu() for k, v in model.state_dict().items()}

    def load(rank):
        model = model_of(rank, seed=99)
        load_sharded_checkpoint(tmp_path / "c", model)
        return {k: v.cpu() for k, v in model.state_dict().items()}

    saved = run_on_cpu_devices(save, 4)
    loaded = run_on_cpu_devices(load, 4)
    assert len(_rank_files(tmp_path)) == 4
    for rank in range(4):
        for key, value in saved[rank].items():
            assert torch.equal(loaded[rank][key], value), (rank, key)


@pytest.mark.parametrize("saved_with,loaded_with", [("adamw", "sgd"), ("sgd", "adamw")])
def test_optimizer_state_of_another_optimizer_type_is_refused(tmp_path, saved_with, loaded_with):
    def save(rank):
        model = FSDP(make_net())
        opt = OPTIMIZERS[saved_with](model.parameters())
        _train(model, opt, make_batches(1), rank, [], world=2)
        save_sharded_checkpoint(tmp_path / "c", model, opt, step=1)

    def load(rank):
        model = FSDP(make_net())
        load_sharded_checkpoint(tmp_path / "c", model, OPTIMIZERS[loaded_with](model.parameters()))

    run_on_cpu_devices(save, 2)
    with pytest.raises(CheckpointMismatchError,
                       match=r"c_rank-0000000[01]-of-00000002\.pth \(rank [01]\).*(AdamW|SGD)"):
        run_on_cpu_devices(load, 2)


def test_optimizer_state_saved_for_parameters_in_another_order_is_refused(tmp_path):
    def save(rank):
        model = FSDP(make_net())
        save_sharded_checkpoint(tmp_path / "c", model, OPTIMIZERS["adamw"](model.parameters()), step=1)

    def load(rank):
        model = FSDP(make_net())
        load_sharded_checkpoint(tmp_path / "c", model, OPTIMIZERS["adamw"](list(model.parameters())[::-1]))

    run_on_cpu_devices(save, 2)
    with pytest.raises(CheckpointMismatchError, match=r"parameter group 0 holds .* in the file but .* in this "
                                                      r"optimizer"):
        run_on_cpu_devices(load, 2)


def _error_of(call) -> str | None:
    try:
        call()
    except Exception as exc:
        return str(exc)
    return None


def test_a_truncated_file_is_reported_with_its_file_and_rank_and_no_rank_loads(tmp_path):
    def save(rank):
        model = FSDP(make_net())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # so that a load would change a fresh model
        save_sharded_checkpoint(tmp_path / "c", model, step=1)

    run_on_cpu_devices(save, 2)
    victim = next(p for p in _rank_files(tmp_path) if "rank-00000001" in p.name)
    victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])

    def load(rank):
        model = FSDP(make_net())
        before = [p.detach().cpu().clone() for p in model.parameters()]
        error = _error_of(lambda: load_sharded_checkpoint(tmp_path / "c", model))
        return error, all(torch.equal(b, p.detach().cpu()) for b, p in zip(before, model.parameters()))

    (error_0, unchanged_0), (error_1, unchanged_1) = run_on_cpu_devices(load, 2)
    assert error_1 is not None and "\n" not in error_1 and str(victim) in error_1 and "(rank 1)" in error_1, error_1
    # Rank 0's own file is fine, and it still neither loads nor goes on as if it had.
    assert error_0 is not None and "not loaded on any device: device(s) [1] of 2" in error_0, error_0
    assert unchanged_0 and unchanged_1


def test_a_committed_file_changed_after_its_commit_is_refused_though_it_still_reads(tmp_path):
    # Rewritten with other values but well-formed: only the manifest's size and CRC-32 can tell.
    run_on_cpu_devices(lambda r: save_sharded_checkpoint(tmp_path / "c", FSDP(make_net()), step=1), 2)
    victim = next(p for p in _rank_files(tmp_path) if "rank-00000001" in p.name)
    payload = torch.load(victim, weights_only=True)
    first = next(iter(payload["model"]))
    payload["model"][first] = payload["model"][first] + 1.0
    torch.save(payload, victim)

    def load(rank):
        model = FSDP(make_net(seed=3))
        before = [p.detach().cpu().clone() for p in model.parameters()]
        error = _error_of(lambda: load_sharded_checkpoint(tmp_path / "c", model))
        return error, all(torch.equal(b, p.detach().cpu()) for b, p in zip(before, model.parameters()))

    (error_0, unchanged_0), (error_1, unchanged_1) = run_on_cpu_devices(load, 2)
    assert error_1 is not None and str(victim) in error_1 and "(rank 1)" in error_1, error_1
    assert "CRC-32" in error_1 and "the file changed after the commit" in error_1, error_1
    assert error_0 is not None and "not loaded on any device: device(s) [1] of 2" in error_0, error_0
    assert unchanged_0 and unchanged_1


class _RunsCode:
    def __reduce__(self):
        return (print, ("code ran",))


def test_a_pickle_payload_is_refused_without_advice_to_disable_the_check(tmp_path):
    for rank in range(2):
        torch.save({"format": "xla_fsdp", "model": _RunsCode()}, checkpoint_path(tmp_path / "c", rank, 2))
    with pytest.raises(Exception) as raised:
        run_on_cpu_devices(lambda r: load_sharded_checkpoint(tmp_path / "c", FSDP(make_net())), 2)
    message = str(raised.value)
    assert "could run code" in message and "c_rank-0000000" in message and "weights_only" not in message, message


def test_url_paths_are_refused_not_made_into_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"'gs://bucket/run' is a URL"):
        run_on_cpu_devices(lambda r: save_sharded_checkpoint("gs://bucket/run", FSDP(make_net())), 2)
    with pytest.raises(ValueError, match="is a URL"):
        run_on_cpu_devices(lambda r: load_sharded_checkpoint("s3://bucket/run", FSDP(make_net())), 2)
    assert list(tmp_path.iterdir()) == []


def test_a_torch_xla_checkpoint_is_refused_with_the_way_to_migrate_it(tmp_path):
    for rank in range(2):
        torch.save({"model": {}, "shard_metadata": {"shard_info": {}, "flatten_info": {}, "world_size": 2,
                                                    "rank": rank}}, checkpoint_path(tmp_path / "c", rank, 2))
    with pytest.raises(CheckpointMismatchError, match=r"c_rank-0000000[01]-of-00000002\.pth \(rank [01]\) is a "
                                                      r"torch_xla FSDP checkpoint.*python -m consolidate"):
        run_on_cpu_devices(lambda r: load_sharded_checkpoint(tmp_path / "c", FSDP(make_net())), 2)


def test_files_without_a_manifest_still_load_with_a_warning_and_a_mixed_set_is_refused(tmp_path):
    run_on_cpu_devices(lambda r: save_sharded_checkpoint(tmp_path / "c", FSDP(make_net()), step=7), 2)
    (tmp_path / "old").mkdir()
    for f in _rank_files(tmp_path / "c"):                  # the layout of earlier releases
        shutil.copy(f, tmp_path / "old" / f.name)
    with pytest.warns(UserWarning, match="without a manifest"):
        steps = run_on_cpu_devices(lambda r: load_sharded_checkpoint(tmp_path / "old" / "c", FSDP(make_net())), 2)
    assert [s["step"] for s in steps] == [7, 7]
    other = checkpoint_path(tmp_path / "old" / "c", 1, 2)
    ckpt = torch.load(other, weights_only=True)
    ckpt["step"] = 8
    torch.save(ckpt, other)
    # Every rank names the same pair of files, whichever rank's error surfaces first.
    mixed = (r"c_rank-00000001-of-00000002\.pth \(rank 1\) holds step 8 "
             r"but .*-00000000-of-00000002\.pth \(rank 0\) holds step 7")
    with pytest.raises(Exception, match=mixed):
        run_on_cpu_devices(lambda r: load_sharded_checkpoint(tmp_path / "old" / "c", FSDP(make_net())), 2)
