"""Cross-check xla_fsdp against an independent JAX implementation, step by step.

The same model, from the same weights, on the same batches, is trained with
xla_fsdp on N CPU XLA devices and with ``xla_fsdp.reference`` on N JAX CPU
devices, in two processes (both frameworks read ``XLA_FLAGS``). After every
step the two are compared on the loss, on every rank's reduce-scattered
gradient shard (rank r of xla_fsdp against shard r of the reference, which
derives its layout on its own: a unit's parameters flattened in torch's
element order, concatenated, padded to a multiple of the world size and
sliced; so a layout bug in xla_fsdp shows as a mismatch), and on the
parameters. The unsharded torch model trained on one device is shown beside
them.

Command line: ``python -m xla_fsdp.crosscheck --help``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["CrossCheckConfig", "Report", "TOLERANCES", "run_crosscheck"]

# [Note: cross-check tolerances]
# The two sides compute the same fp32 math with matmul precision "highest",
# but in different orders (XLA fuses and reduces differently for torch_xla's
# and JAX's graphs, and the collectives' reduction order may differ), so they
# differ by fp32 rounding. Each bound is an absolute one set from measurement:
# the largest |difference| seen (over elements, ranks and 3 steps) in the full
# grid of 72 runs (mlp/cnn/vit x world 2/4/8 x ZeRO-2 (SGD)/ZeRO-3 (AdamW) x
# grad-ckpt or not x flattened or not; torch 2.9.0, torch_xla 2.9.0, jax 0.10.2,
# 2-core x86 CPU, 2026-11-30), times about 3, rounded up. Relative bounds do
# not fit gradients: small elements come from cancellation, and their relative
# difference reached 5e-4 where the absolute one stayed below 9e-7. Flattened
# and unflattened runs differ alike (largest |Δ grad| 8.6e-7 both). For scale:
# gradient elements have a median |value| of ~1e-2, parameters up to 1.3. All
# five bounds are at or below PyTorch's fp32 atol (1e-5) and none needs its
# rtol; on another machine or version, measure again before loosening one.
TOLERANCES = {
    "loss": dict(rtol=0.0, atol=5e-6),             # vs JAX; largest 1.55e-6 (vit ZeRO-3 world 2 grad-ckpt)
    "grad": dict(rtol=0.0, atol=3e-6),             # vs JAX; largest 8.64e-7 (vit ZeRO-3 world 4)
    "param": dict(rtol=0.0, atol=1e-5),            # vs JAX; largest 2.98e-6 (vit ZeRO-3 world 4, AdamW)
    "unsharded_loss": dict(rtol=0.0, atol=1.5e-6),  # vs 1-device torch; largest 4.77e-7 (mlp ZeRO-3 world 2)
    "unsharded_param": dict(rtol=0.0, atol=1e-6),   # vs 1-device torch; largest 2.35e-7 (vit ZeRO-3 world 8)
}


@dataclass(frozen=True)
class CrossCheckConfig:
    model: str = "mlp"          # mlp, cnn or vit
    world_size: int = 4
    zero: int = 3               # 2 or 3
    optimizer: str = "sgd"      # sgd or adamw
    steps: int = 3
    grad_ckpt: bool = False
    flatten: bool = True        # flatten_parameters: one flat shard per unit, or one per parameter

    def __post_init__(self):
        from .models import MODELS
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.zero not in (2, 3):
            raise ValueError(f"zero must be 2 or 3, got {self.zero}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.world_size < 1 or self.steps < 1:
            raise ValueError(f"world_size and steps must be >= 1, got {self.world_size}, {self.steps}")

    def __str__(self):
        return (f"{self.model} ZeRO-{self.zero} world {self.world_size} {self.optimizer}"
                f"{' grad-ckpt' if self.grad_ckpt else ''}{'' if self.flatten else ' unflattened'}")


@dataclass
class StepRow:
    step: int
    torch_loss: float
    jax_loss: float
    unsharded_loss: float
    grad_diff: float          # max |torch shard - JAX shard| over ranks and shards
    param_diff: float         # max |torch - JAX| over shards after the step
    unsharded_param_diff: float
    failures: list[str]


@dataclass
class Report:
    config: CrossCheckConfig
    rows: list[StepRow]

    @property
    def ok(self) -> bool:
        return not any(row.failures for row in self.rows)

    def table(self) -> str:
        lines = [f"cross-check: {self.config}",
                 "| step | torch loss | JAX loss | unsharded torch loss | max|Δ grad shard| | max|Δ param| "
                 "| max|Δ param| vs unsharded | ok |",
                 "|---:|---:|---:|---:|---:|---:|---:|:--|"]
        for r in self.rows:
            lines.append(f"| {r.step} | {r.torch_loss:.7f} | {r.jax_loss:.7f} | {r.unsharded_loss:.7f} | "
                         f"{r.grad_diff:.2e} | {r.param_diff:.2e} | {r.unsharded_param_diff:.2e} | "
                         f"{'yes' if not r.failures else 'NO: ' + '; '.join(r.failures)} |")
        return "\n".join(lines)


def _excess(actual, expected, rtol, atol) -> float:
    """Largest |a - e| - (atol + rtol |e|); > 0 means out of tolerance."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected) - (atol + rtol * np.abs(expected)), initial=-np.inf))


