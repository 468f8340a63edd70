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

/* 16-byte versions: cols % 8 == 0, ld % 8 == 0, aligned pointers; 8 elements a thread. */
__global__ void swiglu_fwd_vec_kernel(bf16 *h, const bf16 *g, const bf16 *u, int rows, int cols,
                                      int ld)
{
    int64_t total = (int64_t)rows * cols / 8;
    for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        int64_t e = t * 8, r = e / cols, j = e % cols, s = r * ld + j;
        float gv[8], uv[8];
        load8(g + s, gv);
        load8(u + s, uv);
#pragma unroll
        for (int i = 0; i < 8; i++)
            gv[i] = gv[i] * sigmoid_f(gv[i]) * uv[i];
        store8(h + e, gv);
    }
}

__global__ void swiglu_bwd_vec_kernel(bf16 *d_g, bf16 *d_u, const bf16 *d_h, const bf16 *g,
                                      const bf16 *u, int rows, int cols, int ld)
{
    int64_t total = (int64_t)rows * cols / 8;
    for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        int64_t e = t * 8, r = e / cols, j = e % cols, s = r * ld + j;
        float gv[8], uv[8], dh[8], dg[8], du[8];
        load8(g + s, gv);
        load8(u + s, uv);
        load8(d_h + e, dh);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            float sg = sigmoid_f(gv[i]);
            dg[i] = dh[i] * uv[i] * sg * (1.0f + gv[i] * (1.0f - sg));
            du[i] = dh[i] * gv[i] * sg;
        }
        store8(d_g + s, dg);
        store8(d_u + s, du);
    }
}

static int vec_ok(int cols, int ld, const void *a, const void *b, const void *c, const void *d)
{
    return cols % 8 == 0 && ld % 8 == 0 && aligned16(a) && aligned16(b) && aligned16(c) &&
           (!d || aligned16(d));
}

extern "C" int gpu_swiglu_fwd(gpu_ctx *c, gpu_bf16 *h, const gpu_bf16 *g, const gpu_bf16 *u,
                              int rows, int cols, int ld, dsv3_err *e)
{
    if (rows <= 0 || cols <= 0)
        return 0;
    if (vec_ok(cols, ld, h, g, u, NULL))
        swiglu_fwd_vec_kernel<<<grid_for((int64_t)rows * cols / 8, 256), 256, 0, c->stream>>>(
            (bf16 *)h, (const bf16 *)g, (const bf16 *)u, rows, cols, ld);
    else
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
    if (vec_ok(cols, ld, d_g, d_u, d_h, g) && aligned16(u))
        swiglu_bwd_vec_kernel<<<grid_for((int64_t)rows * cols / 8, 256), 256, 0, c->stream>>>(
            (bf16 *)d_g, (bf16 *)d_u, (const bf16 *)d_h, (const bf16 *)g, (const bf16 *)u, rows,
            cols, ld);
    else
        swiglu_bwd_kernel<<<grid_for((int64_t)rows * cols, 256), 256, 0, c->stream>>>(
            (bf16 *)d_g, (bf16 *)d_u, (const bf16 *)d_h, (const bf16 *)g, (const bf16 *)u, rows,
            cols, ld);
    LAUNCH_CHECK("swiglu_bwd", e);
    return 0;
}
