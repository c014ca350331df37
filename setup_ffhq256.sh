#!/usr/bin/env bash
# FFHQ at 256x256 for the ffhq256 preset.
#
# Usage: ./setup_ffhq256.sh [DATA_ROOT] [SOURCE]        (DATA_ROOT defaults to ., the preset's data_root)
#
# Makes DATA_ROOT/ffhq-256.npy: (70000, 256, 256, 3) uint8 (13.8 GB); the loader holds out 7000 images
# (last 7000 of a seed-5 permutation) as valid, which is also the test set.  SOURCE may be:
#   (none)      download the release's copy (downsampled with the resize NVAE used), resuming an
#               interrupted download (DATA_ROOT/ffhq-256.npy.part); its source publishes no checksum,
#               so the file is checked for shape and completeness instead;
#   FILE.npy    a copy you already have: checked, then linked as DATA_ROOT/ffhq-256.npy;
#   FOLDER      a folder of 70000 256x256 RGB PNGs (e.g. 00000.png ... 69999.png): packed in sorted
#               file-name order.  Only a folder resized like the release's copy reproduces its numbers.
#               ALLOW_PARTIAL=1 accepts another number of images (for a subset).
# The .npy is written under a temporary name and renamed when complete.  Idempotent: does nothing
# when DATA_ROOT/ffhq-256.npy is there and complete.
set -euo pipefail

ROOT=${1:-.}
SOURCE=${2:-}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-$([ -x "$HERE/.venv/bin/python" ] && echo "$HERE/.venv/bin/python" || echo python3)}
OUT=$ROOT/ffhq-256.npy
URL=${FFHQ256_URL:-https://openaipublic.blob.core.windows.net/very-deep-vaes-assets/vdvae-assets/ffhq-256.npy}

check() { "$PY" "$HERE/files_to_npy.py" check-npy --dataset ffhq_256 "$1"; }

fetch() {  # fetch URL FILE: resumable download (partial data stays in FILE between runs)
    if command -v curl > /dev/null; then curl -fL --retry 3 -C - -o "$2" "$1"
    elif command -v wget > /dev/null; then wget -c -O "$2" "$1"
    else echo "error: need curl or wget to download $1" >&2; return 1; fi
}

if [ -e "$OUT" ] && check "$OUT" > /dev/null; then
    echo "FFHQ-256 already set up: $OUT; nothing to do."
    exit 0
fi
mkdir -p "$ROOT"

if [ -z "$SOURCE" ]; then
    echo "Downloading $URL (13.8 GB) ..."
    fetch "$URL" "$OUT.part"
    check "$OUT.part" || { echo "error: the download $OUT.part is not a complete ffhq-256.npy; delete it and run again" >&2; exit 1; }
    mv -f "$OUT.part" "$OUT"
elif [ -f "$SOURCE" ]; then
    check "$SOURCE"
    ln -sfn "$(cd "$(dirname "$SOURCE")" && pwd)/$(basename "$SOURCE")" "$OUT.tmp-$$"
    mv -f "$OUT.tmp-$$" "$OUT"
elif [ -d "$SOURCE" ]; then
    "$PY" "$HERE/files_to_npy.py" pngs-to-npy --size 256 $([ -n "${ALLOW_PARTIAL:-}" ] || echo --expect 70000) "$SOURCE" "$OUT"
else
    echo "error: $SOURCE is neither a .npy file nor a folder of PNGs" >&2
    exit 1
fi
echo "FFHQ-256 ready: $OUT ($(check "$OUT"))"
