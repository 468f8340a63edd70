#!/bin/sh
# Attention benchmark on the GPU, ours and torch's in one run on the same card:
#   build here (make), carry build/, run `scripts/bench-attn.sh` on the device machine.
# Prints tests/gpu/test_attention's '# bench' rows (forward and backward of the default
# kernels and of the mma.sync ones, V3 MLA shape B=1 T=4096 nh=128 dk/dv 192/128 and the
# 1B-MoE shape B=8 T=4096 nh=16 96/64, and that shape masked by document: packed documents
# of 1-2048 tokens, FLOPs of the visible pairs only) and torch SDPA's on the causal shapes
# (scripts/bench-attn-torch.py; no document-masked peer; PEER=0 skips it). Logs go to
# $OUT (the device tool's folder) or build/bench-attn.
# BEFORE_BIN=path: first the same rows from another build's test_attention (a baseline in
# the same call, tagged "before"); DEFAULT_ONLY=1: time the default kernels only;
# VARS="0 4 5": time those forward variants, in that order (gpu_attention_set_variant: 0 the
# default, 1 mma.sync, 3 pipelined wgmma, 4 and 5 the warp-specialised TMA forward of
# kernels/attention_ws.cuh, 5 keeping head dim 96 unpadded; rows tagged "variant N"; each
# variant's backward row is the Hopper backward alike for 0, 3, 4, 5).
# BWD_SWEEP="5 12 16 17 ...": then each Hopper backward candidate V (or V:L, with
# DSV3_ATTN_LPT=L; kernels/attention.cu f3_bwd_pick lists them: 5, 9, 10, 12, 16-22; any
# other value times the default) through test_attention's checks and the default kernels'
# timings, rows tagged "bwd=V:L". 9 and 10 are the fused backward (one kernel, dQ by fp32
# reductions; 96/64 only, the V3 192/128 rows then time the two-kernel ex2.approx path):
# e.g. BWD_SWEEP="5 9 10 9:1".
# FLOPs: forward 2 * B * nh * T(T+1)/2 * (dk + dv) (causal pairs, QK^T and PV);
# backward counted as 2.5 x forward (FlashAttention-2's convention), for both sides.
set -u
BUILD=${BUILD:-build}
LOG=${OUT:-$BUILD/bench-attn}
mkdir -p "$LOG"
st=0
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null
[ "${DEFAULT_ONLY:-0}" = 1 ] && export DSV3_ATTN_BENCH_DEFAULT=1
[ -n "${VARS:-}" ] && export DSV3_ATTN_BENCH_VARS="$VARS"
if [ -n "${BEFORE_BIN:-}" ]; then
    DSV3_GPU_BENCH=1 "$BEFORE_BIN" >"$LOG/before.log" 2>&1 || st=1
    grep '^# bench' "$LOG/before.log" | sed 's/^# bench/# before/'
fi
DSV3_GPU_BENCH=1 "$BUILD/tests/gpu/test_attention" >"$LOG/test_attention.log" 2>&1 || st=1
grep -v '^ok \|^# SEED' "$LOG/test_attention.log"
for c in ${BWD_SWEEP:-}; do
    v=${c%%:*} l=0
    [ "$c" != "$v" ] && l=${c#*:}
    DSV3_ATTN_BWD=$v DSV3_ATTN_LPT=$l DSV3_ATTN_BENCH_DEFAULT=1 DSV3_GPU_BENCH=1 \
        "$BUILD/tests/gpu/test_attention" >"$LOG/bwd$v-$l.log" 2>&1 || st=1
    f="$LOG/bwd$v-$l.log"
    echo "# bwd=$v:$l: tests $(grep -c '^ok ' "$f") ok, $(grep -c '^not ok' "$f") failed," \
        "$(grep -c '^skip ' "$f") skipped"
    grep '^not ok\|FAIL\|fail' "$f" | head -5
    grep '^# bench attn bwd' "$LOG/bwd$v-$l.log" | sed "s/^# bench/# bwd=$v:$l/"
done
if [ "${PEER:-1}" != 0 ] && command -v python3 >/dev/null 2>&1; then  # PEER=0: ours only
    python3 scripts/bench-attn-torch.py 2>&1 | tee "$LOG/torch.log"
fi
echo "# flop: fwd = 2 B nh T(T+1)/2 (dk+dv); bwd = 2.5 x fwd"
exit $st
