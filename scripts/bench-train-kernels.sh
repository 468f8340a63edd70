#!/bin/sh
# Where one training step's time goes: tests/bench/bench_train_kernels traces one forward +
# backward of the 1B-class MoE (configs/1b-moe.json, MTP off, B sequences of T tokens,
# random weights) with CUPTI's activity API and prints every kernel's time by phase, then
# the kernel groups with their floors (FLOPs over the bf16 GEMM rate of an 8192^3 cuBLASLt
# product, bytes over the device copy rate, both measured in the same process) and each
# group's distance from its floor. For docs/PERF.md.
# Usage: scripts/bench-train-kernels.sh [B] [T]   (defaults 4 4096)
# BEFORE="VAR=value ..." runs it a second time first with those variables (e.g. the earlier
# head: BEFORE="DSV3_HEAD_CHUNK=640 DSV3_CE_KERNEL=1") and prints the groups side by side;
# BEFORE_BIN=path runs that first pass with another build's bench_train_kernels.
# DSV3_CUPTI_LIB=path/libcupti.so.13 where libcupti is not on the loader's path.
# DSV3_BENCH_FP8=1 traces the FP8 step (every linear layer; 2: dsv3-train --fp8's policy):
# BEFORE="DSV3_BENCH_FP8=0" DSV3_BENCH_FP8=1 gives bf16 and FP8 side by side.
set -eu
BUILD=${BUILD:-build}
B=${1:-4} T=${2:-4096}
bin="$BUILD/tests/bench/bench_train_kernels"
[ -x "$bin" ] || make --no-print-directory "$bin" >/dev/null
echo "# $(date -u '+%F %H:%M UTC') $(hostname) commit ${DSV3_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo ?)}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/# /' || true
tmp=$(mktemp -d /tmp/dsv3-bench-kernels-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
if [ -n "${BEFORE:-}${BEFORE_BIN:-}" ]; then
    echo "== before: ${BEFORE_BIN:-} ${BEFORE:-}"
    env ${BEFORE:-} "${BEFORE_BIN:-$bin}" "$B" "$T" | tee "$tmp/before.txt"
fi
echo "== now"
"$bin" "$B" "$T" | tee "$tmp/now.txt"
if [ -n "${BEFORE:-}${BEFORE_BIN:-}" ]; then
    echo "== groups, before -> now (ms)"
    # group rows: "g name|calls|ms|..." (older builds: "g name calls ms ..."); joined by name
    norm='/^g / { s = substr($0, 3); if (index(s, "|")) { split(s, f, "|"); n = f[1]; ms = f[3] }
           else { match(s, / +[0-9]+ +[0-9.]+ +[0-9.]+%/); n = substr(s, 1, RSTART - 1);
                  split(substr(s, RSTART), f, " "); ms = f[2] }
           sub(/ +$/, "", n); print n "|" ms }'
    awk "$norm" "$tmp/before.txt" >"$tmp/b"
    awk "$norm" "$tmp/now.txt" >"$tmp/n"
    awk -F'|' 'NR == FNR { b[$1] = $2; next }
        { printf "%-50s %9s %9.3f\n", $1, ($1 in b) ? sprintf("%.3f", b[$1]) : "-", $2; seen[$1] = 1 }
        END { for (k in b) if (!(k in seen)) printf "%-50s %9.3f %9s\n", k, b[k], "-" }' "$tmp/b" "$tmp/n"
    grep '^# kernels' "$tmp/before.txt" "$tmp/now.txt" | sed 's/.*traced fwd+bwd \([^ ]*\) ms.*/traced step \1 ms/'
fi
