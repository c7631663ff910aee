"""The commit protocol of sharded checkpoints: steps, manifest, async save, retention, kills and full disks."""

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch_xla

from support import OPTIMIZERS, fsize_limit, make_batches, make_net, small_filesystem
from xla_fsdp import XlaFullyShardedDataParallel as FSDP
from xla_fsdp._metadata import Manifest
from xla_fsdp._io import file_crc32
from xla_fsdp.sharded_checkpoint import (CheckpointError, committed_steps, latest_checkpoint,
                                         load_sharded_checkpoint, save_sharded_checkpoint, wait_for_checkpoint)
from xla_fsdp.testing import run_on_cpu_devices

TESTS = str(Path(__file__).parent)


def _step(model, opt, rank, world=2):
    x, y = make_batches(1)[0]
    per_rank = x.shape[0] // world
    opt.zero_grad()
    out = model(x[rank * per_rank:(rank + 1) * per_rank].to(torch_xla.device()))
    F.cross_entropy(out, y[rank * per_rank:(rank + 1) * per_rank].to(torch_xla.device())).backward()
    opt.step()
    torch_xla.sync()


def _assert_no_mixed_step(root: Path) -> None:
    """Every committed step's files are the ones its manifest lists, of that step."""
    for step in committed_steps(root):
        directory = latest_checkpoint(root).parent / f"step_{step:08d}"
        manifest = Manifest.read(directory / "manifest.json")
        assert manifest.step == step
        for f in manifest.files:
            path = directory / f.name
            assert (path.stat().st_size, file_crc32(path)) == (f.size, f.crc32), path
            assert torch.load(path, weights_only=True, mmap=True)["step"] == step, path


def test_async_save_copies_at_the_call_and_commits_at_the_next_call(tmp_path):
    def run(rank):
        model = FSDP(make_net())
        opt = OPTIMIZERS["sgd"](model.parameters())
        saved = {k: v.cpu() for k, v in model.state_dict().items()}
        returned = save_sharded_checkpoint(tmp_path / "c", model, opt, step=1, async_save=True)
        _step(model, opt, rank)                           # training goes on while the file is written
        assert latest_checkpoint(tmp_path / "c") is None  # not committed before the join
        committed = wait_for_checkpoint()
        assert committed == returned and committed.exists()
        fresh = FSDP(make_net(seed=5))
        assert load_sharded_checkpoint(tmp_path / "c", fresh)["step"] == 1
        return saved, {k: v.cpu() for k, v in fresh.state_dict().items()}

    for saved, loaded in run_on_cpu_devices(run, 2):
        for key, value in saved.items():
            assert torch.equal(loaded[key], value), key      # the weights of the call, not of the step after


def test_a_background_write_error_surfaces_at_the_next_call_on_every_rank(tmp_path):
    def run(rank):
        model = FSDP(make_net())
        save_sharded_checkpoint(tmp_path / "c", model, step=1)
        extra = {"bad": (lambda: None)} if rank == 1 else {}
        save_sharded_checkpoint(tmp_path / "c", model, step=2, extra=extra, async_save=True)
        try:
            save_sharded_checkpoint(tmp_path / "c", model, step=3)
        except CheckpointError as exc:
            return str(exc)
        return None

    errors = run_on_cpu_devices(run, 2)
    assert all(e is not None and "step 2 was not committed: device(s) [1]" in e for e in errors), errors
    assert committed_steps(tmp_path / "c") == [1]


def test_keep_last_n_keeps_the_newest_steps(tmp_path):
    def run(rank):
        model = FSDP(make_net())
        for step in (1, 2, 3, 4):
            save_sharded_checkpoint(tmp_path / "c", model, step=step, keep_last_n=2)

    run_on_cpu_devices(run, 2)
    assert committed_steps(tmp_path / "c") == [3, 4]
    assert latest_checkpoint(tmp_path / "c").name == "step_00000004"


