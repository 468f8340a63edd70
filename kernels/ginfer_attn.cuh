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

template <int PB>
__device__ __forceinline__ void attn_combine_row(float *dst, const float *pm, const float *pl,
                                                 const float *pacc, long v, int kv, int nsplit,
                                                 float *ws, float *ls, float *ML)
{
    attn_combine_span<PB>(pm, pl, pacc, v, kv, nsplit, 0, kv, ws, ls, ML,
                          [dst](int j, float a) { dst[j] = a; });
}

#endif
