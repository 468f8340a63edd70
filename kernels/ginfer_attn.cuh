/* ginfer_attn: the attention combine of kernels/decode_attn.cu as a device function (C++
 * only), shared with the GEMV of kernels/ginfer_k.cu that combines the parts itself (the
 * fused "uvc" decode launch): both compute it with the same operations in the same order. */
#ifndef DSV3_GINFER_ATTN_CUH
#define DSV3_GINFER_ATTN_CUH

#include "cuda_util.cuh"

#define ATT_MAXSPLIT 64  /* parts a sequence is cut into, at most */

/* One (row, head) v's parts combined by the calling block (at least min(nsplit, 64) threads;
 * ws, ls [ATT_MAXSPLIT], ML [2] shared) into dst[kv] (device or shared memory): the parts'
 * sums rescaled to the common max. Every part's max and sum are loaded at once (a thread a
 * part), the common max and the rescaled sum reduced in shared memory (a fixed order: the
 * result does not depend on the batch), then each thread sums its latent values over the
 * parts with independent loads. (A serial loop over the parts' maxima in one thread cost
 * ~30 us a layer at 64 parts: a chain of L2 round trips.) The parts are read through L2
 * (__ldcg): they may have been written by other blocks of the same grid. Ends with a barrier
 * (ws reusable). */
__device__ __forceinline__ void attn_combine_row(float *dst, const float *pm, const float *pl,
                                                 const float *pacc, long v, int kv, int nsplit,
                                                 float *ws, float *ls, float *ML)
{
    long b = v * nsplit;
    int t = threadIdx.x;
    float m = t < nsplit ? __ldcg(pm + b + t) : -INFINITY;
    float l = t < nsplit ? __ldcg(pl + b + t) : 0.0f;
    if (t < ATT_MAXSPLIT)
        ws[t] = m;
    __syncthreads();
    if (t == 0) {
        float M = -INFINITY;
        for (int s = 0; s < nsplit; s++)
            M = fmaxf(M, ws[s]);
        ML[0] = M;
    }
    __syncthreads();
    float M = ML[0], w = m == -INFINITY ? 0.0f : expf(m - M);
    __syncthreads();
    if (t < ATT_MAXSPLIT) {
        ws[t] = w;
        ls[t] = l * w;
    }
    __syncthreads();
    if (t == 0) {
        float L = 0;
        for (int s = 0; s < nsplit; s++)
            L += ls[s];
        ML[1] = L;
    }
    __syncthreads();
    float L = ML[1];
    for (int j = t; j < kv; j += blockDim.x) {
        float a = 0;
#pragma unroll 64  /* every part's load in flight at once: one L2 round trip, not four */
        for (int s = 0; s < nsplit; s++)
            a += ws[s] * __ldcg(pacc + (b + s) * kv + j);  /* an empty part's pacc is 0 */
        dst[j] = a / L;
    }
    __syncthreads();
}

#endif
