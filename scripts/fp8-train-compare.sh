#!/bin/sh
# Issue 10's long check of FP8 training: one small MoE trained with dsv3-train --device cuda
# in BF16 and with --fp8 from the same initial weights (same --seed) on the same data in the
# same order, for each of SEEDS, next to the two things that say how far apart two BF16 runs
# land anyway: a BF16 run of the same seed through other, equally exact kernels ("bf16alt":
# the block-per-row RMSNorm and the two-pass cross-entropy, DSV3_NORM_WARP=0 DSV3_CE_KERNEL=1:
# only the fp32 summation orders differ) and the BF16 runs of the other seeds. The claim is
# FP8 against BF16 per seed against DeepSeek-V3's published bound (0.25% relative); bf16alt
# shows how much of that a last-bit change alone makes.
#
# Data: real text. CORPUS (files or folders; default the demo corpus, /usr/share/common-
# licenses; docs/PARITY.md's runs used vim's help, /usr/share/vim/vim90/doc/*.txt, with the
# licenses) is tokenised with a byte-level BPE of 4000 ids learned on it (dsv3-tok) and packed
# into records of L+1 tokens with a validation split of VAL (default 0.0501: 304 = 38 x 8
# records on that corpus, so that every evaluation reads the whole split exactly once whatever
# the seed's order). Model: CONFIG (default configs/small.json: 8 layers, hidden 512, 1 dense +
# 7 MoE layers of 1 shared + top-4 of routed experts of width 256) with vocab_size 4096, 16
# routed experts (20 put later tensors off cuBLASLt's 16-byte alignment) and no MTP module.
# AdamW at LR (default 1e-3), 100 warm-up steps, cosine decay to LR/10 at the last step; MTP
# and balance loss off; every 100 steps the validation loss over the whole val split
# (--eval-batches = val records / B).
#
# Variants (VARIANTS, default "bf16 fp8"; every one is compared with bf16 of its seed):
#   bf16      the reference
#   fp8       --fp8: attention projections, dense MLP, shared and routed experts in FP8
#   fp8dense  --fp8 with the routed experts kept bf16 (DSV3_MOE_FP8=0)
#   bf16alt   bf16 through the other RMSNorm and cross-entropy kernels (see above)
# Runs spread over GPUS GPUs (default: the count of `nvidia-smi -L`, at least 1): GPUS x JOBS
# workers (JOBS per GPU, default 1; the small model leaves a GPU mostly idle, and every kernel
# is deterministic, so running them side by side changes no loss), worker w on GPU w % GPUS
# (CUDA_VISIBLE_DEVICES), each taking the next run from one queue ordered seed by seed (bf16,
# then the other variants of seed 1, then of seed 2, ...), so that the runs of a seed start
# together and a sweep cut short leaves whole pairs. DEADLINE (seconds from the start of the
# runs; default none): no run starts after it, except the remaining variants of a seed already
# started; LIMIT (seconds, default none): no run starts that would not end by LIMIT judging by
# the longest run so far, and the runs still going at LIMIT are killed (kept as
# s<seed>/<variant>.killed, left out of the report). Runs that fail are kept as .failed, left out
# of the report, and make the exit status 1. Each run prints its time; the end, the sweep's
# (OUT_DIR/timing.txt: runs done, runs/minute per GPU, mean run time per variant).
#
# Definitions: a run's smoothed loss is the mean of its training losses over the last W steps
# (default 50); its end loss is the validation loss after the last step (the whole split, the
# same tokens for every run). Relative differences are (variant - bf16) / bf16 of the same
# seed. Prints, and writes to OUT_DIR/summary.txt, per seed and variant both measures and the
# largest |relative difference| of W-step means over the second half; the spread of the bf16
# runs over the seeds; and last, per variant and measure over the n seeds with both runs: the
# mean relative difference, its s.d., standard error and 95% confidence interval (Student's t,
# n-1 degrees of freedom), the 90% interval, the share of seeds within +-0.25%, and a verdict:
# "equivalent" when the 90% interval lies inside +-0.25% (two one-sided t-tests at 5%; also
# said when the 95% interval does, i.e. at 2.5%), "bias" when the 95% interval excludes 0
# (two-sided t-test at 5%), "beyond" when it lies wholly outside +-0.25%, else "unresolved"
# with the number of seeds that would make the 95% interval fit at the observed s.d. and mean.
# With gnuplot, OUT_DIR/fp8-vs-bf16.png: the first seed's bf16 and fp8 curves and the first 4
# seeds' relative differences of W-step means and of the validation losses against the
# +-0.25% band; OUT_DIR/fp8-seeds.png: every seed's end differences (dots), the mean and its
# 95% interval, and the band.
#
# Usage: scripts/fp8-train-compare.sh [STEPS] [B] [GB] [L]   (defaults 1000 8 8 512)
#        scripts/fp8-train-compare.sh --prep DIR [L]  (only tokenizer, data and config, into
#                                  DIR; PREP=DIR then skips that step, e.g. on a machine
#                                  without the corpus)
#        scripts/fp8-train-compare.sh --report DIR   (the comparison, statistics and plots
#                                  again, from DIR/s<seed>/<variant>/metrics.jsonl of an
#                                  earlier run; seeds without a bf16 run are left out)
# Env: BUILD (default build), DSV3_COMMIT, CORPUS, CONFIG, VAL, LR, W, SEEDS (default $SEED or 1),
# VARIANTS, GPUS, JOBS (per GPU), DEADLINE, LIMIT, PREP, DEVICE (default cuda), EVAL_EVERY
# (default 100), OUT_DIR (default $BUILD/fp8-compare; replaced).
# A 48-seed sweep on a lent machine of several GPUs: scripts/fp8-seeds-stage.sh, then its run.sh
# there (scripts/fp8-seeds-run.sh; docs/PARITY.md, FP8 section).
set -eu
# every linear layer in FP8 (dsv3-train --fp8 keeps the small ones bf16 by default:
# GMODEL_FP8_PAYS, kernels/gmodel.h); this checks FP8's numerics on a small model
export DSV3_FP8_MIN_DIM=${DSV3_FP8_MIN_DIM:-0}
W=${W:-50}

