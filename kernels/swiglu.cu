/* swiglu: h = silu(g) * u elementwise, with row strides so g and u can be the halves of
 * one fused gate-up product. */
#include "gpuctx_internal.cuh"
#include "layers.h"

__device__ __forceinline__ float sigmoid_f(float x)
{
    return 1.0f / (1.0f + __expf(-x));
}

__global__ void swiglu_fwd_kernel(bf16 *h, const bf16 *g, const bf16 *u, int rows, int cols,
                                  int ld)
{
    int64_t total = (int64_t)rows * cols;
    for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = t / cols, j = t % cols, s = r * ld + j;
        float gv = b2f(g[s]);
        h[t] = f2b(gv * sigmoid_f(gv) * b2f(u[s]));
    }
}

/* silu'(g) = sig(g) * (1 + g * (1 - sig(g))). */
__global__ void swiglu_bwd_kernel(bf16 *d_g, bf16 *d_u, const bf16 *d_h, const bf16 *g,
                                  const bf16 *u, int rows, int cols, int ld)
{
    int64_t total = (int64_t)rows * cols;
    for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = t / cols, j = t % cols, s = r * ld + j;
        float gv = b2f(g[s]), uv = b2f(u[s]), dh = b2f(d_h[t]), sg = sigmoid_f(gv);
        d_g[s] = f2b(dh * uv * sg * (1.0f + gv * (1.0f - sg)));
        d_u[s] = f2b(dh * gv * sg);
    }
}

extern "C" int gpu_swiglu_fwd(gpu_ctx *c, gpu_bf16 *h, const gpu_bf16 *g, const gpu_bf16 *u,
                              int rows, int cols, int ld, dsv3_err *e)
{
    if (rows <= 0 || cols <= 0)
        return 0;
    swiglu_fwd_kernel<<<grid_for((int64_t)rows * cols, 256), 256, 0, c->stream>>>(
        (bf16 *)h, (const bf16 *)g, (const bf16 *)u, rows, cols, ld);
    LAUNCH_CHECK("swiglu_fwd", e);
    return 0;
}

extern "C" int gpu_swiglu_bwd(gpu_ctx *c, gpu_bf16 *d_g, gpu_bf16 *d_u, const gpu_bf16 *d_h,
                              const gpu_bf16 *g, const gpu_bf16 *u, int rows, int cols, int ld,
                              dsv3_err *e)
{
    if (rows <= 0 || cols <= 0)
        return 0;
    swiglu_bwd_kernel<<<grid_for((int64_t)rows * cols, 256), 256, 0, c->stream>>>(
        (bf16 *)d_g, (bf16 *)d_u, (const bf16 *)d_h, (const bf16 *)g, (const bf16 *)u, rows,
        cols, ld);
    LAUNCH_CHECK("swiglu_bwd", e);
    return 0;
}
