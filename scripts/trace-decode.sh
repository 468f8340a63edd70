#!/bin/sh
# Where one batch-1 GPU decode step goes in the running graph, for the lent device machine:
# dsv3-sample on a random bf16 folder of CONFIG (scripts/profile-decode.sh's recipe) under
# Nsight Systems with --cuda-graph-trace=node, so every kernel node of the replayed decode
# graphs gets its start and end as it ran (PDL overlap, warm caches, no replay between
# kernels), unlike profile-decode.sh's Nsight Compute times (each node alone, caches
# flushed). Prints for the last full decode step (after one greedy argmax to the next) each
# kernel kind's count, mean duration (from its blocks' start, which under PDL includes
# waiting for the kernel before) and "exposed" time: how far its end moved the step's end
# past the ends before it; the exposed times add up to the step. Then the kernels of one MoE
# layer in order. Extra dsv3-sample options after the variables, e.g. ENV="DSV3_GINFER_FUSE=0".
# Usage: [BUILD=build] [CONFIG=configs/1b-moe.json] [N=16] [ENV="A=1 B=2"] scripts/trace-decode.sh
set -eu
BUILD=${BUILD:-build}
CONFIG=${CONFIG:-configs/1b-moe.json}
N=${N:-16}
BIN=$BUILD/bin
command -v nsys >/dev/null 2>&1 || { echo "trace-decode.sh: no nsys on PATH" >&2; exit 1; }
W=$(mktemp -d /tmp/dsv3-trace-decode-XXXXXX)
trap 'rm -rf "$W"' EXIT
awk 'BEGIN { for (i = 0; i < 500; i++) print "the cat sat on the mat number " i " and then ran home" }' >"$W/corpus.txt"
"$BIN/dsv3-tok" train -v 400 -o "$W/tok.bpe" "$W/corpus.txt" 2>/dev/null
"$BIN/dsv3-config" --quiet --init "$W/model" --seed 1 --bf16 "$CONFIG"
awk 'BEGIN { for (i = 0; i < 90; i++) printf "the cat sat on the mat number %d and then ran home ", i }' >"$W/long.txt"
sample() {
    env ${ENV:-} "$@" "$BIN/dsv3-sample" -m "$W/model" -t "$W/tok.bpe" --device cuda \
        -f "$W/long.txt" --temp 0 --ignore-eos -c 2048 -n "$N"
}
sample >/dev/null 2>"$W/err"
echo "$(basename "$CONFIG" .json) ${ENV:-}, without the profiler: $(grep 'dsv3-sample: prompt' "$W/err")"
sample nsys profile --cuda-graph-trace=node -t cuda --sample=none --cpuctxsw=none -o "$W/rep" \
    >"$W/nsys.out" 2>&1 || { tail -5 "$W/nsys.out" >&2; exit 1; }
nsys stats -q -r cuda_gpu_trace -f csv -o "$W/tr" "$W/rep.nsys-rep" >/dev/null 2>&1
[ -n "${OUT:-}" ] && cp "$W/tr_cuda_gpu_trace.csv" "$OUT/trace-decode.csv"
python3 - "$W/tr_cuda_gpu_trace.csv" <<'EOF'
import csv, re, sys
rd = csv.DictReader(open(sys.argv[1]))
rows = []
for r in rd:
    name = r.get("Name", "")
    if not r.get("GrdX"):  # memcpy / memset rows
        continue
    name = re.sub(r"\(.*", "", name).replace("void ", "")
    name = re.sub(r"<.*", "", name)
    s = int(r["Start (ns)"]); d = int(r["Duration (ns)"])
    rows.append((name, s, s + d, f'({r["GrdX"]},{r["GrdY"]},{r["GrdZ"]})'))
rows.sort(key=lambda t: t[1])
ends = [i for i, t in enumerate(rows) if "argmax" in t[0]]
if len(ends) < 2:
    sys.exit("trace-decode.sh: fewer than two argmax kernels in the trace")
step = rows[ends[-2] + 1:ends[-1] + 1]
t0 = rows[ends[-2]][2]
hi, kinds, seq = t0, {}, []
for n, s, e, g in step:
    ex = max(0, e - hi); hi = max(hi, e)
    k = kinds.setdefault(n, [0, 0, 0])
    k[0] += 1; k[1] += e - s; k[2] += ex
    seq.append((n, (s - t0) / 1e3, (e - s) / 1e3, ex / 1e3, g))
print(f"last decode step: {len(step)} kernels, {(hi - t0) / 1e3:.1f} us from the argmax before to its argmax")
print(f"{'kernel':<26} {'count':>5} {'us each':>8} {'exposed us':>11} {'a kernel':>9}")
for n, (c, d, ex) in sorted(kinds.items(), key=lambda kv: -kv[1][2]):
    print(f"{n[:26]:<26} {c:>5} {d / c / 1e3:>8.2f} {ex / 1e3:>11.1f} {ex / c / 1e3:>9.2f}")
# one MoE layer: the kernels from the 3rd route kernel's layer (the 12 before its experts)
rk = [i for i, t in enumerate(seq) if t[0].startswith("route")]
if len(rk) >= 3:
    a = rk[1] + 3; b = rk[2] + 3
    print(f"one MoE layer's kernels ({b - a}): start (us after the step's start), duration, exposed, grid")
    for n, s, d, ex, g in seq[a:b]:
        print(f"  {n[:26]:<26} {s:>8.2f} {d:>7.2f} {ex:>7.2f}  {g}")
EOF
