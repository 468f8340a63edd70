/* bench_comm: bus bandwidth of lib/comm's collectives, figured as nccl-tests does
 * (all-reduce: size/time · 2(n-1)/n; reduce-scatter, all-gather, all-to-all: size/time ·
 * (n-1)/n, size being the whole buffer of one rank). GPU (NCCL) when the build has CUDA and
 * a GPU is present, else CPU. One process per rank: scripts/bench-comm.sh starts them.
 * Usage: bench_comm [MiB] [iters]. Rank 0 prints one line per collective. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../../kernels/gpu.h"
#include "../../lib/comm.h"

#ifdef DSV3_HAVE_CUDA
#include <cuda_runtime.h>
#endif

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int on_gpu;

static void *buf_alloc(size_t n)
{
#ifdef DSV3_HAVE_CUDA
    if (on_gpu) {
        void *p = NULL;
        if (cudaMalloc(&p, n) != cudaSuccess)
            return NULL;
        cudaMemset(p, 0, n);   /* contents do not change the time of a sum */
        return p;
    }
#endif
    return calloc(1, n);
}

static void wait_all(void)
{
#ifdef DSV3_HAVE_CUDA
    if (on_gpu)
        cudaDeviceSynchronize();
#endif
}

int main(int argc, char **argv)
{
    size_t mib = argc > 1 ? strtoull(argv[1], NULL, 10) : 256;
    int iters = argc > 2 ? atoi(argv[2]) : 20;
    comm_launch l;
    dsv3_err e;
    if (comm_detect_launch(&l, &e) < 0)
        return fprintf(stderr, "bench_comm: %s\n", e.msg), 1;
    on_gpu = gpu_count() > 0;
#ifdef DSV3_HAVE_CUDA
    if (on_gpu && cudaSetDevice(l.local_rank % gpu_count()) != cudaSuccess)
        return fprintf(stderr, "bench_comm: cannot select GPU %d\n", l.local_rank), 1;
#endif
    comm *c;
    if (comm_open(&c, on_gpu ? COMM_GPU : COMM_CPU, &e) < 0)
        return fprintf(stderr, "bench_comm: %s\n", e.msg), 1;
    int n = comm_world(c);
    size_t bytes = mib << 20, count = bytes / 4 / (size_t)n * (size_t)n, per = count / (size_t)n;
    float *a = buf_alloc(count * 4), *b = buf_alloc(count * 4);
    size_t *cnt = malloc(4 * (size_t)n * sizeof *cnt);
    if (!a || !b || !cnt)
        return fprintf(stderr, "bench_comm: out of memory\n"), 1;
    for (int p = 0; p < n; p++)
        cnt[p] = cnt[2 * n + p] = per, cnt[n + p] = cnt[3 * n + p] = (size_t)p * per;
    const char *names[] = {"allreduce", "reduce_scatter", "allgather", "alltoall"};
    double factor[] = {2.0 * (n - 1) / n, (double)(n - 1) / n, (double)(n - 1) / n,
                       (double)(n - 1) / n};
    if (comm_rank(c) == 0)
        printf("# %s, %d ranks, %zu MiB per rank, %d iterations (median)\n",
               comm_backend_name(c), n, mib, iters);
    for (int k = 0; k < 4; k++) {
        double *t = malloc((size_t)iters * sizeof *t);
        for (int it = -3; it < iters; it++) {   /* three warm-ups */
            comm_barrier(c, NULL);
            wait_all();
            double t0 = now_s();
            int rc = k == 0   ? comm_allreduce(c, a, count, COMM_F32, COMM_SUM, &e)
                     : k == 1 ? comm_reduce_scatter(c, a, b, per, COMM_F32, COMM_SUM, &e)
                     : k == 2 ? comm_allgather(c, a, b, per, COMM_F32, &e)
                              : comm_alltoallv(c, a, cnt, cnt + n, b, cnt + 2 * n,
                                               cnt + 3 * n, COMM_F32, &e);
            wait_all();
            if (rc < 0)
                return fprintf(stderr, "bench_comm: %s\n", e.msg), 1;
            if (it >= 0)
                t[it] = now_s() - t0;
        }
        for (int i = 1; i < iters; i++)   /* insertion sort for the median */
            for (int j = i; j > 0 && t[j] < t[j - 1]; j--) {
                double x = t[j];
                t[j] = t[j - 1], t[j - 1] = x;
            }
        double med = t[iters / 2], algbw = (double)count * 4 / med / 1e9;
        if (comm_rank(c) == 0)
            printf("%-15s %8.3f ms  algbw %7.1f GB/s  busbw %7.1f GB/s\n", names[k], med * 1e3,
                   algbw, algbw * factor[k]);
        free(t);
    }
    comm_close(c);
    return 0;
}
