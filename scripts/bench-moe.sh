#!/bin/sh
# The routed-expert (grouped) GEMMs of the 1B-class MoE on the GPU: tests/gpu/test_moe run
# with DSV3_GPU_BENCH=1 (its accuracy checks against the CPU reference first, both GEMM
# paths), then its per-kernel table: forward, dgrad and wgrad of the gate-up (1024 -> 1024)
# and down (512 -> 1024) projections of 16384 tokens x top-4 over 32 experts, balanced and
# random routing; our kernel's time, TFLOP/s and share of the 8192^3 cuBLASLt rate measured
# in the same process, beside cuBLAS's grouped GEMM and one dense GEMM of the same total
# shape; the other variants of our kernel in columns ("warp-specialised": GPU_MOE_GEMM_WS;
# "ws + TMA": GPU_MOE_GEMM_WS_TMA, its loads by the copy engine).
# Usage: scripts/bench-moe.sh (BUILD=build). For docs/KERNELS.md and docs/PERF.md.
set -eu
BUILD=${BUILD:-build}
echo "# $(date -u '+%F %H:%M UTC') $(hostname) commit ${DSV3_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo ?)}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/# /' || true
DSV3_GPU_BENCH=1 "$BUILD/tests/gpu/test_moe" 2>&1 | grep -E '^(not )?ok|^skip|^# (bench|stat)|CHECK|moe layer|router'
