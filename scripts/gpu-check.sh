#!/bin/sh
# Every GPU test and benchmark in one call, for the lent device machine:
#   build here (make tests), carry build/, run `scripts/gpu-check.sh` there.
# Full logs go to $OUT (the device tool's folder) or build/gpu-check; a short table is last.
set -u
BUILD=${BUILD:-build}
LOG=${OUT:-$BUILD/gpu-check}
mkdir -p "$LOG"
# NVLink multicast stays off on shared machines (the device docs say why)
export NCCL_NVLS_ENABLE=0
# NCCL is opened at run time: where the system has none, use the copy PyTorch ships
if ! ldconfig -p 2>/dev/null | grep -q libnccl.so.2 && [ -z "${DSV3_NCCL:-}" ]; then
    d=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
    [ -n "$d" ] && [ -f "$d/libnccl.so.2" ] && export DSV3_NCCL="$d/libnccl.so.2"
fi
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
# lib/comm on NCCL with one process per GPU (torchrun-style launch, TCP bootstrap)
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
if [ "$ngpu" -ge 2 ] && [ -x "$BUILD/tests/gpu/test_comm_nccl" ]; then
    : >"$LOG/comm_nccl_multi.log"
    pids="" r=0
    while [ $r -lt "$ngpu" ]; do
        RANK=$r WORLD_SIZE=$ngpu LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=29517 \
            COMM_TEST_SEED=12345 "$BUILD/tests/gpu/test_comm_nccl" >"$LOG/comm_nccl_rank$r.txt" 2>&1 &
        pids="$pids $!" r=$((r + 1))
    done
    st=0
    for p in $pids; do wait "$p" || st=1; done
    cat "$LOG"/comm_nccl_rank*.txt >"$LOG/comm_nccl_multi.log"; rm -f "$LOG"/comm_nccl_rank*.txt
    p=$(grep -c '^ok ' "$LOG/comm_nccl_multi.log"); f=$(grep -c '^not ok ' "$LOG/comm_nccl_multi.log")
    [ $st -ne 0 ] && [ "$f" -eq 0 ] && f=1
    rows="$rows$(printf '%-28s %3s ok %3s failed %3s skipped' "comm_nccl x$ngpu ranks" "$p" "$f" 0)\n"
fi
echo "== $(cat "$LOG/gpu.txt")"
cat "$LOG"/*.log
echo
echo "== summary"
printf "$rows"
[ -f "$LOG/notes.txt" ] && cat "$LOG/notes.txt"
