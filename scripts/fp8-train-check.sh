#!/bin/sh
# dsv3-train --device cuda with and without --fp8 from the same start on the same data: the
# short-run check of FP8 training (the 1000-step comparison of issue 10, on real text, is
# scripts/fp8-train-compare.sh).
# Data: sequences that count up from a random start by a random stride (learnable, so the
# loss falls); model: configs/1b-moe.json with LAYERS layers (default 4); B sequences of L
# tokens a micro-batch, global batch GB, STEPS steps. Prints both runs' step lines and the
# relative difference of their final losses.
# Usage: scripts/fp8-train-check.sh [STEPS] [LAYERS] [B] [GB] [L]   (defaults 30 4 4 8 1024)
set -eu
# every linear layer in FP8 (dsv3-train --fp8 keeps the small ones bf16 by default:
# GMODEL_FP8_PAYS, kernels/gmodel.h); this checks FP8's numerics on a small model
export DSV3_FP8_MIN_DIM=${DSV3_FP8_MIN_DIM:-0}
BUILD=${BUILD:-build}
steps=${1:-30} layers=${2:-4} B=${3:-4} GB=${4:-8} L=${5:-1024}
bin=$(cd "$BUILD/bin" && pwd)
T=$(mktemp -d /tmp/dsv3-fp8-check-XXXXXX)
trap 'rm -rf "$T"' EXIT
echo "# $(date -u '+%F %H:%M UTC') $(hostname) commit ${DSV3_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo ?)}"
sed "s/\"num_hidden_layers\": [0-9]*/\"num_hidden_layers\": $layers/" configs/1b-moe.json >"$T/cfg.json"
recs=$((GB * steps + GB))
awk -v n="$recs" -v L="$L" 'BEGIN { srand(11); for (i = 0; i < n; i++) {
     a = int(rand() * 5000); d = 1 + int(rand() * 7); s = "";
     for (j = 0; j < L + 8; j++) s = s (j ? " " : "") (2 + (a + d * j) % 5000); print s } }' >"$T/ids.txt"
"$bin/dsv3-shard" make --vocab-size 129280 -o "$T/a.shard" "$T/ids.txt"
"$bin/dsv3-pack" --quiet -o "$T/data" --eos-id 1 -L "$L" -s 1 "$T/a.shard"
for mode in bf16 fp8; do
    flag=""
    [ $mode = fp8 ] && flag=--fp8
    echo "== $mode"
    "$bin/dsv3-train" -c "$T/cfg.json" -d "$T/data" -o "$T/run-$mode" -b "$B" -g "$GB" \
        --steps "$steps" --mtp-weight 0 --balance-alpha 0 --device cuda $flag 2>&1 |
        grep '^step' | tee "$T/$mode.txt" | awk 'NR <= 3 || NR % 10 == 0'
done
l16=$(tail -1 "$T/bf16.txt" | sed 's/.*loss \([^ ]*\).*/\1/')
l8=$(tail -1 "$T/fp8.txt" | sed 's/.*loss \([^ ]*\).*/\1/')
awk -v a="$l16" -v b="$l8" -v s="$steps" 'BEGIN { printf "final loss after %d steps: bf16 %.6f fp8 %.6f, relative difference %.3f%%\n", s, a, b, 100 * (b - a) / a }'
