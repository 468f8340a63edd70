# CLI tests of dsv3-train --device cuda (kernels/gmodel through lib/train's backend switch):
# 20 steps of the tiny config on the GPU against the same 20 steps on the CPU (losses
# within bf16 rounding), the loss falling, an exact resume on the GPU, the whole V3 loss
# (MTP and balance loss at their defaults) and document masking (--doc-mask) on the GPU
# against the CPU, the same bits twice with documents at head dims 96/64 unless
# --nondeterministic, cuda as the default device, and dsv3-sample --score on the GPU against
# the CPU. Without a GPU the option must fail with a clear message (exit 1), and the rest
# is skipped.
. "$(dirname "$0")/lib.sh"
CFG=configs/tiny.json

field() { sed -n "s/.*\"$1\":\([^,}]*\).*/\1/p" "$2"; }

# A repetitive corpus (the loss falls) with a little noise, 32-token records.
awk -v seed="$$" 'BEGIN { srand(seed); for (i = 0; i < 200; i++) { s = "5 9 17 33 65 129 257 3 7 11 13 19";
     for (j = 0; j < 8; j++) s = s " " int(rand() * 500); print s } }' >"$T/ids.txt"
dsv3-shard make --vocab-size 512 -o "$T/a.shard" "$T/ids.txt"
dsv3-pack --quiet -o "$T/data" --eos-id 1 -L 32 --val 0.1 -s 1 "$T/a.shard"
A="-c $CFG -d $T/data -b 4 -g 8 --lr 3e-3 --warmup 2 --decay-end 20 --mtp-weight 0 --balance-alpha 0 --quiet"

dsv3-train $A -o "$T/probe" --steps 1 --device cuda >"$T/out" 2>"$T/err"
if [ $? -ne 0 ] && grep -q "no GPU found" "$T/err"; then
    check no_gpu_message grep -q -- "--device cuda: no GPU found" "$T/err"
    check no_gpu_nothing_written test ! -e "$T/probe"
    # without a GPU the default device is the CPU, and the start line says so
    expect default_cpu 0 env -u DSV3_DEVICE dsv3-train -c $CFG -d "$T/data" -b 4 -o "$T/dflt" --steps 1
    check default_cpu_said grep -q "device cpu" "$T/err"
    echo "skip cuda_training: no GPU"
    exit 0
fi

# With a GPU, cuda is the default device, and the start line says so; --device cpu forces
# the CPU.
expect default_cuda 0 env -u DSV3_DEVICE dsv3-train -c $CFG -d "$T/data" -b 4 -o "$T/dflt" --steps 1
check default_cuda_said grep -q "device cuda" "$T/err"
expect forced_cpu 0 dsv3-train -c $CFG -d "$T/data" -b 4 -o "$T/fcpu" --steps 1 --device cpu
check forced_cpu_said grep -q "device cpu" "$T/err"
expect env_cpu 0 env DSV3_DEVICE=cpu dsv3-train -c $CFG -d "$T/data" -b 4 -o "$T/ecpu" --steps 1
check env_cpu_said grep -q "device cpu" "$T/err"