def test_the_next_save_removes_what_dead_writers_left(tmp_path):
    root = tmp_path / "c"
    run_on_cpu_devices(lambda r: save_sharded_checkpoint(root, FSDP(make_net()), step=1), 2)
    (root / "step_00000009.tmp").mkdir()
    (root / "step_00000009.tmp" / "c_rank-00000000-of-00000002.pth").write_bytes(b"half")
    (root / "step_00000001" / ".c_rank-00000000-of-00000002.pth.tmp-1-2").write_bytes(b"half")
    assert committed_steps(root) == [1]                 # a staging directory is no step
    run_on_cpu_devices(lambda r: save_sharded_checkpoint(root, FSDP(make_net()), step=2), 2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001", "step_00000002"]


def test_a_step_saved_again_replaces_the_old_one_and_an_interrupted_replace_is_still_found(tmp_path):
    root = tmp_path / "c"
    run_on_cpu_devices(lambda r: save_sharded_checkpoint(root, FSDP(make_net()), step=3, extra={"v": 1}), 2)
    run_on_cpu_devices(lambda r: save_sharded_checkpoint(root, FSDP(make_net()), step=3, extra={"v": 2}), 2)
    load = lambda r: load_sharded_checkpoint(root, FSDP(make_net()))  # noqa: E731
    assert [i["extra"] for i in run_on_cpu_devices(load, 2)] == [{"v": 2}] * 2
    # A kill between the two renames of a re-save leaves only step_N.old: still the committed step.
    os.replace(root / "step_00000003", root / "step_00000003.old")
    assert committed_steps(root) == [3]
    assert [i["extra"] for i in run_on_cpu_devices(load, 2)] == [{"v": 2}] * 2


# ------------------------------------------------------------------ kill -9 and a full disk
SAVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    from xla_fsdp.testing import run_on_cpu_devices
    import torch
    from support import make_net
    from xla_fsdp import XlaFullyShardedDataParallel as FSDP
    from xla_fsdp.sharded_checkpoint import save_sharded_checkpoint

    def run(rank):
        model = FSDP(make_net())
        blob = {"blob": torch.full((1 << 20,), float(rank))}      # 4 MB per rank: a save takes a while
        for step in range(1, 10_000):
            save_sharded_checkpoint(sys.argv[1], model, step=step, extra=blob, keep_last_n=2)
            if rank == 0:
                print(step, flush=True)

    run_on_cpu_devices(run, 2)
""")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_at_a_random_point_of_a_save_leaves_a_committed_step_and_no_mixed_set(tmp_path, seed):
    root = tmp_path / "c"
    saver = subprocess.Popen([sys.executable, "-c", SAVER, str(root), TESTS], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert saver.stdout.readline().strip() == "1", "the saver died before its first commit"
        time.sleep(random.Random(seed).uniform(0.0, 1.0))
    finally:
        os.kill(saver.pid, signal.SIGKILL)
        saver.wait()
    steps = committed_steps(root)
    assert steps, "no committed step survived"
    _assert_no_mixed_step(root)
    loaded = run_on_cpu_devices(lambda r: load_sharded_checkpoint(root, FSDP(make_net()))["step"], 2)
    assert loaded == [steps[-1]] * 2
    # The next save cleans up whatever the killed one left.
    run_on_cpu_devices(lambda r: save_sharded_checkpoint(root, FSDP(make_net()), step=99_999), 2)
    assert not [p.name for p in root.rglob("*") if ".tmp" in p.name]


FILLER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    from xla_fsdp.testing import run_on_cpu_devices
    import torch
    from support import make_net
    from xla_fsdp import XlaFullyShardedDataParallel as FSDP
    from xla_fsdp.sharded_checkpoint import CheckpointError, load_sharded_checkpoint, save_sharded_checkpoint

    def run(rank):
        model = FSDP(make_net())
        save_sharded_checkpoint(sys.argv[1], model, step=1)
        try:  # 24 MB per rank: more than the 20 MB the file system (or the file-size limit) allows
            save_sharded_checkpoint(sys.argv[1], model, step=2, extra={"blob": torch.zeros(6 << 20)})
            error = "none"
        except CheckpointError as exc:
            error = str(exc)
        step = load_sharded_checkpoint(sys.argv[1], FSDP(make_net()))["step"]
        save_sharded_checkpoint(sys.argv[1], model, step=3)
        return error, step

    for error, step in run_on_cpu_devices(run, 2):
        print(step, error.replace("\\n", " "))
""")


