#!/bin/sh
# dsv3-train data parallelism on device buffers (NCCL), every check of issue 12 in one call:
#   one   (one GPU)  world size 1 through NCCL (RANK=0 WORLD_SIZE=1 DSV3_DP_NCCL=1) against
#                    the single-process run (configs/small.json, 20 steps), the same with
#                    overlap off (must be the same bits), and a SIGTERM + resume at world 1;
#   multi (2+ GPUs)  (a) 1 GPU vs N GPUs at the same global batch, losses per step (small,
#                    20 steps; N GPUs with and without overlap must be the same bits);
#                    (b) tokens/s on configs/1b-moe.json at sequence 4096 on 1 GPU and on N,
#                    with and without overlap, and the scaling efficiency;
#                    (c) an N-GPU run stopped by SIGTERM to rank 1 mid-run and resumed,
#                    against the uninterrupted run (losses per step, checkpoint bytes);
#                    (d) NCCL all-reduce bus bandwidth of a 1 GiB buffer (scripts/bench-comm.sh).
# Ranks are started from a shell loop with torchrun-style variables (no MPI needed).
# Logs and a summary go to $OUT (the device tool's folder) or /tmp/dsv3-mgpu.
#   scaling (2+ GPUs) (b) only, overlap on: 1 GPU and N GPUs (a shorter call).
# Usage: scripts/bench-train-multigpu.sh one|multi|scaling [B] [GB] [STEPS]  (1b-moe: 4 32 4)
set -u
BUILD=${BUILD:-build}
mode=${1:-multi} B=${2:-4} GB=${3:-32} STEPS=${4:-4}
LOG=${OUT:-/tmp/dsv3-mgpu}
mkdir -p "$LOG"
export NCCL_NVLS_ENABLE=0   # NVLink multicast stays off on shared machines
if ! ldconfig -p 2>/dev/null | grep -q libnccl.so.2 && [ -z "${DSV3_NCCL:-}" ]; then
    d=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
    [ -n "$d" ] && [ -f "$d/libnccl.so.2" ] && export DSV3_NCCL="$d/libnccl.so.2"
fi
bin=$(cd "$BUILD/bin" && pwd)
fast=/tmp
[ -d /dev/shm ] && [ -w /dev/shm ] && fast=/dev/shm   # checkpoints of 1.1B parameters
T=$(mktemp -d "$fast/dsv3-mgpu-XXXXXX")
trap 'rm -rf "$T"' EXIT
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
N=${NGPU:-$ngpu}
S="$LOG/summary.txt"
say() { echo "$*" | tee -a "$S"; }
say "# $(date -u '+%F %H:%M UTC') $(hostname) commit ${DSV3_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo ?)} mode $mode, $ngpu GPUs: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"

# mkdata DIR VOCAB L RECORDS MOTIF: random documents (MOTIF > 0: a random motif of that
# many tokens repeated, so the loss falls and the trend means something)
mkdata() {
    awk -v n="$4" -v L="$3" -v V="$2" -v m="$5" 'BEGIN { srand(7); for (i = 0; i < n; i++) {
        s = ""; for (k = 0; k < m; k++) mo[k] = 2 + int(rand() * 1000)
        for (j = 0; j < L + 8; j++) s = s (j ? " " : "") (m ? mo[j % m] : 2 + int(rand() * (V - 2)))
        print s } }' >"$T/ids.txt"
    "$bin/dsv3-shard" make --vocab-size "$2" -o "$T/a.shard" "$T/ids.txt" &&
        "$bin/dsv3-pack" --quiet -o "$1" --eos-id 1 -L "$3" -s 1 "$T/a.shard"
}

