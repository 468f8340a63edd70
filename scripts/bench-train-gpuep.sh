#!/bin/sh
# dsv3-train expert parallelism on 2 GPUs (issue 12, run 2), everything in one call:
#   (a) tests/cli/test_dsv3_train_gpuep.sh: --ep 2 against one GPU at the same global batch,
#       NCCL rows against host-buffer rows, SIGTERM + resume, the CPU backend resuming the
#       GPU's checkpoint, 2 groups x 2 replicas on 4 ranks, the device optimizer under
#       --ep against the host one (DSV3_EP_OPT=host), checkpoints resumed across them;
#   (a2) tests/gpu/test_comm_nccl on 2 ranks (lib/ep's device pieces among its checks);
#   (b) tokens/s on configs/1b-moe.json at sequence 4096, B per GPU, global batch GB x 4096:
#       data parallel on 2 GPUs (NCCL, device optimizer) against --ep 2 (rows over NCCL,
#       optimizer on the host: DSV3_EP_OPT=host) and --ep 2 with the optimizer on the device
#       (lib/epdev; gradient buckets after the backward, then overlapping it:
#       DSV3_DP_OVERLAP=1), median of steps 2..; for --ep 2 the rows' all-to-alls per
#       step: count, time on the stream, bytes to the other GPU, bandwidth (the log's last
#       line, rank 0);
#   (c) lib/comm's NCCL all-to-all and all-reduce bandwidth at 64 MiB (about one MoE block's
#       exchange) and 1 GiB (scripts/bench-comm.sh): the NVLink figure to compare with.
# Logs and a summary go to $OUT (the device tool's folder) or /tmp/dsv3-gpuep.
# Usage: scripts/bench-train-gpuep.sh [B] [GB] [STEPS]   (default 4 8 4)
#   NP=4: (b) and (c) on 4 ranks (--ep 4); HOSTOPT=0 skips the host-optimizer run (slow).
set -u
NP=${NP:-2} HOSTOPT=${HOSTOPT:-1}
BUILD=${BUILD:-build}
B=${1:-4} GB=${2:-8} STEPS=${3:-4}
LOG=${OUT:-/tmp/dsv3-gpuep}
mkdir -p "$LOG"
export NCCL_NVLS_ENABLE=0   # NVLink multicast stays off on shared machines
if ! ldconfig -p 2>/dev/null | grep -q libnccl.so.2 && [ -z "${DSV3_NCCL:-}" ]; then
    d=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
    [ -n "$d" ] && [ -f "$d/libnccl.so.2" ] && export DSV3_NCCL="$d/libnccl.so.2"
fi
bin=$(cd "$BUILD/bin" && pwd)
fast=/tmp
[ -d /dev/shm ] && [ -w /dev/shm ] && fast=/dev/shm
T=$(mktemp -d "$fast/dsv3-gpuep-XXXXXX")
trap 'rm -rf "$T"' EXIT
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
S="$LOG/summary.txt"
say() { echo "$*" | tee -a "$S"; }
say "# $(date -u '+%F %H:%M UTC') $(hostname) commit ${DSV3_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo ?)}, $ngpu GPUs: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"

say "== (a) tests/cli/test_dsv3_train_gpuep.sh"
start=$(date +%s)
DSV3_BIN=$bin timeout 360 sh tests/cli/test_dsv3_train_gpuep.sh >"$LOG/test_gpuep.log" 2>&1
say "  status $?, $(grep -c '^ok ' "$LOG/test_gpuep.log") ok, $(grep -c '^not ok ' "$LOG/test_gpuep.log") not ok, $(( $(date +%s) - start )) s"
grep -E '^not ok|^# ' "$LOG/test_gpuep.log" | tee -a "$S"

[ "$ngpu" -ge "$NP" ] || { say "$ngpu GPUs: (b) and (c) need $NP"; exit 0; }

# lib/comm on NCCL and lib/ep's device pieces (the device optimizer's expert collectives,
# with 2 replicas of one group and with --ep 2) on 2 ranks, one GPU each
say "== (a2) tests/gpu/test_comm_nccl on $NP ranks"
for r in $(seq 0 $((NP - 1))); do
    COMM_TEST_SEED=12345 RANK=$r WORLD_SIZE=$NP LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$((29600 + $$ % 90)) \
        timeout 120 "$BUILD/tests/gpu/test_comm_nccl" >"$LOG/comm_nccl_rank$r.log" 2>&1 &
done
wait
cat "$LOG"/comm_nccl_rank*.log | grep -E '^(ok|not ok|skip)|^# nccl|CHECK' | cut -c1-400 | sed 's/^/  /' | tee -a "$S"
grep -q '^ok ep2_runs' "$LOG/test_gpuep.log" || { say "--ep 2 failed in the test: (b) skipped"; B=0; }

