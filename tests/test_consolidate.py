"""python -m consolidate: full checkpoints, optimizer state, resharding, formats, bad input."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from consolidate import ConsolidationError, consolidate_sharded_model_checkpoints
from consolidate.__main__ import main
from support import FP32, OPTIMIZERS, Config, assert_state_close, make_batches, make_net, train_steps, wrap_net
from xla_fsdp.sharded_checkpoint import load_sharded_checkpoint, save_sharded_checkpoint
from xla_fsdp.testing import run_on_cpu_devices

WORLD = 4
CONFIG = Config(wrap="zero3", optimizer="adamw")
BATCHES = make_batches(4)


def _steps(model, opt, batches, rank, world):
    """Train on ``batches``; the full state dict after each step."""
    states = []
    train_steps(model, opt, batches, rank, world,
                probe=lambda step, m, o, extra: states.append(m.full_state_dict(rank0_only=False)))
    return states


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-rank ZeRO-3 AdamW run saved after 2 steps; the full state after steps 2, 3 and 4."""
    directory = tmp_path_factory.mktemp("run")
    prefix = str(directory / "ckpt")

    def train(rank):
        model = wrap_net(make_net(), CONFIG)
        opt = OPTIMIZERS["adamw"](model.parameters())
        before = _steps(model, opt, BATCHES[:2], rank, WORLD)
        save_sharded_checkpoint(prefix, model, opt, step=2)
        return before + _steps(model, opt, BATCHES[2:], rank, WORLD)

    states = run_on_cpu_devices(train, WORLD)[0]
    return {"prefix": prefix, "dir": directory, "saved": states[1], "after": states[2:]}


def _copy_run(run, tmp_path) -> str:
    """The run's rank files as a set without a manifest (the bad-input tests edit them)."""
    for f in Path(run["dir"]).glob("ckpt/step_*/ckpt_rank-*.pth"):
        shutil.copy(f, tmp_path / f.name)
    return str(tmp_path / "ckpt")


def test_consolidated_model_equals_the_full_state_in_model_order(run, tmp_path):
    state, path = consolidate_sharded_model_checkpoints(_copy_run(run, tmp_path), progress=False)
    assert path == str(tmp_path / "ckpt_consolidated.pth")  # a str, as torch_xla returns
    saved = torch.load(path, weights_only=True)["model"]
    assert_state_close(saved, run["saved"], rtol=0, atol=0)
    assert list(saved) == [n for n in make_net().state_dict()]
    unwrapped = make_net()
    unwrapped.load_state_dict(saved)  # strict: every key, tied ones included
    assert unwrapped.decode.weight is unwrapped.embed.weight


def test_consolidated_optimizer_gives_the_same_next_step(run, tmp_path):
    _, path = consolidate_sharded_model_checkpoints(_copy_run(run, tmp_path), optimizer=True, progress=False)
    ckpt = torch.load(path, weights_only=True)
    model = make_net()
    model.load_state_dict(ckpt["model"])
    opt = OPTIMIZERS["adamw"](model.parameters())
    opt.load_state_dict(ckpt["optimizer"])
    x, y = BATCHES[2]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    # Host CPU against XLA CPU: the same fp32 math, rounding may differ.
    assert_state_close(model.state_dict(), run["after"][0], **FP32)


@pytest.mark.parametrize("new_world", [2, 8])
def test_resharded_checkpoint_resumes_like_the_original_world(run, tmp_path, new_world):
    assert main(["--ckpt_prefix", _copy_run(run, tmp_path), "--ckpt_suffix", "_rank-*.pth",
                 "--reshard", str(new_world), "--save_path", str(tmp_path / "re"), "--no_progress"]) == 0

    def resume(rank):
        model = wrap_net(make_net(seed=7), CONFIG)
        opt = OPTIMIZERS["adamw"](model.parameters())
        assert load_sharded_checkpoint(tmp_path / "re", model, opt)["step"] == 2
        return _steps(model, opt, BATCHES[2:], rank, new_world)

    states = run_on_cpu_devices(resume, new_world)[0]
    for got, want in zip(states, run["after"]):
        assert_state_close(got, want, **FP32)


