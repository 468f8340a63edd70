#!/bin/sh
# dsv3-train on N nodes x 8 GPUs with Open MPI: one rank per GPU, the ranks of a node
# filled in turn from a hostfile; lib/comm joins them through MPI (docs/DISTRIBUTED.md).
#
#   scripts/mpirun-train.sh HOSTFILE RANKS -c CONFIG -d DATA -o RUN --steps N [OPTION]...
#
# HOSTFILE holds one line per node, "node07 slots=8"; RANKS is nodes x 8 (at most the
# slots). The remaining arguments are dsv3-train's. SIGUSR1 to mpirun (this script's
# process: Open MPI forwards it to every rank) or SIGTERM to any one rank: the job writes a
# checkpoint after the current update and exits 0; run again with --resume. (SIGTERM to
# mpirun itself makes Open MPI end the ranks, SIGKILL following shortly.)
#
# Environment: DSV3_TRAIN (the program, default dsv3-train on PATH), DSV3_DEVICE (cpu until
# the CUDA backend is built; then cuda), MPIRUN_ARGS (more mpirun options, e.g.
# "--mca btl_tcp_if_include ib0"). NCCL_NVLS_ENABLE is passed on when set (NVLink
# multicast: left to the site; 0 on shared or lent machines).
set -eu
if [ $# -lt 2 ]; then
    echo "usage: $0 HOSTFILE RANKS DSV3-TRAIN-ARGUMENTS..." >&2
    exit 2
fi
hostfile=$1 ranks=$2
shift 2
[ -r "$hostfile" ] || { echo "$0: $hostfile: cannot read the hostfile" >&2; exit 1; }
case $ranks in ''|*[!0-9]*) echo "$0: RANKS '$ranks' is not a number" >&2; exit 2 ;; esac
pass="-x PATH -x LD_LIBRARY_PATH"
[ -n "${NCCL_NVLS_ENABLE:-}" ] && pass="$pass -x NCCL_NVLS_ENABLE"
[ -n "${DSV3_COMM_MPI:-}" ] && pass="$pass -x DSV3_COMM_MPI"
# shellcheck disable=SC2086 # the option lists split into words on purpose
exec mpirun -np "$ranks" --hostfile "$hostfile" --map-by slot $pass ${MPIRUN_ARGS:-} \
    "${DSV3_TRAIN:-dsv3-train}" --device "${DSV3_DEVICE:-cpu}" "$@"
