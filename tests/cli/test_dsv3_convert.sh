# CLI tests of dsv3-convert: conventions, HF round trips (checksums), --verify, the DeepSeek
# export, and bad input (missing shard, truncated or lying safetensors, config that does
# not match, existing output) refused with exit 1 and no output folder.
. "$(dirname "$0")/lib.sh"
F=$(cd "$(dirname "$0")/../fixtures/hf" && pwd)

expect help 0 dsv3-convert --help
check help_mentions_verify grep -q -- "--verify" "$T/out"
expect version 0 dsv3-convert --version
check version_line grep -q "^dsv3-convert [0-9]" "$T/out"
expect_err no_input 2 "no input folder" dsv3-convert
expect_err no_output 2 "no output folder" dsv3-convert "$F/qlora_yarn"
expect_err bad_dtype 2 "dtype must be" dsv3-convert --dtype f16 "$F/qlora_yarn" -o "$T/x"
expect_err keep_needs_deepseek 2 "dtype must be" dsv3-convert --dtype keep "$F/qlora_yarn" -o "$T/x"
expect_err bad_to 2 "hf or deepseek" dsv3-convert --to gguf "$F/qlora_yarn" -o "$T/x"
expect_err mp_needs_deepseek 2 "with --to deepseek" dsv3-convert --mp 2 "$F/qlora_yarn" -o "$T/x"
expect_err sums_need_verify 2 "with --verify" dsv3-convert --checksums "$F/qlora_yarn" -o "$T/x"
expect_err bad_size 2 "max-shard-size" dsv3-convert --max-shard-size 12x "$F/qlora_yarn" -o "$T/x"

# --verify: both fixtures (transformers-saved, no MTP tensors) pass
expect verify_noq 0 dsv3-convert --verify "$F/noq_plain"
check verify_line grep -q "ok, 59 tensors" "$T/err"
expect verify_qlora 0 dsv3-convert --verify "$F/qlora_yarn"

# F32 -> BF16 (sharded) -> F32 -> BF16: the two BF16 folders hold the same tensor bytes
expect to_bf16 0 dsv3-convert --quiet --max-shard-size 30k "$F/qlora_yarn" -o "$T/b1"
check sharded test -f "$T/b1/model.safetensors.index.json" -a -f "$T/b1/model-00004-of-00004.safetensors"
check gen_config test -f "$T/b1/generation_config.json"
check config_dtype grep -q '"dtype": "bfloat16"' "$T/b1/config.json"
expect to_f32 0 dsv3-convert --quiet --dtype f32 --max-shard-size 0 "$T/b1" -o "$T/f1"
check single_file test -f "$T/f1/model.safetensors" -a ! -f "$T/f1/model.safetensors.index.json"
expect to_bf16_again 0 dsv3-convert --quiet "$T/f1" -o "$T/b2"
dsv3-convert --quiet --verify --checksums "$T/b1" >"$T/s1" 2>"$T/err"
dsv3-convert --quiet --verify --checksums "$T/b2" >"$T/s2" 2>"$T/err"
check checksums_equal cmp -s "$T/s1" "$T/s2"
check checksums_lines test "$(wc -l <"$T/s1")" -eq 91
dsv3-convert --quiet --verify --checksums "$T/f1" >"$T/s3" 2>"$T/err"
check checksums_differ_f32 sh -c "! cmp -s '$T/s1' '$T/s3'"
# F32 -> F32 is the input's bytes
expect f32_f32 0 dsv3-convert --quiet --dtype f32 --max-shard-size 0 "$F/noq_plain" -o "$T/nf"
dsv3-convert --quiet --verify --checksums "$F/noq_plain" >"$T/s4" 2>"$T/err"
dsv3-convert --quiet --verify --checksums "$T/nf" >"$T/s5" 2>"$T/err"
check f32_identical cmp -s "$T/s4" "$T/s5"
expect no_mtp 0 dsv3-convert --quiet --no-mtp "$F/noq_plain" -o "$T/nm"
check no_mtp_config grep -q '"num_nextn_predict_layers": 0' "$T/nm/config.json"

