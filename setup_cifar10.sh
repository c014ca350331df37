#!/usr/bin/env bash
# CIFAR-10 for the cifar10 preset.
#
# Usage: ./setup_cifar10.sh [DATA_ROOT]        (DATA_ROOT defaults to ., the preset's data_root)
#
# Makes DATA_ROOT/cifar-10-batches-py/ with the python pickle batches data_batch_1..5 (50000 images:
# 45000 train + 5000 valid) and test_batch (10000 test images), and keeps the archive it came from,
# DATA_ROOT/cifar-10-python.tar.gz.  The download resumes where an interrupted one stopped
# (DATA_ROOT/cifar-10-python.tar.gz.part) and is checked against the md5 the CIFAR page publishes;
# the archive is unpacked into a temporary folder and moved into place whole.
# Idempotent: does nothing when the batches are already there.
set -euo pipefail

ROOT=${1:-.}
DIR=$ROOT/cifar-10-batches-py
TAR=$ROOT/cifar-10-python.tar.gz
URL=${CIFAR10_URL:-https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz}
MD5=c58f30108f718f92721af3b95e74349a
BATCHES=(data_batch_1 data_batch_2 data_batch_3 data_batch_4 data_batch_5 test_batch)

md5_of() { md5sum < "$1" | cut -d' ' -f1; }

fetch() {  # fetch URL FILE: resumable download (partial data stays in FILE between runs)
    if command -v curl > /dev/null; then curl -fL --retry 3 -C - -o "$2" "$1"
    elif command -v wget > /dev/null; then wget -c -O "$2" "$1"
    else echo "error: need curl or wget to download $1" >&2; return 1; fi
}

missing=()
for b in "${BATCHES[@]}"; do [ -f "$DIR/$b" ] || missing+=("$b"); done
if [ ${#missing[@]} -eq 0 ]; then
    echo "CIFAR-10 already set up in $DIR; nothing to do."
    exit 0
fi
if [ -e "$DIR" ]; then
    echo "error: $DIR exists but lacks ${missing[*]}; move it away and run again" >&2
    exit 1
fi
mkdir -p "$ROOT"

if [ -f "$TAR" ]; then
    if [ "$(md5_of "$TAR")" != "$MD5" ]; then
        echo "error: $TAR does not match the published md5 $MD5; delete it and run again" >&2
        exit 1
    fi
else
    echo "Downloading $URL ..."
    if [ ! -f "$TAR.part" ] || [ "$(md5_of "$TAR.part")" != "$MD5" ]; then fetch "$URL" "$TAR.part"; fi
    if [ "$(md5_of "$TAR.part")" != "$MD5" ]; then
        rm -f "$TAR.part"
        echo "error: the download of $URL does not match the published md5 $MD5; removed it, run again" >&2
        exit 1
    fi
    mv -f "$TAR.part" "$TAR"
fi

TMP=$(mktemp -d "$ROOT/.cifar10-XXXXXX")
trap 'rm -rf "$TMP"' EXIT
tar -xzf "$TAR" -C "$TMP"
for b in "${BATCHES[@]}"; do
    [ -f "$TMP/cifar-10-batches-py/$b" ] || { echo "error: $TAR has no cifar-10-batches-py/$b" >&2; exit 1; }
done
mv "$TMP/cifar-10-batches-py" "$DIR"
echo "CIFAR-10 ready in $DIR (md5 $MD5 verified): python train.py --hps cifar10 --data_root $ROOT"
