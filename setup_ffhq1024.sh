#!/usr/bin/env bash
# FFHQ at 1024x1024 for the ffhq1024 preset.
#
# Usage: ./setup_ffhq1024.sh PATH [DATA_ROOT]
#   PATH       FFHQ's images1024x1024 folder (download it yourself: github.com/NVlabs/ffhq-dataset);
#              its 70000 images 00000.png ... 69999.png may sit in subfolders (00000/, 01000/, ...).
#   DATA_ROOT  defaults to ./ffhq_images1024x1024, the preset's data_root.
#
# Makes DATA_ROOT/ffhq1024/train/0/00000.png ... 64999.png (65000 train images) and
# DATA_ROOT/ffhq1024/valid/0/65000.png ... 69999.png (5000 valid = test images), the release's split,
# as symbolic links to the images in PATH (which are left where they are; the release moved them).
# The tree is built under a temporary name and renamed into place when complete.
# ALLOW_PARTIAL=1 accepts a subset of the 70000 images.  Idempotent: does nothing when
# DATA_ROOT/ffhq1024 exists.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 PATH_TO_images1024x1024 [DATA_ROOT]" >&2
    exit 2
fi
ROOT=${2:-./ffhq_images1024x1024}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-$([ -x "$HERE/.venv/bin/python" ] && echo "$HERE/.venv/bin/python" || echo python3)}
mkdir -p "$ROOT"
"$PY" "$HERE/files_to_npy.py" link-ffhq1024 $([ -n "${ALLOW_PARTIAL:-}" ] && echo --partial) "$1" "$ROOT"
echo "FFHQ-1024 ready: python train.py --hps ffhq1024 --data_root $ROOT"
