#!/bin/sh
# A/B timing of the batch-1 GPU decode step for several builds and settings on one model
# folder: each VARIANT is a bin folder (a build's, or a copy of one with another commit's
# dsv3-sample in it), optionally followed by ":" and environment settings separated by ";"
# (e.g. "build/bin:DSV3_GINFER_G1=0;DSV3_GINFER_FUSE=router,kvw,uvc"). Every variant runs
# ROUNDS times, in turn, each as its own dsv3-sample process with DSV3_GINFER_CLOCK=1 on the
# same random bf16 folder of CONFIG (decode-inputs.sh: the ~1200-token prompt, greedy, -c 2048,
# N new tokens), so all see the same positions and the same L2 and clock state as far as one
# machine allows. Printed per run: the step's device time ("us a step": graph time over the
# decode steps), the clocked kernels' phases (kernels/ginfer.cu clock_report) and the md5 of
# the generated text, which must be the same for every variant whose outputs are meant to be
# bitwise equal. Two runs of one variant differ by up to ~5 us a 1b-moe step on an H200, so
# compare rounds, not single runs.
# TEMP (default 0, greedy): the temperature, e.g. 0.8 for dsv3-sample's sampled default
# (then the draw graph's gk_topk_draw is clocked too).
# Usage: scripts/clock-decode.sh CONFIG N ROUNDS VARIANT...
#   e.g. scripts/clock-decode.sh configs/1b-moe.json 128 2 build/bin build/bin:DSV3_GINFER_G1=0
set -eu
if [ $# -lt 4 ]; then
    echo "usage: scripts/clock-decode.sh CONFIG N ROUNDS BINDIR[:ENV;ENV...]..." >&2
    exit 2
fi
cfg=$1 n=$2 rounds=$3
shift 3
W=$(mktemp -d /tmp/dsv3-clock-decode-XXXXXX)
trap 'rm -rf "$W"' EXIT
. "$(dirname "$0")/decode-inputs.sh"
decode_folder "${1%%:*}" "$W" "$cfg"
for r in $(seq "$rounds"); do
    for v in "$@"; do
        bin=${v%%:*} envs=
        case "$v" in *:*) envs=$(echo "${v#*:}" | tr ';' ' ') ;; esac
        echo "--- $(basename "$cfg" .json) $bin $envs round $r"
        rc=0
        env $envs DSV3_GINFER_CLOCK=1 "$bin/dsv3-sample" -m "$W/model" -t "$W/tok.bpe" \
            --device cuda -f "$W/long.txt" --temp "${TEMP:-0}" --seed 7 --ignore-eos -c 2048 -n "$n" \
            >"$W/out" 2>"$W/err" || rc=$?
        echo "rc $rc"
        grep -E "decode steps from CUDA graphs|ginfer clock:" "$W/err" || tail -5 "$W/err"
        echo "text md5 $(md5sum <"$W/out" | cut -d' ' -f1)"
    done
done
