#!/usr/bin/env bash
# Consolidate the shard files of a run on worker 0 (they must all be visible there: one host,
# or shared storage on a pod slice), then copy the result here.
#   tpu_scripts/consolidate.sh --project P --zone Z --name r50 -- --ckpt_prefix ckpts/r50/resnet50 --optimizer
usage() { echo "usage: $0 [options] -- CONSOLIDATE_ARGS..."; usage_common; }
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
if [ ${#EXTRA_ARGS[@]} -eq 0 ]; then echo "error: give the consolidate arguments after --" >&2; exit 2; fi
quoted=$(printf '%q ' "${EXTRA_ARGS[@]}")
on_workers 0 "cd ~/$REPO_DIR && python3 -m consolidate --ckpt_suffix '_rank-*.pth' --verify $quoted"
