#!/usr/bin/env bash
# Copy this project to every worker and install it with the pinned torch/torch_xla[tpu].
#   tpu_scripts/install.sh --project P --zone Z --name r50
usage() { echo "usage: $0 [options]"; usage_common; }
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
run gcloud compute tpus tpu-vm scp --recurse "$here" "$TPU_NAME:~/$REPO_DIR" --project="$TPU_PROJECT" \
    --zone="$TPU_ZONE" --worker=all
on_workers all "pip install torch==2.9.0 'torch_xla[tpu]==2.9.0' torchvision==0.24.0 && pip install -e ~/$REPO_DIR"
