#!/bin/sh
# make fuzz: builds every libFuzzer target in tests/fuzz (clang, ASan + UBSan), seeds each
# corpus with valid inputs, and fuzzes each target for $FUZZ_SECONDS seconds (default 600).
# $FUZZ_TARGETS picks some: shard shard-nohash safetensors tok-file tok-json (default all).
# "-nohash"/tok targets are built with FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION, which skips
# checksum comparisons so the fuzzer gets past the hashes into the parser (as zstd does).
# Corpora and crash artifacts stay in $BUILD/fuzz/. Not part of `make test`.
set -eu
BUILD=${BUILD:-build}
SECS=${FUZZ_SECONDS:-600}
TARGETS=${FUZZ_TARGETS:-shard-nohash shard safetensors tok-file tok-json}
command -v clang >/dev/null || { echo "make fuzz needs clang (apt-get install clang)" >&2; exit 2; }
out=$BUILD/fuzz
mkdir -p "$out/crashes"
libs=$(ls lib/*.c | grep -v gpu_none)

build_target() {   # name source extra-flags...
    name=$1 src=$2; shift 2
    [ -x "$out/$name" ] && [ "$out/$name" -nt "$src" ] && [ -z "$(find lib -newer "$out/$name")" ] &&
        return 0
    # shellcheck disable=SC2086
    clang -std=c11 -D_GNU_SOURCE -O1 -g -fsanitize=fuzzer,address,undefined \
        -fno-sanitize-recover=undefined -I"$BUILD/gen" "$@" "$src" $libs \
        -lzstd -lxxhash -ljansson -lpcre2-8 -lm -o "$out/$name"
}

seed() {   # name: fills $out/corpus-NAME with valid inputs once
    c=$out/corpus-$1
    [ -d "$c" ] && return 0
    mkdir -p "$c"
    bin=$BUILD/bin
    case $1 in
    shard*)
        printf '1 2 3\n\n4 5 6 7\n' | "$bin/dsv3-shard" make --chunk-tokens 2 -o "$c/docs"
        printf '1 2 3\n4 5 6\n' | "$bin/dsv3-shard" make -k packed -L 3 --chunk-tokens 4 -o "$c/packed"
        printf '' | "$bin/dsv3-shard" make -o "$c/empty"
        printf '9 9 9 9 9\n8\n' | "$bin/dsv3-shard" make --no-shuffle --vocab-size 10 -o "$c/vocab"
        printf '1 2\n3\n' | "$bin/dsv3-shard" make --chunk-tokens 1 >"$c/pipe" ;;
    safetensors)
        for f in tests/fixtures/hf/*/model.safetensors; do
            cp "$f" "$c/$(basename "$(dirname "$f")")"; done ;;
    tok-file)
        head -c 20000 /usr/share/common-licenses/GPL-3 >"$out/tok-corpus.txt"
        "$bin/dsv3-tok" train -v 300 -o "$c/small.tok" "$out/tok-corpus.txt" 2>/dev/null ;;
    tok-json)
        cp tests/fixtures/tok/*.json "$c/" ;;
    esac
}

for t in $TARGETS; do
    case $t in
    shard) build_target "$t" tests/fuzz/fuzz_shard.c ;;
    shard-nohash) build_target "$t" tests/fuzz/fuzz_shard.c -DFUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION ;;
    safetensors) build_target "$t" tests/fuzz/fuzz_safetensors.c ;;
    tok-file) build_target "$t" tests/fuzz/fuzz_tok.c -DFUZZ_TARGET=1 -DFUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION ;;
    tok-json) build_target "$t" tests/fuzz/fuzz_tok.c -DFUZZ_TARGET=2 -DFUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION ;;
    *) echo "unknown fuzz target $t" >&2; exit 2 ;;
    esac
    # the two shard targets share one corpus
    cname=$t
    case $t in shard*) cname=shard ;; esac
    seed "$cname"
    corpus=$out/corpus-$cname
    echo "fuzzing $t for $SECS s; corpus $corpus" >&2
    "$out/$t" -max_total_time="$SECS" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$out/crashes/$t-" -print_final_stats=1 "$corpus" 2>&1 |
        grep -E "^(Done|stat::(number|average|new)|==|SUMMARY|artifact)" || true
done
n=$(ls "$out/crashes" | wc -l)
echo "fuzz: $n crash/leak/timeout artifacts in $out/crashes" >&2
[ "$n" -eq 0 ]
