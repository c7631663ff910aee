#!/usr/bin/env bash
# Set up .venv if needed, then run the main job: digits CNN, nested FSDP on 4 CPU XLA devices, checkpoint, consolidate, evaluate.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/train_mnist_fsdp.py "$@"
