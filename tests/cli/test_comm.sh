#!/bin/sh
# lib/comm across real processes: the collective checks of tests/comm_check.h run by
# build/tests/unit/test_comm under mpirun (the MPI plugin), and as torchrun-style processes
# (RANK/WORLD_SIZE/MASTER_PORT, the TCP backend). Each rank prints "ok rank_R_of_W_BACKEND".
. "$(dirname "$0")/lib.sh"
BUILD_DIR=$(cd "$DSV3_BIN/.." && pwd)
prog=$BUILD_DIR/tests/unit/test_comm
[ -x "$prog" ] || { not_ok comm_test_program "missing $prog"; exit 0; }
seed=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')

# expect_ranks NAME N BACKEND: $T/out must hold "ok rank_R_of_N_BACKEND" for every R
expect_ranks() {
    name=$1 n=$2 be=$3 r=0 miss=""
    while [ $r -lt "$n" ]; do
        grep -q "^ok rank_${r}_of_${n}_${be}\$" "$T/out" || miss="$miss $r"
        r=$((r + 1))
    done
    if [ -z "$miss" ] && ! grep -q "^not ok" "$T/out"; then ok "$name"; else
        not_ok "$name" "ranks without ok:$miss; $(grep -h '^not ok' "$T/out" | head -3) $(head -c 300 "$T/err")"; fi
}

if command -v mpirun >/dev/null && [ -f "$BUILD_DIR/lib/dsv3/comm-mpi.so" ]; then
    # Open MPI refuses root unless told; CI runs as root. --oversubscribe: 2 cores, 3 ranks.
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,vader,tcp
    for n in 2 3; do
        COMM_TEST_SEED=$seed mpirun --oversubscribe -np $n "$prog" >"$T/out" 2>"$T/err"
        expect_ranks "mpirun_np$n" $n mpi
    done
else
    echo "skip mpirun: no mpirun or no comm-mpi.so (install libopenmpi-dev openmpi-bin)"
fi

port=$((30000 + $$ % 20000))
for n in 2 3; do
    : >"$T/out"
    pids=""
    r=0
    while [ $r -lt $n ]; do
        RANK=$r WORLD_SIZE=$n LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
            COMM_TEST_SEED=$seed DSV3_COMM_TIMEOUT=60 "$prog" >"$T/out.$r" 2>>"$T/err" &
        pids="$pids $!"
        r=$((r + 1))
    done
    for p in $pids; do wait "$p"; done
    cat "$T"/out.* >"$T/out"; rm -f "$T"/out.*
    expect_ranks "torchrun_style_$n" $n tcp
    port=$((port + 1))
done

# a rank whose peers never come gives up with a message naming the address, exit 1
RANK=1 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port DSV3_COMM_TIMEOUT=0.3 \
    "$prog" >"$T/out" 2>"$T/err"
st=$?
if [ $st -eq 1 ] && grep -q "no rank 0 at 127.0.0.1:$port" "$T/out"; then ok lonely_rank_times_out
else not_ok lonely_rank_times_out "status $st: $(head -c 300 "$T/out")"; fi
