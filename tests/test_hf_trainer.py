"""Hugging Face's Trainer on its XLA FSDP path runs xla_fsdp, correctly, after ``xla_fsdp.patch_torch_xla()``.

The Trainer runs are the jobs of ``hf_trainer_jobs.py`` (what each does is
written there), each a process of its own, two at a time; the tests compare
what they logged and saved. Real ``transformers.Trainer`` and accelerate, tiny
GPT-2 and ViT models built from configs, random data; every sharded run is
checked against the same model trained unsharded on the same global batches,
to PyTorch's fp32 tolerances. The switch itself is tested in this process.
"""

import concurrent.futures
import functools
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch_xla

import xla_fsdp
from support import FP32
from xla_fsdp.testing import run_on_cpu_devices

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TORCH_XLA_FSDP_MODULES = ("torch_xla.distributed.fsdp", "torch_xla.distributed.fsdp.wrap",
                          "torch_xla.distributed.fsdp.xla_fully_sharded_data_parallel",
                          "torch_xla.distributed.fsdp.state_dict_utils", "torch_xla.distributed.fsdp.utils")


# ----------------------------------------------------------------------------- the switch


def test_the_switch_changes_nothing_until_called_and_undo_puts_everything_back():
    import torch_xla.distributed.fsdp as theirs

    before = {name: sys.modules.get(name) for name in TORCH_XLA_FSDP_MODULES}
    flag = os.environ.get("ACCELERATE_USE_FSDP")
    with xla_fsdp.patch_torch_xla():
        import torch_xla.distributed.fsdp as patched
        from torch_xla.distributed.fsdp import (XlaFullyShardedDataParallel, checkpoint_module,
                                                consolidate_sharded_model_checkpoints)
        from torch_xla.distributed.fsdp.wrap import transformer_auto_wrap_policy
        from transformers import Trainer

        assert issubclass(XlaFullyShardedDataParallel, xla_fsdp.XlaFullyShardedDataParallel)
        assert checkpoint_module is xla_fsdp.checkpoint_module
        assert consolidate_sharded_model_checkpoints is xla_fsdp.consolidate_sharded_model_checkpoints
        assert transformer_auto_wrap_policy is xla_fsdp.wrap.transformer_auto_wrap_policy
        assert patched is not theirs and torch_xla.distributed.fsdp is patched
        assert os.environ["ACCELERATE_USE_FSDP"] == "true"
        patched_wrap_model = Trainer._wrap_model
        assert patched_wrap_model.__qualname__.startswith("_wrap_model_patch")
        patched_load_rng_state = Trainer._load_rng_state
    assert {name: sys.modules.get(name) for name in TORCH_XLA_FSDP_MODULES} == before
    assert torch_xla.distributed.fsdp is theirs
    assert os.environ.get("ACCELERATE_USE_FSDP") == flag
    assert not [f for f in sys.meta_path if type(f).__module__ == "xla_fsdp._hf_trainer"]
    assert Trainer._wrap_model is patched_wrap_model.__wrapped__
    assert Trainer._load_rng_state is patched_load_rng_state.__wrapped__
    from torch_xla.distributed.fsdp import XlaFullyShardedDataParallel as after
    assert after is theirs.XlaFullyShardedDataParallel


