/* ginfer_attn: the attention combine of kernels/decode_attn.cu as a device function (C++
 * only), shared with the GEMV of kernels/ginfer_k.cu that combines the parts itself (the
 * fused "uvc" decode launch): both compute it with the same operations in the same order. */
#ifndef DSV3_GINFER_ATTN_CUH
#define DSV3_GINFER_ATTN_CUH

#include "cuda_util.cuh"

#define ATT_MAXSPLIT 64  /* parts a sequence is cut into, at most */

static_assert(ATT_MAXSPLIT == 64, "two parts a lane of one warp");

/* One (row, head) v's parts combined by the calling block (at least 64 threads; ws, ls
 * [ATT_MAXSPLIT], ML [2] shared) into dst[kv] (device or shared memory): the parts' sums
 * rescaled to the common max. Every part's max and sum are loaded at once (a thread a part),
 * warp 0 reduces the common max (exact: any order gives it) and the rescaled sum (a fixed
 * tree: the result does not depend on the batch), then each thread sums its latent values
 * over the parts in order, PB parts' loads in flight at a time. (A serial loop over the
 * parts' maxima in one thread cost ~30 us a layer at 64 parts: a chain of L2 round trips;
 * the serial loops over shared memory that replaced it, one for the max and one for the sum,
 * ~0.5 us each a launch. A loop of loads and products, even unrolled, kept ~5 loads in
 * flight, ptxas reusing their registers: ~13 L2 round trips, 3.8 us of the 1b-moe uv launch
 * (DSV3_GINFER_CLOCK); a warp barrier after each batch of PB loads keeps ptxas from moving
 * them down to their products. PB 64 costs ~255 registers a thread.) The parts are read
 * through L2 (__ldcg): they may have been written by other blocks of the same grid. Ends
 * with a barrier (ws reusable). attn_combine_span: latent values [j0, j1) only, each handed
 * to out(j, value) (the same operations for each value as the whole row's). */
template <int PB, typename Out>
__device__ __forceinline__ void attn_combine_span(const float *pm, const float *pl,
                                                  const float *pacc, long v, int kv, int nsplit,
                                                  int j0, int j1, float *ws, float *ls, float *ML,
                                                  Out out)
{
    static_assert(PB >= 1 && PB <= ATT_MAXSPLIT, "parts a batch");
    long b = v * nsplit;
    int t = threadIdx.x;
    /* PB = every part, one value a thread: its loads issued first, in flight while the
     * parts' maxima and sums are read and reduced (one L2 round trip fewer on the path) */
    const bool pre = PB == ATT_MAXSPLIT && j1 - j0 <= (int)blockDim.x;
    float x[PB];
    if (pre && t < j1 - j0) {
        const float *pj = pacc + b * kv + j0 + t;
#pragma unroll
        for (int u = 0; u < PB; u++)
            x[u] = __ldcg(pj + (long)min(u, nsplit - 1) * kv);
    }
    if (t < ATT_MAXSPLIT) {
        ws[t] = t < nsplit ? __ldcg(pm + b + t) : -INFINITY;
        ls[t] = t < nsplit ? __ldcg(pl + b + t) : 0.0f;
    }
    __syncthreads();
    if (t < 32) {
        float m0 = ws[t], m1 = ws[t + 32];
        float M = warp_max(fmaxf(m0, m1));
        float w0 = m0 == -INFINITY ? 0.0f : expf(m0 - M);
        float w1 = m1 == -INFINITY ? 0.0f : expf(m1 - M);
        float L = warp_sum(ls[t] * w0 + ls[t + 32] * w1);
        ws[t] = w0;
        ws[t + 32] = w1;
        if (t == 0)
            ML[1] = L;
    }
    __syncthreads();
    float L = ML[1];
    if (pre) {
        if (t < j1 - j0) {
            float a = 0;
#pragma unroll
            for (int u = 0; u < PB; u++)
                if (u < nsplit)
                    a += ws[u] * x[u];
            out(j0 + t, a / L);
        }
        __syncthreads();
        return;
    }
    for (int j = j0 + t; j < j1; j += blockDim.x) {
        const float *pj = pacc + b * kv + j;
        float a = 0;
        for (int s0 = 0; s0 < nsplit; s0 += PB) {
#pragma unroll
            for (int u = 0; u < PB; u++)  /* past nsplit: the last part again, unused */
                x[u] = __ldcg(pj + (long)min(s0 + u, nsplit - 1) * kv);
            __syncwarp(__activemask());
#pragma unroll
            for (int u = 0; u < PB; u++)
                if (s0 + u < nsplit)
                    a += ws[s0 + u] * x[u];  /* an empty part's pacc is 0 */
        }
        out(j, a / L);
    }
    __syncthreads();
}

