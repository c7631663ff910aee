#!/usr/bin/env bash
# Create a TPU VM (v3-8, v4-8) or pod slice (v4-32 and up).
#   tpu_scripts/create.sh --project P --zone europe-west4-a --accelerator-type v3-8 --name r50
usage() { echo "usage: $0 [options]"; usage_common; }
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
run gcloud compute tpus tpu-vm create "$TPU_NAME" --project="$TPU_PROJECT" --zone="$TPU_ZONE" \
    --accelerator-type="$TPU_TYPE" --version="$TPU_RUNTIME"
