# dsv3-sample. Generation (at the end): the seed reproduces, greedy ignores it, stop strings
# cut exactly, batches equal requests run alone, chat through a pipe equals the templated
# prompt, bad requests and over-long prompts refused.
# --score: per-token log-probs and losses against transformers' logits in the HF
# fixtures (tests/fixtures/hf, made by scripts/ref-hf.py), the printed loss against the
# mean of the printed log-probs, windows against the whole sequence, text input against the
# same text encoded to a shard, and bad input refused with exit 1 and no output file.
. "$(dirname "$0")/lib.sh"
PY=/usr/bin/python3
FX=tests/fixtures/hf

expect help 0 dsv3-sample --help
expect version 0 dsv3-sample --version
expect_err no_tokenizer 2 "needs a tokenizer" dsv3-sample -m "$FX/noq_plain" -p hi
expect_err no_model 2 "needs a model" dsv3-sample --score
expect_err two_modes 2 "choose one" dsv3-sample --chat --batch -m "$FX/noq_plain"
expect_err bos_without_tok 2 "need a tokenizer" dsv3-sample --score -m "$FX/noq_plain" --bos

# A fixture's input ids and transformers' per-token log-probs (log-softmax of its logits),
# its labels (-100 = ignored) and its loss, from ref.safetensors (safetensors read by hand).
ref() {  # $1: fixture; writes $T/ids.txt (one sequence a line) and $T/ref.json
    $PY - "$FX/$1/ref.safetensors" "$T" <<'PYEOF'
import json, math, struct, sys
raw = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
hdr = json.loads(raw[8:8 + n])
def get(name):
    t = hdr[name]; a, b = t["data_offsets"]; d = raw[8 + n + a:8 + n + b]
    fmt = {"I64": "q", "F32": "f"}[t["dtype"]]
    return t["shape"], struct.unpack("<%d%s" % (len(d) // struct.calcsize(fmt), fmt), d)
(B, T), ids = get("input_ids")
_, labels = get("labels")
(_, _, V), logits = get("logits")
_, loss = get("loss")
lp = []
for b in range(B):
    row = []
    for t in range(T - 1):
        l = logits[(b * T + t) * V:(b * T + t + 1) * V]
        m = max(l); z = sum(math.exp(x - m) for x in l)
        row.append(l[ids[b * T + t + 1]] - m - math.log(z))
    lp.append(row)
with open(sys.argv[2] + "/ids.txt", "w") as f:
    for b in range(B):
        f.write(" ".join(str(i) for i in ids[b * T:(b + 1) * T]) + "\n")
json.dump({"lp": lp, "labels": [list(labels[b * T:(b + 1) * T]) for b in range(B)],
           "loss": loss[0]}, open(sys.argv[2] + "/ref.json", "w"))
PYEOF
}

# Compares $T/out (our JSONL) with $T/ref.json: every log-prob within 1e-4 absolute, each
# object's loss = -mean(logprobs) to 1e-6, and transformers' loss (over the labels it kept)
# from our log-probs to 1e-5 relative.
compare() {
    $PY - "$T/out" "$T/ref.json" <<'PYEOF'
import json, sys
ours = [json.loads(l) for l in open(sys.argv[1])]
ref = json.load(open(sys.argv[2]))
assert len(ours) == len(ref["lp"]), (len(ours), len(ref["lp"]))
worst, s, c = 0.0, 0.0, 0
for o, lp, lab in zip(ours, ref["lp"], ref["labels"]):
    assert o["n"] == len(lp) == len(o["logprobs"])
    worst = max(worst, max(abs(a - b) for a, b in zip(o["logprobs"], lp)))
    mean = -sum(o["logprobs"]) / o["n"]
    assert abs(mean - o["loss"]) <= 1e-6 * abs(mean), (mean, o["loss"])
    for t, x in enumerate(o["logprobs"]):
        if lab[t + 1] != -100:
            s -= x; c += 1
rel = abs(s / c - ref["loss"]) / ref["loss"]
print("max |logprob - transformers| %.2g, loss rel err %.2g" % (worst, rel))
assert worst <= 1e-4 and rel <= 1e-5
PYEOF
}

if [ -x "$PY" ]; then
    for fx in noq_plain qlora_yarn; do
        ref $fx
        dsv3-shard make -o "$T/$fx.shard" "$T/ids.txt"
        expect "score_$fx" 0 dsv3-sample --score -m "$FX/$fx" "$T/$fx.shard"
        cp "$T/out" "$T/$fx.jsonl"
        if compare >"$T/cmp" 2>&1; then ok "score_${fx}_matches_transformers"
        else not_ok "score_${fx}_matches_transformers" "$(cat "$T/cmp")"; fi
    done
else
    echo "skip score_matches_transformers: no $PY"
fi

# Standard input, another thread count, the output file: the same bytes.
ref noq_plain 2>/dev/null || dsv3-shard dump "$T/noq_plain.shard" >"$T/ids.txt"
dsv3-shard make -o "$T/a.shard" "$T/ids.txt"
dsv3-sample --score -m "$FX/noq_plain" --quiet <"$T/a.shard" >"$T/stdin.jsonl"
dsv3-sample --score -m "$FX/noq_plain" --threads 3 -o "$T/file.jsonl" "$T/a.shard" 2>"$T/err"
check stdin_same_as_file cmp -s "$T/stdin.jsonl" "$T/file.jsonl"
check summary_on_stderr grep -q "1 documents, 15 predictions, mean loss" "$T/err"

# Windows of 5: objects at offsets 0, 5, 10, 15; (causal attention) the first window's
# log-probs are the whole sequence's first four, bit for bit as printed, and the second
# window's are those of its five tokens scored as a sequence of their own.
dsv3-sample --score -m "$FX/noq_plain" -L 5 --quiet "$T/a.shard" >"$T/win.jsonl"
check windows_four [ "$(wc -l <"$T/win.jsonl")" -eq 4 ]
check windows_offsets [ "$(grep -o '"offset":[0-9]*' "$T/win.jsonl" | tr '\n' ' ')" = \
    '"offset":0 "offset":5 "offset":10 "offset":15 ' ]
lps() { sed 's/.*"logprobs":\[\([^]]*\)\].*/\1/' "$1" | sed -n "$2p"; }
check window_is_prefix [ "$(lps "$T/stdin.jsonl" 1 | cut -d, -f1-4)" = "$(lps "$T/win.jsonl" 1)" ]
cut -d' ' -f6-10 "$T/ids.txt" | dsv3-shard make -o "$T/five.shard"
dsv3-sample --score -m "$FX/noq_plain" --quiet "$T/five.shard" >"$T/five.jsonl"
check window_is_own_sequence [ "$(lps "$T/five.jsonl" 1)" = "$(lps "$T/win.jsonl" 2)" ]
check window_of_one grep -q '"offset":15,"tokens":\[38\],"logprobs":\[\],"loss":null,"n":0' "$T/win.jsonl"

# Text with -t: the same as encoding with dsv3-tok and scoring the shard. A random model
# of configs/tiny.json (vocabulary 512) and a 300-id tokenizer trained here.
awk 'BEGIN { for (i = 0; i < 300; i++) print "the cat sat on the mat number " i " and then ran" }' >"$T/corpus.txt"
dsv3-tok train -v 300 -o "$T/tok.bpe" "$T/corpus.txt" 2>/dev/null
dsv3-config --quiet --init "$T/tiny" --seed 7 configs/tiny.json
printf 'the cat ran\nnumber 42 sat on the mat\n' >"$T/docs.txt"
expect text_score 0 dsv3-sample --score -m "$T/tiny" -t "$T/tok.bpe" -i lines --bos "$T/docs.txt"
cp "$T/out" "$T/text.jsonl"
dsv3-tok encode -t "$T/tok.bpe" -i lines --bos "$T/docs.txt" >"$T/docs.shard" 2>/dev/null
expect shard_score 0 dsv3-sample --score -m "$T/tiny" "$T/docs.shard"
check text_same_as_shard cmp -s "$T/out" "$T/text.jsonl"
check text_two_docs [ "$(wc -l <"$T/text.jsonl")" -eq 2 ]

# The same random model written as BF16 shards: it loads through the index, and its loss is
# the F32 one's to BF16 precision (weights rounded to 8 bits of mantissa).
dsv3-config --quiet --init "$T/tiny16" --seed 7 --bf16 --max-shard-size 100k configs/tiny.json
check bf16_sharded [ "$(ls "$T/tiny16" | grep -c "^model-000..-of-00009.safetensors$")" -eq 9 ]
expect bf16_score 0 dsv3-sample --score -m "$T/tiny16" --quiet "$T/docs.shard"
l32=$(sed -n '1s/.*"loss":\([^,]*\),.*/\1/p' "$T/text.jsonl")
l16=$(sed -n '1s/.*"loss":\([^,]*\),.*/\1/p' "$T/out")
check bf16_loss_close awk -v a="$l32" -v b="$l16" 'BEGIN { d = a - b; exit !(a != b && d < 0.01 && d > -0.01) }'

# Bad input: a token outside the model's vocabulary (the fixture has 64), a damaged shard,
# a missing model: exit 1, a message, and no output file.
echo "1 2 300 4" | dsv3-shard make -o "$T/big.shard"
expect_err id_outside_vocab 1 "token 300 at position 2 is outside" \
    dsv3-sample --score -m "$FX/noq_plain" -o "$T/never.jsonl" "$T/big.shard"
check no_partial_output [ ! -e "$T/never.jsonl" ]
head -c 100 "$T/a.shard" >"$T/trunc.shard"
expect_err damaged_shard 1 "trunc.shard" dsv3-sample --score -m "$FX/noq_plain" "$T/trunc.shard"
expect_err missing_model 1 "nowhere/config.json" dsv3-sample --score -m "$T/nowhere" "$T/a.shard"

# ---- generation ----
G="dsv3-sample -m $T/tiny -t $T/tok.bpe --quiet"
$G -p "the cat" -n 30 --temp 1 --seed 5 >"$T/s5a"
$G -p "the cat" -n 30 --temp 1 --seed 5 >"$T/s5b"
$G -p "the cat" -n 30 --temp 1 --seed 6 >"$T/s6"
check seed_reproduces cmp -s "$T/s5a" "$T/s5b"
differ() { ! cmp -s "$1" "$2"; }
check other_seed_differs differ "$T/s5a" "$T/s6"
$G -p "the cat" -n 40 --temp 0 --seed 1 >"$T/g1"
$G -p "the cat" -n 40 --temp 0 --seed 2 >"$T/g2"
check greedy_ignores_seed cmp -s "$T/g1" "$T/g2"
expect stats_on_stderr 0 dsv3-sample -m "$T/tiny" -t "$T/tok.bpe" -p "the cat" -n 5 --seed 1
check stats_line grep -q "generated 5 tokens.*tokens/s), cache 0.1 MiB" "$T/err"
expect_err prompt_over_ctx 1 "more than the context" \
    dsv3-sample -m "$T/tiny" -t "$T/tok.bpe" -c 4 -p "the cat sat on the mat number 12"
echo "the cat sat" >"$T/prompt.txt"
$G -f "$T/prompt.txt" -n 10 --temp 0 >"$T/pf"
$G -n 10 --temp 0 <"$T/prompt.txt" >"$T/pstdin"
check prompt_file_or_stdin cmp -s "$T/pf" "$T/pstdin"

# Stop strings: for several substrings of a greedy text (which may span tokens), the output
# with --stop is exactly the text before the substring's first occurrence.
if [ -x "$PY" ]; then
    if $PY - "$T/g1" "$DSV3_BIN/dsv3-sample" "$T" >"$T/stopcmp" 2>&1 <<'PYEOF'
import subprocess, sys
full = open(sys.argv[1], "rb").read()
tried = 0
for p in range(2, len(full) - 3, max(1, len(full) // 6)):
    for n in (1, 2, 3):
        stop = full[p:p + n]
        if b"\0" in stop:
            continue
        out = subprocess.run([sys.argv[2], "-m", sys.argv[3] + "/tiny", "-t",
                              sys.argv[3] + "/tok.bpe", "--quiet", "-p", "the cat", "-n", "40",
                              "--temp", "0", "--stop", "\x01never", "--stop", stop],
                             capture_output=True).stdout
        want = full[:full.find(stop)]
        assert out == want, (stop, out, want)
        tried += 1
assert tried >= 6, tried

PYEOF
    then ok stop_strings_cut_exactly; else not_ok stop_strings_cut_exactly "$(tail -3 "$T/stopcmp")"; fi
fi

# Batch: five requests with their own options, three slots; each result equals the request
# run alone (a batch of one), in input order.
cat >"$T/req.jsonl" <<'EOF2'
{"prompt": "the cat", "n_predict": 12, "seed": 1}
{"prompt": "number 7 sat", "n_predict": 3, "temperature": 0}
{"prompt": "on the mat", "n_predict": 20, "temperature": 1.2, "top_k": 0, "top_p": 1, "min_p": 0, "seed": 9}

{"prompt": "ran", "n_predict": 7, "seed": 4, "stop": ["a", "e"]}
{"prompt": "the", "n_predict": 16, "top_p": 0.5, "seed": 2}
EOF2
expect batch_runs 0 $G --batch --parallel 3 --seed 11 <"$T/req.jsonl"
cp "$T/out" "$T/batch.jsonl"
: >"$T/alone.jsonl"
grep . "$T/req.jsonl" | while IFS= read -r line; do
    printf '%s\n' "$line" | $G --batch --parallel 1 --seed 11 |
        sed 's/"index":0/"index":I/' >>"$T/alone.jsonl"
done
check batch_five_results [ "$(wc -l <"$T/batch.jsonl")" -eq 5 ]
check batch_in_order [ "$(grep -o '"index":[0-9]*' "$T/batch.jsonl" | tr '\n' ' ')" = \
    '"index":0 "index":1 "index":2 "index":3 "index":4 ' ]
sed 's/"index":[0-9]*/"index":I/' "$T/batch.jsonl" >"$T/batch.norm"
check batch_equals_alone cmp -s "$T/batch.norm" "$T/alone.jsonl"
check batch_lengths grep -q '"index":1,.*"tokens":3,"stop_reason":"length"' "$T/batch.jsonl"
printf '{"prompt": "a"}\n{"prompt": "b", "n_predict": }\n' >"$T/bad.jsonl"
expect_err batch_bad_json 1 "line 2: bad JSON" $G --batch -f "$T/bad.jsonl"
check batch_bad_no_output [ ! -s "$T/out" ]
printf '{"prompt": "a"}\n{"text": "b"}\n' | { expect_err batch_no_prompt 1 'line 2: expected an object with a string "prompt"' $G --batch; }

# Chat through a pipe: the first answer is the generation from the templated prompt (BOS,
# system, User marker, text, Assistant marker), then a second turn follows.
printf 'the cat\nsat on the mat\n' >"$T/turns"
expect chat_pipe 0 $G --chat --system "number 3" -n 8 --temp 0 <"$T/turns"
cp "$T/out" "$T/chat.out"
$G -p "number 3<｜User｜>the cat<｜Assistant｜>" -n 8 --temp 0 >"$T/turn1"
n1=$(wc -c <"$T/turn1")
check chat_first_turn_is_template cmp -s -n "$n1" "$T/chat.out" "$T/turn1"
check chat_second_turn [ "$(wc -c <"$T/chat.out")" -gt $((n1 + 1)) ]

# How steps run, not what they give: greedy steps that wait for the host (DSV3_SAMPLE_AHEAD=0,
# not queued one ahead) and sampled steps drawn from every logit (DSV3_SAMPLE_FULL=1, not
# from the top-k candidates): the same bytes, alone, in a batch and in a chat.
DSV3_SAMPLE_AHEAD=0 $G -p "the cat" -n 40 --temp 0 --seed 1 >"$T/g1w"
check greedy_waiting_same cmp -s "$T/g1" "$T/g1w"
DSV3_SAMPLE_FULL=1 $G -p "the cat" -n 30 --temp 1 --seed 5 >"$T/s5f"
check sampled_full_same cmp -s "$T/s5a" "$T/s5f"
DSV3_SAMPLE_AHEAD=0 DSV3_SAMPLE_FULL=1 $G --batch --parallel 3 --seed 11 <"$T/req.jsonl" \
    >"$T/batchw.jsonl"
check batch_waiting_full_same cmp -s "$T/batch.jsonl" "$T/batchw.jsonl"
DSV3_SAMPLE_AHEAD=0 $G --chat --system "number 3" -n 8 --temp 0 <"$T/turns" >"$T/chatw.out"
check chat_waiting_same cmp -s "$T/chat.out" "$T/chatw.out"
