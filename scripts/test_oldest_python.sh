#!/usr/bin/env bash
# Check the install on the oldest supported Python (3.10, the default TPU image's): a venv
# with it, `pip install -e ".[dev]"` (without jax, orbax and matplotlib, which need 3.11), and a
# few minutes of tests that need none of them: the layout, the options, a parity run at world
# size 4, the digits example through torch_xla.launch, the TPU path's collectives and the TPU
# scripts (85 tests, about 4 minutes on 2 busy cores once the venv exists).
#   bash scripts/test_oldest_python.sh            # finds python3.10 (or pyenv's 3.10.x)
#   OLDEST_PYTHON=/path/to/python3.10 bash scripts/test_oldest_python.sh
# The venv lives outside the checkout ($OLDEST_VENV, default $TMPDIR/xla_fsdp-venv310), so a
# second run only re-checks it. Without a Python 3.10 it says so and exits 0.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

find_python310() {
    local candidate
    for candidate in "${OLDEST_PYTHON:-}" python3.10 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10.*/bin/python; do
        if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

if ! python=$(find_python310); then
    echo "test_oldest_python.sh: no Python 3.10 on this machine; the install on 3.10 was NOT checked" >&2
    exit 0
fi
venv=${OLDEST_VENV:-${TMPDIR:-/tmp}/xla_fsdp-venv310}
echo "oldest Python: $("$python" --version) ($python), venv $venv"
PYTHON=$python VENV=$venv bash scripts/setup.sh
PYTHONPATH=$PWD "$venv/bin/python" -m pytest -q \
    tests/test_layout.py tests/test_options.py \
    "tests/test_parity.py::test_training_matches_unsharded_reference[4-zero3_manual-adamw]" \
    tests/test_examples.py::test_digits_example_takes_the_tpu_path_under_torch_xla_launch \
    tests/test_tpu_collectives.py tests/test_tpu_scripts.py tests/test_torch_xla_private.py \
    "tests/test_capture.py::test_captured_steps_equal_lazy_steps[world2-zero2-adamw-schedule-clip]"