num_lines() { # METRICS OUTLOSS OUTVAL: "step loss" and "step val_loss" columns
    awk -v out="$3" '
        function num(k,   r) { if (!match($0, "\"" k "\":[-0-9.eE+]+")) return ""
                               r = substr($0, RSTART, RLENGTH); sub(/^[^:]*:/, "", r); return r }
        /"val_loss"/ { print num("step"), num("val_loss") > out; next }
        /"loss":/ { print num("step"), num("loss") }' "$1" >"$2"
}

pair() { # A B: "step a b" for the steps in both, in A's order (steps ascending)
    awk 'NR == FNR { v[$1] = $2; next } ($1 in v) { print $1, $2, v[$1] }' "$2" "$1"
}

means() { # joined "step a b" -> "step a b meanA meanB rel%" of the W-step moving means
    awk -v W="$W" '
        { s[NR] = $1; a[NR] = $2; b[NR] = $3; sa += $2; sb += $3
          if (NR > W) { sa -= a[NR - W]; sb -= b[NR - W] }
          n = NR < W ? NR : W
          printf "%d %.6f %.6f %.6f %.6f %.5f\n", $1, $2, $3, sa / n, sb / n, 100 * (sb - sa) / sa }'
}

compare() { # DIR SEED VARIANT: one summary line; writes DIR/s<seed>/<variant>.joined/.valrel
    d=$1 s=$2 v=$3 base=$1/s$2
    # both runs must have ended at the same step (a run cut short says nothing of the end)
    ends="$(tail -1 "$base/bf16.loss" | cut -d' ' -f1) $(tail -1 "$base/$v.loss" | cut -d' ' -f1)"
    ends="$ends $(tail -1 "$base/bf16.val" | cut -d' ' -f1) $(tail -1 "$base/$v.val" | cut -d' ' -f1)"
    # shellcheck disable=SC2086
    set -- $ends
    if [ $# -ne 4 ] || [ "$1" != "$2" ] || [ "$3" != "$4" ]; then
        echo "seed $s $v: left out: the runs end at different steps (train bf16 ${1:-?} $v ${2:-?}, val ${3:-?} ${4:-?})"
        return 0
    fi
    pair "$base/bf16.loss" "$base/$v.loss" | means >"$base/$v.joined"
    pair "$base/bf16.val" "$base/$v.val" | awk '{ printf "%d %.6f %.6f %.5f\n", $1, $2, $3, 100 * ($3 - $2) / $2 }' \
        >"$base/$v.valrel"
    n=$(wc -l <"$base/$v.joined")
    [ "$n" -ge "$W" ] || { echo "fp8-train-compare: seed $s $v: only $n common steps (need $W)" >&2; exit 1; }
    maxrel=$(awk -v n="$n" -v W="$W" 'NR > n / 2 && NR >= W { v = $6 < 0 ? -$6 : $6; if (v > m) m = v } END { printf "%.3f", m }' "$base/$v.joined")
    last=$(tail -1 "$base/$v.joined")
    val=$(tail -1 "$base/$v.valrel")
    echo "$s $v $(echo "$val" | cut -d' ' -f4) $(echo "$last" | cut -d' ' -f6)" >>"$d/rel.txt"
    echo "$last" "$val" | awk -v s="$s" -v v="$v" -v W="$W" -v mx="$maxrel" '{
        printf "seed %-3s %-8s | train, mean of steps %d-%d: bf16 %.5f %s %.5f %+.3f%% | val at %d: bf16 %.5f %s %.5f %+.3f%% | max |rel| of %d-step means, 2nd half: %s%%\n",
            s, v, $1 - W + 1, $1, $4, v, $5, $6, $7, $8, v, $9, $10, W, mx }'
}

