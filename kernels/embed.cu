/* embed: embedding lookup, and its gradient as per-id sums over id-sorted tokens. */
#include "gpuctx_internal.cuh"
#include "layers.h"
#include "sort.h"

__global__ void embedding_fwd_kernel(bf16 *out, const bf16 *table, const int32_t *ids, int H)
{
    const bf16 *src = table + (int64_t)ids[blockIdx.x] * H;
    bf16 *dst = out + (int64_t)blockIdx.x * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x)
        dst[i] = src[i];
}

__global__ void iota_kernel(int32_t *v, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        v[i] = i;
}

/* Block b: if sorted position b starts a run of one id, sums that run's rows in token
 * order and adds the sum to the id's row of d_table. Other blocks return at once. */
__global__ void embedding_bwd_kernel(float *d_table, const bf16 *d_out, const int32_t *id_sorted,
                                     const int32_t *tok_sorted, int N, int H)
{
    int b = blockIdx.x;
    int id = id_sorted[b];
    if (b > 0 && id_sorted[b - 1] == id)
        return;
    int end = b + 1;
    while (end < N && id_sorted[end] == id)
        end++;
    float *dst = d_table + (int64_t)id * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        float s = 0;
        for (int p = b; p < end; p++)
            s += b2f(d_out[(int64_t)tok_sorted[p] * H + i]);
        dst[i] += s;
    }
}

extern "C" int gpu_embedding_fwd(gpu_ctx *c, gpu_bf16 *out, const gpu_bf16 *table,
                                 const int32_t *ids, int N, int H, dsv3_err *e)
{
    if (N <= 0)
        return 0;
    embedding_fwd_kernel<<<N, 256, 0, c->stream>>>((bf16 *)out, (const bf16 *)table, ids, H);
    LAUNCH_CHECK("embedding_fwd", e);
    return 0;
}

extern "C" int gpu_embedding_bwd(gpu_ctx *c, float *d_table, const gpu_bf16 *d_out,
                                 const int32_t *ids, int N, int H, int V, dsv3_err *e)
{
    if (N <= 0)
        return 0;
    size_t mark = gpu_arena_mark(c);
    int32_t *tok = (int32_t *)gpu_arena_alloc(c, (size_t)N * 4, e);
    int32_t *ids_s = tok ? (int32_t *)gpu_arena_alloc(c, (size_t)N * 4, e) : NULL;
    int32_t *tok_s = ids_s ? (int32_t *)gpu_arena_alloc(c, (size_t)N * 4, e) : NULL;
    if (!tok_s)
        return -1;
    iota_kernel<<<(N + 255) / 256, 256, 0, c->stream>>>(tok, N);
    LAUNCH_CHECK("iota", e);
    if (gpu_sort_pairs(c, ids_s, tok_s, ids, tok, N, V, e))
        return -1;
    embedding_bwd_kernel<<<N, 256, 0, c->stream>>>(d_table, (const bf16 *)d_out, ids_s, tok_s,
                                                   N, H);
    LAUNCH_CHECK("embedding_bwd", e);
    gpu_arena_reset(c, mark);
    return 0;
}
