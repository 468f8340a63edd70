# CLI tests of dsv3-train on configs/tiny.json and tiny packed folders: the run folder, exact
# resume (after a planned stop, a signal at a random step, and a crash inside a checkpoint
# write), gradient accumulation, checkpoints kept, loss falling on a repetitive corpus,
# SFT masking, --doc-mask, and bad input refused before any step with nothing left behind.
. "$(dirname "$0")/lib.sh"
# The CPU backend's tests: its default is cuda where there is a GPU (--device still wins).
export DSV3_DEVICE=cpu
CFG=configs/tiny.json

# The value of "key" in each line of a metrics.jsonl (the loss printed with 17 digits, so
# equal text is equal bits).
field() { sed -n "s/.*\"$1\":\([^,}]*\).*/\1/p" "$2"; }

expect help 0 dsv3-train --help
check help_mentions_resume grep -q -- "--resume" "$T/out"
expect version 0 dsv3-train --version
check version_line grep -q "^dsv3-train [0-9]" "$T/out"
expect_err no_data 2 "missing --data" dsv3-train -c $CFG -o "$T/x" --steps 1
expect_err no_steps 2 "missing --steps" dsv3-train -c $CFG -d "$T/x" -o "$T/x"
expect_err no_config 2 "missing --config" dsv3-train -d "$T/x" -o "$T/x" --steps 1
expect_err not_multiple 2 "not a multiple of --batch 4" dsv3-train -c $CFG -d "$T/x" -o "$T/x" --steps 1 -b 4 -g 6
expect_err bad_unit 2 "unit" dsv3-train -c $CFG -d "$T/x" -o "$T/x" --steps 1 --unit days
expect_err bad_schedule 2 "before it starts" dsv3-train -c $CFG -d "$T/x" -o "$T/x" --steps 1 --decay-start 10 --decay-end 5
expect_err sft_needs_id 2 "sft-assistant-id" dsv3-train -c $CFG -d "$T/x" -o "$T/x" --steps 1 --sft
expect_err cuda_no_gpu_or_data 1 "GPU backend\|cannot open the data folder" dsv3-train -c $CFG -d "$T/x" -o "$T/x" --steps 1 --device cuda
expect_err fp8_needs_cuda 2 "--fp8 needs --device cuda" dsv3-train -c $CFG -d "$T/x" -o "$T/x" --steps 1 --fp8
expect_err fp8_min_dim_needs_fp8 2 "--fp8-min-dim needs --fp8" dsv3-train -c $CFG -d "$T/x" -o "$T/x" --steps 1 --fp8-min-dim 0
expect_err fp8_min_dim_bad 2 "--fp8-min-dim" dsv3-train -c $CFG -d "$T/x" -o "$T/x" --steps 1 --fp8 --fp8-min-dim x
expect_err bad_device_env 2 "DSV3_DEVICE: expected cpu or cuda" env DSV3_DEVICE=tpu dsv3-train -c $CFG -d "$T/x" -o "$T/x" --steps 1
expect_err bad_device 2 "device: expected cpu or cuda" dsv3-train -c $CFG -d "$T/x" -o "$T/x" --steps 1 --device tpu
expect_err unknown_option 2 "Try 'dsv3-train --help'" dsv3-train --bogus
check usage_no_output test ! -e "$T/x"

# Random documents of ids below 500 (tiny.json has 512), 10% validation.
awk -v seed="$$" 'BEGIN { srand(seed); for (i = 0; i < 300; i++) { n = 5 + int(rand() * 40);
     s = ""; for (j = 0; j < n; j++) s = s (j ? " " : "") int(rand() * 500); print s } }' >"$T/ids.txt"
dsv3-shard make --vocab-size 512 -o "$T/a.shard" "$T/ids.txt"
dsv3-pack --quiet -o "$T/data" --eos-id 1 -L 32 --val 0.1 -s 1 "$T/a.shard"
A="-c $CFG -d $T/data -b 2 -g 4 --lr 3e-3 --warmup 2 --decay-end 12 --quiet"

# A plain run: the run folder's files.
expect run 0 dsv3-train $A -o "$T/r1" --steps 8 --save-every 2 --keep 2 --eval-every 4 --eval-batches 2
check metrics_lines sh -c "[ \$(grep -c '\"loss\"' '$T/r1/metrics.jsonl') -eq 8 ]"
check eval_lines sh -c "[ \$(grep -c '\"val_loss\"' '$T/r1/metrics.jsonl') -eq 2 ]"
check expert_load grep -q '"max_over_mean":\[' "$T/r1/metrics.jsonl"
check latest sh -c "[ \"\$(cat '$T/r1/latest')\" = step-000008 ]"
check kept_two sh -c "[ \"\$(ls '$T/r1' | grep '^step-' | tr '\n' ' ')\" = 'step-000006 step-000008 ' ]"
check checkpoint_files sh -c "cd '$T/r1/step-000008' && [ -f model.safetensors ] && [ -f optim.safetensors ] && [ -f config.json ] && grep -q '\"step\": 8' state.json"
check command_kept grep -q -- "--steps 8" "$T/r1/command.txt"
check config_kept grep -q '"hidden_size": 64' "$T/r1/config.json"
check lr_warmup awk -v l="$(field lr "$T/r1/metrics.jsonl" | head -n 2 | tr '\n' ' ')" \
    'BEGIN { split(l, v, " "); exit !(v[1] == 0.0015 && v[2] == 0.003) }'

