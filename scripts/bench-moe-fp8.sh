#!/bin/sh
# The routed experts' FP8 grouped GEMMs (kernels/moe_gemm_fp8) on the GPU: tests/gpu/
# test_moe_fp8 run with DSV3_GPU_BENCH=1 (its accuracy checks against lib/fp8 and a float64
# reference first), then per product (fprop, dgrad, wgrad) on the shapes of configs/1b-moe
# (16384 tokens x top-4 of 32 experts: gate-up 1024 -> 1024, down 512 -> 1024; balanced and
# random routing) and of a V3 expert (7168 -> 4096 and 2048 -> 7168, 8 experts of 4096 rows):
# the FP8 GEMM alone (operands quantised beforehand), with its quantisations (from bf16, as
# gmodel runs it), and our bf16 grouped GEMM; TFLOP/s against the 8192^3 ceilings measured
# in the same process (cuBLASLt bf16, cuBLASLt FP8 with 1x128 x 128x128 scaling); last, the
# FP8 GEMM alone with each kernel variant (DSV3_MOE_FP8_KERNEL 0/1/2/3; 3 = warp-specialised,
# persistent, TMA loads).
# Usage: scripts/bench-moe-fp8.sh (BUILD=build). For docs/KERNELS.md and docs/PERF.md.
set -eu
BUILD=${BUILD:-build}
echo "# $(date -u '+%F %H:%M UTC') $(hostname) commit ${DSV3_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo ?)}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/# /' || true
DSV3_GPU_BENCH=1 "$BUILD/tests/gpu/test_moe_fp8" 2>&1 | grep -E '^(not )?ok|^skip|^# (bench|stat|moe)|CHECK'