def test_safetensors_output_loads_into_the_unwrapped_model(run, tmp_path):
    from safetensors.torch import load_file
    _, path = consolidate_sharded_model_checkpoints(_copy_run(run, tmp_path), format="safetensors",
                                                    verify=True, progress=False)
    model = make_net()
    model.load_state_dict(load_file(path))
    assert_state_close(model.state_dict(), run["saved"], rtol=0, atol=0)


def test_orbax_output_restores_to_numpy_arrays(run, tmp_path):
    from consolidate._writers import read_orbax
    _, path = consolidate_sharded_model_checkpoints(_copy_run(run, tmp_path), format="orbax", verify=True,
                                                    progress=False)
    restored = read_orbax(path)
    assert sorted(restored) == sorted(run["saved"])
    for name, value in run["saved"].items():
        assert isinstance(restored[name], np.ndarray) and np.array_equal(restored[name], value.numpy())


def test_verify_catches_an_output_that_differs_from_the_shards(run, tmp_path):
    from consolidate._consolidate import verify_output
    from consolidate._inputs import discover
    from consolidate._plan import model_entries
    prefix = _copy_run(run, tmp_path)
    _, path = consolidate_sharded_model_checkpoints(prefix, progress=False)
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["head"][0, 0] += 1
    torch.save(ckpt, path)
    files = discover(prefix, "_rank-*.pth")
    with pytest.raises(ConsolidationError, match="head in .* differs from the shards"):
        verify_output(files, model_entries(files), path, "pth", progress=False, weights_only=True)


def test_progress_bar_is_shown(run, tmp_path, capsys):
    consolidate_sharded_model_checkpoints(_copy_run(run, tmp_path), progress=True)
    assert "consolidating" in capsys.readouterr().err


# ---------------------------------------------------------------- torch_xla's format
def _torch_xla_checkpoint(directory: Path, flatten: bool) -> str:
    from torch_xla.distributed.fsdp import XlaFullyShardedDataParallel as TorchXlaFSDP
    import torch_xla.core.xla_model as xm

    def save(rank):
        # torch_xla's FSDP on 4 of the process's 8 CPU devices, with the CPU settings of PLATFORM.md.
        kw = dict(sharding_groups=[[0, 1, 2, 3], [4, 5, 6, 7]], sharding_rank=rank, sharding_world_size=4,
                  pin_layout_in_collective_ops=False, flatten_parameters=flatten)
        net = make_net()
        for i, block in enumerate(net.blocks):
            net.blocks[i] = TorchXlaFSDP(block, **kw)
        model = TorchXlaFSDP(net, **kw)
        ckpt = {"model": model.state_dict(), "shard_metadata": model.get_shard_metadata()}
        xm.save(ckpt, directory / f"txla_rank-{rank:08d}-of-00000004.pth", master_only=False)

    run_on_cpu_devices(save, 4)
    return str(directory / "txla")


