#!/bin/sh
# dsv3-convert and dsv3-quant throughput (GB/s of tensor bytes read) and peak resident
# memory on a mid-sized model (configs/small.json with its MTP layer: 176M saved values,
# 0.7 GB in F32, random weights from tests/bench/bench_mkmodel), best of REPS runs, warm
# page cache (the input was just written). Every output file is fsynced, as the programs
# always do. Peer figures on the same bytes: cp -r of the folder plus sync of its files,
# and, when a Python with safetensors and numpy is given as PY, safetensors' own
# load_file + save_file (+ fsync) of the same F32 shards.
# Usage: scripts/bench-convert.sh [CONFIG] [REPS]     (env: W work folder, PY python)
set -eu
BUILD=${BUILD:-build}
CONFIG=${1:-configs/small.json}
REPS=${2:-2}
W=${W:-/tmp/dsv3-bench-convert}
B=$BUILD/bin
TIME=/usr/bin/time
[ -x $TIME ] || TIME=""   # without GNU time: wall time from date, no peak RSS
# (on the device machine the carried build is used as it is: no compiler needed there)
[ -x "$BUILD/tests/bench/bench_mkmodel" ] && [ -x "$B/dsv3-quant" ] ||
    make --no-print-directory "$BUILD/tests/bench/bench_mkmodel" all >/dev/null
rm -rf "$W" && mkdir -p "$W"
trap 'rm -rf "$W"' EXIT
echo "# $(date -u +%F) $(uname -m) $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p')), commit $(git rev-parse --short HEAD), config $CONFIG"
"$BUILD/tests/bench/bench_mkmodel" "$CONFIG" "$W/f32" f32 200000000 7 >/dev/null
bytes() { cat "$1"/*.safetensors | wc -c; }

# run NAME INPUT_DIR COMMAND...: best wall time of REPS and the peak RSS of that run
run() {
    name=$1 in=$2; shift 2
    best="" rss=""
    i=0
    while [ $i -lt "$REPS" ]; do
        if [ -n "$TIME" ]; then
            $TIME -f "%e %M" -o "$W/time" "$@" >/dev/null 2>"$W/err" || { cat "$W/err"; exit 1; }
        else
            t0=$(date +%s.%N)
            "$@" >/dev/null 2>"$W/err" || { cat "$W/err"; exit 1; }
            echo "$t0 $(date +%s.%N)" | awk '{ printf "%.3f 0\n", $2 - $1 }' >"$W/time"
        fi
        read -r t m <"$W/time"
        if [ -z "$best" ] || awk "BEGIN { exit !($t < $best) }"; then best=$t rss=$m; fi
        i=$((i + 1))
    done
    n=$(bytes "$in")
    awk -v name="$name" -v n="$n" -v t="$best" -v m="$rss" 'BEGIN {
        printf "%-40s %6.2f GB in %6.2f s  %6.3f GB/s  peak RSS %s\n", name, n / 1e9, t,
            n / (t > 0 ? t : 1e-9) / 1e9, (m > 0 ? sprintf("%.0f MB", m / 1024) : "n/a") }'
}

run "dsv3-convert f32 -> bf16" "$W/f32" $B/dsv3-convert --quiet --force "$W/f32" -o "$W/bf16"
run "dsv3-convert f32 -> f32" "$W/f32" $B/dsv3-convert --quiet --force --dtype f32 "$W/f32" -o "$W/f32b"
run "dsv3-quant bf16 -> fp8" "$W/bf16" $B/dsv3-quant --quiet --force "$W/bf16" -o "$W/fp8"
run "dsv3-quant --dequant fp8 -> bf16" "$W/fp8" $B/dsv3-quant --quiet --force --dequant "$W/fp8" -o "$W/dq"
run "dsv3-convert fp8 -> bf16" "$W/fp8" $B/dsv3-convert --quiet --force "$W/fp8" -o "$W/cq"
run "dsv3-convert --verify --checksums" "$W/f32" $B/dsv3-convert --quiet --verify --checksums "$W/f32"
run "dsv3-convert --to deepseek --mp 4" "$W/bf16" $B/dsv3-convert --quiet --force --to deepseek --mp 4 --dtype keep "$W/bf16" -o "$W/ds"
run "peer: cp -r + sync (f32 folder)" "$W/f32" sh -c "rm -rf '$W/cp' && cp -r '$W/f32' '$W/cp' && sync '$W/cp'/*"
if [ -n "${PY:-}" ] && "$PY" -c "import safetensors, numpy" 2>/dev/null; then
    # safetensors' numpy API (numpy has no bfloat16): F32 in, F32 out, the same job as
    # dsv3-convert --dtype f32 above
    cat >"$W/st.py" <<'PYEOF'
import os, sys
from safetensors.numpy import load_file, save_file
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
for f in sorted(os.listdir(src)):
    if f.endswith(".safetensors"):
        save_file(load_file(os.path.join(src, f)), os.path.join(dst, f), metadata={"format": "pt"})
        fd = os.open(os.path.join(dst, f), os.O_RDONLY); os.fsync(fd); os.close(fd)
PYEOF
    run "peer: safetensors(numpy) load+save f32" "$W/f32" "$PY" "$W/st.py" "$W/f32" "$W/pyf32"
else
    echo "peer: safetensors (python) not run: set PY to a python with safetensors and numpy"
fi