runs_of() { # DIR SEED: the variants of the seed with a metrics file (not the .killed/.failed)
    for m in "$1/s$2"/*/metrics.jsonl; do
        [ -f "$m" ] || continue
        v=$(basename "$(dirname "$m")")
        case $v in *.*) continue ;; esac
        echo "$v"
    done
}

# Over the seeds: "seed variant val% train%" lines in, per variant and measure the mean
# relative difference, s.d., standard error, t intervals and the verdict out (see the top).
# P(|T| < t) for Student's t of nu degrees of freedom is the finite series of Abramowitz and
# Stegun 26.7.3-4 (integer nu), its quantiles by bisection.
stats() { # REL.TXT
    awk -v B=0.25 '
        function tabs(t, nu,   th, c2, sn, sum, term, k) {
            th = atan2(t, sqrt(nu)); sn = sin(th); c2 = cos(th) ^ 2
            if (nu % 2 == 0) {
                sum = term = 1
                for (k = 2; k <= nu - 2; k += 2) { term *= (k - 1) / k * c2; sum += term }
                return sn * sum
            }
            if (nu == 1) return 2 * th / PI
            sum = term = cos(th)
            for (k = 3; k <= nu - 2; k += 2) { term *= (k - 1) / k * c2; sum += term }
            return 2 / PI * (th + sn * sum)
        }
        function tq(conf, nu,   lo, hi, mid, i) { # t with P(|T| < t) = conf
            lo = 0; hi = 1e4
            for (i = 0; i < 200; i++) { mid = (lo + hi) / 2; if (tabs(mid, nu) < conf) lo = mid; else hi = mid }
            return (lo + hi) / 2
        }
        function need(sd, margin,   k) { # fewest seeds whose 95% half-width is below margin
            if (margin <= 0) return -1
            if (sd == 0) return 2
            for (k = 2; k <= 100000; k++) if (tq(0.95, k - 1) * sd / sqrt(k) < margin) return k
            return -1
        }
        function one(v, what, n, s, ss, inb,   m, sd, se, t95, t90, lo, hi, lo9, hi9, am, k, k0, verdict) {
            if (n < 2) { printf "%s vs bf16, %s: %d seed, too few for an interval\n", v, what, n; return }
            m = s / n; sd = ss - s * s / n; sd = sd > 0 ? sqrt(sd / (n - 1)) : 0; se = sd / sqrt(n)
            t95 = tq(0.95, n - 1); t90 = tq(0.90, n - 1)
            lo = m - t95 * se; hi = m + t95 * se; lo9 = m - t90 * se; hi9 = m + t90 * se
            printf "%s vs bf16, %s, n = %d seeds: mean %+.3f%%, s.d. %.3f%%, s.e. %.3f%%; 95%% CI [%+.3f%%, %+.3f%%] (t %.3f, %d dof), 90%% CI [%+.3f%%, %+.3f%%]; |diff| < %.2f%% in %d of %d (%.0f%%)\n",
                v, what, n, m, sd, se, lo, hi, t95, n - 1, lo9, hi9, B, inb, n, 100 * inb / n
            am = m < 0 ? -m : m; verdict = ""
            if (lo9 > -B && hi9 < B)
                verdict = sprintf("equivalent within +-%.2f%%: the 90%% CI lies inside (two one-sided t-tests at 5%%%s)", B,
                                  lo > -B && hi < B ? "; the 95% CI too, 2.5%" : "; not the 95% CI")
            if (lo > B || hi < -B)
                verdict = sprintf("beyond +-%.2f%%: the 95%% CI lies wholly outside the band", B)
            if (lo > 0 || hi < 0)
                verdict = verdict (verdict == "" ? "" : "; ") sprintf("bias detected: the 95%% CI excludes 0 (%s, t-test at 5%%)", m > 0 ? "higher" : "lower")
            if (verdict == "") {
                k = need(sd, B - am); k0 = need(sd, B)
                verdict = "unresolved: the 95% CI holds 0 and reaches outside the band; at this s.d. the 95% CI fits inside it with "
                verdict = verdict (k > 0 ? sprintf("about %d seeds if the true mean is the observed one", k) : "no number of seeds at the observed mean")
                verdict = verdict sprintf(", %d if it is 0", k0)
                if (am > 0) { k = need(sd, am); if (k > 0) verdict = verdict sprintf("; the observed mean would be told from 0 with about %d", k) }
            }
            printf "  verdict: %s\n", verdict
        }
        BEGIN { PI = atan2(0, -1) }
        { if (!($2 in n)) order[++nv] = $2
          n[$2]++; a[$2] += $3; q[$2] += $3 * $3; b[$2] += $4; r[$2] += $4 * $4
          if ($3 > -B && $3 < B) ia[$2]++
          if ($4 > -B && $4 < B) ib[$2]++ }
        END { for (i = 1; i <= nv; i++) { v = order[i]
                  one(v, "val loss at the end", n[v], a[v], q[v], ia[v] + 0)
                  one(v, "train mean of the last W steps", n[v], b[v], r[v], ib[v] + 0) } }' "$1"
}

report() { # DIR: every DIR/s<seed>/<variant>/metrics.jsonl against DIR/s<seed>/bf16
    d=$1
    seeds=$(find "$d" -mindepth 1 -maxdepth 1 -type d -name "s[0-9]*" | sed "s|.*/s||" | sort -n)
    [ -n "$seeds" ] || { echo "fp8-train-compare: $d: no s<seed> folders" >&2; exit 1; }
    paired=""
    for s in $seeds; do [ ! -f "$d/s$s/bf16/metrics.jsonl" ] || paired="$paired $s"; done
    rm -f "$d/rel.txt"
    : >"$d/rel.txt"
    {
        if [ -f "$d/header.txt" ]; then cat "$d/header.txt"; fi
        for s in $seeds; do
            if [ ! -f "$d/s$s/bf16/metrics.jsonl" ]; then
                echo "seed $s: left out: no bf16 run ($(runs_of "$d" "$s" | tr '\n' ' ')done)"
                continue
            fi
            for v in $(runs_of "$d" "$s"); do
                num_lines "$d/s$s/$v/metrics.jsonl" "$d/s$s/$v.loss" "$d/s$s/$v.val"
            done
            for v in $(runs_of "$d" "$s"); do
                [ "$v" = bf16 ] || compare "$d" "$s" "$v"
            done
        done
        # the bf16 runs over the seeds: the spread a different initialisation and data order makes
        for s in $paired; do
            echo "$s $(tail -1 "$d/s$s/bf16.val" | cut -d' ' -f2) $(tail -n "$W" "$d/s$s/bf16.loss" | awk '{ t += $2 } END { printf "%.6f", t / NR }')"
        done | awk -v W="$W" '
            { n++; v[n] = $2; t[n] = $3 }
            END { if (n < 2) exit
                  vmin = vmax = v[1]; tmin = tmax = t[1]
                  for (i = 1; i <= n; i++) { vs += v[i]; ts += t[i]
                      if (v[i] < vmin) vmin = v[i]; if (v[i] > vmax) vmax = v[i]
                      if (t[i] < tmin) tmin = t[i]; if (t[i] > tmax) tmax = t[i] }
                  printf "bf16 over %d seeds: val %.5f-%.5f (spread %.3f%% of the mean), train mean of the last %d steps %.5f-%.5f (%.3f%%)\n",
                      n, vmin, vmax, 100 * (vmax - vmin) / (vs / n), W, tmin, tmax, 100 * (tmax - tmin) / (ts / n) }'
        if [ -f "$d/timing.txt" ]; then cat "$d/timing.txt"; fi
        echo "# relative differences (x - bf16) / bf16 of the same seed, over the seeds with both runs (W = $W):"
        stats "$d/rel.txt"
    } | tee "$d/summary.txt"
    # shellcheck disable=SC2086
    plot "$d" $paired
    plot_seeds "$d"
}

