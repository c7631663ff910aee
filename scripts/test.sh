#!/usr/bin/env bash
# Set up .venv if needed, then run the whole test suite on CPU XLA devices.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
