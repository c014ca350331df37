#!/usr/bin/env bash
# Downsampled ImageNet for the imagenet32 / imagenet64 presets.
#
# Usage: ./setup_imagenet.sh imagenet32|imagenet64 [DATA_ROOT] [DOWNLOAD_DIR]
#        (DATA_ROOT defaults to ., the presets' data_root; DOWNLOAD_DIR defaults to DATA_ROOT)
#
# Makes, in DATA_ROOT (S = 32 or 64), the release's layout:
#   imagenetS-train.npy   (N, S, S, 3) uint8, the training images; the loader holds out 5000 as valid
#   imagenetS-valid.npy   (N, S, S, 3) uint8, ImageNet's validation images: the test set
#   imagenetS-version.txt which downsampled ImageNet the two files came from
# from whichever of these it finds in DOWNLOAD_DIR:
#   1. train_SxS.tar and valid_SxS.tar: the ORIGINAL downsample (van den Oord et al. 2016, "Pixel
#      Recurrent Neural Networks"), which the release and the papers' 3.80 / 3.52 bits/dim used.
#      The release downloaded them from image-net.org/small, which no longer serves files; use them
#      if you have a copy.  The PNGs are read in sorted file-name order.
#   2. the CURRENT "Downsampled ImageNet" (Chrabaszcz et al. 2017, "A Downsampled Variant of
#      ImageNet as an Alternative to the CIFAR datasets"), from the image-net.org download page
#      (log in, "Download", "Downsampled ImageNet"; "Train(32x32)" etc.):
#        imagenet32: Imagenet32_train.zip  Imagenet32_val.zip
#        imagenet64: Imagenet64_train_part1.zip  Imagenet64_train_part2.zip  Imagenet64_val.zip
#      A different resize of the same photos: bits/dim on it are NOT comparable with the papers'.
# Each .npy is written to a temporary name and renamed when complete.  Converting needs about one
# pickled batch of memory (imagenet64: ~3 GB) and the disk for the .npy (imagenet64 train: ~16 GB).
# Idempotent: does nothing when both .npy files are there and complete.
set -euo pipefail

NAME=${1:-}
case "$NAME" in
    imagenet32) S=32 ;;
    imagenet64) S=64 ;;
    *) echo "usage: $0 imagenet32|imagenet64 [DATA_ROOT] [DOWNLOAD_DIR]" >&2; exit 2 ;;
esac
ROOT=${2:-.}
DL=${3:-$ROOT}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-$([ -x "$HERE/.venv/bin/python" ] && echo "$HERE/.venv/bin/python" || echo python3)}
TRAIN=$ROOT/$NAME-train.npy
VALID=$ROOT/$NAME-valid.npy
VERSION=$ROOT/$NAME-version.txt
ORIGINAL="original downsample (van den Oord et al. 2016; image-net.org/small ${S}x${S} tars): the version of the release and of the papers' bits/dim"
CURRENT="current Downsampled ImageNet (Chrabaszcz et al. 2017; image-net.org Imagenet${S} zips): NOT the release's version, bits/dim not comparable with the papers'"

check() { "$PY" "$HERE/files_to_npy.py" check-npy --dataset "$NAME" "$1" > /dev/null; }

if [ -f "$TRAIN" ] && [ -f "$VALID" ] && check "$TRAIN" && check "$VALID"; then
    echo "$NAME already set up in $ROOT ($(cat "$VERSION" 2>/dev/null || echo 'version not recorded')); nothing to do."
    exit 0
fi
mkdir -p "$ROOT"

if [ -f "$DL/train_${S}x${S}.tar" ] && [ -f "$DL/valid_${S}x${S}.tar" ]; then
    version=$ORIGINAL
    TMP=$(mktemp -d "$DL/.$NAME-XXXXXX")
    trap 'rm -rf "$TMP"' EXIT
    for split in train valid; do
        out=$ROOT/$NAME-$split.npy
        if [ -f "$out" ] && check "$out"; then continue; fi
        echo "Unpacking $DL/${split}_${S}x${S}.tar ..."
        tar -xf "$DL/${split}_${S}x${S}.tar" -C "$TMP"
        "$PY" "$HERE/files_to_npy.py" pngs-to-npy --size "$S" "$TMP/${split}_${S}x${S}" "$out"
        rm -rf "${TMP:?}/${split}_${S}x${S}"
    done
else
    if [ "$S" = 32 ]; then TRAIN_ZIPS=("$DL/Imagenet32_train.zip")
    else TRAIN_ZIPS=("$DL/Imagenet64_train_part1.zip" "$DL/Imagenet64_train_part2.zip"); fi
    VAL_ZIP=$DL/Imagenet${S}_val.zip
    for z in "${TRAIN_ZIPS[@]}" "$VAL_ZIP"; do
        if [ ! -f "$z" ]; then
            echo "error: $z not found.  image-net.org/small (the release's source) no longer serves files." >&2
            echo "Either put the original train_${S}x${S}.tar and valid_${S}x${S}.tar in $DL, or download" >&2
            echo "the current version's zips (log in at image-net.org, Download, Downsampled ImageNet):" >&2
            echo "  ${TRAIN_ZIPS[*]##*/} ${VAL_ZIP##*/}   into $DL, then run this again." >&2
            echo "Note: the current version is not the one the release's bits/dim were measured on." >&2
            exit 1
        fi
    done
    version=$CURRENT
    if ! { [ -f "$TRAIN" ] && check "$TRAIN"; }; then
        "$PY" "$HERE/files_to_npy.py" convert-imagenet --split train --size "$S" "$TRAIN" "${TRAIN_ZIPS[@]}"
    fi
    if ! { [ -f "$VALID" ] && check "$VALID"; }; then
        "$PY" "$HERE/files_to_npy.py" convert-imagenet --split val --size "$S" "$VALID" "$VAL_ZIP"
    fi
fi

echo "$version" > "$VERSION.tmp-$$" && mv -f "$VERSION.tmp-$$" "$VERSION"
echo "$NAME ready in $ROOT: $TRAIN, $VALID"
echo "Version: $version"
