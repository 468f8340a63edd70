# Sourced by the expert-parallel CLI tests (test_dsv3_train_ep.sh, _epresume.sh) after lib.sh,
# with EP_TEST naming the test for its skip line: the CPU backend (EP runs on the CPU in
# these tests), mpirun with the project's MPI plugin (skips without them), one OpenMP thread
# a rank (results do not depend on it; the ranks share the cores), and the shared data in
# $T/data. A fixed data seed (DSV3_TEST_SEED overrides it): the learning-rate comparisons
# agree to ~3e-5 after 3 steps, but about one random draw in eight puts a token at a router
# near tie, where the ranks' reassociated sums pick another expert than one process does.
export DSV3_DEVICE=cpu
BUILD_DIR=$(cd "$DSV3_BIN/.." && pwd)
CFG=$(cd "$(dirname "$0")/../.." && pwd)/configs/tiny.json
if ! command -v mpirun >/dev/null || [ ! -f "$BUILD_DIR/lib/dsv3/comm-mpi.so" ]; then
    echo "skip $EP_TEST: no mpirun or no comm-mpi.so (install libopenmpi-dev openmpi-bin)"
    exit 0
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,vader,tcp
export OMP_NUM_THREADS=1
mpi() { mpirun --oversubscribe -np "$@"; }
SEED=${DSV3_TEST_SEED:-20261127}
echo "# data seed $SEED"
awk -v seed="$SEED" 'BEGIN { srand(seed); for (i = 0; i < 300; i++) { n = 5 + int(rand() * 40);
     s = ""; for (j = 0; j < n; j++) s = s (j ? " " : "") int(rand() * 500); print s } }' >"$T/ids.txt"
dsv3-shard make --vocab-size 512 -o "$T/a.shard" "$T/ids.txt"
dsv3-pack --quiet -o "$T/data" --eos-id 1 -L 32 --val 0.1 -s 1 "$T/a.shard"
