#!/bin/sh
# dsv3-pack for docs/PERF.md: tokens/s per core and peak memory with no dedup, --dedup and
# --near-dedup; near-dedup precision and recall on planted near-duplicates; and datatrove's
# MinHash stages timed on the same documents.
#
# Data: scripts/neardup.py gen (Zipf ids over 50000 tokens, median 300 tokens a document):
# UNRELATED fresh documents, PAIRS original+variant pairs for each of 4 kinds of change x 6
# rates, CLUSTERS groups of five. Everything runs on tmpfs (no disk in the numbers).
# Per core = tokens (or documents) / CPU seconds (user+sys) of the run, from /usr/bin/time.
# DT_PY: a python with datatrove, xxhash<3.5 (datatrove 0.10 hashes str), regex and
# tokenizers installed (python3 -m venv /tmp/dt-venv && /tmp/dt-venv/bin/pip install
# datatrove 'xxhash==3.4.1' regex tokenizers); skipped when it is missing.
set -eu
BUILD=${BUILD:-build}
UNRELATED=${UNRELATED:-100000}
PAIRS=${PAIRS:-300}
CLUSTERS=${CLUSTERS:-300}
DT_PY=${DT_PY:-/tmp/dt-venv/bin/python}
make --no-print-directory "$BUILD/bin/dsv3-pack" "$BUILD/bin/dsv3-shard" >/dev/null
dir=$(mktemp -d /dev/shm/dsv3-bench-pack-XXXXXX 2>/dev/null || mktemp -d)
trap 'rm -rf "$dir"' EXIT

echo "# $(date -u +%F) $(uname -m) $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p' | head -n 1)), commit $(git rev-parse --short HEAD)"
python3 scripts/neardup.py gen "$dir/c" --unrelated "$UNRELATED" --pairs "$PAIRS" \
    --clusters "$CLUSTERS" --seed 1
"$BUILD/bin/dsv3-shard" make --vocab-size 50000 -o "$dir/c.shard" "$dir/c/ids.txt"
docs=$("$BUILD/bin/dsv3-shard" info "$dir/c.shard" | awk '/^records:/ { print $2 }')
tokens=$("$BUILD/bin/dsv3-shard" info "$dir/c.shard" | awk '/^tokens:/ { print $2 }')
echo "# corpus: $docs documents, $tokens tokens, $(wc -c <"$dir/c.shard") bytes of shard"

# run NAME CMD...: one timed run; prints wall, CPU, tokens/s per core, peak RSS.
run() {
    name=$1; shift
    /usr/bin/time -v "$@" 2>"$dir/time.txt" >/dev/null || { cat "$dir/time.txt"; exit 1; }
    awk -v name="$name" -v tok="$tokens" -v docs="$docs" '
        /Elapsed \(wall clock\)/ { n = split($NF, p, ":"); wall = (n == 3 ? p[1] * 3600 + p[2] * 60 + p[3] : p[1] * 60 + p[2]) }
        /User time/ { cpu += $NF } /System time/ { cpu += $NF }
        /Maximum resident set size/ { rss = $NF }
        /near-dedup removed/ { line = $0 }
        END {
            printf "%-22s wall %6.2f s  CPU %6.2f s  %6.1f M tokens/s per core  %6.1f M tokens/s wall  peak RSS %5.0f MiB = %5.0f MiB per million documents\n",
                name, wall, cpu, (cpu > 0 ? tok / cpu / 1e6 : 0), tok / wall / 1e6, rss / 1024, rss / 1024 / docs * 1e6
            if (line != "") { sub(/.*near-dedup/, "near-dedup", line); print "    " line }
        }' "$dir/time.txt"
}

run "read+verify (shard)" "$BUILD/bin/dsv3-shard" verify "$dir/c.shard"
run "pack" "$BUILD/bin/dsv3-pack" -o "$dir/o1" --quiet --eos-id 0 -L 4096 "$dir/c.shard"
run "pack --dedup" "$BUILD/bin/dsv3-pack" -o "$dir/o2" --quiet --eos-id 0 -L 4096 --dedup "$dir/c.shard"
run "pack --near-dedup -j1" "$BUILD/bin/dsv3-pack" -o "$dir/o3" --eos-id 0 -L 4096 --dedup --near-dedup -j 1 --log-removed "$dir/c.shard"
run "pack --near-dedup -j$(nproc)" "$BUILD/bin/dsv3-pack" -o "$dir/o4" --eos-id 0 -L 4096 --dedup --near-dedup "$dir/c.shard"
cmp -s "$dir/o3/train-00000.shard" "$dir/o4/train-00000.shard" || echo "MISMATCH: -j1 and -j$(nproc) differ"
grep -E '"(documents|near_duplicate_documents|near_duplicate_clusters|duplicate_documents|near_dedup_bytes)"' "$dir/o3/manifest.json" | tr -d ' \n'; echo
echo "# precision and recall against the planted truth and true 5-gram Jaccard (--dedup --near-dedup, defaults)"
python3 scripts/neardup.py score "$dir/c" "$dir/o3"
rm -rf "$dir/o1" "$dir/o2" "$dir/o4"

if [ -x "$DT_PY" ] && "$DT_PY" -c "import datatrove, xxhash, regex, tokenizers" 2>/dev/null; then
    echo "# datatrove $("$DT_PY" -c 'import importlib.metadata as m; print(m.version("datatrove"))') MinHash stages, same documents, one core, whitespace words (no spaCy)"
    "$DT_PY" scripts/bench_datatrove.py "$dir/c/ids.txt" "$dir/dt" 2>/dev/null
else
    echo "# datatrove: not installed at $DT_PY; comparison skipped"
fi
