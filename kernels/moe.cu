/* moe: router kernel (one warp per token), dispatch order by stable sort, gather/combine
 * kernels (one block per row). The grouped GEMMs are in moe_gemm.cu. */
#include "gpuctx_internal.cuh"
#include "moe.h"
#include "route_row.cuh"
#include "sort.h"

#include <stdlib.h>

#define ROUTER_WARPS 4

__global__ void router_kernel(int32_t *idx, float *w, float *s, const float *logits,
                              const float *bias, int N, int E, int G, int TG, int K, int norm,
                              float scale)
{
    extern __shared__ float sh[];
    int warp = threadIdx.x >> 5;
    int n = blockIdx.x * ROUTER_WARPS + warp;
    if (n >= N)
        return; /* the whole warp leaves; no block-wide barrier follows */
    route_row(idx, w, s, logits, bias, n, E, G, TG, K, norm, scale, sh + warp * E,
              (unsigned char *)(sh + ROUTER_WARPS * E) + warp * E);
}

__global__ void router_bwd_kernel(float *d_logits, const float *d_w, const int32_t *idx,
                                  const float *s, int N, int E, int K, int norm, float scale)
{
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N)
        return;
    const int32_t *id = idx + (int64_t)n * K;
    const float *dw = d_w + (int64_t)n * K, *sr = s + (int64_t)n * E;
    float S = 0, dot = 0;
    for (int r = 0; r < K; r++) {
        S += sr[id[r]];
        dot += dw[r] * sr[id[r]];
    }
    for (int r = 0; r < K; r++) {
        int x = id[r];
        float ds = norm ? scale * (dw[r] / S - dot / (S * S)) : scale * dw[r];
        d_logits[(int64_t)n * E + x] += ds * sr[x] * (1.0f - sr[x]);
    }
}

extern "C" int gpu_router_fwd(gpu_ctx *c, int32_t *idx, float *w, float *s, const float *logits,
                              const float *bias, int N, int E, int n_group, int topk_group,
                              int k, int norm, float scale, dsv3_err *e)
{
    if (E > 1024 || n_group < 1 || n_group > 32 || E % n_group || k < 1 || k > 32 ||
        topk_group < 1 || topk_group > n_group || k > topk_group * (E / n_group))
        return err_set(e, "router: unsupported shape E=%d n_group=%d topk_group=%d k=%d", E,
                       n_group, topk_group, k);
    if (N <= 0)
        return 0;
    size_t smem = (size_t)ROUTER_WARPS * E * (sizeof(float) + 1);
    router_kernel<<<(N + ROUTER_WARPS - 1) / ROUTER_WARPS, 32 * ROUTER_WARPS, smem,
                    c->stream>>>(idx, w, s, logits, bias, N, E, n_group, topk_group, k, norm,
                                 scale);
    LAUNCH_CHECK("router_fwd", e);
    return 0;
}

extern "C" int gpu_router_bwd(gpu_ctx *c, float *d_logits, const float *d_w,
                              const int32_t *idx, const float *s, int N, int E, int k, int norm,
                              float scale, dsv3_err *e)
{
    if (N <= 0)
        return 0;
    router_bwd_kernel<<<(N + 127) / 128, 128, 0, c->stream>>>(d_logits, d_w, idx, s, N, E, k,
                                                              norm, scale);
    LAUNCH_CHECK("router_bwd", e);
    return 0;
}

/* ---- dispatch plan ---- */

__global__ void plan_kernel(int32_t *pos, int *offsets, const int32_t *keys_sorted,
                            const int32_t *order, int n, int E)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n)
        return;
    pos[order[i]] = i;
    int ex = keys_sorted[i], prev = i > 0 ? keys_sorted[i - 1] : -1;
    for (int x = prev + 1; x <= ex; x++)
        offsets[x] = i;
    if (i == n - 1)
        for (int x = ex + 1; x <= E; x++)
            offsets[x] = n;
}

__global__ void iota32_kernel(int32_t *v, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        v[i] = i;
}

