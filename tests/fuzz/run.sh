#!/bin/sh
# make fuzz: builds the shard-reader fuzz target with clang's libFuzzer, ASan and UBSan, seeds
# a corpus with valid shards of every shape, and fuzzes for $FUZZ_SECONDS seconds (default 600).
# Crashes and the corpus stay in $BUILD/fuzz/. Not part of `make test`.
set -eu
BUILD=${BUILD:-build}
SECS=${FUZZ_SECONDS:-600}
command -v clang >/dev/null || { echo "make fuzz needs clang (apt-get install clang)" >&2; exit 2; }
out=$BUILD/fuzz
mkdir -p "$out/corpus" "$out/crashes"
# Two targets: the real reader, and one built with checksum comparisons off so the fuzzer gets
# past the hashes into the parser (FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION, as zstd does).
build_target() {
    clang -std=c11 -D_GNU_SOURCE -O1 -g -fsanitize=fuzzer,address,undefined \
        -fno-sanitize-recover=undefined -I"$BUILD/gen" "$@" \
        tests/fuzz/fuzz_shard.c lib/shard.c lib/err.c lib/outfile.c -lzstd -lxxhash
}
build_target -o "$out/fuzz_shard"
build_target -DFUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION -o "$out/fuzz_shard_nohash"
# Seeds: small valid shards (documents, packed, empty, multi-chunk, unshuffled, via a pipe).
bin=$BUILD/bin/dsv3-shard
printf '1 2 3\n\n4 5 6 7\n' | $bin make --chunk-tokens 2 -o "$out/corpus/seed-docs"
printf '1 2 3\n4 5 6\n' | $bin make -k packed -L 3 --chunk-tokens 4 -o "$out/corpus/seed-packed"
printf '' | $bin make -o "$out/corpus/seed-empty"
printf '9 9 9 9 9\n8\n' | $bin make --no-shuffle --vocab-size 10 -o "$out/corpus/seed-vocab"
printf '1 2\n3\n' | $bin make --chunk-tokens 1 >"$out/corpus/seed-pipe"
# Most of the time goes to the unchecked target (deeper); a fifth to the real one.
fuzz() {   # target seconds
    echo "fuzzing $1 for $2 s; corpus and crashes in $out" >&2
    "$out/$1" -max_total_time="$2" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$out/crashes/$1-" -print_final_stats=1 "$out/corpus" 2>&1 |
        grep -E "^(Done|stat::|==|SUMMARY|artifact)" || true
}
fuzz fuzz_shard_nohash $((SECS * 4 / 5))
fuzz fuzz_shard $((SECS - SECS * 4 / 5))
n=$(ls "$out/crashes" | wc -l)
echo "fuzz: $n crash/leak/timeout artifacts in $out/crashes" >&2
[ "$n" -eq 0 ]
