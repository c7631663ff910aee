#!/usr/bin/env bash
# Follow the log of the run that train.sh started (worker 0 unless --worker N); Ctrl-C stops
# following, not the run. --lines N prints the last N lines and returns.
#   tpu_scripts/logs.sh --project P --zone Z --name r50 [--worker 3] [--lines 50]
usage() { echo "usage: $0 [options] [--worker N] [--lines N]"; usage_common; }
worker=0; lines=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --worker) worker=$2; shift 2 ;;
        --lines) lines=$2; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "${args[@]}"
# shellcheck disable=SC2088  # the worker's shell expands the tilde
log="~/$RUNS_DIR/$TPU_NAME/train.log"
if [ -n "$lines" ]; then
    on_workers "$worker" "tail -n $(printf '%q' "$lines") $log"
else
    on_workers "$worker" "tail -n 100 -F $log"
fi
