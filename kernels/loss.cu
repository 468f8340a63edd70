/* loss: cross-entropy rows and the chunked output head.
 * Two row kernels: (1) the cluster kernel (default where V is even and at most
 * CEC_MAXV = 131072): one cluster of 8 blocks a row, each block holding
 * its eighth of the row in registers, the blocks' (max, sum) exchanged through distributed
 * shared memory, so the fp32 logits are read once and the bf16 gradient written once (the
 * floor: 6 bytes a logit); (2) the general kernel: one block a row, a single pass for the
 * max and the sum (online softmax per thread, merged across the block), a second pass
 * reading the row again to write the gradient (10 bytes a logit). */
#include <cooperative_groups.h>
#include <stdlib.h>

#include "gemm.h"
#include "gpuctx_internal.cuh"
#include "loss.h"

namespace cg = cooperative_groups;

#define CE_THREADS 512

__global__ void ce_rows_kernel(float *losses, bf16 *d_logits, const float *logits,
                               const int32_t *targets, int V, float scale)
{
    __shared__ float red[32];
    int r = blockIdx.x, t = targets[r];
    const float *l = logits + (int64_t)r * V;
    bf16 *d = d_logits ? d_logits + (int64_t)r * V : NULL;
    if (t < 0) {
        if (threadIdx.x == 0)
            losses[r] = 0;
        if (d)
            for (int v = threadIdx.x; v < V; v += blockDim.x)
                d[v] = f2b(0.0f);
        return;
    }
    float m = -INFINITY, s = 0;
    if (V % 4 == 0) { /* 16-byte loads: rows stay 16-byte aligned (checked by the caller) */
        for (int v = threadIdx.x * 4; v < V; v += blockDim.x * 4) {
            float4 q = *(const float4 *)(l + v);
            float mx = fmaxf(fmaxf(q.x, q.y), fmaxf(q.z, q.w));
            if (mx > m) {
                s *= __expf(m - mx);
                m = mx;
            }
            s += __expf(q.x - m) + __expf(q.y - m) + __expf(q.z - m) + __expf(q.w - m);
        }
    } else {
        for (int v = threadIdx.x; v < V; v += blockDim.x) {
            float x = l[v];
            if (x > m) {
                s = s * __expf(m - x) + 1.0f;
                m = x;
            } else {
                s += __expf(x - m);
            }
        }
    }
    float M = block_max(m, red);
    float S = block_sum(m == -INFINITY ? 0.0f : s * __expf(m - M), red);
    float lse = M + logf(S);
    if (threadIdx.x == 0)
        losses[r] = lse - l[t];
    if (d && V % 4 == 0) {
        float inv = 1.0f / S;
        for (int v = threadIdx.x * 4; v < V; v += blockDim.x * 4) {
            float4 q = *(const float4 *)(l + v);
            float p[4] = {__expf(q.x - M) * inv, __expf(q.y - M) * inv, __expf(q.z - M) * inv,
                          __expf(q.w - M) * inv};
#pragma unroll
            for (int j = 0; j < 4; j++)
                p[j] = (p[j] - (v + j == t ? 1.0f : 0.0f)) * scale;
            __nv_bfloat162 lo = __floats2bfloat162_rn(p[0], p[1]), hi = __floats2bfloat162_rn(p[2], p[3]);
            uint2 u;
            u.x = *(uint32_t *)&lo;
            u.y = *(uint32_t *)&hi;
            *(uint2 *)(d + v) = u;
        }
    } else if (d) {
        float inv = 1.0f / S;
        for (int v = threadIdx.x; v < V; v += blockDim.x) {
            float p = __expf(l[v] - M) * inv;
            d[v] = f2b((p - (v == t ? 1.0f : 0.0f)) * scale);
        }
    }
}

#define CEC_CLUSTER 8
#define CEC_THREADS 512
#define CEC_PAIRS 16 /* float2 a thread: 32 logits, 131072 a row at most */
#define CEC_MAXV (CEC_CLUSTER * CEC_THREADS * CEC_PAIRS * 2)