# Exact resume: N steps, then --resume to 2N, equals 2N steps uninterrupted, N random.
n=$(( $$ % 3 + 2 ))
dsv3-train $A -o "$T/full" --steps $((2 * n))
dsv3-train $A -o "$T/half" --steps $n
expect resume 0 dsv3-train $A -o "$T/half" --steps $((2 * n)) --resume
a=$(field loss "$T/full/metrics.jsonl"); b=$(field loss "$T/half/metrics.jsonl")
check resume_all_steps test "$(echo "$a" | wc -l)" -eq $((2 * n))
check resume_same_losses test -n "$a" -a "$a" = "$b"
last=$(printf 'step-%06d' $((2 * n)))
check resume_same_weights cmp -s "$T/full/$last/model.safetensors" "$T/half/$last/model.safetensors"
check resume_same_optimizer cmp -s "$T/full/$last/optim.safetensors" "$T/half/$last/optim.safetensors"
check resume_same_state cmp -s "$T/full/$last/state.json" "$T/half/$last/state.json"

# Gradient accumulation: 4 x 1 sequences equals one forward of 4, up to float rounding,
# with the MTP loss (tiny.json has one module) and the balance loss (100x V3's weight) on:
# every loss is normalised over the whole step, not per micro-batch.
dsv3-train -c $CFG -d "$T/data" -b 4 -g 4 --balance-alpha 0.01 --quiet -o "$T/b4" --steps 1
dsv3-train -c $CFG -d "$T/data" -b 1 -g 4 --balance-alpha 0.01 --quiet -o "$T/b1" --steps 1
check accumulation_same_loss awk -v a="$(field loss "$T/b4/metrics.jsonl")" -v b="$(field loss "$T/b1/metrics.jsonl")" \
    'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d < 1e-6 * a) }'
check accumulation_same_grad_norm awk -v a="$(field grad_norm "$T/b4/metrics.jsonl")" -v b="$(field grad_norm "$T/b1/metrics.jsonl")" \
    'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d < 1e-6 * a) }'

# Batch-size ramp 2 -> 8 sequences over 4 steps, in multiples of the micro-batch: 2 + 6x/4
# rounded down to even; the global batch in tokens (128 / 32 = 4 sequences).
expect ramp 0 dsv3-train -c $CFG -d "$T/data" -b 2 -g 8 --batch-ramp 2:4 --quiet -o "$T/ramp" --steps 6
check ramp_batches test "$(field batch_sequences "$T/ramp/metrics.jsonl" | tr '\n' ' ')" = "2 2 4 6 8 8 "
check ramp_tokens test "$(field tokens "$T/ramp/metrics.jsonl" | tail -n 1)" = $(( (2 + 2 + 4 + 6 + 8 + 8) * 32 ))
expect batch_tokens 0 dsv3-train -c $CFG -d "$T/data" -b 2 --global-batch-tokens 128 --quiet -o "$T/gbt" --steps 1
check batch_tokens_sequences test "$(field batch_sequences "$T/gbt/metrics.jsonl")" = 4

# SIGTERM at a random step: exit 0 with a checkpoint of that step; resuming to two steps
# further equals an uninterrupted run of as many steps.
dsv3-train $A -o "$T/sig" --steps 100000 2>"$T/sig.err" &
pid=$!
sleep 0.$(( $$ % 5 + 3 ))
kill -TERM $pid
wait $pid
check sigterm_exit_0 test $? -eq 0
s=$(sed -n 's/.*"step": \([0-9]*\),.*/\1/p' "$T/sig/$(cat "$T/sig/latest")/state.json")
check sigterm_checkpoint test -n "$s"
check sigterm_last_step test "$(field step "$T/sig/metrics.jsonl" | tail -n 1)" = "$s"
dsv3-train $A -o "$T/sig" --steps $((s + 2)) --resume
dsv3-train $A -o "$T/nosig" --steps $((s + 2))
a=$(field loss "$T/sig/metrics.jsonl"); b=$(field loss "$T/nosig/metrics.jsonl")
check signal_resume_same_losses test -n "$a" -a "$a" = "$b"
dsv3-train $A -o "$T/usr1" --steps 100000 &
pid=$!
sleep 0.3
kill -USR1 $pid
wait $pid
check sigusr1_exit_0 test $? -eq 0
check sigusr1_checkpoint test -f "$T/usr1/$(cat "$T/usr1/latest")/state.json"

