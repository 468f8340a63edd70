#!/bin/sh
# dsv3-sample generation speed on the CPU: decode tokens/s of configs/small.json with seeded
# random weights (dsv3-config --init) at batch 1 and batch 8 (--batch --parallel 8 with 8
# requests), greedy, 64 new tokens after a 32-token prompt, against the memory-bandwidth
# floor of this machine (tests/bench/bench_sample_floor: activated float32 weights plus
# latent cache read per step over the measured memcpy bandwidth). For docs/PERF.md.
#
# DEVICE=cuda: the GPU engine (kernels/ginfer) instead, for the lent device machine (NOMAKE=1:
# use the build carried there), on each of CONFIGS (default configs/small.json and
# configs/1b-moe.json, BF16 random weights from dsv3-config --init --bf16):
#   prefill: a prompt of about 1000 tokens, tokens/s of the one pass;
#   batch 1: N new tokens after it, decode tokens/s against the roofline (bench_sample_floor
#     ... gpu: bf16 activated weights + the cache read a step, over the device-to-device copy
#     bandwidth measured in the same run) and the fraction reached;
#   batch 8 and 64: as many requests of a 32-token prompt decoded together (--batch
#     --parallel B), decode tokens/s (rows a second) and the floor for that batch;
#   transformers' generate() on the same folder (bf16, cuda, batch 1 and 8, N new tokens after
#     a 32-token prompt), when python3 has torch and transformers (HF=0: not).
# Also with DEVICE=cuda: BASE_BIN=DIR runs the batch-1 decode with DIR's dsv3-sample too (a
# baseline build, same folder, same run); PROFILE=1 once more with DSV3_GINFER_PROFILE=1
# (each launch kind's device time a step);
# PDL=0 once more with DSV3_GINFER_PDL=0 (run "pdl-off": plain launches instead of the
# default programmatic dependent launches with L2 prefetch, kernels/ginfer_k.cuh), batch 1
# and each batch size of BATCHES (rows "batch B (pdl-off)"); every other run leaves
# DSV3_GINFER_PDL as the caller has it (unset: the default);
# ENVS="A=1,B=2 C=3 ..." once more for each item, with its comma-separated variables set
# (run "env:A=1,B=2"; e.g. ENVS="DSV3_GINFER_PDL=2 DSV3_GINFER_PDL=3 DSV3_GINFER_CARVEOUT=100":
# the early-trigger and entry PDL schemes and one carveout for every launch, kernels/ginfer_k.cuh);
# UNFUSED=1 once more with DSV3_GINFER_FUSE=0 (the launches before the fused decode kernels;
# with PROFILE=1 its profile too, run "unfused-profile");
# MTP=1 once more with --mtp (speculative decoding with the MTP module, kernels/ginfer_mtp:
# tokens/s, the acceptance rate; random weights make its drafts rarely right);
# SAMPLED=1 once more sampled with dsv3-sample's defaults (llama.cpp's: --temp 0.8, top-k 40,
# top-p 0.95, min-p 0.05; --seed 7), run "sampled": each step drawn on the device from its 40
# largest logits and the next queued ahead (infer_draw_submit); once more with
# DSV3_SAMPLE_AHEAD=0 (run "sampled-wait": the 40 largest copied to the host, which draws,
# infer_forward_top) and with DSV3_SAMPLE_FULL=1 (run "sampled-full": every logit copied to
# the host), whose texts must equal the sampled run's; and each batch size of BATCHES three
# times more, the same three ways (temperature 0.8, request i seeded i; rows "batch B
# (sampled)", "batch B (sampled-wait, results same as sampled)", and sampled-full's);
# BATCHES (default "8 64") the batch sizes of the batch runs;
# MODELS_DIR=DIR: each config's folder made once in DIR and kept (decode-inputs.sh).
# FUSES="LIST ..." once more with each DSV3_GINFER_FUSE=LIST (run "fuse=LIST").
# PREFILL=VALUE once more with DSV3_GINFER_PREFILL=VALUE (e.g. gemv: every prompt row through
# the GEMVs instead of the default tensor-core pass, kernels/ginfer_prefill.cuh; run
# "prefill-VALUE": its prefill tokens/s too, and whether the greedy text equals the default
# run's). The other runs leave DSV3_GINFER_PREFILL unset.
# FP8=1: an FP8 copy of the folder (dsv3-quant: 128x128 block scales), batch-1 decode on it
# twice: as bf16 (dequantised at load, the default) and with DSV3_GINFER_FP8=1 (e4m3 weights
# read by the GEMVs, kernels/ginfer_fp8.cuh), each against its roofline (bench_sample_floor
# ... gpu and ... gpu-fp8: 1 + 1/32 bytes a FP8 weight), and whether their texts agree.
set -eu
BUILD=${BUILD:-build}
CONFIG=${CONFIG:-configs/small.json}
N=${N:-64}
THREADS=${THREADS:-1}  # the dev VM's 2 cores are shared: 2 OpenMP threads wait on each other
[ -n "${NOMAKE:-}" ] || make --no-print-directory all "$BUILD/tests/bench/bench_sample_floor" >/dev/null
BIN=$BUILD/bin
W=$(mktemp -d /tmp/dsv3-bench-sample-XXXXXX)
trap 'rm -rf "$W"' EXIT
echo "# $(date -u '+%F %H:%M') $(uname -m) $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p')), commit ${COMMIT:-$(cat "$BUILD/COMMIT" 2>/dev/null || git rev-parse --short HEAD)}, load average $(cut -d" " -f1 /proc/loadavg), dsv3-sample --threads $THREADS"
. "$(dirname "$0")/decode-inputs.sh"
decode_tokenizer "$BIN" "$W"
"$BIN/dsv3-config" --quiet --init "$W/model" --seed 1 "$CONFIG"
# A prompt of 32 tokens (with BOS): words the tokenizer knows.
P="the cat sat on the mat number 1 and then ran home the cat sat on the mat number 2 and"
# one line of stats: "prefill R tokens/s (T tokens), decode D tokens/s"
rates() {
    line=$(grep "dsv3-sample: prompt" "$1")
    ptok=$(echo "$line" | sed 's/.*prompt \([0-9]*\) tokens.*/\1/')
    pre=$(echo "$line" | sed 's/.*prompt [0-9]* tokens in [0-9.]* s (\([0-9.]*\) tokens\/s).*/\1/')
    rate=$(echo "$line" | sed 's/.*decode [0-9.]* s (\([0-9.]*\) tokens\/s).*/\1/')
}
if [ "${DEVICE:-cpu}" = cuda ]; then
    export DSV3_GINFER_FUSE="${DSV3_GINFER_FUSE:-}"  # the headline run: the default fusions
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || true
    decode_long_prompt "$W/long.txt"
    for CFG in ${CONFIGS:-configs/small.json configs/1b-moe.json}; do
        name=$(basename "$CFG" .json)
        decode_model "$BIN" "$W/$name" "$CFG"
        env -u DSV3_GINFER_PREFILL "$BIN/dsv3-sample" -m "$W/$name" -t "$W/tok.bpe" --device cuda \
            -f "$W/long.txt" -n "$N" --temp 0 --ignore-eos -c 2048 >"$W/out1.txt" 2>"$W/err"
        rates "$W/err"
        floor=$("$BUILD/tests/bench/bench_sample_floor" "$CFG" 1 $((ptok + N / 2)) gpu)
        fl=$(echo "$floor" | sed 's/.*floor \([0-9.]*\) tokens\/s.*/\1/')
        echo "$name: $(sed -n 's/.*device \(.*\), seed.*/\1/p' "$W/err")"
        echo "$name prefill: $ptok tokens at $pre tokens/s"
        echo "$name batch 1: decode $rate tokens/s at positions $ptok..$((ptok + N)); $floor; reached $(awk -v a="$rate" -v b="$fl" 'BEGIN { printf "%.0f%%", 100 * a / b }')"
        sed -n 's/^dsv3-sample: \(.*CUDA graphs.*\)/  \1/p' "$W/err"
        for run in ${PREFILL:+prefill-$PREFILL} ${BASE_BIN:+base} ${UNFUSED:+unfused} ${MTP:+mtp} \
            ${SAMPLED:+sampled sampled-wait sampled-full} \
            $([ "${PDL:-}" = 0 ] && echo pdl-off) ${PROFILE:+profile} \
            ${UNFUSED:+${PROFILE:+unfused-profile}} $(for f in ${FUSES:-}; do echo "fuse=$f"; done) \
            $(for v in ${ENVS:-}; do echo "env:$v"; done); do
            bin=$BIN/dsv3-sample
            if [ $run = base ]; then bin=$BASE_BIN/dsv3-sample; fi
            env $([ $run = "prefill-${PREFILL:-}" ] && echo "DSV3_GINFER_PREFILL=$PREFILL" ||
                    echo "-u DSV3_GINFER_PREFILL") \
                $([ $run = pdl-off ] && echo DSV3_GINFER_PDL=0) \
                DSV3_GINFER_PROFILE=$(case $run in *profile) echo 1 ;; *) echo 0 ;; esac) \
                DSV3_GINFER_FUSE=$(case $run in unfused*) echo 0 ;; fuse=*) echo "${run#fuse=}" ;; *) echo "$DSV3_GINFER_FUSE" ;; esac) \
                $(case $run in env:*) echo "${run#env:}" | tr , ' ' ;; esac) \
                $([ $run = sampled-full ] && echo DSV3_SAMPLE_FULL=1) \
                $([ $run = sampled-wait ] && echo DSV3_SAMPLE_AHEAD=0) \
                "$bin" -m "$W/$name" -t "$W/tok.bpe" --device cuda -f "$W/long.txt" \
                -n "$N" $(case $run in sampled*) echo --temp 0.8 --seed 7 ;; *) echo --temp 0 ;; esac) \
                --ignore-eos -c 2048 $([ $run = mtp ] && echo --mtp) \
                >"$W/out2.txt" 2>"$W/err" || {
                echo "$name batch 1 ($run): failed: $(tail -2 "$W/err")"
                continue
            }
            rates "$W/err"
            ref=$W/out1.txt
            case $run in sampled) cp "$W/out2.txt" "$W/out3.txt" ;; sampled-*) ref=$W/out3.txt ;; esac
            same=$(cmp -s "$ref" "$W/out2.txt" && echo same || echo DIFFERENT)
            what="text $same as the run above"
            case $run in
            sampled) what="sampled text" ;;
            sampled-*) what="text $same as the sampled run's" ;;
            esac
            if [ $run = "prefill-${PREFILL:-}" ]; then
                echo "$name prefill ($run): $ptok tokens at $pre tokens/s"
            fi
            echo "$name batch 1 ($run): decode $rate tokens/s, reached $(awk -v a="$rate" -v b="$fl" 'BEGIN { printf "%.0f%%", 100 * a / b }'); $what"
            sed -n 's/^dsv3-sample: \(.*CUDA graphs.*\)/  \1/p' "$W/err"
            sed -n 's/^dsv3-sample: \(mtp: .*\)/  \1/p' "$W/err"
            case $run in *profile) sed -n '/^ginfer profile/,$p' "$W/err" ;; esac
        done
        if [ -n "${FP8:-}" ]; then
            "$BIN/dsv3-quant" --quiet -j 8 "$W/$name" -o "$W/$name-fp8"
            for run in fp8-as-bf16 fp8; do
                env DSV3_GINFER_FP8=$([ $run = fp8 ] && echo 1 || echo 0) \
                    "$BIN/dsv3-sample" -m "$W/$name-fp8" -t "$W/tok.bpe" --device cuda \
                    -f "$W/long.txt" -n "$N" --temp 0 --ignore-eos -c 2048 \
                    >"$W/out-$run.txt" 2>"$W/err" || {
                    echo "$name batch 1 ($run): failed: $(tail -2 "$W/err")"
                    continue
                }
                rates "$W/err"
                mode=$([ $run = fp8 ] && echo gpu-fp8 || echo gpu)
                floor=$("$BUILD/tests/bench/bench_sample_floor" "$CFG" 1 $((ptok + N / 2)) $mode)
                fl=$(echo "$floor" | sed 's/.*floor \([0-9.]*\) tokens\/s.*/\1/')
                echo "$name batch 1 ($run): $(sed -n 's/.*device \(.*\), seed.*/\1/p' "$W/err"); prefill $pre tokens/s; decode $rate tokens/s; $floor; reached $(awk -v a="$rate" -v b="$fl" 'BEGIN { printf "%.0f%%", 100 * a / b }')"
                sed -n 's/^dsv3-sample: \(.*CUDA graphs.*\)/  \1/p' "$W/err"
            done
            same=$(cmp -s "$W/out-fp8-as-bf16.txt" "$W/out-fp8.txt" && echo same || echo DIFFERENT)
            echo "$name fp8 folder: text $same as bf16 and as fp8 (greedy; the weights differ by one bf16 rounding)"
            rm -rf "${W:?}/$name-fp8"
        fi
        for B in ${BATCHES:-8 64} $([ "${PDL:-}" = 0 ] && for b in ${BATCHES:-8 64}; do echo "$b:pdl-off"; done) \
            $([ -n "${SAMPLED:-}" ] && for b in ${BATCHES:-8 64}; do echo "$b:sampled $b:sampled-wait $b:sampled-full"; done); do
            tag=${B#*:} B=${B%%:*}
            t=0
            case $tag in sampled*) t=0.8 ;; esac
            [ "$tag" = "$B" ] && tag="" || tag=" ($tag)"
            : >"$W/req.jsonl"
            i=0
            while [ $i -lt $B ]; do
                printf '{"prompt": "%s %d", "n_predict": %d, "temperature": %s, "seed": %d}\n' "$P" $i "$N" $t $i >>"$W/req.jsonl"
                i=$((i + 1))
            done
            env $([ "$tag" = " (pdl-off)" ] && echo DSV3_GINFER_PDL=0) \
                $([ "$tag" = " (sampled-full)" ] && echo DSV3_SAMPLE_FULL=1) \
                $([ "$tag" = " (sampled-wait)" ] && echo DSV3_SAMPLE_AHEAD=0) \
                "$BIN/dsv3-sample" -m "$W/$name" -t "$W/tok.bpe" --device cuda --batch --parallel $B \
                --ignore-eos -c 256 <"$W/req.jsonl" >"$W/out.jsonl" 2>"$W/err"
            case $tag in
            " (sampled)") cp "$W/out.jsonl" "$W/out-sampled.jsonl" ;;
            " (sampled-"*) tag=${tag# (}; tag=" (${tag%)}, results $(cmp -s "$W/out.jsonl" "$W/out-sampled.jsonl" && echo same || echo DIFFERENT) as sampled)" ;;
            esac
            rates "$W/err"
            floor=$("$BUILD/tests/bench/bench_sample_floor" "$CFG" $B $((ptok / B + N / 2)) gpu)
            fl=$(echo "$floor" | sed 's/.*floor \([0-9.]*\) tokens\/s.*/\1/')
            echo "$name batch $B$tag: decode $rate tokens/s (all rows); $floor; reached $(awk -v a="$rate" -v b="$fl" 'BEGIN { printf "%.0f%%", 100 * a / b }')"
            sed -n 's/^dsv3-sample: \(.*CUDA graphs.*\)/  \1/p' "$W/err"
        done
        if [ "${HF:-1}" = 1 ] && python3 -c 'import torch, transformers' 2>/dev/null; then
            python3 scripts/bench-sample-hf.py "$W/$name" "$N" 1,8 $(seq 2 33) 2>"$W/hf.err" |
                sed "s/^/$name /" || tail -3 "$W/hf.err"
        fi
        rm -rf "${W:?}/$name"
    done
    exit 0
fi
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
