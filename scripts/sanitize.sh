#!/bin/sh
# compute-sanitizer over the GPU code, issue 7's "memcheck and racecheck clean on a small
# config", in one call on the device machine:
#   memcheck (with --leak-check full; 2 steps of 4 micro-batches) and racecheck (1 step of
#     1: it is slow) on dsv3-train --device cuda over configs/tiny.json (MTP and the
#     balance loss on) and the same config at V3's attention head dims 96/64 (so the
#     causal backward takes the warp-specialised kernels of kernels/attention_wsb.cuh),
#     each causal and with --doc-mask;
#   memcheck and racecheck on build/tests/gpu/test_attention (every attention kernel and
#     backward candidate on ragged shapes).
# KNS=substring restricts the instrumentation to kernels whose name holds it (e.g.
# KNS=ws_d: the warp-specialised backward only; much faster); unset, everything is checked.
# PARTS (default "train attention") picks the groups of runs: dsv3-train's, test_attention's;
# TOOLS (default "memcheck racecheck") the tools; CFGS (default "tiny tiny96") the configs.
# STEP_TIMEOUT (seconds, default 300) bounds each run. Logs go to $OUT (the device tool's
# folder) or $BUILD/sanitize; the last lines are one row per run: tool, target, errors or
# hazards reported, exit status. Exit status 1 when any run reported an error or failed.
# Usage: [BUILD=build] [KNS=ws_d] scripts/sanitize.sh
set -u
BUILD=${BUILD:-build}
LOG=${OUT:-$BUILD/sanitize}
TO=${STEP_TIMEOUT:-300}
mkdir -p "$LOG"
bin=$(cd "$BUILD/bin" && pwd)
command -v compute-sanitizer >/dev/null 2>&1 || { echo "sanitize.sh: no compute-sanitizer on PATH" >&2; exit 1; }
T=$(mktemp -d /tmp/dsv3-sanitize-XXXXXX)
trap 'rm -rf "$T"' EXIT
filt=""
[ -n "${KNS:-}" ] && filt="--kernel-name kns=$KNS"

# configs/tiny.json and the same at head dims 96/64 (64 + 32 rotary, values 64)
cp configs/tiny.json "$T/tiny.json"
sed -e 's/"qk_nope_head_dim": *[0-9]*/"qk_nope_head_dim": 64/' \
    -e 's/"qk_rope_head_dim": *[0-9]*/"qk_rope_head_dim": 32/' \
    -e 's/"v_head_dim": *[0-9]*/"v_head_dim": 64/' configs/tiny.json >"$T/tiny96.json"
# a few thousand random-ish tokens in documents of 20, records of 128 (tiny's YaRN allows 256)
awk 'BEGIN { srand(7); for (i = 0; i < 1500; i++) { s = "5 9 17 33 65 129 257 3 7 11 13 19";
     for (j = 0; j < 8; j++) s = s " " int(rand() * 500); print s } }' >"$T/ids.txt"
"$bin/dsv3-shard" make --vocab-size 512 -o "$T/a.shard" "$T/ids.txt" &&
    "$bin/dsv3-pack" --quiet -o "$T/data" --eos-id 1 -L 128 --val 0.1 -s 1 "$T/a.shard" ||
    { echo "sanitize.sh: could not make the training data" >&2; exit 1; }

rows="" bad=0
# run NAME TOOL CMD...: one sanitizer run, its log, its summary row
run() {
    name=$1 tool=$2
    shift 2
    extra=""
    [ "$tool" = memcheck ] && extra="--leak-check full"
    timeout "$TO" compute-sanitizer --tool "$tool" $extra $filt "$@" >"$LOG/$name.log" 2>&1
    rc=$?
    sum=$(grep -E '(ERROR|RACECHECK) SUMMARY' "$LOG/$name.log" | tail -1 | sed 's/^========= //')
    [ -z "$sum" ] && sum="no summary"
    case $sum in # memcheck: "ERROR SUMMARY: 0 errors"; racecheck: "... (0 errors, N warnings)"
        *"SUMMARY: 0 errors"* | *"(0 errors"*) [ $rc -ne 0 ] && bad=1 ;;
        *) bad=1 ;;
    esac
    grep -q 'Internal Sanitizer Error' "$LOG/$name.log" && { bad=1; sum="$sum; internal sanitizer error"; }
    rows="$rows$(printf '%-9s %-26s rc %-3s %s' "$tool" "$name" "$rc" "$sum")\n"
}

case " ${PARTS:-train attention} " in *" train "*) cfgs=${CFGS:-tiny tiny96} ;; *) cfgs="" ;; esac
for cfg in $cfgs; do
    for mask in causal docs; do
        opt=""
        [ $mask = docs ] && opt="--doc-mask"
        for tool in ${TOOLS:-memcheck racecheck}; do
            # racecheck is slow (minutes a step on every kernel): one micro-batch, one step
            n="-g 4 --steps 2"
            [ $tool = racecheck ] && n="-g 2 --steps 1"
            run "train-$cfg-$mask-$tool" "$tool" "$bin/dsv3-train" -c "$T/$cfg.json" \
                -d "$T/data" -b 2 $n --device cuda --mtp-weight 0.3 \
                --balance-alpha 0.01 --quiet $opt -o "$T/out-$cfg-$mask-$tool"
        done
    done
done
case " ${PARTS:-train attention} " in *" attention "*) tools=${TOOLS:-memcheck racecheck} ;; *) tools="" ;; esac
for tool in $tools; do
    run "test_attention-$tool" "$tool" "$BUILD/tests/gpu/test_attention"
done

echo "== compute-sanitizer ${KNS:+(kernels named *$KNS*) }$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
printf "$rows"
[ $bad -eq 0 ] && echo "sanitizer: clean" || echo "sanitizer: NOT clean (logs in $LOG)"
exit $bad
