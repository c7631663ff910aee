"""The examples run end to end on CPU XLA devices, through either launcher (see examples/common.py)."""

import gzip
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_example(*args, timeout=900, **env_vars) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("CPU_NUM_DEVICES", "PJRT_DEVICE", "XLA_FLAGS")}
    env.update(env_vars)
    done = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _accuracies(out: str) -> tuple[float, float]:
    sharded = float(re.search(r"sharded model on XLA: +([\d.]+)%", out).group(1))
    plain = float(re.search(r"consolidated model on host CPU: +([\d.]+)%", out).group(1))
    return sharded, plain


def test_main_job_reaches_97_percent_and_the_consolidated_model_agrees(tmp_path):
    out = run_example("examples/train_mnist_fsdp.py", "--ckpt_dir", tmp_path)
    sharded, plain = _accuracies(out)
    assert sharded >= 97.0 and plain == sharded
    assert len(list(tmp_path.glob("digits/step_*/digits_rank-*-of-00000004.pth"))) == 4
    assert (tmp_path / "digits_consolidated.pth").exists()


def test_the_launcher_is_torch_xla_launch_exactly_when_a_pjrt_device_is_set():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import common
    finally:
        sys.path.remove(str(ROOT / "examples"))
    assert common.choose_launcher({}) == common.CPU_DEVICE_THREADS
    assert common.choose_launcher({"PJRT_DEVICE": "TPU"}) == common.TORCH_XLA_LAUNCH
    assert common.choose_launcher({"PJRT_DEVICE": "CPU"}) == common.TORCH_XLA_LAUNCH
    with pytest.raises(SystemExit, match="CPU_NUM_DEVICES=4: several CPU devices under torch_xla.launch"):
        common.choose_launcher({"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4"})


def test_digits_example_takes_the_tpu_path_under_torch_xla_launch(tmp_path):
    # PJRT_DEVICE set: torch_xla.launch spawns a worker process and pickles what
    # it runs, as on a TPU VM (here one worker with one CPU device).
    out = run_example("examples/train_mnist_fsdp.py", "--num_epochs", "1", "--ckpt_dir", tmp_path,
                      PJRT_DEVICE="CPU")
    sharded, plain = _accuracies(out)
    assert plain == sharded
    assert "1437 training / 360 test images, 1 XLA device(s), 22 steps" in out
    shard_files = [p.name for p in tmp_path.glob("digits/step_*/digits_rank-*.pth")]
    assert shard_files == ["digits_rank-00000000-of-00000001.pth"]


def test_main_job_in_pure_bf16_saves_bf16_shards_that_consolidate_to_the_same_accuracy(tmp_path):
    import torch
    out = run_example("examples/train_mnist_fsdp.py", "--pure_bf16", "--num_devices", "2", "--num_epochs", "3",
                      "--ckpt_dir", tmp_path)
    sharded, plain = _accuracies(out)
    assert "pure bf16 (BF16AdamW)" in out and sharded >= 90.0 and plain == sharded
    shard = torch.load(next(tmp_path.glob("digits/step_*/digits_rank-00000000-of-00000002.pth")), weights_only=True)
    assert {t.dtype for t in shard["model"].values()} == {torch.bfloat16}
    assert {t.dtype for t in torch.load(tmp_path / "digits_consolidated.pth", weights_only=True)["model"].values()} \
        == {torch.bfloat16}
    state = shard["optimizer"]["state"][0]
    assert {k: v.dtype for k, v in state.items() if k != "step"} == dict.fromkeys(
        ("exp_avg", "exp_avg_sq", "compensation"), torch.bfloat16)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_idx_files_on_one_device(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("t10k", 32)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    out = run_example("examples/train_mnist_fsdp.py", "--dataset", "mnist", "--datadir", tmp_path,
                      "--num_devices", "1", "--num_epochs", "1", "--batch_size", "16",
                      "--ckpt_dir", tmp_path / "ckpt")
    sharded, plain = _accuracies(out)
    assert plain == sharded
    assert "64 training / 32 test images, 1 XLA device(s), 4 steps" in out


SMOKE = ["--fake_data", "--image_size", "32", "--batch_size", "2", "--test_set_batch_size", "2",
         "--fake_steps_per_epoch", "2", "--num_classes", "10", "--lr", "0.01", "--log_steps", "1"]


def test_imagenet_resnet_smoke_run_checkpoints_and_resumes(tmp_path):
    common = ["examples/train_imagenet_fsdp.py", *SMOKE, "--model", "resnet18", "--num_devices", "2",
              "--use_nested_fsdp", "--use_gradient_checkpointing", "--ckpt_dir", tmp_path]
    first = run_example(*common, "--num_epochs", "1")
    assert "epoch 1 step 2/2" in first and "images/s per device" in first and "top1" in first
    assert len(list(tmp_path.glob("resnet18/step_*/resnet18_rank-*-of-00000002.pth"))) == 2
    second = run_example(*common, "--num_epochs", "2", "--resume")
    assert "resumed from epoch 1, step 2" in second and "epoch 2:" in second


def test_imagenet_initial_weights_are_the_same_in_every_run_with_two_devices_per_process(tmp_path):
    # Both ranks are threads of one process (as on a v3 host): if they built
    # the model from torch's shared global RNG, each run would start elsewhere.
    import torch
    runs = []
    for run in ("a", "b"):
        run_example("examples/train_imagenet_fsdp.py", *SMOKE, "--model", "resnet18", "--num_devices", "2",
                    "--fake_steps_per_epoch", "1", "--fake_val_steps", "1", "--num_epochs", "1",
                    "--ckpt_dir", tmp_path / run)
        runs.append([torch.load(next((tmp_path / run).glob(f"resnet18/step_*/resnet18_rank-{r:08d}-of-00000002.pth")),
                                weights_only=True)["model"] for r in range(2)])
    for rank, (a, b) in enumerate(zip(*runs)):
        assert a.keys() == b.keys()
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, f"rank {rank}: {len(differ)} of {len(a)} tensors differ between runs, e.g. {differ[:3]}"


def test_imagenet_vit_smoke_run_on_one_device_in_bf16(tmp_path):
    out = run_example("examples/train_imagenet_fsdp.py", *SMOKE, "--model", "vit_tiny", "--patch_size", "8",
                      "--num_devices", "1", "--num_epochs", "1", "--use_nested_fsdp", "--compute_dtype", "bfloat16")
    assert "summary:" in out and "'top1'" in out


def test_the_digits_model_pools_like_adaptive_pooling_without_a_host_fallback():
    # torch_xla runs F.adaptive_avg_pool2d on the host unless the map divides evenly (MNIST's 7 x 7 did, every
    # step); the example's avg_pool2d form must give the same numbers for every map size.
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, str(ROOT / "examples"))
    from train_mnist_fsdp import pool_to_2x2

    for size in (2, 3, 7, 8):
        x = torch.randn(2, 3, size, size)
        torch.testing.assert_close(pool_to_2x2(x), F.adaptive_avg_pool2d(x, 2))
