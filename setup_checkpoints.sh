#!/usr/bin/env bash
# The released VDVAE checkpoints, downloaded and verified.
#
# Usage: ./setup_checkpoints.sh PRESET [DIR] [--all] [--base_url URL]
#   PRESET  cifar10 (the four seeds' EMA weights, as released), imagenet32, imagenet64, ffhq256, ffhq1024
#   DIR     defaults to ./checkpoints
#   --all   also the -model.th, -opt.th and -log.jsonl of the bundle (to continue training; cifar10 has none)
#   --base_url URL (or VDVAE_CHECKPOINT_URL=URL): a mirror with the release's folders and file names
#
# Makes DIR/<name>-model-ema.th (e.g. cifar10-seed0-iter-900000-model-ema.th), each with a stamp
# DIR/<name>-model-ema.th.verified (size, sha256, the architecture it was checked against).
# Downloads resume where they stopped (DIR/<file>.part); every file is loaded with weights_only=True
# and checked against the preset's keys and shapes before it is used; a broken file is fetched again.
# Idempotent: a file that is already verified is neither downloaded nor loaded again.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-$([ -x "$HERE/.venv/bin/python" ] && echo "$HERE/.venv/bin/python" || echo python3)}
if [ $# -lt 1 ]; then
    echo "usage: $0 PRESET [DIR] [--all] [--base_url URL]    (PRESET: cifar10 imagenet32 imagenet64 ffhq256 ffhq1024)" >&2
    exit 2
fi
exec "$PY" "$HERE/released.py" fetch "$@"
