#!/usr/bin/env bash
# Set up the virtual environment (.venv, or $VENV; see setup.sh) if needed, then run the whole test suite on CPU XLA devices.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/python" -m pytest -q "$@"
