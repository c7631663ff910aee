#!/usr/bin/env bash
# On a TPU VM worker (run by install.sh): install the project and, with --bucket B, mount
# gs://B at /mnt/xla_fsdp with gcsfuse. Idempotent.
#   bash ~/xla_fsdp/tpu_scripts/worker/setup.sh [--bucket B]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bucket=""
mount_point=/mnt/xla_fsdp
while [ $# -gt 0 ]; do
    case "$1" in
        --bucket) bucket=$2; shift 2 ;;
        *) echo "worker/setup.sh: unknown option $1" >&2; exit 2 ;;
    esac
done

# The default image (tpu-ubuntu2204-base) has Python 3.10 and pip, no venv module:
# pip installs into the user's site-packages. libtpu comes with torch_xla[tpu].
python3 -m pip install --quiet torch==2.9.0 'torch_xla[tpu]==2.9.0' -e '.[examples]'
python3 -c 'import torch_xla, xla_fsdp, torchvision, sklearn; print("installed torch_xla", torch_xla.__version__)'

if [ -n "$bucket" ]; then
    if ! command -v gcsfuse >/dev/null 2>&1; then
        # Google's apt repository for gcsfuse (cloud.google.com/storage/docs/gcsfuse-install).
        release=$(lsb_release -c -s)
        curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg \
            | sudo gpg --batch --yes --dearmor -o /usr/share/keyrings/cloud.google.asc
        echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$release main" \
            | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
        sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
    fi
    if mountpoint -q "$mount_point"; then
        echo "gs://$bucket is already mounted at $mount_point"
    else
        sudo mkdir -p "$mount_point"
        sudo chown "$(id -u):$(id -g)" "$mount_point"
        # --implicit-dirs: folders made by another worker (or gsutil) show up here too.
        gcsfuse --implicit-dirs "$bucket" "$mount_point"
        echo "mounted gs://$bucket at $mount_point"
    fi
fi
