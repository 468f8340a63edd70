#!/bin/sh
# FP8 GEMMs and quantisers on one GPU (tests/gpu/test_fp8 with DSV3_GPU_BENCH=1), in one run:
#  - the copy rate (read + write) and the quantisers' GB/s against it;
#  - the ceilings: an 8192^3 product in cuBLASLt bf16 and in plain FP8 with one scale per
#    tensor (default and fast accumulation), and the same in DeepSeek's block scaling;
#  - per linear layer of configs/1b-moe.json and of V3, at M = 4096 and 8192 tokens, fprop,
#    dgrad and wgrad: TFLOP/s of the block-scaled FP8 path (1x128 x 128x128, wgrad 1x128 x
#    1x128), cuBLASLt bf16 and per-tensor FP8 on the same shape, the time of the activation
#    quantisation that product needs, and the speed-up over bf16 with that time counted.
# The correctness tests of test_fp8 run first (a failing run's numbers are not recorded).
# Usage: scripts/bench-fp8.sh   (build first; BUILD=build). For docs/PERF.md.
set -eu
BUILD=${BUILD:-build}
echo "# $(date -u '+%F %H:%M UTC') $(hostname) $(nproc) cores commit ${DSV3_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo ?)}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/# /' || true
DSV3_GPU_BENCH=1 "$BUILD/tests/gpu/test_fp8"
