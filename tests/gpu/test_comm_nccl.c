/* lib/comm's NCCL backend on device memory: the collective checks of tests/comm_check.h,
 * and lib/ep's pieces on device buffers (ep_dev_scatter_experts / ep_dev_gather_experts,
 * the device optimizer under --ep) for every --ep size N dividing the world (N 1: every
 * rank a replica of one group) against sums written here, bit for bit.
 * Alone it runs a one-rank communicator on GPU 0; started as several processes with
 * RANK/WORLD_SIZE/LOCAL_RANK/MASTER_PORT (scripts/gpu-check.sh does so when the machine
 * has two or more GPUs) each rank takes GPU LOCAL_RANK and checks the whole job. Skipped
 * without a GPU or without NCCL. */
#include "../../kernels/gpu.h"
#include "../../lib/comm.h"
#include "../../lib/ep.h"
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

/* Rank r's j-th value of a test array: any rank can compute any rank's. */
static float val(uint64_t seed, int r, size_t j)
{
    uint64_t x = seed ^ ((uint64_t)r << 40) ^ (j * 0x9E3779B97F4A7C15ull);
    x ^= x >> 31, x *= 0xBF58476D1CE4E5B9ull, x ^= x >> 29;
    return (float)((double)(x >> 11) * 0x1p-53 * 2.0 - 1.0);
}

/* ep_dev_*: the replicas' sum of the pieces (in replica order) and their all-gather. */
static int ep_dev_check(comm *c, uint64_t seed, char *why, size_t nwhy)
{
    int W = comm_world(c), me = comm_rank(c), bad = 0;
    const size_t n = 5003;  /* pieces of unequal length */
    float *h = malloc(n * 4), *want = malloc(n * 4), *got = malloc(n * 4);
    float *g = dev_alloc(n * 4), *x = dev_alloc(n * 4), *out = dev_alloc(n * 4);
    float *tmp = dev_alloc((size_t)W * n * 4);
    for (int N = 1; N <= W && !bad; N++) {
        if (W % N)
            continue;
        ep p;
        dsv3_err e;
        if (ep_open(&p, c, N, N, &e)) {
            snprintf(why, nwhy, "ep_open: %s", e.msg);
            bad = 1;
            break;
        }
        for (size_t j = 0; j < n; j++)
            h[j] = val(seed, me, j);
        dev_up(g, h, n * 4);
        size_t lo, hi;
        ep_piece(&p, n, me / N, &lo, &hi);
        if (ep_dev_scatter_experts(&p, c, g, n, out, tmp, NULL, &e)) {
            snprintf(why, nwhy, "ep_dev_scatter_experts: %s", e.msg);
            bad = 1;
        }
        dev_sync();
        dev_down(got, out, (hi - lo) * 4);
        for (size_t j = lo; j < hi && !bad; j++) {
            float sum = val(seed, p.group, j);
            for (int i = 1; i < p.replicas; i++)
                sum += val(seed, p.group + i * N, j);
            if (memcmp(&sum, &got[j - lo], 4)) {
                snprintf(why, nwhy, "--ep %d: rank %d's summed piece differs at %zu: %g, "
                         "not %g", N, me, j, got[j - lo], sum);
                bad = 1;
            }
        }
        /* the gather: every replica's piece of its own values into x, F32 then BF16 */
        for (int ty = 0; ty < 2 && !bad; ty++) {
            size_t es = ty ? 2 : 4;
            for (size_t j = 0; j < n; j++)
                h[j] = val(seed + 1, me, j);
            /* BF16: the first 2n bytes of the floats taken as n elements */
            dev_up(out, (const char *)h + lo * es, (hi - lo) * es);
            memset(want, 0xff, n * 4);  /* poison: every element must be written */
            dev_up(x, want, n * es);
            if (ep_dev_gather_experts(&p, c, out, x, n, ty ? COMM_BF16 : COMM_F32, NULL, &e)) {
                snprintf(why, nwhy, "ep_dev_gather_experts: %s", e.msg);
                bad = 1;
                break;
            }
            dev_sync();
            dev_down(got, x, n * es);
            for (int i = 0; i < p.replicas && !bad; i++) {
                size_t a, b;
                ep_piece(&p, n, i, &a, &b);
                for (size_t j = 0; j < n; j++)
                    want[j] = val(seed + 1, p.group + i * N, j);
                if (memcmp((char *)got + a * es, (char *)want + a * es, (b - a) * es)) {
                    snprintf(why, nwhy, "--ep %d: rank %d's gathered %s piece %d differs", N,
                             me, ty ? "BF16" : "F32", i);
                    bad = 1;
                }
            }
        }
        ep_free(&p);
    }
    free(h), free(want), free(got);
    dev_free(g), dev_free(x), dev_free(out), dev_free(tmp);
    return bad ? -1 : 0;
}

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
    rc = ep_dev_check(c, s ? strtoull(s, NULL, 10) : 7, why, sizeof why);
    CHECKF(rc == 0, "rank %d of %d: %s", comm_rank(c), comm_world(c), why);
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
