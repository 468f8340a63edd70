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
#include <stdlib.h>
#include <string.h>

#include "cuda_util.cuh"
#include "ginfer_attn.cuh"
#include "ginfer_k.cuh"

#define ATT_HG 8       /* heads a block */
#define ATT_CH 32      /* cache rows staged at a time (a part of ~20 rows in one pass) */
#define ATT_THREADS 256
/* The staged cache rows' padding (values) with warp dots: rows 16-byte aligned, so the
 * staging stores float4s. Eight values a lane stored one at a time hit 4 banks a warp (8-way
 * conflicts); a one-row part's staging before the wait took 2.8-3.0 us of DeepSeek-V2-Lite's
 * 576-value rows and 1.35 of 1b-moe's, 2.15 and 1.10 now (DSV3_GINFER_CLOCK, H200). The
 * warp dots read a row's consecutive values a lane, conflict-free at any padding; the
 * serial dot (DSV3_GINFER_ATTN_DOT=0), a position a thread, keeps rows one value apart. */
#define ATT_PAD 4
/* Values of the newest row a thread loads when the parts form it (gk_kv_new): rows of at
 * most ATT_NEW_KU ATT_THREADS values (gk_attn_new_fits). */
#define ATT_NEW_KU 3

static size_t attn_smem(int kv, int rope)
{
    int W = kv + rope;
    return (size_t)(ATT_HG * W + ATT_CH * (W + ATT_PAD) + ATT_HG * ATT_CH + ATT_HG * kv +
                    3 * ATT_HG + ATT_CH * ATT_HG) * sizeof(float);
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
    attn_combine_row<16>(olat + v * kv, pm, pl, pacc, v, kv, nsplit, ws, ls, ML);
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

/* The chunk's scores by warps (the default; DSV3_GINFER_ATTN_DOT=0 keeps the serial dot of
 * one thread a (head, position), which read each query and cache value from shared memory
 * once a product: ~4,600 shared loads a warp and a chunk, the kernel's main cost). Warp w
 * takes positions w, w+8, w+16, w+24 of the chunk for all ATT_HG heads: its lanes split the
 * W values of a row (lane l: l, l+32, ...), each cache value is loaded once and used by the
 * 8 heads, so a lane keeps 32 independent partial sums; a transposing butterfly (31 shuffles)
 * then leaves lane l with the total of sum l = 4 h + i. A score is thus summed lane-wise in
 * order, then over the lanes in a fixed tree: deterministic, independent of the batch and the
 * other rows (not the serial order: the last bits differ). Scores of positions >= nt and
 * heads >= hn are -inf, as the serial dot writes them. */
#define ATT_NW (ATT_THREADS / 32)
#define ATT_TPW (ATT_CH / ATT_NW)  /* positions a warp */
static_assert(ATT_HG * ATT_TPW == 32, "one (head, position) sum a lane");

/* v[32] summed over the warp's lanes: lane l ends with the total of index l in v[0]. At the
 * step of distance o a lane keeps the half of its indices whose bit o matches its own and
 * adds its partner's values of that half. */
template <int O>
__device__ __forceinline__ void att_transpose_step(float (&v)[32], int lane)
{
    const bool up = lane & O;
#pragma unroll
    for (int i = 0; i < O; i++) {
        float send = up ? v[i] : v[i + O], keep = up ? v[i + O] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
    }
}

__device__ __forceinline__ void att_warp_transpose_sum(float (&v)[32])
{
    const int lane = threadIdx.x & 31;
    att_transpose_step<16>(v, lane);
    att_transpose_step<8>(v, lane);
    att_transpose_step<4>(v, lane);
    att_transpose_step<2>(v, lane);
    att_transpose_step<1>(v, lane);
}

/* NJ > 0: rows of W = 32 NJ values, known at compile time (the loop unrolled, every shared
 * address an immediate offset); 0: W and WP at run time. With W a runtime bound ptxas spent
 * ~70 integer and predicate instructions on each step's 12 loads and 32 products: the
 * phase was bound by issue (2,644 cycles at W = 288, H200; docs/KERNELS.md). The same
 * products in the same order either way, so the scores are bitwise the same. */
template <int NJ>
__device__ __forceinline__ void att_scores_warp(const float *qs, const float *cs, float *ps,
                                                int Wr, int WPr, int nt, int hn, float scale)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int W = NJ > 0 ? 32 * NJ : Wr, WP = NJ > 0 ? 32 * NJ + ATT_PAD : WPr;
    float v[32];
#pragma unroll
    for (int a = 0; a < 32; a++)
        v[a] = 0.0f;
    auto step = [&](int j0) {
        const int j = j0 + lane;
        const bool ok = j < W;
        float qv[ATT_HG], cv[ATT_TPW];
#pragma unroll
        for (int h = 0; h < ATT_HG; h++)
            qv[h] = ok ? qs[h * W + j] : 0.0f;
#pragma unroll
        for (int i = 0; i < ATT_TPW; i++) {
            int t = warp + ATT_NW * i;
            cv[i] = ok && t < nt ? cs[t * WP + j] : 0.0f;
        }
#pragma unroll
        for (int h = 0; h < ATT_HG; h++)
#pragma unroll
            for (int i = 0; i < ATT_TPW; i++)
                v[h * ATT_TPW + i] = fmaf(qv[h], cv[i], v[h * ATT_TPW + i]);
    };
    if constexpr (NJ > 0) {
#pragma unroll
        for (int s = 0; s < NJ; s++)
            step(32 * s);
    } else {
        for (int j0 = 0; j0 < W; j0 += 32)
            step(j0);
    }
    att_warp_transpose_sum(v);
    const int h = lane / ATT_TPW, t = warp + ATT_NW * (lane % ATT_TPW);
    ps[h * ATT_CH + t] = h < hn && t < nt ? v[0] * scale : -INFINITY;
}

