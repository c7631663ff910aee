"""python -m xla_fsdp.crosscheck: train with xla_fsdp and the JAX reference side by side."""

from __future__ import annotations

import argparse
import sys

from . import TOLERANCES, CrossCheckConfig, run_crosscheck
from .models import MODELS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xla_fsdp.crosscheck",
        description="Train the same model from the same weights on the same batches with xla_fsdp on N CPU "
                    "XLA devices and with the JAX reference FSDP on N JAX CPU devices, and compare loss, "
                    "every rank's gradient shard and the parameters after each step. Exits 1 when a "
                    f"tolerance is exceeded. Tolerances: {TOLERANCES}.")
    parser.add_argument("--model", choices=MODELS, default="mlp", help="which model to train")
    parser.add_argument("--world-size", type=int, default=4, help="devices (ranks) on each side")
    parser.add_argument("--zero", type=int, choices=(2, 3), default=3,
                        help="2: root wrap only; 3: one FSDP unit per layer, resharded after forward")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                        help="SGD with momentum or AdamW, same formulas on both sides")
    parser.add_argument("--steps", type=int, default=3, help="training steps to compare")
    parser.add_argument("--grad-ckpt", action="store_true",
                        help="gradient checkpointing of every layer (checkpoint_module / jax.checkpoint)")
    parser.add_argument("--flatten", action=argparse.BooleanOptionalAction, default=True,
                        help="flatten_parameters: one flat shard per FSDP unit (the default), or one per parameter")
    args = parser.parse_args(argv)
    try:
        config = CrossCheckConfig(args.model, args.world_size, args.zero, args.optimizer, args.steps,
                                  args.grad_ckpt, args.flatten)
    except ValueError as exc:
        parser.error(str(exc))
    report = run_crosscheck([config])[0]
    print(report.table())
    print("PASS" if report.ok else "FAIL: tolerance exceeded")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
