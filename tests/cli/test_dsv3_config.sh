# dsv3-config: parameter counts of configs/* against the published figures (DeepSeek-V3:
# 671B total, 36.6B activated, 685B with the MTP module on the hub; DeepSeek-V2-Lite: 15.7B
# and 2.4B), the tiny config's count against the tensors of a checkpoint written by --init,
# bad fields refused with exit 1 naming the field, and -o output that loads back the same.
. "$(dirname "$0")/lib.sh"
PY=/usr/bin/python3

expect help 0 dsv3-config --help
expect version 0 dsv3-config --version
expect_err no_args 2 "no config file" dsv3-config
expect all_configs 0 dsv3-config configs/tiny.json configs/small.json configs/1b-moe.json \
    configs/v2-lite-16b.json configs/v3-671b.json
cp "$T/out" "$T/all.txt"
for c in tiny small 1b-moe v2-lite-16b v3-671b; do
    check "counts_printed_$c" grep -q "^configs/$c.json: layers" "$T/all.txt"
done
# count FILE KIND: the number printed on the "  total"/"  activated" line after FILE's header.
count() { awk -v f="configs/$1.json:" -v k="$2" '$1 == f { on = 1; next }
    on && $1 == k { print $2; exit }' "$T/all.txt"; }
near() { awk -v a="$1" -v b="$2" -v t="$3" 'BEGIN { d = a / b - 1; exit !(d < t && d > -t) }'; }
check v3_total_671B near "$(count v3-671b total)" 671e9 0.001
check v3_activated_36.6B near "$(count v3-671b activated)" 36.6e9 0.002
check v3_with_mtp_685B grep -q "with 1 MTP module(s): total 684.49B" "$T/all.txt"
check v2lite_total_15.7B near "$(count v2-lite-16b total)" 15.7e9 0.003
check v2lite_activated_2.4B near "$(count v2-lite-16b activated)" 2.4e9 0.03
check small_about_100M near "$(count small total)" 100e6 0.05

# The tiny config's counts are the element counts of a checkpoint of it: the main model's
# tensors (layers below num_hidden_layers, embedding, norm, head) sum to "total".
expect init_tiny 0 dsv3-config --quiet --init "$T/tiny" --seed 5 configs/tiny.json
if [ -x "$PY" ]; then
    n=$($PY - "$T/tiny/model.safetensors" <<'PYEOF'
import json, struct, sys
raw = open(sys.argv[1], "rb").read(1 << 20)
h = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
tot = 0
for k, v in h.items():
    if k == "__metadata__" or (k.startswith("model.layers.") and int(k.split(".")[2]) >= 3):
        continue
    p = 1
    for d in v["shape"]:
        p *= d
    tot += p
print(tot)
PYEOF
)
    check tiny_total_is_tensor_count [ "$n" = "$(count tiny total)" ]
else
    echo "skip tiny_total_is_tensor_count: no $PY"
fi
expect init_same_seed_same_bytes 0 dsv3-config --quiet --init "$T/tiny2" --seed 5 configs/tiny.json
check init_deterministic cmp -s "$T/tiny/model.safetensors" "$T/tiny2/model.safetensors"
expect_err init_needs_one 2 "exactly one" dsv3-config --init "$T/x" configs/tiny.json configs/small.json

# Bad fields: each edit of the tiny config must be refused with the field named.
bad() {  # NAME FIELD-IN-MESSAGE SED-EXPRESSION
    sed "$3" configs/tiny.json >"$T/bad.json"
    expect_err "bad_$1" 1 "$2" dsv3-config "$T/bad.json"
}
bad missing_hidden '"hidden_size"' '/"hidden_size"/d'
bad missing_vocab '"vocab_size"' 's/"vocab_size"/"vocab_sz"/'
bad string_layers '"num_hidden_layers"' 's/"num_hidden_layers": 3/"num_hidden_layers": "3"/'
bad negative_heads '"num_attention_heads"' 's/"num_attention_heads": 4/"num_attention_heads": -4/'
bad group_divides '"n_group"' 's/"n_group": 4/"n_group": 3/'
bad topk_group '"topk_group"' 's/"topk_group": 2/"topk_group": 9/'
bad experts_per_tok '"num_experts_per_tok"' 's/"num_experts_per_tok": 2/"num_experts_per_tok": 50/'
bad odd_rope '"qk_rope_head_dim"' 's/"qk_rope_head_dim": 8/"qk_rope_head_dim": 7/'
bad dense_replace '"first_k_dense_replace"' 's/"first_k_dense_replace": 1/"first_k_dense_replace": 9/'
bad kv_heads '"num_key_value_heads"' 's/"num_key_value_heads": 4/"num_key_value_heads": 2/'
bad mtp_negative '"num_nextn_predict_layers"' 's/"num_nextn_predict_layers": 1/"num_nextn_predict_layers": -1/'
bad rope_type 'rope type' 's/"type": "yarn"/"type": "dynamic"/'
echo '{"hidden_size": ' >"$T/trunc.json"
expect_err bad_json 1 "trunc.json" dsv3-config "$T/trunc.json"
expect_err missing_file 1 "nowhere.json" dsv3-config "$T/nowhere.json"

# -o: the written config loads back with the same counts, in the 5.x spelling, unknown
# fields kept; a failed run leaves no file.
expect output 0 dsv3-config -o "$T/w.json" configs/tiny.json
head -n 4 "$T/out" >"$T/a.txt"
expect reload 0 dsv3-config "$T/w.json"
sed 1d "$T/out" >"$T/b.txt"; sed -i 1d "$T/a.txt"
check output_same_counts cmp -s "$T/a.txt" "$T/b.txt"
check output_5x_spelling grep -q '"rope_parameters"' "$T/w.json"
check output_keeps_unknown grep -q '"topk_method": "noaux_tc"' "$T/w.json"
sed '/"hidden_size"/d' configs/tiny.json >"$T/bad.json"
expect_err output_bad_input 1 "hidden_size" dsv3-config -o "$T/never.json" "$T/bad.json"
check output_none_on_error [ ! -e "$T/never.json" ]
