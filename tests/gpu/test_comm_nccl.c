/* lib/comm's NCCL backend on device memory: the collective checks of tests/comm_check.h.
 * Alone it runs a one-rank communicator on GPU 0; started as several processes with
 * RANK/WORLD_SIZE/LOCAL_RANK/MASTER_PORT (scripts/gpu-check.sh does so when the machine
 * has two or more GPUs) each rank takes GPU LOCAL_RANK and checks the whole job. Skipped
 * without a GPU or without NCCL. */
#include "../../kernels/gpu.h"
#include "../../lib/comm.h"
#include "../comm_check.h"
#include "../test.h"

#ifdef DSV3_HAVE_CUDA
#include <cuda_runtime.h>

static void *dev_alloc(size_t n)
{
    void *p = NULL;
    return cudaMalloc(&p, n) == cudaSuccess ? p : NULL;
}
static void dev_free(void *p) { cudaFree(p); }
static void dev_up(void *d, const void *h, size_t n) { cudaMemcpy(d, h, n, cudaMemcpyHostToDevice); }
static void dev_down(void *h, const void *d, size_t n) { cudaMemcpy(h, d, n, cudaMemcpyDeviceToHost); }
static void dev_sync(void) { cudaDeviceSynchronize(); }
static const comm_mem DEV = {dev_alloc, dev_free, dev_up, dev_down, dev_sync};

static void nccl_collectives(void)
{
    if (gpu_count() == 0)
        SKIP("no GPU");
    comm_launch l;
    dsv3_err e;
    REQUIRE(comm_detect_launch(&l, &e) == 0);
    REQUIRE(cudaSetDevice(l.local_rank % gpu_count()) == cudaSuccess);
    comm *c;
    if (comm_open(&c, COMM_GPU, &e) < 0) {
        if (strstr(e.msg, "NCCL not found"))
            SKIP("%.200s", e.msg);
        CHECKF(0, "%s", e.msg);
        return;
    }
    const char *s = getenv("COMM_TEST_SEED");
    char why[1100];
    int rc = comm_check_all(c, &DEV, s ? strtoull(s, NULL, 10) : test_rand(), why, sizeof why);
    cudaError_t ce = cudaGetLastError();
    CHECKF(rc == 0, "rank %d of %d: %s", comm_rank(c), comm_world(c), why);
    CHECKF(ce == cudaSuccess, "CUDA: %s", cudaGetErrorString(ce));
    printf("# nccl rank %d of %d (%s launch) passed every collective\n", comm_rank(c),
           comm_world(c), l.launcher);
    comm_close(c);
}
#else
static void nccl_collectives(void)
{
    SKIP("CPU-only build");
}
#endif

int main(void)
{
    test_seed();
    RUN(nccl_collectives);
    TEST_EXIT();
}