# closeness CPU GPU N BOUND FIRST_BOUND: losses of two runs' metrics (fields loss or
# mtp_loss) within BOUND relative at every step, the first within FIRST_BOUND.
close() {
    awk -v c="$(field "$1" "$2" | tr '\n' ' ')" -v g="$(field "$1" "$3" | tr '\n' ' ')" -v want="$4" \
        -v b="$5" -v f="$6" -v what="$1 $2" 'BEGIN { n = split(c, a, " "); m = split(g, x, " "); w = 0;
        for (i = 1; i <= n; i++) { d = (a[i] - x[i]) / a[i]; if (d < 0) d = -d; if (d > w) w = d;
        if (i == 1) d1 = d }
        printf "# max relative %s difference gpu vs cpu: %.3e (first step %.3e)\n", what, w, d1;
        exit !(n == want && m == want && w < b && d1 < f) }'
}
# The whole V3 loss on the GPU: MTP (lambda 0.3) and the balance loss (alpha 1e-4, the
# defaults) with their step normalisation, against the CPU.
F="-c $CFG -d $T/data -b 4 -g 8 --lr 3e-3 --warmup 2 --decay-end 20 --quiet --steps 10"
expect cpu_full_loss 0 dsv3-train $F -o "$T/fcpu10" --device cpu
expect gpu_full_loss 0 dsv3-train $F -o "$T/fgpu10" --device cuda
check gpu_full_loss_close close loss "$T/fcpu10/metrics.jsonl" "$T/fgpu10/metrics.jsonl" 10 3e-2 5e-3
check gpu_mtp_loss_close close mtp_loss "$T/fcpu10/metrics.jsonl" "$T/fgpu10/metrics.jsonl" 10 3e-2 5e-3
# Document masking on the GPU (attention and MTP inside each document), against the CPU.
expect cpu_doc_mask 0 dsv3-train $F -o "$T/dcpu10" --doc-mask --device cpu
expect gpu_doc_mask 0 dsv3-train $F -o "$T/dgpu10" --doc-mask --device cuda
check gpu_doc_mask_close close loss "$T/dcpu10/metrics.jsonl" "$T/dgpu10/metrics.jsonl" 10 3e-2 5e-3
check gpu_doc_mask_differs test "$(field loss "$T/dgpu10/metrics.jsonl")" != "$(field loss "$T/fgpu10/metrics.jsonl")"
# Documents at head dims 96/64 (tiny with the 1B-class MoE's heads: the shape the fused
# attention backward takes), sequences of 256 (two 128-key blocks). By default two runs give
# the same bits; --nondeterministic says so at start-up and its losses stay within bf16 noise
# of the deterministic run's (the first step's forward is the same kernels: equal).
sed -e 's/"qk_nope_head_dim": 16/"qk_nope_head_dim": 64/' -e 's/"qk_rope_head_dim": 8/"qk_rope_head_dim": 32/' \
    -e 's/"v_head_dim": 16/"v_head_dim": 64/' $CFG >"$T/hd96.json"
dsv3-pack --quiet -o "$T/d256" --eos-id 1 -L 256 -s 1 "$T/a.shard"
H="-c $T/hd96.json -d $T/d256 -b 2 -g 4 --lr 3e-3 --warmup 2 --steps 3 --doc-mask --device cuda --mtp-weight 0 --balance-alpha 0"
expect gpu_docs96_a 0 dsv3-train $H -o "$T/d96a" --quiet
expect gpu_docs96_b 0 dsv3-train $H -o "$T/d96b" --quiet
check gpu_docs96_same_bits cmp -s "$T/d96a/step-000003/model.safetensors" "$T/d96b/step-000003/model.safetensors"
expect gpu_docs96_nondet 0 dsv3-train $H -o "$T/d96n" --nondeterministic
check gpu_nondet_note grep -q -- "--nondeterministic: the fused attention backward" "$T/err"
check gpu_nondet_close close loss "$T/d96a/metrics.jsonl" "$T/d96n/metrics.jsonl" 3 1e-2 1e-6
# ZeRO ranks on the GPU (gradients fetched to the host, AdamW on the host shards): two
# torchrun-style ranks sharing the GPU follow one process (AdamW on the device), with the
# MTP and balance losses normalised over both ranks' forwards.
port=$((20000 + $$ % 9000))
Z="-c $CFG -d $T/data -b 2 -g 8 --lr 3e-3 --warmup 2 --quiet --steps 4 --device cuda --balance-alpha 0.01"
expect zero_one 0 dsv3-train $Z -o "$T/z1"
for r in 0 1; do
    RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
        dsv3-train $Z -o "$T/z2" 2>"$T/z2err.$r" &
done
wait
check gpu_zero_2_ranks close loss "$T/z1/metrics.jsonl" "$T/z2/metrics.jsonl" 4 1e-2 1e-4
check gpu_zero_2_ranks_mtp close mtp_loss "$T/z1/metrics.jsonl" "$T/z2/metrics.jsonl" 4 1e-2 1e-4

