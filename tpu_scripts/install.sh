#!/usr/bin/env bash
# Copy this project's sources to every worker and install it there, with what the examples need.
#   tpu_scripts/install.sh --project P --zone Z --name r50
#   tpu_scripts/install.sh ... --accelerator-type v4-32 --name pod --bucket my-bucket   # pod: shared storage
# Copies only the sources (git ls-files: tracked files and untracked ones git does not ignore,
# so never .venv or runs/) as one archive, unpacked over ~/xla_fsdp on each worker, then runs
# tpu_scripts/worker/setup.sh there: pip install of torch 2.9.0, torch_xla[tpu] 2.9.0 and this
# project with its examples extra, and with --bucket, gcsfuse mounting the bucket at
# /mnt/xla_fsdp. Safe to run again: the archive lands in the same place, installs are pinned.
usage() { echo "usage: $0 [options]"; usage_common; }
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if ! git -C "$here" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    echo "error: $here is not a git checkout; install.sh copies the files git lists" >&2
    exit 2
fi
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
archive=$staging/xla_fsdp-src.tar.gz
# Files deleted from the work tree but still in the index are left out.
(cd "$here" && git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -T - -czf "$archive")
setup_args=""
[ -n "$TPU_BUCKET" ] && setup_args="--bucket $(printf '%q' "$TPU_BUCKET")"
copy_to_workers all "$archive" xla_fsdp-src.tar.gz  # relative to the home folder
on_workers all "mkdir -p ~/$REPO_DIR && tar -xzf ~/xla_fsdp-src.tar.gz -C ~/$REPO_DIR && rm ~/xla_fsdp-src.tar.gz \
&& bash ~/$REPO_DIR/tpu_scripts/worker/setup.sh $setup_args"