/* The chunk's weighted latents added to acc [ATT_HG][kv] (rescaled by al first): a thread a
 * latent value j for all heads, each cache value loaded once, the heads' weights from pt
 * [ATT_CH][ATT_HG] (two 16-byte loads a position). The same operations in the same order as
 * the thread-a-(head, value) loop (bitwise its acc). out (the part's last chunk): the sums of
 * the hn heads go to out (head h's at out + h * hs) instead of acc, which saves the block a
 * barrier and a pass through shared memory. */
__device__ __forceinline__ void att_acc_heads(float *acc, const float *pt, const float *cs,
                                              const float *al, int kv, int WP, int nt,
                                              float *out, long hs, int hn)
{
    static_assert(ATT_HG == 8, "two float4 of weights a position");
    for (int j = threadIdx.x; j < kv; j += blockDim.x) {
        float a[ATT_HG];
#pragma unroll
        for (int h = 0; h < ATT_HG; h++)
            a[h] = acc[h * kv + j] * al[h];
        for (int t = 0; t < nt; t++) {
            float c = cs[t * WP + j];
            float4 p0 = *(const float4 *)(pt + t * ATT_HG), p1 = *(const float4 *)(pt + t * ATT_HG + 4);
            a[0] = fmaf(p0.x, c, a[0]);
            a[1] = fmaf(p0.y, c, a[1]);
            a[2] = fmaf(p0.z, c, a[2]);
            a[3] = fmaf(p0.w, c, a[3]);
            a[4] = fmaf(p1.x, c, a[4]);
            a[5] = fmaf(p1.y, c, a[5]);
            a[6] = fmaf(p1.z, c, a[6]);
            a[7] = fmaf(p1.w, c, a[7]);
        }
        if (out) {
#pragma unroll
            for (int h = 0; h < ATT_HG; h++)
                if (h < hn)
                    out[h * hs + j] = a[h];
        } else {
#pragma unroll
            for (int h = 0; h < ATT_HG; h++)
                acc[h * kv + j] = a[h];
        }
    }
}

/* Rows [a, b) of the chunk starting at row tc (a >= tc) into its place in cs, 8 values (16
 * bytes of bf16) a load, up to ATT_UNROLL loads of a thread in flight (a value a load, each
 * waited for before its store, took ~24 DRAM round trips a chunk). V4: rows 16-byte aligned
 * (WP a multiple of 4), stored as two float4s a load. */