/* One row per cluster of CEC_CLUSTER blocks; block b owns the pairs [b P, (b + 1) P) of
 * the row (P = CEC_THREADS * CEC_PAIRS), thread t the pairs b P + j CEC_THREADS + t
 * (coalesced). Every block computes the row's max and sum from all blocks' partials (the
 * same order everywhere, so the same value), then writes its gradient from registers. */
__global__ void __cluster_dims__(CEC_CLUSTER, 1, 1) __launch_bounds__(CEC_THREADS, 2)
ce_cluster_kernel(float *losses, bf16 *d_logits, const float *logits, const int32_t *targets,
                  int V, float scale)
{
    __shared__ float red[32];
    __shared__ float2 part; /* this block's (max, sum of exp(x - max)) */
    cg::cluster_group cl = cg::this_cluster();
    int r = blockIdx.x / CEC_CLUSTER, b = (int)cl.block_rank(), t = targets[r];
    int np = V / 2, p0 = b * CEC_THREADS * CEC_PAIRS + threadIdx.x;
    const float2 *l = (const float2 *)(logits + (int64_t)r * V);
    __nv_bfloat162 *d = d_logits ? (__nv_bfloat162 *)(d_logits + (int64_t)r * V) : NULL;
    if (t < 0) { /* the whole cluster takes this branch: no cluster barrier is skipped */
        if (b == 0 && threadIdx.x == 0)
            losses[r] = 0;
        if (d)
#pragma unroll
            for (int j = 0; j < CEC_PAIRS; j++) {
                int p = p0 + j * CEC_THREADS;
                if (p < np)
                    d[p] = __floats2bfloat162_rn(0.0f, 0.0f);
            }
        return;
    }
    float2 x[CEC_PAIRS];
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < CEC_PAIRS; j++) {
        int p = p0 + j * CEC_THREADS;
        x[j] = p < np ? l[p] : make_float2(-INFINITY, -INFINITY);
        m = fmaxf(m, fmaxf(x[j].x, x[j].y));
    }
    float Mb = block_max(m, red);
    float s = 0;
    if (Mb != -INFINITY)
#pragma unroll
        for (int j = 0; j < CEC_PAIRS; j++)
            s += __expf(x[j].x - Mb) + __expf(x[j].y - Mb);
    float Sb = block_sum(s, red);
    if (threadIdx.x == 0)
        part = make_float2(Mb, Sb);
    cl.sync();
    float M = -INFINITY, S = 0;
#pragma unroll
    for (int q = 0; q < CEC_CLUSTER; q++)
        M = fmaxf(M, cl.map_shared_rank(&part, q)->x);
#pragma unroll
    for (int q = 0; q < CEC_CLUSTER; q++) {
        float2 pq = *cl.map_shared_rank(&part, q);
        S += pq.x == -INFINITY ? 0.0f : pq.y * __expf(pq.x - M);
    }
    cl.sync(); /* no block leaves while another still reads its partial */
    if (b == 0 && threadIdx.x == 0)
        losses[r] = M + logf(S) - logits[(int64_t)r * V + t];
    if (!d)
        return;
    float inv = scale / S;
#pragma unroll
    for (int j = 0; j < CEC_PAIRS; j++) {
        int p = p0 + j * CEC_THREADS;
        if (p < np) {
            float a = __expf(x[j].x - M) * inv - (2 * p == t ? scale : 0.0f);
            float c = __expf(x[j].y - M) * inv - (2 * p + 1 == t ? scale : 0.0f);
            d[p] = __floats2bfloat162_rn(a, c);
        }
    }
}

