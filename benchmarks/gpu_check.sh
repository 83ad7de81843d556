#!/usr/bin/env bash
# One prepared check for the day a GPU is lent (a CUDA machine with torch and triton, no network,
# 10 minutes at most). Run from anywhere:   bash benchmarks/gpu_check.sh [--quick]
#
#   1. the GPU tests, compiled kernels on CUDA tensors (SUPERMASK_TEST_ON_GPU=1 python -m pytest ...)
#   2. benchmarks/gpu_check.py: torch.library.opcheck on CUDA; fused masked linear fwd+bwd vs dense
#      cuBLAS and the reference path (4096^3, fp32 / bf16); threshold vs torch.topk / sort /
#      kthvalue (1e6, 1e7); one compiled epoch of fc and conv4 vs compiled dense
#      -> benchmarks/results/gpu_<gpu name>.md
#
# Without a GPU it runs what it can (the same tests on the CPU, Triton in its interpreter; every
# benchmark section once on tiny inputs, untimed, -> benchmarks/results/gpu_dryrun_no_gpu.md) and
# prints SKIPPED lines for the rest. Each step has its own time limit, so the whole stays under
# 10 minutes; the exit code is non-zero when a step failed.
set -u
cd "$(dirname "$0")/.."
quick=""
[ "${1:-}" = "--quick" ] && quick="--quick"
status=0
start=$(date +%s)

if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    gpu=1
    echo "== CUDA: $(python -c 'import torch; print(torch.cuda.get_device_name())')"
else
    gpu=0
    echo "== no CUDA device: SKIPPED everything that needs one (compiled Triton kernels, CUDA opcheck, timings)"
fi

tests="tests/test_ops.py tests/test_kernels_threshold.py tests/test_kernels_matmul.py"
if [ $gpu = 1 ]; then
    echo "== 1. GPU tests (SUPERMASK_TEST_ON_GPU=1: the kernel tests on CUDA, compiled)"
    SUPERMASK_TEST_ON_GPU=1 timeout 300 python -m pytest -q -x $tests || status=1
else
    echo "== 1. SKIPPED the GPU tests (no CUDA); running the op tests on the CPU instead (Triton interpreted):"
    timeout 240 python -m pytest -q -x tests/test_ops.py -k "opcheck or reference_mask or autocast or export" \
        || status=1
fi

echo "== 2. opcheck on CUDA and the benchmarks (benchmarks/gpu_check.py)"
left=$(( 570 - ($(date +%s) - start) ))
[ $left -lt 60 ] && left=60
timeout $left python benchmarks/gpu_check.py $quick || status=1

echo "== done in $(( $(date +%s) - start )) s, exit $status"
exit $status
