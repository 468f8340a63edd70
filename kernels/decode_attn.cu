/* decode_attn: MLA attention over the latent cache for kernels/ginfer (see ginfer_k.cuh).
 *
 * The absorbed form: a head's score against cached token t is q_lat . c_kv_t + q_pe . k_pe_t,
 * one dot over the cache row's kv + rope values, and its output is the softmax-weighted sum of
 * the c_kv_t (mapped out through W_uv by the caller). The cache row is shared by all heads, so
 * a block takes one query row, a group of HG heads and one part of the sequence
 * (flash-decoding): it stages CH cache rows at a time in shared memory (read from device
 * memory once for the HG heads), keeps a running max, sum and weighted latent per head
 * (online softmax), and writes them as the part's result; a second kernel combines the parts.
 * With nsplit parts even one sequence at batch 1 spreads over many SMs. */
#include <stdint.h>

#include "cuda_util.cuh"
#include "ginfer_attn.cuh"
#include "ginfer_k.cuh"

#define ATT_HG 8       /* heads a block */
#define ATT_CH 32      /* cache rows staged at a time (a part of ~20 rows in one pass) */
#define ATT_THREADS 256

static size_t attn_smem(int kv, int rope)
{
    int W = kv + rope;
    return (size_t)(ATT_HG * W + ATT_CH * (W + 1) + ATT_HG * ATT_CH + ATT_HG * kv +
                    3 * ATT_HG) * sizeof(float);
}

/* Eight cache values from a 16-byte aligned place (bf16 or fp32). */
__device__ __forceinline__ void att_ld8(const bf16 *p, float (&f)[8])
{
    load8(p, f);
}

__device__ __forceinline__ void att_ld8(const float *p, float (&f)[8])
{
    float4 a = ((const float4 *)p)[0], b = ((const float4 *)p)[1];
    f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}

/* One (row, head) v's parts combined into olat (ginfer_attn.cuh). */
__device__ __forceinline__ void attn_combine_one(float *olat, const float *pm, const float *pl,
                                                 const float *pacc, long v, int kv, int nsplit,
                                                 float *ws, float *ls, float *ML)
{
    attn_combine_row(olat + v * kv, pm, pl, pacc, v, kv, nsplit, ws, ls, ML);
}

/* One block a (row, head). */
__global__ void attn_combine_k(int m, float *olat, const float *pm, const float *pl,
                               const float *pacc, int kv, int nsplit)
{
    gk_pdl_enter(m);
    __shared__ float ws[ATT_MAXSPLIT], ls[ATT_MAXSPLIT], ML[2];
    attn_combine_one(olat, pm, pl, pacc, blockIdx.x, kv, nsplit, ws, ls, ML);
}

#define ATT_UNROLL 4  /* vectors a thread has in flight while staging */