template <bool V4, typename C>
__device__ __forceinline__ void att_stage_rows(float *cs, const C *cb, int W, int WP, int tc,
                                               int a, int b)
{
    const int W8 = W / 8, n = (b - a) * W8, tid = threadIdx.x;
    for (int i0 = tid; i0 < n; i0 += ATT_UNROLL * blockDim.x) {
        float f[ATT_UNROLL][8];
#pragma unroll
        for (int u = 0; u < ATT_UNROLL; u++) {
            int i = i0 + u * blockDim.x;
            if (i < n)
                att_ld8(cb + (long)(a + i / W8) * W + i % W8 * 8, f[u]);
        }
#pragma unroll
        for (int u = 0; u < ATT_UNROLL; u++) {
            int i = i0 + u * blockDim.x;
            if (i < n) {
                float *d = cs + (a - tc + i / W8) * WP + i % W8 * 8;
                if constexpr (V4) {
                    *(float4 *)d = make_float4(f[u][0], f[u][1], f[u][2], f[u][3]);
                    *(float4 *)(d + 4) = make_float4(f[u][4], f[u][5], f[u][6], f[u][7]);
                } else {
#pragma unroll
                    for (int k = 0; k < 8; k++)
                        d[k] = f[u][k];
                }
            }
        }
    }
}

/* 128 registers a thread at a runtime row width, 104 at a compiled one (NJ). Its one-row
 * staging before the wait ends after the wait (DSV3_GINFER_CLOCK): its blocks land only once
 * the q_lat GEMV's loads are done (that launch's late trigger, ginfer_k.cuh), and the row's
 * position and slot, then its older cache rows, are read from there (docs/KERNELS.md).
 * Capped at 80 registers (__launch_bounds__(ATT_THREADS, 3)) the scores spill and took 3.3
 * us instead of 1.4: 738 vs 699 us a 1b-moe step (H200, docs/PERF.md). */
