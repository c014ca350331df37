#!/usr/bin/env bash
# Your own images for the images presets (--hps images, images_quick): any folder of pictures.
#
# Usage: ./setup_images.sh SRC DATA_ROOT --size S [--channels 3|1] [--bits 8|5] [--storage auto|npy|png]
#                          [--upscale] [--overwrite] [--workers N]
#
# Reads every image under SRC (recursively; PNG, JPEG, WebP, BMP, TIFF, GIF, ... as Pillow decodes them) and
# makes DATA_ROOT/images/:
#   train.npy  valid.npy  test.npy   (N, S, S, C) uint8 each; from --size 512 up folders train/ valid/ test/ of PNGs
#   manifest.json                    every source file: content hash, split, row, or why it was skipped;
#                                    the options, the train split's pixel mean and std (written last)
# Rule: EXIF orientation applied, converted to RGB (or grayscale, --channels 1; transparency on white), the
# centred square of the short side resized to S x S with Lanczos.  Smaller images are skipped (--upscale: resized
# up); non-images, unreadable files and repeated files are skipped; all are named in the summary line.  Split:
# by each file's sha256 (90/5/5), or SRC's own train/, valid/ and test/ folders.
# Idempotent: nothing is done when SRC and the options are unchanged; other options need --overwrite.  The
# dataset appears whole or not at all.  Then: python train.py --hps images --data_root DATA_ROOT
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 SRC DATA_ROOT --size S [--channels 3|1] [--bits 8|5] [--storage auto|npy|png] [--upscale] [--overwrite]" >&2
    exit 2
fi
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-$([ -x "$HERE/.venv/bin/python" ] && echo "$HERE/.venv/bin/python" || echo python3)}
exec "$PY" "$HERE/images_to_npy.py" prepare "$@"
