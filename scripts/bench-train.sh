#!/bin/sh
# dsv3-train on one GPU against the PyTorch peer, for configs/small.json and the 1B-class
# MoE (configs/1b-moe.json), both at sequence length 4096, in one run on one card:
#  1. the GPU model alone (tests/gpu/test_gmodel's bench: forward + backward of B x 4096
#     tokens of 1b-moe, random weights), tokens/s and MFU against the bf16 GEMM rate of an
#     8192^3 cuBLASLt product measured in the same process (the ceiling every MFU here uses);
#  2. per config: dsv3-train --device cuda end to end (global batch GB sequences as
#     micro-batches of B), the median tokens/s of the steps after the first from
#     metrics.jsonl, its MFU, and the peak GPU memory (nvidia-smi's memory.used sampled every
#     100 ms during the run, less what was in use before: the whole process, context
#     included); with RECOMPUTE=1 also dsv3-train --recompute on the same data (its speed
#     cost and memory saving);
#  3. per config: the PyTorch peer (scripts/bench-train-torch.py: HF transformers
#     DeepseekV3ForCausalLM, bf16, fused AdamW, same config, micro-batch and global batch)
#     when torch is there, its peak memory sampled the same way (and torch's own
#     max_memory_allocated).
# FLOPs per token: 6 * activated parameters (dsv3-config's count: the head and one
# embedding row included, MTP off) + causal attention 3 * 2 * nh * (T+1)/2 * (dk + dv) per
# layer.
# Usage: scripts/bench-train.sh [B] [GB] [STEPS]   (1b-moe; defaults 4 16 3). configs/small
# runs with SMALL_B x 4096 micro-batches (default 8) and SMALL_GB (default 32). CONFIGS
# picks the configs (default "small 1b-moe"). MODEL_BENCH=0 skips part 1 (then
# CEILING_TFLOPS, a GEMM rate measured on the same card, e.g. by scripts/bench-attn.sh in the
# same call, gives the MFU floor). The end-to-end line also gives MFU against the datasheet's
# dense BF16 peak, PEAK_TFLOPS (default 989.4: H100 and H200 SXM; what dsv3-train's step line
# divides by). RECOMPUTE=1 also runs tests/gpu/test_recompute's bench
# (1b-moe forward + backward with and without recomputation: time and activation arena) and
# dsv3-train --recompute per config. For docs/PERF.md.
# BEFORE_BUILD=DIR also runs DIR/bin/dsv3-train (an earlier commit's build) on 1b-moe's data.
# DOCMASK=1: packed documents of 1 to 2048 tokens (uniform, as tests/gpu/test_attention's
# bench) trained with --doc-mask (every dsv3-train run, the PyTorch peer excepted: it does
# not mask), and each config once more with --nondeterministic (the fused attention
# backward for documents): its tokens/s against the deterministic run's. The FLOPs still
# count causal attention over the whole sequence (more than masking computes).
set -eu
BUILD=${BUILD:-build}
B=${1:-4} GB=${2:-16} steps=${3:-3} L=4096
PEAK_TFLOPS=${PEAK_TFLOPS:-989.4}
CONFIGS=${CONFIGS:-small 1b-moe}
bin=$(cd "$BUILD/bin" && pwd)
T=$(mktemp -d /tmp/dsv3-bench-train-XXXXXX)
trap 'rm -rf "$T"' EXIT
echo "# $(date -u '+%F %H:%M UTC') $(hostname) $(nproc) cores commit ${DSV3_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo ?)}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/# /' || true

# memrun NAME CMD...: runs CMD while sampling the GPU's memory.used; prints the peak above
# the memory in use before, in GiB, into $T/NAME.mem.
memrun() {
    name=$1; shift
    base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n 1)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$T/$name.smi" 2>/dev/null &
    smi=$!
    st=0
    "$@" || st=$?
    kill "$smi" 2>/dev/null || true
    wait "$smi" 2>/dev/null || true
    awk -v b="${base:-0}" '{ if ($1 > m) m = $1 } END { printf "%.1f\n", (m - b) / 1024 }' "$T/$name.smi" >"$T/$name.mem"
    return $st
}

median_tps() {  # metrics.jsonl: the median tokens/s of the steps after the first
    sed -n 's/.*"tokens_per_s":\([^,]*\).*/\1/p' "$1" | tail -n +2 | sort -g |
        awk '{ v[NR] = $1 } END { if (NR) printf "%.0f\n", (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
}

if [ "${MODEL_BENCH:-1}" != 0 ]; then
    echo "== 1. GPU model forward + backward (test_gmodel bench, 1b-moe, B=$B T=$L)"
    DSV3_GPU_BENCH=1 DSV3_GMODEL_B=$B DSV3_GMODEL_T=$L "$BUILD/tests/gpu/test_gmodel" 2>&1 |
        grep -E '^# bench|^not ok|CHECK' | tee "$T/g.txt"
    ceil=$(sed -n 's/^# bench flops_per_token \([^ ]*\) ceiling_tflops \([^ ]*\)$/\2/p' "$T/g.txt")