@pytest.mark.parametrize("flatten", [True, False])
def test_torch_xla_checkpoints_consolidate_exactly_like_torch_xla_does(tmp_path, flatten):
    from torch_xla.distributed.fsdp import consolidate_sharded_model_checkpoints as torch_xla_tool
    prefix = _torch_xla_checkpoint(tmp_path, flatten)
    torch_xla_tool(prefix, "_rank-*.pth", save_path=str(tmp_path / "theirs.pth"))
    consolidate_sharded_model_checkpoints(prefix, "_rank-*.pth", str(tmp_path / "ours.pth"), progress=False)
    theirs = torch.load(tmp_path / "theirs.pth", weights_only=True)["model"]
    ours = torch.load(tmp_path / "ours.pth", weights_only=True)["model"]
    assert list(ours) == list(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    # And as a torch.distributed.checkpoint, read back by DCP itself.
    import torch.distributed.checkpoint as dcp
    assert main(["--ckpt_prefix", prefix, "--ckpt_suffix", "_rank-*.pth", "--format", "dcp", "--save_path",
                 str(tmp_path / "ours.dcp"), "--no_progress"]) == 0
    read_back = {"model": {name: torch.empty_like(value) for name, value in theirs.items()}}
    dcp.load(read_back, checkpoint_id=tmp_path / "ours.dcp", no_dist=True)
    for name in theirs:
        assert torch.equal(read_back["model"][name], theirs[name]), name


# ---------------------------------------------------------------------- bad input
def _fails(args, capsys) -> str:
    assert main([*args, "--no_progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("consolidate: error: ") and "\n" not in err and "Traceback" not in err
    return err


def _no_output(directory: Path):
    leftovers = [p.name for p in directory.iterdir() if "consolidated" in p.name or ".tmp-" in p.name]
    assert leftovers == []


def test_missing_rank(run, tmp_path, capsys):
    prefix = _copy_run(run, tmp_path)
    os.remove(f"{prefix}_rank-00000002-of-00000004.pth")
    assert "rank(s) [2] of world size 4 missing" in _fails(["--ckpt_prefix", prefix], capsys)
    _no_output(tmp_path)


def test_duplicate_rank(run, tmp_path, capsys):
    prefix = _copy_run(run, tmp_path)
    shutil.copy(f"{prefix}_rank-00000001-of-00000004.pth", f"{prefix}_copy.pth")
    err = _fails(["--ckpt_prefix", prefix], capsys)
    assert "rank 1 appears twice" in err and "ckpt_copy.pth" in err
    _no_output(tmp_path)


def test_files_of_two_world_sizes(run, tmp_path, capsys):
    prefix = _copy_run(run, tmp_path)
    # A 2-rank save, its files set beside the 4-rank ones without a manifest.
    other = tmp_path / "other" / "ckpt_b"
    run_on_cpu_devices(lambda r: save_sharded_checkpoint(other, wrap_net(make_net(), CONFIG)), 2)
    for f in (tmp_path / "other").glob("ckpt_b/step_*/ckpt_b_rank-*.pth"):
        shutil.copy(f, tmp_path / f.name)
    err = _fails(["--ckpt_prefix", prefix], capsys)
    assert "ckpt_b_rank-00000000-of-00000002.pth" in err and "has world size 4 but" in err and "different runs" in err
    _no_output(tmp_path)


def test_truncated_file(run, tmp_path, capsys):
    prefix = _copy_run(run, tmp_path)
    victim = Path(f"{prefix}_rank-00000002-of-00000004.pth")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    err = _fails(["--ckpt_prefix", prefix], capsys)
    assert str(victim) in err and "truncated, corrupted" in err
    _no_output(tmp_path)


def test_random_bytes(run, tmp_path, capsys):
    prefix = _copy_run(run, tmp_path)
    noise = Path(f"{prefix}_noise.pth")
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    assert str(noise) in _fails(["--ckpt_prefix", prefix], capsys)
    _no_output(tmp_path)


def test_a_file_that_is_not_a_checkpoint(run, tmp_path, capsys):
    prefix = _copy_run(run, tmp_path)
    torch.save({"weights": torch.zeros(3)}, f"{prefix}_other.pth")
    err = _fails(["--ckpt_prefix", prefix], capsys)
    assert "ckpt_other.pth: not a sharded FSDP checkpoint" in err
    _no_output(tmp_path)


def test_a_glob_that_matches_nothing(tmp_path, capsys):
    assert "no files match" in _fails(["--ckpt_prefix", str(tmp_path / "nothing")], capsys)


def test_shard_metadata_that_disagrees_between_ranks(run, tmp_path, capsys):
    prefix = _copy_run(run, tmp_path)
    path = f"{prefix}_rank-00000003-of-00000004.pth"
    ckpt = torch.load(path, weights_only=True)
    # Valid on its own (a changed shape is now refused by the file's own check), but not rank 0's.
    ckpt["shard_metadata"]["params"]["flat_param_0"]["originals"][0]["name"] = "renamed"
    torch.save(ckpt, path)
    err = _fails(["--ckpt_prefix", prefix], capsys)
    assert path in err and "disagrees" in err and "params" in err
    _no_output(tmp_path)


def test_a_shard_of_the_wrong_size_fails_without_leaving_output(run, tmp_path, capsys):
    prefix = _copy_run(run, tmp_path)
    path = f"{prefix}_rank-00000003-of-00000004.pth"
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["flat_param_0"] = ckpt["model"]["flat_param_0"][:-1].clone()
    torch.save(ckpt, path)
    assert "flat_param_0" in _fails(["--ckpt_prefix", prefix], capsys)
    _no_output(tmp_path)


def test_an_existing_output_is_kept_without_overwrite(run, tmp_path, capsys):
    prefix = _copy_run(run, tmp_path)
    existing = tmp_path / "out.pth"
    existing.write_bytes(b"precious")
    assert "pass --overwrite" in _fails(["--ckpt_prefix", prefix, "--save_path", str(existing)], capsys)
    assert existing.read_bytes() == b"precious"
    assert main(["--ckpt_prefix", prefix, "--save_path", str(existing), "--overwrite", "--no_progress"]) == 0
    assert "model" in torch.load(existing, weights_only=True)


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["XLA_FSDP_TEST_MARKER"]),))