# existing output: refused without --force, replaced with it
expect_err exists 1 "exists (use --force" dsv3-convert --quiet "$F/noq_plain" -o "$T/nm"
expect force 0 dsv3-convert --quiet --force --dtype f32 "$F/noq_plain" -o "$T/nm"
check force_replaced grep -q '"dtype": "float32"' "$T/nm/config.json"

# DeepSeek's inference layout
expect deepseek 0 dsv3-convert --quiet --to deepseek --mp 1 "$F/noq_plain" -o "$T/ds"
check deepseek_files test -f "$T/ds/model0-mp1.safetensors" -a -f "$T/ds/inference-config.json"
expect deepseek_mp2 0 dsv3-convert --quiet --to deepseek --mp 2 "$F/noq_plain" -o "$T/ds2"
check deepseek_mp2_files test -f "$T/ds2/model1-mp2.safetensors"
expect_err deepseek_mp3 1 "do not split" dsv3-convert --quiet --to deepseek --mp 3 "$F/noq_plain" -o "$T/ds3"

# -t: a tokenizer.json is added
TOKF=$(cd "$(dirname "$0")/../fixtures/tok" && pwd)/hf-gpt2.json
expect tokenizer 0 dsv3-convert --quiet -t "$TOKF" "$F/noq_plain" -o "$T/tk"
check tokenizer_copied cmp -s "$TOKF" "$T/tk/tokenizer.json"
# a dsv3-tok file is exported (as dsv3-tok export would)
dsv3-tok import -o "$T/g.tok" "$TOKF" 2>/dev/null
dsv3-tok export -t "$T/g.tok" -o "$T/g.json" 2>/dev/null
expect tokenizer_dsv3 0 dsv3-convert --quiet -t "$T/g.tok" "$F/noq_plain" -o "$T/tk2"
check tokenizer_exported cmp -s "$T/g.json" "$T/tk2/tokenizer.json"

# bad input: a shard named in the index is missing
cp -r "$T/b1" "$T/miss" && rm "$T/miss/model-00002-of-00004.safetensors"
expect_err missing_shard 1 "model-00002-of-00004.safetensors" dsv3-convert --verify "$T/miss"
expect_err missing_shard_convert 1 "model-00002-of-00004.safetensors" dsv3-convert "$T/miss" -o "$T/out1"
check no_output_missing test ! -e "$T/out1"
# a truncated shard
cp -r "$T/b1" "$T/trunc"
f="$T/trunc/model-00004-of-00004.safetensors"
head -c $(($(wc -c <"$f") - 100)) "$f" >"$f.x" && mv "$f.x" "$f"
expect_err truncated 1 "model-00004-of-00004.safetensors" dsv3-convert "$T/trunc" -o "$T/out2"
check no_output_truncated test ! -e "$T/out2"
# a header that lies about its data
mkdir "$T/lie" && cp "$F/noq_plain/config.json" "$T/lie/"
h='{"model.norm.weight":{"dtype":"F32","shape":[32],"data_offsets":[0,128]}}'
{ printf "\\$(printf %03o ${#h})\\000\\000\\000\\000\\000\\000\\000"; printf %s "$h"; head -c 64 /dev/zero; } >"$T/lie/model.safetensors"
expect_err lying_header 1 "outside the 64 data bytes" dsv3-convert --verify "$T/lie"
# a config that does not match the tensors
mkdir "$T/cfg" && cp "$F/noq_plain/model.safetensors" "$T/cfg/"
sed 's/"intermediate_size": 48/"intermediate_size": 40/' "$F/noq_plain/config.json" >"$T/cfg/config.json"
expect_err config_shape 1 "mlp.gate_proj.weight\" has shape \[48, 32\], the config needs \[40, 32\]" dsv3-convert "$T/cfg" -o "$T/out3"
check no_output_config test ! -e "$T/out3"
sed 's/"num_hidden_layers": 3/"num_hidden_layers": 2/' "$F/noq_plain/config.json" >"$T/cfg/config.json"
# (layer 2 is then the MTP layer, whose own tensors are missing)
expect_err config_layers 1 "model.layers.2.enorm.weight\" is missing" dsv3-convert --verify "$T/cfg"
check no_hidden_left sh -c "! ls -a '$T' | grep -q '\.tmp\.'"