template <typename C, bool WD, int NJ = 0, bool NEW = false>
__global__ void __launch_bounds__(ATT_THREADS)
    attn_split_k(int m, float *pm, float *pl, float *pacc, const float *qlat, const float *q,
                 int qk, int nope, const C *cache, const int *slot, const int *pos, int nh, int kv,
                 int rope, int n_ctx, int nsplit, float scale, float *olat, unsigned *count,
                 int pre, gk_kv_new nr, unsigned long long *clk)
{
    gk_clock ck;
    gk_clk_start(clk, ck);
    extern __shared__ float sm[];
    /* padded rows (ATT_PAD). NJ > 0 (att_nj): W = kv + rope is 32 NJ, a constant here, so
     * the staging's and the queries' divisions by W / 8 and W / 4 are too */
    const int W = NJ > 0 ? 32 * NJ : kv + rope, WP = W + (WD ? ATT_PAD : 1);
    float *qs = sm, *cs = qs + ATT_HG * W, *ps = cs + ATT_CH * WP, *acc = ps + ATT_HG * ATT_CH;
    float *mh = acc + ATT_HG * kv, *lh = mh + ATT_HG, *al = lh + ATT_HG, *pt = al + ATT_HG;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    const int r = blockIdx.x, h0 = blockIdx.y * ATT_HG, sp = blockIdx.z;
    const int hn = min(ATT_HG, nh - h0);
    const int len = pos[r] + 1, chunk = (len + nsplit - 1) / nsplit;
    const int t0 = sp * chunk, t1 = min(len, t0 + chunk);
    const C *cb = cache + (long)slot[r] * n_ctx * W;
    /* nr.kva (one row): the newest row (position len - 1) is formed here from kv_a's output
     * by the part holding it (gk_kv_new), q_pe rotated by every part: no launch before
     * writes the cache row or rotates q */
    const bool fresh = NEW && gridDim.x == 1, mine = fresh && t0 <= len - 1 && len - 1 < t1;
    const int half = rope / 2;
    /* before the wait (tables and weights: no kernel writes them): thread tid's rotation
     * of q_pe (pair tid % half of head tid / half: hn half <= ATT_THREADS, gk_attn_new_fits),
     * and with the newest row its norm weight, a thread's values i = tid + u ATT_THREADS */
    const float qc = fresh ? __ldg(nr.cos_t + (long)(len - 1) * half + tid % half) : 0.0f;
    const float qsn = fresh ? __ldg(nr.sin_t + (long)(len - 1) * half + tid % half) : 0.0f;
    float kvv[ATT_NEW_KU], kvw[ATT_NEW_KU];
#pragma unroll
    for (int u = 0; u < ATT_NEW_KU; u++)
        kvw[u] = mine && tid + u * ATT_THREADS < kv ? __ldg(nr.w + tid + u * ATT_THREADS) : 0.0f;
    /* before the wait (ginfer_k.cuh): the part's cache rows into L2 (positions and slots are
     * the host's copies; the row the launch before writes is read only after the wait, and
     * L2 holds its new values: a prefetch never makes a read stale) */
    if (gk_pdl_pf(m) && tid == 0 && t1 > t0) {
        size_t b = (size_t)(t1 - t0) * W * sizeof(C);
        gk_prefetch_l2(cb + (long)t0 * W, b < GK_PF_BLOCK ? b : GK_PF_BLOCK);
    }
    gk_clk(clk, 0, ck);  /* "ids": thread 0's prefetch needed the row's position and slot */
    /* one row (batch-1 decode): its first chunk's rows but the newest (the one row the
     * launch before writes) into shared memory before the wait, so after it only the
     * queries and that row are left to read: one L2 round trip fewer on the path, the same
     * values (DSV3_GINFER_ATTN_PRE=0: not, to compare) */
    const int tpre = gridDim.x == 1 && pre && gk_pdl_pf(m) ? min(min(t1, t0 + ATT_CH), len - 1)
                                                          : t0;
    att_stage_rows<WD>(cs, cb, W, WP, t0, t0, tpre);
    gk_clk(clk, 1, ck);
    gk_pdl_enter(m);
    gk_clk(clk, 2, ck);
    /* the heads' queries, 4 values a load (kv, rope, nope multiples of 8: aligned), all of a
     * thread's loads issued before its stores: one round trip, not one a value */
#pragma unroll
    for (int u = 0; u < ATT_NEW_KU; u++)
        kvv[u] = mine && tid + u * ATT_THREADS < W ? nr.kva[tid + u * ATT_THREADS] : 0.0f;
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
    if (mine) {  /* kv_write_row's operations (ginfer_attn.cuh), its bits */
        __shared__ float red[32];
        float rn = rsqrtf(block_sum(kv_row_ss<ATT_NEW_KU>(kvv, kv), red) / kv + nr.eps);
        float *rp = ps;  /* the rotary part rotated here (ps is free until the first scores) */
#pragma unroll
        for (int u = 0; u < ATT_NEW_KU; u++) {
            int i = tid + u * ATT_THREADS;
            if (i >= kv && i < W)
                rp[i - kv] = kvv[u];
        }
        __syncthreads();
        if (tid < half)
            rope_pair_at(rp, tid, half, nr.interleave, qc, qsn);
        __syncthreads();
        /* into its place in the staged chunk: the part is one chunk (gk_attn_new_fits) */
        C *dst = blockIdx.y == 0 ? (C *)cb + (long)(len - 1) * W : (C *)NULL;
        float *row = cs + (len - 1 - t0) * WP;
#pragma unroll
        for (int u = 0; u < ATT_NEW_KU; u++) {
            int i = tid + u * ATT_THREADS;
            if (i < W) {  /* kv_row_value's operations */
                C c = (C)(i < kv ? kvw[u] * (kvv[u] * rn) : rp[i - kv]);
                row[i] = (float)c;  /* the value the cache holds, as the staging reads it */
                if (dst)
                    dst[i] = c;
            }
        }
    }
    if (fresh) {
        __syncthreads();  /* the queries stored */
        if (tid < hn * half)
            rope_pair_at(qs + (tid / half) * W + kv, tid % half, half, nr.interleave, qc, qsn);
    }
    __syncthreads();
    gk_clk(clk, 3, ck);
    for (int tc = t0; tc < t1; tc += ATT_CH) {
        int nt = min(ATT_CH, t1 - tc);
        /* the newest row: in place already when the parts form it */
        att_stage_rows<WD>(cs, cb, W, WP, tc, tc == t0 ? tpre : tc, mine ? len - 1 : tc + nt);
        __syncthreads();
        gk_clk(clk, 4, ck);
        gk_pdl_late(m);  /* the part's first rows are in: the next launch may start */
        if (WD)
            att_scores_warp<NJ>(qs, cs, ps, W, WP, nt, hn, scale);
        else
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
        gk_clk(clk, 5, ck);
        for (int h = warp; h < ATT_HG; h += nw) {
            float mx = -INFINITY;
            for (int t = lane; t < ATT_CH; t += 32)
                mx = fmaxf(mx, ps[h * ATT_CH + t]);
            mx = warp_max(mx);
            float mold = mh[h], mnew = fmaxf(mold, mx), sum = 0;
            for (int t = lane; t < ATT_CH; t += 32) {
                float p = mnew == -INFINITY ? 0.0f : expf(ps[h * ATT_CH + t] - mnew);
                ps[h * ATT_CH + t] = p;
                pt[t * ATT_HG + h] = p;
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
        gk_clk(clk, 6, ck);
        /* the last chunk's sums straight to pacc (the part's (row, head) results are nsplit
         * rows apart) */
        float *out = WD && tc + ATT_CH >= t1 ? pacc + (((long)r * nh + h0) * nsplit + sp) * kv
                                             : (float *)NULL;
        if (WD)
            att_acc_heads(acc, pt, cs, al, kv, WP, nt, out, (long)nsplit * kv, hn);
        else
            for (int i = tid; i < ATT_HG * kv; i += blockDim.x) {
                int h = i / kv, j = i % kv;
                float a = acc[i] * al[h];
                for (int t = 0; t < nt; t++)
                    a = fmaf(ps[h * ATT_CH + t], cs[t * WP + j], a);
                acc[i] = a;
            }
        if (!out)  /* the next chunk's rows overwrite cs; after the last, nothing reads it */
            __syncthreads();
        gk_clk(clk, 7, ck);
    }
    gk_pdl_late(m);  /* an empty part has none */
    if (!WD || t1 <= t0)  /* else the last chunk wrote them */
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
    gk_clk(clk, 8, ck);
    gk_clk_end(clk, ck);
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

/* Whether the chunk's scores are taken by warps (att_scores_warp, the default) or by the
 * serial dot (DSV3_GINFER_ATTN_DOT=0, to compare). Read at each launch: a decode graph keeps
 * what held at its capture. */
static int att_warp_dot()
{
    const char *v = getenv("DSV3_GINFER_ATTN_DOT");
    return !(v && !strcmp(v, "0"));
}

/* Whether a one-row launch stages its first chunk's older cache rows before the wait (the
 * default; DSV3_GINFER_ATTN_PRE=0: after it, to compare). Read at each launch, as above. */
static int att_pre()
{
    const char *v = getenv("DSV3_GINFER_ATTN_PRE");
    return !(v && !strcmp(v, "0"));
}

/* The compile-time row widths of att_scores_warp (W = 32 NJ): small (kv 128 + rope 32),
 * the 1B-class MoE (256 + 32), DeepSeek-V2-Lite and V3 (512 + 64). Others take the runtime
 * loop, as does DSV3_GINFER_ATTN_NJ=0 (to compare; read at each launch as above). */
static int att_nj(int W)
{
    const char *v = getenv("DSV3_GINFER_ATTN_NJ");
    if (v && !strcmp(v, "0"))
        return 0;
    return W == 160 ? 5 : W == 288 ? 9 : W == 576 ? 18 : 0;
}

template <typename C>
static int attn_setup_c(int smem, dsv3_err *e)
{
    void (*k[])(int, float *, float *, float *, const float *, const float *, int, int,
                const C *, const int *, const int *, int, int, int, int, int, float, float *,
                unsigned *, int, gk_kv_new, unsigned long long *) = {
        attn_split_k<C, true>, attn_split_k<C, false>, attn_split_k<C, true, 5>,
        attn_split_k<C, true, 9>, attn_split_k<C, true, 18>, attn_split_k<C, true, 0, true>,
        attn_split_k<C, false, 0, true>, attn_split_k<C, true, 5, true>,
        attn_split_k<C, true, 9, true>, attn_split_k<C, true, 18, true>};
    for (size_t i = 0; i < sizeof k / sizeof *k; i++)
        CUDA_TRY(cudaFuncSetAttribute(k[i], cudaFuncAttributeMaxDynamicSharedMemorySize, smem), e);
    return 0;
}

/* The shared memory a launch of the form that forms the newest row asks for: at least
 * ATT_SOLO bytes, so that two of its blocks never share an SM (2 x (116 KB + the static and
 * the 1 KB the system keeps a block) is over an SM's 228 KB). Its blocks land as the q + kv_a
 * + q_lat launch's leave, whose 128-register blocks fill the SMs, and the scheduler put two
 * on one SM where one left first: their scores, softmax and acc phases then ran 1.5 times as
 * long (DSV3_GINFER_CLOCK, DeepSeek-V2-Lite, H200). DSV3_GINFER_ATT_SOLO=0: the plain size,
 * to compare. Read at each launch: a decode graph keeps what held at its capture. */
#define ATT_SOLO (116 * 1024)
static size_t attn_smem_new(int kv, int rope)
{
    const char *v = getenv("DSV3_GINFER_ATT_SOLO");
    size_t b = attn_smem(kv, rope);
    return v && !strcmp(v, "0") ? b : b > ATT_SOLO ? b : ATT_SOLO;
}

int gk_attn_setup(int cf32, int nh, int kv, int rope, dsv3_err *e)
{
    (void)nh;
    size_t b = attn_smem(kv, rope);
    int smem = (int)(b > ATT_SOLO ? b : ATT_SOLO);
    return cf32 ? attn_setup_c<float>(smem, e) : attn_setup_c<bf16>(smem, e);
}

/* The attn_split_k instance for cache type C: the serial dot (wd 0), else warp dots with
 * the row width att_nj picks; NEW: the form that forms the newest row itself (gk_kv_new). */
template <typename C, bool NEW>
static void (*attn_split_pick(int wd, int W))(int, float *, float *, float *, const float *,
                                               const float *, int, int, const C *, const int *,
                                               const int *, int, int, int, int, int, float,
                                               float *, unsigned *, int, gk_kv_new,
                                               unsigned long long *)
{
    if (!wd)
        return attn_split_k<C, false, 0, NEW>;
    switch (att_nj(W)) {
    case 5:
        return attn_split_k<C, true, 5, NEW>;
    case 9:
        return attn_split_k<C, true, 9, NEW>;
    case 18:
        return attn_split_k<C, true, 18, NEW>;
    default:
        return attn_split_k<C, true, 0, NEW>;
    }
}

/* attn_split_k over (N rows, head groups, nsplit parts), the variant att_warp_dot picks. */
static void attn_split_launch(cudaStream_t s, float *olat, float *pm, float *pl, float *pacc,
                              const float *qlat, const float *q, int qk, int nope,
                              const void *cache, int cf32, const int *slot, const int *pos,
                              int N, int nh, int kv, int rope, int n_ctx, int nsplit,
                              float scale, unsigned *count, int wd, const gk_kv_new *nr,
                              unsigned long long *clk)
{
    gk_kv_new nv = {};
    if (nr)
        nv = *nr;
    dim3 grid(N, (nh + ATT_HG - 1) / ATT_HG, nsplit);
    size_t smem = nr ? attn_smem_new(kv, rope) : attn_smem(kv, rope);
    if (cf32)
        gk_launch_as("attn", nr ? attn_split_pick<float, true>(wd, kv + rope)
                                : attn_split_pick<float, false>(wd, kv + rope),
                     grid, ATT_THREADS, smem, s,
                     pm, pl, pacc, qlat, q, qk, nope, (const float *)cache, slot, pos, nh, kv,
                     rope, n_ctx, nsplit, scale, olat, count, att_pre(), nv, clk);
    else
        gk_launch_as("attn", nr ? attn_split_pick<bf16, true>(wd, kv + rope)
                                : attn_split_pick<bf16, false>(wd, kv + rope),
                     grid, ATT_THREADS, smem, s, pm,
                     pl, pacc, qlat, q, qk, nope, (const bf16 *)cache, slot, pos, nh, kv, rope,
                     n_ctx, nsplit, scale, olat, count, att_pre(), nv, clk);
}

/* gk_attn with the score variant given (wd: att_scores_warp, else the serial dot). */
static int attn_run(cudaStream_t s, float *olat, float *pm, float *pl, float *pacc,
                    const float *qlat, const float *q, int qk, int nope, const void *cache,
                    int cf32, const int *slot, const int *pos, int N, int nh, int kv, int rope,
                    int n_ctx, int nsplit, float scale, unsigned *count, int wd, dsv3_err *e)
{
    if (N <= 0)
        return 0;
    if (nsplit < 1 || nsplit > ATT_MAXSPLIT)
        return err_set(e, "ginfer: attention in %d parts (1 to %d)", nsplit, ATT_MAXSPLIT);
    attn_split_launch(s, olat, pm, pl, pacc, qlat, q, qk, nope, cache, cf32, slot, pos, N, nh, kv,
                      rope, n_ctx, nsplit, scale, count, wd, (const gk_kv_new *)NULL,
                      (unsigned long long *)NULL);
    LAUNCH_CHECK("attn_split", e);
    if (count)
        return 0;  /* combined by each row and head group's last block */
    /* a thread a latent value (and at least one a part) */
    int ct = kv < ATT_MAXSPLIT ? ATT_MAXSPLIT : kv > 1024 ? 1024 : (kv + 31) / 32 * 32;
    gk_launch(attn_combine_k, N * nh, ct, 0, s, olat, pm, pl, pacc, kv, nsplit);
    LAUNCH_CHECK("attn_combine", e);
    return 0;
}

int gk_attn(cudaStream_t s, float *olat, float *pm, float *pl, float *pacc, const float *qlat,
            const float *q, int qk, int nope, const void *cache, int cf32, const int *slot,
            const int *pos, int N, int nh, int kv, int rope, int n_ctx, int nsplit, float scale,
            unsigned *count, dsv3_err *e)
{
    return attn_run(s, olat, pm, pl, pacc, qlat, q, qk, nope, cache, cf32, slot, pos, N, nh, kv,
                    rope, n_ctx, nsplit, scale, count, att_warp_dot(), e);
}

int gk_attn_parts(cudaStream_t s, float *pm, float *pl, float *pacc, const float *qlat,
                  const float *q, int qk, int nope, const void *cache, int cf32, const int *slot,
                  const int *pos, int N, int nh, int kv, int rope, int n_ctx, int nsplit,
                  float scale, const gk_kv_new *nr, unsigned long long *clk, dsv3_err *e)
{
    if (N <= 0)
        return 0;
    if (nsplit < 1 || nsplit > ATT_MAXSPLIT)
        return err_set(e, "ginfer: attention in %d parts (1 to %d)", nsplit, ATT_MAXSPLIT);
    if (nr && !gk_attn_new_fits(N, kv, rope, n_ctx, nsplit))
        return err_set(e, "ginfer: attention parts forming a cache row of %d + %d values for %d "
                       "rows in %d parts of a context of %d", kv, rope, N, nsplit, n_ctx);
    attn_split_launch(s, (float *)NULL, pm, pl, pacc, qlat, q, qk, nope, cache, cf32, slot, pos,
                      N, nh, kv, rope, n_ctx, nsplit, scale, (unsigned *)NULL, att_warp_dot(),
                      nr, clk);
    LAUNCH_CHECK("attn_split", e);
    return 0;
}

/* One row; a cache row of at most ATT_NEW_KU ATT_THREADS values; a rotation a thread (q_pe
 * of ATT_HG heads); every part one chunk at any length up to n_ctx, so that the newest row
 * goes into its place in the staged chunk at once (n_ctx <= 32 nsplit: -c 2048 at the
 * default 64 parts). */
int gk_attn_new_fits(int N, int kv, int rope, int n_ctx, int nsplit)
{
    return N == 1 && kv + rope <= ATT_NEW_KU * ATT_THREADS && rope % 2 == 0 &&
           ATT_HG * (rope / 2) <= ATT_THREADS && nsplit >= 1 &&
           (n_ctx + nsplit - 1) / nsplit <= ATT_CH;
}

size_t gk_attn_counts(int N, int nh)
{
    return (size_t)N * ((nh + ATT_HG - 1) / ATT_HG) * sizeof(unsigned);
}

/* ---- for tests (kernels/ginfer.h) ---- */

/* Device copies of n values (bf16 when !f32), freed by the caller. */
static void *att_upload(const float *h, size_t n, int f32)
{
    void *d = NULL;
    size_t b = n * (f32 ? sizeof(float) : sizeof(bf16));
    if (cudaMalloc(&d, b ? b : 16) != cudaSuccess)
        return NULL;
    if (f32) {
        cudaMemcpy(d, h, b, cudaMemcpyHostToDevice);
    } else {
        bf16 *t = (bf16 *)malloc(b ? b : 16);
        for (size_t i = 0; i < n; i++)
            t[i] = __float2bfloat16(h[i]);
        cudaMemcpy(d, t, b, cudaMemcpyHostToDevice);
        free(t);
    }
    return d;
}

extern "C" int ginfer_attn_run(const float *qlat, const float *qpe, const float *cache, int cf32,
                               const int *slot, const int *pos, int N, int nh, int kv, int rope,
                               int n_ctx, int n_slots, int nsplit, float scale, int warp_dot,
                               int fused, float *olat, dsv3_err *e)
{
    size_t W = (size_t)kv + rope, P = (size_t)N * nh * nsplit;
    size_t ncnt = gk_attn_counts(N, nh) / sizeof(unsigned);
    void *d[10] = {};
    d[0] = att_upload(qlat, (size_t)N * nh * kv, 1);
    d[1] = att_upload(qpe, (size_t)N * nh * rope, 1);
    d[2] = att_upload(cache, (size_t)n_slots * n_ctx * W, cf32);
    d[3] = att_upload((const float *)slot, (size_t)N, 1); /* raw 4-byte copies */
    d[4] = att_upload((const float *)pos, (size_t)N, 1);
    cudaMalloc(&d[5], P * sizeof(float));
    cudaMalloc(&d[6], P * sizeof(float));
    cudaMalloc(&d[7], P * kv * sizeof(float));
    cudaMalloc(&d[8], (size_t)N * nh * kv * sizeof(float));
    cudaMalloc(&d[9], (ncnt ? ncnt : 1) * sizeof(unsigned));
    int rc = 0;
    for (int i = 0; i < 10; i++)
        if (!d[i])
            rc = err_set(e, "ginfer_attn_run: out of device memory");
    if (!rc) {
        cudaMemset(d[9], 0, (ncnt ? ncnt : 1) * sizeof(unsigned));
        cudaMemset(d[8], 0xff, (size_t)N * nh * kv * sizeof(float));  /* NaN if unwritten */
        rc = gk_attn_setup(cf32, nh, kv, rope, e) ||
             attn_run(0, (float *)d[8], (float *)d[5], (float *)d[6], (float *)d[7],
                      (const float *)d[0], (const float *)d[1], rope, 0, d[2], cf32,
                      (const int *)d[3], (const int *)d[4], N, nh, kv, rope, n_ctx, nsplit, scale,
                      fused ? (unsigned *)d[9] : NULL, warp_dot, e);
    }
    if (!rc) {
        cudaError_t c = cudaDeviceSynchronize();
        if (c == cudaSuccess)
            c = cudaMemcpy(olat, d[8], (size_t)N * nh * kv * sizeof(float),
                           cudaMemcpyDeviceToHost);
        if (c != cudaSuccess)
            rc = err_set(e, "ginfer_attn_run: %s", cudaGetErrorString(c));
    }
    for (int i = 0; i < 10; i++)
        cudaFree(d[i]);
    return rc ? -1 : 0;
}
