#!/usr/bin/env bash
# Set up .venv if needed, then run the main job: nested FSDP training on 4 CPU XLA devices.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo_nested_fsdp.py "$@"
