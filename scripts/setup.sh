#!/usr/bin/env bash
# Create a virtual environment with this project and its pinned dependencies.
#   bash scripts/setup.sh                                      # .venv, with python3.11 (else python3)
#   PYTHON=python3.10 VENV=/tmp/venv310 bash scripts/setup.sh  # any Python from 3.10 to 3.13, anywhere
# Idempotent: a second run only re-checks the installation. Run by the demo and
# test scripts; run it alone to prepare a machine. On Python 3.10 the dev extra
# leaves out jax, orbax and matplotlib, which need 3.11 (see pyproject.toml).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${VENV:-.venv}
if [ -n "${PYTHON:-}" ]; then
    # `command -v` is not enough: a pyenv shim exists for versions it will not run.
    if ! "$PYTHON" -c "" >/dev/null 2>&1; then
        echo "setup.sh: PYTHON=$PYTHON does not run here (with pyenv: PYENV_VERSION=3.10.13 or its full path)" >&2
        exit 2
    fi
elif python3.11 -c "" >/dev/null 2>&1; then
    PYTHON=python3.11
else
    PYTHON=python3
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
stamp=$VENV/.xla_fsdp-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    # The first install pulls torch 2.9.0 with its CUDA wheels (~7 GB, ~2 min);
    # they are inert on a CPU machine.
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e ".[dev]"
    touch "$stamp"
fi
