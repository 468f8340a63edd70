#!/bin/sh
# scripts/plot-run.sh: PNGs from a run's metrics.jsonl; a damaged line is named.
. "$(dirname "$0")/lib.sh"
P=$(cd "$(dirname "$0")/../.." && pwd)/scripts/plot-run.sh
if ! command -v gnuplot >/dev/null; then
    echo "skip plot_run: no gnuplot (make deps installs gnuplot-nox)"; exit 0
fi
mkdir -p "$T/run"
i=1
while [ $i -le 30 ]; do
    echo "{\"step\":$i,\"tokens\":$((i * 512)),\"loss\":$(awk "BEGIN{print 6 - $i / 10}"),\"lr\":0.001,\"grad_norm\":$([ $i -eq 7 ] && echo null || echo 1.5),\"expert_load\":{\"layers\":[1,2],\"max_over_mean\":[1.8,1.4],\"min_over_mean\":[0.7,0.4],\"counts\":[[130,104,113,235],[74,56,123,141]]}}"
    [ $((i % 10)) -eq 0 ] && echo "{\"step\":$i,\"tokens\":$((i * 512)),\"val_loss\":5.5,\"val_tokens\":1024}"
    i=$((i + 1))
done >"$T/run/metrics.jsonl"
expect plot_run 0 sh "$P" "$T/run"
for f in loss lr expert-load expert-heat layer-heat; do
    check "png_$f" sh -c "head -c 8 '$T/run/plots/$f.png' | od -An -tx1 | grep -q '89 50 4e 47 0d 0a 1a 0a'"
done
echo '{"step":31, "loss":' >>"$T/run/metrics.jsonl"
expect_err bad_line_named 1 "metrics.jsonl:34" sh "$P" "$T/run"
expect_err missing_run 1 "no such file" sh "$P" "$T/nope"
expect usage 2 sh "$P"
