/* norm: RMSNorm forward and backward.
 * Rows of at most NORM_WARP_MAXD values (D % 8 == 0, 16-byte aligned): one warp a row, the
 * row in registers (16-byte accesses), 8 rows a block; the backward is one kernel that also
 * sums the weight gradient in registers over the rows its warps walk (each input read once),
 * the 8 warps' sums then added in shared memory into one partial row a block, and the
 * partials over blocks in a fixed order (deterministic, no atomics).
 * Other rows: one block a row; the weight gradient summed by row-slab blocks into an arena
 * scratch and then over slabs in a fixed order. */
#include "gpuctx_internal.cuh"
#include "layers.h"

#include <stdlib.h>

#define NORM_THREADS 256
#define NORM_WARP_MAXD 1024 /* 4 chunks of 8 values a lane */

/* DSV3_NORM_WARP=0 keeps the block-a-row kernels, for before/after timings */
static bool warp_ok(void)
{
    const char *s = getenv("DSV3_NORM_WARP");
    return !(s && *s == '0');
}

__device__ __forceinline__ void unpack8(uint4 u, float (&f)[8])
{
    const __nv_bfloat162 *h = (const __nv_bfloat162 *)&u;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 t = __bfloat1622float2(h[i]);
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
}

/* Forward, one warp a row: chunk c = lane + 32 j of the row's D / 8 chunks. */
template <int NC>
__global__ void __launch_bounds__(256) rmsnorm_fwd_warp_kernel(bf16 *out, float *rstd,
                                                               const bf16 *in, const bf16 *w,
                                                               int N, int D, float eps)
{
    int lane = threadIdx.x & 31, row = blockIdx.x * 8 + (threadIdx.x >> 5), nch = D / 8;
    if (row >= N)
        return;
    const uint4 *x = (const uint4 *)(in + (int64_t)row * D);
    uint4 xv[NC];
    float ss = 0;
#pragma unroll
    for (int j = 0; j < NC; j++) {
        int c = lane + 32 * j;
        if (c < nch) {
            float f[8];
            xv[j] = x[c];
            unpack8(xv[j], f);
#pragma unroll
            for (int q = 0; q < 8; q++)
                ss += f[q] * f[q];
        }
    }
    float r = rsqrtf(warp_sum(ss) / D + eps);
    if (rstd && lane == 0)
        rstd[row] = r;
    bf16 *y = out + (int64_t)row * D;
#pragma unroll
    for (int j = 0; j < NC; j++) {
        int c = lane + 32 * j;
        if (c < nch) {
            float f[8], g[8];
            unpack8(xv[j], f);
            unpack8(((const uint4 *)w)[c], g);
#pragma unroll
            for (int q = 0; q < 8; q++)
                f[q] = g[q] * (f[q] * r);
            store8(y + 8 * c, f);
        }
    }
}

/* One row's operands of the backward as loaded: x, dy, the dx it adds into (beta != 0),
 * and rstd when the forward kept it. */
template <int NC> struct norm_bwd_row {
    uint4 x[NC], dy[NC], dx[NC];
    float r;
};

template <int NC>
__device__ __forceinline__ void norm_bwd_load(norm_bwd_row<NC> &o, int row, int lane, int nch,
                                              const bf16 *in, const bf16 *d_out,
                                              const bf16 *d_in, bool add, const float *rstd,
                                              int D)
{
    const uint4 *x = (const uint4 *)(in + (int64_t)row * D),
                *dy = (const uint4 *)(d_out + (int64_t)row * D),
                *dx = (const uint4 *)(d_in + (int64_t)row * D);
#pragma unroll
    for (int j = 0; j < NC; j++) {
        int c = lane + 32 * j;
        if (c < nch) {
            o.x[j] = x[c];
            o.dy[j] = dy[c];
            if (add)
                o.dx[j] = dx[c];
        }
    }
    o.r = rstd ? rstd[row] : 0.0f;
}

/* Backward, one warp a row, the rows blockIdx.x * 8 + warp + k * gridDim.x * 8: dx as in
 * rmsnorm_dx_kernel (added to beta * dx), and with part non-NULL part[blockIdx.x][i] = the
 * block's sum of dy * x * rstd (rstd recomputed when NULL). Each warp issues its next row's
 * loads before it works on the current one: with one row in flight a warp the kernel was
 * latency-bound (half the copy rate). The weight-gradient sums live in shared memory, each
 * warp its own slice laid out [chunk j][value q][lane] (no bank conflicts), which frees
 * the registers the second row needs; each element still sums its rows in the same order. */