template <typename C>
__global__ void __launch_bounds__(ATT_THREADS)
    attn_split_k(int m, float *pm, float *pl, float *pacc, const float *qlat, const float *q,
                 int qk, int nope, const C *cache, const int *slot, const int *pos, int nh, int kv,
                 int rope, int n_ctx, int nsplit, float scale, float *olat, unsigned *count)
{
    extern __shared__ float sm[];
    const int W = kv + rope, WP = W + 1;  /* padded rows: a warp's dots hit 32 banks */
    float *qs = sm, *cs = qs + ATT_HG * W, *ps = cs + ATT_CH * WP, *acc = ps + ATT_HG * ATT_CH;
    float *mh = acc + ATT_HG * kv, *lh = mh + ATT_HG, *al = lh + ATT_HG;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    const int r = blockIdx.x, h0 = blockIdx.y * ATT_HG, sp = blockIdx.z;
    const int hn = min(ATT_HG, nh - h0);
    const int len = pos[r] + 1, chunk = (len + nsplit - 1) / nsplit;
    const int t0 = sp * chunk, t1 = min(len, t0 + chunk);
    const C *cb = cache + (long)slot[r] * n_ctx * W;
    /* before the wait (ginfer_k.cuh): the part's cache rows into L2 (positions and slots are
     * the host's copies; the row the launch before writes is read only after the wait, and
     * L2 holds its new values: a prefetch never makes a read stale) */
    if (gk_pdl_pf(m) && tid == 0 && t1 > t0) {
        size_t b = (size_t)(t1 - t0) * W * sizeof(C);
        gk_prefetch_l2(cb + (long)t0 * W, b < GK_PF_BLOCK ? b : GK_PF_BLOCK);
    }
    gk_pdl_enter(m);
    /* the heads' queries, 4 values a load (kv, rope, nope multiples of 8: aligned), all of a
     * thread's loads issued before its stores: one round trip, not one a value */
    const int W4 = W / 4;
    for (int i0 = tid; i0 < ATT_HG * W4; i0 += ATT_UNROLL * blockDim.x) {
        float4 v[ATT_UNROLL];
#pragma unroll
        for (int u = 0; u < ATT_UNROLL; u++) {
            int i = i0 + u * blockDim.x, h = i / W4, j = i % W4 * 4;
            v[u] = make_float4(0, 0, 0, 0);
            if (i < ATT_HG * W4 && h < hn)
                v[u] = j < kv ? *(const float4 *)&qlat[((long)r * nh + h0 + h) * kv + j]
                              : *(const float4 *)&q[((long)r * nh + h0 + h) * qk + nope + j - kv];
        }
#pragma unroll
        for (int u = 0; u < ATT_UNROLL; u++) {
            int i = i0 + u * blockDim.x;
            if (i < ATT_HG * W4)
                *(float4 *)&qs[i * 4] = v[u];
        }
    }
    for (int i = tid; i < ATT_HG * kv; i += blockDim.x)
        acc[i] = 0;
    if (tid < ATT_HG) {
        mh[tid] = -INFINITY;
        lh[tid] = 0;
    }
    __syncthreads();
    for (int tc = t0; tc < t1; tc += ATT_CH) {
        int nt = min(ATT_CH, t1 - tc), W8 = W / 8;
        /* the chunk's cache rows, 8 values (16 bytes of bf16) a load, up to ATT_UNROLL loads
         * of a thread in flight (a value a load, each waited for before its store, took
         * ~24 DRAM round trips a chunk) */
        for (int i0 = tid; i0 < nt * W8; i0 += ATT_UNROLL * blockDim.x) {
            float f[ATT_UNROLL][8];
#pragma unroll
            for (int u = 0; u < ATT_UNROLL; u++) {
                int i = i0 + u * blockDim.x;
                if (i < nt * W8)
                    att_ld8(cb + (long)(tc + i / W8) * W + i % W8 * 8, f[u]);
            }
#pragma unroll
            for (int u = 0; u < ATT_UNROLL; u++) {
                int i = i0 + u * blockDim.x;
                if (i < nt * W8) {
                    float *d = cs + i / W8 * WP + i % W8 * 8;
#pragma unroll
                    for (int k = 0; k < 8; k++)
                        d[k] = f[u][k];
                }
            }
        }
        __syncthreads();
        gk_pdl_late(m);  /* the part's first rows are in: the next launch may start */
        for (int i = tid; i < ATT_HG * ATT_CH; i += blockDim.x) {
            int h = i / ATT_CH, t = i % ATT_CH;
            float sc = -INFINITY;
            if (h < hn && t < nt) {
                float d = 0;
                const float *qh = qs + h * W, *ct = cs + t * WP;
                for (int j = 0; j < W; j++)
                    d = fmaf(qh[j], ct[j], d);
                sc = d * scale;
            }
            ps[i] = sc;
        }
        __syncthreads();
        for (int h = warp; h < ATT_HG; h += nw) {
            float mx = -INFINITY;
            for (int t = lane; t < ATT_CH; t += 32)
                mx = fmaxf(mx, ps[h * ATT_CH + t]);
            mx = warp_max(mx);
            float mold = mh[h], mnew = fmaxf(mold, mx), sum = 0;
            for (int t = lane; t < ATT_CH; t += 32) {
                float p = mnew == -INFINITY ? 0.0f : expf(ps[h * ATT_CH + t] - mnew);
                ps[h * ATT_CH + t] = p;
                sum += p;
            }
            sum = warp_sum(sum);
            if (lane == 0) {
                float a = mold == -INFINITY ? 0.0f : expf(mold - mnew);
                al[h] = a;
                lh[h] = lh[h] * a + sum;
                mh[h] = mnew;
            }
        }
        __syncthreads();
        for (int i = tid; i < ATT_HG * kv; i += blockDim.x) {
            int h = i / kv, j = i % kv;
            float a = acc[i] * al[h];
            for (int t = 0; t < nt; t++)
                a = fmaf(ps[h * ATT_CH + t], cs[t * WP + j], a);
            acc[i] = a;
        }
        __syncthreads();
    }
    gk_pdl_late(m);  /* an empty part has none */
    for (int i = tid; i < hn * kv; i += blockDim.x) {
        int h = i / kv, j = i % kv;
        long b = ((long)r * nh + h0 + h) * nsplit + sp;
        pacc[b * kv + j] = acc[i];
    }
    if (tid < hn) {
        long b = ((long)r * nh + h0 + tid) * nsplit + sp;
        pm[b] = mh[tid];
        pl[b] = lh[tid];
    }
    if (!count)
        return;
    /* fused combine (count: a counter a (row, head group), zero between launches): the last
     * of the nsplit blocks of this row and head group to finish combines the group's heads,
     * which saves the combine's launch. Each thread's part results are made visible before
     * the block counts itself; the last block resets the counter for the next launch. */
    __shared__ float ws[ATT_MAXSPLIT], ls[ATT_MAXSPLIT], ML[2];
    __shared__ unsigned last;
    __threadfence();
    __syncthreads();
    unsigned *cnt = count + (long)r * gridDim.y + blockIdx.y;
    if (tid == 0)
        last = atomicAdd(cnt, 1u) == (unsigned)nsplit - 1;
    __syncthreads();
    if (!last)
        return;
    __threadfence();
    for (int h = 0; h < hn; h++)
        attn_combine_one(olat, pm, pl, pacc, (long)r * nh + h0 + h, kv, nsplit, ws, ls, ML);
    if (tid == 0)
        *cnt = 0;
}

