#!/bin/sh
# Where one batch-1 GPU decode step goes, kernel by kernel, for the lent device machine:
# dsv3-sample on a random bf16 folder of CONFIG (default configs/1b-moe.json; the recipe of
# scripts/bench-sample.sh: a ~1200-token prompt, greedy) under Nsight Compute with
# --graph-profiling node, so every node of the decode graph is timed alone
# (gpu__time_duration, clocks left alone). Prints the last full decode step (from the kernel
# after one greedy argmax to the next argmax): each kernel kind's count, summed and mean
# device time, then the sum. The sum against the step's time without the profiler (the
# "decode ... tokens/s" line printed first, events around each graph replay) is how much of
# a step is the kernels' own work and how much is the time between them (launch latency,
# the wait for the kernel before to drain).
# Usage: [BUILD=build] [CONFIG=configs/1b-moe.json] [N=4] scripts/profile-decode.sh
set -eu
BUILD=${BUILD:-build}
CONFIG=${CONFIG:-configs/1b-moe.json}
N=${N:-4}
BIN=$BUILD/bin
command -v ncu >/dev/null 2>&1 || { echo "profile-decode.sh: no ncu on PATH" >&2; exit 1; }
W=$(mktemp -d /tmp/dsv3-profile-decode-XXXXXX)
trap 'rm -rf "$W"' EXIT
. "$(dirname "$0")/decode-inputs.sh"
decode_folder "$BIN" "$W" "$CONFIG"
sample() {
    "$BIN/dsv3-sample" -m "$W/model" -t "$W/tok.bpe" --device cuda -f "$W/long.txt" --temp 0 \
        --ignore-eos -c 2048 "$@"
}
sample -n 128 >/dev/null 2>"$W/err"
echo "$(basename "$CONFIG" .json), without the profiler: $(grep 'dsv3-sample: prompt' "$W/err")"
ncu --graph-profiling node --clock-control none --metrics gpu__time_duration.sum --csv \
    "$BIN/dsv3-sample" -m "$W/model" -t "$W/tok.bpe" --device cuda -f "$W/long.txt" --temp 0 \
    --ignore-eos -c 2048 -n "$N" >"$W/ncu.csv" 2>"$W/ncu.err" || { tail -5 "$W/ncu.err" >&2; exit 1; }
[ -n "${OUT:-}" ] && cp "$W/ncu.csv" "$OUT/profile-decode.csv"
python3 - "$W/ncu.csv" <<'EOF'
import csv, re, sys
rows = []
for r in csv.reader(l for l in open(sys.argv[1], errors="replace") if l.startswith('"')):
    if r[0] == "ID" or len(r) < 15 or r[12] != "gpu__time_duration.sum":
        continue
    v = float(r[14].replace(",", ""))
    v *= {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}.get(r[13], 1.0)
    name = re.sub(r"\(.*", "", r[4]).replace("void ", "")
    name = re.sub(r"<.*", "", name)
    rows.append((name, v, r[8]))
ends = [i for i, (n, _, _) in enumerate(rows) if "argmax" in n]
if len(ends) < 2:
    sys.exit("profile-decode.sh: fewer than two argmax kernels in the profile")
step = rows[ends[-2] + 1:ends[-1] + 1]
kinds = {}
for n, v, g in step:
    k = kinds.setdefault(n, [0, 0.0, set()])
    k[0] += 1; k[1] += v; k[2].add(g)
print(f"last decode step: {len(step)} kernels, {sum(v for _, v, _ in step):.1f} us of kernel time")
print(f"{'kernel':<34} {'count':>5} {'us a step':>10} {'us each':>8}  grids")
for n, (c, t, gs) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
    print(f"{n[:34]:<34} {c:>5} {t:>10.1f} {t / c:>8.2f}  {' '.join(sorted(gs))[:40]}")
EOF
