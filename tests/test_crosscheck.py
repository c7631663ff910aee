"""xla_fsdp agrees with the independent JAX reference, step by step.

All configurations run in one cross-check (one torch process, one JAX
process), shared by the tests below; each test checks one configuration.
"""

import itertools

import numpy as np
import pytest

from xla_fsdp.crosscheck import CrossCheckConfig, _compare, run_crosscheck
from xla_fsdp.crosscheck.__main__ import main

MODELS, WORLDS, ZEROS = ("mlp", "cnn", "vit"), (2, 4, 8), (2, 3)
# Every (model, world size, ZeRO stage) runs twice, flattened and unflattened,
# once with gradient checkpointing: (no ckpt, flat) + (ckpt, unflat), or
# (no ckpt, unflat) + (ckpt, flat), alternating, so that each (ckpt, flatten)
# pair meets every model, world size and ZeRO stage. 36 runs, as many as before
# the flattened path was added; the full grid of 72 measured the tolerances.
PAIRINGS = (((False, True), (True, False)), ((False, False), (True, True)))
CONFIGS = [CrossCheckConfig(model, world, zero, "adamw" if zero == 3 else "sgd", steps=3, grad_ckpt=ckpt,
                            flatten=flatten)
           for (m, model), (w, world), zero in itertools.product(enumerate(MODELS), enumerate(WORLDS), ZEROS)
           for ckpt, flatten in PAIRINGS[(m + w + zero) % 2]]


@pytest.fixture(scope="module")
def reports():
    return {report.config: report for report in run_crosscheck(CONFIGS)}


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_xla_fsdp_matches_the_jax_reference(reports, config):
    report = reports[config]
    assert report.ok, "\n" + report.table()
    assert len(report.rows) == config.steps


def test_a_difference_beyond_tolerance_is_reported():
    config = CrossCheckConfig("mlp", 2, 3, "sgd", steps=1)
    same = {"loss/0": np.float64(1.0), "ref_loss/0": np.float64(1.0), "members/w": np.array(["w"]),
            "grad/0/w": np.zeros(4, np.float32), "param/0/w": np.ones(4, np.float32),
            "ref_param/0/w": np.ones(3, np.float32)}
    assert _compare(config, same, dict(same)).ok
    off = dict(same, **{"grad/0/w": np.array([0, 0, 0, 1e-3], np.float32)})
    report = _compare(config, same, off)
    assert not report.ok and report.rows[0].failures == ["grad shard of w"]


def test_a_different_shard_layout_is_reported():
    # A flat shard of w (3 elements) and b (1): padded to 4 over 2 ranks.
    config = CrossCheckConfig("mlp", 2, 3, "sgd", steps=1)
    jax_out = {"loss/0": np.float64(1.0), "members/w": np.array(["w", "b"]),
               "grad/0/w": np.zeros(4, np.float32), "param/0/w": np.array([1, 2, 3, 4], np.float32)}
    torch_out = dict(jax_out, **{"ref_loss/0": np.float64(1.0), "ref_param/0/w": np.array([1, 2, 3], np.float32),
                                 "ref_param/0/b": np.array([4], np.float32)})
    assert _compare(config, torch_out, jax_out).ok
    reordered = dict(torch_out, **{"members/w": np.array(["b", "w"])})
    assert _compare(config, reordered, jax_out).rows[0].failures == [
        "parameters of shard w differ: torch ['b', 'w'], JAX ['w', 'b']"]
    padded_more = dict(torch_out, **{"grad/0/w": np.zeros(6, np.float32), "param/0/w": np.arange(6, dtype=np.float32)})
    assert _compare(config, padded_more, jax_out).rows[0].failures == ["shard w has 6 elements, JAX 4"]


def test_the_command_line_exits_non_zero_on_failure(monkeypatch, capsys):
    config = CrossCheckConfig("mlp", 2, 3, "sgd", steps=1)
    torch_out = {"loss/0": np.float64(1.0), "ref_loss/0": np.float64(1.0), "members/w": np.array(["w"]),
                 "grad/0/w": np.zeros(2, np.float32), "param/0/w": np.zeros(2, np.float32),
                 "ref_param/0/w": np.zeros(2, np.float32)}
    jax_out = dict(torch_out, **{"loss/0": np.float64(1.1)})
    monkeypatch.setattr("xla_fsdp.crosscheck.__main__.run_crosscheck",
                        lambda configs: [_compare(config, torch_out, jax_out)])
    assert main(["--model", "mlp", "--world-size", "2", "--steps", "1"]) == 1
    assert "FAIL" in capsys.readouterr().out