def _compare(config: CrossCheckConfig, torch_out, jax_out) -> Report:
    """Compare the two sides' outputs. A shard is keyed by its first parameter's name, and
    ``members/KEY`` lists its parameters in flat order; ``ref_param`` is per parameter."""
    rows = []
    torch_keys = sorted(k.split("/", 2)[2] for k in torch_out if k.startswith("grad/0/"))
    jax_keys = sorted(k.split("/", 2)[2] for k in jax_out if k.startswith("grad/0/"))
    layout_failures = []
    if torch_keys != jax_keys:
        layout_failures.append(f"shards differ: torch {torch_keys}, JAX {jax_keys}")
    keys = [k for k in torch_keys if k in jax_keys]
    for key in keys:
        torch_members, jax_members = (out[f"members/{key}"].tolist() for out in (torch_out, jax_out))
        if torch_members != jax_members:
            layout_failures.append(f"parameters of shard {key} differ: torch {torch_members}, JAX {jax_members}")
    for step in range(config.steps):
        failures = list(layout_failures)
        t_loss, j_loss = float(torch_out[f"loss/{step}"]), float(jax_out[f"loss/{step}"])
        u_loss = float(torch_out[f"ref_loss/{step}"])
        if _excess(t_loss, j_loss, **TOLERANCES["loss"]) > 0:
            failures.append("loss vs JAX")
        if _excess(t_loss, u_loss, **TOLERANCES["unsharded_loss"]) > 0:
            failures.append("loss vs unsharded")
        grad_diff = param_diff = unsharded_diff = 0.0
        for key in keys:
            tg, jg = torch_out[f"grad/{step}/{key}"], jax_out[f"grad/{step}/{key}"]
            tp, jp = torch_out[f"param/{step}/{key}"], jax_out[f"param/{step}/{key}"]
            # The unsharded parameters, flattened in the reference's order of the shard.
            ref = np.concatenate([torch_out[f"ref_param/{step}/{name}"].reshape(-1)
                                  for name in jax_out[f"members/{key}"]])
            if tg.shape != jg.shape or tp.shape != jp.shape:
                failures.append(f"shard {key} has {tp.size} elements, JAX {jp.size}")
                continue
            grad_diff = max(grad_diff, float(np.max(np.abs(tg - jg))))
            param_diff = max(param_diff, float(np.max(np.abs(tp - jp))))
            unsharded_diff = max(unsharded_diff, float(np.max(np.abs(tp[:ref.size] - ref))))
            if _excess(tg, jg, **TOLERANCES["grad"]) > 0:
                failures.append(f"grad shard of {key}")
            if _excess(tp, jp, **TOLERANCES["param"]) > 0:
                failures.append(f"{key} vs JAX")
            if _excess(tp[:ref.size], ref, **TOLERANCES["unsharded_param"]) > 0:
                failures.append(f"{key} vs unsharded")
        rows.append(StepRow(step, t_loss, j_loss, u_loss, grad_diff, param_diff, unsharded_diff, failures))
    return Report(config, rows)


def _write_inputs(configs, workdir: Path) -> None:
    from .models import GLOBAL_BATCH, build, make_batches
    (workdir / "configs.json").write_text(json.dumps([dataclasses.asdict(c) for c in configs]))
    for index, c in enumerate(configs):
        params = dict(build(c.model).named_parameters())
        arrays = {f"param:{k}": v.detach().numpy() for k, v in params.items()}
        arrays["param_names"] = np.array(list(params))    # registration order
        for step, (x, y) in enumerate(make_batches(c.model, c.steps, GLOBAL_BATCH)):
            arrays[f"x_{step}"], arrays[f"y_{step}"] = x.numpy(), y.numpy()
        np.savez(workdir / f"inputs_{index}.npz", **arrays)


def _side_env(jax_devices: int | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PJRT_DEVICE", "CPU_NUM_DEVICES")}
    if jax_devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={jax_devices}"
        env["JAX_PLATFORMS"] = "cpu"
    return env


def run_crosscheck(configs: list[CrossCheckConfig], workdir: str | Path | None = None) -> list[Report]:
    """Run every config on both sides (two processes in all) and compare them."""
    with tempfile.TemporaryDirectory(prefix="xla_fsdp_crosscheck_") as tmp:
        work = Path(workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        _write_inputs(configs, work)
        max_world = max(c.world_size for c in configs)
        sides = [
            subprocess.Popen([sys.executable, "-m", "xla_fsdp.crosscheck._torch_side", str(work)],
                             env=_side_env(None), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
            subprocess.Popen([sys.executable, "-m", "xla_fsdp.crosscheck._jax_side", str(work)],
                             env=_side_env(max_world), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        ]
        for name, proc in zip(("torch", "JAX"), sides):
            output, _ = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"the {name} side of the cross-check failed (exit {proc.returncode}):\n"
                                   f"{output[-4000:]}")
        return [_compare(c, dict(np.load(work / f"torch_{i}.npz")), dict(np.load(work / f"jax_{i}.npz")))
                for i, c in enumerate(configs)]
