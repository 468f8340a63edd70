#!/bin/sh
# Where a whole dsv3-train step's time goes on the GPU, idle time included: dsv3-train
# --device cuda on configs/1b-moe.json (random tokens, sequence 4096, micro-batch B, global
# batch GB, STEPS steps) traced by the CUPTI injection library build/lib/dsv3/cupti-trace.so
# (tools/cupti_trace.c). The window starts after the first optimizer step (warm-up left
# out) and ends with the last one (the final checkpoint's copies left out); the report
# gives the device's busy and idle time, the idle split into "host behind" and
# launch/dependency, the largest gaps by kernel pair with the host calls made during them,
# and the kernels by time. CUPTI's API records add a few microseconds a call, so the
# traced run's tokens/s (printed) is a little below an untraced one.
# Usage: scripts/trace-train.sh [B] [GB] [STEPS]   (defaults 8 32 3); CONFIG=configs/x.json;
# EXTRA="--fp8 ..." more dsv3-train options. DSV3_CUPTI_LIB=path where libcupti is not on the
# loader's path.
set -eu
BUILD=${BUILD:-build}
B=${1:-8} GB=${2:-32} steps=${3:-3} L=4096
json=${CONFIG:-configs/1b-moe.json}
bin=$(cd "$BUILD/bin" && pwd)
so=$(cd "$BUILD/lib/dsv3" && pwd)/cupti-trace.so
[ -f "$so" ] || { echo "trace-train: $so missing (built where cupti.h is)" >&2; exit 1; }
T=$(mktemp -d /tmp/dsv3-trace-train-XXXXXX)
trap 'rm -rf "$T"' EXIT
echo "# $(date -u '+%F %H:%M UTC') $(hostname) commit ${DSV3_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo ?)}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/# /' || true
vocab=$(sed -n 's/.*"vocab_size": *\([0-9]*\).*/\1/p' "$json")
recs=$((GB * steps + GB))
awk -v n="$recs" -v L="$L" -v V="$vocab" 'BEGIN { srand(7); for (i = 0; i < n; i++) {
     s = ""; for (j = 0; j < L + 8; j++) s = s (j ? " " : "") (2 + int(rand() * (V - 300))); print s } }' >"$T/ids.txt"
"$bin/dsv3-shard" make --vocab-size "$vocab" -o "$T/a.shard" "$T/ids.txt"
"$bin/dsv3-pack" --quiet -o "$T/data" --eos-id 1 -L $L -s 1 "$T/a.shard"
echo "== dsv3-train $json B=$B global $GB x $L, $steps steps ${EXTRA:-}, traced after the first update"
CUDA_INJECTION64_PATH="$so" DSV3_TRACE_AFTER=adamw_kernel:1 DSV3_TRACE_UNTIL=adamw_kernel DSV3_TRACE_OUT="$T/trace.txt" \
    "$bin/dsv3-train" -c "$json" -d "$T/data" -o "$T/run" -b "$B" -g "$GB" --steps "$steps" \
    --mtp-weight 0 --balance-alpha 0 --device cuda ${EXTRA:-} >"$T/train.log" 2>&1 ||
    { echo "# dsv3-train failed:"; tail -n 5 "$T/train.log"; exit 1; }
grep '^step' "$T/train.log" | tail -n "$steps"
sed -n 's/.*"step":\([0-9]*\).*"tokens_per_s":\([^,]*\).*/# step \1: \2 tokens\/s (traced)/p' "$T/run/metrics.jsonl"
cat "$T/trace.txt"