def test_device_threads_restore_trainer_s_rng_state_one_at_a_time():
    # Trainer._load_rng_state runs torch.load inside torch.serialization.safe_globals, a process-wide list
    # that its exit puts back as it found it: two device threads interleaving there lose each other's
    # allowlist (seen: "Weights only load failed ... _reconstruct" on one rank of two). The patch
    # serializes it; here a stand-in for Trainer's method records whether two calls ever overlapped.
    import threading
    import time

    from xla_fsdp._hf_trainer import _load_rng_state_patch

    inside, overlapped = [0], []

    def load_rng_state(trainer, checkpoint):
        inside[0] += 1
        overlapped.append(inside[0] > 1)
        time.sleep(0.01)
        inside[0] -= 1

    patched = _load_rng_state_patch(load_rng_state)
    threads = [threading.Thread(target=patched, args=(None, "ckpt")) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlapped == [False] * 4
    inside[0], overlapped[:] = 0, []
    threads = [threading.Thread(target=load_rng_state, args=(None, "ckpt")) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert any(overlapped)  # unpatched, the calls do overlap: the test can tell


def test_the_switch_refuses_a_second_call_and_names_it_does_not_have():
    switch = xla_fsdp.patch_torch_xla()
    try:
        with pytest.raises(RuntimeError, match="already patched"):
            xla_fsdp.patch_torch_xla()
        with pytest.raises(ImportError, match=r"recursive_wrap.*xla_fsdp"):  # torch_xla's takes other arguments
            exec("from torch_xla.distributed.fsdp.wrap import recursive_wrap")  # as a torch_xla program writes it
        with pytest.raises(AttributeError, match="patch_torch_xla"):
            torch_xla.distributed.fsdp.XlaFlattenParamsWrapper
        with pytest.raises(ModuleNotFoundError, match="xla_flatten_params_wrapper"):
            importlib.import_module("torch_xla.distributed.fsdp.xla_flatten_params_wrapper")
    finally:
        switch.undo()
    switch.undo()  # a second undo does nothing
    import torch_xla.distributed.fsdp.wrap as theirs
    assert callable(theirs.recursive_wrap)


def test_torch_xla_s_class_keeps_torch_xla_s_module_level_and_ours_is_the_wrapped_module():
    # Trainer's save reads model.module.module (torch_xla: a flatten-params wrapper, then the model).
    with xla_fsdp.patch_torch_xla():
        from torch_xla.distributed.fsdp import XlaFullyShardedDataParallel as TorchXlaNamesFSDP
        from torch_xla.distributed.fsdp.wrap import lambda_auto_wrap_policy

    class Model(nn.Sequential):
        config = {"hidden": 6}

    def shapes(rank):
        inner = Model(nn.Linear(4, 6), nn.Linear(6, 2))
        policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: m is inner[1])
        model = TorchXlaNamesFSDP(inner, auto_wrap_policy=policy)
        out = model(torch.ones(3, 4, device=torch_xla.device()))
        ours = xla_fsdp.XlaFullyShardedDataParallel(Model(nn.Linear(4, 2)))
        return (model.module.module is inner, model.module.config, type(model.module[1]).__name__,
                type(model.module[1].module.module).__name__, tuple(out.shape), type(ours.module).__name__)

    assert run_on_cpu_devices(shapes, 1)[0] == (True, {"hidden": 6}, "TorchXlaFullyShardedDataParallel",
                                                 "Linear", (3, 2), "Model")


# ----------------------------------------------------------------------------- Trainer runs

# XLA's CPU compiler takes most of each job's time; LLVM's optimisation level
# changes how fast the compiled code runs, not what the HLO computes.
_JOB_ENV = {"XLA_FLAGS": "--xla_backend_optimization_level=0",
            "HF_HUB_OFFLINE": "1"}  # models come from configs: nothing to download, so never try
_LAUNCHED = {"PJRT_DEVICE": "CPU"}  # torch_xla.launch: one worker process with one CPU device
_JOBS = {  # name: (extra environment, job it needs first)
    "reference": ({}, None), "gpt2_sharded": ({}, None), "vit_sharded": ({}, None),
    "gpt2_resume": ({}, "gpt2_sharded"),
    "vit_launch": (_LAUNCHED, None),
}


def _run_job(name: str, out: Path, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CPU_NUM_DEVICES", "PJRT_DEVICE", "XLA_FLAGS", "ACCELERATE_USE_FSDP")}
    env.update(_JOB_ENV, **_JOBS[name][0], PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS)]))
    done = subprocess.run([sys.executable, str(TESTS / "hf_trainer_jobs.py"), name, str(out), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise AssertionError(f"job {name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Every job's result.json and output directory, by name; two jobs run at a time (2 cores)."""
    root = tmp_path_factory.mktemp("hf_trainer")
    futures = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        def start(name):
            extra = ()
            needs = _JOBS[name][1]
            if needs is not None:
                futures[needs].result()
                extra = (str(root / needs / "checkpoint-2"),)
            return _run_job(name, root / name, *extra)

        for name in _JOBS:
            futures[name] = pool.submit(start, name)
        return {name: (future.result(), root / name) for name, future in futures.items()}


def _reloaded(directory: Path) -> dict:
    return torch.load(directory / "reloaded.pt", weights_only=True)


def _assert_same_state(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], **FP32, msg=lambda m: f"{key}: {m}")


def _assert_same_steps(actual: dict, expected: dict) -> None:
    assert actual["steps"] == expected["steps"] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor(actual["losses"]), torch.tensor(expected["losses"]), **FP32)
    torch.testing.assert_close(torch.tensor(actual["grad_norms"]), torch.tensor(expected["grad_norms"]), **FP32)


def test_gpt2_on_2_devices_matches_the_unsharded_model_step_by_step(jobs):
    (reference, ref_dir), (sharded, out) = jobs["reference"], jobs["gpt2_sharded"]
    _assert_same_steps(sharded, reference["gpt2"])
    _assert_same_state(_reloaded(out / "final"), _reloaded(ref_dir / "gpt2"))


def test_vit_on_4_devices_with_xla_fsdp_grad_ckpt_matches_the_unsharded_model_step_by_step(jobs):
    (reference, ref_dir), (sharded, out) = jobs["reference"], jobs["vit_sharded"]
    _assert_same_steps(sharded, reference["vit"])
    _assert_same_state(_reloaded(out / "final"), _reloaded(ref_dir / "vit"))


def test_an_unmodified_trainer_gets_an_unfused_adamw_over_the_shards(jobs):
    sharded, _ = jobs["gpt2_sharded"]
    assert (sharded["optimizer"], sharded["fused"], sharded["module_is_user_model"]) == \
        ("AdamW", False, "GPT2LMHeadModel")


def test_save_model_then_from_pretrained_gives_the_wrapped_model_s_loss(jobs):
    for name in ("gpt2_sharded", "vit_sharded"):
        result, out = jobs[name]
        assert len(set(result["wrapped_losses_by_rank"])) == 1
        torch.testing.assert_close(result["reloaded_loss"], result["wrapped_loss"], **FP32)
        assert (out / "final" / "model.safetensors").is_file()


def test_periodic_checkpoints_hold_every_rank_s_shards_and_optimizer(jobs):
    _, out = jobs["gpt2_sharded"]
    for step in (2, 4):
        names = {p.name for p in (out / f"checkpoint-{step}").iterdir()}
        assert {"model.safetensors", "scheduler.pt", "trainer_state.json", "rank0-of-2-pytorch_model.bin",
                "rank1-of-2-pytorch_model.bin", "rank0-of-2-optimizer.pt", "rank1-of-2-optimizer.pt"} <= names


def test_resume_from_checkpoint_continues_as_if_never_stopped(jobs):
    (uninterrupted, out), (resumed, resumed_out) = jobs["gpt2_sharded"], jobs["gpt2_resume"]
    assert resumed["steps"] == [1, 2, 3, 4]  # steps 1-2 come from the checkpoint's trainer state
    assert resumed["losses"][2:] == uninterrupted["losses"][2:]
    assert resumed["grad_norms"][2:] == uninterrupted["grad_norms"][2:]
    resumed_state, uninterrupted_state = _reloaded(resumed_out / "final"), _reloaded(out / "final")
    assert resumed_state.keys() == uninterrupted_state.keys()
    assert [k for k in resumed_state if not torch.equal(resumed_state[k], uninterrupted_state[k])] == []


def test_one_device_under_torch_xla_launch_matches_torch_xla_s_own_fsdp(jobs):
    results, out = jobs["vit_launch"]
    theirs, ours = results["torch_xla"], results["xla_fsdp"]
    assert theirs["fsdp_class"] == \
        "torch_xla.distributed.fsdp.xla_fully_sharded_data_parallel.XlaFullyShardedDataParallel"
    assert ours["fsdp_class"] == "xla_fsdp._patch.TorchXlaFullyShardedDataParallel"
    _assert_same_steps(ours, theirs)
    _assert_same_state(_reloaded(out / "xla_fsdp" / "final"), _reloaded(out / "torch_xla" / "final"))
