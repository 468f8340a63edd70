#!/bin/sh
# dsv3-train on one GPU: the 1B-class MoE (configs/1b-moe.json) at sequence length 4096.
# Two figures, with the FLOP floor stated:
#  1. the GPU model alone (tests/gpu/test_gmodel's bench: forward + backward of B x 4096
#     tokens, random weights), tokens/s and MFU against the bf16 GEMM rate of an 8192^3
#     cuBLASLt product measured in the same process;
#  2. dsv3-train --device cuda end to end (global batch GB sequences as micro-batches of B),
#     the median tokens/s of the steps after the first from metrics.jsonl, and its MFU on the
#     same floor (everything a step does: loader, forwards and backwards, gradient norm and
#     AdamW on the device, the bias update and its upload);
#  3. the PyTorch peer (scripts/bench-train-torch.py: HF transformers DeepseekV3ForCausalLM,
#     bf16, fused AdamW, same config, micro-batch and global batch) when torch is there.
# FLOPs per token: 6 * activated parameters (config_count_params: the head and one
# embedding row included, MTP off) + causal attention 3 * 2 * nh * (T+1)/2 * (dk + dv).
# Usage: scripts/bench-train.sh [B] [GB] [STEPS]   (defaults 4 16 3). For docs/PERF.md.
# BEFORE_BUILD=DIR also runs DIR/bin/dsv3-train (an earlier commit's build) on the same data.
set -eu
BUILD=${BUILD:-build}
B=${1:-4} GB=${2:-16} steps=${3:-3} L=4096
bin=$(cd "$BUILD/bin" && pwd)
T=$(mktemp -d /tmp/dsv3-bench-train-XXXXXX)
trap 'rm -rf "$T"' EXIT
echo "# $(date -u '+%F %H:%M UTC') $(hostname) $(nproc) cores commit ${DSV3_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo ?)}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/# /' || true

echo "== 1. GPU model forward + backward (test_gmodel bench, B=$B T=$L)"
DSV3_GPU_BENCH=1 DSV3_GMODEL_B=$B DSV3_GMODEL_T=$L "$BUILD/tests/gpu/test_gmodel" 2>&1 |
    grep -E '^# bench|^not ok|CHECK' | tee "$T/g.txt"
fpt=$(sed -n 's/^# bench flops_per_token \([^ ]*\) ceiling_tflops \([^ ]*\)$/\1/p' "$T/g.txt")
ceil=$(sed -n 's/^# bench flops_per_token \([^ ]*\) ceiling_tflops \([^ ]*\)$/\2/p' "$T/g.txt")

echo "== 2. dsv3-train --device cuda, 1b-moe, B=$B, global batch $GB x $L tokens, $steps steps"
recs=$((GB * steps + GB))
awk -v n="$recs" -v L="$L" 'BEGIN { srand(7); for (i = 0; i < n; i++) { s = "";
     for (j = 0; j < L + 8; j++) s = s (j ? " " : "") (2 + int(rand() * 129000)); print s } }' >"$T/ids.txt"
"$bin/dsv3-shard" make --vocab-size 129280 -o "$T/a.shard" "$T/ids.txt"
"$bin/dsv3-pack" --quiet -o "$T/data" --eos-id 1 -L $L -s 1 "$T/a.shard"
t0=$(date +%s)
"$bin/dsv3-train" -c configs/1b-moe.json -d "$T/data" -o "$T/run" -b "$B" -g "$GB" \
    --steps "$steps" --mtp-weight 0 --balance-alpha 0 --device cuda 2>&1 | tail -n "$((steps + 2))"
echo "# wall $(( $(date +%s) - t0 )) s for the run (setup, $steps steps, final checkpoint)"
sed -n 's/.*"step":\([0-9]*\).*"loss":\([^,]*\).*"tokens_per_s":\([^,]*\),"seconds":\([^,]*\).*/step \1 loss \2 tokens\/s \3 seconds \4/p' \
    "$T/run/metrics.jsonl"
tps=$(sed -n 's/.*"tokens_per_s":\([^,]*\).*/\1/p' "$T/run/metrics.jsonl" | tail -n +2 | sort -g |
      awk '{ v[NR] = $1 } END { if (NR) printf "%.0f\n", (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }')
if [ -n "$tps" ] && [ -n "$fpt" ]; then
    awk -v t="$tps" -v f="$fpt" -v c="$ceil" 'BEGIN { printf "dsv3-train end to end: %.0f tokens/s, %.1f TFLOP/s, MFU %.1f%% of %.0f TFLOP/s\n", t, t * f / 1e12, 100 * t * f / (c * 1e12), c }'
fi

if [ -n "${BEFORE_BUILD:-}" ]; then  # an earlier build's dsv3-train on the same data: before/after
    echo "== 2b. the same with $BEFORE_BUILD/bin/dsv3-train (an earlier commit)"
    "$BEFORE_BUILD/bin/dsv3-train" -c configs/1b-moe.json -d "$T/data" -o "$T/run0" -b "$B" -g "$GB" \
        --steps "$steps" --mtp-weight 0 --balance-alpha 0 --device cuda --quiet 2>&1 | tail -n 2
    sed -n 's/.*"tokens_per_s":\([^,]*\).*/\1/p' "$T/run0/metrics.jsonl" | tail -n +2 | sort -g |
        awk -v f="$fpt" -v c="$ceil" '{ v[NR] = $1 } END { if (NR) { t = (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2);
            printf "before: dsv3-train end to end: %.0f tokens/s, MFU %.1f%% of %.0f TFLOP/s\n", t, 100 * t * f / (c * 1e12), c } }'
fi

echo "== 3. PyTorch peer: HF transformers DeepseekV3ForCausalLM, same config, B=$B, global $GB"
if python3 -c 'import torch, transformers' 2>/dev/null; then
    timeout "${TORCH_TIMEOUT:-240}" python3 scripts/bench-train-torch.py "$B" "$GB" "$steps" "$fpt" "$ceil" 2>&1 |
        grep -v Warning || echo "# the PyTorch peer failed or timed out"
else
    echo "# no torch/transformers here: peer skipped"
fi