plot() { # DIR SEEDS...: the curves of the first seed and the differences of the first 4, with gnuplot
    command -v gnuplot >/dev/null || return 0
    [ $# -ge 2 ] || return 0
    d=$1
    shift
    s1=$1
    [ -f "$d/s$s1/fp8.joined" ] || return 0
    colors="#d0401f #1f8f3f #7f3fbf #bf8f1f"
    rel="" val="" i=0
    for s in "$@"; do
        i=$((i + 1))
        [ "$i" -le 4 ] || break
        c=$(echo "$colors" | cut -d' ' -f"$i")
        for v in fp8 fp8dense bf16alt; do
            [ -f "$d/s$s/$v.joined" ] || continue
            case $v in
            fp8) st="lw 2 lc rgb \"$c\"" ;;
            fp8dense) st="lw 1 dt 3 lc rgb \"$c\"" ;;
            bf16alt) st="lw 1 dt 2 lc rgb \"$c\"" ;;
            esac
            rel="$rel${rel:+, }\"$d/s$s/$v.joined\" u 1:(\$1 >= $W ? \$6 : 1/0) w l $st t \"$v, seed $s\""
            val="$val${val:+, }\"$d/s$s/$v.valrel\" u 1:4 w lp pt 7 ps 0.6 $st t \"$v, seed $s\""
        done
    done
    gnuplot <<EOF
