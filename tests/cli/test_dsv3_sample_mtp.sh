# dsv3-sample --mtp (speculative decoding with the MTP module, CPU): the output equals the
# output without --mtp (greedy and sampled, -n ending inside a drafted pair, stop strings,
# batch, chat); the statistics report the acceptance rate; a model without MTP module and
# --score are refused. On the GPU (kernels/ginfer_mtp; scripts/gpu-check.sh runs this file):
# the same with --device cuda, and greedy drafts accepted as on the CPU; without a GPU,
# --device cuda fails with a clear message.
. "$(dirname "$0")/lib.sh"

awk 'BEGIN { for (i = 0; i < 300; i++) print "the cat sat on the mat number " i " and then ran" }' >"$T/corpus.txt"
dsv3-tok train -v 300 -o "$T/tok.bpe" "$T/corpus.txt" 2>/dev/null
dsv3-config --quiet --init "$T/tiny" --seed 11 configs/tiny.json
G="dsv3-sample -m $T/tiny -t $T/tok.bpe --device cpu --ignore-eos"

# Greedy, 70 tokens, and every -n from 1 to 9 (the end falls on both halves of a pair).
$G --quiet -p "the cat" -n 70 --temp 0 >"$T/g0"
expect mtp_greedy_runs 0 $G -p "the cat" -n 70 --temp 0 --mtp
cp "$T/out" "$T/g1"
check mtp_greedy_same cmp -s "$T/g0" "$T/g1"
check mtp_stats grep -q \
    "mtp: [0-9]* drafts checked, [0-9]* accepted (acceptance rate [0-9.]*%), [0-9.]* tokens a main forward" \
    "$T/err"
check mtp_generated_70 grep -q "generated 70 tokens" "$T/err"
same_n=1
for n in 1 2 3 4 5 6 7 8 9; do
    $G --quiet -p "number 5" -n $n --temp 0 >"$T/a"
    $G --quiet -p "number 5" -n $n --temp 0 --mtp >"$T/b"
    cmp -s "$T/a" "$T/b" || same_n=0
done
check mtp_n_limits_same [ $same_n = 1 ]
# Sampled: the same seed gives the same text (a draft counts only when the main model's
# own sample equals it).
$G --quiet -p "the cat" -n 64 --temp 0.9 --seed 4 >"$T/s0"
$G --quiet -p "the cat" -n 64 --temp 0.9 --seed 4 --mtp >"$T/s1"
check mtp_sampled_same cmp -s "$T/s0" "$T/s1"
# Stop strings: characters that occur in the greedy text (a random model's text is mostly
# bytes of no character).
same_stop=1 tried=0
for stop in a e o n t r s l N P 1 3 = ']'; do
    grep -qF -- "$stop" "$T/g0" || continue
    tried=$((tried + 1))
    $G --quiet -p "the cat" -n 70 --temp 0 --stop "$stop" >"$T/a"
    $G --quiet -p "the cat" -n 70 --temp 0 --stop "$stop" --mtp >"$T/b"
    cmp -s "$T/a" "$T/b" || same_stop=0
done
[ $tried -ge 3 ] || same_stop=0
check mtp_stop_same [ $same_stop = 1 ]
# Batch (three slots for five requests) and chat.
cat >"$T/req.jsonl" <<'EOF2'
{"prompt": "the cat", "n_predict": 12, "seed": 1}
{"prompt": "number 7 sat", "n_predict": 3, "temperature": 0}
{"prompt": "on the mat", "n_predict": 20, "temperature": 1.2, "seed": 9}
{"prompt": "ran", "n_predict": 7, "seed": 4, "stop": ["a", "e"]}
{"prompt": "the", "n_predict": 16, "temperature": 0}
EOF2
$G --quiet --batch --parallel 3 --seed 11 <"$T/req.jsonl" >"$T/b0"
$G --quiet --batch --parallel 3 --seed 11 --mtp <"$T/req.jsonl" >"$T/b1"
check mtp_batch_same cmp -s "$T/b0" "$T/b1"
printf 'the cat\nsat on the mat\n' >"$T/turns"
$G --quiet --chat -n 8 --temp 0 <"$T/turns" >"$T/c0"
$G --quiet --chat -n 8 --temp 0 --mtp <"$T/turns" >"$T/c1"
check mtp_chat_same cmp -s "$T/c0" "$T/c1"

# Refusals.
sed 's/"num_nextn_predict_layers": *1/"num_nextn_predict_layers": 0/' configs/tiny.json >"$T/nomtp.json"
dsv3-config --quiet --init "$T/nomtp" --seed 3 "$T/nomtp.json"
expect_err mtp_no_module 1 "mtp: the model has no MTP module" \
    dsv3-sample -m "$T/nomtp" -t "$T/tok.bpe" -p "the cat" -n 4 --mtp
check mtp_no_module_no_output [ ! -s "$T/out" ]
expect_err mtp_score_refused 2 "mtp is for generation" dsv3-sample --score -m "$T/tiny" --mtp

# The GPU engine.
C="dsv3-sample -m $T/tiny -t $T/tok.bpe --device cuda --ignore-eos"
if ! $C --quiet -p "the cat" -n 2 --mtp >"$T/out" 2>"$T/err"; then
    check mtp_cuda_no_gpu grep -q -- "--device cuda: no GPU found" "$T/err"
    check mtp_cuda_no_gpu_no_output [ ! -s "$T/out" ]
    echo "skip mtp_cuda: no GPU"
    exit 0
fi
$C --quiet -p "the cat" -n 70 --temp 0 >"$T/cg0"
expect mtp_cuda_greedy_runs 0 $C -p "the cat" -n 70 --temp 0 --mtp
cp "$T/out" "$T/cg1"
check mtp_cuda_greedy_same cmp -s "$T/cg0" "$T/cg1"
check mtp_cuda_stats grep -q "mtp: [0-9]* drafts checked, [0-9]* accepted" "$T/err"
check mtp_cuda_device grep -q "device cuda:0" "$T/err"
same_n=1
for n in 1 2 3 4 5; do
    $C --quiet -p "number 5" -n $n --temp 0 >"$T/a"
    $C --quiet -p "number 5" -n $n --temp 0 --mtp >"$T/b"
    cmp -s "$T/a" "$T/b" || same_n=0
done
check mtp_cuda_n_limits_same [ $same_n = 1 ]
$C --quiet -p "the cat" -n 64 --temp 0.9 --seed 4 >"$T/cs0"
$C --quiet -p "the cat" -n 64 --temp 0.9 --seed 4 --mtp >"$T/cs1"
check mtp_cuda_sampled_same cmp -s "$T/cs0" "$T/cs1"
$C --quiet --batch --parallel 3 --seed 11 <"$T/req.jsonl" >"$T/cb0"
$C --quiet --batch --parallel 3 --seed 11 --mtp <"$T/req.jsonl" >"$T/cb1"
check mtp_cuda_batch_same cmp -s "$T/cb0" "$T/cb1"
expect_err mtp_cuda_no_module 1 "mtp: the model has no MTP module" \
    dsv3-sample -m "$T/nomtp" -t "$T/tok.bpe" -p "the cat" -n 4 --mtp --device cuda