template <int NC>
__global__ void __launch_bounds__(256, 2) rmsnorm_bwd_warp_kernel(bf16 *d_in, float beta,
                                                               float *part, const bf16 *d_out,
                                                               const bf16 *in, const bf16 *w,
                                                               const float *rstd, int N, int D,
                                                               float eps)
{
    __shared__ float sh[8 * NORM_WARP_MAXD];
    int lane = threadIdx.x & 31, wp = threadIdx.x >> 5, nch = D / 8;
    float *acc = sh + wp * NORM_WARP_MAXD;
    bool add = d_in && beta != 0.0f;
#pragma unroll
    for (int j = 0; j < NC; j++)
#pragma unroll
        for (int q = 0; q < 8; q++)
            acc[(j * 8 + q) * 32 + lane] = 0;
    int row = blockIdx.x * 8 + wp, stride = gridDim.x * 8;
    norm_bwd_row<NC> cur, nxt;
    if (row < N)
        norm_bwd_load(cur, row, lane, nch, in, d_out, d_in, add, rstd, D);
    for (; row < N; row += stride) {
        if (row + stride < N)
            norm_bwd_load(nxt, row + stride, lane, nch, in, d_out, d_in, add, rstd, D);
        float ss = 0, dot = 0;
#pragma unroll
        for (int j = 0; j < NC; j++) {
            int c = lane + 32 * j;
            if (c < nch) {
                float f[8], g[8], wf[8];
                unpack8(cur.x[j], f);
                unpack8(cur.dy[j], g);
                unpack8(__ldg((const uint4 *)w + c), wf);
#pragma unroll
                for (int q = 0; q < 8; q++) {
                    ss += f[q] * f[q];
                    dot += g[q] * wf[q] * f[q];
                }
            }
        }
        float r = rstd ? cur.r : rsqrtf(warp_sum(ss) / D + eps);
        float m = warp_sum(dot) * r / D;
        bf16 *dx = d_in ? d_in + (int64_t)row * D : NULL;
#pragma unroll
        for (int j = 0; j < NC; j++) {
            int c = lane + 32 * j;
            if (c < nch) {
                float f[8], g[8], o[8];
                unpack8(cur.x[j], f);
                unpack8(cur.dy[j], g);
                if (dx) {
                    float wf[8];
                    unpack8(__ldg((const uint4 *)w + c), wf);
                    if (add)
                        unpack8(cur.dx[j], o);
#pragma unroll
                    for (int q = 0; q < 8; q++) {
                        float v = r * (g[q] * wf[q] - f[q] * r * m);
                        o[q] = add ? beta * o[q] + v : v;
                    }
                    store8(dx + 8 * c, o);
                }
#pragma unroll
                for (int q = 0; q < 8; q++)
                    acc[(j * 8 + q) * 32 + lane] += g[q] * f[q] * r;
            }
        }
        cur = nxt;
    }
    if (!part)
        return;
    __syncthreads();
    /* element i = 8 c + q of the row, c = lane + 32 j, sits at (j * 8 + q) * 32 + lane */
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        int c = i >> 3, at = ((c >> 5) * 8 + (i & 7)) * 32 + (c & 31);
        float t = 0;
#pragma unroll
        for (int k = 0; k < 8; k++)
            t += sh[k * NORM_WARP_MAXD + at];
        part[(int64_t)blockIdx.x * D + i] = t;
    }
}

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
    if (D % 8 == 0 && D <= NORM_WARP_MAXD && aligned16(out) && aligned16(in) && aligned16(w) &&
        warp_ok()) {
        unsigned blocks = (unsigned)((N + 7) / 8);
        int nc = (D / 8 + 31) / 32;
        if (nc <= 1)
            rmsnorm_fwd_warp_kernel<1><<<blocks, 256, 0, c->stream>>>(
                (bf16 *)out, rstd, (const bf16 *)in, (const bf16 *)w, N, D, eps);
        else if (nc <= 2)
            rmsnorm_fwd_warp_kernel<2><<<blocks, 256, 0, c->stream>>>(
                (bf16 *)out, rstd, (const bf16 *)in, (const bf16 *)w, N, D, eps);
        else
            rmsnorm_fwd_warp_kernel<4><<<blocks, 256, 0, c->stream>>>(
                (bf16 *)out, rstd, (const bf16 *)in, (const bf16 *)w, N, D, eps);
    } else if (D % 8 == 0 && aligned16(out) && aligned16(in) && aligned16(w))
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
    if (D % 8 == 0 && D <= NORM_WARP_MAXD && aligned16(d_out) && aligned16(in) && aligned16(w) &&
        (!d_in || aligned16(d_in)) && warp_ok()) {
        int blocks = (N + 7) / 8, cap = 2 * c->sm_count;
        blocks = blocks < cap ? blocks : cap;
        float *part = NULL;
        if (d_w && !(part = (float *)gpu_arena_alloc(c, (size_t)blocks * D * sizeof(float), e)))
            return -1;
        int nc = (D / 8 + 31) / 32;
#define NORM_BWD_WARP(NC)                                                                      \
    rmsnorm_bwd_warp_kernel<NC><<<blocks, 256, 0, c->stream>>>(                                \
        (bf16 *)d_in, beta, part, (const bf16 *)d_out, (const bf16 *)in, (const bf16 *)w, rstd, \
        N, D, eps)
        if (nc <= 1)
            NORM_BWD_WARP(1);
        else if (nc <= 2)
            NORM_BWD_WARP(2);
        else
            NORM_BWD_WARP(4);
#undef NORM_BWD_WARP
        LAUNCH_CHECK("rmsnorm_bwd (warp)", e);
        if (d_w) {
            sum_parts_kernel<<<(D + 255) / 256, 256, 0, c->stream>>>(d_w, part, blocks, D);
            LAUNCH_CHECK("rmsnorm_bwd sum", e);
        }
        gpu_arena_reset(c, mark);
        return 0;
    }
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