mkdata() {
    awk -v n="$4" -v L="$3" -v V="$2" 'BEGIN { srand(7); for (i = 0; i < n; i++) {
        s = ""; for (j = 0; j < L + 8; j++) s = s (j ? " " : "") 2 + int(rand() * (V - 2))
        print s } }' >"$T/ids.txt"
    "$bin/dsv3-shard" make --vocab-size "$2" -o "$T/a.shard" "$T/ids.txt" &&
        "$bin/dsv3-pack" --quiet -o "$1" --eos-id 1 -L "$3" -s 1 "$T/a.shard"
}
port=$((29700 + $$ % 500))
ranks() {   # ranks RUN ARGS...: NP ranks, one GPU each
    run=$1
    shift
    port=$((port + 1)) pids=""
    for r in $(seq 0 $((NP - 1))); do
        env RANK=$r WORLD_SIZE=$NP LOCAL_RANK=$r LOCAL_WORLD_SIZE=$NP MASTER_ADDR=127.0.0.1 \
            MASTER_PORT=$port timeout 150 "$bin/dsv3-train" -o "$run" "$@" >"$run.rank$r.log" 2>&1 &
        pids="$pids $!"
    done
    st=0
    for p in $pids; do wait "$p" || st=1; done
    cp "$run.rank0.log" "$LOG/${run##*/}.log"
    [ $st -eq 0 ] || say "FAILED: $run: $(tail -n 2 "$run".rank*.log | tr '\n' ' ')"
}
median() {
    python3 -c '
import json, sys
v = sorted(json.loads(l)["tokens_per_s"] for l in list(open(sys.argv[1]))[1:] if "tokens_per_s" in l)
print("%.0f" % ((v[len(v)//2] + v[(len(v)-1)//2]) / 2) if v else "0")' "$1/metrics.jsonl"
}
if [ "$B" -gt 0 ]; then
say "== (b) tokens/s, configs/1b-moe.json, seq 4096, B $B a GPU, global batch $GB x 4096, $STEPS steps (median of steps 2..)"
mkdata "$T/dbig" 129280 4096 $((GB * STEPS + GB)) >/dev/null || say "FAILED: data"
BIG="-c configs/1b-moe.json -d $T/dbig -b $B -g $GB --steps $STEPS --mtp-weight 0 --balance-alpha 0 --device cuda --keep 1"
ranks "$T/dpN" $BIG
tdp=$(median "$T/dpN")
rm -rf "$T/dpN"
tep=skipped
if [ "$HOSTOPT" = 1 ]; then
export DSV3_EP_OPT=host
ranks "$T/epN" $BIG --ep $NP
unset DSV3_EP_OPT
tep=$(median "$T/epN")
say "  data parallel, $NP GPUs: $tdp tokens/s; --ep $NP, $NP GPUs, optimizer on the host (DSV3_EP_OPT=host): $tep tokens/s"
grep "expert-parallel row exchanges\|expert parallel on the GPU" "$T/epN.rank0.log" | sed 's/^/  /' | tee -a "$S"
grep -o '"ep_load":{[^}]*}' "$T/epN/metrics.jsonl" | tail -1 | cut -c1-300 | sed 's/^/  last step /' | tee -a "$S"
rm -rf "$T/epN"
fi
# the optimizer on the device (lib/epdev), gradient buckets after the backward (the
# default under --ep) and overlapped with it (DSV3_DP_OVERLAP=1)
ranks "$T/epNd" $BIG --ep $NP
tdev=$(median "$T/epNd")
grep "expert-parallel row exchanges\|expert parallel on the GPU\|data parallel on device buffers" "$T/epNd.rank0.log" | sed 's/^/  /' | tee -a "$S"
rm -rf "$T/epNd"
export DSV3_DP_OVERLAP=1
ranks "$T/epNv" $BIG --ep $NP
unset DSV3_DP_OVERLAP
tov=$(median "$T/epNv")
rm -rf "$T/epNv"
say "  --ep $NP tokens/s: optimizer on the host $tep, on the device $tdev, on the device with the buckets overlapping the backward $tov (data parallel $tdp)"
fi

say "== (c) lib/comm on NCCL, $NP ranks (scripts/bench-comm.sh $NP 64 and $NP 1024)"
for mib in 64 1024; do
    BUILD=$BUILD timeout 90 sh scripts/bench-comm.sh $NP $mib >"$LOG/comm$mib.log" 2>&1
    grep -E "^#|allreduce|alltoall" "$LOG/comm$mib.log" | head -4 | sed 's/^/  /' | tee -a "$S"
done
