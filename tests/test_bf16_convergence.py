"""Pure bf16 with BF16AdamW trains like fp32: the reduced run of benchmarks/bf16_convergence.py.

The reduction (``QUICK`` there): the digits demo for 4 epochs at world size 2
from two seeds, fp32 against pure bf16 with Kahan compensation; a one-block LM
for 120 steps with warm-up and decay, fp32, Kahan and plain torch AdamW on bf16
parameters. Plain AdamW must miss the 1% target here, or the LM comparison
could not tell a working compensation from a broken one.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KAHAN = "pure bf16, BF16AdamW (kahan)"


def test_pure_bf16_with_compensated_adamw_matches_fp32_on_digits_and_an_lm(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CPU_NUM_DEVICES", "PJRT_DEVICE", "XLA_FLAGS")}
    done = subprocess.run([sys.executable, "-m", "benchmarks.bf16_convergence", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "bf16_convergence_quick.json").read_text())
    digits, lm = results["digits"], results["lm"]

    assert digits["fp32"]["accuracy"] >= 0.9                       # the reduced run still learns the digits
    assert 100 * (digits["fp32"]["accuracy"] - digits[KAHAN]["accuracy"]) <= 0.5
    fp32_loss = lm["fp32"]["held_out_loss"]
    assert fp32_loss < math.log(results["settings"]["lm_vocab"]) - 1.0  # learned: a nat under a uniform guess
    assert lm[KAHAN]["held_out_loss"] <= 1.01 * fp32_loss
    assert lm["pure bf16, torch AdamW"]["held_out_loss"] > 1.01 * fp32_loss
    assert results["verdicts"]["digits_ok"] and results["verdicts"]["lm_ok"]
    assert "| pure bf16, BF16AdamW (kahan) | 10 |" in (tmp_path / "bf16_convergence_quick.md").read_text()
