# CLI tests of dsv3-quant: conventions, quantize a sharded folder (shard names kept, FP8 and
# scales present, quantization_config written), dequantize (scales and config dropped),
# existing output, and bad input refused with exit 1 and no output folder.
. "$(dirname "$0")/lib.sh"
F=$(cd "$(dirname "$0")/../fixtures/hf" && pwd)

expect help 0 dsv3-quant --help
check help_mentions_dequant grep -q -- "--dequant" "$T/out"
expect version 0 dsv3-quant --version
check version_line grep -q "^dsv3-quant [0-9]" "$T/out"
expect_err no_input 2 "no input folder" dsv3-quant
expect_err no_output 2 "no output folder" dsv3-quant "$F/qlora_yarn"
expect_err two_inputs 2 "one input folder" dsv3-quant "$F/qlora_yarn" "$F/noq_plain" -o "$T/x"
expect_err bad_threads 2 "threads" dsv3-quant -j 0 "$F/qlora_yarn" -o "$T/x"

expect shard_input 0 dsv3-convert --quiet --max-shard-size 30k "$F/qlora_yarn" -o "$T/in"
expect quant 0 dsv3-quant -j 2 "$T/in" -o "$T/q"
check quant_summary grep -q "72 weights quantized" "$T/err"
check same_files sh -c "cd '$T/in' && ls *.safetensors >'$T/l1' && cd '$T/q' && ls *.safetensors >'$T/l2' && cmp -s '$T/l1' '$T/l2'"
check quant_config grep -q '"quant_method": "fp8"' "$T/q/config.json"
check scale_in_index grep -q 'model.layers.0.self_attn.o_proj.weight_scale_inv' "$T/q/model.safetensors.index.json"
expect verify_q 0 dsv3-convert --verify --checksums "$T/q"
check fp8_dtype grep -q "F8_E4M3  \[32,16\]  model.layers.0.self_attn.o_proj.weight$" "$T/out"
check scale_dtype grep -q "F32  \[1,1\]  model.layers.0.self_attn.o_proj.weight_scale_inv$" "$T/out"
check router_bf16 grep -q "BF16  \[8,32\]  model.layers.2.mlp.gate.weight$" "$T/out"
check bias_f32 grep -q "F32  \[8\]  model.layers.2.mlp.gate.e_score_correction_bias$" "$T/out"
check head_bf16 grep -q "BF16  \[64,32\]  lm_head.weight$" "$T/out"

expect dequant 0 dsv3-quant --dequant "$T/q" -o "$T/dq"
check dequant_summary grep -q "72 weights dequantized" "$T/err"
check no_quant_config sh -c "! grep -q quantization_config '$T/dq/config.json'"
check no_scales sh -c "! grep -q scale_inv '$T/dq/model.safetensors.index.json'"
expect verify_dq 0 dsv3-convert --verify --checksums "$T/dq"
check dequant_bf16 sh -c "! grep -q F8_E4M3 '$T/out'"
# the FP8 folder converts to BF16 just as --dequant does
expect convert_fp8 0 dsv3-convert --quiet --max-shard-size 0 "$T/q" -o "$T/cq"
dsv3-convert --quiet --verify --checksums "$T/cq" >"$T/s1" 2>/dev/null
dsv3-convert --quiet --verify --checksums "$T/dq" >"$T/s2" 2>/dev/null
check convert_equals_dequant cmp -s "$T/s1" "$T/s2"

expect_err exists 1 "exists (use --force" dsv3-quant "$T/in" -o "$T/q"
expect force 0 dsv3-quant --quiet --force "$T/in" -o "$T/q"
check force_quiet test ! -s "$T/err"

# bad input: a missing shard, a config that does not match
cp -r "$T/in" "$T/miss" && rm "$T/miss/model-00003-of-00004.safetensors"
expect_err missing_shard 1 "model-00003-of-00004.safetensors" dsv3-quant "$T/miss" -o "$T/o1"
check no_output_missing test ! -e "$T/o1"
mkdir "$T/cfg" && cp "$F/noq_plain/model.safetensors" "$T/cfg/"
sed 's/"hidden_size": 32/"hidden_size": 64/' "$F/noq_plain/config.json" >"$T/cfg/config.json"
expect_err config_shape 1 "model.embed_tokens.weight\" has shape \[64, 32\], the config needs \[64, 64\]" dsv3-quant "$T/cfg" -o "$T/o2"
check no_output_config test ! -e "$T/o2"
# an FP8 folder whose config lost its quantization_config fails --verify (transformers would
# read its FP8 bytes as plain weights), and so does a BF16 one that claims FP8
cp -r "$T/q" "$T/noqc" && cp "$T/dq/config.json" "$T/noqc/config.json"
expect_err fp8_without_config 1 "FP8 weights but no quantization_config" dsv3-convert --verify "$T/noqc"
cp -r "$T/dq" "$T/claims" && cp "$T/q/config.json" "$T/claims/config.json"
expect_err config_without_fp8 1 "quantization_config but no FP8" dsv3-convert --verify "$T/claims"
check no_hidden_left sh -c "! ls -a '$T' | grep -q '\.tmp\.'"
