#!/usr/bin/env bash
# Consolidate a run's shard files on worker 0, then copy the result here.
#   tpu_scripts/consolidate.sh --project P --zone Z --name r50 --ckpt_prefix CKPT_DIR/resnet50 [--dest DIR] [-- ARGS]
# Worker 0 must see every rank's file: true on one host; on a pod slice, only with the shard
# files on shared storage (train.sh's default there: /mnt/xla_fsdp/ckpts/NAME, the bucket).
# It runs `python3 -m consolidate --ckpt_prefix P --ckpt_suffix '_rank-*.pth' --verify
# --save_path P_consolidated.pth ARGS` (ARGS: e.g. --optimizer; see python -m consolidate --help)
# from the project folder, so a relative prefix is relative to ~/xla_fsdp, and copies
# P_consolidated.pth to --dest (default: the current folder).
usage() {
    echo "usage: $0 [options] --ckpt_prefix P [--dest DIR] [-- CONSOLIDATE_ARGS...]"
    usage_common
    echo "  --ckpt_prefix P         shard file prefix on the workers (CKPT_DIR/MODEL, e.g. /mnt/xla_fsdp/ckpts/pod/vit_b_16)"
    echo "  --dest DIR              where the consolidated checkpoint is copied to here (default: .)"
}
prefix=""; dest=.
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --ckpt_prefix) prefix=$2; shift 2 ;;
        --dest) dest=$2; shift 2 ;;
        --) args+=("$@"); break ;;
        *) args+=("$1"); shift ;;
    esac
done
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "${args[@]}"
if [ -z "$prefix" ]; then echo "error: --ckpt_prefix is required" >&2; exit 2; fi
case "$prefix" in
    /*) remote_prefix=$prefix ;;
    "~"*|\$*) echo "error: --ckpt_prefix: give an absolute path or one relative to ~/$REPO_DIR, not $prefix" >&2
             exit 2 ;;
    *) remote_prefix=$REPO_DIR/$prefix ;;   # relative to the home folder, as scp reads it
esac
output=${prefix}_consolidated.pth
extra=""
[ ${#EXTRA_ARGS[@]} -gt 0 ] && extra=$(printf '%q ' "${EXTRA_ARGS[@]}")
on_workers 0 "cd ~/$REPO_DIR && python3 -m consolidate --ckpt_prefix $(printf '%q' "$prefix") \
--ckpt_suffix '_rank-*.pth' --verify --overwrite --save_path $(printf '%q' "$output") $extra"
run mkdir -p "$dest"
copy_from_worker 0 "${remote_prefix}_consolidated.pth" "$dest/"
[ "$TPU_DRY_RUN" = 1 ] || echo "copied to $dest/$(basename "$output")"
