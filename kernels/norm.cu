/* norm: RMSNorm forward and backward, one block per row; the weight gradient is summed by
 * row-slab blocks into an arena scratch and then over slabs in a fixed order. */
#include "gpuctx_internal.cuh"
#include "layers.h"

#define NORM_THREADS 256

__global__ void rmsnorm_fwd_kernel(bf16 *out, float *rstd, const bf16 *in, const bf16 *w,
                                   int D, float eps)
{
    __shared__ float red[32];
    const bf16 *x = in + (int64_t)blockIdx.x * D;
    float ss = 0;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float v = b2f(x[i]);
        ss += v * v;
    }
    ss = block_sum(ss, red);
    float r = rsqrtf(ss / D + eps);
    if (rstd && threadIdx.x == 0)
        rstd[blockIdx.x] = r;
    bf16 *y = out + (int64_t)blockIdx.x * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x)
        y[i] = f2b(b2f(w[i]) * (b2f(x[i]) * r));
}

/* The same with 16-byte accesses, for D % 8 == 0 and aligned rows. */
__global__ void rmsnorm_fwd_vec_kernel(bf16 *out, float *rstd, const bf16 *in, const bf16 *w,
                                       int D, float eps)
{
    __shared__ float red[32];
    const bf16 *x = in + (int64_t)blockIdx.x * D;
    float ss = 0;
    for (int i = threadIdx.x * 8; i < D; i += blockDim.x * 8) {
        float v[8];
        load8(x + i, v);
#pragma unroll
        for (int j = 0; j < 8; j++)
            ss += v[j] * v[j];
    }
    ss = block_sum(ss, red);
    float r = rsqrtf(ss / D + eps);
    if (rstd && threadIdx.x == 0)
        rstd[blockIdx.x] = r;
    bf16 *y = out + (int64_t)blockIdx.x * D;
    for (int i = threadIdx.x * 8; i < D; i += blockDim.x * 8) {
        float v[8], g[8];
        load8(x + i, v);
        load8(w + i, g);
#pragma unroll
        for (int j = 0; j < 8; j++)
            v[j] = g[j] * (v[j] * r);
        store8(y + i, v);
    }
}

/* dx = r * (g - xhat * mean(g . xhat)), g = dy * w. Also this block's share of d_w. */
__global__ void rmsnorm_bwd_kernel(bf16 *d_in, float beta, float *dw_part, const bf16 *d_out,
                                   const bf16 *in, const bf16 *w, const float *rstd, int N,
                                   int D, float eps)
{
    __shared__ float red[32];
    extern __shared__ float acc[]; /* [D] this block's d_w partial */
    if (dw_part)
        for (int i = threadIdx.x; i < D; i += blockDim.x)
            acc[i] = 0;
    for (int n = blockIdx.x; n < N; n += gridDim.x) {
        const bf16 *x = in + (int64_t)n * D, *dy = d_out + (int64_t)n * D;
        float r;
        if (rstd) {
            r = rstd[n];
        } else {
            float ss = 0;
            for (int i = threadIdx.x; i < D; i += blockDim.x) {
                float v = b2f(x[i]);
                ss += v * v;
            }
            r = rsqrtf(block_sum(ss, red) / D + eps);
        }
        float dot = 0;
        for (int i = threadIdx.x; i < D; i += blockDim.x)
            dot += b2f(dy[i]) * b2f(w[i]) * b2f(x[i]) * r;
        float m = block_sum(dot, red) / D;
        for (int i = threadIdx.x; i < D; i += blockDim.x) {
            float xh = b2f(x[i]) * r, g = b2f(dy[i]);
            if (dw_part)
                acc[i] += g * xh;
            if (d_in) {
                float v = r * (g * b2f(w[i]) - xh * m);
                bf16 *dx = d_in + (int64_t)n * D + i;
                *dx = f2b(beta != 0.0f ? beta * b2f(*dx) + v : v);
            }
        }
    }
    if (dw_part)
        for (int i = threadIdx.x; i < D; i += blockDim.x)
            dw_part[(int64_t)blockIdx.x * D + i] = acc[i];
}

/* d_w[i] += sum over parts p of part[p][i], p ascending. */
__global__ void sum_parts_kernel(float *d_w, const float *part, int parts, int D)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= D)
        return;
    float s = 0;
    for (int p = 0; p < parts; p++)
        s += part[(int64_t)p * D + i];
    d_w[i] += s;
}

extern "C" int gpu_rmsnorm_fwd(gpu_ctx *c, gpu_bf16 *out, float *rstd, const gpu_bf16 *in,
                               const gpu_bf16 *w, int N, int D, float eps, dsv3_err *e)
{
    if (N <= 0)
        return 0;
    if (D % 8 == 0 && aligned16(out) && aligned16(in) && aligned16(w))
        rmsnorm_fwd_vec_kernel<<<N, NORM_THREADS, 0, c->stream>>>(
            (bf16 *)out, rstd, (const bf16 *)in, (const bf16 *)w, D, eps);
    else
        rmsnorm_fwd_kernel<<<N, NORM_THREADS, 0, c->stream>>>(
            (bf16 *)out, rstd, (const bf16 *)in, (const bf16 *)w, D, eps);
    LAUNCH_CHECK("rmsnorm_fwd", e);
    return 0;
}

extern "C" int gpu_rmsnorm_bwd(gpu_ctx *c, gpu_bf16 *d_in, float beta, float *d_w,
                               const gpu_bf16 *d_out, const gpu_bf16 *in, const gpu_bf16 *w,
                               const float *rstd, int N, int D, float eps, dsv3_err *e)
{
    if (N <= 0)
        return 0;
    size_t smem = d_w ? (size_t)D * sizeof(float) : 0;
    if (smem > 200 * 1024)
        return err_set(e, "rmsnorm_bwd: D=%d is larger than this kernel handles", D);
    int parts = N < 2 * c->sm_count ? N : 2 * c->sm_count;
    size_t mark = gpu_arena_mark(c);
    float *part = NULL;
    if (d_w && !(part = (float *)gpu_arena_alloc(c, (size_t)parts * D * sizeof(float), e)))
        return -1;
    if (smem > 48 * 1024)
        CUDA_TRY(cudaFuncSetAttribute(rmsnorm_bwd_kernel,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                 e);
    rmsnorm_bwd_kernel<<<parts, NORM_THREADS, smem, c->stream>>>(
        (bf16 *)d_in, beta, part, (const bf16 *)d_out, (const bf16 *)in, (const bf16 *)w, rstd,
        N, D, eps);
    LAUNCH_CHECK("rmsnorm_bwd", e);
    if (d_w) {
        sum_parts_kernel<<<(D + 255) / 256, 256, 0, c->stream>>>(d_w, part, parts, D);
        LAUNCH_CHECK("rmsnorm_bwd sum", e);
    }
    /* Later launches on the same stream run after these, so the scratch can be reused. */
    gpu_arena_reset(c, mark);
    return 0;
}
