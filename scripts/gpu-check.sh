#!/bin/sh
# Every GPU test and benchmark in one call, for the lent device machine:
#   build here (make tests), carry build/, run `scripts/gpu-check.sh` there.
# Full logs go to $OUT (the device tool's folder) or build/gpu-check; a short table is last.
set -u
BUILD=${BUILD:-build}
LOG=${OUT:-$BUILD/gpu-check}
mkdir -p "$LOG"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader \
    >"$LOG/gpu.txt" 2>&1 || echo "no nvidia-smi" >"$LOG/gpu.txt"
rows=""
for t in "$BUILD"/tests/gpu/test_*; do
    [ -x "$t" ] || continue
    name=${t##*/}
    "$t" >"$LOG/$name.log" 2>&1
    st=$?
    p=$(grep -c '^ok ' "$LOG/$name.log"); f=$(grep -c '^not ok ' "$LOG/$name.log")
    s=$(grep -c '^skip ' "$LOG/$name.log")
    [ $st -ne 0 ] && [ "$f" -eq 0 ] && f=1
    rows="$rows$(printf '%-28s %3s ok %3s failed %3s skipped' "$name" "$p" "$f" "$s")\n"
    grep '^#' "$LOG/$name.log" | grep -v SEED | sed 's/^# /    /' >>"$LOG/notes.txt"
done
echo "== $(cat "$LOG/gpu.txt")"
cat "$LOG"/*.log
echo
echo "== summary"
printf "$rows"
[ -f "$LOG/notes.txt" ] && cat "$LOG/notes.txt"
