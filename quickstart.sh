#!/usr/bin/env bash
# The README's first command: set up, get Fashion-MNIST, train the fashion_mnist_quick
# preset on the CPU (or GPU) for a few minutes, evaluate the EMA model on the full test
# set, and leave everything in ./saved_models/quickstart/.  Re-running continues the run
# (already finished: only re-evaluates).  Extra arguments go to train.py.
set -euo pipefail
cd "$(dirname "$0")"
source env.sh requirements.txt
bash setup_fashion_mnist.sh ./data
python train.py --hps fashion_mnist_quick --data_root ./data --desc quickstart "$@"
python train.py --hps fashion_mnist_quick --data_root ./data --desc quickstart --test_eval "$@"
echo "outputs in ./saved_models/quickstart: log.txt, latest-*.th, samples-*.png, loss.png, tensorboard/ (view: tensorboard --logdir saved_models)"
