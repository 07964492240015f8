#!/usr/bin/env bash
# The GPU check, for the day a GPU is available (<= 8 minutes on one GPU). Writes one report:
#   scripts/gpu_check.sh [REPORT]        (default: gpu_check_report.txt; $OUT/ if set)
# 1. the CUDA op tests against the Python references, with the nvcc-built torch extension and with
#    the cupy/NVRTC backend; 2. a 1-rank NCCL world through every hook (DDP built on a side stream);
# 3. the kernel benchmark on CUDA against the device's memcpy bandwidth.
# Needs a CUDA torch, nvcc (for the extension) and cupy (pip install -e .[gpu]).
set -uo pipefail
cd "$(dirname "$0")/.."
REPORT=${1:-${OUT:+$OUT/}gpu_check_report.txt}
PY=${PY:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}
status=0
section() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }
{
    section "device"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -3
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
    for backend in extension cupy; do
        section "CUDA op tests, COMMLIB_CUDA_BACKEND=$backend"
        COMMLIB_CUDA_BACKEND=$backend timeout 240 $PY -m pytest -q -p no:cacheprovider \
            tests/ops/test_cuda_ops.py 2>&1 | tail -15 || status=1
    done
    section "every hook in a 1-rank NCCL world"
    timeout 120 $PY scripts/gpu_hooks_check.py || status=1
    section "kernel benchmark on CUDA vs memcpy bandwidth"
    timeout 120 $PY benchmarks/bench_kernels.py --device cuda --runs 5 --out "${REPORT%.txt}_kernels.json" 2>&1 \
        | tail -30 || status=1
    section "result: $([ $status = 0 ] && echo PASS || echo FAIL)"
} 2>&1 | tee "$REPORT"
exit $status
