# Inputs the decode scripts share (bench-sample.sh, profile-decode.sh, trace-decode.sh), to be
# sourced: a tokenizer trained on a small repetitive corpus, and a long prompt in words it
# knows (~1200 tokens), so every script times decode at the same positions.

# decode_tokenizer BIN DIR: DIR/corpus.txt and DIR/tok.bpe (400 ids) from BIN's dsv3-tok.
decode_tokenizer() {
    awk 'BEGIN { for (i = 0; i < 500; i++) print "the cat sat on the mat number " i " and then ran home" }' >"$2/corpus.txt"
    "$1/dsv3-tok" train -v 400 -o "$2/tok.bpe" "$2/corpus.txt" 2>/dev/null
}

# decode_long_prompt FILE: the ~1200-token prompt.
decode_long_prompt() {
    awk 'BEGIN { for (i = 0; i < 90; i++) printf "the cat sat on the mat number %d and then ran home ", i }' >"$1"
}

# decode_model BIN DEST CONFIG: DEST, a folder of random bf16 weights of CONFIG (seed 1).
# With MODELS_DIR set, MODELS_DIR/NAME (NAME: CONFIG's file name without .json) is made there
# once and DEST links to it, so several scripts in one session share a large config's folder
# (configs/v2-lite-16b.json: 31 GB, about a minute to write).
decode_model() {
    if [ -z "${MODELS_DIR:-}" ]; then
        "$1/dsv3-config" --quiet --init "$2" --seed 1 --bf16 "$3"
        return
    fi
    m=$MODELS_DIR/$(basename "$3" .json)
    [ -f "$m/config.json" ] || "$1/dsv3-config" --quiet --init "$m" --seed 1 --bf16 "$3"
    ln -s "$(cd "$m" && pwd)" "$2"
}

# decode_folder BIN DIR CONFIG: the tokenizer, DIR/model (decode_model) and DIR/long.txt.
decode_folder() {
    decode_tokenizer "$1" "$2"
    decode_model "$1" "$2/model" "$3"
    decode_long_prompt "$2/long.txt"
}