set terminal pngcairo size 1000,1000 font ",10"
set output "$d/fp8-vs-bf16.png"
set multiplot layout 3,1 title "dsv3-train BF16 vs --fp8, same start and data per seed"
set grid
set xrange [0:*]
set lmargin at screen 0.08
set rmargin at screen 0.75
set key outside right top vertical
set ylabel "training loss, seed $s1"
plot "$d/s$s1/fp8.joined" u 1:2 w l lc rgb "#c0c8f0" notitle, "$d/s$s1/fp8.joined" u 1:3 w l lc rgb "#f0c8c0" notitle, \
     "$d/s$s1/fp8.joined" u 1:4 w l lw 2 lc rgb "#1f4fbf" t "bf16 (${W}-step mean)", "$d/s$s1/fp8.joined" u 1:5 w l lw 2 lc rgb "#d0401f" t "fp8 (${W}-step mean)"
set ylabel "train, ${W}-step means: (x - bf16) / bf16, %"
set yrange [-2:2]
set key outside right top vertical
plot $rel, 0.25 w l dt 4 lc rgb "#20a020" t "+-0.25% (DeepSeek-V3)", -0.25 w l dt 4 lc rgb "#20a020" notitle
set ylabel "validation loss: (x - bf16) / bf16, %"
set xlabel "step"
plot $val, 0.25 w l dt 4 lc rgb "#20a020" t "+-0.25%", -0.25 w l dt 4 lc rgb "#20a020" notitle
unset multiplot
EOF
    echo "plot: $d/fp8-vs-bf16.png"
}

plot_seeds() { # DIR: every seed's end differences as dots, a row per variant and measure, with the mean and its 95% CI
    command -v gnuplot >/dev/null || return 0
    d=$1
    [ -s "$d/rel.txt" ] || return 0
    # rows: variant x measure in the order of first appearance; dots spread vertically by seed
    awk '{ if (!($2 in r)) { r[$2] = nv++; name[nv - 1] = $2 }
           y = 2 * r[$2]; j = (($1 * 37) % 13 - 6) / 40
           print y + j, $3 > "'"$d"'/seeds-dots.txt"; print y + 1 + j, $4 > "'"$d"'/seeds-dots.txt" }
         END { for (i = 0; i < nv; i++) printf "%s\"%s, val\" %d, \"%s, train\" %d", i ? ", " : "", name[i], 2 * i, name[i], 2 * i + 1
               print "" }' "$d/rel.txt" >"$d/seeds-tics.txt"
    # the mean and 95% CI of each row, from the stats lines of the summary
    awk '/ vs bf16, .*n = / { m = $0; sub(/.*mean /, "", m); sub(/%.*/, "", m)
          c = $0; sub(/.*95% CI \[/, "", c); sub(/\].*/, "", c); gsub(/%/, "", c); split(c, lh, ", ")
          printf "%d %s %s %s\n", row++, m, lh[1], lh[2] }' "$d/summary.txt" >"$d/seeds-ci.txt"
    nrows=$(wc -l <"$d/seeds-ci.txt")
    # a variant of a single seed has no interval: no plot then
    [ "$nrows" -gt 0 ] && [ "$nrows" = $((2 * $(cut -d' ' -f2 "$d/rel.txt" | sort -u | wc -l))) ] || return 0
    gnuplot <<EOF
