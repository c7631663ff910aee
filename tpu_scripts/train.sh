#!/usr/bin/env bash
# Start an example on every worker of the TPU VM or pod slice, in the background.
#   tpu_scripts/train.sh --project P --zone Z --name r50 --recipe resnet50-v3-8 --datadir /data/imagenet
#   tpu_scripts/train.sh ... --accelerator-type v4-32 --name pod --bucket B --recipe vit-pod --datadir /mnt/xla_fsdp/imagenet
#   tpu_scripts/train.sh ... -- examples/train_mnist_fsdp.py --num_epochs 5
# On each worker it runs `python3 SCRIPT ARGS` with PJRT_DEVICE=TPU (torch_xla.launch then starts
# one process per TPU chip: 4 per v3-8 or v4-8 host, each v3 process driving its chip's 2 cores)
# through tpu_scripts/worker/start.sh: detached from the ssh session, with its output in
# ~/xla_fsdp_runs/NAME/train.log on that worker. Follow it with logs.sh, stop it with stop.sh.
# Recipes:
#   resnet50-v3-8  torch_xla's documented ResNet-50 FSDP command for a v3-8 (docs/source/perf/fsdp.md:
#                  lr 0.4, batch 128 per device, 5 warm-up epochs, /10 every 30, 100 epochs, nested FSDP)
#   vit-pod        ViT-B/16 in bf16 on a pod slice, nested FSDP + gradient checkpointing
# Checkpoints go to --ckpt_dir: by default ckpts/NAME in ~/xla_fsdp on one host, and
# /mnt/xla_fsdp/ckpts/NAME (the --bucket given to install.sh) on a pod slice, whose workers
# must all see every shard file for consolidate.sh. On a pod the data must be visible to
# every worker too.
usage() {
    echo "usage: $0 [options] [--recipe R --datadir D] [--ckpt_dir C] [-- SCRIPT ARGS...]"
    usage_common
    echo "  --recipe R              resnet50-v3-8 or vit-pod"
    echo "  --datadir D             ImageNet ImageFolder root on the workers"
    echo "  --ckpt_dir C            where every worker writes its shard files (see above for the default)"
}
recipe=""; datadir=""; ckpt_dir=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --recipe) recipe=$2; shift 2 ;;
        --datadir) datadir=$2; shift 2 ;;
        --ckpt_dir) ckpt_dir=$2; shift 2 ;;
        --) args+=("$@"); break ;;
        *) args+=("$1"); shift ;;
    esac
done
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "${args[@]}"
hosts=$(num_hosts)
if [ -z "$ckpt_dir" ]; then
    if [ "$hosts" -gt 1 ]; then
        if [ -z "$TPU_BUCKET" ]; then
            echo "error: $TPU_TYPE has $hosts hosts: give --bucket (mounted by install.sh --bucket) or a" \
                 "--ckpt_dir that every worker sees" >&2
            exit 2
        fi
        ckpt_dir=$SHARED_MOUNT/ckpts/$TPU_NAME
    else
        ckpt_dir=ckpts/$TPU_NAME  # relative to ~/xla_fsdp, which install.sh never clears
    fi
fi
case "$recipe" in
    resnet50-v3-8)
        cmd=(examples/train_imagenet_fsdp.py --datadir "$datadir" --drop_last --model resnet50
             --test_set_batch_size 64 --eval_interval 10 --lr 0.4 --batch_size 128 --num_warmup_epochs 5
             --lr_scheduler_divide_every_n_epochs 30 --lr_scheduler_divisor 10 --num_epochs 100
             --use_nested_fsdp --ckpt_dir "$ckpt_dir") ;;
    vit-pod)
        cmd=(examples/train_imagenet_fsdp.py --datadir "$datadir" --model vit_b_16 --batch_size 128 --lr 0.1
             --num_warmup_epochs 5 --num_epochs 100 --use_nested_fsdp --use_gradient_checkpointing
             --compute_dtype bfloat16 --drop_last --ckpt_dir "$ckpt_dir") ;;
    "")
        if [ ${#EXTRA_ARGS[@]} -eq 0 ]; then echo "error: give --recipe or -- SCRIPT ARGS" >&2; exit 2; fi
        cmd=("${EXTRA_ARGS[@]}") ;;
    *) echo "error: unknown recipe $recipe" >&2; exit 2 ;;
esac
if [ -n "$recipe" ] && [ -z "$datadir" ]; then echo "error: --recipe $recipe needs --datadir" >&2; exit 2; fi
quoted=$(printf '%q ' "${cmd[@]}")
if [[ "$ckpt_dir" == "$SHARED_MOUNT"/* ]]; then
    check_mount="mountpoint -q $SHARED_MOUNT || { echo \"\$(hostname): $SHARED_MOUNT is not mounted; run install.sh --bucket\" >&2; exit 2; }; "
else
    check_mount=""
fi
on_workers all "${check_mount}bash ~/$REPO_DIR/tpu_scripts/worker/start.sh ~/$RUNS_DIR/$TPU_NAME python3 $quoted"
[ "$TPU_DRY_RUN" = 1 ] || echo "started on $hosts host(s); follow: tpu_scripts/logs.sh --name $TPU_NAME; stop: tpu_scripts/stop.sh --name $TPU_NAME"
