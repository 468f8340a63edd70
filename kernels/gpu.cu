/* gpu: device queries, a vectorised copy kernel, and the bandwidth ceiling it measures. */
#include "gpu.h"

#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CUDA_TRY(call, e)                                                                    \
    do {                                                                                     \
        cudaError_t err_ = (call);                                                           \
        if (err_ != cudaSuccess)                                                             \
            return err_set((e), "%s:%d: %s: %s", __FILE__, __LINE__, #call,                  \
                           cudaGetErrorString(err_));                                        \
    } while (0)

extern "C" int gpu_compiled(void)
{
    return 1;
}

extern "C" int gpu_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); /* no driver or no device: clear the sticky error, report none */
        return 0;
    }
    return n;
}

extern "C" int gpu_describe(int dev, gpu_props *p, dsv3_err *e)
{
    cudaDeviceProp d;
    CUDA_TRY(cudaGetDeviceProperties(&d, dev), e);
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "%s", d.name);
    p->major = d.major;
    p->minor = d.minor;
    p->sm_count = d.multiProcessorCount;
    p->global_mem = d.totalGlobalMem;
    p->l2_bytes = (size_t)d.l2CacheSize;
    int clock_khz = 0, bus_bits = 0;
    cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, dev);
    cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, dev);
    /* Double data rate: two transfers per clock. */
    p->peak_bw_gbs = 2.0 * clock_khz * 1e3 * (bus_bits / 8) / 1e9;
    return 0;
}

/* 16-byte loads and stores, grid-stride: the shape every memory-bound kernel should have. */
__global__ void copy_f4_kernel(float4 *__restrict__ dst, const float4 *__restrict__ src,
                               size_t n4)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n4;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = src[i];
}

__global__ void copy_tail_kernel(float *__restrict__ dst, const float *__restrict__ src,
                                 size_t from, size_t n)
{
    size_t i = from + blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n)
        dst[i] = src[i];
}

static int launch_copy(float *dst, const float *src, size_t n, int sm_count, dsv3_err *e)
{
    size_t n4 = n / 4;
    if (n4) {
        int blocks = sm_count * 8;
        copy_f4_kernel<<<blocks, 256>>>((float4 *)dst, (const float4 *)src, n4);
        CUDA_TRY(cudaGetLastError(), e);
    }
    if (n % 4) {
        copy_tail_kernel<<<1, 32>>>(dst, src, n4 * 4, n);
        CUDA_TRY(cudaGetLastError(), e);
    }
    return 0;
}

extern "C" int gpu_copy_roundtrip(int dev, const float *in, float *out, size_t n, dsv3_err *e)
{
    CUDA_TRY(cudaSetDevice(dev), e);
    int sms = 0;
    CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), e);
    float *a = NULL, *b = NULL;
    size_t bytes = n * sizeof(float);
    int rc = 0;
    if (cudaMalloc(&a, bytes ? bytes : 4) != cudaSuccess ||
        cudaMalloc(&b, bytes ? bytes : 4) != cudaSuccess)
        rc = err_set(e, "gpu: cannot allocate 2 x %zu bytes", bytes);
    /* Poison the destination so an element the kernel skips cannot pass as copied. */
    if (rc == 0 && cudaMemset(b, 0xff, bytes) != cudaSuccess)
        rc = err_set(e, "gpu: cudaMemset failed");
    if (rc == 0 && cudaMemcpy(a, in, bytes, cudaMemcpyHostToDevice) != cudaSuccess)
        rc = err_set(e, "gpu: copy to device failed");
    if (rc == 0)
        rc = launch_copy(b, a, n, sms, e);
    if (rc == 0 && cudaMemcpy(out, b, bytes, cudaMemcpyDeviceToHost) != cudaSuccess)
        rc = err_set(e, "gpu: copy to host failed: %s", cudaGetErrorString(cudaGetLastError()));
    cudaFree(a);
    cudaFree(b);
    return rc;
}

static int cmp_float(const void *x, const void *y)
{
    float a = *(const float *)x, b = *(const float *)y;
    return (a > b) - (a < b);
}

extern "C" int gpu_copy_bandwidth(int dev, size_t bytes, int iters, double *gbs, dsv3_err *e)
{
    CUDA_TRY(cudaSetDevice(dev), e);
    int sms = 0;
    CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), e);
    size_t n = bytes / sizeof(float);
    float *a = NULL, *b = NULL;
    CUDA_TRY(cudaMalloc(&a, n * sizeof(float)), e);
    if (cudaMalloc(&b, n * sizeof(float)) != cudaSuccess) {
        cudaFree(a);
        return err_set(e, "gpu: cannot allocate %zu bytes", bytes);
    }
    /* Non-zero data: zeros can run faster than real data on this hardware. */
    cudaMemset(a, 0x3c, n * sizeof(float));
    cudaEvent_t t0, t1;
    cudaEventCreate(&t0);
    cudaEventCreate(&t1);
    float *ms = (float *)malloc(sizeof(float) * (size_t)iters);
    int rc = 0;
    for (int i = -3; i < iters && rc == 0; i++) {   /* three untimed warm-up runs */
        cudaEventRecord(t0);
        rc = launch_copy(b, a, n, sms, e);
        cudaEventRecord(t1);
        cudaEventSynchronize(t1);
        if (i >= 0)
            cudaEventElapsedTime(&ms[i], t0, t1);
    }
    if (rc == 0) {
        qsort(ms, (size_t)iters, sizeof *ms, cmp_float);
        double med = ms[iters / 2];
        *gbs = 2.0 * (double)(n * sizeof(float)) / (med * 1e-3) / 1e9;
    }
    free(ms);
    cudaEventDestroy(t0);
    cudaEventDestroy(t1);
    cudaFree(a);
    cudaFree(b);
    return rc;
}