else
    ceil=${CEILING_TFLOPS:-}
    echo "# part 1 skipped; ceiling ${ceil:-unknown} TFLOP/s (CEILING_TFLOPS)"
fi
if [ "${RECOMPUTE:-0}" = 1 ]; then
    echo "== 1r. 1b-moe forward + backward with and without --recompute (test_recompute bench, B=$B T=$L)"
    DSV3_GPU_BENCH=1 DSV3_GMODEL_B=$B DSV3_GMODEL_T=$L "$BUILD/tests/gpu/test_recompute" 2>&1 |
        grep -E '^# |^not ok|CHECK' | grep -v SEED || true
fi

for cfg in $CONFIGS; do
    if [ "$cfg" = small ]; then cb=${SMALL_B:-8} cg=${SMALL_GB:-32}; else cb=$B cg=$GB; fi
    json=configs/$cfg.json
    vocab=$(sed -n 's/.*"vocab_size": *\([0-9]*\).*/\1/p' "$json")
    act=$("$bin/dsv3-config" "$json" | sed -n 's/^  activated *\([0-9]*\).*/\1/p')
    fpt=$(awk -v a="$act" -v L="$L" -v f="$json" 'BEGIN {
        while ((getline line < f) > 0) { if (match(line, /"[a-z_]*": *[0-9.]+/)) {
            split(substr(line, RSTART, RLENGTH), kv, ":"); gsub(/[" ]/, "", kv[1]); c[kv[1]] = kv[2] + 0 } }
        d = c["qk_nope_head_dim"] + c["qk_rope_head_dim"] + c["v_head_dim"]
        printf "%.6g\n", 6 * a + 3 * c["num_attention_heads"] * (L + 1) * d * c["num_hidden_layers"] }')
    echo "== 2. dsv3-train --device cuda, $cfg, B=$cb, global batch $cg x $L tokens, $steps steps ($fpt FLOP/token)"
    recs=$((cg * steps + cg))
    # records of L + 8 tokens, or with DOCMASK=1 as many tokens in documents of 1..2048
    awk -v n="$recs" -v L="$L" -v V="$vocab" -v dm="${DOCMASK:-0}" 'BEGIN { srand(7);
         for (left = n * (L + 8); left > 0; left -= len) { len = dm == 1 ? 1 + int(rand() * 2048) : L + 8;
         s = ""; for (j = 0; j < len; j++) s = s (j ? " " : "") (2 + int(rand() * (V - 300))); print s } }' >"$T/ids.txt"
    dm=; [ "${DOCMASK:-0}" = 1 ] && dm=--doc-mask
    rm -rf "$T/a.shard" "$T/data" "$T/run" "$T/runrc" "$T/runnd"
    "$bin/dsv3-shard" make --vocab-size "$vocab" -o "$T/a.shard" "$T/ids.txt"
    "$bin/dsv3-pack" --quiet -o "$T/data" --eos-id 1 -L $L -s 1 "$T/a.shard"
    t0=$(date +%s)
    memrun "$cfg" "$bin/dsv3-train" -c "$json" -d "$T/data" -o "$T/run" -b "$cb" -g "$cg" \
        --steps "$steps" --mtp-weight 0 --balance-alpha 0 --device cuda $dm >"$T/train.log" 2>&1 || true
    grep -E 'activations kept|^step' "$T/train.log" | tail -n "$((steps + 1))"
    [ -s "$T/run/metrics.jsonl" ] || { echo "# dsv3-train failed:"; tail -n 5 "$T/train.log"; }
    echo "# wall $(( $(date +%s) - t0 )) s for the run (setup, $steps steps, final checkpoint)"
    tps=$(median_tps "$T/run/metrics.jsonl")
    [ -n "$tps" ] && [ -n "$ceil" ] &&
        awk -v t="$tps" -v f="$fpt" -v c="$ceil" -v p="$PEAK_TFLOPS" -v m="$(cat "$T/$cfg.mem")" -v n="$cfg" 'BEGIN { printf "dsv3-train %s end to end: %.0f tokens/s, %.1f TFLOP/s, MFU %.1f%% of %.0f TFLOP/s (%.1f%% of the %.1f datasheet peak), peak GPU memory %s GiB\n", n, t, t * f / 1e12, 100 * t * f / (c * 1e12), c, 100 * t * f / (p * 1e12), p, m }'
    if [ -n "$dm" ]; then
        memrun "$cfg-nd" "$bin/dsv3-train" -c "$json" -d "$T/data" -o "$T/runnd" -b "$cb" -g "$cg" \
            --steps "$steps" --mtp-weight 0 --balance-alpha 0 --device cuda $dm --nondeterministic >"$T/trainnd.log" 2>&1 || true
        grep -E 'activations kept|nondeterministic' "$T/trainnd.log" ||
            { echo "# dsv3-train --nondeterministic failed:"; tail -n 5 "$T/trainnd.log"; }
        tn=$(median_tps "$T/runnd/metrics.jsonl")
        [ -n "$tn" ] && [ -n "$tps" ] && [ -n "$ceil" ] &&
            awk -v t="$tn" -v t0="$tps" -v f="$fpt" -v c="$ceil" -v m="$(cat "$T/$cfg-nd.mem")" -v n="$cfg" 'BEGIN { printf "dsv3-train %s --doc-mask --nondeterministic: %.0f tokens/s (%+.1f%% against --doc-mask alone), MFU %.1f%%, peak GPU memory %s GiB\n", n, t, 100 * (t / t0 - 1), 100 * t * f / (c * 1e12), m }'
        for r in run runnd; do
            printf '# losses %s: %s\n' "$r" "$(sed -n 's/.*"loss":\([^,]*\).*/\1/p' "$T/$r/metrics.jsonl" | tr '\n' ' ')"
        done
    fi
    if [ "${RECOMPUTE:-0}" = 1 ]; then
        memrun "$cfg-rc" "$bin/dsv3-train" -c "$json" -d "$T/data" -o "$T/runrc" -b "$cb" -g "$cg" \
            --steps "$steps" --mtp-weight 0 --balance-alpha 0 --device cuda --recompute $dm >"$T/trainrc.log" 2>&1 || true
        grep -E 'activations kept' "$T/trainrc.log" ||
            { echo "# dsv3-train --recompute failed:"; tail -n 5 "$T/trainrc.log"; }
        tr=$(median_tps "$T/runrc/metrics.jsonl")
        [ -n "$tr" ] && [ -n "$ceil" ] &&
            awk -v t="$tr" -v t0="$tps" -v f="$fpt" -v c="$ceil" -v m="$(cat "$T/$cfg-rc.mem")" -v n="$cfg" 'BEGIN { printf "dsv3-train %s --recompute: %.0f tokens/s (%+.1f%%), MFU %.1f%%, peak GPU memory %s GiB\n", n, t, 100 * (t / t0 - 1), 100 * t * f / (c * 1e12), m }'
        # the same losses to the last digit (recomputation gives the same bits)
        l1=$(sed -n 's/.*"loss":\([^,]*\).*"grad_norm":\([^,]*\).*/\1 \2/p' "$T/run/metrics.jsonl" | md5sum)
        l2=$(sed -n 's/.*"loss":\([^,]*\).*"grad_norm":\([^,]*\).*/\1 \2/p' "$T/runrc/metrics.jsonl" | md5sum)
        [ -s "$T/runrc/metrics.jsonl" ] && [ "$l1" = "$l2" ] && echo "# --recompute: losses and gradient norms identical to the run without" ||
            echo "# --recompute: losses or gradient norms DIFFER from the run without"
    fi
    if [ -n "${BEFORE_BUILD:-}" ] && [ "$cfg" = 1b-moe ]; then
        echo "== 2b. the same with $BEFORE_BUILD/bin/dsv3-train (an earlier commit)"
        "$BEFORE_BUILD/bin/dsv3-train" -c "$json" -d "$T/data" -o "$T/run0" -b "$cb" -g "$cg" \
            --steps "$steps" --mtp-weight 0 --balance-alpha 0 --device cuda --quiet $dm 2>&1 | tail -n 2
        t=$(median_tps "$T/run0/metrics.jsonl")
        [ -n "$t" ] && awk -v t="$t" -v f="$fpt" -v c="$ceil" 'BEGIN { printf "before: dsv3-train end to end: %.0f tokens/s, MFU %.1f%% of %.0f TFLOP/s\n", t, 100 * t * f / (c * 1e12), c }'
    fi
    echo "== 3. PyTorch peer: HF transformers DeepseekV3ForCausalLM, $cfg, B=$cb, global $cg"
    if python3 -c 'import torch, transformers' 2>/dev/null; then
        memrun "$cfg-torch" env BENCH_CONFIG="$json" timeout "${TORCH_TIMEOUT:-240}" \
            python3 scripts/bench-train-torch.py "$cb" "$cg" "$steps" "$fpt" "$ceil" >"$T/torch.log" 2>&1 ||
            echo "# the PyTorch peer failed or timed out"
        grep -v Warning "$T/torch.log" || true
        echo "PyTorch $cfg: peak GPU memory $(cat "$T/$cfg-torch.mem") GiB (nvidia-smi, as dsv3's)"
    else
        echo "# no torch/transformers here: peer skipped"
    fi
done
