/* loss: one block per row, a single pass for the max and the sum (online softmax per
 * thread, merged across the block), a second pass writing the gradient. */
#include "gemm.h"
#include "gpuctx_internal.cuh"
#include "loss.h"

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

extern "C" int gpu_crossentropy_rows(gpu_ctx *c, float *losses, gpu_bf16 *d_logits,
                                     const float *logits, const int32_t *targets, int R, int V,
                                     float scale, dsv3_err *e)
{
    if (R <= 0)
        return 0;
    if (V % 4 == 0 && !(aligned16(logits) && (!d_logits || ((uintptr_t)d_logits & 7) == 0)))
        return err_set(e, "crossentropy: rows of %d values need aligned bases", V);
    ce_rows_kernel<<<R, CE_THREADS, 0, c->stream>>>(losses, (bf16 *)d_logits, logits, targets,
                                                    V, scale);
    LAUNCH_CHECK("crossentropy_rows", e);
    return 0;
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
