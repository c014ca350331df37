#!/usr/bin/env bash
# Reproduce the paper's test-set figures for one preset from the released checkpoints.
#
# Usage: ./reproduce.sh PRESET [--n_importance K] [--data_root DIR] [--data_source PATH] [train.py flags]
#        LAUNCH="torchrun --nproc_per_node 8" ./reproduce.sh PRESET      (or LAUNCH="mpiexec -n 8")
#
# Sets up the data (the preset's setup_*.sh), fetches and verifies the EMA checkpoint(s) into
# ./checkpoints (setup_checkpoints.sh), evaluates each on the full test split (train.py --test_eval;
# with --n_importance K also evaluate.py's importance-weighted bound), prints measured bits/dim ±
# standard error next to the published figure, and writes saved_models/reproduce-PRESET/results.{json,md}.
# Makes ./.venv and installs the requirements the first time, as quickstart.sh does.
set -euo pipefail
cd "$(dirname "$0")"
source env.sh requirements.txt
exec python reproduce.py "$@"
