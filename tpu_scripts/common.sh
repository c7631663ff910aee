#!/usr/bin/env bash
# Shared by the tpu_scripts: option parsing, dry-run, worker selection. Sourced, not run.
#
# Every script takes these, as flags or environment variables:
#   --project  / TPU_PROJECT           Google Cloud project
#   --zone     / TPU_ZONE              e.g. europe-west4-a (v3), us-central2-b (v4)
#   --accelerator-type / TPU_TYPE      v3-8, v4-8, v4-32, ...
#   --name     / TPU_NAME              the TPU VM (or pod slice) name
#   --bucket   / TPU_BUCKET            a Cloud Storage bucket that install.sh mounts with gcsfuse
#                                      at /mnt/xla_fsdp on every worker (storage a pod's workers share)
#   --dry-run  / TPU_DRY_RUN=1         print the commands instead of running them
# and passes anything after "--" to the script's own command.

set -euo pipefail

TPU_PROJECT=${TPU_PROJECT:-}
TPU_ZONE=${TPU_ZONE:-}
TPU_TYPE=${TPU_TYPE:-v3-8}
TPU_NAME=${TPU_NAME:-xla-fsdp}
TPU_BUCKET=${TPU_BUCKET:-}
TPU_DRY_RUN=${TPU_DRY_RUN:-0}
TPU_RUNTIME=${TPU_RUNTIME:-tpu-ubuntu2204-base}
# On every worker: the sources (replaced by install.sh), the bucket's mount point,
# and the per-run folders with their logs (outside the sources, so a reinstall keeps them).
# shellcheck disable=SC2034  # read by the scripts that source this file
REPO_DIR=xla_fsdp
SHARED_MOUNT=/mnt/xla_fsdp
# shellcheck disable=SC2034
RUNS_DIR=xla_fsdp_runs
# shellcheck disable=SC2034
EXTRA_ARGS=()

usage_common() {
    cat <<USAGE
  --project ID            Google Cloud project (TPU_PROJECT)
  --zone ZONE             zone of the TPU (TPU_ZONE)
  --accelerator-type T    v3-8, v4-8, v4-32, ... (TPU_TYPE, default v3-8)
  --name NAME             TPU VM name (TPU_NAME, default xla-fsdp)
  --bucket BUCKET         Cloud Storage bucket mounted at $SHARED_MOUNT on every worker (TPU_BUCKET);
                          a pod slice needs it (or another shared mount) for checkpoints
  --dry-run               print the gcloud commands instead of running them (TPU_DRY_RUN=1)
  -h, --help              this help
USAGE
}

# shellcheck disable=SC2034  # EXTRA_ARGS is read by the scripts that source this file
parse_common() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --project) TPU_PROJECT=$2; shift 2 ;;
            --zone) TPU_ZONE=$2; shift 2 ;;
            --accelerator-type) TPU_TYPE=$2; shift 2 ;;
            --name) TPU_NAME=$2; shift 2 ;;
            --bucket) TPU_BUCKET=$2; shift 2 ;;
            --dry-run) TPU_DRY_RUN=1; shift ;;
            -h|--help) usage; exit 0 ;;
            --) shift; EXTRA_ARGS=("$@"); break ;;
            *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
        esac
    done
    if [ -z "$TPU_PROJECT" ] || [ -z "$TPU_ZONE" ]; then
        echo "error: --project and --zone (or TPU_PROJECT and TPU_ZONE) are required" >&2
        exit 2
    fi
    TPU_BUCKET=${TPU_BUCKET#gs://}
    TPU_BUCKET=${TPU_BUCKET%/}
}

# num_hosts: how many TPU VM workers the accelerator type has. v2/v3/v4/v5p names
# count TensorCores, 8 per host (v3-8: 1 host; v4-32: 16 chips on 4 hosts).
num_hosts() {
    local cores=${TPU_TYPE##*-}
    case "$TPU_TYPE" in
        v2-*|v3-*|v4-*|v5p-*) echo $(( cores > 8 ? cores / 8 : 1 )) ;;
        *) echo "error: num_hosts does not know $TPU_TYPE; use a v2, v3, v4 or v5p type" >&2; exit 2 ;;
    esac
}

# run CMD...: run it, or print it with --dry-run.
run() {
    if [ "$TPU_DRY_RUN" = 1 ]; then
        printf '%q ' "$@"
        printf '\n'
    else
        "$@"
    fi
}

# on_workers WORKERS COMMAND: run a shell command on TPU VM workers ("all" or an index).
on_workers() {
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$TPU_PROJECT" --zone="$TPU_ZONE" \
        --worker="$1" --command="$2"
}

# copy_to_workers WORKERS LOCAL REMOTE / copy_from_worker WORKER REMOTE LOCAL: gcloud scp.
copy_to_workers() {
    run gcloud compute tpus tpu-vm scp "$2" "$TPU_NAME:$3" --project="$TPU_PROJECT" --zone="$TPU_ZONE" \
        --worker="$1"
}
copy_from_worker() {
    run gcloud compute tpus tpu-vm scp --recurse "$TPU_NAME:$2" "$3" --project="$TPU_PROJECT" \
        --zone="$TPU_ZONE" --worker="$1"
}
