#!/bin/sh
# FP8 GEMMs, quantisers, linear layers and the whole training step on one GPU, in one run:
#  1. tests/gpu/test_fp8 with DSV3_GPU_BENCH=1 (its correctness tests first):
#     - the copy rate (read + write) and the quantisers' GB/s against it;
#     - the ceilings: an 8192^3 product in cuBLASLt bf16 and in plain FP8 with one scale per
#       tensor (default and fast accumulation), and the same in DeepSeek's block scaling;
#     - per linear layer of configs/1b-moe.json and of V3, at M = 4096 and 8192 tokens, fprop,
#       dgrad and wgrad: TFLOP/s of the block-scaled FP8 path (1x128 x 128x128, wgrad 1x128 x
#       1x128), cuBLASLt bf16 and per-tensor FP8 on the same shape, the time of the activation
#       quantisation that product needs, and the speed-up over bf16 with that time counted;
#  2. tests/gpu/test_fp8lin with DSV3_GPU_BENCH=1: one linear layer's step (forward, dgrad,
#     wgrad) through kernels/fp8lin as the trainer runs it, bf16 against FP8 with its caches
#     (weights quantised once per step, the input kept from the forward, dy quantised once,
#     SwiGLU fused with the quantisation of its output), at M = 16384 and 8192 tokens;
#  3. (STEPS > 0) the whole training step: dsv3-train --device cuda on configs/1b-moe.json,
#     random tokens, micro-batch B x 4096, global batch GB sequences, STEPS steps, MTP and
#     balance loss off, in bf16 and with --fp8 on the same data; the median tokens/s of the
#     steps after the first (metrics.jsonl). BEFORE_BUILD=DIR also runs DIR/bin/dsv3-train
#     --fp8 (an earlier commit's build) on the same data. FP8_KERNELS="3 ..." also runs --fp8
#     with each of those grouped-GEMM variants (DSV3_MOE_FP8_KERNEL, kernels/moe_gemm_fp8).
#     FP8_ENVS="A=1,B=2 C=3" also runs --fp8 once per word with those variables set (commas
#     between variables), e.g. DSV3_FP8_MIN_DIM=0 (every linear layer in FP8).
# Usage: scripts/bench-fp8.sh [STEPS] [B] [GB]   (defaults 4 4 16; build first; BUILD=build).
# SKIP_GEMM=1 leaves out part 1, SKIP_LAYER=1 part 2. For docs/PERF.md.
set -eu
BUILD=${BUILD:-build}
steps=${1:-4} B=${2:-4} GB=${3:-16} L=4096
echo "# $(date -u '+%F %H:%M UTC') $(hostname) $(nproc) cores commit ${DSV3_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo ?)}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/# /' || true
if [ "${SKIP_GEMM:-0}" = 0 ]; then
    echo "== 1. GEMMs and quantisers (tests/gpu/test_fp8)"
    DSV3_GPU_BENCH=1 "$BUILD/tests/gpu/test_fp8"
fi
if [ "${SKIP_LAYER:-0}" = 0 ]; then
    echo "== 2. a linear layer's step through kernels/fp8lin (tests/gpu/test_fp8lin)"
    DSV3_GPU_BENCH=1 "$BUILD/tests/gpu/test_fp8lin"
fi
[ "$steps" -gt 0 ] || exit 0

echo "== 3. dsv3-train --device cuda, 1b-moe, B=$B, global batch $GB x $L tokens, $steps steps"
bin=$(cd "$BUILD/bin" && pwd)
T=$(mktemp -d /tmp/dsv3-bench-fp8-XXXXXX)
trap 'rm -rf "$T"' EXIT
recs=$((GB * steps + GB))
awk -v n="$recs" -v L="$L" 'BEGIN { srand(7); for (i = 0; i < n; i++) { s = "";
     for (j = 0; j < L + 8; j++) s = s (j ? " " : "") (2 + int(rand() * 129000)); print s } }' >"$T/ids.txt"
"$bin/dsv3-shard" make --vocab-size 129280 -o "$T/a.shard" "$T/ids.txt"
"$bin/dsv3-pack" --quiet -o "$T/data" --eos-id 1 -L $L -s 1 "$T/a.shard"
median() { # tokens/s of the steps after the first in metrics.jsonl $1
    sed -n 's/.*"tokens_per_s":\([^,]*\).*/\1/p' "$1" | tail -n +2 | sort -g |
        awk '{ v[NR] = $1 } END { if (NR) printf "%.0f\n", (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
}
run() { # NAME BINDIR FLAGS...
    name=$1 bd=$2
    shift 2
    "$bd/dsv3-train" -c configs/1b-moe.json -d "$T/data" -o "$T/$name" -b "$B" -g "$GB" \
        --steps "$steps" --mtp-weight 0 --balance-alpha 0 --device cuda "$@" 2>&1 | grep '^step' || true
    echo "$name: median $(median "$T/$name/metrics.jsonl") tokens/s (steps 2-$steps)"
    rm -rf "$T/$name"/step-*
}
run bf16 "$bin"
run fp8 "$bin" --fp8
[ -n "${BEFORE_BUILD:-}" ] && run fp8-before "$(cd "$BEFORE_BUILD/bin" && pwd)" --fp8
for v in ${FP8_ENVS:-}; do
    (for kv in $(echo "$v" | tr ',' ' '); do export "$kv"; done && run "fp8[$v]" "$bin" --fp8)
done
for v in ${FP8_KERNELS:-}; do
    (export DSV3_MOE_FP8_KERNEL="$v" && run "fp8-kernel$v" "$bin" --fp8)
done
exit 0