extern "C" int gpu_moe_plan_make(gpu_ctx *c, gpu_moe_plan *p, const int32_t *idx, int N, int k,
                                 int E, dsv3_err *e)
{
    memset(p, 0, sizeof *p);
    int n = N * k;
    p->N = N;
    p->k = k;
    p->E = E;
    if (n == 0)
        return 0;
    p->order = (int32_t *)gpu_arena_alloc(c, (size_t)n * 4, e);
    p->pos = p->order ? (int32_t *)gpu_arena_alloc(c, (size_t)n * 4, e) : NULL;
    p->offsets = p->pos ? (int *)gpu_arena_alloc(c, ((size_t)E + 1) * 4, e) : NULL;
    if (!p->offsets)
        return -1;
    size_t mark = gpu_arena_mark(c);
    int32_t *vals = (int32_t *)gpu_arena_alloc(c, (size_t)n * 4, e);
    int32_t *keys = vals ? (int32_t *)gpu_arena_alloc(c, (size_t)n * 4, e) : NULL;
    if (!keys)
        return -1;
    iota32_kernel<<<(n + 255) / 256, 256, 0, c->stream>>>(vals, n);
    LAUNCH_CHECK("iota", e);
    if (gpu_sort_pairs(c, keys, p->order, idx, vals, n, E, e))
        return -1;
    plan_kernel<<<(n + 255) / 256, 256, 0, c->stream>>>(p->pos, p->offsets, keys, p->order, n,
                                                        E);
    LAUNCH_CHECK("moe plan", e);
    gpu_arena_reset(c, mark);
    if (c->moe_gemm == GPU_MOE_GEMM_CUBLAS) { /* the earlier path: one read of the offsets per layer */
        p->offsets_host = (int *)malloc(((size_t)E + 1) * sizeof(int));
        if (!p->offsets_host)
            return err_set(e, "moe: out of host memory");
        return gpu_moe_plan_offsets(c, p, p->offsets_host, e);
    }
    return 0;
}

extern "C" int gpu_moe_plan_offsets(gpu_ctx *c, const gpu_moe_plan *p, int *offsets,
                                    dsv3_err *e)
{
    if (p->N * p->k == 0) {
        memset(offsets, 0, ((size_t)p->E + 1) * sizeof(int));
        return 0;
    }
    return gpu_download(c, offsets, p->offsets, ((size_t)p->E + 1) * sizeof(int), e);
}

extern "C" void gpu_moe_plan_free(gpu_moe_plan *p)
{
    free(p->offsets_host);
    p->offsets_host = NULL;
}

/* ---- gather / combine: one block per row, columns across threads ---- */

__global__ void gather_kernel(bf16 *x_perm, const bf16 *x, const int32_t *order, int k, int H)
{
    const bf16 *src = x + (int64_t)(order[blockIdx.x] / k) * H;
    bf16 *dst = x_perm + (int64_t)blockIdx.x * H;
    if (H % 8 == 0) { /* rows 16-byte aligned when the bases are (checked by the caller) */
        for (int i = threadIdx.x * 8; i < H; i += blockDim.x * 8)
            *(uint4 *)(dst + i) = *(const uint4 *)(src + i);
        return;
    }
    for (int i = threadIdx.x; i < H; i += blockDim.x)
        dst[i] = src[i];
}

__global__ void gather_bwd_kernel(bf16 *d_x, float beta, const bf16 *d_x_perm,
                                  const int32_t *pos, int k, int H)
{
    int n = blockIdx.x;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        float s = beta != 0.0f ? beta * b2f(d_x[(int64_t)n * H + i]) : 0.0f;
        for (int r = 0; r < k; r++)
            s += b2f(d_x_perm[(int64_t)pos[n * k + r] * H + i]);
        d_x[(int64_t)n * H + i] = f2b(s);
    }
}

