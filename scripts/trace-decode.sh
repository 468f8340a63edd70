#!/bin/sh
# Where a batch-1 GPU decode step goes, kernel by kernel, in the running graph: dsv3-sample
# on a random bf16 folder of CONFIG (scripts/profile-decode.sh's recipe: a ~1200-token prompt,
# greedy, -c 2048) traced by the CUPTI injection library build/lib/dsv3/cupti-trace.so
# (tools/cupti_trace.c, DSV3_TRACE_SEQ=1): every kernel node of the replayed decode graphs
# with its start and end as it ran (PDL overlap, warm caches), unlike profile-decode.sh's
# Nsight Compute times (each node alone, caches flushed). The window is the decode steps
# after the first 16 (from one greedy argmax to the next). Printed, averaged over the
# window's steps: each kernel kind's launches a step, mean duration (from its first block's
# start, which under PDL includes waiting for the kernel before) and "exposed" time: how far
# its end moved the step's end past every end before it. The exposed times add up to the
# step; they are what each launch costs the step. Then one MoE layer of the last step in
# order. CUPTI's records cost a little time a kernel, so the traced step (printed) is
# somewhat slower than the untraced one (printed first).
# Usage: [BUILD=build] [CONFIG=configs/1b-moe.json] [N=64] [ENV="A=1 B=2"] scripts/trace-decode.sh
# DSV3_CUPTI_LIB=path where libcupti is not on the loader's path.
set -eu
BUILD=${BUILD:-build}
CONFIG=${CONFIG:-configs/1b-moe.json}
N=${N:-64}
BIN=$BUILD/bin
so=$(cd "$BUILD/lib/dsv3" && pwd)/cupti-trace.so
[ -f "$so" ] || { echo "trace-decode.sh: $so missing (built where cupti.h is)" >&2; exit 1; }
W=$(mktemp -d /tmp/dsv3-trace-decode-XXXXXX)
trap 'rm -rf "$W"' EXIT
. "$(dirname "$0")/decode-inputs.sh"
decode_folder "$BIN" "$W" "$CONFIG"
sample() {
    env ${ENV:-} "$@" "$BIN/dsv3-sample" -m "$W/model" -t "$W/tok.bpe" --device cuda \
        -f "$W/long.txt" --temp 0 --ignore-eos -c 2048 -n "$N"
}
sample >/dev/null 2>"$W/err"
echo "$(basename "$CONFIG" .json) ${ENV:-}, untraced: $(grep 'dsv3-sample: prompt' "$W/err")"
sample CUDA_INJECTION64_PATH="$so" DSV3_TRACE_SEQ=1 DSV3_TRACE_AFTER=argmax_k:16 \
    DSV3_TRACE_UNTIL=argmax_k DSV3_TRACE_OUT="$W/trace.txt" >/dev/null 2>"$W/err2" ||
    { tail -5 "$W/err2" >&2; exit 1; }
echo "traced: $(grep 'dsv3-sample: prompt' "$W/err2")"
[ -n "${OUT:-}" ] && cp "$W/trace.txt" "$OUT/trace-decode.txt"
python3 - "$W/trace.txt" <<'EOF'
import sys
seq = []
for line in open(sys.argv[1], errors="replace"):
    f = line.split()
    if len(f) >= 4 and f[0] == "seq":
        seq.append((" ".join(f[3:]), float(f[1]), float(f[2])))
if not seq:
    sys.exit("trace-decode.sh: no kernels in the trace window")
# the window starts after an argmax: cut it into steps, each ending with its argmax
steps, cur = [], []
for k in seq:
    cur.append(k)
    if k[0].startswith("argmax_k"):
        steps.append(cur); cur = []
if not steps:
    sys.exit("trace-decode.sh: no whole step in the window")
# A step: the host's copies (the next ids in, "[memcpy ...]"), the graph launch, the graph's
# kernels. The graph's part starts where its first kernel starts (the time before it is the
# host's: under CUPTI a graph launch costs the host far more than untraced, so it is reported
# apart and left out of the exposed times).
def graph_start(st):
    return next(i for i, k in enumerate(st) if not k[0].startswith("["))
kinds, order, total, before = {}, [], 0.0, 0.0
for st in steps:
    g0 = graph_start(st)
    hi = t0 = st[g0][1]
    before += t0 - st[0][1]
    for n, s, e in st[g0:]:
        ex = max(0.0, e - hi); hi = max(hi, e)
        if n not in kinds:
            kinds[n] = [0, 0.0, 0.0]; order.append(n)
        k = kinds[n]; k[0] += 1; k[1] += e - s; k[2] += ex
    total += hi - t0
S = len(steps)
print(f"{S} steps traced, {total / S:.1f} us a step (the graph's first kernel's start to the "
      f"argmax's end; before it {before / S:.1f} us of host copies and graph launch), "
      f"{sum(len(s) for s in steps) / S:.0f} kernels a step")
print(f"{'kernel':<34} {'a step':>6} {'us each':>8} {'exposed us a step':>18} {'each':>7}")
for n in sorted(order, key=lambda n: -kinds[n][2]):
    c, d, ex = kinds[n]
    print(f"{n[:34]:<34} {c / S:>6.0f} {d / c:>8.2f} {ex / S:>18.1f} {ex / c:>7.2f}")
last = steps[-1]
ri = [i for i, k in enumerate(last) if k[0].startswith("route")]
if len(ri) >= 4:
    a, b = ri[2] + 1, ri[3] + 1
    print(f"one MoE layer of the last step ({b - a} kernels): start, duration, exposed (us)")
    g0 = graph_start(last)
    hi = last[g0][1]
    for i, (n, s, e) in enumerate(last):
        if i < g0:
            continue
        ex = max(0.0, e - hi); hi = max(hi, e)
        if a <= i < b:
            print(f"  {n[:40]:<40} {s - last[g0][1]:>8.2f} {e - s:>7.2f} {ex:>7.2f}")
EOF
