# CLI tests of dsv3-train --recompute: with --device cpu a usage error (exit 2, nothing
# written: the CPU backend keeps every activation); on the GPU, 6 steps with and without it
# on the same data, documents masked, must log the same losses and gradient norms to the
# last digit (recomputation gives the same bits) and keep fewer activations (the start-up
# note). Without a GPU the GPU part is skipped.
. "$(dirname "$0")/lib.sh"
CFG=configs/tiny.json

awk -v seed="$$" 'BEGIN { srand(seed); for (i = 0; i < 100; i++) { s = "5 9 17 33 65 129";
     for (j = 0; j < 14; j++) s = s " " int(rand() * 500); print s } }' >"$T/ids.txt"
dsv3-shard make --vocab-size 512 -o "$T/a.shard" "$T/ids.txt"
dsv3-pack --quiet -o "$T/data" --eos-id 1 -L 32 -s 1 "$T/a.shard"
A="-c $CFG -d $T/data -b 4 -g 8 --lr 3e-3 --warmup 2 --steps 6 --doc-mask"

expect_err cpu_refused 2 "recompute needs --device cuda" dsv3-train $A -o "$T/cpu" --device cpu --recompute
check cpu_nothing_written test ! -e "$T/cpu/metrics.jsonl"

dsv3-train $A -o "$T/keep" --device cuda >"$T/keep.out" 2>"$T/keep.err"
if [ $? -ne 0 ] && grep -q "no GPU found" "$T/keep.err"; then
    echo "skip recompute_gpu: no GPU"
    exit 0
fi
expect gpu_recompute 0 dsv3-train $A -o "$T/rc" --device cuda --recompute
cp "$T/err" "$T/rc.err"
# loss and gnorm fields of every step, as logged (the timing fields differ)
fields() { sed 's/.*"step":\([0-9]*\).*"loss":\([^,]*\).*"grad_norm":\([^,]*\).*/\1 \2 \3/' "$1"; }
fields "$T/keep/metrics.jsonl" >"$T/k.txt"
fields "$T/rc/metrics.jsonl" >"$T/r.txt"
check six_steps test "$(wc -l <"$T/r.txt")" -eq 6
check same_losses_and_norms cmp -s "$T/k.txt" "$T/r.txt"
kept() { sed -n 's/.*activations kept for backward \([0-9.]*\) MiB.*/\1/p' "$1"; }
check fewer_activations awk -v k="$(kept "$T/keep.err")" -v r="$(kept "$T/rc.err")" \
    'BEGIN { printf "# activations kept: %s MiB, with --recompute %s MiB\n", k, r; exit !(r + 0 < k + 0 && r > 0) }'