__global__ void combine_kernel(bf16 *out, float beta, const bf16 *y_perm, const float *w,
                               const int32_t *pos, int k, int H)
{
    int n = blockIdx.x;
    if (H % 8 == 0) {
        for (int i = threadIdx.x * 8; i < H; i += blockDim.x * 8) {
            float s[8], t[8];
            if (beta != 0.0f) {
                load8(out + (int64_t)n * H + i, s);
#pragma unroll
                for (int j = 0; j < 8; j++)
                    s[j] *= beta;
            } else {
#pragma unroll
                for (int j = 0; j < 8; j++)
                    s[j] = 0;
            }
            for (int r = 0; r < k; r++) {
                float wr = w[n * k + r];
                load8(y_perm + (int64_t)pos[n * k + r] * H + i, t);
#pragma unroll
                for (int j = 0; j < 8; j++)
                    s[j] += wr * t[j];
            }
            store8(out + (int64_t)n * H + i, s);
        }
        return;
    }
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        float s = beta != 0.0f ? beta * b2f(out[(int64_t)n * H + i]) : 0.0f;
        for (int r = 0; r < k; r++)
            s += w[n * k + r] * b2f(y_perm[(int64_t)pos[n * k + r] * H + i]);
        out[(int64_t)n * H + i] = f2b(s);
    }
}

__global__ void combine_bwd_kernel(bf16 *d_y_perm, float *d_w, const bf16 *d_out,
                                   const bf16 *y_perm, const float *w, const int32_t *order,
                                   int k, int H)
{
    __shared__ float red[32];
    int i = blockIdx.x, a = order[i];
    const bf16 *dy = d_out + (int64_t)(a / k) * H, *y = y_perm + (int64_t)i * H;
    bf16 *dyp = d_y_perm + (int64_t)i * H;
    float wa = w[a], dot = 0;
    for (int j = threadIdx.x; j < H; j += blockDim.x) {
        float g = b2f(dy[j]);
        dot += g * b2f(y[j]);
        dyp[j] = f2b(wa * g);
    }
    dot = block_sum(dot, red);
    if (threadIdx.x == 0)
        d_w[a] = dot;
}

/* The same three with one warp a row (8 rows a block) and 16-byte accesses, for H % 8 == 0
 * and 16-byte aligned bases: a block a row left most threads idle at H = 1024 (128 of 256
 * busy) and the backwards moved 2 bytes a thread. */
__global__ void gather_warp_kernel(bf16 *x_perm, const bf16 *x, const int32_t *order, int n,
                                   int k, int H)
{
    int lane = threadIdx.x & 31, i = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (i >= n)
        return;
    const uint4 *src = (const uint4 *)(x + (int64_t)(order[i] / k) * H);
    uint4 *dst = (uint4 *)(x_perm + (int64_t)i * H);
    for (int c = lane; c < H / 8; c += 32)
        dst[c] = src[c];
}

__global__ void gather_bwd_warp_kernel(bf16 *d_x, float beta, const bf16 *d_x_perm,
                                       const int32_t *pos, int N, int k, int H)
{
    int lane = threadIdx.x & 31, n = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (n >= N)
        return;
    for (int c = lane * 8; c < H; c += 256) {
        float s[8], t[8];
        if (beta != 0.0f) {
            load8(d_x + (int64_t)n * H + c, s);
#pragma unroll
            for (int j = 0; j < 8; j++)
                s[j] *= beta;
        } else {
#pragma unroll
            for (int j = 0; j < 8; j++)
                s[j] = 0;
        }
        for (int r = 0; r < k; r++) {
            load8(d_x_perm + (int64_t)pos[n * k + r] * H + c, t);
#pragma unroll
            for (int j = 0; j < 8; j++)
                s[j] += t[j];
        }
        store8(d_x + (int64_t)n * H + c, s);
    }
}

