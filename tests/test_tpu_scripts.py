"""tpu_scripts/ against a stand-in ``gcloud`` that records its calls and plays the TPU VM workers.

The stand-in runs each ``ssh --command`` with bash in a folder per worker (its
HOME), in a session of its own, and sends that session SIGHUP when the command
returns, as sshd does when a connection closes. ``scp`` copies between here and
those folders. On the workers a stand-in ``python3`` records its calls, makes
the file ``-m consolidate --save_path`` names, and plays a training run.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted([*(ROOT / "tpu_scripts").glob("*.sh"), *(ROOT / "tpu_scripts" / "worker").glob("*.sh")])

FAKE_GCLOUD = r"""#!/usr/bin/env bash
set -euo pipefail
{ printf '%q ' "$@"; printf '\n'; } >>"$FAKE_GCLOUD_LOG"
[ "$1 $2 $3" = "compute tpus tpu-vm" ] || { echo "stand-in gcloud: unexpected $*" >&2; exit 3; }
verb=$4
shift 4
worker=""; command=""; positional=()
for a in "$@"; do
    case "$a" in
        --worker=*) worker=${a#--worker=} ;;
        --command=*) command=${a#--command=} ;;
        --*) ;;
        *) positional+=("$a") ;;
    esac
done
case "$verb" in create|delete) exit 0 ;; esac
if [ "$worker" = all ]; then workers=$(seq 0 $((FAKE_TPU_WORKERS - 1))); else workers=$worker; fi
remote() {  # NAME:PATH on worker $1 -> a path here
    local path=${2#*:}
    path=${path#\~/}
    case "$path" in /*) echo "$path" ;; *) echo "$FAKE_TPU_ROOT/worker-$1/$path" ;; esac
}
for w in $workers; do
    home=$FAKE_TPU_ROOT/worker-$w
    mkdir -p "$home"
    case "$verb" in
        ssh)
            # A session of its own, hung up when the command returns, as sshd does.
            (cd "$home" && HOME=$home PATH=$FAKE_WORKER_BIN:$PATH exec setsid bash -c "$command") &
            session=$!
            status=0
            wait "$session" || status=$?
            kill -HUP -- "-$session" 2>/dev/null || true
            [ "$status" = 0 ] || exit "$status"
            ;;
        scp)
            src=${positional[0]}; dst=${positional[1]}
            if [[ "$src" == *:* ]]; then cp -r "$(remote "$w" "$src")" "$dst"
            else cp -r "$src" "$(remote "$w" "$dst")"; fi
            ;;
    esac
done
"""

FAKE_PYTHON = r"""#!/usr/bin/env bash
{ printf 'PJRT_DEVICE=%s ' "${PJRT_DEVICE:-}"; printf '%q ' "$@"; printf '\n'; } >>"$HOME/python3-calls"
case "${1:-}" in
    -m)
        if [ "$2" = consolidate ]; then
            while [ $# -gt 0 ]; do
                [ "$1" = --save_path ] && mkdir -p "$(dirname "$2")" && echo consolidated >"$2"
                shift
            done
        fi
        exit 0 ;;
    -c) exit 0 ;;
esac
echo "training $* with PJRT_DEVICE=$PJRT_DEVICE"
if [ -n "${FAKE_TRAIN_UNTIL:-}" ]; then  # "training" lasts until the test creates this file (2 minutes at most)
    for _ in $(seq 1200); do [ -e "$FAKE_TRAIN_UNTIL" ] && break; sleep 0.1; done
fi
echo "training done"
"""


# Whatever else a worker command might reach for is recorded and goes no further.
FAKE_TOOL = r"""#!/usr/bin/env bash
{ printf '%s ' "$(basename "$0")"; printf '%q ' "$@"; printf '\n'; } >>"$HOME/tool-calls"
"""
WORKER_TOOLS = ("pip", "pip3", "sudo", "curl", "apt-get", "gcsfuse")


class Cloud:
    """The stand-in's folders, environment and record of calls."""

    def __init__(self, tmp_path: Path, workers: int):
        self.root = tmp_path / "workers"
        self.bin = tmp_path / "bin"
        worker_bin = tmp_path / "worker-bin"
        for folder, name, text in ((self.bin, "gcloud", FAKE_GCLOUD), (worker_bin, "python3", FAKE_PYTHON),
                                   *((worker_bin, tool, FAKE_TOOL) for tool in WORKER_TOOLS)):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
            (folder / name).chmod(0o755)
        self.log = tmp_path / "gcloud-calls"
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("TPU_")},
                    "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}", "FAKE_GCLOUD_LOG": str(self.log),
                    "FAKE_TPU_ROOT": str(self.root), "FAKE_TPU_WORKERS": str(workers),
                    "FAKE_WORKER_BIN": str(worker_bin), "TPU_PROJECT": "proj", "TPU_ZONE": "us-central2-b"}

    def run(self, script: str, *args, check=True, **env) -> subprocess.CompletedProcess:
        done = subprocess.run(["bash", str(ROOT / "tpu_scripts" / script), *map(str, args)], capture_output=True,
                              text=True, env={**self.env, **env}, timeout=120)
        if check:
            assert done.returncode == 0, done.stdout + done.stderr
        return done

    def calls(self) -> list[list[str]]:
        return [shlex.split(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def worker(self, w: int) -> Path:
        return self.root / f"worker-{w}"


def _running(group: int) -> list[int]:
    """Processes of a process group that have not ended (zombies left to an absent reaper count as ended)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def _option(call: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in call if a.startswith(f"--{name}="))


def test_install_copies_only_the_sources_to_every_worker_of_a_pod_and_is_idempotent(tmp_path):
    cloud = Cloud(tmp_path, workers=4)
    listed = set(subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.split())
    listed = {f for f in listed if (ROOT / f).exists()}
    for _ in range(2):
        cloud.run("install.sh", "--name", "pod", "--accelerator-type", "v4-32")
    scp, ssh = [c for c in cloud.calls() if c[3] == "scp"], [c for c in cloud.calls() if c[3] == "ssh"]
    assert len(scp) == len(ssh) == 2
    assert all(_option(c, "worker") == "all" and _option(c, "project") == "proj" for c in scp + ssh)
    assert all(c[4] == "pod" for c in ssh) and all(c[5] == "pod:xla_fsdp-src.tar.gz" for c in scp)
    for w in range(4):
        copied = {str(p.relative_to(cloud.worker(w) / "xla_fsdp")) for p in (cloud.worker(w) / "xla_fsdp").rglob("*")
                  if p.is_file()}
        assert copied == listed  # no .venv, no caches, no nested copy after the second run
        assert not (cloud.worker(w) / "xla_fsdp-src.tar.gz").exists()
        pip = [c for c in (cloud.worker(w) / "python3-calls").read_text().splitlines() if " pip install " in c]
        assert len(pip) == 2
        assert all(p in pip[0] for p in ("torch==2.9.0", "torch_xla\\[tpu\\]==2.9.0", "-e .\\[examples\\]"))


def test_install_with_a_bucket_mounts_it_on_every_worker(tmp_path):
    cloud = Cloud(tmp_path, workers=4)
    done = cloud.run("install.sh", "--name", "pod", "--accelerator-type", "v4-32", "--bucket", "gs://my-bucket/",
                     "--dry-run")
    ssh = [line for line in done.stdout.splitlines() if " ssh " in line]
    assert len(ssh) == 1 and "--worker=all" in ssh[0]
    assert "tpu_scripts/worker/setup.sh\\ --bucket\\ my-bucket" in ssh[0]
    setup = (ROOT / "tpu_scripts" / "worker" / "setup.sh").read_text()
    assert 'gcsfuse --implicit-dirs "$bucket" "$mount_point"' in setup and "mount_point=/mnt/xla_fsdp" in setup


def test_train_runs_in_the_background_on_every_worker_and_its_log_survives_the_ssh_session(tmp_path):
    cloud = Cloud(tmp_path, workers=2)
    cloud.run("install.sh", "--name", "vm")
    release = tmp_path / "release"
    start = time.monotonic()
    cloud.run("train.sh", "--name", "vm", "--", "examples/train_mnist_fsdp.py", "--num_epochs", "5",
              FAKE_TRAIN_UNTIL=str(release))
    # The runs wait for `release`, up to 2 minutes; train.sh waiting for them would take that long.
    assert time.monotonic() - start < 60, "train.sh waited for the run"
    ssh = cloud.calls()[-1]
    assert ssh[3] == "ssh" and _option(ssh, "worker") == "all"
    for w in range(2):
        run_dir = cloud.worker(w) / "xla_fsdp_runs" / "vm"
        assert _running(int((run_dir / "pid").read_text())), "the run ended with the ssh session"
    release.touch()
    deadline = time.monotonic() + 60
    for w in range(2):
        log = cloud.worker(w) / "xla_fsdp_runs" / "vm" / "train.log"
        while "exit status" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert log.read_text().splitlines() == [
            "training examples/train_mnist_fsdp.py --num_epochs 5 with PJRT_DEVICE=TPU", "training done",
            "exit status 0"]
    follow = cloud.run("logs.sh", "--name", "vm", "--lines", "2").stdout
    assert follow.splitlines() == ["training done", "exit status 0"]
    assert _option(cloud.calls()[-1], "worker") == "0"


def test_stop_ends_the_run_on_every_worker(tmp_path):
    cloud = Cloud(tmp_path, workers=2)
    cloud.run("install.sh", "--name", "vm")
    cloud.run("train.sh", "--name", "vm", "--", "examples/train_mnist_fsdp.py",
              FAKE_TRAIN_UNTIL=str(tmp_path / "never"))   # stopped below
    groups = [int((cloud.worker(w) / "xla_fsdp_runs" / "vm" / "pid").read_text()) for w in range(2)]
    assert all(_running(g) for g in groups)
    again = cloud.run("train.sh", "--name", "vm", "--", "examples/train_mnist_fsdp.py", check=False)
    assert again.returncode != 0 and "a run is still going" in again.stderr
    out = cloud.run("stop.sh", "--name", "vm").stdout
    assert out.count("stopped process group") == 2 and _option(cloud.calls()[-1], "worker") == "all"
    deadline = time.monotonic() + 10
    while any(_running(g) for g in groups) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_running(g) for g in groups)


def test_train_recipe_on_one_host_uses_the_documented_torch_xla_command(tmp_path):
    cloud = Cloud(tmp_path, workers=1)
    out = cloud.run("train.sh", "--name", "r50", "--accelerator-type", "v3-8", "--recipe", "resnet50-v3-8",
                    "--datadir", "/data/imagenet", "--dry-run").stdout
    command = _option(shlex.split(out.splitlines()[0]), "command")
    assert "--worker=all" in out
    argv = shlex.split(command.split("worker/start.sh ", 1)[1])
    assert argv[:3] == ["~/xla_fsdp_runs/r50", "python3", "examples/train_imagenet_fsdp.py"]
    flags = " ".join(argv[3:])
    for flag in ("--datadir /data/imagenet --drop_last --model resnet50 --test_set_batch_size 64 --eval_interval 10",
                 "--lr 0.4 --batch_size 128 --num_warmup_epochs 5 --lr_scheduler_divide_every_n_epochs 30",
                 "--lr_scheduler_divisor 10 --num_epochs 100 --use_nested_fsdp", "--ckpt_dir ckpts/r50"):
        assert flag in flags


def test_train_on_a_pod_needs_shared_storage_and_checks_its_mount(tmp_path):
    cloud = Cloud(tmp_path, workers=4)
    refused = cloud.run("train.sh", "--name", "pod", "--accelerator-type", "v4-32", "--recipe", "vit-pod",
                        "--datadir", "/mnt/xla_fsdp/imagenet", check=False)
    assert refused.returncode == 2 and "v4-32 has 4 hosts: give --bucket" in refused.stderr
    assert cloud.calls() == []
    out = cloud.run("train.sh", "--name", "pod", "--accelerator-type", "v4-32", "--bucket", "b", "--recipe",
                    "vit-pod", "--datadir", "/mnt/xla_fsdp/imagenet", "--dry-run").stdout
    command = _option(shlex.split(out.splitlines()[0]), "command")
    assert "--worker=all" in out and command.startswith("mountpoint -q /mnt/xla_fsdp ||")
    assert "--ckpt_dir /mnt/xla_fsdp/ckpts/pod" in command and "--compute_dtype bfloat16" in command


def test_consolidate_runs_on_worker_0_and_copies_the_result_back(tmp_path):
    cloud = Cloud(tmp_path, workers=1)
    cloud.run("install.sh", "--name", "vm")
    dest = tmp_path / "here"
    out = cloud.run("consolidate.sh", "--name", "vm", "--ckpt_prefix", "runs/r50/resnet50", "--dest", dest,
                    "--", "--optimizer").stdout
    ssh = next(c for c in cloud.calls() if c[3] == "ssh" and "consolidate" in _option(c, "command"))
    assert _option(ssh, "worker") == "0"
    call = (cloud.worker(0) / "python3-calls").read_text().splitlines()[-1]
    assert shlex.split(call)[1:] == ["-m", "consolidate", "--ckpt_prefix", "runs/r50/resnet50", "--ckpt_suffix",
                                     "_rank-*.pth", "--verify", "--overwrite", "--save_path",
                                     "runs/r50/resnet50_consolidated.pth", "--optimizer"]
    assert (dest / "resnet50_consolidated.pth").read_text() == "consolidated\n"
    assert f"copied to {dest}/resnet50_consolidated.pth" in out


def test_scripts_refuse_to_run_without_project_and_zone():
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    done = subprocess.run(["bash", str(ROOT / "tpu_scripts" / "create.sh"), "--dry-run"], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 2 and "--project and --zone" in done.stderr


def test_create_asks_for_the_default_tpu_image(tmp_path):
    cloud = Cloud(tmp_path, workers=1)
    cloud.run("create.sh", "--name", "pod", "--accelerator-type", "v4-32")
    assert cloud.calls() == [["compute", "tpus", "tpu-vm", "create", "pod", "--project=proj",
                              "--zone=us-central2-b", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]]


def test_tpu_scripts_pass_shellcheck():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    done = subprocess.run([str(shellcheck), "-x", *map(str, SCRIPTS)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