int gk_attn_setup(int cf32, int nh, int kv, int rope, dsv3_err *e)
{
    (void)nh;
    int smem = (int)attn_smem(kv, rope);
    if (cf32)
        CUDA_TRY(cudaFuncSetAttribute(attn_split_k<float>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, smem), e);
    else
        CUDA_TRY(cudaFuncSetAttribute(attn_split_k<bf16>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, smem), e);
    return 0;
}

int gk_attn(cudaStream_t s, float *olat, float *pm, float *pl, float *pacc, const float *qlat,
            const float *q, int qk, int nope, const void *cache, int cf32, const int *slot,
            const int *pos, int N, int nh, int kv, int rope, int n_ctx, int nsplit, float scale,
            unsigned *count, dsv3_err *e)
{
    if (N <= 0)
        return 0;
    if (nsplit < 1 || nsplit > ATT_MAXSPLIT)
        return err_set(e, "ginfer: attention in %d parts (1 to %d)", nsplit, ATT_MAXSPLIT);
    dim3 grid(N, (nh + ATT_HG - 1) / ATT_HG, nsplit);
    size_t smem = attn_smem(kv, rope);
    if (cf32)
        gk_launch(attn_split_k<float>, grid, ATT_THREADS, smem, s, pm, pl, pacc, qlat, q, qk,
                  nope, (const float *)cache, slot, pos, nh, kv, rope, n_ctx, nsplit, scale,
                  olat, count);
    else
        gk_launch(attn_split_k<bf16>, grid, ATT_THREADS, smem, s, pm, pl, pacc, qlat, q, qk,
                  nope, (const bf16 *)cache, slot, pos, nh, kv, rope, n_ctx, nsplit, scale,
                  olat, count);
    LAUNCH_CHECK("attn_split", e);
    if (count)
        return 0;  /* combined by each row and head group's last block */
    /* a thread a latent value (and at least one a part) */
    int ct = kv < ATT_MAXSPLIT ? ATT_MAXSPLIT : kv > 1024 ? 1024 : (kv + 31) / 32 * 32;
    gk_launch(attn_combine_k, N * nh, ct, 0, s, olat, pm, pl, pacc, kv, nsplit);
    LAUNCH_CHECK("attn_combine", e);
    return 0;
}

int gk_attn_parts(cudaStream_t s, float *pm, float *pl, float *pacc, const float *qlat,
                  const float *q, int qk, int nope, const void *cache, int cf32, const int *slot,
                  const int *pos, int N, int nh, int kv, int rope, int n_ctx, int nsplit,
                  float scale, dsv3_err *e)
{
    if (N <= 0)
        return 0;
    if (nsplit < 1 || nsplit > ATT_MAXSPLIT)
        return err_set(e, "ginfer: attention in %d parts (1 to %d)", nsplit, ATT_MAXSPLIT);
    dim3 grid(N, (nh + ATT_HG - 1) / ATT_HG, nsplit);
    size_t smem = attn_smem(kv, rope);
    if (cf32)
        gk_launch(attn_split_k<float>, grid, ATT_THREADS, smem, s, pm, pl, pacc, qlat, q, qk,
                  nope, (const float *)cache, slot, pos, nh, kv, rope, n_ctx, nsplit, scale,
                  (float *)NULL, (unsigned *)NULL);
    else
        gk_launch(attn_split_k<bf16>, grid, ATT_THREADS, smem, s, pm, pl, pacc, qlat, q, qk,
                  nope, (const bf16 *)cache, slot, pos, nh, kv, rope, n_ctx, nsplit, scale,
                  (float *)NULL, (unsigned *)NULL);
    LAUNCH_CHECK("attn_split", e);
    return 0;
}

size_t gk_attn_counts(int N, int nh)
{
    return (size_t)N * ((nh + ATT_HG - 1) / ATT_HG) * sizeof(unsigned);
}