__global__ void combine_bwd_warp_kernel(bf16 *d_y_perm, float *d_w, const bf16 *d_out,
                                        const bf16 *y_perm, const float *w,
                                        const int32_t *order, int n, int k, int H)
{
    int lane = threadIdx.x & 31, i = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (i >= n)
        return;
    int a = order[i];
    const bf16 *dy = d_out + (int64_t)(a / k) * H, *y = y_perm + (int64_t)i * H;
    bf16 *dyp = d_y_perm + (int64_t)i * H;
    float wa = w[a], dot = 0;
    for (int c = lane * 8; c < H; c += 256) {
        float g[8], t[8];
        load8(dy + c, g);
        load8(y + c, t);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            dot += g[j] * t[j];
            g[j] *= wa;
        }
        store8(dyp + c, g);
    }
    dot = warp_sum(dot);
    if (lane == 0)
        d_w[a] = dot;
}

/* DSV3_MOE_WARP=0 keeps the block-a-row kernels, for before/after timings */
static bool warp_rows(void)
{
    const char *s = getenv("DSV3_MOE_WARP");
    return !(s && *s == '0');
}

extern "C" int gpu_moe_gather(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *x_perm,
                              const gpu_bf16 *x, int H, dsv3_err *e)
{
    int n = p->N * p->k;
    if (n == 0)
        return 0;
    if (H % 8 == 0 && !(aligned16(x_perm) && aligned16(x)))
        return err_set(e, "moe_gather: rows of %d values need 16-byte aligned bases", H);
    if (H % 8 == 0 && warp_rows())
        gather_warp_kernel<<<(n + 7) / 8, 256, 0, c->stream>>>((bf16 *)x_perm, (const bf16 *)x,
                                                              p->order, n, p->k, H);
    else
        gather_kernel<<<n, 256, 0, c->stream>>>((bf16 *)x_perm, (const bf16 *)x, p->order, p->k,
                                                H);
    LAUNCH_CHECK("moe_gather", e);
    return 0;
}

extern "C" int gpu_moe_gather_bwd(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *d_x, float beta,
                                  const gpu_bf16 *d_x_perm, int H, dsv3_err *e)
{
    if (p->N == 0)
        return 0;
    if (H % 8 == 0 && aligned16(d_x) && aligned16(d_x_perm) && warp_rows())
        gather_bwd_warp_kernel<<<(p->N + 7) / 8, 256, 0, c->stream>>>(
            (bf16 *)d_x, beta, (const bf16 *)d_x_perm, p->pos, p->N, p->k, H);
    else
        gather_bwd_kernel<<<p->N, 256, 0, c->stream>>>((bf16 *)d_x, beta,
                                                       (const bf16 *)d_x_perm, p->pos, p->k, H);
    LAUNCH_CHECK("moe_gather_bwd", e);
    return 0;
}

extern "C" int gpu_moe_combine(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *out, float beta,
                               const gpu_bf16 *y_perm, const float *w, int H, dsv3_err *e)
{
    if (p->N == 0)
        return 0;
    if (H % 8 == 0 && !(aligned16(out) && aligned16(y_perm)))
        return err_set(e, "moe_combine: rows of %d values need 16-byte aligned bases", H);
    combine_kernel<<<p->N, 256, 0, c->stream>>>((bf16 *)out, beta, (const bf16 *)y_perm, w,
                                                p->pos, p->k, H);
    LAUNCH_CHECK("moe_combine", e);
    return 0;
}

extern "C" int gpu_moe_combine_bwd(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *d_y_perm,
                                   float *d_w, const gpu_bf16 *d_out, const gpu_bf16 *y_perm,
                                   const float *w, int H, dsv3_err *e)
{
    int n = p->N * p->k;
    if (n == 0)
        return 0;
    if (H % 8 == 0 && aligned16(d_y_perm) && aligned16(d_out) && aligned16(y_perm) && warp_rows())
        combine_bwd_warp_kernel<<<(n + 7) / 8, 256, 0, c->stream>>>(
            (bf16 *)d_y_perm, d_w, (const bf16 *)d_out, (const bf16 *)y_perm, w, p->order, n, p->k,
            H);
    else
        combine_bwd_kernel<<<n, 256, 0, c->stream>>>((bf16 *)d_y_perm, d_w, (const bf16 *)d_out,
                                                     (const bf16 *)y_perm, w, p->order, p->k, H);
    LAUNCH_CHECK("moe_combine_bwd", e);
    return 0;
}
