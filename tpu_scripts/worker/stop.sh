#!/usr/bin/env bash
# On a TPU VM worker (run by stop.sh): stop the run started in RUN_DIR by worker/start.sh.
#   bash ~/xla_fsdp/tpu_scripts/worker/stop.sh RUN_DIR
set -euo pipefail
run_dir=$1
if [ ! -f "$run_dir/pid" ]; then
    echo "$(hostname): no run in $run_dir"
    exit 0
fi
group=$(cat "$run_dir/pid")
if kill -TERM -- "-$group" 2>/dev/null; then
    echo "$(hostname): stopped process group $group"
else
    echo "$(hostname): process group $group had already ended"
fi
