#!/usr/bin/env bash
# Create .venv (Python 3.11) with this project and its pinned dependencies.
# Idempotent: a second run only re-checks the installation. Sourced by the
# demo and test scripts; run it alone to prepare a machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.xla_fsdp-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    # The first install pulls torch 2.9.0 with its CUDA wheels (~7 GB, ~2 min);
    # they are inert on a CPU machine.
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[dev]"
    touch "$stamp"
fi
