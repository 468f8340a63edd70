#!/bin/sh
# Issue 10's many-seed check of FP8 training against BF16 on a lent GPU machine, as staged by
# scripts/fp8-seeds-stage.sh (which copies this file to STAGE/run.sh). From the repository root
# there: `sh .stage-fp8seeds/run.sh [STEPS]` (device tool: carry [".stage-fp8seeds"]).
# Runs scripts/fp8-train-compare.sh on the staged dsv3-train and data: SEEDS (default 1..48) x
# VARIANTS (default "bf16 fp8") of 1000 steps (or STEPS), on every GPU (GPUS, default all), JOBS
# (default 4) at once per GPU, no new seed after DEADLINE (default 420 s from the first run), runs
# still going at LIMIT (default 465 s) killed and left out; then the report. Writes into $OUT
# (default STAGE/out): fp8seeds.tgz (fp8seeds/: summary, header, timing, runs and rel tables, every
# finished run's metrics.jsonl without the per-step expert loads, the last lines of every log,
# the plots), and beside it summary.txt, sweep.log and the plots (with gnuplot). Ends by printing
# the sweep's timing and the statistics again. Env: as fp8-train-compare.sh; RUN_DIR (default
# /tmp/fp8seeds: the runs).
set -u
S=$(cd "$(dirname "$0")" && pwd)
R=${RUN_DIR:-/tmp/fp8seeds}
D=${OUT:-$S/out}
mkdir -p "$D"
NCCL_NVLS_ENABLE=0 OMP_NUM_THREADS=1 BUILD=$S/build PREP=$S/prep OUT_DIR=$R DSV3_COMMIT=$(cat "$S/COMMIT")
SEEDS=${SEEDS:-$(seq 1 48 | tr '\n' ' ')} VARIANTS=${VARIANTS:-bf16 fp8} JOBS=${JOBS:-4}
DEADLINE=${DEADLINE:-420} LIMIT=${LIMIT:-465}
export NCCL_NVLS_ENABLE OMP_NUM_THREADS BUILD PREP OUT_DIR DSV3_COMMIT SEEDS VARIANTS JOBS DEADLINE LIMIT
nvidia-smi -L 2>/dev/null || true
rm -f "$R.rc"
{ sh "$S/scripts/fp8-train-compare.sh" "$@"; echo $? >"$R.rc"; } 2>&1 | tee "$D/sweep.log"
rc=$(cat "$R.rc" 2>/dev/null || echo '?')

# the pack: tables, plots, the finished runs' metrics (step, loss, grad norm, time; val lines whole)
P=$R.pack
rm -rf "$P"
mkdir -p "$P/fp8seeds"
for f in header.txt timing.txt summary.txt runs.txt rel.txt fp8-vs-bf16.png fp8-seeds.png; do
    if [ -f "$R/$f" ]; then cp "$R/$f" "$P/fp8seeds/"; fi
done
for m in "$R"/s*/*/metrics.jsonl; do
    [ -f "$m" ] || continue
    run=${m#"$R"/}
    run=${run%/metrics.jsonl}
    case $run in *.*) continue ;; esac
    mkdir -p "$P/fp8seeds/$run"
    awk '/"val_loss"/ { print; next }
         { o = ""; n = split("step loss grad_norm seconds", k, " ")
           for (i = 1; i <= n; i++) if (match($0, "\"" k[i] "\":[-0-9.eE+]+")) o = o (o == "" ? "" : ",") substr($0, RSTART, RLENGTH)
           print "{" o "}" }' "$m" >"$P/fp8seeds/$run/metrics.jsonl"
done
for l in "$R"/s*/*.log; do
    [ -f "$l" ] || continue
    echo "== ${l#"$R"/}"
    tail -3 "$l"
done >"$P/fp8seeds/logtails.txt"
cp "$D/sweep.log" "$P/fp8seeds/"
tar -C "$P" -czf "$D/fp8seeds.tgz" fp8seeds
for f in summary.txt fp8-vs-bf16.png fp8-seeds.png; do
    if [ -f "$R/$f" ]; then cp "$R/$f" "$D/"; fi
done
echo
echo "== $D: $(cd "$D" && echo *) ($(du -k "$D/fp8seeds.tgz" | cut -f1) KiB tarball); sweep exit status $rc"
echo "== the sweep and the statistics again (all of it in summary.txt):"
grep -h '^# [0-9]* *NVIDIA\|^#.*GPU(s) x' "$R/header.txt" 2>/dev/null
sed -n '/^# sweep:/,$p' "$R/summary.txt" 2>/dev/null
[ "$rc" = 0 ]