def test_loading_cannot_run_code(run, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("XLA_FSDP_TEST_MARKER", str(marker))
    prefix = _copy_run(run, tmp_path)
    torch.save({"model": {}, "shard_metadata": {"x": _RunsCode()}}, f"{prefix}_evil.pth")
    assert "ckpt_evil.pth" in _fails(["--ckpt_prefix", prefix], capsys)
    assert not marker.exists()


# ----------------------------------------------------------------------- memory
PEAK_RSS = textwrap.dedent("""
    import sys, torch
    import torch.distributed.checkpoint   # imported before the baseline, as consolidate is
    from consolidate import consolidate_sharded_model_checkpoints
    def status(field):  # kB figures of /proc/self/status
        return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    base = status("VmRSS:")
    consolidate_sharded_model_checkpoints(sys.argv[1], "_rank-*.pth", sys.argv[2], progress=False,
                                          memory_budget_mb=8, format=sys.argv[3])
    print(status("VmHWM:") - base)
""")


def _synthetic_checkpoint(directory: Path, name: str = "big", world: int = 4, count: int = 48,
                          numel: int = 1 << 20) -> str:
    """A manifest-less set of ``world`` shard files of ``count`` fp32 tensors of ``numel`` elements."""
    from xla_fsdp._layout import ShardLayout
    from xla_fsdp._metadata import Original, ShardedParam, ShardMetadata
    layout = ShardLayout((numel,), world)
    names = [f"w{i}" for i in range(count)]
    for rank in range(world):
        params = {f"_fsdp_shard__{n}": torch.full((layout.shard_numel,), float(i)) for i, n in enumerate(names)}
        metadata = ShardMetadata(world, rank, {f"_fsdp_shard__{n}": ShardedParam((numel,), world, False,
                                                                                (Original(n, (numel,), 0),))
                                               for n in names}, {}, tuple(names), tuple(names))
        torch.save({"format": "xla_fsdp", "model": params, "shard_metadata": metadata.to_dict(), "step": 0,
                    "rng": {"torch": torch.get_rng_state(), "xla": 0}, "extra": {}},
                   directory / f"{name}_rank-{rank:08d}-of-{world:08d}.pth")
    return str(directory / name)


@pytest.mark.parametrize("fmt", ["pth", "dcp"])
def test_consolidation_memory_is_bounded_by_the_largest_tensor_not_the_checkpoint(tmp_path, fmt):
    world, count, numel = 4, 48, 1 << 20                    # 48 tensors of 4 MB: 192 MB
    _synthetic_checkpoint(tmp_path, "big", world, count, numel)
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, str(tmp_path / "big"), str(tmp_path / f"out.{fmt}"), fmt],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    growth = int(done.stdout.strip().splitlines()[-1])
    checkpoint_bytes, largest = count * numel * 4, numel * 4
    # About twice the 8 MB group plus the 4 MB tensor being assembled, with
    # 32 MB of slack for allocator and pickle overheads; far below the 192 MB
    # that loading the checkpoint would take.
    assert growth < 2 * ((8 << 20) + largest) + (32 << 20), (growth, largest)
    assert growth < checkpoint_bytes / 3, (growth, checkpoint_bytes)