# kill -9 inside the second checkpoint write (after the weights, before the rename): the
# first stays the newest, no partial folder carries a checkpoint's name, and a resume
# finishes the run exactly.
DSV3_TRAIN_CRASH_IN_SAVE=2 dsv3-train $A -o "$T/crash" --steps 6 --save-every 2 2>/dev/null
check crash_killed test $? -eq 137
check crash_latest_previous sh -c "[ \"\$(cat '$T/crash/latest')\" = step-000002 ]"
check crash_no_partial_checkpoint test ! -e "$T/crash/step-000004"
check crash_temp_left sh -c "ls -a '$T/crash' | grep -q '^\.step-000004\.tmp\.'"
expect crash_resume 0 dsv3-train $A -o "$T/crash" --steps 6 --resume
check crash_temp_removed sh -c "! ls -a '$T/crash' | grep -q '\.tmp\.'"
dsv3-train $A -o "$T/nocrash" --steps 6
check crash_resume_same_weights cmp -s "$T/crash/step-000006/model.safetensors" "$T/nocrash/step-000006/model.safetensors"
# kill -9 at a random moment of a run that checkpoints every step: whatever `latest`
# names resumes.
dsv3-train $A -o "$T/k9" --steps 100000 --save-every 1 &
pid=$!
sleep 0.$(( $$ % 7 + 2 ))
kill -9 $pid
wait $pid 2>/dev/null
expect kill9_resume 0 dsv3-train $A -o "$T/k9" --steps 1 --resume
check kill9_no_temp sh -c "! ls -a '$T/k9' | grep -q '\.tmp\.'"

# Overfitting a repetitive corpus: the loss falls from ~6.2 (ln 512) below 1 in 30 steps.
awk 'BEGIN { for (i = 0; i < 60; i++) print "5 9 17 33 65 129 257 3 7 11 13 19 23 29 31 37 41 43 47 53" }' >"$T/rep.txt"
dsv3-shard make --vocab-size 512 -o "$T/rep.shard" "$T/rep.txt"
dsv3-pack --quiet -o "$T/rep" --eos-id 1 -L 32 -s 1 "$T/rep.shard"
expect overfit_run 0 dsv3-train -c $CFG -d "$T/rep" -o "$T/of" -b 4 --steps 30 --lr 1e-2 --warmup 3 --quiet
check loss_falls awk -v a="$(field loss "$T/of/metrics.jsonl" | head -n 1)" -v b="$(field loss "$T/of/metrics.jsonl" | tail -n 3 | sort -g | tail -n 1)" \
    'BEGIN { exit !(a > 5 && b < 1) }'

# --init-from a checkpoint (an HF folder): the first loss starts where that run ended.
expect init_from 0 dsv3-train -c $CFG -d "$T/rep" -o "$T/init" -b 4 --steps 1 --init-from "$T/of/step-000030" --quiet
check init_from_low_loss awk -v a="$(field loss "$T/init/metrics.jsonl")" 'BEGIN { exit !(a < 1) }'

# SFT: "3 prompt 4 response" documents (3 user, 4 assistant), best-fit so none is split.
# Over one epoch the counted targets are exactly the response tokens plus each EOS.
awk -v seed="$$" 'BEGIN { srand(seed); for (i = 0; i < 40; i++) { s = "3"; n = 1 + int(rand() * 6);
     for (j = 0; j < n; j++) s = s " " 100 + int(rand() * 300); s = s " 4"; m = 1 + int(rand() * 6);
     for (j = 0; j < m; j++) s = s " " 100 + int(rand() * 300); print s } }' >"$T/sft.txt"