def test_a_full_disk_fails_the_save_on_every_rank_and_keeps_the_previous_step(tmp_path):
    disk = tmp_path / "disk"
    with small_filesystem(disk, 20) as kind:
        done = subprocess.run([sys.executable, "-c", FILLER, str(disk / "c"), TESTS], capture_output=True,
                              text=True, timeout=600, preexec_fn=fsize_limit(20) if kind == "rlimit" else None,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert done.returncode == 0, (kind, done.stderr[-2000:])
        lines = done.stdout.strip().splitlines()
        assert len(lines) == 2 and all(line.startswith("1 step 2 was not committed") for line in lines), (kind, lines)
        # The rank that could not write says why in words, where, and how much it needed; not torch's
        # "unexpected pos" from deep inside torch.save.
        full = "no space left on the device" if kind == "tmpfs" else "larger than the file size limit"
        said = [line for line in lines if full in line]
        assert said and all(str(disk / "c") in line and "MiB" in line for line in said), (kind, lines)
        assert not any("unexpected pos" in line for line in lines), (kind, lines)
        assert committed_steps(disk / "c") == [1, 3], kind
        assert not [p.name for p in (disk / "c").rglob("*") if ".tmp" in p.name], kind


SAVE_AS_THE_DISK_FILLS = textwrap.dedent("""
    import sys, torch
    import xla_fsdp._io as io
    io.no_space_problem = lambda directory, needed: None    # as if another writer filled the disk after the check
    try:
        io.atomic_torch_save(sys.argv[1], {"blob": torch.zeros(6 << 20)})   # 24 MB
        print("written")
    except OSError as exc:
        print(f"OSError {exc}")
""")


def test_a_disk_that_fills_during_the_write_is_named_not_reported_as_torchs_unexpected_pos(tmp_path):
    disk = tmp_path / "disk"
    with small_filesystem(disk, 20) as kind:
        done = subprocess.run([sys.executable, "-c", SAVE_AS_THE_DISK_FILLS, str(disk / "c_rank-0.pth")],
                              capture_output=True, text=True, timeout=300,
                              preexec_fn=fsize_limit(20) if kind == "rlimit" else None,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        out = done.stdout.strip()
        full = "no space left on the device" if kind == "tmpfs" else "larger than the file size limit"
        assert out.startswith("OSError") and full in out and str(disk) in out and "24.0 MiB" in out, (kind, out,
                                                                                                    done.stderr[-800:])
        assert "unexpected pos" not in out
        assert list(disk.iterdir()) == [], kind


LAUNCHED = textwrap.dedent("""
    import os, sys
    # The settings of shared/PLATFORM.md (causes 1 and 4); channel ids (cause 2) are the library's.
    os.environ.update(PJRT_DEVICE="CPU", CPU_NUM_DEVICES="2", XLA_THREAD_POOL_SIZE="16",
                      XLA_ENABLE_PARAM_ALIASING="0")
    sys.path.insert(0, sys.argv[2])
    import torch_xla
    import torch_xla.runtime as xr

    def run(index, root):
        from support import make_net
        from xla_fsdp import XlaFullyShardedDataParallel as FSDP
        from xla_fsdp.sharded_checkpoint import load_sharded_checkpoint, save_sharded_checkpoint, wait_for_checkpoint
        model = FSDP(make_net())
        save_sharded_checkpoint(root, model, step=1)
        save_sharded_checkpoint(root, model, step=2, async_save=True)
        wait_for_checkpoint()
        step = load_sharded_checkpoint(root, FSDP(make_net(seed=4)))["step"]
        print(f"rank {xr.global_ordinal()} of {xr.world_size()} loaded step {step}", flush=True)

    if __name__ == "__main__":
        torch_xla.launch(run, args=(sys.argv[1],))
""")


def test_the_commit_barrier_works_under_torch_xla_launch(tmp_path):
    script = tmp_path / "launched.py"          # a file: torch_xla.launch's workers import it
    script.write_text(LAUNCHED)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "c"), TESTS], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr[-2000:]
    # The two device threads print concurrently: lines may run together.
    assert sorted(re.findall(r"rank \d of 2 loaded step \d+", done.stdout)) == [
        "rank 0 of 2 loaded step 2", "rank 1 of 2 loaded step 2"]
    assert committed_steps(tmp_path / "c") == [1, 2]


def test_a_load_with_only_an_uncommitted_step_says_that_no_step_was_committed(tmp_path):
    root = tmp_path / "c"
    run_on_cpu_devices(lambda r: save_sharded_checkpoint(root, FSDP(make_net()), step=5), 2)
    # What a save killed before its commit leaves: the staging directory, without a manifest.
    os.replace(root / "step_00000005", root / "step_00000005.tmp")
    (root / "step_00000005.tmp" / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError) as raised:
        run_on_cpu_devices(lambda r: load_sharded_checkpoint(root, FSDP(make_net())), 2)
    message = str(raised.value)
    assert f"{root}: no committed step" in message and "step_00000005.tmp" in message, message
    assert "does not exist" not in message, message     # no manifest-less file path beside the directory
