"""The examples run end to end on CPU XLA devices; the TPU scripts are sound shell."""

import gzip
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "tpu_scripts").glob("*.sh"))


def run_example(*args, timeout=900) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("CPU_NUM_DEVICES", "PJRT_DEVICE", "XLA_FLAGS")}
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
    assert len(list(tmp_path.glob("digits_rank-*-of-00000004.pth"))) == 4
    assert (tmp_path / "digits_consolidated.pth").exists()


def test_main_job_in_pure_bf16_saves_bf16_shards_that_consolidate_to_the_same_accuracy(tmp_path):
    import torch
    out = run_example("examples/train_mnist_fsdp.py", "--pure_bf16", "--num_devices", "2", "--num_epochs", "3",
                      "--ckpt_dir", tmp_path)
    sharded, plain = _accuracies(out)
    assert "pure bf16 (BF16AdamW)" in out and sharded >= 90.0 and plain == sharded
    shard = torch.load(tmp_path / "digits_rank-00000000-of-00000002.pth", weights_only=True)
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
    assert len(list(tmp_path.glob("resnet18_rank-*-of-00000002.pth"))) == 2
    second = run_example(*common, "--num_epochs", "2", "--resume")
    assert "resumed from epoch 1, step 2" in second and "epoch 2:" in second


def test_imagenet_vit_smoke_run_on_one_device_in_bf16(tmp_path):
    out = run_example("examples/train_imagenet_fsdp.py", *SMOKE, "--model", "vit_tiny", "--patch_size", "8",
                      "--num_devices", "1", "--num_epochs", "1", "--use_nested_fsdp", "--compute_dtype", "bfloat16")
    assert "summary:" in out and "'top1'" in out


def test_tpu_scripts_pass_shellcheck():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    done = subprocess.run([str(shellcheck), "-x", *map(str, SCRIPTS)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def _dry_run(script: str, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    return subprocess.run(["bash", str(ROOT / "tpu_scripts" / script), "--project", "proj", "--zone", "us-central2-b",
                           "--name", "pod", "--accelerator-type", "v4-32", "--dry-run", *args],
                          capture_output=True, text=True, env=env)


def test_dry_runs_print_the_gcloud_commands_for_every_worker():
    create = _dry_run("create.sh").stdout
    assert "gcloud compute tpus tpu-vm create pod" in create and "--accelerator-type=v4-32" in create
    install = _dry_run("install.sh").stdout
    assert "--worker=all" in install and "torch_xla\\[tpu\\]==2.9.0" in install
    train = _dry_run("train.sh", "--recipe", "resnet50-v3-8", "--datadir", "/data/imagenet").stdout
    assert "--worker=all" in train and "PJRT_DEVICE=TPU" in train and "--lr\\ 0.4" in train
    consolidate = _dry_run("consolidate.sh", "--", "--ckpt_prefix", "ckpts/pod/resnet50").stdout
    assert "--worker=0" in consolidate and "-m\\ consolidate" in consolidate


def test_scripts_refuse_to_run_without_project_and_zone():
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    done = subprocess.run(["bash", str(ROOT / "tpu_scripts" / "create.sh"), "--dry-run"], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 2 and "--project and --zone" in done.stderr
