#!/usr/bin/env bash
# Delete the TPU VM or pod slice.
usage() { echo "usage: $0 [options]"; usage_common; }
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
run gcloud compute tpus tpu-vm delete "$TPU_NAME" --project="$TPU_PROJECT" --zone="$TPU_ZONE" --quiet