/* lib/ops rope_forward on one vector v of 2*half values with table row t. The roundings are
 * spelled out: from a plain x0 c - x1 s ptxas may or may not form an FMA, kernel by kernel,
 * and the engine rotates q in one kernel or another (kv_write_row, or the attention parts
 * with a gk_kv_new), which must give the same bits. */
__device__ __forceinline__ void rope_pair_at(float *v, int j, int half, int interleave, float c,
                                             float sn)
{
    float *a = interleave ? &v[2 * j] : &v[j];
    float *b = interleave ? &v[2 * j + 1] : &v[j + half];
    float x0 = *a, x1 = *b;
    *a = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, sn));
    *b = __fmaf_rn(x0, sn, __fmul_rn(x1, c));
}

__device__ __forceinline__ void rope_pair(float *v, int j, int half, int interleave,
                                          const float *c, const float *sn)
{
    rope_pair_at(v, j, half, interleave, c[j], sn[j]);
}

/* A token's cache row from its kv_a output src [kv + rope], in three steps shared by the
 * engine's cache write (kernels/ginfer_k.cu kv_write_row) and the one-row attention parts
 * that form their newest row themselves (kernels/decode_attn.cu): the same operations in
 * the same order (with the same block size, 256 threads), so the same bits. kv_row_load:
 * row [kv + rope] (shared) = src, returns the thread's sum of squares of the latent (for
 * block_sum); kv_row_value: value i of the row once the rotary part is rotated in place
 * (rope_pair) and r = rsqrt(mean square + eps) is known (the latent normed, weight w). */
__device__ __forceinline__ float kv_row_load(float *row, const float *src, int kv, int W)
{
    float ss = 0;
    for (int i = threadIdx.x; i < W; i += blockDim.x) {
        float v = src[i];
        row[i] = v;
        if (i < kv)
            ss = __fmaf_rn(v, v, ss);
    }
    return ss;
}

/* kv_row_load's sum of squares over the thread's values loaded ahead, v[u] = src[threadIdx.x +
 * u blockDim.x] (KU blockDim.x >= W; past W unused), so their loads can share a round trip
 * with others and the row can stay in registers. */
template <int KU>
__device__ __forceinline__ float kv_row_ss(const float (&v)[KU], int kv)
{
    float ss = 0;
#pragma unroll
    for (int u = 0; u < KU; u++)
        if (threadIdx.x + u * blockDim.x < kv)
            ss = __fmaf_rn(v[u], v[u], ss);
    return ss;
}

__device__ __forceinline__ float kv_row_value(const float *row, const float *w, float r, int kv,
                                              int i)
{
    return i < kv ? w[i] * (row[i] * r) : row[i];
}

template <int PB>
__device__ __forceinline__ void attn_combine_row(float *dst, const float *pm, const float *pl,
                                                 const float *pacc, long v, int kv, int nsplit,
                                                 float *ws, float *ls, float *ML)
{
    attn_combine_span<PB>(pm, pl, pacc, v, kv, nsplit, 0, kv, ws, ls, ML,
                          [dst](int j, float a) { dst[j] = a; });
}

#endif
