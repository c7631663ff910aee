#!/usr/bin/env bash
# On a TPU VM worker (run by train.sh): start a training command in the background, in a
# session of its own, so that it survives the ssh session that started it.
#   bash ~/xla_fsdp/tpu_scripts/worker/start.sh RUN_DIR COMMAND...
# Runs COMMAND from the project folder with PJRT_DEVICE=TPU; its output goes to
# RUN_DIR/train.log (ending with its exit status), its process group id to RUN_DIR/pid.
set -euo pipefail
run_dir=$(mkdir -p "$1" && cd "$1" && pwd)
shift
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if [ -f "$run_dir/pid" ] && kill -0 -- "-$(cat "$run_dir/pid")" 2>/dev/null; then
    echo "error: a run is still going in $run_dir (process group $(cat "$run_dir/pid")); stop it first" >&2
    exit 1
fi
rm -f "$run_dir/pid"
# setsid: a new session and process group, so neither the ssh session's end (SIGHUP) nor
# its process group reaches the run; the inner shell leads that group and records its id,
# and stop.sh kills the whole group (torch_xla's worker processes too).
# shellcheck disable=SC2016  # $$, $0, $@ and $? belong to the inner shell
PJRT_DEVICE=TPU setsid nohup bash -c 'echo $$ >"$0/pid"; "$@"; echo "exit status $?"' "$run_dir" "$@" \
    >"$run_dir/train.log" 2>&1 </dev/null &
for _ in $(seq 50); do [ -s "$run_dir/pid" ] && break; sleep 0.1; done
echo "$(hostname): started process group $(cat "$run_dir/pid" 2>/dev/null || echo '?') in $run_dir; log: $run_dir/train.log"