n_resp=$(awk '{ for (i = 1; i <= NF; i++) if ($i == 4) print NF - i + 1 }' "$T/sft.txt" | awk '{ s += $1 } END { print s }')
dsv3-shard make --vocab-size 512 -o "$T/sft.shard" "$T/sft.txt"
dsv3-pack --quiet -o "$T/sftd" --eos-id 1 -L 32 --best-fit -s 1 "$T/sft.shard"
recs=$(sed -n 's/.*"train_sequences": \([0-9]*\).*/\1/p' "$T/sftd/manifest.json")
expect sft_run 0 dsv3-train -c $CFG -d "$T/sftd" -o "$T/sft" -b 1 --steps "$recs" --sft --sft-assistant-id 4 --sft-user-id 3 --quiet
check sft_counts_responses test "$(field loss_tokens "$T/sft/metrics.jsonl" | awk '{ s += $1 } END { print s }')" = "$n_resp"
# Pre-training on the same records: --doc-mask drops the targets that cross into the next
# document (fewer loss tokens) and changes what each token sees (another loss); off by default.
expect plain_run 0 dsv3-train -c $CFG -d "$T/sftd" -o "$T/pm0" -b 2 --steps 1 --quiet
expect doc_mask_run 0 dsv3-train -c $CFG -d "$T/sftd" -o "$T/pm1" -b 2 --steps 1 --doc-mask --quiet
check doc_mask_fewer_targets test "$(field loss_tokens "$T/pm1/metrics.jsonl")" -lt "$(field loss_tokens "$T/pm0/metrics.jsonl")"
check doc_mask_other_loss test "$(field loss "$T/pm1/metrics.jsonl")" != "$(field loss "$T/pm0/metrics.jsonl")"
# --nondeterministic only permits faster GPU kernels: the CPU backend runs as without it
# (the same loss to the last digit) and says nothing about it.
expect doc_mask_nondet_cpu 0 dsv3-train -c $CFG -d "$T/sftd" -o "$T/pm2" -b 2 --steps 1 --doc-mask --nondeterministic
check nondet_cpu_same_loss test "$(field loss "$T/pm2/metrics.jsonl")" = "$(field loss "$T/pm1/metrics.jsonl")"
check nondet_cpu_no_note sh -c "grep -q 'device cpu' '$T/err' && ! grep -q nondeterministic '$T/err'"

# Bad input: exit 1 with the reason, before any step, leaving no run folder.
expect_err missing_data 1 "^dsv3-train: .*nope.*cannot open the data folder" dsv3-train -c $CFG -d "$T/nope" -o "$T/bad" --steps 1
head -n 50 "$T/ids.txt" | dsv3-shard make --vocab-size 1000 -o "$T/v.shard"
dsv3-pack --quiet -o "$T/v1000" --eos-id 1 -L 32 "$T/v.shard"
expect_err vocab_mismatch 1 "vocabulary (1000 tokens) does not fit the model's vocab_size 512" dsv3-train -c $CFG -d "$T/v1000" -o "$T/bad" --steps 1
expect_err no_val_split 1 "no val split" dsv3-train -c $CFG -d "$T/rep" -o "$T/bad" --steps 1 --eval-every 1
check bad_no_folder test ! -e "$T/bad"
cp -r "$T/data" "$T/damaged"
f=$(ls "$T/damaged"/train-00000.shard)
head -c $(($(wc -c <"$f") / 2)) "$f" >"$f.cut" && mv "$f.cut" "$f"
expect_err damaged_data 1 "^dsv3-train: .*train-00000.shard" dsv3-train -c $CFG -d "$T/damaged" -o "$T/bad" --steps 1
check damaged_no_folder test ! -e "$T/bad"
expect_err other_run 1 "holds another run" dsv3-train $A -o "$T/r1" --steps 1
check other_run_untouched test -d "$T/r1/step-000008"
expect force 0 dsv3-train $A -o "$T/r1" --steps 1 --force
check force_started_over sh -c "[ \"\$(ls '$T/r1' | grep '^step-')\" = step-000001 ] && [ \$(grep -c . '$T/r1/metrics.jsonl') -eq 1 ]"
sed 's/"hidden_size": 64/"hidden_size": 32/' $CFG >"$T/other.json"
expect_err config_contradicts 1 "other.json contradicts .*$last: hidden_size 32 vs 64" dsv3-train -c "$T/other.json" -d "$T/data" -o "$T/full" --steps 9 --resume
dsv3-pack --quiet -o "$T/l16" --eos-id 1 -L 16 "$T/a.shard"
expect_err data_contradicts 1 "seq_len 16) is not the checkpoint's" dsv3-train -c $CFG -d "$T/l16" -o "$T/full" --steps 9 --resume
expect_err seed_contradicts 1 "seed 7 is not the seed 0" dsv3-train $A -o "$T/full" --steps 9 --resume -s 7
check refused_before_any_step test "$(field step "$T/full/metrics.jsonl" | tail -n 1)" = $((2 * n))
expect_err init_contradicts 1 "contradicts" dsv3-train -c "$T/other.json" -d "$T/data" -o "$T/bad" --steps 1 --init-from "$T/of/step-000030"
check init_no_folder test ! -e "$T/bad"

# A non-finite loss stops with status 1; --skip-nonfinite counts and goes on.
expect_err nonfinite_stops 1 "stopping without saving" dsv3-train -c $CFG -d "$T/rep" -o "$T/nf" -b 4 --steps 8 --lr 1e6 --clip 0 --quiet
expect nonfinite_skipped 0 dsv3-train -c $CFG -d "$T/rep" -o "$T/nf2" -b 4 --steps 8 --lr 1e6 --clip 0 --skip-nonfinite --quiet
check nonfinite_counted grep -q '"skipped_batches": [1-9]' "$T/nf2/step-000008/state.json"
