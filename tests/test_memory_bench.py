"""python -m benchmarks.memory_bench --quick: a well-formed report whose figures agree with each other."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._memory_side import BASELINE, MODES, TORCH_XLA  # noqa: E402

OFFLOAD_FP32, OFFLOAD_BF16, OFFLOAD_PURE = "offload, fp32 compute", "offload, bf16 compute", "offload, pure bf16"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory_bench")
    env = {k: v for k, v in os.environ.items() if k not in ("CPU_NUM_DEVICES", "PJRT_DEVICE", "XLA_FLAGS")}
    done = subprocess.run([sys.executable, "-m", "benchmarks.memory_bench", "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = {r["mode"]["name"]: r for r in json.loads((out / "memory_bench_quick.json").read_text())["4"]}
    return rows, (out / "memory_bench_quick.md").read_text()


def _worst(row, key):
    return max(r[key] for r in row["per_rank"])


def test_report_has_a_row_per_mode_and_the_fit_table(quick_run):
    rows, text = quick_run
    assert list(rows) == [m.name for m in MODES]
    assert "Machine: " in text and "torch_xla 2.9.0" in text
    table = [line for line in text.split("## World size 4")[1].split("##")[0].splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == [m.name for m in MODES]
    for line, row in zip(table[1:], rows.values()):
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert len(cells) == 12
        assert float(cells[1]) == pytest.approx(_worst(row, "live_device_bytes") / row["params"], abs=5e-4)
    fp32_row = next(line for line in table if line.startswith(f"| {BASELINE} |"))
    assert fp32_row.split("|")[8].strip() == "1.00"     # step time x fp32, for fp32 itself
    assert "### v4-8" in text and "cloud.google.com/tpu/docs" in text


def test_offload_leaves_at_most_a_tenth_of_fp32_fsdps_device_bytes(quick_run):
    rows, _ = quick_run
    fp32 = _worst(rows[BASELINE], "live_device_bytes")
    assert fp32 > 0
    for name in (OFFLOAD_FP32, OFFLOAD_BF16, OFFLOAD_PURE):
        assert _worst(rows[name], "live_device_bytes") <= 0.1 * fp32, name
        assert rows[name]["param_devices"] == ["cpu"]


def test_every_named_state_tensor_is_among_the_live_ones(quick_run):
    rows, _ = quick_run
    for name, row in rows.items():
        for rank in row["per_rank"]:
            assert rank["state_device_bytes"] <= rank["live_device_bytes"], name
    # Each mode runs in a process of its own: it starts with nothing on the device.
    assert all(rank["live_before_bytes"] == 0 for row in rows.values() for rank in row["per_rank"])


def test_host_and_transfer_bytes_agree_with_the_shards(quick_run):
    rows, _ = quick_run
    for name, row in rows.items():
        if row["mode"]["cpu_offload"]:
            continue
        assert all(r["host_bytes"] == 0 and r["transfer_bytes"] == 0 for r in row["per_rank"]), name
    # Same fp32 shards and AdamW: what fp32 keeps on the device, offload keeps on the host.
    for fsdp, offload, offload_bf16 in zip(rows[BASELINE]["per_rank"], rows[OFFLOAD_FP32]["per_rank"],
                                           rows[OFFLOAD_BF16]["per_rank"]):
        assert offload["host_bytes"] == fsdp["state_device_bytes"] == offload_bf16["host_bytes"]
        # Host: parameter + gradient + two moments, 16 B per shard element. Transfers: the shard up and its
        # gradient down, 4 + 4 B per element in fp32 and 2 + 2 B in bf16.
        assert offload["host_bytes"] == 2 * offload["transfer_bytes"] == 4 * offload_bf16["transfer_bytes"]
    # Pure bf16 on the host: parameter, gradient, two moments and the Kahan buffer, 2 B each per element.
    for fsdp, pure, offload_bf16 in zip(rows[BASELINE]["per_rank"], rows[OFFLOAD_PURE]["per_rank"],
                                        rows[OFFLOAD_BF16]["per_rank"]):
        assert 16 * pure["host_bytes"] == 10 * fsdp["state_device_bytes"]
        assert pure["transfer_bytes"] == offload_bf16["transfer_bytes"]


def test_bf16_compute_gathers_in_bf16_and_pure_bf16_stores_bf16(quick_run):
    rows, _ = quick_run
    fp32, bf16 = rows[BASELINE]["collective_bytes_per_rank"], rows["bf16 compute"]["collective_bytes_per_rank"]
    assert "all-gather f32" in fp32["dtypes"] and "all-gather bf16" not in fp32["dtypes"]
    assert "all-gather bf16" in bf16["dtypes"] and "all-gather f32" not in bf16["dtypes"]
    assert bf16["all-gather"] == pytest.approx(fp32["all-gather"] / 2, rel=0.01)
    assert rows["pure bf16"]["param_dtypes"] == ["torch.bfloat16"]
    pure, fp32_state = _worst(rows["pure bf16"], "state_device_bytes"), _worst(rows[BASELINE], "state_device_bytes")
    assert pure < fp32_state
    assert rows[TORCH_XLA]["collective_bytes_per_rank"]["all-gather"] > 0
