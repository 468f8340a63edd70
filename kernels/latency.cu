/* latency: the hand-over probes of kernels/latency.h. */
#include <stdlib.h>

#include "cuda_util.cuh"
#include "latency.h"

#define LT_THREADS 256
#define LT_VEC 1024 /* a decode step's vector: hidden size 1024 floats */
#define LT_REPS 15

__device__ __forceinline__ void lt_wait()
{
    asm volatile("griddepcontrol.wait;" ::: "memory"); /* no-op without PDL */
}

__device__ __forceinline__ void lt_release()
{
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

/* One value passed on: the smallest dependent step. */
__global__ void lt_one_k(const float *in, float *out)
{
    lt_wait();
    lt_release();
    if (threadIdx.x == 0)
        out[0] = in[0] * 0.5f + 1.0f;
}

/* Block b reads the whole vector (L2 loads: other blocks wrote it), sums it, and writes the
 * elements i with i % gridDim.x == b: every block depends on every block before, through one
 * round trip to L2 (what a GEMV whose weights are already on chip still waits for). */
__device__ __forceinline__ void lt_wide_body(const float *in, float *out, float *red)
{
    float s = 0;
    for (int i = threadIdx.x; i < LT_VEC; i += blockDim.x)
        s += __ldcg(in + i);
    for (int o = 16; o > 0; o >>= 1)
        s += __shfl_xor_sync(0xffffffffu, s, o);
    if ((threadIdx.x & 31) == 0)
        red[threadIdx.x >> 5] = s;
    __syncthreads();
    s = 0;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++)
        s += red[w];
    for (int i = blockIdx.x + gridDim.x * threadIdx.x; i < LT_VEC; i += gridDim.x * blockDim.x)
        out[i] = s * 1e-6f + (float)i;
    __syncthreads(); /* red reused by the next phase */
}

__global__ void __launch_bounds__(LT_THREADS) lt_wide_k(const float *in, float *out)
{
    __shared__ float red[LT_THREADS / 32];
    lt_wait();
    lt_release();
    lt_wide_body(in, out, red);
}

/* n phases of the wide step in one launch, the grid handing over through a growing counter
 * (one atomic a block a phase; the blocks must all be resident: one a SM). */
__global__ void __launch_bounds__(LT_THREADS) lt_phases_k(float *a, float *b, unsigned *count,
                                                          int n)
{
    __shared__ float red[LT_THREADS / 32];
    for (int p = 0; p < n; p++) {
        lt_wide_body(p & 1 ? b : a, p & 1 ? a : b, red);
        if (threadIdx.x == 0) {
            __threadfence();
            atomicAdd(count, 1u);
            const unsigned want = (unsigned)(p + 1) * gridDim.x;
            unsigned c;
            do
                asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(c) : "l"(count));
            while (c < want);
        }
        __syncthreads();
    }
}

static int cmp_double(const void *x, const void *y)
{
    double a = *(const double *)x, b = *(const double *)y;
    return a < b ? -1 : a > b;
}

/* Captures n launches of k (grid x threads; step i reads buffer i%2, writes the other) into a
 * graph, with or without PDL, and returns the median over replays of its time / n, in us. */
static int time_chain(void (*k)(const float *, float *), int grid, int threads, int pdl, int n,
                      float *a, float *b, cudaStream_t s, double *us, dsv3_err *e)
{
    cudaGraph_t gr = NULL;
    cudaGraphExec_t ex = NULL;
    cudaEvent_t t0 = NULL, t1 = NULL;
    double t[LT_REPS];
    int rc = -1;
    CUDA_TRY(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), e);
    for (int i = 0; i < n; i++) {
        cudaLaunchConfig_t cfg = {};
        cudaLaunchAttribute at[1];
        cfg.gridDim = dim3(grid);
        cfg.blockDim = dim3(threads);
        cfg.stream = s;
        at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        at[0].val.programmaticStreamSerializationAllowed = 1;
        cfg.attrs = at;
        cfg.numAttrs = pdl ? 1 : 0;
        cudaLaunchKernelEx(&cfg, k, (const float *)(i & 1 ? b : a), i & 1 ? a : b);
    }
    if (cudaStreamEndCapture(s, &gr) != cudaSuccess || cudaGetLastError() != cudaSuccess ||
        cudaGraphInstantiate(&ex, gr, 0) != cudaSuccess) {
        err_set(e, "latency: could not capture or instantiate a chain of %d launches", n);
        goto out;
    }
    if (cudaEventCreate(&t0) != cudaSuccess || cudaEventCreate(&t1) != cudaSuccess)
        goto fail;
    for (int r = 0; r < 3; r++)
        if (cudaGraphLaunch(ex, s) != cudaSuccess)
            goto fail;
    for (int r = 0; r < LT_REPS; r++) {
        float ms = 0;
        if (cudaEventRecord(t0, s) != cudaSuccess || cudaGraphLaunch(ex, s) != cudaSuccess ||
            cudaEventRecord(t1, s) != cudaSuccess || cudaEventSynchronize(t1) != cudaSuccess ||
            cudaEventElapsedTime(&ms, t0, t1) != cudaSuccess)
            goto fail;
        t[r] = ms * 1e3 / n;
    }
    qsort(t, LT_REPS, sizeof t[0], cmp_double);
    *us = t[LT_REPS / 2];
    rc = 0;
    goto out;
