#!/bin/sh
# dsv3-sample generation speed on the CPU: decode tokens/s of configs/small.json with seeded
# random weights (dsv3-config --init) at batch 1 and batch 8 (--batch --parallel 8 with 8
# requests), greedy, 64 new tokens after a 32-token prompt, against the memory-bandwidth
# floor of this machine (tests/bench/bench_sample_floor: activated float32 weights plus
# latent cache read per step over the measured memcpy bandwidth). For docs/PERF.md.
set -eu
BUILD=${BUILD:-build}
CONFIG=${CONFIG:-configs/small.json}
N=${N:-64}
THREADS=${THREADS:-1}  # the dev VM's 2 cores are shared: 2 OpenMP threads wait on each other
make --no-print-directory all "$BUILD/tests/bench/bench_sample_floor" >/dev/null
BIN=$BUILD/bin
W=$(mktemp -d /tmp/dsv3-bench-sample-XXXXXX)
trap 'rm -rf "$W"' EXIT
echo "# $(date -u '+%F %H:%M') $(uname -m) $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p')), commit $(git rev-parse --short HEAD), load average $(cut -d" " -f1 /proc/loadavg), dsv3-sample --threads $THREADS"
awk 'BEGIN { for (i = 0; i < 500; i++) print "the cat sat on the mat number " i " and then ran home" }' >"$W/corpus.txt"
"$BIN/dsv3-tok" train -v 400 -o "$W/tok.bpe" "$W/corpus.txt" 2>/dev/null
"$BIN/dsv3-config" --quiet --init "$W/model" --seed 1 "$CONFIG"
# A prompt of 32 tokens (with BOS): words the tokenizer knows.
P="the cat sat on the mat number 1 and then ran home the cat sat on the mat number 2 and"
for B in 1 8; do
    : >"$W/req.jsonl"
    i=0
    while [ $i -lt $B ]; do
        printf '{"prompt": "%s %d", "n_predict": %d, "temperature": 0}\n' "$P" $i "$N" >>"$W/req.jsonl"
        i=$((i + 1))
    done
    "$BIN/dsv3-sample" -m "$W/model" -t "$W/tok.bpe" --batch --parallel $B --ignore-eos \
        --threads "$THREADS" -c 256 <"$W/req.jsonl" >"$W/out.jsonl" 2>"$W/err"
    line=$(grep "dsv3-sample: prompt" "$W/err")
    ptok=$(echo "$line" | sed 's/.*prompt \([0-9]*\) tokens.*/\1/')
    rate=$(echo "$line" | sed 's/.*decode [0-9.]* s (\([0-9.]*\) tokens\/s).*/\1/')
    pre=$(echo "$line" | sed 's/.*prompt [0-9]* tokens in [0-9.]* s (\([0-9.]*\) tokens\/s).*/\1/')
    pos=$((ptok / B + N / 2))
    floor=$("$BUILD/tests/bench/bench_sample_floor" "$CONFIG" $B $pos)
    fl=$(echo "$floor" | sed 's/.*floor \([0-9.]*\) tokens\/s.*/\1/')
    echo "batch $B: prefill $pre tokens/s, decode $rate tokens/s; $floor; reached $(awk -v a="$rate" -v b="$fl" 'BEGIN { printf "%.0f%%", 100 * a / b }')"
done
