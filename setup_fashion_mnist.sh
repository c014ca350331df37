#!/usr/bin/env bash
# Fashion-MNIST for the fashion_mnist presets (the dataset to train on first).
#
# Usage: ./setup_fashion_mnist.sh [DATA_ROOT] [--png OUT]   (DATA_ROOT defaults to ., the presets' data_root)
#
# Makes DATA_ROOT/fashion_mnist/ with the four standard idx files:
#   train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz   (60000 images: 55000 train + 5000 valid)
#   t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz    (10000 test images)
# Source, in this order:
#   1. Debian's dataset-fashion-mnist package (/usr/share/datasets/fashion-mnist/), linked, not copied;
#      installed with apt-get when this runs as root and the folder is missing;
#   2. otherwise a resumable download of the official files from $FASHION_MNIST_URL
#      (default: the Fashion-MNIST README's download links).
# Every file is verified: the md5 the Fashion-MNIST README publishes for the .gz file, or, for Debian's
# copies (re-compressed, so their .gz bytes differ), the well-known md5 of the decompressed file.
# Idempotent: files already in place and verified are left alone.  Each file appears atomically.
# --png OUT also writes the images as 28x28 grayscale PNGs, OUT/train/ (55000), OUT/valid/ (5000) and
# OUT/test/ (10000), the presets' split: a folder of pictures to try ./setup_images.sh on (README, "Train on
# your own images").
set -euo pipefail

ROOT=${1:-.}
PNG_OUT=
if [ "${2:-}" = --png ]; then PNG_OUT=${3:?--png needs an OUT folder}; fi
HERE=$(cd "$(dirname "$0")" && pwd)
export_png() {  # the images as PNG folders, when --png OUT was given
    [ -z "$PNG_OUT" ] && return 0
    PY=${PYTHON:-$([ -x "$HERE/.venv/bin/python" ] && echo "$HERE/.venv/bin/python" || echo python3)}
    "$PY" "$HERE/images_to_npy.py" export-fashion-mnist "$ROOT" "$PNG_OUT"
}
DEST=$ROOT/fashion_mnist
SYSTEM_DIR=${FASHION_MNIST_SYSTEM_DIR:-/usr/share/datasets/fashion-mnist}
URL=${FASHION_MNIST_URL:-http://fashion-mnist.s3-website.eu-central-1.amazonaws.com}
FILES=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)
# md5 of each .gz as published in the Fashion-MNIST README, and of its decompressed contents.
declare -A GZ_MD5=([train-images-idx3-ubyte]=8d4fb7e6c68d591d4c3dfef9ec88bf0d
                   [train-labels-idx1-ubyte]=25c81989df183df01b3e8a0aad5dffbe
                   [t10k-images-idx3-ubyte]=bef4ecab320f06d8554ea6380940ec79
                   [t10k-labels-idx1-ubyte]=bb300cfdad3c16e7a12a480ee83cd310)
declare -A RAW_MD5=([train-images-idx3-ubyte]=f4a8712d7a061bf5bd6d2ca38dc4d50a
                    [train-labels-idx1-ubyte]=9018921c3c673c538a1fc5bad174d6f9
                    [t10k-images-idx3-ubyte]=8181f5470baa50b63fa0f6fddb340f0a
                    [t10k-labels-idx1-ubyte]=15d484375f8d13e6eb1aabb0c3f46965)

md5_of() { md5sum | cut -d' ' -f1; }

verified() {  # verified NAME FILE: FILE is NAME.gz with the published contents
    [ -f "$2" ] || return 1
    [ "$(md5_of < "$2")" = "${GZ_MD5[$1]}" ] && return 0
    [ "$( (gzip -dc < "$2" 2>/dev/null || true) | md5_of)" = "${RAW_MD5[$1]}" ]
}

fetch() {  # fetch URL FILE: resumable download (partial data stays in FILE between runs)
    if command -v curl > /dev/null; then curl -fL --retry 3 -C - -o "$2" "$1"
    elif command -v wget > /dev/null; then wget -c -O "$2" "$1"
    else echo "error: need curl or wget to download $1" >&2; return 1; fi
}

todo=()
for f in "${FILES[@]}"; do verified "$f" "$DEST/$f.gz" || todo+=("$f"); done
if [ ${#todo[@]} -eq 0 ]; then
    echo "Fashion-MNIST already set up in $DEST (4 files verified); nothing to do."
    export_png
    exit 0
fi
mkdir -p "$DEST"

if [ ! -d "$SYSTEM_DIR" ] && [ -z "${FASHION_MNIST_SYSTEM_DIR:-}" ] && [ "$(id -u)" = 0 ] \
        && command -v apt-get > /dev/null; then
    echo "Installing Debian's dataset-fashion-mnist package (files in $SYSTEM_DIR) ..."
    apt-get install -y dataset-fashion-mnist > /dev/null \
        || { apt-get update > /dev/null && apt-get install -y dataset-fashion-mnist > /dev/null; } \
        || echo "apt-get could not install dataset-fashion-mnist; downloading instead."
fi

for f in "${todo[@]}"; do
    out=$DEST/$f.gz
    if verified "$f" "$SYSTEM_DIR/$f.gz"; then
        ln -sfn "$(cd "$SYSTEM_DIR" && pwd)/$f.gz" "$out.tmp-$$"
        mv -f "$out.tmp-$$" "$out"
        echo "$out -> $SYSTEM_DIR/$f.gz (Debian package, md5 verified)"
        continue
    fi
    [ -e "$SYSTEM_DIR/$f.gz" ] && echo "warning: $SYSTEM_DIR/$f.gz fails the md5 check; downloading instead" >&2
    echo "Downloading $URL/$f.gz ..."
    if ! verified "$f" "$out.part"; then fetch "$URL/$f.gz" "$out.part"; fi
    if ! verified "$f" "$out.part"; then
        rm -f "$out.part"
        echo "error: $URL/$f.gz does not match its published md5 ${GZ_MD5[$f]}; removed it, run again" >&2
        exit 1
    fi
    mv -f "$out.part" "$out"
    echo "$out (downloaded, md5 verified)"
done
echo "Fashion-MNIST ready in $DEST. Train with"
echo "  python train.py --hps fashion_mnist_quick --data_root $ROOT   # CPU: a small model, minutes (./quickstart.sh)"
echo "  python train.py --hps fashion_mnist --data_root $ROOT         # GPU: the full 36.6M-parameter model"
export_png
