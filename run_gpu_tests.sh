#!/usr/bin/env bash
# The GPU tests in one command: tests/test_cuda.py and tests/test_cuda_step.py (marker "cuda") on the first visible GPU,
# with whatever python is on PATH (it needs torch with CUDA, numpy, pytest, tqdm, matplotlib;
# mpi4py + mpiexec for the mpiexec case, which is skipped without them).  An estimated 3 minutes on one
# H100 from a cold start (an estimate: not yet timed).  The torch.compile cases (marker "slow": a cold
# inductor build takes minutes) are an optional run of their own: ./run_gpu_tests.sh --compile.
# Results: device.txt, pytest-cuda.log and junit-cuda.xml in $OUT if set, else in ./gpu-test-results.
# Other arguments go to pytest (e.g. -k bundle).
set -uo pipefail
cd "$(dirname "$0")"
marks='cuda and not slow'
if [ "${1:-}" = --compile ]; then
    marks='cuda and slow'
    shift
fi
out="${OUT:-gpu-test-results}"
mkdir -p "$out"
{
    python -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA",
torch.version.cuda, "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")'
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
} | tee "$out/device.txt"
if [ "${VDVAE_TEST_DEVICE:-cuda}" = cuda ] && ! python -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    echo "error: this python's torch sees no CUDA device, so every GPU test would be skipped" | tee -a "$out/device.txt"
    exit 1
fi
python -m pytest tests/test_cuda.py tests/test_cuda_step.py -m "$marks" -v -rs --durations=0 -p no:cacheprovider \
    --junitxml="$out/junit-cuda.xml" "$@" 2>&1 | tee "$out/pytest-cuda.log"
exit "${PIPESTATUS[0]}"
