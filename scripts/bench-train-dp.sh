#!/bin/sh
# dsv3-train throughput with 1 process and with RANKS data-parallel ranks (TCP, and mpirun
# when it is there) on the same global batch: configs/tiny.json on random documents, the
# median tokens/s over the steps after the first. On a small CPU machine this measures the
# cost of the ranks sharing cores and of the collectives, not scaling.
# Usage: scripts/bench-train-dp.sh [RANKS] [STEPS]. For docs/DISTRIBUTED.md.
set -eu
BUILD=${BUILD:-build}
n=${1:-2} steps=${2:-20}
bin=$(cd "$BUILD/bin" && pwd)
T=$(mktemp -d /tmp/dsv3-bench-dp-XXXXXX)
trap 'rm -rf "$T"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,vader,tcp
echo "# $(date -u +%F) $(hostname) $(nproc) cores commit $(git rev-parse --short HEAD 2>/dev/null || echo ?)"
awk 'BEGIN { srand(1); for (i = 0; i < 2000; i++) { n = 5 + int(rand() * 60); s = "";
     for (j = 0; j < n; j++) s = s (j ? " " : "") int(rand() * 500); print s } }' >"$T/ids.txt"
"$bin/dsv3-shard" make --vocab-size 512 -o "$T/a.shard" "$T/ids.txt"
"$bin/dsv3-pack" --quiet -o "$T/data" --eos-id 1 -L 64 -s 1 "$T/a.shard"
g=$((4 * n * 2))
A="-c configs/tiny.json -d $T/data -b 4 -g $g --quiet --steps $steps"
median() {
    sed -n 's/.*"tokens_per_s":\([^,]*\).*/\1/p' "$1" | tail -n +2 | sort -g |
        awk '{ v[NR] = $1 } END { printf "%.0f\n", (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
}
"$bin/dsv3-train" $A -o "$T/one"
echo "1 process:        $(median "$T/one/metrics.jsonl") tokens/s (global batch $g x 64 tokens)"
port=$((20000 + $$ % 10000)) pids="" r=0
while [ $r -lt "$n" ]; do
    RANK=$r WORLD_SIZE=$n MASTER_ADDR=127.0.0.1 MASTER_PORT=$port "$bin/dsv3-train" $A -o "$T/tcp" &
    pids="$pids $!" r=$((r + 1))
done
for p in $pids; do wait "$p"; done
echo "$n ranks, TCP:     $(median "$T/tcp/metrics.jsonl") tokens/s"
if command -v mpirun >/dev/null && [ -f "$BUILD/lib/dsv3/comm-mpi.so" ]; then
    mpirun --oversubscribe -np "$n" "$bin/dsv3-train" $A -o "$T/mpi"
    echo "$n ranks, mpirun:  $(median "$T/mpi/metrics.jsonl") tokens/s"
fi