# ------------------------------------------- issue 13: never lose or invent data
def _edit_all(prefix: str, edit, ranks=range(WORLD)) -> None:
    """Apply ``edit(ckpt, rank)`` to rank files of a manifest-less copy."""
    for rank in ranks:
        path = f"{prefix}_rank-{rank:08d}-of-{WORLD:08d}.pth"
        ckpt = torch.load(path, weights_only=True)
        edit(ckpt, rank)
        torch.save(ckpt, path)


def _consolidated(path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def test_a_checkpoint_directory_is_read_through_its_newest_committed_step(run, tmp_path):
    shutil.copytree(Path(run["dir"]) / "ckpt", tmp_path / "ckpt")
    # A later step that was never committed (no manifest), holding other weights: never read.
    uncommitted = tmp_path / "ckpt" / "step_00000007.tmp"
    shutil.copytree(tmp_path / "ckpt" / "step_00000002", uncommitted)
    (uncommitted / "manifest.json").unlink()
    for f in uncommitted.glob("*.pth"):
        ckpt = torch.load(f, weights_only=True)
        ckpt["model"]["flat_param_0"].add_(1)
        torch.save(ckpt, f)
    assert main(["--ckpt_prefix", str(tmp_path / "ckpt"), "--save_path", str(tmp_path / "out.pth"), "--verify",
                 "--no_progress"]) == 0
    assert_state_close(_consolidated(tmp_path / "out.pth"), run["saved"], rtol=0, atol=0)


def test_files_of_two_steps_are_refused(run, tmp_path, capsys):
    prefix = _copy_run(run, tmp_path)
    _edit_all(prefix, lambda ckpt, rank: ckpt.update(step=3), ranks=[0, 1])
    err = _fails(["--ckpt_prefix", prefix], capsys)
    assert "holds step 2" in err and "files of two saves" in err
    _no_output(tmp_path)


def test_an_output_in_the_input_directory_never_deletes_the_inputs(run, tmp_path, capsys):
    prefix = _copy_run(run, tmp_path)
    before = sorted(tmp_path.iterdir())
    err = _fails(["--ckpt_prefix", prefix, "--format", "orbax", "--save_path", str(tmp_path), "--overwrite"], capsys)
    assert "is or contains the input" in err
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("fmt", ["orbax", "dcp"])
def test_an_existing_directory_that_this_tool_did_not_write_is_never_replaced(run, tmp_path, capsys, fmt):
    prefix = _copy_run(run, tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    err = _fails(["--ckpt_prefix", prefix, "--format", fmt, "--save_path", str(tmp_path / "mine"),
                  "--overwrite"], capsys)
    assert f"not an {fmt} checkpoint" in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_the_prefix_is_literal_not_a_glob_pattern(run, tmp_path, capsys):
    for f in Path(run["dir"]).glob("ckpt/step_*/ckpt_rank-*.pth"):
        shutil.copy(f, tmp_path / f.name.replace("ckpt_", "run1_"))
    assert "no files match" in _fails(["--ckpt_prefix", str(tmp_path / "run[1]")], capsys)
    assert not (tmp_path / "run[1]_consolidated.pth").exists()


def test_the_default_suffix_does_not_take_reshard_outputs(run, tmp_path):
    prefix = _copy_run(run, tmp_path)
    assert main(["--ckpt_prefix", prefix, "--reshard", "2", "--no_progress"]) == 0
    assert main(["--ckpt_prefix", prefix, "--no_progress"]) == 0
    assert_state_close(_consolidated(f"{prefix}_consolidated.pth"), run["saved"], rtol=0, atol=0)


def test_verify_runs_before_the_output_replaces_anything(run, tmp_path, capsys, monkeypatch):
    import consolidate._consolidate as driver
    prefix = _copy_run(run, tmp_path)
    existing = tmp_path / "out.pth"
    existing.write_bytes(b"precious")

    def failing_verify(*args, **kwargs):
        raise ConsolidationError("verification failed: injected")

    monkeypatch.setattr(driver, "verify_output", failing_verify)
    for fmt, target in [("pth", existing), ("safetensors", existing)]:
        err = _fails(["--ckpt_prefix", prefix, "--save_path", str(target), "--format", fmt, "--overwrite",
                      "--verify"], capsys)
        assert "injected" in err
        assert existing.read_bytes() == b"precious"
        assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_verify_takes_a_nan_for_a_nan(run, tmp_path):
    prefix = _copy_run(run, tmp_path)
    _edit_all(prefix, lambda ckpt, rank: ckpt["model"]["flat_param_0"].__setitem__(0, float("nan")), ranks=[0])
    for fmt in ("pth", "safetensors", "orbax", "dcp"):
        assert main(["--ckpt_prefix", prefix, "--format", fmt, "--verify", "--no_progress"]) == 0, fmt


def test_reshard_verifies_before_it_commits(run, tmp_path, capsys, monkeypatch):
    import consolidate._consolidate as driver
    prefix = _copy_run(run, tmp_path)
    monkeypatch.setattr(driver, "same_values", lambda a, b: False, raising=False)
    err = _fails(["--ckpt_prefix", prefix, "--reshard", "2", "--save_path", str(tmp_path / "re"), "--verify"], capsys)
    assert "verification failed" in err
    assert not (tmp_path / "re").exists() or not list((tmp_path / "re").rglob("manifest.json"))


def test_a_rank_whose_dtype_differs_is_refused_not_cast(run, tmp_path, capsys):
    prefix = _copy_run(run, tmp_path)
    _edit_all(prefix, lambda ckpt, rank: ckpt["model"].update(flat_param_0=ckpt["model"]["flat_param_0"].half()),
              ranks=[2])
    err = _fails(["--ckpt_prefix", prefix], capsys)
    assert "rank-00000002" in err and "(rank 2)" in err and "model.flat_param_0 is torch.float16" in err
    _no_output(tmp_path)


def test_overlapping_originals_are_refused(run, tmp_path, capsys):
    prefix = _copy_run(run, tmp_path)

    def overlap(ckpt, rank):
        originals = ckpt["shard_metadata"]["params"]["flat_param_0"]["originals"]
        originals[1]["offset"] = originals[0]["offset"]

    _edit_all(prefix, overlap)
    err = _fails(["--ckpt_prefix", prefix], capsys)
    assert "rank-00000000" in err and "params.flat_param_0.originals" in err and "overlap" in err
    _no_output(tmp_path)


def test_optimizer_param_names_shorter_than_the_group_are_refused(run, tmp_path, capsys):
    prefix = _copy_run(run, tmp_path)
    _edit_all(prefix, lambda ckpt, rank: ckpt["optimizer_param_names"][0].pop())
    err = _fails(["--ckpt_prefix", prefix, "--optimizer"], capsys)
    assert "field optimizer_param_names[0]" in err and "(rank 0)" in err
    _no_output(tmp_path)


def test_a_missing_metadata_field_is_named(run, tmp_path, capsys):
    prefix = _copy_run(run, tmp_path)
    _edit_all(prefix, lambda ckpt, rank: ckpt["shard_metadata"].pop("buffers"))
    assert "field buffers is missing" in _fails(["--ckpt_prefix", prefix], capsys)
    _no_output(tmp_path)


def test_an_absurd_shape_is_refused_before_anything_is_allocated(run, tmp_path, capsys):
    prefix = _copy_run(run, tmp_path)

    def absurd(ckpt, rank):
        ckpt["shard_metadata"]["params"]["flat_param_0"]["originals"][0]["shape"] = [10**6, 10**6]

    _edit_all(prefix, absurd)
    err = _fails(["--ckpt_prefix", prefix], capsys)
    assert "params.flat_param_0.originals" in err and "(rank 0)" in err
    _no_output(tmp_path)


@pytest.mark.parametrize("bad", ["nan", "inf", "0", "-1"])
def test_a_memory_budget_that_is_not_a_positive_number_is_refused(run, tmp_path, capsys, bad):
    prefix = _copy_run(run, tmp_path)
    assert "--memory_budget_mb must be a positive number" in _fails(
        ["--ckpt_prefix", prefix, "--memory_budget_mb", bad], capsys)
    _no_output(tmp_path)


def test_an_existing_directory_as_save_path_is_refused(run, tmp_path, capsys):
    prefix = _copy_run(run, tmp_path)
    (tmp_path / "out").mkdir()
    assert "is a directory" in _fails(["--ckpt_prefix", prefix, "--save_path", str(tmp_path / "out"),
                                       "--overwrite"], capsys)


def test_a_symlink_loop_as_save_path_is_refused(run, tmp_path, capsys):
    prefix = _copy_run(run, tmp_path)
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    assert "loop" in _fails(["--ckpt_prefix", prefix, "--save_path", str(tmp_path / "loop" / "out.pth")], capsys)


def test_url_paths_are_refused(run, tmp_path, capsys, monkeypatch):
    prefix = _copy_run(run, tmp_path)
    monkeypatch.chdir(tmp_path)                 # where a "gs:" folder would appear
    assert "is a URL" in _fails(["--ckpt_prefix", "gs://bucket/ckpt"], capsys)
    assert "is a URL" in _fails(["--ckpt_prefix", prefix, "--save_path", "gs://bucket/out.pth"], capsys)
    assert "is a URL" in _fails(["--ckpt_prefix", prefix, "--reshard", "2", "--save_path", "gs://bucket/re"], capsys)
    assert not (tmp_path / "gs:").exists()


# ------------------------------------------------- full disk and kill -9
CONSOLIDATE = [sys.executable, "-m", "consolidate", "--no_progress"]


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


@pytest.mark.parametrize("args", [[], ["--reshard", "2"], ["--format", "safetensors"], ["--format", "orbax"],
                                  ["--format", "dcp"]])
def test_a_full_disk_gives_an_error_not_a_signal_and_leaves_nothing(tmp_path, args):
    from support import fsize_limit, small_filesystem
    prefix = _synthetic_checkpoint(tmp_path, count=6)          # 6 tensors of 4 MB: 24 MB of output
    disk = tmp_path / "disk"
    with small_filesystem(disk, 20) as kind:
        done = subprocess.run([*CONSOLIDATE, "--ckpt_prefix", prefix, "--save_path", str(disk / "out"), *args],
                              capture_output=True, text=True, timeout=120, env=_env(),
                              preexec_fn=fsize_limit(20) if kind == "rlimit" else None)
        assert done.returncode == 2, (kind, done.returncode, done.stderr[-1500:])
        assert done.stderr.startswith("consolidate: error: ") and done.stderr.count("\n") == 1, (kind, done.stderr)
        assert list(disk.iterdir()) == [], kind


FILL_THROUGH_MAP = textwrap.dedent("""
    import sys, torch
    from consolidate._writers import PthStream
    specs = {("model", f"w{i}"): ((1 << 20,), torch.float32) for i in range(6)}   # 24 MB
    try:
        stream = PthStream(__import__("pathlib").Path(sys.argv[1]), {"model": {}}, specs)
        stream.fill([(p, torch.ones(1 << 20)) for p in specs])
        stream.commit()
        print("written")
    except OSError as exc:
        print("OSError", exc.errno)
""")


def test_the_pth_writer_fails_with_an_error_not_a_sigbus_when_the_disk_fills(tmp_path):
    """Below the free-space check: the writer itself never writes through a map of a sparse file."""
    from support import fsize_limit, small_filesystem
    disk = tmp_path / "disk"
    with small_filesystem(disk, 20) as kind:
        done = subprocess.run([sys.executable, "-c", FILL_THROUGH_MAP, str(disk / "out.pth")], capture_output=True,
                              text=True, timeout=120, env=_env(),
                              preexec_fn=fsize_limit(20) if kind == "rlimit" else None)
        assert done.returncode == 0 and done.stdout.startswith("OSError"), (kind, done.returncode, done.stdout,
                                                                          done.stderr[-800:])
        assert list(disk.iterdir()) == [], kind


def _kill_while_writing(proc: subprocess.Popen, folder: Path, seed: int) -> None:
    """SIGKILL ``proc`` at a random point after its first temporary file or folder appears in ``folder``.

    Waiting for it, rather than sleeping a fixed time, keeps the kill out of
    the imports (seconds, longer on a busy machine), where it would test nothing.
    """
    import random
    import signal
    import time
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not any(".tmp" in p.name for p in folder.iterdir()):
        time.sleep(0.005)
    assert proc.poll() is None, "it ended before writing anything"
    time.sleep(random.Random(seed).uniform(0.0, 0.5))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_at_a_random_point_of_a_consolidation_keeps_the_previous_output(tmp_path, seed):
    prefix = _synthetic_checkpoint(tmp_path, count=24)         # 96 MB: a consolidation of about a second
    out = tmp_path / "out.pth"
    out.write_bytes(b"previous")
    proc = subprocess.Popen([*CONSOLIDATE, "--ckpt_prefix", prefix, "--save_path", str(out), "--overwrite",
                             "--memory_budget_mb", "8"], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _kill_while_writing(proc, tmp_path, seed)
    if out.read_bytes()[:8] != b"previous":                    # it finished: the output must be complete
        model = torch.load(out, weights_only=True)["model"]
        assert sorted(model) == sorted(f"w{i}" for i in range(24))
        assert all(torch.equal(model[f"w{i}"], torch.full((1 << 20,), float(i))) for i in range(24))
    # A rerun removes the killed run's temporary file.
    assert main(["--ckpt_prefix", prefix, "--save_path", str(out), "--overwrite", "--no_progress"]) == 0
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("seed", [0, 1])
def test_kill_at_a_random_point_of_a_reshard_keeps_the_previous_step(tmp_path, seed):
    from xla_fsdp._steps import committed_steps, read_committed
    prefix = _synthetic_checkpoint(tmp_path, count=24)
    out = tmp_path / "re"
    assert main(["--ckpt_prefix", prefix, "--reshard", "2", "--save_path", str(out), "--no_progress"]) == 0
    first = {p.name: p.read_bytes() for p in (out / "step_00000000").iterdir()}
    proc = subprocess.Popen([*CONSOLIDATE, "--ckpt_prefix", prefix, "--reshard", "2", "--save_path", str(out),
                             "--overwrite"], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_while_writing(proc, out, seed)
    assert committed_steps(out) == [0]
    step, _ = read_committed(out, 0)   # not a listing: a half-removed step_00000000.old may come first in one
    assert {p.name: p.read_bytes() for p in step.iterdir()} == first   # the same bytes, old or new


def test_each_sharding_group_and_step_of_a_checkpoint_directory_can_be_consolidated(tmp_path, capsys):
    from xla_fsdp import XlaFullyShardedDataParallel as FSDP
    groups = [[0, 1], [2, 3]]

    def save(rank):
        model = FSDP(make_net(seed=10 + rank // 2), sharding_groups=groups, sharding_rank=rank % 2,
                     sharding_world_size=2)                       # each group holds its own weights
        save_sharded_checkpoint(tmp_path / "c", model, step=4)
        save_sharded_checkpoint(tmp_path / "c", model, step=5)

    run_on_cpu_devices(save, 4)
    for group in (0, 1):
        out = tmp_path / f"group{group}.pth"
        assert main(["--ckpt_prefix", str(tmp_path / "c"), "--sharding_group", str(group), "--step", "4",
                     "--save_path", str(out), "--verify", "--no_progress"]) == 0
        assert_state_close(_consolidated(out), make_net(seed=10 + group).state_dict(), rtol=0, atol=0)
    err = _fails(["--ckpt_prefix", str(tmp_path / "c"), "--step", "3"], capsys)
    assert "step 3 of" in err and "is not a committed checkpoint" in err
    assert "no sharding group 2" in _fails(["--ckpt_prefix", str(tmp_path / "c"), "--sharding_group", "2"], capsys)