set terminal pngcairo size 1000,$((160 + 90 * nrows)) font ",10"
set output "$d/fp8-seeds.png"
set title "per seed: (x - bf16) / bf16 at the end, %; the mean and its 95% CI in black; DeepSeek-V3's +-0.25% shaded"
set object 1 rect from -0.25, graph 0 to 0.25, graph 1 fc rgb "#d8f0d8" fs solid 0.6 noborder behind
set grid x
set ytics ($(cat "$d/seeds-tics.txt"))
set yrange [$nrows - 0.3:-0.7]
set xlabel "relative difference, %"
plot "$d/seeds-dots.txt" u 2:1 w p pt 7 ps 0.8 lc rgb "#d0401f" notitle, \
     "$d/seeds-ci.txt" u 2:(\$1 - 0.3):3:4 w xerrorbars pt 5 ps 1 lw 2 lc rgb "#000000" notitle
EOF
    echo "plot: $d/fp8-seeds.png"
}

prep() { # DIR L: tokenizer, packed data and config into DIR
    p=$1 L=$2
    mkdir -p "$p"
    # shellcheck disable=SC2086
    files=$(find $CORPUS -type f | sort)
    [ -n "$files" ] || { echo "fp8-train-compare: no files in $CORPUS" >&2; exit 1; }
    # shellcheck disable=SC2086
    "$bin/dsv3-tok" train --quiet -v 4000 -o "$p/tok.bpe" $files
    # shellcheck disable=SC2086
    "$bin/dsv3-tok" encode -t "$p/tok.bpe" -o "$p/tokens.shard" $files
    "$bin/dsv3-pack" --quiet -t "$p/tok.bpe" -L "$L" --val "${VAL:-0.0501}" --seed 1 -o "$p/data" "$p/tokens.shard"
    rm -f "$p/tokens.shard"
    sed -e 's/"vocab_size": [0-9]*/"vocab_size": 4096/' -e 's/"n_routed_experts": [0-9]*/"n_routed_experts": 16/' \
        -e 's/"num_nextn_predict_layers": [0-9]*/"num_nextn_predict_layers": 0/' "$CONFIG" >"$p/config.json"
    # shellcheck disable=SC2086
    echo "# corpus: $(echo "$files" | wc -l) files, $(cat $files | wc -c) bytes, $CONFIG (vocab 4096, 16 routed experts, no MTP), val ${VAL:-0.0501}" >"$p/prep.txt"
}

now() { echo $(($(date +%s) - t0)); }

