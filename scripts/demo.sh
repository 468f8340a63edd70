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

# Until dsv3-tok lands, the document stream uses byte tokens (ids 0..255): what a byte-level
# BPE with no merges produces. One document per file.
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

step "pack: exact dedup, best-fit records of 256+1 tokens, 10% validation"
# The newline byte stands in for EOS until the demo encodes with dsv3-tok.
rm -rf "$OUT/packed"
"$BIN/dsv3-pack" --eos-id 10 -L 256 --best-fit --dedup --val 0.1 --seed 1 -o "$OUT/packed" \
    "$OUT/docs.shard" "$OUT/docs.shard"
"$BIN/dsv3-shard" verify "$OUT"/packed/*.shard

step "model configs: checked, with total and activated parameter counts"
"$BIN/dsv3-config" configs/*.json

step "checkpoints: HF folder -> BF16 shards -> FP8 (DeepSeek's format) -> BF16, each verified"
# Until dsv3-train lands, transformers' tiny fixture stands in for the trained model.
"$BIN/dsv3-convert" --force --max-shard-size 64k tests/fixtures/hf/qlora_yarn -o "$OUT/hf"
"$BIN/dsv3-quant" --force "$OUT/hf" -o "$OUT/hf-fp8"
"$BIN/dsv3-convert" --verify "$OUT/hf-fp8"
"$BIN/dsv3-quant" --force --dequant "$OUT/hf-fp8" -o "$OUT/hf-bf16"
"$BIN/dsv3-convert" --verify "$OUT/hf-bf16"

printf '\ndemo done: outputs in %s\n' "$OUT"
