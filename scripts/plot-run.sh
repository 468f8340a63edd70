#!/bin/sh
# Draws a dsv3-train run's curves from RUN/metrics.jsonl into PNG files with gnuplot:
#   loss.png         training loss per update, validation loss where evaluated
#   lr.png           learning rate, and the gradient norm (right axis, log scale)
#   expert-load.png  max/mean and min/mean expert load per MoE layer over the updates
#   expert-heat.png  heatmap: load of each expert over the mean, per MoE layer, at the last
#                    update that recorded counts (metrics keep counts while layers x experts
#                    <= 4096)
#   layer-heat.png   heatmap: max/mean load per MoE layer over the updates
# Usage: scripts/plot-run.sh RUN [OUTDIR]   (OUTDIR defaults to RUN/plots)
# Needs gnuplot (Debian: gnuplot-nox, installed by `make deps`) and python3 (to read JSON).
set -eu
[ $# -ge 1 ] && [ $# -le 2 ] || { echo "usage: scripts/plot-run.sh RUN [OUTDIR]" >&2; exit 2; }
run=$1
out=${2:-$run/plots}
m=$run/metrics.jsonl
[ -f "$m" ] || { echo "plot-run: $m: no such file" >&2; exit 1; }
command -v gnuplot >/dev/null || { echo "plot-run: needs gnuplot (apt-get install gnuplot-nox)" >&2; exit 1; }
mkdir -p "$out"
tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT

# metrics.jsonl -> whitespace tables for gnuplot; a bad line is an error naming its number
python3 - "$m" "$tmp" <<'PY'
import json, sys
src, d = sys.argv[1], sys.argv[2]
train, val, load, heat = [], [], [], None
with open(src) as f:
    for n, line in enumerate(f, 1):
        try:
            j = json.loads(line)
        except ValueError as e:
            sys.exit(f"plot-run: {src}:{n}: not JSON ({e})")
        if "val_loss" in j:
            val.append((j["step"], j["val_loss"]))
            continue
        if "loss" not in j:
            continue
        nan = lambda x: "NaN" if x is None else x
        train.append((j["step"], nan(j["loss"]), j["lr"], nan(j["grad_norm"])))
        el = j.get("expert_load") or {}
        if el.get("layers"):
            load.append((j["step"], el["layers"], el["max_over_mean"], el["min_over_mean"]))
            if el.get("counts"):
                heat = (j["step"], el["layers"], el["counts"])
if not train:
    sys.exit(f"plot-run: {src}: no training updates recorded")
with open(f"{d}/train.dat", "w") as o:
    for r in train:
        print(*r, file=o)
with open(f"{d}/val.dat", "w") as o:
    for r in val:
        print(*r, file=o)
layers = load[0][1] if load else []
with open(f"{d}/load.dat", "w") as o:
    for s, _, mx, mn in load:
        print(s, *mx, *mn, file=o)
with open(f"{d}/layers.txt", "w") as o:
    print(" ".join(map(str, layers)), file=o)
with open(f"{d}/layerheat.dat", "w") as o:   # matrix: rows = layers, columns = updates
    for i in range(len(layers)):
        print(*[r[2][i] for r in load], file=o)
with open(f"{d}/heat.dat", "w") as o:        # matrix: rows = layers, columns = experts
    if heat:
        for c in heat[2]:
            mean = sum(c) / len(c) if c and sum(c) else 1
            print(*[x / mean for x in c], file=o)
with open(f"{d}/heatstep.txt", "w") as o:
    print(heat[0] if heat else "", file=o)
PY

layers=$(cat "$tmp/layers.txt")
nl=$(echo "$layers" | wc -w)
title=$(basename "$(cd "$run" && pwd)")
{
    echo "set terminal png size 900,540; set grid; set key outside right"
    echo "set output '$out/loss.png'; set title 'loss: $title'; set xlabel 'update'; set ylabel 'loss'"
    if [ -s "$tmp/val.dat" ]; then
        echo "plot '$tmp/train.dat' using 1:2 with lines title 'train', '$tmp/val.dat' using 1:2 with linespoints title 'validation'"
    else
        echo "plot '$tmp/train.dat' using 1:2 with lines title 'train'"
    fi
    echo "set output '$out/lr.png'; set title 'learning rate and gradient norm: $title'"
    echo "set ylabel 'learning rate'; set y2label 'gradient norm'; set logscale y2; set y2tics; set ytics nomirror"
    echo "plot '$tmp/train.dat' using 1:3 with lines title 'lr', '' using 1:4 axes x1y2 with lines title 'grad norm'"
    echo "unset logscale y2; unset y2tics; unset y2label; set ytics mirror"
    if [ "$nl" -gt 0 ]; then
        echo "set output '$out/expert-load.png'; set title 'expert load over the mean (1 = balanced): $title'"
        echo "set ylabel 'load / mean load'"
        printf "plot "
        i=0
        for l in $layers; do
            [ $i -gt 0 ] && printf ", "
            printf "'%s' using 1:%d with lines title 'layer %s max', '' using 1:%d with lines dashtype 2 title 'layer %s min'" \
                "$tmp/load.dat" $((i + 2)) "$l" $((i + 2 + nl)) "$l"
            i=$((i + 1))
        done
        echo
        echo "set output '$out/layer-heat.png'; set title 'max/mean expert load per MoE layer: $title'"
        echo "set xlabel 'update (recorded)'; set ylabel 'MoE layer (row)'; unset key; set view map"
        echo "plot '$tmp/layerheat.dat' matrix with image"
        if [ -s "$tmp/heat.dat" ]; then
            echo "set output '$out/expert-heat.png'; set title 'expert load / mean at update $(cat "$tmp/heatstep.txt"): $title'"
            echo "set xlabel 'expert'; set ylabel 'MoE layer (row)'"
            echo "plot '$tmp/heat.dat' matrix with image"
        fi
    fi
} >"$tmp/plot.gp"
gnuplot "$tmp/plot.gp"
ls "$out"/*.png | sed 's/^/plot-run: wrote /' >&2
