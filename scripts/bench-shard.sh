#!/bin/sh
# Shard write and read+verify throughput (MB/s of 4-byte tokens) and compression ratio, with
# the same run's plain-zstd and memcpy figures on the same bytes, for docs/PERF.md.
# Data: synthetic Zipf(1.1) ids over a 129280 vocabulary, and byte tokens of the license
# corpus (real text, vocabulary 256). Pass a shard of real BPE tokens as $1 to add it.
set -eu
BUILD=${BUILD:-build}
make --no-print-directory "$BUILD/tests/bench/bench_shard" >/dev/null
dir=$(mktemp -d /dev/shm/dsv3-bench-XXXXXX 2>/dev/null || mktemp -d)
trap 'rm -rf "$dir"' EXIT
find /usr/share/common-licenses -maxdepth 1 -type f | sort |
    xargs "$BUILD/bin/dsv3-shard" make --bytes -o "$dir/licenses.shard"
echo "# $(date -u +%F) $(uname -m) $(nproc) cores, commit $(git rev-parse --short HEAD)"
echo "# shard on $dir (tmpfs: no disk in the numbers)"
for data in zipf "$dir/licenses.shard" ${1:+"$1"}; do
    for level in 1 3 6; do
        for shuffle in 1 0; do
            "$BUILD/tests/bench/bench_shard" "$dir" "$data" "$level" "$shuffle"
        done
    done
done
