#!/usr/bin/env bash
# Launch an example on every worker of the TPU VM or pod slice (PJRT, one process per host).
#   tpu_scripts/train.sh --project P --zone Z --name r50 --recipe resnet50-v3-8 --datadir /data/imagenet
#   tpu_scripts/train.sh ... --recipe vit-pod --datadir /mnt/imagenet --ckpt_dir /mnt/ckpts/vit
#   tpu_scripts/train.sh ... -- examples/train_mnist_fsdp.py --dataset mnist --datadir ~/mnist
# Recipes:
#   resnet50-v3-8  ResNet-50, batch 128 per device, lr 0.4, 5 warm-up epochs, /10 every 30, 100 epochs
#                  (the torch_xla FSDP recipe that reached 75.9% top-1 on a v3-8)
#   vit-pod        ViT-B/16 in bf16 on a pod slice, nested FSDP + gradient checkpointing
# On a pod slice, --datadir and --ckpt_dir must be on storage every worker sees (a mounted
# bucket or NFS): each worker reads its part of the data and writes its own shard files.
usage() {
    echo "usage: $0 [options] [--recipe R --datadir D --ckpt_dir C] [-- SCRIPT ARGS...]"
    usage_common
    echo "  --recipe R              resnet50-v3-8 or vit-pod"
    echo "  --datadir D             ImageNet ImageFolder root on the workers"
    echo "  --ckpt_dir C            where every worker writes its shard files (default ckpts/NAME in the project)"
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
ckpt_dir=${ckpt_dir:-"ckpts/$TPU_NAME"}  # relative to the project on the workers
case "$recipe" in
    resnet50-v3-8)
        cmd=(examples/train_imagenet_fsdp.py --datadir "$datadir" --model resnet50 --batch_size 128 --lr 0.4
             --num_warmup_epochs 5 --lr_scheduler_divide_every_n_epochs 30 --lr_scheduler_divisor 10
             --num_epochs 100 --use_nested_fsdp --use_gradient_checkpointing --drop_last --ckpt_dir "$ckpt_dir") ;;
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
on_workers all "cd ~/$REPO_DIR && PJRT_DEVICE=TPU python3 $quoted"
