#!/bin/sh
# Every GPU test and benchmark in one call, for the lent device machine:
#   build and pack here (scripts/stage-device.sh), carry .stage-pack, and run
#   `sh scripts/stage-device.sh unpack && BUILD=.stage-lead/build sh scripts/gpu-check.sh` there.
# Each tests/gpu program runs with DSV3_GPU_BENCH=1 (its benchmarks too; GPU_BENCH=0: tests
# only, no torch peers), then the torch attention peer (scripts/bench-attn-torch.py) if
# python3 has torch, the 50-step training parity with PyTorch and tests/bench/bench_latency
# (the latency floor under batch-1 decode); SANITIZE=1 also runs scripts/sanitize.sh
# (compute-sanitizer memcheck and racecheck, several minutes). Full logs go to $OUT (the
# device tool's folder) or build/gpu-check;
# every '# stat' row (name, max relative error, bound, verdict) and '# bench' row (time, rate,
# share of the measured ceiling) is printed, then last the short table: one row per test
# program and CLI test, and one line saying whether all passed.
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
rows="" all=0
: >"$LOG/notes.txt"
for t in "$BUILD"/tests/gpu/test_*; do
    case $t in *.d|*.o) continue;; esac
    [ -x "$t" ] || continue
    name=${t##*/}
    start=$(date +%s)
    DSV3_GPU_BENCH=${GPU_BENCH:-1} "$t" >"$LOG/$name.log" 2>&1
    st=$?
    secs=$(( $(date +%s) - start ))
    p=$(grep -c '^ok ' "$LOG/$name.log"); f=$(grep -c '^not ok ' "$LOG/$name.log")
    s=$(grep -c '^skip ' "$LOG/$name.log")
    [ $st -ne 0 ] && [ "$f" -eq 0 ] && f=1
    [ "$f" -ne 0 ] && all=1
    rows="$rows$(printf '%-22s %3s ok %3s failed %3s skipped %4ss' "$name" "$p" "$f" "$s" "$secs")\n"
    grep '^# ' "$LOG/$name.log" | grep -v SEED >>"$LOG/notes.txt"
done
# cli_test NAME SCRIPT: a tests/cli script that skips without a GPU, run against this build
cli_test() {
    [ -f "$2" ] || return 0
    start=$(date +%s)
    DSV3_BIN="$(cd "$BUILD/bin" && pwd)" sh "$2" >"$LOG/$1.log" 2>&1
    st=$?
    p=$(grep -c '^ok ' "$LOG/$1.log"); f=$(grep -c '^not ok ' "$LOG/$1.log")
    s=$(grep -c '^skip ' "$LOG/$1.log")
    [ $st -ne 0 ] && [ "$f" -eq 0 ] && f=1
    [ "$f" -ne 0 ] && all=1
    rows="$rows$(printf '%-22s %3s ok %3s failed %3s skipped %4ss' "$1" "$p" "$f" "$s" "$(( $(date +%s) - start ))")\n"
}
# dsv3-train on the GPU: against the CPU backend, resume, recomputation; data parallelism
# on device buffers (NCCL at world size 1; two ranks when there are two GPUs); expert
# parallelism (--ep 2 against one GPU; ranks share the GPU, rows through host buffers,
# where there is one)
cli_test train_cuda tests/cli/test_dsv3_train_cuda.sh
cli_test train_recompute tests/cli/test_dsv3_train_recompute.sh
cli_test train_gpudp tests/cli/test_dsv3_train_gpudp.sh
cli_test train_gpuep tests/cli/test_dsv3_train_gpuep.sh
# dsv3-sample --mtp on the GPU against the same without --mtp (greedy, sampled, batch)
cli_test sample_mtp tests/cli/test_dsv3_sample_mtp.sh
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
    [ "$f" -ne 0 ] && all=1
    rows="$rows$(printf '%-22s %3s ok %3s failed %3s skipped' "comm_nccl x$ngpu" "$p" "$f" 0)\n"
    grep '^# ' "$LOG/comm_nccl_multi.log" | grep -v SEED >>"$LOG/notes.txt"
fi
if [ "${GPU_BENCH:-1}" != 0 ] && command -v python3 >/dev/null 2>&1; then
    python3 scripts/bench-attn-torch.py >"$LOG/torch.log" 2>&1
    grep '^# ' "$LOG/torch.log" >>"$LOG/notes.txt"
    # 50 training steps against HF transformers (docs/PARITY.md); its files in $LOG/parity
    OUT="$LOG/parity" BIN="$BUILD/bin" sh scripts/parity-train-torch.sh 50 >"$LOG/parity.log" 2>&1 ||
        { all=1; echo "parity-train-torch.sh failed" >>"$LOG/notes.txt"; }
    grep '^largest' "$LOG/parity.log" | sed 's/^/# /' >>"$LOG/notes.txt"
fi
# the latency floor under batch-1 decode (kernels/latency.h): one dependent step's cost
if [ "${GPU_BENCH:-1}" != 0 ] && [ -x "$BUILD/tests/bench/bench_latency" ]; then
    "$BUILD/tests/bench/bench_latency" 200 >"$LOG/latency.log" 2>&1 ||
        { all=1; echo "bench_latency failed" >>"$LOG/notes.txt"; }
    grep -v '^#' "$LOG/latency.log" | sed 's/^/# bench latency: /' >>"$LOG/notes.txt"
fi
# SANITIZE=1: compute-sanitizer memcheck and racecheck (scripts/sanitize.sh; minutes)
if [ "${SANITIZE:-0}" = 1 ]; then
    OUT="$LOG/sanitize" BUILD="$BUILD" sh scripts/sanitize.sh >"$LOG/sanitize.log" 2>&1 || all=1
    grep -E '^(memcheck|racecheck|sanitizer:)' "$LOG/sanitize.log" | sed 's/^/# sanitize: /' >>"$LOG/notes.txt"
fi
# dsv3's greedy generation (CPU, GPU fp32 and bf16) against transformers' generate()
if python3 -c 'import torch, transformers' 2>/dev/null && [ -x "$BUILD/tests/bench/greedy_ids" ]; then
    python3 scripts/ref-hf-generate.py "$BUILD" >"$LOG/hf_generate.log" 2>&1 || all=1
    grep -v '^RESULT' "$LOG/hf_generate.log" | sed 's/^/# hf generate: /' >>"$LOG/notes.txt"
fi
cat "$LOG"/test_*.log | grep -v '^# ' | grep -v '^ok ' | head -100
echo "-- accuracy: name, max ||out-ref||/||ref||, bound, verdict"
grep '^# stat ' "$LOG/notes.txt" | sed 's/^# stat /  /'
echo "-- benchmarks"
grep '^# bench ' "$LOG/notes.txt" | sed 's/^# bench /  /'
grep '^# ' "$LOG/notes.txt" | grep -v '^# stat ' | grep -v '^# bench ' | sed 's/^# /  /'
# the short table last, so the tail of a long call's output always holds it
echo
echo "== $(cat "$LOG/gpu.txt"), $(date -u '+%Y-%m-%d %H:%M UTC')"
printf "$rows"
[ $all = 0 ] && echo "every GPU test passed" || echo "SOME GPU TESTS FAILED (logs in $LOG)"
exit $all