extern "C" int gpu_crossentropy_rows_variant(gpu_ctx *c, int variant, float *losses,
                                             gpu_bf16 *d_logits, const float *logits,
                                             const int32_t *targets, int R, int V, float scale,
                                             dsv3_err *e)
{
    if (R <= 0)
        return 0;
    if (variant == GPU_CE_AUTO) {
        const char *env = getenv("DSV3_CE_KERNEL"); /* for before/after timings */
        variant = env && *env ? atoi(env) : GPU_CE_CLUSTER;
    }
    if (variant == GPU_CE_CLUSTER && V % 2 == 0 && V <= CEC_MAXV && ((uintptr_t)logits & 7) == 0 &&
        ((uintptr_t)d_logits & 3) == 0) {
        ce_cluster_kernel<<<R * CEC_CLUSTER, CEC_THREADS, 0, c->stream>>>(
            losses, (bf16 *)d_logits, logits, targets, V, scale);
        LAUNCH_CHECK("crossentropy_rows (cluster)", e);
        return 0;
    }
    if (V % 4 == 0 && !(aligned16(logits) && (!d_logits || ((uintptr_t)d_logits & 7) == 0)))
        return err_set(e, "crossentropy: rows of %d values need aligned bases", V);
    ce_rows_kernel<<<R, CE_THREADS, 0, c->stream>>>(losses, (bf16 *)d_logits, logits, targets,
                                                    V, scale);
    LAUNCH_CHECK("crossentropy_rows", e);
    return 0;
}

extern "C" int gpu_crossentropy_rows(gpu_ctx *c, float *losses, gpu_bf16 *d_logits,
                                     const float *logits, const int32_t *targets, int R, int V,
                                     float scale, dsv3_err *e)
{
    return gpu_crossentropy_rows_variant(c, GPU_CE_AUTO, losses, d_logits, logits, targets, R,
                                         V, scale, e);
}

extern "C" int gpu_lm_head_chunk_rows(int N, int V)
{
    const char *env = getenv("DSV3_HEAD_CHUNK"); /* rows, for before/after timings */
    long rows = env && *env ? atol(env) : (long)(GPU_HEAD_CHUNK_BYTES / ((size_t)V * 6));
    rows = rows < 64 ? 64 : rows / 64 * 64;
    return (int)(rows > N ? N : rows);
}

extern "C" int gpu_lm_head_loss(gpu_ctx *c, float *losses, gpu_bf16 *d_hidden, float *d_w,
                                const gpu_bf16 *hidden, const gpu_bf16 *w,
                                const int32_t *targets, int N, int H, int V, float scale,
                                int chunk_rows, dsv3_err *e)
{
    if (chunk_rows <= 0)
        return err_set(e, "lm_head_loss: chunk_rows must be positive");
    int want_grad = d_hidden || d_w;
    size_t mark = gpu_arena_mark(c);
    int R = chunk_rows < N ? chunk_rows : N;
    float *logits = (float *)gpu_arena_alloc(c, (size_t)R * V * sizeof(float), e);
    gpu_bf16 *dl = NULL;
    if (!logits || (want_grad && !(dl = (gpu_bf16 *)gpu_arena_alloc(c, (size_t)R * V * 2, e))))
        return -1;
    for (int r0 = 0; r0 < N; r0 += R) {
        int rows = N - r0 < R ? N - r0 : R;
        const gpu_bf16 *h = hidden + (int64_t)r0 * H;
        if (gpu_gemm(c, 0, 1, rows, V, H, 1.0f, h, H, w, H, 0.0f, logits, V, 1, e) ||
            gpu_crossentropy_rows(c, losses + r0, dl, logits, targets + r0, rows, V, scale, e))
            return -1;
        if (d_hidden &&
            gpu_linear_dgrad(c, d_hidden + (int64_t)r0 * H, dl, w, rows, H, V, 0.0f, e))
            return -1;
        if (d_w && gpu_linear_wgrad(c, d_w, dl, h, rows, H, V, 1.0f, e))
            return -1;
    }
    gpu_arena_reset(c, mark);
    return 0;
}
