#!/usr/bin/env bash
# Stop the run that train.sh started, on every worker (its whole process group: torch_xla's
# worker processes too). The log stays in ~/xla_fsdp_runs/NAME/train.log.
#   tpu_scripts/stop.sh --project P --zone Z --name r50
usage() { echo "usage: $0 [options]"; usage_common; }
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
on_workers all "bash ~/$REPO_DIR/tpu_scripts/worker/stop.sh ~/$RUNS_DIR/$TPU_NAME"
