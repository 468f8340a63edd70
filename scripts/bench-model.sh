#!/bin/sh
# CPU model (lib/model over lib/ops): forward and backward time on 1 thread and on every
# processor, same weights and ids, best of 3; also says whether the threaded gradients are
# bitwise those of 1 thread. For docs/PERF.md.
set -eu
BUILD=${BUILD:-build}
make --no-print-directory "$BUILD/tests/bench/bench_model" >/dev/null
echo "# $(date -u +%F) $(uname -m) $(nproc) cores, commit $(git rev-parse --short HEAD)"
"$BUILD/tests/bench/bench_model" configs/tiny.json 4 256 3
"$BUILD/tests/bench/bench_model" configs/small.json 1 128 2
