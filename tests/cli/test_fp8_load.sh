# CLI tests of FP8 folders on the CPU: a random model (dimensions that cut 128x128 blocks at
# the edges, BF16 shards) quantized by dsv3-quant scores with dsv3-sample --score exactly as
# the F32 folder of the same dequantized weights (dsv3-convert --dtype f32: f32(q) * scale,
# the products lib/fp8 computes) does, byte for byte, and not as the unquantized source;
# dsv3-train --init-from starts from it; a missing or misshaped scale is an error naming the
# file and the tensor (exit 1, no output).
. "$(dirname "$0")/lib.sh"

sed -e 's/"hidden_size": 64/"hidden_size": 144/' \
    -e 's/"intermediate_size": 128/"intermediate_size": 260/' \
    -e 's/"moe_intermediate_size": 32/"moe_intermediate_size": 40/' configs/tiny.json >"$T/cfg.json"
dsv3-config --quiet --init "$T/m" --seed 3 --bf16 --max-shard-size 200k "$T/cfg.json"
expect quant 0 dsv3-quant --quiet "$T/m" -o "$T/q"
check has_fp8 grep -q 'q_a_proj.weight_scale_inv' "$T/q/model.safetensors.index.json"
expect dequant_f32 0 dsv3-convert --quiet --dtype f32 --max-shard-size 0 "$T/q" -o "$T/f32"

awk 'BEGIN { srand(11); for (i = 0; i < 40; i++) printf "%d ", int(rand() * 512); print "" }' >"$T/ids.txt"
dsv3-shard make --vocab-size 512 -o "$T/a.shard" "$T/ids.txt"
expect score_fp8 0 dsv3-sample --score -m "$T/q" --quiet -o "$T/fp8.jsonl" "$T/a.shard"
expect score_f32 0 dsv3-sample --score -m "$T/f32" --quiet -o "$T/f32.jsonl" "$T/a.shard"
expect score_src 0 dsv3-sample --score -m "$T/m" --quiet -o "$T/src.jsonl" "$T/a.shard"
check fp8_equals_dequantized cmp -s "$T/fp8.jsonl" "$T/f32.jsonl"
check fp8_is_not_source sh -c "! cmp -s '$T/fp8.jsonl' '$T/src.jsonl'"
expect score_fp8_threads 0 dsv3-sample --score -m "$T/q" --threads 1 --quiet "$T/a.shard"
check fp8_threads_same cmp -s "$T/out" "$T/fp8.jsonl"

# dsv3-train --init-from the FP8 folder: one step, from the same first loss as from the F32 one
dsv3-pack --quiet -o "$T/data" --eos-id 1 -L 32 -s 1 "$T/a.shard"
expect init_from_fp8 0 dsv3-train -c "$T/cfg.json" -d "$T/data" -o "$T/r8" -b 1 --steps 1 \
    --device cpu --init-from "$T/q" --quiet
expect init_from_f32 0 dsv3-train -c "$T/cfg.json" -d "$T/data" -o "$T/r32" -b 1 --steps 1 \
    --device cpu --init-from "$T/f32" --quiet
first_loss() { grep -o '"loss":[^,]*' "$1"/metrics.jsonl | head -1; }
same_loss() { [ -n "$(first_loss "$1")" ] && [ "$(first_loss "$1")" = "$(first_loss "$2")" ]; }
check init_from_same_loss same_loss "$T/r8" "$T/r32"

# Bad scales, in the shard that holds q_a_proj of layer 0: the scale renamed away (same
# length, so the file stays valid), then its [1,2] block grid stored as [2,1].
f=$(grep -o '"model.layers.0.self_attn.q_a_proj.weight": "[^"]*"' "$T/q/model.safetensors.index.json" | cut -d'"' -f4)
cp -r "$T/q" "$T/noscale"
perl -0777 -pi -e 's/q_a_proj\.weight_scale_inv/q_a_proj.weight_scale_inx/' "$T/noscale/$f"
expect_err missing_scale 1 "noscale/$f: FP8 tensor \"model.layers.0.self_attn.q_a_proj.weight\" has no model.layers.0.self_attn.q_a_proj.weight_scale_inv" \
    dsv3-sample --score -m "$T/noscale" -o "$T/never.jsonl" "$T/a.shard"
check no_output_missing test ! -e "$T/never.jsonl"
cp -r "$T/q" "$T/shape"
perl -0777 -pi -e 's/(q_a_proj\.weight_scale_inv":\{"dtype":"F32","shape":)\[1,2\]/$1\[2,1\]/' "$T/shape/$f"
expect_err misshaped_scale 1 "shape/$f: \"model.layers.0.self_attn.q_a_proj.weight_scale_inv\" is F32 \[2,1\], the 128x128 blocks of \"model.layers.0.self_attn.q_a_proj.weight\" need F32 \[1,2\]" \
    dsv3-sample --score -m "$T/shape" -o "$T/never.jsonl" "$T/a.shard"
check no_output_misshaped test ! -e "$T/never.jsonl"
expect_err train_misshaped 1 "need F32 \[1,2\]" dsv3-train -c "$T/cfg.json" -d "$T/data" \
    -o "$T/rbad" -b 1 --steps 1 --device cpu --init-from "$T/shape" --quiet
