#!/bin/sh
# make demo: the pipeline end to end on a corpus every Debian machine has
# (/usr/share/common-licenses, from base-files). Each stage appears here as its program lands.
# Output goes to $DEMO_DIR (default build/demo).
set -eu
BUILD=${BUILD:-build}
BIN=$BUILD/bin
OUT=${DEMO_DIR:-$BUILD/demo}
CORPUS=${DEMO_CORPUS:-/usr/share/common-licenses}
mkdir -p "$OUT"
files=$(find "$CORPUS" -maxdepth 1 -type f | sort)
[ -n "$files" ] || { echo "demo: no corpus files in $CORPUS" >&2; exit 1; }
step() { printf '\n== %s\n' "$*"; }

step "corpus: $(echo "$files" | wc -l) files, $(cat $files | wc -c) bytes from $CORPUS"

# First the shard tools on byte tokens (ids 0..255: what a byte-level BPE with no merges
# produces), one document per file; the stream that gets packed comes from dsv3-tok below.
step "document stream: dsv3-shard make --bytes (one document per file)"
# shellcheck disable=SC2086
"$BIN/dsv3-shard" make --bytes --vocab-size 256 -o "$OUT/docs.shard" $files
"$BIN/dsv3-shard" info "$OUT/docs.shard"

step "verify every chunk and checksum"
"$BIN/dsv3-shard" verify "$OUT/docs.shard"

step "round trip: the first document dumped back to bytes equals the first file"
first=$(echo "$files" | head -n 1)
"$BIN/dsv3-shard" dump -r 0:1 "$OUT/docs.shard" |
    awk '{ for (i = 1; i <= NF; i++) printf "%c", $i + 0 }' >"$OUT/first.txt"
if cmp -s "$OUT/first.txt" "$first"; then echo "identical: $first"; else
    echo "demo: round trip differs for $first" >&2; exit 1; fi

step "the same stream through a pipe, written and read without seeking"
# shellcheck disable=SC2086
"$BIN/dsv3-shard" make --bytes $files | "$BIN/dsv3-shard" verify -

step "tokenizer: train a byte-level BPE of 500 ids and the specials (to fit configs/tiny.json: vocab_size 512)"
# shellcheck disable=SC2086
"$BIN/dsv3-tok" train --quiet -v 500 -o "$OUT/tok.bpe" $files
"$BIN/dsv3-tok" info "$OUT/tok.bpe" | head -n 8

step "encode: one document per file, to a document stream (dsv3-pack appends the EOS id)"
# shellcheck disable=SC2086
"$BIN/dsv3-tok" encode -t "$OUT/tok.bpe" -o "$OUT/tokens.shard" $files
"$BIN/dsv3-shard" verify "$OUT/tokens.shard"
"$BIN/dsv3-tok" decode -t "$OUT/tok.bpe" "$OUT/tokens.shard" >"$OUT/decoded.txt"
# shellcheck disable=SC2086
if cat $files | cmp -s - "$OUT/decoded.txt"; then echo "decode(encode(corpus)) == corpus"; else
    echo "demo: the tokenizer round trip differs" >&2; exit 1; fi

step "pack: exact and near dedup, best-fit records of 256+1 tokens, 10% validation"
# The corpus goes in twice (exact repeats); LGPL-2/LGPL-2.1 and GFDL-1.2/GFDL-1.3
# are near duplicates. -t takes the EOS (and FIM) ids from the tokenizer.
rm -rf "$OUT/packed"
"$BIN/dsv3-pack" -t "$OUT/tok.bpe" -L 256 --best-fit --dedup --near-dedup --log-removed --val 0.1 \
    --seed 1 -o "$OUT/packed" "$OUT/tokens.shard" "$OUT/tokens.shard"
grep near "$OUT/packed/removed.tsv" | while read -r d _ k; do
    echo "near duplicate: $(echo "$files" | sed -n "$((d + 1))p") (kept $(echo "$files" | sed -n "$((k + 1))p"))"
done
"$BIN/dsv3-shard" verify "$OUT"/packed/*.shard

step "model configs: checked, with total and activated parameter counts"
"$BIN/dsv3-config" configs/*.json

step "train: the tiny config on the packed corpus, 200 updates on the CPU, eval every 50"
rm -rf "$OUT/run"
"$BIN/dsv3-train" -c configs/tiny.json -d "$OUT/packed" -o "$OUT/run" -b 2 -g 2 --steps 200 \
    --lr 3e-3 --warmup 10 --eval-every 50 --eval-batches 2 --save-every 100 --quiet
grep val_loss "$OUT/run/metrics.jsonl" | sed 's/.*"step":\([0-9]*\).*"val_loss":\([0-9.]*\).*/validation loss after \1 updates: \2/'
if command -v gnuplot >/dev/null; then scripts/plot-run.sh "$OUT/run"; fi

step "checkpoints: the trained model to an HF folder (BF16 shards) -> FP8 (DeepSeek's format) -> BF16"
"$BIN/dsv3-convert" --force --dtype bf16 --max-shard-size 64k "$OUT/run/step-000200" -o "$OUT/hf"
"$BIN/dsv3-convert" --verify "$OUT/hf"
"$BIN/dsv3-quant" --force "$OUT/hf" -o "$OUT/hf-fp8"
"$BIN/dsv3-convert" --verify "$OUT/hf-fp8"
"$BIN/dsv3-quant" --force --dequant "$OUT/hf-fp8" -o "$OUT/hf-bf16"
"$BIN/dsv3-convert" --verify "$OUT/hf-bf16"

step "score: per-token log-probs of the validation text under the BF16 model"
"$BIN/dsv3-sample" --score -m "$OUT/hf" "$OUT"/packed/val-00000.shard | head -c 300; echo

step "sample: greedy text from the trained model, then two requests as a batch"
"$BIN/dsv3-sample" -m "$OUT/hf" -t "$OUT/tok.bpe" -p "The" -n 40 --temp 0; echo
printf '{"prompt": "The", "n_predict": 16, "seed": 1}\n{"prompt": "A", "n_predict": 16, "temperature": 0}\n' |
    "$BIN/dsv3-sample" -m "$OUT/hf" -t "$OUT/tok.bpe" --batch --quiet

printf '\ndemo done: outputs in %s\n' "$OUT"