run_one() { # SEED VARIANT GPU: one training run into $O/s<seed>/<variant> on that GPU
    s=$1 v=$2 g=$3
    flag="" envs=""
    case $v in
    bf16) ;;
    fp8) flag=--fp8 ;;
    fp8dense) flag=--fp8 envs="DSV3_MOE_FP8=0" ;;
    bf16alt) envs="DSV3_NORM_WARP=0 DSV3_CE_KERNEL=1" ;;
    *) echo "fp8-train-compare: unknown variant $v" >&2; return 2 ;;
    esac
    mkdir -p "$O/s$s"
    t1=$(now)
    # shellcheck disable=SC2086
    CUDA_VISIBLE_DEVICES=$g env $envs "$bin/dsv3-train" -c "$P/config.json" -d "$P/data" -o "$O/s$s/$v" -b "$B" -g "$GB" \
        --steps "$steps" --lr "$LR" --warmup "$warm" --decay-start "$warm" --decay-end "$steps" \
        --seed "$s" --mtp-weight 0 --balance-alpha 0 --eval-every "${EVAL_EVERY:-100}" --eval-batches "$evb" \
        --keep 1 --device "${DEVICE:-cuda}" $flag >"$O/s$s/$v.log" 2>&1 &
    echo $! >"$O/.pids/s$s-$v"
    rc=0
    wait $! || rc=$?
    rm -f "$O/.pids/s$s-$v"
    t2=$(now)
    # dsv3-train stops cleanly on SIGTERM (a checkpoint, status 0): a run is done if it has its last step
    if [ "$rc" = 0 ] && ! grep -q "\"step\":$steps,.*\"loss\":" "$O/s$s/$v/metrics.jsonl" 2>/dev/null; then
        rc=1
    fi
    if [ "$rc" = 0 ]; then
        st=ok
        echo "== seed $s $v, GPU $g: $((t2 - t1)) s (at $t2 s); last step: $(grep '^step' "$O/s$s/$v.log" | tail -1)"
        rm -rf "$O/s$s/$v"/step-*
    else
        st=failed
        [ ! -f "$O/.limit" ] || st=killed
        mv "$O/s$s/$v" "$O/s$s/$v.$st" 2>/dev/null || true
        echo "== seed $s $v, GPU $g: $st after $((t2 - t1)) s (at $t2 s)" >&2
        [ "$st" = killed ] || tail -5 "$O/s$s/$v.log" >&2
    fi
    echo "$s $v $g $t1 $t2 $((t2 - t1)) $st" >>"$O/runs.txt"
}

take() { # the next "seed variant" of the queue, or nothing once the sweep must stop
    until mkdir "$O/.lock" 2>/dev/null; do sleep 0.2; done
    i=$(cat "$O/.next")
    item=$(sed -n "${i}p" "$O/queue.txt")
    t=$(now)
    if [ -n "$item" ] && [ -n "${DEADLINE:-}" ] && [ "$t" -ge "$DEADLINE" ] &&
        [ "${item%% *}" != "$(cat "$O/.last")" ]; then
        item="" # after the deadline only the rest of a seed already started
    fi
    if [ -n "$item" ] && [ -n "${LIMIT:-}" ]; then
        longest=$(awk '$7 == "ok" && $6 > m { m = $6 } END { print m + 0 }' "$O/runs.txt")
        [ $((t + longest)) -lt "$LIMIT" ] || item="" # would not end by the limit
    fi
    if [ -n "$item" ]; then
        echo $((i + 1)) >"$O/.next"
        echo "${item%% *}" >"$O/.last"
    else
        echo 1000000000 >"$O/.next" # the sweep is over for every worker
    fi
    rmdir "$O/.lock"
    echo "$item"
}

worker() { # W: takes runs until the queue is empty or the deadline passed, on GPU W % GPUS
    g=$(($1 % GPUS))
    while :; do
        item=$(take)
        [ -n "$item" ] || return 0
        # shellcheck disable=SC2086
        run_one $item "$g" || true
    done
}

