#!/bin/sh
# scripts/fp8-train-compare.sh --report: the statistics over seeds against hand-worked numbers.
# Every run's loss is 4 * (1 + REL/100) at every step, bf16's is 4, so each seed's relative
# difference is exactly REL, on the val loss and on the training mean alike.
. "$(dirname "$0")/lib.sh"
S=$(cd "$(dirname "$0")/../.." && pwd)/scripts/fp8-train-compare.sh
mkrun() { # DIR SEED VARIANT REL [STEPS]
    mkdir -p "$1/s$2/$3"
    awk -v r="$4" -v n="${5:-60}" 'BEGIN { x = 4 * (1 + r / 100)
        for (i = 1; i <= n; i++) printf "{\"step\":%d,\"loss\":%.10f,\"grad_norm\":1.0}\n", i, x
        printf "{\"step\":%d,\"tokens\":%d,\"val_loss\":%.10f,\"val_tokens\":256}\n", n, 64 * n, x }' >"$1/s$2/$3/metrics.jsonl"
}
has() { grep -qF -- "$1" "$T/out"; }
D=$T/d
i=0
for r in 0.1 0.3 -0.2 0.6; do i=$((i + 1)); mkrun "$D" $i bf16 0; mkrun "$D" $i fp8 "$r"; done
i=0
for r in -0.08 0.12 -0.03 0.07 0.02 0.02 -0.08 0.12 -0.03 0.07; do i=$((i + 1)); mkrun "$D" $i bf16 0; mkrun "$D" $i bf16alt "$r"; done
i=0
for r in 0.5 0.6 0.7 0.8 0.9; do i=$((i + 1)); mkrun "$D" $i fp8dense "$r"; done
mkrun "$D" 11 fp8 0.1                           # no bf16: left out
mkrun "$D" 12 bf16 0; mkrun "$D" 12 fp8 0.1 55  # cut short: left out
mkrun "$D" 3 fp8.killed 5                       # killed at the limit: not read
expect report 0 sh "$S" --report "$D"
# fp8, 0.1 0.3 -0.2 0.6: mean 0.2, squares of deviations 0.01 0.01 0.16 0.16, s.d. sqrt(0.34/3)
# = 0.33665, s.e. 0.16833; t(3) 3.18245 (95%), 2.35336 (90%): 95% CI 0.2 -+ 0.53570, 90% -+ 0.39614
check fp8_stats has "fp8 vs bf16, val loss at the end, n = 4 seeds: mean +0.200%, s.d. 0.337%, s.e. 0.168%; 95% CI [-0.336%, +0.736%] (t 3.182, 3 dof), 90% CI [-0.196%, +0.596%]; |diff| < 0.25% in 2 of 4 (50%)"
check fp8_train has "fp8 vs bf16, train mean of the last W steps, n = 4 seeds: mean +0.200%, s.d. 0.337%"
# unresolved; half-width t(n-1) 0.33665 / sqrt(n) < 0.25 first at n = 10 (t(9) 2.262: 0.2408;
# n = 9: 0.2588), < 0.2 (the mean, to tell it from 0) first at n = 14 (t(13) 2.160: 0.1943)
check fp8_verdict has "unresolved: the 95% CI holds 0 and reaches outside the band; at this s.d. the 95% CI fits inside it with about 177 seeds if the true mean is the observed one, 10 if it is 0; the observed mean would be told from 0 with about 14"
# bf16alt: mean 0.02, deviations -+0.1 (4), -+0.05 (4), 0 (2): s.d. sqrt(0.05/9) = 0.074536,
# s.e. 0.023570, t(9) 2.26216: 95% CI 0.02 -+ 0.05332
check alt_stats has "bf16alt vs bf16, val loss at the end, n = 10 seeds: mean +0.020%, s.d. 0.075%, s.e. 0.024%; 95% CI [-0.033%, +0.073%] (t 2.262, 9 dof)"
check alt_verdict has "equivalent within +-0.25%: the 90% CI lies inside (two one-sided t-tests at 5%; the 95% CI too, 2.5%)"
# fp8dense: 0.5-0.9: mean 0.7, s.d. 0.158114, s.e. 0.070711, t(4) 2.77645: 0.7 -+ 0.19632
check dense_stats has "fp8dense vs bf16, val loss at the end, n = 5 seeds: mean +0.700%, s.d. 0.158%, s.e. 0.071%; 95% CI [+0.504%, +0.896%] (t 2.776, 4 dof)"
check dense_verdict has "beyond +-0.25%: the 95% CI lies wholly outside the band; bias detected: the 95% CI excludes 0 (higher, t-test at 5%)"
check no_bf16_left_out has "seed 11: left out: no bf16 run (fp8 done)"
check short_left_out has "seed 12 fp8: left out: the runs end at different steps (train bf16 60 fp8 55, val 60 55)"
check summary_written grep -qF "n = 4 seeds" "$D/summary.txt"
# 48 seeds of +-1: s.d. sqrt(48/47) = 1.010582, s.e. 0.145865; t(47) 2.01174 (95%), 1.67793 (90%):
# 95% CI -+0.29344 reaches out of the band, 90% CI -+0.24475 lies inside: equivalent at 5% only
E=$T/e
i=0
while [ $i -lt 48 ]; do i=$((i + 1)); mkrun "$E" $i bf16 0 10; mkrun "$E" $i fp8 $((i % 2 * 2 - 1)) 10; done
W=5 sh "$S" --report "$E" >"$T/out" 2>"$T/err"
check many_stats has "n = 48 seeds: mean +0.000%, s.d. 1.011%, s.e. 0.146%; 95% CI [-0.293%, +0.293%] (t 2.012, 47 dof), 90% CI [-0.245%, +0.245%]; |diff| < 0.25% in 0 of 48 (0%)"
check many_verdict has "equivalent within +-0.25%: the 90% CI lies inside (two one-sided t-tests at 5%; not the 95% CI)"
mkdir -p "$T/empty"
expect_err no_seeds 1 "no s<seed> folders" sh "$S" --report "$T/empty"
expect usage 2 sh "$S" --report