port=$((29600 + $$ % 500))
# ranks NPROC RUN ARGS...: NPROC processes, one GPU each; ENV_EXTRA is passed to each
ranks() {
    n=$1 run=$2
    shift 2
    port=$((port + 1)) pids="" r=0
    while [ "$r" -lt "$n" ]; do
        env RANK=$r WORLD_SIZE=$n LOCAL_RANK=$r LOCAL_WORLD_SIZE=$n MASTER_ADDR=127.0.0.1 \
            MASTER_PORT=$port ${ENV_EXTRA:-} timeout 300 "$bin/dsv3-train" -o "$run" "$@" \
            >"$run.rank$r.log" 2>&1 &
        pids="$pids $!" r=$((r + 1))
    done
    st=0
    for p in $pids; do wait "$p" || st=1; done
    cp "$run.rank0.log" "$LOG/${run##*/}.log" 2>/dev/null
    grep -m1 "data parallel on device" "$run.rank0.log" | sed "s|^dsv3-train|  ${run##*/}|" | tee -a "$S"
    [ $st -eq 0 ] || { say "FAILED: $run ($n ranks): $(tail -n 2 "$run".rank*.log | tr '\n' ' ')"; }
    return $st
}
single() {
    run=$1
    shift
    timeout 300 "$bin/dsv3-train" -o "$run" "$@" >"$run.log" 2>&1 || say "FAILED: $run: $(tail -n 2 "$run.log" | tr '\n' ' ')"
    cp "$run.log" "$LOG/${run##*/}.log"
}
# compare A B: losses and gradient norms per step of two runs' metrics
compare() {
    python3 - "$1/metrics.jsonl" "$2/metrics.jsonl" <<'PY'
import json, sys
def rd(p):
    d = {}
    for l in open(p):
        j = json.loads(l)
        if "loss" in j and "grad_norm" in j: d[j["step"]] = (j["loss"], j["grad_norm"])
    return d
a, b = rd(sys.argv[1]), rd(sys.argv[2])
s = sorted(set(a) & set(b))
if not s: print("no common steps"); sys.exit()
rl = [abs(a[k][0] - b[k][0]) / abs(a[k][0]) for k in s]
rg = [abs(a[k][1] - b[k][1]) / max(abs(a[k][1]), 1e-30) for k in s]
same = all(a[k] == b[k] for k in s)
print("steps %d-%d: loss %.4f -> %.4f vs %.4f -> %.4f; max rel diff loss %.2e (step %d), grad norm %.2e; %s"
      % (s[0], s[-1], a[s[0]][0], a[s[-1]][0], b[s[0]][0], b[s[-1]][0], max(rl), s[rl.index(max(rl))],
         max(rg), "bit-identical" if same else "not identical"))
PY
}
median() {
    python3 -c '
import json, sys
v = sorted(json.loads(l)["tokens_per_s"] for l in list(open(sys.argv[1]))[1:] if "tokens_per_s" in l)
print("%.0f" % ((v[len(v)//2] + v[(len(v)-1)//2]) / 2) if v else "0")' "$1/metrics.jsonl"
}
# same_ckpt A B STEP: the checkpoint files of step STEP of two runs, byte for byte
same_ckpt() {
    a="$1/step-$(printf %06d "$3")" b="$2/step-$(printf %06d "$3")" out="" all=0
    for f in "$a"/*.safetensors; do
        if cmp -s "$f" "$b/${f##*/}"; then out="$out ${f##*/}=same"; else out="$out ${f##*/}=DIFFERENT"; all=1; fi
    done
    echo "checkpoint step $3:$out"
}
# sigterm_run NPROC RUN STEP ARGS...: started, SIGTERM to the last rank (its pid) once
# STEP steps are logged, then resumed to the end
sigterm_run() {
    n=$1 run=$2 at=$3
    shift 3
    port=$((port + 1)) pids="" r=0 last=""
    while [ "$r" -lt "$n" ]; do
        env RANK=$r WORLD_SIZE=$n LOCAL_RANK=$r LOCAL_WORLD_SIZE=$n MASTER_ADDR=127.0.0.1 \
            MASTER_PORT=$port ${ENV_EXTRA:-} "$bin/dsv3-train" -o "$run" "$@" \
            >"$run.term$r.log" 2>&1 &
        last=$!
        pids="$pids $last" r=$((r + 1))
    done
    i=0
    while [ $i -lt 1200 ]; do
        k=$(grep -c '"step"' "$run/metrics.jsonl" 2>/dev/null)
        [ "${k:-0}" -ge "$at" ] && break
        kill -0 "$last" 2>/dev/null || break
        sleep 0.1
        i=$((i + 1))
    done
    kill -TERM "$last"
    st=0
    for p in $pids; do wait "$p" || st=1; done
    cp "$run.term0.log" "$LOG/${run##*/}-term.log"
    stopped=$(ls -d "$run"/step-* 2>/dev/null | tail -1)
    say "  stopped by SIGTERM (exit status $st) after step ${stopped##*/step-} (sent at step >= $at); resuming"
    ranks "$n" "$run" --resume "$@"
}

# configs/small.json with 16 routed experts instead of 20: the GPU path needs every tensor
# at a 16-byte boundary for cuBLASLt, and 20 router biases would break it
sed 's/"n_routed_experts": 20/"n_routed_experts": 16/' configs/small.json >"$T/small16.json"
SMALL="-c $T/small16.json -b 4 -g 16 --steps 20 --mtp-weight 0 --balance-alpha 0 --device cuda --keep 0"
mkdata "$T/dsmall" 32768 256 400 8 >/dev/null || say "FAILED: small data"

if [ "$mode" = one ]; then
    say "== world size 1 through NCCL vs one process (configs/small.json with 16 experts, B 4, global 16 x 256, 20 steps)"
    single "$T/one" $SMALL -d "$T/dsmall"
    ENV_EXTRA="DSV3_DP_NCCL=1" ranks 1 "$T/nccl1" $SMALL -d "$T/dsmall"
    ENV_EXTRA="DSV3_DP_NCCL=1 DSV3_DP_OVERLAP=0" ranks 1 "$T/nccl1-noov" $SMALL -d "$T/dsmall"
    say "  NCCL world 1 vs one process:  $(compare "$T/one" "$T/nccl1")"
    say "  NCCL world 1, overlap off vs on: $(compare "$T/nccl1" "$T/nccl1-noov")"
    say "  $(same_ckpt "$T/one" "$T/nccl1" 20)"
    say "== SIGTERM at world 1 (NCCL) and resume"
    ENV_EXTRA="DSV3_DP_NCCL=1" sigterm_run 1 "$T/term1" 8 $SMALL -d "$T/dsmall"
    say "  resumed vs uninterrupted: $(compare "$T/nccl1" "$T/term1")"
    say "  $(same_ckpt "$T/nccl1" "$T/term1" 20)"
    exit 0
fi

if [ "$mode" != scaling ]; then
say "== (a) 1 GPU vs $N GPUs, same global batch (configs/small.json with 16 experts, B 4, global 16 x 256, 20 steps)"
single "$T/one" $SMALL -d "$T/dsmall"
ranks "$N" "$T/dpN" $SMALL -d "$T/dsmall"
ENV_EXTRA="DSV3_DP_OVERLAP=0" ranks "$N" "$T/dpN-noov" $SMALL -d "$T/dsmall"
say "  $N GPUs vs 1 GPU:               $(compare "$T/one" "$T/dpN")"
say "  $N GPUs overlap off vs on:      $(compare "$T/dpN" "$T/dpN-noov")"
say "  $(same_ckpt "$T/dpN" "$T/dpN-noov" 20)"

say "== (c) $N GPUs: SIGTERM to the last rank mid-run, resume (small, 20 steps)"
sigterm_run "$N" "$T/termN" 8 $SMALL -d "$T/dsmall"
say "  resumed vs uninterrupted: $(compare "$T/dpN" "$T/termN")"
say "  $(same_ckpt "$T/dpN" "$T/termN" 20)"

fi

say "== (b) tokens/s, configs/1b-moe.json, seq 4096, B $B, global batch $GB x 4096, $STEPS steps (median of steps 2..)"
mkdata "$T/dbig" 129280 4096 $((GB * STEPS + GB)) 0 >/dev/null || say "FAILED: 1b data"
BIG="-c configs/1b-moe.json -d $T/dbig -b $B -g $GB --steps $STEPS --mtp-weight 0 --balance-alpha 0 --device cuda --keep 1"
single "$T/big1" $BIG
t1=$(median "$T/big1")
rm -rf "$T/big1"
ranks "$N" "$T/bigN" $BIG
tn=$(median "$T/bigN")
rm -rf "$T/bigN"
tno=$tn
if [ "$mode" != scaling ]; then
    ENV_EXTRA="DSV3_DP_OVERLAP=0" ranks "$N" "$T/bigN-noov" $BIG
    tno=$(median "$T/bigN-noov")
    rm -rf "$T/bigN-noov"
fi
if [ "$mode" = scaling ]; then
    say "  1 GPU: $t1 tokens/s; $N GPUs (overlap on): $tn tokens/s"
    python3 -c "print('  scaling efficiency (N-GPU tokens/s over N x 1-GPU): %.1f%%' % (100 * $tn / ($N * $t1)))" | tee -a "$S"
    exit 0
fi
say "  1 GPU: $t1 tokens/s; $N GPUs overlap on: $tn tokens/s, off: $tno tokens/s"
python3 -c "
t1, tn, tno, n = $t1, $tn, $tno, $N
print('  scaling efficiency (N-GPU tokens/s over N x 1-GPU): overlap on %.1f%%, off %.1f%%; overlap gain %.1f%%'
      % (100 * tn / (n * t1), 100 * tno / (n * t1), 100 * (tn / tno - 1)))" | tee -a "$S"

say "== (d) NCCL all-reduce of 1 GiB (scripts/bench-comm.sh $N 1024)"
timeout 120 sh scripts/bench-comm.sh "$N" 1024 >"$LOG/comm.log" 2>&1
grep -i -E "allreduce|all-reduce|bus|torch" "$LOG/comm.log" | head -8 | tee -a "$S"