watchdog() { # from LIMIT on, kills the runs still going (by their ids, from $O/.pids) until all have ended
    while [ ! -f "$O/.done" ]; do
        if [ "$(now)" -ge "$LIMIT" ]; then
            : >"$O/.limit"
            for f in "$O/.pids"/*; do
                if [ -f "$f" ]; then kill "$(cat "$f")" 2>/dev/null || true; fi
            done
        fi
        sleep 1
    done
}

timing() { # the sweep's summary line from $O/runs.txt
    awk -v T="$1" -v G="$GPUS" -v J="$JOBS" -v Q="$2" '
        { n[$7]++; if ($7 == "ok") { c[$2]++; t[$2] += $6; if ($6 > mx[$2]) mx[$2] = $6; if (!($2 in c1)) { c1[$2] = 1; o[++nv] = $2 } ; ok[$1]++ } }
        END { printf "# sweep: %d of %d runs done in %d s on %d GPU(s) x %d at once (%d killed at the limit, %d failed, %d not started): %.2f runs/min per GPU; run time",
                  n["ok"], Q, T, G, J, n["killed"], n["failed"], Q - NR, (T > 0 ? 60 * n["ok"] / T / G : 0)
              for (i = 1; i <= nv; i++) printf "%s %s %.0f s (max %d)", (i > 1 ? "," : ""), o[i], t[o[i]] / c[o[i]], mx[o[i]]
              for (s in ok) if (ok[s] == nv) full++
              printf "; %d seeds with every variant\n", full }' "$O/runs.txt"
}

case "${1:-}" in
--report)
    [ $# -eq 2 ] || { echo "usage: scripts/fp8-train-compare.sh --report DIR" >&2; exit 2; }
    report "$2"
    exit 0 ;;
esac

BUILD=${BUILD:-build}
bin=$(cd "$BUILD/bin" && pwd)
CORPUS=${CORPUS:-/usr/share/common-licenses}
CONFIG=${CONFIG:-configs/small.json}
if [ "${1:-}" = --prep ]; then
    [ $# -ge 2 ] || { echo "usage: scripts/fp8-train-compare.sh --prep DIR [L]" >&2; exit 2; }
    prep "$2" "${3:-512}"
    cat "$2/prep.txt"
    exit 0
fi
steps=${1:-1000} B=${2:-8} GB=${3:-8} L=${4:-512}
LR=${LR:-1e-3}
SEEDS=${SEEDS:-${SEED:-1}}
VARIANTS=${VARIANTS:-bf16 fp8}
JOBS=${JOBS:-1}
if [ -z "${GPUS:-}" ]; then
    GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [ "${GPUS:-0}" -ge 1 ] || GPUS=1
fi
O=${OUT_DIR:-$BUILD/fp8-compare}
rm -rf "$O"
mkdir -p "$O"
echo "# $(date -u '+%F %H:%M UTC') $(hostname) commit ${DSV3_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo ?)}" | tee "$O/header.txt"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | sort | uniq -c | sed 's/^ */# /' | tee -a "$O/header.txt" || true
if [ -n "${PREP:-}" ]; then
    P=$PREP
else
    P=$O/prep
    prep "$P" "$L"
fi
[ "$(sed -n 's/.*"seq_len": \([0-9]*\).*/\1/p' "$P/data/manifest.json")" = "$L" ] ||
    { echo "fp8-train-compare: $P/data is not packed with L = $L" >&2; exit 1; }
nval=$(sed -n 's/.*"val_sequences": \([0-9]*\).*/\1/p' "$P/data/manifest.json")
evb=$((nval / B))
[ "$evb" -gt 0 ] || { echo "fp8-train-compare: $nval val records, fewer than B = $B" >&2; exit 1; }
tee -a "$O/header.txt" <"$P/prep.txt"
echo "# $steps steps of $GB x $L tokens (micro-batch $B), lr $LR, seeds $(echo "$SEEDS" | tr -s '\n' ' '), variants $VARIANTS; val loss every ${EVAL_EVERY:-100} steps over $((evb * B)) of $nval val records" | tee -a "$O/header.txt"
echo "# $GPUS GPU(s) x $JOBS runs at once${DEADLINE:+, no new seed after $DEADLINE s}${LIMIT:+, runs killed at $LIMIT s}" | tee -a "$O/header.txt"
warm=$((steps / 10 < 100 ? steps / 10 : 100))

# the queue, seed by seed with bf16 first (if asked for), and GPUS x JOBS workers taking from it
for s in $SEEDS; do
    for v in $VARIANTS; do [ "$v" != bf16 ] || echo "$s $v"; done
    for v in $VARIANTS; do [ "$v" = bf16 ] || echo "$s $v"; done
done >"$O/queue.txt"
queued=$(wc -l <"$O/queue.txt")
echo 1 >"$O/.next"
: >"$O/.last"
: >"$O/runs.txt"
mkdir -p "$O/.pids"
t0=$(date +%s)
if [ -n "${LIMIT:-}" ]; then
    watchdog &
    wd=$!
fi
w=0 pids=""
while [ "$w" -lt $((GPUS * JOBS)) ]; do
    worker "$w" &
    pids="$pids $!"
    w=$((w + 1))
done
# shellcheck disable=SC2086
wait $pids
: >"$O/.done"
[ -z "${wd:-}" ] || wait "$wd"
timing "$(now)" "$queued" | tee "$O/timing.txt"
rm -rf "$O/.pids" "$O/.lock" "$O/.next" "$O/.last" "$O/.done"
report "$O"
! grep -q ' failed$' "$O/runs.txt" || { echo "fp8-train-compare: a run failed (logs in $O)" >&2; exit 1; }