fail:
    err_set(e, "latency: replaying a chain of %d launches failed: %s", n,
            cudaGetErrorString(cudaGetLastError()));
out:
    if (t0)
        cudaEventDestroy(t0);
    if (t1)
        cudaEventDestroy(t1);
    if (ex)
        cudaGraphExecDestroy(ex);
    if (gr)
        cudaGraphDestroy(gr);
    return rc;
}

static int time_phases(int sms, int n, float *a, float *b, unsigned *count, cudaStream_t s,
                       double *us, dsv3_err *e)
{
    cudaEvent_t t0 = NULL, t1 = NULL;
    double t[LT_REPS];
    int rc = -1;
    if (cudaEventCreate(&t0) != cudaSuccess || cudaEventCreate(&t1) != cudaSuccess)
        goto fail;
    for (int r = -2; r < LT_REPS; r++) {
        float ms = 0;
        if (cudaMemsetAsync(count, 0, sizeof *count, s) != cudaSuccess ||
            cudaEventRecord(t0, s) != cudaSuccess)
            goto fail;
        lt_phases_k<<<sms, LT_THREADS, 0, s>>>(a, b, count, n);
        if (cudaGetLastError() != cudaSuccess || cudaEventRecord(t1, s) != cudaSuccess ||
            cudaEventSynchronize(t1) != cudaSuccess ||
            cudaEventElapsedTime(&ms, t0, t1) != cudaSuccess)
            goto fail;
        if (r >= 0)
            t[r] = ms * 1e3 / n;
    }
    qsort(t, LT_REPS, sizeof t[0], cmp_double);
    *us = t[LT_REPS / 2];
    rc = 0;
    goto out;
fail:
    err_set(e, "latency: the persistent probe failed: %s", cudaGetErrorString(cudaGetLastError()));
out:
    if (t0)
        cudaEventDestroy(t0);
    if (t1)
        cudaEventDestroy(t1);
    return rc;
}

extern "C" int gk_latency_probe(int n, gk_latency *out, dsv3_err *e)
{
    int dev = 0, sms = 0, rc = -1;
    float *a = NULL, *b = NULL;
    unsigned *count = NULL;
    cudaStream_t s = NULL;
    if (n < 1)
        return err_set(e, "latency: a chain of %d steps", n);
    CUDA_TRY(cudaGetDevice(&dev), e);
    CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), e);
    out->sms = sms;
    if (cudaMalloc(&a, LT_VEC * sizeof(float)) != cudaSuccess ||
        cudaMalloc(&b, LT_VEC * sizeof(float)) != cudaSuccess ||
        cudaMalloc(&count, sizeof *count) != cudaSuccess ||
        cudaMemset(a, 0, LT_VEC * sizeof(float)) != cudaSuccess ||
        cudaMemset(b, 0, LT_VEC * sizeof(float)) != cudaSuccess ||
        cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) != cudaSuccess) {
        err_set(e, "latency: could not allocate the probe buffers");
        goto out;
    }
    if (time_chain(lt_one_k, 1, 32, 0, n, a, b, s, &out->one_plain, e) ||
        time_chain(lt_one_k, 1, 32, 1, n, a, b, s, &out->one_pdl, e) ||
        time_chain(lt_wide_k, sms, LT_THREADS, 0, n, a, b, s, &out->wide_plain, e) ||
        time_chain(lt_wide_k, sms, LT_THREADS, 1, n, a, b, s, &out->wide_pdl, e) ||
        time_phases(sms, n, a, b, count, s, &out->phases, e))
        goto out;
    rc = 0;
out:
    if (s)
        cudaStreamDestroy(s);
    cudaFree(a);
    cudaFree(b);
    cudaFree(count);
    return rc;
}