expect cpu_run 0 dsv3-train $A -o "$T/cpu" --steps 20 --device cpu
expect gpu_run 0 dsv3-train $A -o "$T/gpu" --steps 20 --device cuda
c=$(field loss "$T/cpu/metrics.jsonl" | tr '\n' ' '); g=$(field loss "$T/gpu/metrics.jsonl" | tr '\n' ' ')
echo "# cpu losses: $c"
echo "# gpu losses: $g"
check gpu_20_steps test "$(field loss "$T/gpu/metrics.jsonl" | wc -l)" -eq 20
# bf16 compute drifts from the fp32 run as the weights move apart: 3% per step at most.
check gpu_close_to_cpu awk -v c="$c" -v g="$g" 'BEGIN { n = split(c, a, " "); split(g, b, " ");
    w = 0; for (i = 1; i <= n; i++) { d = (a[i] - b[i]) / a[i]; if (d < 0) d = -d; if (d > w) w = d }
    printf "# max relative loss difference gpu vs cpu: %.3e\n", w; exit !(n == 20 && w < 3e-2) }'
check gpu_first_step_close awk -v c="$c" -v g="$g" 'BEGIN { split(c, a, " "); split(g, b, " ");
    d = (a[1] - b[1]) / a[1]; if (d < 0) d = -d; exit !(d < 5e-3) }'
check gpu_loss_falls awk -v g="$g" 'BEGIN { n = split(g, b, " "); exit !(b[n] < b[1] - 1) }'
check gpu_grad_norm_close awk -v c="$(field grad_norm "$T/cpu/metrics.jsonl" | head -n 1)" \
    -v g="$(field grad_norm "$T/gpu/metrics.jsonl" | head -n 1)" 'BEGIN { d = (c - g) / c; if (d < 0) d = -d; exit !(d < 2e-2) }'

# Resume on the GPU: 10 steps, then --resume to 20, equals the 20 uninterrupted GPU steps.
dsv3-train $A -o "$T/half" --steps 10 --device cuda
expect gpu_resume 0 dsv3-train $A -o "$T/half" --steps 20 --resume --device cuda
h=$(field loss "$T/half/metrics.jsonl" | tr '\n' ' ')
check gpu_resume_same_losses test "$h" = "$g"
check gpu_resume_same_weights cmp -s "$T/gpu/step-000020/model.safetensors" "$T/half/step-000020/model.safetensors"

# dsv3-sample --score on the GPU against the CPU, same checkpoint and documents: the same
# lines and tokens, the mean loss within 1e-2, every log-probability within 0.2 (bf16;
# measured on an H200: mean loss 4.3555 vs 4.3567, largest difference 0.049 of 3800).
ck="$T/gpu/step-000020"
expect score_cpu 0 dsv3-sample --score -m "$ck" -L 32 -o "$T/s_cpu.jsonl" "$T/a.shard"
cp "$T/err" "$T/s_cpu.err"
expect score_gpu 0 dsv3-sample --score -m "$ck" -L 32 -o "$T/s_gpu.jsonl" --device cuda "$T/a.shard"
cp "$T/err" "$T/s_gpu.err"
check score_same_lines test "$(wc -l <"$T/s_cpu.jsonl")" -eq "$(wc -l <"$T/s_gpu.jsonl")" -a "$(wc -l <"$T/s_cpu.jsonl")" -gt 100
check score_same_tokens test "$(sed 's/"logprobs".*//' "$T/s_cpu.jsonl" | md5sum)" = "$(sed 's/"logprobs".*//' "$T/s_gpu.jsonl" | md5sum)"
ml() { sed -n 's/.*mean loss \([0-9.]*\).*/\1/p' "$1"; }
check score_mean_loss_close awk -v a="$(ml "$T/s_cpu.err")" -v b="$(ml "$T/s_gpu.err")" \
    'BEGIN { d = (a - b) / a; if (d < 0) d = -d; printf "# score mean loss cpu %s gpu %s\n", a, b; exit !(a > 0 && d < 1e-2) }'
lp() { sed 's/.*"logprobs":\[\([^]]*\)\].*/\1/' "$1" | tr ',' '\n' | grep .; }
lp "$T/s_cpu.jsonl" >"$T/lp_cpu"; lp "$T/s_gpu.jsonl" >"$T/lp_gpu"
check score_logprobs_close awk 'NR == FNR { a[FNR] = $1; n = FNR; next } { d = a[FNR] - $1; if (d < 0) d = -d;
    if (d > w) w = d; m = FNR } END { printf "# max |logprob cpu - gpu| %.3g over %d\n", w, m; exit !(m == n && m > 1000 && w < 0.2) }' "$T/lp_cpu" "$T/lp_gpu"
