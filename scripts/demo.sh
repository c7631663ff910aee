#!/usr/bin/env bash
# Set up the virtual environment (.venv, or $VENV) if needed, then run the main job: digits CNN, nested FSDP on 4 CPU XLA devices, checkpoint, consolidate, evaluate.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/python" examples/train_mnist_fsdp.py "$@"
