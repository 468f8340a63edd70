/* cuda_util: what every .cu file of kernels/ shares (C++ only, never included from C).
 *
 * Error checks that turn a failed CUDA or cuBLAS call, or a failed launch, into a dsv3_err
 * message naming the file, line and call; bf16 <-> float helpers; warp and block sums. */
#ifndef DSV3_CUDA_UTIL_CUH
#define DSV3_CUDA_UTIL_CUH

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "../lib/err.h"

#define CUDA_TRY(call, e)                                                                    \
    do {                                                                                     \
        cudaError_t err_ = (call);                                                           \
        if (err_ != cudaSuccess)                                                             \
            return err_set((e), "%s:%d: %s: %s", __FILE__, __LINE__, #call,                  \
                           cudaGetErrorString(err_));                                        \
    } while (0)

/* After every launch: a bad configuration shows at once; a fault inside the kernel shows
 * at the next synchronising call, which is checked too. */
#define LAUNCH_CHECK(name, e)                                                                \
    do {                                                                                     \
        cudaError_t err_ = cudaGetLastError();                                               \
        if (err_ != cudaSuccess)                                                             \
            return err_set((e), "%s:%d: launch of %s: %s", __FILE__, __LINE__, name,         \
                           cudaGetErrorString(err_));                                        \
    } while (0)

#define CUBLAS_TRY(call, e)                                                                  \
    do {                                                                                     \
        int st_ = (int)(call);                                                               \
        if (st_ != 0)                                                                        \
            return err_set((e), "%s:%d: %s: cuBLAS status %d", __FILE__, __LINE__, #call,    \
                           st_);                                                             \
    } while (0)

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float b2f(bf16 x)
{
    return __bfloat162float(x);
}

__device__ __forceinline__ bf16 f2b(float x)
{
    return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
 * The order of additions is fixed, so the result is the same on every run. */
__device__ __forceinline__ float block_sum(float v, float *scratch /* [32] shared */)
{
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0)
        scratch[w] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float *scratch /* [32] shared */)
{
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0)
        scratch[w] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

/* Eight bf16 values through one 16-byte access (the pointer 16-byte aligned). */
__device__ __forceinline__ void load8(const bf16 *p, float (&f)[8])
{
    uint4 u = *(const uint4 *)p;
    const __nv_bfloat162 *h = (const __nv_bfloat162 *)&u;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 t = __bfloat1622float2(h[i]);
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
}

__device__ __forceinline__ void store8(bf16 *p, const float (&f)[8])
{
    uint4 u;
    __nv_bfloat162 *h = (__nv_bfloat162 *)&u;
#pragma unroll
    for (int i = 0; i < 4; i++)
        h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    *(uint4 *)p = u;
}

static inline int aligned16(const void *p)
{
    return ((uintptr_t)p & 15) == 0;
}

static inline unsigned grid_for(long long n, int threads, long long cap = 65535LL * 8)
{
    long long g = (n + threads - 1) / threads;
    if (g < 1)
        g = 1;
    return (unsigned)(g > cap ? cap : g);
}

#endif
