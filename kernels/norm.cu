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

/* dx = r * (g - xhat * mean(g . xhat)), g = dy * w; one block per row. With rstd NULL the
 * row's rstd is recomputed and written to rstd_out for the weight-gradient kernel. */
template <bool VEC>
__global__ void rmsnorm_dx_kernel(bf16 *d_in, float beta, float *rstd_out, const bf16 *d_out,
                                  const bf16 *in, const bf16 *w, const float *rstd, int D,
                                  float eps)
{
    __shared__ float red[32];
    const int64_t n = blockIdx.x;
    const bf16 *x = in + n * D, *dy = d_out + n * D;
    const int step = VEC ? 8 : 1;
    float r;
    if (rstd) {
        r = rstd[n];
    } else {
        float ss = 0;
        for (int i = threadIdx.x * step; i < D; i += blockDim.x * step) {
            if (VEC) {
                float v[8];
                load8(x + i, v);
#pragma unroll
                for (int j = 0; j < 8; j++)
                    ss += v[j] * v[j];
            } else {
                float v = b2f(x[i]);
                ss += v * v;
            }
        }
        r = rsqrtf(block_sum(ss, red) / D + eps);
        if (rstd_out && threadIdx.x == 0)
            rstd_out[n] = r;
    }
    float dot = 0;
    for (int i = threadIdx.x * step; i < D; i += blockDim.x * step) {
        if (VEC) {
            float xv[8], gv[8], wv[8];
            load8(x + i, xv);
            load8(dy + i, gv);
            load8(w + i, wv);
#pragma unroll
            for (int j = 0; j < 8; j++)
                dot += gv[j] * wv[j] * xv[j];
        } else {
            dot += b2f(dy[i]) * b2f(w[i]) * b2f(x[i]);
        }
    }
    float m = block_sum(dot, red) * r / D;
    if (!d_in)
        return;
    bf16 *dx = d_in + n * D;
    for (int i = threadIdx.x * step; i < D; i += blockDim.x * step) {
        if (VEC) {
            float xv[8], gv[8], wv[8], o[8];
            load8(x + i, xv);
            load8(dy + i, gv);
            load8(w + i, wv);
            if (beta != 0.0f)
                load8(dx + i, o);
#pragma unroll
            for (int j = 0; j < 8; j++) {
                float v = r * (gv[j] * wv[j] - xv[j] * r * m);
                o[j] = beta != 0.0f ? beta * o[j] + v : v;
            }
            store8(dx + i, o);
        } else {
            float v = r * (b2f(dy[i]) * b2f(w[i]) - b2f(x[i]) * r * m);
            dx[i] = f2b(beta != 0.0f ? beta * b2f(dx[i]) + v : v);
        }
    }
}

/* d_w partials: thread = one column, block = 256 columns x one slab of rows (n = slab,
 * slab + slabs, ...): part[slab][i] = sum dy * x * rstd. Coalesced along the row. */
__global__ void rmsnorm_dw_kernel(float *part, const bf16 *d_out, const bf16 *in,
                                  const float *rstd, int N, int D)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x, slab = blockIdx.y, slabs = gridDim.y;
    if (i >= D)
        return;
    float acc = 0;
    for (int n = slab; n < N; n += slabs)
        acc += b2f(d_out[(int64_t)n * D + i]) * b2f(in[(int64_t)n * D + i]) * rstd[n];
    part[(int64_t)slab * D + i] = acc;
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
    size_t mark = gpu_arena_mark(c);
    int slabs = N < 64 ? N : 64;
    float *part = NULL, *rs = NULL;
    if (d_w && !(part = (float *)gpu_arena_alloc(c, (size_t)slabs * D * sizeof(float), e)))
        return -1;
    if (d_w && !rstd && !(rs = (float *)gpu_arena_alloc(c, (size_t)N * sizeof(float), e)))
        return -1;
    bool vec = D % 8 == 0 && aligned16(d_out) && aligned16(in) && aligned16(w) &&
               (!d_in || aligned16(d_in));
    if (vec)
        rmsnorm_dx_kernel<true><<<N, NORM_THREADS, 0, c->stream>>>(
            (bf16 *)d_in, beta, rs, (const bf16 *)d_out, (const bf16 *)in, (const bf16 *)w, rstd,
            D, eps);
    else
        rmsnorm_dx_kernel<false><<<N, NORM_THREADS, 0, c->stream>>>(
            (bf16 *)d_in, beta, rs, (const bf16 *)d_out, (const bf16 *)in, (const bf16 *)w, rstd,
            D, eps);
    LAUNCH_CHECK("rmsnorm_bwd dx", e);
    if (d_w) {
        dim3 grid((D + 255) / 256, slabs);
        rmsnorm_dw_kernel<<<grid, 256, 0, c->stream>>>(part, (const bf16 *)d_out,
                                                       (const bf16 *)in, rstd ? rstd : rs, N, D);
        LAUNCH_CHECK("rmsnorm_bwd dw", e);
        sum_parts_kernel<<<(D + 255) / 256, 256, 0, c->stream>>>(d_w, part, slabs, D);
        LAUNCH_CHECK("rmsnorm_bwd sum", e);
    }
    /* Later launches on the same stream run after these, so the scratch can be reused. */
    gpu_arena_reset(c, mark);
    return 0;
}
