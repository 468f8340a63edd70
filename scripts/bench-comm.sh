#!/bin/sh
# Bus bandwidth of lib/comm's collectives (tests/bench/bench_comm.c), one process per GPU
# (NCCL), or per rank on the CPU (TCP) when there is no GPU, and in the same run PyTorch's
# NCCL all-reduce of the same size as the peer figure. Usage: scripts/bench-comm.sh [RANKS]
# [MiB]. For docs/PERF.md.
set -eu
BUILD=${BUILD:-build}
export NCCL_NVLS_ENABLE=0   # NVLink multicast stays off on shared machines
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
n=${1:-$([ "$ngpu" -ge 2 ] && echo "$ngpu" || echo 2)}
mib=${2:-256}
[ -x "$BUILD/tests/bench/bench_comm" ] || make --no-print-directory "$BUILD/tests/bench/bench_comm" >/dev/null
echo "# $(date -u +%F) $(hostname) commit $(git rev-parse --short HEAD 2>/dev/null || echo ?)" \
     "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
port=$((29600 + $$ % 1000))
pids="" r=0
while [ $r -lt "$n" ]; do
    RANK=$r WORLD_SIZE=$n LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
        "$BUILD/tests/bench/bench_comm" "$mib" 20 &
    pids="$pids $!" r=$((r + 1))
done
for p in $pids; do wait "$p"; done
if [ "$ngpu" -ge 2 ] && python3 -c 'import torch' 2>/dev/null; then
    cat >/tmp/dsv3_torch_allreduce.py <<'PY'
import os, sys, time, torch, torch.distributed as dist
dist.init_process_group("nccl")
r, n = dist.get_rank(), dist.get_world_size()
torch.cuda.set_device(r)
x = torch.zeros(int(sys.argv[1]) * 2**20 // 4, device="cuda")
for _ in range(3): dist.all_reduce(x)
torch.cuda.synchronize()
ts = []
for _ in range(20):
    dist.barrier(); torch.cuda.synchronize(); t = time.perf_counter()
    dist.all_reduce(x); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
t = sorted(ts)[10]
if r == 0:
    a = x.numel() * 4 / t / 1e9
    print(f"torch allreduce {t*1e3:8.3f} ms  algbw {a:7.1f} GB/s  busbw {a*2*(n-1)/n:7.1f} GB/s (peer)")
dist.destroy_process_group()
PY
    python3 -m torch.distributed.run --nproc_per_node="$n" --master_port=$((port + 1)) \
        /tmp/dsv3_torch_allreduce.py "$mib" 2>&1 | grep -v -i warn
fi
