/* ginfer_k: the inference kernels of kernels/ginfer but attention (see ginfer_k.cuh): GEMVs for
 * decode-sized row counts, the norms and rotations of MLA, and the grouped MoE. */
#include <limits.h>
#include <stdint.h>

#include <cooperative_groups.h>

#include "cuda_util.cuh"
#include "ginfer_attn.cuh"
#include "ginfer.h"
#include "ginfer_k.cuh"
#include "route_row.cuh"

namespace cg = cooperative_groups;

#define GK_WARPS 8  /* warps a block: one output row each */

/* Eight weights from a 16-byte aligned row (bf16) or two 16-byte loads (fp32). */
__device__ __forceinline__ void ldw8(const bf16 *p, float (&f)[8])
{
    load8(p, f);
}

__device__ __forceinline__ void ldw8(const float *p, float (&f)[8])
{
    float4 a = __ldg((const float4 *)p), b = __ldg((const float4 *)p + 1);
    f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}

__device__ __forceinline__ void ldx8(const float *p, float (&f)[8])
{
    float4 a = *(const float4 *)p, b = *((const float4 *)p + 1);
    f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}

/* The weights' raw bytes for 8 values: one 16-byte load (bf16) or two (fp32), converted to
 * floats (w8_float) only after the wait, so the registers a lane holds before it stay few. */
template <typename W> struct raw8 {
    uint4 u[sizeof(W) / 2];
};

template <typename W>
__device__ __forceinline__ void raw8_load(const W *p, raw8<W> &r)
{
#pragma unroll
    for (int k = 0; k < (int)(sizeof(W) / 2); k++)
        r.u[k] = __ldg((const uint4 *)p + k);
}

__device__ __forceinline__ void raw8_float(const raw8<bf16> &r, float (&f)[8])
{
    const __nv_bfloat162 *h = (const __nv_bfloat162 *)&r.u[0];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 t = __bfloat1622float2(h[i]);
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
}

__device__ __forceinline__ void raw8_float(const raw8<float> &r, float (&f)[8])
{
    const float *a = (const float *)&r.u[0];
#pragma unroll
    for (int i = 0; i < 8; i++)
        f[i] = a[i];
}

/* warp_dots for one input row with every load of a lane for WD_CH pieces (each weight row's
 * and x's) issued before its first product: the products and the warp sum in warp_dots'
 * order, so acc is bitwise warp_dots'. A piece past the end loads the chunk's first piece
 * again and adds fmaf(0, 0, acc), which is acc (a sum that starts at +0 is never -0). In
 * warp_dots' loop, unrolled over a runtime bound, ptxas put each piece's loads behind the
 * products of the piece before (their registers reused): four memory round trips for a
 * 1024-wide row instead of one. It costs registers (gemv_k's one-row form: 32 -> 64), which
 * cost more than the round trips save in launches whose blocks must land before the wait to
 * prefetch (the experts' down-projection, the q_lat GEMV: measured, twelfth and thirteenth
 * sessions), so only gemv_k and grouped1_k take it. */
#define WD_CH 4
template <typename W, int NW, int CH = WD_CH>
__device__ __forceinline__ void warp_dots_ahead(const W *const *w, const float *x, int I,
                                                float (&acc)[NW])
{
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int a = 0; a < NW; a++)
        acc[a] = 0.0f;
    for (int i0 = lane * 8; i0 < I + lane * 8; i0 += 256 * CH) {
        raw8<W> wr[NW][CH];
        float xf[CH][8];
#pragma unroll
        for (int c = 0; c < CH; c++) {
            int i = i0 + 256 * c < I ? i0 + 256 * c : 0;
#pragma unroll
            for (int a = 0; a < NW; a++)
                raw8_load(w[a] + i, wr[a][c]);
            ldx8(x + i, xf[c]);
        }
#pragma unroll
        for (int a = 0; a < NW; a++)
#pragma unroll
            for (int c = 0; c < CH; c++) {
                const bool in = i0 + 256 * c < I;
                float wf[8];
                raw8_float(wr[a][c], wf);
#pragma unroll
                for (int k = 0; k < 8; k++)
                    acc[a] = fmaf(in ? wf[k] : 0.0f, in ? xf[c][k] : 0.0f, acc[a]);
            }
    }
#pragma unroll
    for (int a = 0; a < NW; a++)
        acc[a] = warp_sum(acc[a]);
}

/* The warp's dot products of NW weight rows with nv (<= NT) input rows over I values: each
 * lane sums its 8-value pieces in order, then the warp sums the lanes (fixed tree), so a
 * row's result does not depend on NT, nv or the other rows. acc is the same in all lanes. */
template <typename W, int NT, int NW>
__device__ __forceinline__ void warp_dots(const W *const *w, const float *const *x, int nv, int I,
                                          float (&acc)[NW][NT])
{
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int a = 0; a < NW; a++)
#pragma unroll
        for (int t = 0; t < NT; t++)
            acc[a][t] = 0.0f;
#pragma unroll 4  /* a 1024-wide row's loads all in flight at once */
    for (int i = lane * 8; i < I; i += 256) {
        float wf[NW][8];
#pragma unroll
        for (int a = 0; a < NW; a++)
            ldw8(w[a] + i, wf[a]);
#pragma unroll
        for (int t = 0; t < NT; t++) {
            if (t < nv) {
                float xf[8];
                ldx8(x[t] + i, xf);
#pragma unroll
                for (int a = 0; a < NW; a++)
#pragma unroll
                    for (int k = 0; k < 8; k++)
                        acc[a][t] = fmaf(wf[a][k], xf[k], acc[a][t]);
            }
        }
    }
#pragma unroll
    for (int a = 0; a < NW; a++)
#pragma unroll
        for (int t = 0; t < NT; t++)
            acc[a][t] = warp_sum(acc[a][t]);
}

/* gemv_k's work for block (blockIdx.x, b); AHEAD: one row's dots by warp_dots_ahead. */
template <typename W, int NT, bool AHEAD = false>
/* Outputs o >= O1 go to y2 (row n at y2 + n ldy2, output o - O1) instead of y: one launch
 * for two products of one input (gk_gemv_two); O1 >= O, none. */
__device__ __forceinline__ void gemv_block(int m, const float *__restrict__ x, long ldx, long xbs,
                                           const W *__restrict__ w, long wbs,
                                           float *__restrict__ y, long ldy, long ybs, int N,
                                           int I, int O, int b, float *y2 = NULL, long ldy2 = 0,
                                           int O1 = INT_MAX)
{
    int o = blockIdx.x * GK_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (o >= O)
        return;
    const W *wr[1] = {w + b * wbs + (long)o * I};
    const float *xb = x + b * xbs;
    for (int n0 = 0; n0 < N; n0 += NT) {
        int nv = min(NT, N - n0);
        const float *xs[NT];
#pragma unroll
        for (int t = 0; t < NT; t++)
            xs[t] = xb + (long)(n0 + (t < nv ? t : 0)) * ldx;
        float acc[1][NT];
        if constexpr (AHEAD && NT == 1)
            warp_dots_ahead<W, 1>(wr, xs[0], I, acc[0]);
        else
            warp_dots<W, NT, 1>(wr, xs, nv, I, acc);
        gk_pdl_late(m);
#pragma unroll
        for (int t = 0; t < NT; t++)
            if (lane == t && t < nv) {
                if (o < O1)
                    y[b * ybs + (long)(n0 + t) * ldy + o] = acc[0][t];
                else
                    y2[(long)(n0 + t) * ldy2 + o - O1] = acc[0][t];
            }
    }
}

/* Before the wait (ginfer_k.cuh): the weight rows gemv_block reads for batch entry b. */
template <typename W>
__device__ __forceinline__ void gemv_prefetch(int m, const W *w, long wbs, int I, int O, int b)
{
    int o = blockIdx.x * GK_WARPS + (threadIdx.x >> 5);
    const W *wr[1] = {w + b * wbs + (long)o * I};
    if (o < O)
        gk_prefetch_rows<GK_WARPS, 1>(m, wr, I);
}

/* One row: 4 blocks an SM at least (64 registers), which ptxas then spends on the loads of
 * warp_dots_ahead; at its default it kept 32 registers (8 blocks) and 3 of a lane's 12 loads
 * before its first product. */
template <typename W, int NT>
__global__ void __launch_bounds__(GK_WARPS * 32, NT == 1 ? 4 : 0)
    gemv_k(int m, const float *__restrict__ x, long ldx, long xbs, const W *__restrict__ w,
           long wbs, float *__restrict__ y, long ldy, long ybs, int N, int I, int O,
           float *__restrict__ y2, long ldy2, int O1)
{
    gemv_prefetch(m, w, wbs, I, O, blockIdx.y);
    gk_pdl_enter(m);
    gemv_block<W, NT, true>(m, x, ldx, xbs, w, wbs, y, ldy, ybs, N, I, O, blockIdx.y, y2, ldy2,
                            O1);
}

/* One row of bf16 weights with each warp's HELD_R weight rows loaded into registers before
 * the wait, not only prefetched into L2: after it, x (I <= 256 P values) is staged once in
 * shared memory and the products need no weight read. gemv_k's weights come from L2 after
 * the wait: DeepSeek-V2-Lite's q + kv_a launch (15 MB) took 5 us exposed after the input
 * norm though its prefetch had streamed during that norm (CUPTI trace, H200). Every block
 * must be resident before the wait to hold its rows, so this form takes grids of at most
 * two blocks an SM (gemv_held_fits). A row's products are warp_dots_ahead's in its order
 * (pieces past I add fmaf(0, 0, acc)), so y is bitwise gemv_k's. */
#define HELD_R 2

/* gemv_held_k's weight rows for a warp: row[r] (r < HELD_R; I <= 256 P values, a piece past
 * I loads the row's first again, unused) into wr before the wait. */
template <int P>
__device__ __forceinline__ void held_rows_load(const bf16 *const (&row)[HELD_R], int I,
                                               raw8<bf16> (&wr)[HELD_R][P])
{
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int r = 0; r < HELD_R; r++)
#pragma unroll
        for (int c = 0; c < P; c++)
            raw8_load(row[r] + (lane * 8 + 256 * c < I ? lane * 8 + 256 * c : 0), wr[r][c]);
}

/* x [I] (device memory, 16-byte aligned) into xs (shared) by the whole block; a barrier. */
__device__ __forceinline__ void held_x_stage(float *xs, const float *x, int I)
{
    for (int i = threadIdx.x * 4; i < I; i += blockDim.x * 4)
        *(float4 *)&xs[i] = *(const float4 *)&x[i];
    __syncthreads();
}

/* The warp's HELD_R dot products of its held rows with xs (shared), in warp_dots_ahead's
 * order (pieces past I add fmaf(0, 0, acc)); every lane gets the sums. */
template <int P>
__device__ __forceinline__ void held_dots(const raw8<bf16> (&wr)[HELD_R][P], const float *xs,
                                          int I, float (&acc)[HELD_R])
{
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int r = 0; r < HELD_R; r++)
        acc[r] = 0.0f;
#pragma unroll
    for (int c = 0; c < P; c++) {
        const int i = lane * 8 + 256 * c;
        const bool in = i < I;
        float xf[8];
        ldx8(xs + (in ? i : 0), xf);
#pragma unroll
        for (int r = 0; r < HELD_R; r++) {
            float wf[8];
            raw8_float(wr[r][c], wf);
#pragma unroll
            for (int k = 0; k < 8; k++)
                acc[r] = fmaf(in ? wf[k] : 0.0f, in ? xf[k] : 0.0f, acc[r]);
        }
    }
#pragma unroll
    for (int r = 0; r < HELD_R; r++)
        acc[r] = warp_sum(acc[r]);
}

template <int P>
__global__ void __launch_bounds__(GK_WARPS * 32, 2)
    gemv_held_k(int m, const float *__restrict__ x, long xbs, const bf16 *__restrict__ w,
                long wbs, float *__restrict__ y, long ybs, int I, int O, float *__restrict__ y2,
                long ldy2, int O1)
{
    __shared__ __align__(16) float xs[256 * P];
    const int lane = threadIdx.x & 31, b = blockIdx.y;
    const int o0 = (blockIdx.x * GK_WARPS + (threadIdx.x >> 5)) * HELD_R;
    const bf16 *rows[HELD_R];
#pragma unroll
    for (int r = 0; r < HELD_R; r++)
        rows[r] = w + b * wbs + (long)min(o0 + r, O - 1) * I;
    raw8<bf16> wr[HELD_R][P];
    held_rows_load<P>(rows, I, wr);
    gk_pdl_enter(m);
    held_x_stage(xs, x + b * xbs, I);
    if (o0 >= O)
        return;
    float acc[HELD_R];
    held_dots<P>(wr, xs, I, acc);
    gk_pdl_late(m);
    if (lane == 0)
#pragma unroll
        for (int r = 0; r < HELD_R; r++) {
            int o = o0 + r;
            if (o < O1 && o < O)
                y[b * ybs + o] = acc[r];
            else if (o < O)
                y2[o - O1] = acc[r];
        }
}

/* DeepSeek-V2-Lite's attention input in one launch (no q_lora; gk_gemv_lat): q and kv_a as
 * gemv_held_k computes them (weights [nh qk + W, I], q's rows then kv_a's), and q_lat[h] =
 * W_uk[h]^T q_nope[h] as gk_gemv_kvw's GEMV computes it, which saves that launch. A
 * cluster of LAT_CL blocks a head takes the head's nope = 16 LAT_CL q_nope rows (HELD_R a
 * warp), hands them to every block of the cluster (distributed shared memory, one cluster
 * barrier), and block k then forms q_lat rows [k kv / LAT_CL, (k + 1) kv / LAT_CL) from
 * W_uk rows held in registers before the wait: a half-warp a row of nope = 128 values, 8 a
 * lane, each lane's products in warp_dots' order and the half-warp's sum warp_sum's with the
 * other half's zeros left out (adding +0 changes no sum), so the same bits. The clusters
 * after the heads' take the q_pe rows (every head's rope rows) and kv_a's, 16 a block. The
 * cache row is left to the attention parts (gk_attn_parts with a gk_kv_new), which form it
 * from kv_a. */
#define LAT_CL 8
#define LAT_QR 4 /* q_lat rows a half-warp */
static_assert(LAT_CL * GK_WARPS * 2 * LAT_QR == 512, "q_lat: kv 512 rows a head");

/* The weight row of the block's row i (< GK_WARPS HELD_R) in gemv_lat_k's layout: the
 * heads' q_nope rows first (block bx < nh LAT_CL), then the plain rows (every head's q_pe
 * rows, then kv_a's); -1 past the end. */
__device__ __forceinline__ long lat_row(int bx, int i, int nh, int qk, int nope, int W)
{
    const int hb = GK_WARPS * HELD_R, pe = qk - nope;
    if (bx < nh * LAT_CL)
        return (long)(bx / LAT_CL) * qk + (bx % LAT_CL) * hb + i;
    long p = (long)(bx - nh * LAT_CL) * hb + i;
    if (p < (long)nh * pe)
        return p / pe * qk + nope + p % pe;
    p -= (long)nh * pe;
    return p < W ? (long)nh * qk + p : -1;
}

template <int P>
__global__ void __cluster_dims__(LAT_CL, 1, 1) __launch_bounds__(GK_WARPS * 32, 2)
    gemv_lat_k(int m, const float *__restrict__ x, const bf16 *__restrict__ w, int I, int nh,
               int qk, int nope, int W, float *__restrict__ q, float *__restrict__ kva,
               const bf16 *__restrict__ ukT, int kv, float *__restrict__ qlat, gk_lat_pf pf)
{
    __shared__ __align__(16) float xs[256 * P];
    __shared__ __align__(16) float qn[LAT_CL * GK_WARPS * HELD_R]; /* the head's q_nope */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, bx = blockIdx.x;
    const bool head = bx < nh * LAT_CL; /* the same for the whole cluster */
    if (head)  /* this block has started: the cluster's stores may come */
        asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
    long o[HELD_R];
    const bf16 *rows[HELD_R];
#pragma unroll
    for (int r = 0; r < HELD_R; r++) {
        o[r] = lat_row(bx, warp * HELD_R + r, nh, qk, nope, W);
        rows[r] = w + (o[r] < 0 ? 0 : o[r]) * I;
    }
    raw8<bf16> wr[HELD_R][P];
    held_rows_load<P>(rows, I, wr);
    /* head h's W_uk rows: this half-warp's LAT_QR, 8 values a lane (nope = 128) */
    const int h = bx / LAT_CL, k = bx % LAT_CL, hl = lane >> 4, li = lane & 15;
    const int q0 = k * (kv / LAT_CL) + warp * 2 * LAT_QR + hl * LAT_QR;
    raw8<bf16> uk[LAT_QR];
    if (head)
#pragma unroll
        for (int i = 0; i < LAT_QR; i++)
            raw8_load(ukT + ((long)h * kv + q0 + i) * nope + li * 8, uk[i]);
    if (!head && pf.cache && gk_pdl_pf(m) && threadIdx.x == 0) {
        /* the attention's older cache rows into L2, a slice a plain block: the parts' blocks
         * land only as this launch's leave (its blocks fill the registers), so what they
         * stage before their wait then comes from L2 */
        const long np = gridDim.x - nh * LAT_CL, p = bx - nh * LAT_CL;
        const long all = (long)pf.pos[0] * W * pf.csz, sl = (all + np - 1) / np;
        const char *c = (const char *)pf.cache + (long)pf.slot[0] * pf.n_ctx * W * pf.csz;
        if (p * sl < all)
            gk_prefetch_l2(c + p * sl, (size_t)min(sl, all - p * sl));
    }
    gk_pdl_enter(m);
    held_x_stage(xs, x, I);
    float acc[HELD_R];
    held_dots<P>(wr, xs, I, acc);
    gk_pdl_late(m);
    if (lane == 0)
#pragma unroll
        for (int r = 0; r < HELD_R; r++) {
            if (o[r] >= (long)nh * qk)
                kva[o[r] - (long)nh * qk] = acc[r];
            else if (o[r] >= 0)
                q[o[r]] = acc[r];
        }
    if (!head)
        return;
    cg::cluster_group cl = cg::this_cluster();
    asm volatile("barrier.cluster.wait.aligned;" ::: "memory"); /* all blocks started */
    if (lane < LAT_CL)
#pragma unroll
        for (int r = 0; r < HELD_R; r++)
            *cl.map_shared_rank(qn + k * GK_WARPS * HELD_R + warp * HELD_R + r, lane) = acc[r];
    cl.sync(); /* every block's qn whole; none is written remotely after */
    float xf[8];
    ldx8(qn + li * 8, xf);
    float a[LAT_QR];
#pragma unroll
    for (int i = 0; i < LAT_QR; i++) {
        float wf[8];
        raw8_float(uk[i], wf);
        a[i] = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; j++)
            a[i] = fmaf(wf[j], xf[j], a[i]);
#pragma unroll
        for (int d = 8; d > 0; d >>= 1)
            a[i] += __shfl_xor_sync(0xffffffffu, a[i], d);
    }
    if (li == 0)
#pragma unroll
        for (int i = 0; i < LAT_QR; i++)
            qlat[(long)h * kv + q0 + i] = a[i];
}

/* Blocks of gemv_lat_k's grid: the heads' clusters, then the plain rows 16 a block, in whole
 * clusters. */
static int lat_blocks(int nh, int qk, int nope, int W)
{
    const int hb = GK_WARPS * HELD_R, plain = (nh * (qk - nope) + W + hb - 1) / hb;
    return (nh * LAT_CL + plain + LAT_CL - 1) / LAT_CL * LAT_CL;
}

/* gemv_lat_k's shapes: one row of at most 2048 values (a multiple of 8), nope 128 and kv 512
 * (DeepSeek-V2-Lite's and V3's heads), a grid of at most two blocks an SM (every block's
 * rows held before the wait, as gemv_held_fits asks). DSV3_GINFER_QLAT=0: never (q and
 * kv_a by gk_gemv_two, q_lat and the cache row by gk_gemv_kvw, to compare). Read at each
 * call: a decode graph keeps what held at its capture. */
int gk_gemv_lat_fits(int N, int I, int nh, int qk, int nope, int W, int kv)
{
    const char *v = getenv("DSV3_GINFER_QLAT");
    if ((v && !strcmp(v, "0")) || N != 1 || I > 2048 || I % 8 || nh < 1 || W < 0 ||
        nope != LAT_CL * GK_WARPS * HELD_R || kv != LAT_CL * GK_WARPS * 2 * LAT_QR || qk < nope)
        return 0;
    int dev = 0, sms = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
        return 0;
    return lat_blocks(nh, qk, nope, W) <= 2L * sms;
}

int gk_gemv_lat(cudaStream_t s, const float *x, const void *w, int I, int nh, int qk, int nope,
                int W, float *q, float *kva, const void *ukT, int kv, float *qlat,
                const gk_lat_pf *pf, dsv3_err *e)
{
    gk_lat_pf p = {};
    const char *v = getenv("DSV3_GINFER_QLAT_PF");
    if (pf && !(v && !strcmp(v, "0")))
        p = *pf;
    if (!gk_gemv_lat_fits(1, I, nh, qk, nope, W, kv))
        return err_set(e, "ginfer: q, kv_a and q_lat in one launch do not take %d heads of %d "
                       "(nope %d, latent %d) over %d values", nh, qk, nope, kv, I);
    gk_launch_as("lat", I <= 1024 ? gemv_lat_k<4> : gemv_lat_k<8>, lat_blocks(nh, qk, nope, W),
                 GK_WARPS * 32, 0, s, x, (const bf16 *)w, I, nh, qk, nope, W, q, kva,
                 (const bf16 *)ukT, kv, qlat, p);
    LAUNCH_CHECK("gemv_lat", e);
    return 0;
}

/* Whether gemv_held_k takes a launch of bf16 weights: one row of at most 2048 values (x rows
 * 16-byte aligned, I a multiple of 8), a grid of at most two blocks an SM, and a launch kind
 * DSV3_GINFER_HELD lists: "two" (gk_gemv_two: q and kv_a, after the input norm's one block),
 * "one" (gk_gemv's other launches), "0" none. Unset: "two". gk_gemv's launches follow
 * launches whose blocks fill the SMs (the uv GEMV's 254 registers a thread before o), so
 * the held rows land no earlier; with them a 1b-moe step took 571.7 us against 561.1 and
 * V2-Lite's o 5.0 us exposed against 4.4 (H200). The same values either way. Read at each
 * launch: a decode graph keeps what held at its capture. */
static int gemv_held_fits(const char *kind, int N, int I, int O, int batch, long xbs)
{
    const char *v = getenv("DSV3_GINFER_HELD");
    if (!gk_kind_listed(v ? v : "two", kind) || N != 1 || I > 2048 || I % 8 ||
        (batch > 1 && xbs % 4))
        return 0;
    int dev = 0, sms = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
        return 0;
    long blocks = (long)(O + GK_WARPS * HELD_R - 1) / (GK_WARPS * HELD_R) * batch;
    return blocks <= 2L * sms;
}

template <typename W>
static void gemv_launch(cudaStream_t s, const float *x, long ldx, long xbs, const W *w, long wbs,
                        float *y, long ldy, long ybs, int N, int I, int O, int batch,
                        float *y2 = NULL, long ldy2 = 0, int O1 = INT_MAX)
{
    if constexpr (sizeof(W) == 2) {
        if (gemv_held_fits(O1 < O ? "two" : "one", N, I, O, batch, xbs)) {
            dim3 hg((O + GK_WARPS * HELD_R - 1) / (GK_WARPS * HELD_R), batch);
            gk_launch_as("gemv", I <= 1024 ? gemv_held_k<4> : gemv_held_k<8>, hg, GK_WARPS * 32,
                         0, s, x, xbs, w, wbs, y, ybs, I, O, y2, ldy2, O1);
            return;
        }
    }
    dim3 grid((O + GK_WARPS - 1) / GK_WARPS, batch);
    void (*k)(int, const float *, long, long, const W *, long, float *, long, long, int, int,
              int, float *, long, int) = N == 1 ? gemv_k<W, 1> : N <= 4 ? gemv_k<W, 4>
                                                                      : gemv_k<W, 8>;
    gk_launch_as("gemv", k, grid, GK_WARPS * 32, 0, s, x, ldx, xbs, w, wbs, y, ldy, ybs, N, I, O,
                 y2, ldy2, O1);
}

int gk_gemv(cudaStream_t s, const float *x, long ldx, long xbs, const void *w, int wf32, long wbs,
            float *y, long ldy, long ybs, int N, int I, int O, int batch, dsv3_err *e)
{
    if (N <= 0 || O <= 0 || batch <= 0)
        return 0;
    if (I % 8)
        return err_set(e, "ginfer: a product over %d values (a multiple of 8 is needed)", I);
    if (wf32)
        gemv_launch(s, x, ldx, xbs, (const float *)w, wbs, y, ldy, ybs, N, I, O, batch);
    else
        gemv_launch(s, x, ldx, xbs, (const bf16 *)w, wbs, y, ldy, ybs, N, I, O, batch);
    LAUNCH_CHECK("gemv", e);
    return 0;
}

int gk_gemv_two(cudaStream_t s, const float *x, long ldx, const void *w, int wf32, float *y1,
                long ldy1, int O1, float *y2, long ldy2, int N, int I, int O, dsv3_err *e)
{
    if (N <= 0 || O <= 0)
        return 0;
    if (I % 8 || O1 < 0 || O1 > O)
        return err_set(e, "ginfer: a product over %d values into %d + %d outputs", I, O1, O - O1);
    if (wf32)
        gemv_launch(s, x, ldx, 0, (const float *)w, 0, y1, ldy1, 0, N, I, O, 1, y2, ldy2, O1);
    else
        gemv_launch(s, x, ldx, 0, (const bf16 *)w, 0, y1, ldy1, 0, N, I, O, 1, y2, ldy2, O1);
    LAUNCH_CHECK("gemv_two", e);
    return 0;
}

/* ---- embedding, norms, rotations ---- */

template <typename W>
__global__ void embed_k(int m, float *x, const W *table, const int32_t *ids, int N, int H)
{
    gk_pdl_enter(m);
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= (long)N * H)
        return;
    int n = (int)(i / H), j = (int)(i % H);
    x[i] = (float)table[(long)ids[n] * H + j];
}

int gk_embed(cudaStream_t s, float *x, const void *table, int wf32, const int32_t *ids, int N,
             int H, dsv3_err *e)
{
    if (N <= 0)
        return 0;
    unsigned g = (unsigned)(((long)N * H + 255) / 256);
    if (wf32)
        gk_launch(embed_k<float>, g, 256, 0, s, x, (const float *)table, ids, N, H);
    else
        gk_launch(embed_k<bf16>, g, 256, 0, s, x, (const bf16 *)table, ids, N, H);
    LAUNCH_CHECK("embed", e);
    return 0;
}

/* Element i of row n's residual sum as add_norm_k forms it: x (+ the pending MoE output: the
 * weighted routed experts' rows, then the shared experts') (+ delta). */
__device__ __forceinline__ float residual_sum(const float *xr, const float *dr,
                                              const gk_moe_out &mo, int n, int D, int i)
{
    float v = xr[i];
    if (mo.ye) {
        float acc = 0;
        for (int k = 0; k < mo.K; k++)
            acc += mo.rw[n * mo.K + k] * mo.ye[(long)mo.spos[n * mo.K + k] * D + i];
        if (mo.ys)
            acc += mo.ys[(long)n * D + i];
        v += acc;
    }
    if (dr)
        v += dr[i];
    return v;
}

/* One block a row. With mo the row's MoE output (its routed experts' rows weighted in k
 * order, plus the shared one's) is added, so the combine costs no launch of its own; then
 * delta (both with the fused norms: the MoE output of the layer before and this layer's
 * attention output, in that order, as two unfused add_norms would add them). */
/* residual_sum with row n's routing already in registers (K <= KM): every load of the sum
 * (x, the expert rows, the shared row, delta) issued before the first add. */
template <int KM>
__device__ __forceinline__ float residual_sum_ahead(const float *xr, const float *dr,
                                                    const gk_moe_out &mo, const float *rwk,
                                                    const int *spk, int K, int n, int D, int i)
{
    float v = xr[i], ys = mo.ys ? mo.ys[(long)n * D + i] : 0.0f, d = dr ? dr[i] : 0.0f;
    float yv[KM];
#pragma unroll
    for (int k = 0; k < KM; k++)
        yv[k] = k < K ? mo.ye[(long)spk[k] * D + i] : 0.0f;
    float acc = 0;
#pragma unroll
    for (int k = 0; k < KM; k++)
        if (k < K)
            acc = fmaf(rwk[k], yv[k], acc);  /* residual_sum's acc += rw * ye, contracted */
    if (mo.ys)
        acc += ys;
    v += acc;
    if (dr)
        v += d;
    return v;
}

/* KM: the most routed rows of the pending MoE output read ahead (registers: at 1024
 * threads a block a thread has 64, and with 8 rows ptxas reused a load's register for the
 * next, one round trip after another); more fall back to residual_sum. */
template <int KM>
__global__ void add_norm_k(int m, float *x, int ldx, const float *delta, gk_moe_out mo,
                           const float *w, float *out, int D, float eps)
{
    const int i1 = threadIdx.x;
    const bool one = D <= (int)blockDim.x;  /* a thread a value (gk_add_norm: D <= 1024) */
    const bool two = !one && D <= 2 * (int)blockDim.x;  /* two a thread (D <= 2048) */
    /* the norm weight (no kernel writes it) into registers before the wait, or for longer
     * rows into L2; read after the row's sum either way */
    float wv = (one || two) && i1 < D ? __ldg(w + i1) : 0.0f;
    float wv2 = two && i1 + (int)blockDim.x < D ? __ldg(w + i1 + blockDim.x) : 0.0f;
    if (!one && !two && gk_pdl_pf(m) && threadIdx.x == 0)
        gk_prefetch_l2(w, (size_t)D * sizeof(float));
    int n = blockIdx.x;
    /* the pending MoE output's routing weights and row positions before the wait: its router
     * is at least three launches back (router, up, down, this), done before this launch could
     * start, as gemv_norm1_k reads them; after the wait one round of L2 reads is left. */
    float rwk[KM];
    int spk[KM];
    int K = mo.ye && mo.K <= KM ? mo.K : 0;
#pragma unroll
    for (int k = 0; k < KM; k++)
        if (k < K) {
            rwk[k] = mo.rw[n * mo.K + k];
            spk[k] = mo.spos[n * mo.K + k];
        }
    gk_pdl_enter(m);
    __shared__ float red[32];
    float *xr = x + (long)n * ldx, *yr = out + (long)n * D;
    const float *dr = delta ? delta + (long)n * D : NULL;
    if (one) {  /* the sum stays in a register: no reload of x or w after the block's sum */
        float v = 0.0f, ss = 0.0f;
        if (i1 < D) {
            v = K ? residual_sum_ahead<KM>(xr, dr, mo, rwk, spk, K, n, D, i1)
                  : residual_sum(xr, dr, mo, n, D, i1);
            if (mo.ye || dr)
                xr[i1] = v;
            ss = v * v;
        }
        gk_pdl_late(m);
        ss = block_sum(ss, red);
        float r = rsqrtf(ss / D + eps);
        if (i1 < D)
            yr[i1] = wv * (v * r);
        return;
    }
    float ss = 0;
    if (two) {
        /* two values a thread (DeepSeek-V2-Lite's 2048): the loop below's operations in its
         * order, but both values' loads issued before the first sum, the sums kept in
         * registers and w read before the wait: two round trips fewer than the loop's (the
         * second value's loads, and x and w read back for the output) */
        const int i2 = i1 + blockDim.x;
        float v[2];
        v[0] = K ? residual_sum_ahead<KM>(xr, dr, mo, rwk, spk, K, n, D, i1)
                 : residual_sum(xr, dr, mo, n, D, i1);
        v[1] = i2 >= D ? 0.0f
               : K     ? residual_sum_ahead<KM>(xr, dr, mo, rwk, spk, K, n, D, i2)
                       : residual_sum(xr, dr, mo, n, D, i2);
        if (mo.ye || dr) {
            xr[i1] = v[0];
            if (i2 < D)
                xr[i2] = v[1];
        }
        ss += v[0] * v[0];
        if (i2 < D)
            ss += v[1] * v[1];
        gk_pdl_late(m);
        ss = block_sum(ss, red);
        float r = rsqrtf(ss / D + eps);
        yr[i1] = wv * (v[0] * r);
        if (i2 < D)
            yr[i2] = wv2 * (v[1] * r);
        return;
    }
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float v = K ? residual_sum_ahead<KM>(xr, dr, mo, rwk, spk, K, n, D, i)
                    : residual_sum(xr, dr, mo, n, D, i);
        if (mo.ye || dr)
            xr[i] = v;
        ss += v * v;
    }
    gk_pdl_late(m);
    ss = block_sum(ss, red);
    float r = rsqrtf(ss / D + eps);
    for (int i = threadIdx.x; i < D; i += blockDim.x)
        yr[i] = w[i] * (xr[i] * r);
}

int gk_add_norm(cudaStream_t s, float *x, int ldx, const float *delta, const gk_moe_out *mo,
                const float *w, float *out, int N, int D, float eps, dsv3_err *e)
{
    if (N <= 0)
        return 0;
    gk_moe_out m = {};
    if (mo)
        m = *mo;
    /* a thread a value (up to 1024): a row's loads in one round trip */
    int threads = D >= 1024 ? 1024 : (D + 31) / 32 * 32;
    gk_launch_as("norm", m.K <= 4 ? add_norm_k<4> : add_norm_k<8>, N, threads, 0, s, x, ldx,
                 delta, m, w, out, D, eps);
    LAUNCH_CHECK("add_norm", e);
    return 0;
}

/* One block a row; the row's kv + rope values staged in shared memory. The row's query
 * heads are rotated here too (one launch fewer a layer). */
template <typename C>
__device__ void kv_write_row(int m, float *row /* [kv + rope] shared */, int n, const float *kva,
                             int ldkva, const float *w, C *cache, const int *slot, const int *pos,
                             int kv, int rope, int n_ctx, const float *cos_t, const float *sin_t,
                             int interleave, float eps, float *q, int nh, int qk, int nope)
{
    __shared__ float red[32];
    int W = kv + rope, half = rope / 2;
    float ss = kv_row_load(row, kva + (long)n * ldkva, kv, W);
    gk_pdl_late(m);
    ss = block_sum(ss, red);  /* its barriers also order the row's stores */
    float r = rsqrtf(ss / kv + eps);
    long t = pos[n];
    if (threadIdx.x < half)
        rope_pair(row + kv, threadIdx.x, half, interleave, cos_t + t * half, sin_t + t * half);
    for (int i = threadIdx.x; i < nh * half; i += blockDim.x)
        rope_pair(q + ((long)n * nh + i / half) * qk + nope, i % half, half, interleave,
                  cos_t + t * half, sin_t + t * half);
    __syncthreads();
    C *dst = cache + ((long)slot[n] * n_ctx + t) * W;
    for (int i = threadIdx.x; i < W; i += blockDim.x)
        dst[i] = (C)kv_row_value(row, w, r, kv, i);
}

/* Before the wait: what kv_write_row reads after its sum (the norm weight, the position's
 * rotation table rows; the position is the host's copy, no kernel writes it). */
__device__ __forceinline__ void kv_write_prefetch(int m, int n, const float *w, const int *pos,
                                                  int kv, int rope, const float *cos_t,
                                                  const float *sin_t)
{
    if (gk_pdl_pf(m) && threadIdx.x == 0) {
        long t = pos[n];
        gk_prefetch_l2(w, (size_t)kv * sizeof(float));
        gk_prefetch_line(cos_t + t * (rope / 2));
        gk_prefetch_line(sin_t + t * (rope / 2));
    }
}

template <typename C>
__global__ void kv_write_k(int m, const float *kva, int ldkva, const float *w, C *cache,
                           const int *slot, const int *pos, int kv, int rope, int n_ctx,
                           const float *cos_t, const float *sin_t, int interleave, float eps,
                           float *q, int nh, int qk, int nope)
{
    kv_write_prefetch(m, blockIdx.x, w, pos, kv, rope, cos_t, sin_t);
    gk_pdl_enter(m);
    extern __shared__ float row[];
    kv_write_row<C>(m, row, blockIdx.x, kva, ldkva, w, cache, slot, pos, kv, rope, n_ctx, cos_t,
                    sin_t, interleave, eps, q, nh, qk, nope);
}

/* The batched GEMV (grid.y = batch) and, in one more row of blocks (blockIdx.y == batch,
 * block x for cache row x < N), kv_write_k's work: the q_lat product reads only the q_nope
 * parts of q, kv_write rotates only the q_pe parts, so the two are independent and share a
 * launch. W is the cache type too (fp32 weights go with an fp32 cache). */
template <typename W, int NT>
__global__ void __launch_bounds__(GK_WARPS * 32)
    gemv_kvw_k(int m, const float *__restrict__ x, long ldx, long xbs, const W *__restrict__ w,
               long wbs, float *__restrict__ y, long ldy, long ybs, int N, int I, int O,
               const float *kva, int ldkva, const float *nw, W *cache, const int *slot,
               const int *pos, int kv, int rope, int n_ctx, const float *cos_t,
               const float *sin_t, int interleave, float eps, float *q, int nh, int qk, int nope)
{
    if (blockIdx.y < gridDim.y - 1)
        gemv_prefetch(m, w, wbs, I, O, blockIdx.y);
    else if (blockIdx.x < N)
        kv_write_prefetch(m, blockIdx.x, nw, pos, kv, rope, cos_t, sin_t);
    gk_pdl_enter(m);
    extern __shared__ float row[];
    if (blockIdx.y < gridDim.y - 1) {
        gemv_block<W, NT>(m, x, ldx, xbs, w, wbs, y, ldy, ybs, N, I, O, blockIdx.y);
        return;
    }
    if (blockIdx.x < N)
        kv_write_row<W>(m, row, blockIdx.x, kva, ldkva, nw, cache, slot, pos, kv, rope, n_ctx,
                        cos_t, sin_t, interleave, eps, q, nh, qk, nope);
}

int gk_gemv_kvw_fits(int N, int O)
{
    return N <= (O + GK_WARPS - 1) / GK_WARPS;
}

template <typename W>
static void gemv_kvw_launch(cudaStream_t s, const float *x, long ldx, long xbs, const W *w,
                            long wbs, float *y, long ldy, long ybs, int N, int I, int O,
                            int batch, const float *kva, int ldkva, const float *nw, W *cache,
                            const int *slot, const int *pos, int kv, int rope, int n_ctx,
                            const float *cos_t, const float *sin_t, int interleave, float eps,
                            float *q, int nh, int qk, int nope)
{
    dim3 grid((O + GK_WARPS - 1) / GK_WARPS, batch + 1);
    void (*k)(int, const float *, long, long, const W *, long, float *, long, long, int, int,
              int, const float *, int, const float *, W *, const int *, const int *, int, int,
              int, const float *, const float *, int, float, float *, int, int, int) =
        N == 1 ? gemv_kvw_k<W, 1> : N <= 4 ? gemv_kvw_k<W, 4> : gemv_kvw_k<W, 8>;
    gk_launch_as("kvw", k, grid, GK_WARPS * 32, (size_t)(kv + rope) * sizeof(float), s, x, ldx,
                 xbs, w, wbs, y, ldy, ybs, N, I, O, kva, ldkva, nw, cache, slot, pos, kv, rope,
                 n_ctx, cos_t, sin_t, interleave, eps, q, nh, qk, nope);
}

int gk_gemv_kvw(cudaStream_t s, const float *x, long ldx, long xbs, const void *w, int wf32,
                long wbs, float *y, long ldy, long ybs, int N, int I, int O, int batch,
                const float *kva, int ldkva, const float *nw, void *cache, const int *slot,
                const int *pos, int kv, int rope, int n_ctx, const float *cos_t,
                const float *sin_t, int interleave, float eps, float *q, int nh, int qk,
                int nope, dsv3_err *e)
{
    if (N <= 0 || O <= 0 || batch <= 0)
        return 0;
    if (I % 8)
        return err_set(e, "ginfer: a product over %d values (a multiple of 8 is needed)", I);
    if (!gk_gemv_kvw_fits(N, O))
        return err_set(e, "ginfer: %d cache rows with a GEMV of %d outputs", N, O);
    if (wf32)
        gemv_kvw_launch(s, x, ldx, xbs, (const float *)w, wbs, y, ldy, ybs, N, I, O, batch, kva,
                        ldkva, nw, (float *)cache, slot, pos, kv, rope, n_ctx, cos_t, sin_t,
                        interleave, eps, q, nh, qk, nope);
    else
        gemv_kvw_launch(s, x, ldx, xbs, (const bf16 *)w, wbs, y, ldy, ybs, N, I, O, batch, kva,
                        ldkva, nw, (bf16 *)cache, slot, pos, kv, rope, n_ctx, cos_t, sin_t,
                        interleave, eps, q, nh, qk, nope);
    LAUNCH_CHECK("gemv_kvw", e);
    return 0;
}

int gk_kv_write(cudaStream_t s, const float *kva, int ldkva, const float *w, void *cache, int cf32,
                const int *slot, const int *pos, int N, int kv, int rope, int n_ctx,
                const float *cos_t, const float *sin_t, int interleave, float eps, float *q,
                int nh, int qk, int nope, dsv3_err *e)
{
    if (N <= 0)
        return 0;
    size_t smem = (size_t)(kv + rope) * sizeof(float);
    if (cf32)
        gk_launch(kv_write_k<float>, N, 256, smem, s, kva, ldkva, w, (float *)cache, slot, pos,
                  kv, rope, n_ctx, cos_t, sin_t, interleave, eps, q, nh, qk, nope);
    else
        gk_launch(kv_write_k<bf16>, N, 256, smem, s, kva, ldkva, w, (bf16 *)cache, slot, pos,
                  kv, rope, n_ctx, cos_t, sin_t, interleave, eps, q, nh, qk, nope);
    LAUNCH_CHECK("kv_write", e);
    return 0;
}

/* ---- GEMVs that normalise their input rows themselves ---- */

/* The threads gk_add_norm gives a row of D values (a thread a value, up to 1024). */
static int norm_threads(int D)
{
    return D >= 1024 ? 1024 : (D + 31) / 32 * 32;
}

/* Row n of add_norm_k's output, computed by one block of any size into dst[D] (shared) with
 * the same operations in the same order as add_norm_k run with T threads: v = x (+ the MoE
 * output) (+ delta), each of the T threads' sum of squares over i = t, t + T, ..., the warp
 * sums of those partials, then the sum of the warp sums (block_sum's tree): so the result is
 * bitwise add_norm_k's. The sum v is not stored back (the caller's later add_norm does).
 * Ends with a barrier. */
__device__ void norm_row_to(float *dst, const float *x, int ldx, const float *delta,
                            const gk_moe_out &mo, const float *w, int n, int D, int T, float eps,
                            float *red)
{
    const float *xr = x + (long)n * ldx, *dr = delta ? delta + (long)n * D : NULL;
    for (int i = threadIdx.x; i < D; i += blockDim.x)
        dst[i] = residual_sum(xr, dr, mo, n, D, i);
    __syncthreads();
    int lane = threadIdx.x & 31, nwv = T >> 5;
    for (int vw = threadIdx.x >> 5; vw < nwv; vw += blockDim.x >> 5) {
        float ss = 0;
        for (int i = vw * 32 + lane; i < D; i += T) {
            float v = dst[i];
            ss += v * v;
        }
        ss = warp_sum(ss);
        if (lane == 0)
            red[vw] = ss;
    }
    __syncthreads();
    float ss = lane < nwv ? red[lane] : 0.0f;
    ss = warp_sum(ss);
    float r = rsqrtf(ss / D + eps);
    for (int i = threadIdx.x; i < D; i += blockDim.x)
        dst[i] = w[i] * (dst[i] * r);
    __syncthreads();
}

/* gemv_k (batch 1) over the rows add_norm_k would write: each block normalises the call's
 * rows, NT at a time, into shared memory (a row of I values is a few KB at batch 1, read from
 * L2 by every block) and takes its dot products from there: the norm's launch is saved. */
template <typename W, int NT>
__global__ void __launch_bounds__(GK_WARPS * 32)
    gemv_norm_k(int m, const float *x, int ldx, const float *delta, gk_moe_out mo, const float *nw,
                float eps, int T, const W *__restrict__ w, float *__restrict__ y, long ldy, int N,
                int I, int O)
{
    extern __shared__ float xs_sm[];  /* [NT][I] */
    __shared__ float red[32];
    int o = blockIdx.x * GK_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    const W *wr[1] = {w + (long)(o < O ? o : O - 1) * I};
    if (o < O)
        gk_prefetch_rows<GK_WARPS, 1>(m, wr, I);
    if (gk_pdl_pf(m) && threadIdx.x == 0)
        gk_prefetch_l2(nw, (size_t)I * sizeof(float));
    gk_pdl_enter(m);
    for (int n0 = 0; n0 < N; n0 += NT) {
        int nv = min(NT, N - n0);
        for (int t = 0; t < nv; t++)
            norm_row_to(xs_sm + t * I, x, ldx, delta, mo, nw, n0 + t, I, T, eps, red);
        if (o < O) {  /* no barrier inside: warps past O only skip their dots */
            const float *xs[NT];
#pragma unroll
            for (int t = 0; t < NT; t++)
                xs[t] = xs_sm + (t < nv ? t : 0) * I;
            float acc[1][NT];
            warp_dots<W, NT, 1>(wr, xs, nv, I, acc);
            gk_pdl_late(m);
#pragma unroll
            for (int t = 0; t < NT; t++)
                if (lane == t && t < nv)
                    y[(long)(n0 + t) * ldy + o] = acc[0][t];
        }
        __syncthreads();  /* the rows are read before the next chunk overwrites them */
    }
}

#define GN1_CHUNKS 4 /* 256-value pieces: rows of at most 1024 values */
#define GN1_MAXK 8   /* routed rows of the pending MoE output read ahead */

/* gemv_norm_k for one row of I <= 1024 values (gk_gemv_norm1_fits), with what no kernel of the
 * last two writes read before the wait: the warp's weight row and the thread's norm weights
 * into registers, and the pending MoE output's routing weights and row positions (written by
 * its router, at least three launches back). So after the wait only one round of L2 reads is
 * left (x, the expert rows, the shared row) before the sums. A thread holds elements
 * t + 256 j, so slice j of warp w is the virtual warp 8 j + w of add_norm_k's T = I threads
 * (a value each): the same sums of squares in the same tree, then gemv_k's dot products:
 * bitwise gemv_norm_k's (and add_norm_k + gemv_k's) results. */
template <typename W>
__global__ void __launch_bounds__(GK_WARPS * 32)
    gemv_norm1_k(int m, const float *x, const float *delta, gk_moe_out mo, const float *nw,
                 float eps, const W *__restrict__ w, float *__restrict__ y, int I, int O)
{
    __shared__ float xs[256 * GN1_CHUNKS];
    __shared__ float red[32];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int o = blockIdx.x * GK_WARPS + warp;
    const W *wr = w + (long)(o < O ? o : O - 1) * I;
    raw8<W> wv[GN1_CHUNKS];
#pragma unroll
    for (int j = 0; j < GN1_CHUNKS; j++)
        if (lane * 8 + 256 * j < I)
            raw8_load(wr + lane * 8 + 256 * j, wv[j]);
    float nv[GN1_CHUNKS];
#pragma unroll
    for (int j = 0; j < GN1_CHUNKS; j++) {
        int i = threadIdx.x + 256 * j;
        nv[j] = i < I ? __ldg(nw + i) : 0.0f;
    }
    float rwk[GN1_MAXK];
    int spk[GN1_MAXK];
    int K = mo.ye ? mo.K : 0;
#pragma unroll
    for (int k = 0; k < GN1_MAXK; k++)
        if (k < K) {
            rwk[k] = mo.rw[k];
            spk[k] = mo.spos[k];
        }
    gk_pdl_enter(m);
    /* residual_sum's operations, the routing read ahead */
    float v[GN1_CHUNKS];
#pragma unroll
    for (int j = 0; j < GN1_CHUNKS; j++) {
        int i = threadIdx.x + 256 * j;
        if (i < I) {
            float a = x[i];
            if (mo.ye) {
                float acc = 0;
#pragma unroll
                for (int k = 0; k < GN1_MAXK; k++)
                    if (k < K)
                        acc += rwk[k] * mo.ye[(long)spk[k] * I + i];
                if (mo.ys)
                    acc += mo.ys[i];
                a += acc;
            }
            if (delta)
                a += delta[i];
            v[j] = a;
        }
    }
    int nwv = (I + 31) >> 5;
#pragma unroll
    for (int j = 0; j < GN1_CHUNKS; j++) {
        int vw = 8 * j + warp, i = threadIdx.x + 256 * j;
        float ss = 0;
        if (i < I)
            ss += v[j] * v[j];
        ss = warp_sum(ss);
        if (lane == 0 && vw < nwv)
            red[vw] = ss;
    }
    __syncthreads();
    float ss = lane < nwv ? red[lane] : 0.0f;
    ss = warp_sum(ss);
    float r = rsqrtf(ss / I + eps);
#pragma unroll
    for (int j = 0; j < GN1_CHUNKS; j++) {
        int i = threadIdx.x + 256 * j;
        if (i < I)
            xs[i] = nv[j] * (v[j] * r);
    }
    __syncthreads();
    if (o >= O)
        return;
    float acc = 0.0f;
#pragma unroll
    for (int j = 0; j < GN1_CHUNKS; j++) {
        int i = lane * 8 + 256 * j;
        if (i < I) {
            float wf[8], xf[8];
            raw8_float(wv[j], wf);
            ldx8(xs + i, xf);
#pragma unroll
            for (int k = 0; k < 8; k++)
                acc = fmaf(wf[k], xf[k], acc);
        }
    }
    acc = warp_sum(acc);
    gk_pdl_late(m);
    if (lane == 0)
        y[o] = acc;
}

/* add_norm_k's sum of squares for one row of I <= 1024 values (a thread a value: each warp's
 * warp_sum, then block_sum's warp_sum of the warps' sums), formed by one warp that holds the
 * row in warp_dots' layout: lane L, piece c, k holds value 256 c + 8 L + k, sq its square
 * (0 past the row). That value is position 8 (L % 4) + k of add_norm_k's warp 8 c + L / 4,
 * so warp_sum's steps 16 and 8 are shuffles with lanes L ^ 2 and L ^ 1 and its steps 4, 2, 1
 * adds inside the lane; in the sum over the warps (warp 8 c + L / 4 at lane 8 c + L / 4 of
 * that warp_sum), steps 16 and 8 are adds of pieces c ^ 2 and c ^ 1 inside the lane, and
 * steps 4, 2, 1 shuffles with lanes L ^ 16, L ^ 8, L ^ 4. Each step adds the same two values
 * as add_norm_k's (in the other order at times: the same bits), so every lane ends with its
 * ss bitwise, without the block's barriers or a pass through shared memory. */
template <int NC>
__device__ __forceinline__ float warp_norm_ss(float (&sq)[NC][8])
{
    float gs[4];
#pragma unroll
    for (int c = 0; c < 4; c++) {
        gs[c] = 0.0f;
        if (c < NC) {
            float a[8], b[8];
#pragma unroll
            for (int k = 0; k < 8; k++)
                a[k] = sq[c][k] + __shfl_xor_sync(0xffffffffu, sq[c][k], 2);
#pragma unroll
            for (int k = 0; k < 8; k++)
                b[k] = a[k] + __shfl_xor_sync(0xffffffffu, a[k], 1);
#pragma unroll
            for (int k = 0; k < 4; k++)
                a[k] = b[k] + b[k + 4];
            gs[c] = (a[0] + a[2]) + (a[1] + a[3]);
        }
    }
    float t = (gs[0] + gs[2]) + (gs[1] + gs[3]);
    t += __shfl_xor_sync(0xffffffffu, t, 16);
    t += __shfl_xor_sync(0xffffffffu, t, 8);
    t += __shfl_xor_sync(0xffffffffu, t, 4);
    return t;
}

/* gemv_k of one row of I <= 256 NC values normalised as add_norm_k would (no residual:
 * the q_a norm before q_b): each warp reads the row in its dots' layout, forms the norm's
 * sum of squares itself (warp_norm_ss, bitwise add_norm_k's), scales and takes its dot
 * product: add_norm_k + gemv_k's values bitwise, with no barrier or shared memory between
 * the wait and the dots. Before the wait: the warp's weight row and norm weights in
 * registers. */
template <typename W, int NC>
__global__ void __launch_bounds__(GK_WARPS * 32)
    gemv_wnorm1_k(int m, const float *x, const float *nw, float eps, const W *__restrict__ w,
                  float *__restrict__ y, int I, int O)
{
    int lane = threadIdx.x & 31, o = blockIdx.x * GK_WARPS + (threadIdx.x >> 5);
    const W *wr = w + (long)(o < O ? o : O - 1) * I;
    raw8<W> wv[NC];
    float nv[NC][8];
#pragma unroll
    for (int c = 0; c < NC; c++) {
        int i = lane * 8 + 256 * c < I ? lane * 8 + 256 * c : 0;
        raw8_load(wr + i, wv[c]);
        ldx8(nw + i, nv[c]);
    }
    gk_pdl_enter(m);
    float v[NC][8], sq[NC][8];
#pragma unroll
    for (int c = 0; c < NC; c++) {
        const bool in = lane * 8 + 256 * c < I;
        ldx8(x + (in ? lane * 8 + 256 * c : 0), v[c]);
#pragma unroll
        for (int k = 0; k < 8; k++)
            sq[c][k] = in ? __fmul_rn(v[c][k], v[c][k]) : 0.0f;  /* add_norm_k's v * v */
    }
    float r = rsqrtf(warp_norm_ss<NC>(sq) / I + eps);
    float acc = 0.0f;
#pragma unroll
    for (int c = 0; c < NC; c++) {
        const bool in = lane * 8 + 256 * c < I;
        float wf[8];
        raw8_float(wv[c], wf);
#pragma unroll
        for (int k = 0; k < 8; k++) {
            float xn = nv[c][k] * (v[c][k] * r);
            acc = fmaf(in ? wf[k] : 0.0f, in ? xn : 0.0f, acc);
        }
    }
    acc = warp_sum(acc);
    gk_pdl_late(m);
    if (lane == 0 && o < O)
        y[o] = acc;
}

template <typename W>
static void gemv_wnorm1_launch(cudaStream_t s, const float *x, const float *nw, float eps,
                               const W *w, float *y, int I, int O)
{
    unsigned g = (unsigned)((O + GK_WARPS - 1) / GK_WARPS);
    int nc = (I + 255) / 256;
    gk_launch_as("qb", nc == 1 ? gemv_wnorm1_k<W, 1> : nc == 2 ? gemv_wnorm1_k<W, 2>
                       : nc == 3 ? gemv_wnorm1_k<W, 3> : gemv_wnorm1_k<W, 4>, g, GK_WARPS * 32, 0,
                 s, x, nw, eps, w, y, I, O);
}

static int gemv_norm1_fits(int N, int I, const gk_moe_out &mo)
{
    return N == 1 && I <= 256 * GN1_CHUNKS && (!mo.ye || mo.K <= GN1_MAXK);
}

static int gemv_norm_nt(int N)
{
    return N == 1 ? 1 : N <= 4 ? 4 : 8;
}

/* Decode-sized calls only: every block normalises every row, so a prefill chunk of 256 rows
 * would read them ~100 times over from L2. */
int gk_gemv_norm_fits(int N, int I)
{
    return N <= 8 && (size_t)gemv_norm_nt(N) * I * sizeof(float) <= 47 * 1024;  /* + static */
}

template <typename W>
static void gemv_norm_launch(cudaStream_t s, const float *x, int ldx, const float *delta,
                             const gk_moe_out &mo, const float *nw, float eps, const W *w,
                             float *y, long ldy, int N, int I, int O)
{
    int nt = gemv_norm_nt(N);
    void (*k)(int, const float *, int, const float *, gk_moe_out, const float *, float, int,
              const W *, float *, long, int, int, int) =
        nt == 1 ? gemv_norm_k<W, 1> : nt == 4 ? gemv_norm_k<W, 4> : gemv_norm_k<W, 8>;
    gk_launch(k, (O + GK_WARPS - 1) / GK_WARPS, GK_WARPS * 32, (size_t)nt * I * sizeof(float), s,
              x, ldx, delta, mo, nw, eps, norm_threads(I), w, y, ldy, N, I, O);
}

int gk_gemv_norm(cudaStream_t s, const float *x, int ldx, const float *delta,
                 const gk_moe_out *mo, const float *nw, float eps, const void *w, int wf32,
                 float *y, long ldy, int N, int I, int O, dsv3_err *e)
{
    if (N <= 0 || O <= 0)
        return 0;
    if (I % 8)
        return err_set(e, "ginfer: a product over %d values (a multiple of 8 is needed)", I);
    if (!gk_gemv_norm_fits(N, I))
        return err_set(e, "ginfer: %d normalised rows of %d values do not fit shared memory",
                       N, I);
    gk_moe_out m = {};
    if (mo)
        m = *mo;
    if (N == 1 && !delta && !m.ye && I <= 1024) {
        if (wf32)
            gemv_wnorm1_launch(s, x, nw, eps, (const float *)w, y, I, O);
        else
            gemv_wnorm1_launch(s, x, nw, eps, (const bf16 *)w, y, I, O);
    } else if (gemv_norm1_fits(N, I, m)) {
        unsigned g = (unsigned)((O + GK_WARPS - 1) / GK_WARPS);
        if (wf32)
            gk_launch(gemv_norm1_k<float>, g, GK_WARPS * 32, 0, s, x, delta, m, nw, eps,
                      (const float *)w, y, I, O);
        else
            gk_launch(gemv_norm1_k<bf16>, g, GK_WARPS * 32, 0, s, x, delta, m, nw, eps,
                      (const bf16 *)w, y, I, O);
    } else if (wf32)
        gemv_norm_launch(s, x, ldx, delta, m, nw, eps, (const float *)w, y, ldy, N, I, O);
    else
        gemv_norm_launch(s, x, ldx, delta, m, nw, eps, (const bf16 *)w, y, ldy, N, I, O);
    LAUNCH_CHECK("gemv_norm", e);
    return 0;
}

/* ---- the attention combine inside the uv GEMV ---- */

/* gemv_k (batched, a head a batch entry) whose input rows are the attention's combined
 * latents of head blockIdx.y: each block combines them for the N rows into shared memory
 * (attn_combine_row, as gk_attn's combine computes olat) and takes its dot products from there.
 * 8 blocks a head at dv = 64 recompute the same combine; it reads the head's parts from L2. */


/* Warp w of block (blockIdx.x, b) takes outputs R o and R o + 1 (o = 8 blockIdx.x + w) of
 * one row from x: warp_dots of two weight rows, each row's sum bitwise gemv_block's. Half the
 * blocks of gemv_block for the same outputs, so half the uv GEMV's blocks redo its head's
 * combine (gemv_uvc_k<..., 2>). */
template <typename W>
__device__ __forceinline__ void gemv_block_pair(int m, const float *__restrict__ x,
                                                const W *__restrict__ w, long wbs,
                                                float *__restrict__ y, long ybs, int I, int O,
                                                int b)
{
    int o = 2 * (blockIdx.x * GK_WARPS + (threadIdx.x >> 5)), lane = threadIdx.x & 31;
    if (o >= O)
        return;
    int o1 = o + 1 < O ? o + 1 : o;
    const W *wr[2] = {w + b * wbs + (long)o * I, w + b * wbs + (long)o1 * I};
    const float *xs[1] = {x};
    float acc[2][1];
    warp_dots<W, 1, 2>(wr, xs, 1, I, acc);
    gk_pdl_late(m);
    if (lane == 0) {
        y[b * ybs + o] = acc[0][0];
        if (o + 1 < O)
            y[b * ybs + o + 1] = acc[1][0];
    }
}

/* One block's uv GEMV of gemv_uvc_k (R: outputs a warp: 1 gemv_block; 2 gemv_block_pair, one
 * row only). CL > 1 (one row): the grid's blocks in clusters of CL along x, all of one head
 * (CL divides gridDim.x); block rank k combines latent values [k I / CL, (k + 1) I / CL)
 * only and stores them into every block's lat_sm of its cluster. Each of a head's blocks
 * otherwise combines all I values from the head's parts, read from L2: at
 * DeepSeek-V2-Lite's shape 8 blocks a head read 16 MB a launch, which bound the combine
 * (~4 us, DSV3_GINFER_CLOCK). The same operations for each value: the same bits. */
template <typename W, int NT, int PB, int R, int CL>
__device__ __forceinline__ void uvc_block(int m, const float *pm, const float *pl,
                                          const float *pacc, int nsplit, const W *__restrict__ w,
                                          long wbs, float *__restrict__ y, long ldy, long ybs,
                                          int N, int I, int O, unsigned long long *clk)
{
    static_assert(R == 1 || NT == 1, "paired outputs take one row");
    static_assert(CL == 1 || NT == 1, "clusters take one row");
    gk_clock ck;
    gk_clk_start(clk, ck);
    if constexpr (CL > 1)  /* this block has started: the cluster's stores may come */
        asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
    if constexpr (R == 1) {
        gemv_prefetch(m, w, wbs, I, O, blockIdx.y);
    } else {
        int o = 2 * (blockIdx.x * GK_WARPS + (threadIdx.x >> 5));
        const W *wr[2] = {w + blockIdx.y * wbs + (long)o * I,
                          w + blockIdx.y * wbs + (long)(o + 1 < O ? o + 1 : o) * I};
        if (o < O)
            gk_prefetch_rows<GK_WARPS, 2>(m, wr, I);
    }
    gk_clk(clk, 0, ck);
    gk_pdl_enter(m);
    gk_clk(clk, 1, ck);
    extern __shared__ float lat_sm[];  /* [N][I] */
    __shared__ float ws[ATT_MAXSPLIT], ls[ATT_MAXSPLIT], ML[2];
    int b = blockIdx.y;
    if constexpr (CL == 1) {
        for (int n = 0; n < N; n++)
            attn_combine_row<PB>(lat_sm + (long)n * I, pm, pl, pacc, (long)n * gridDim.y + b, I,
                                 nsplit, ws, ls, ML);
    } else {
        cg::cluster_group cl = cg::this_cluster();
        const int k = (int)cl.block_rank(), span = I / CL;
        asm volatile("barrier.cluster.wait.aligned;" ::: "memory");  /* all blocks started */
        attn_combine_span<PB>(pm, pl, pacc, b, I, nsplit, k * span, (k + 1) * span, ws, ls, ML,
                              [&cl](int j, float a) {
#pragma unroll
                                  for (int r = 0; r < CL; r++)
                                      *cl.map_shared_rank(lat_sm + j, r) = a;
                              });
        cl.sync();  /* every block's lat_sm whole; none is read remotely after */
    }
    gk_clk(clk, 2, ck);
    if constexpr (R == 1)
        gemv_block<W, NT>(m, lat_sm, I, 0, w, wbs, y, ldy, ybs, N, I, O, b);
    else
        gemv_block_pair<W>(m, lat_sm, w, wbs, y, ybs, I, O, b);
    gk_clk(clk, 3, ck);
    gk_clk_end(clk, ck);
}

template <typename W, int NT, int PB, int R>
__global__ void __launch_bounds__(GK_WARPS * 32)
    gemv_uvc_k(int m, const float *pm, const float *pl, const float *pacc, int nsplit,
               const W *__restrict__ w, long wbs, float *__restrict__ y, long ldy, long ybs,
               int N, int I, int O, unsigned long long *clk)
{
    uvc_block<W, NT, PB, R, 1>(m, pm, pl, pacc, nsplit, w, wbs, y, ldy, ybs, N, I, O, clk);
}

template <typename W, int R, int CL>
__global__ void __cluster_dims__(CL, 1, 1) __launch_bounds__(GK_WARPS * 32)
    gemv_uvc_cl_k(int m, const float *pm, const float *pl, const float *pacc, int nsplit,
                  const W *__restrict__ w, long wbs, float *__restrict__ y, long ldy, long ybs,
                  int N, int I, int O, unsigned long long *clk)
{
    uvc_block<W, 1, ATT_MAXSPLIT, R, CL>(m, pm, pl, pacc, nsplit, w, wbs, y, ldy, ybs, N, I, O,
                                         clk);
}

/* The one-row uv launch's parts loaded at a time in its combine (attn_combine_row's PB):
 * DSV3_GINFER_UVC_PB = 16, 32 or 64 (the default: all, issued before the parts' maxima are
 * read; ~255 registers a thread, so one block an SM, yet 699 us a 1b-moe step against 714 at
 * 32 and 742 with 64 capped at 128 registers, which spilled; H200, docs/PERF.md). Read at
 * each launch: a decode graph keeps what held at its capture. */
static int uvc_parts_batch(void)
{
    const char *v = getenv("DSV3_GINFER_UVC_PB");
    int pb = v ? atoi(v) : 64;
    return pb == 16 || pb == 32 ? pb : 64;
}

/* Outputs a warp of the one-row uv launch: 2 where one a warp would take more blocks than
 * the device has SMs (its blocks hold ~255 registers: one an SM, so a second wave; each
 * block also redoes its head's combine, a read of the head's parts from L2: DeepSeek-V2-Lite
 * has 16 heads x 128 outputs, 256 blocks), else 1; DSV3_GINFER_UVC_R=1 or 2 sets it (for
 * comparisons). Read at each launch: a decode graph keeps what held at its capture. */
static int uvc_outputs_a_warp(int N, int O, int batch)
{
    const char *v = getenv("DSV3_GINFER_UVC_R");
    if (N != 1)
        return 1;
    if (v && (!strcmp(v, "1") || !strcmp(v, "2")))
        return atoi(v);
    int dev = 0, sms = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
        return 1;
    return (long)(O + GK_WARPS - 1) / GK_WARPS * batch > sms ? 2 : 1;
}

/* Blocks a cluster of the one-row uv launch with every part at once (PB 64) over bx blocks a
 * head and I latent values (uvc_block): DSV3_GINFER_UVC_CL, lowered to the largest of 8, 4, 2
 * that divides bx and I / 8; 1: no clusters (to compare). Unset: 8 where I is more than a
 * block's threads, else 1. Up to a value a thread, each block's combine issues all its parts'
 * loads before the maxima's and takes one L2 round trip, with or without clusters (1b-moe,
 * 256 values: 2.05 us without, 2.28 with, H200); DeepSeek-V2-Lite's 512 take two rounds a
 * thread and 16 MB of L2 reads a launch without (4.15 us; 2.25 in clusters of 8, whose
 * slices of 64 values take one). Read at each launch: a decode graph keeps what held at its
 * capture. */
static int uvc_cluster(int N, int pb, int bx, int I)
{
    const char *v = getenv("DSV3_GINFER_UVC_CL");
    int c = v && *v ? atoi(v) : I > GK_WARPS * 32 ? 8 : 1;
    if (N != 1 || pb != 64)
        return 1;
    for (int k = 8; k > 1; k /= 2)
        if (k <= c && bx % k == 0 && (I / 8) % k == 0)
            return k;
    return 1;
}

int gk_gemv_uvc_fits(int N, int I)
{
    return N <= 4 && (size_t)N * I * sizeof(float) <= 40 * 1024;
}

template <typename W>
static void gemv_uvc_launch(cudaStream_t s, const float *pm, const float *pl, const float *pacc,
                            int nsplit, const W *w, long wbs, float *y, long ldy, long ybs, int N,
                            int I, int O, int batch, unsigned long long *clk)
{
    int pb = uvc_parts_batch(), r = uvc_outputs_a_warp(N, O, batch);
    dim3 grid((O + GK_WARPS * r - 1) / (GK_WARPS * r), batch);
    int cl = uvc_cluster(N, pb, (int)grid.x, I);
    void (*k)(int, const float *, const float *, const float *, int, const W *, long, float *,
              long, long, int, int, int, unsigned long long *) =
        cl == 8   ? (r == 2 ? gemv_uvc_cl_k<W, 2, 8> : gemv_uvc_cl_k<W, 1, 8>)
        : cl == 4 ? (r == 2 ? gemv_uvc_cl_k<W, 2, 4> : gemv_uvc_cl_k<W, 1, 4>)
        : cl == 2 ? (r == 2 ? gemv_uvc_cl_k<W, 2, 2> : gemv_uvc_cl_k<W, 1, 2>)
        : N != 1  ? gemv_uvc_k<W, 4, 16, 1>
        : r == 2  ? (pb == 64 ? gemv_uvc_k<W, 1, 64, 2> : pb == 32 ? gemv_uvc_k<W, 1, 32, 2>
                                                                   : gemv_uvc_k<W, 1, 16, 2>)
        : pb == 64 ? gemv_uvc_k<W, 1, 64, 1>
        : pb == 32 ? gemv_uvc_k<W, 1, 32, 1>
                   : gemv_uvc_k<W, 1, 16, 1>;
    gk_launch_as("uvc", k, grid, GK_WARPS * 32, (size_t)N * I * sizeof(float), s, pm, pl, pacc,
                 nsplit, w, wbs, y, ldy, ybs, N, I, O, clk);
}

int gk_gemv_uvc(cudaStream_t s, const float *pm, const float *pl, const float *pacc,
                int nsplit, const void *w, int wf32, long wbs, float *y, long ldy, long ybs,
                int N, int I, int O, int batch, unsigned long long *clk, dsv3_err *e)
{
    if (N <= 0 || O <= 0 || batch <= 0)
        return 0;
    if (I % 8)
        return err_set(e, "ginfer: a product over %d values (a multiple of 8 is needed)", I);
    if (!gk_gemv_uvc_fits(N, I) || nsplit < 1 || nsplit > ATT_MAXSPLIT)
        return err_set(e, "ginfer: %d rows of %d latents in %d parts for the fused uv GEMV", N,
                       I, nsplit);
    if (wf32)
        gemv_uvc_launch(s, pm, pl, pacc, nsplit, (const float *)w, wbs, y, ldy, ybs, N, I, O,
                        batch, clk);
    else
        gemv_uvc_launch(s, pm, pl, pacc, nsplit, (const bf16 *)w, wbs, y, ldy, ybs, N, I, O,
                        batch, clk);
    LAUNCH_CHECK("gemv_uvc", e);
    return 0;
}

/* ---- MoE ---- */

/* One block (at least 32 threads): thread e counts expert e's choices, warp 0 the prefix
 * sums (a shuffle scan 32 experts at a time, and the list of the groups with rows by ballot:
 * the same integers as a serial loop, which cost one shared round trip an expert), then each
 * expert's choices in assignment order (stable); then the ns rows of the shared group E.
 * cnt: [E + 1] shared. */
__device__ void moe_bucket_body(const int32_t *idx, int NK, int K, int E, int ns, int *off,
                                int *order, int *spos, int *cnt)
{
    for (int x = threadIdx.x; x < E; x += blockDim.x) {
        int c = 0;
        for (int a = 0; a < NK; a++)
            c += idx[a] == x;
        cnt[x] = c;
    }
    __syncthreads();
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x, G = E + (ns > 0);
        int acc = 0, na = 0;
        for (int x0 = 0; x0 < E; x0 += 32) {
            int x = x0 + lane, c = x < E ? cnt[x] : 0, inc = c;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                int u = __shfl_up_sync(0xffffffffu, inc, o);
                if (lane >= o)
                    inc += u;
            }
            unsigned has = __ballot_sync(0xffffffffu, c != 0);
            if (x < E) {
                cnt[x] = acc + inc - c;
                off[x] = acc + inc - c;
                if (c)
                    off[G + 2 + na + __popc(has & ((1u << lane) - 1))] = x;
            }
            acc += __shfl_sync(0xffffffffu, inc, 31);
            na += __popc(has);
        }
        if (lane == 0) {
            off[E] = acc;
            if (ns) {
                off[E + 1] = acc + ns;
                off[G + 2 + na++] = E;
            }
            off[G + 1] = na;
        }
    }
    for (int n = threadIdx.x; n < ns; n += blockDim.x)
        order[NK + n] = n * K;
    __syncthreads();
    for (int x = threadIdx.x; x < E; x += blockDim.x) {
        int p = cnt[x];
        for (int a = 0; a < NK; a++)
            if (idx[a] == x) {
                order[p] = a;
                spos[a] = p++;
            }
    }
}

/* What bucket_row32 and bucket_row64 write besides the chosen experts' entries: the routed
 * rows' end, the shared group's rows and its place in the list, the list's length. */
__device__ __forceinline__ void bucket_row_tail(int K, int E, int ns, int *off, int *order)
{
    const int lane = threadIdx.x & 31, G = E + (ns > 0);
    if (lane == 0) {
        off[E] = K;
        if (ns) {
            off[E + 1] = K + ns;
            off[G + 2 + K] = E;
        }
        off[G + 1] = K + (ns > 0);
    }
    for (int n = lane; n < ns; n += 32)
        order[K + n] = n * K;
}

/* moe_bucket_body for one row of K distinct experts, by the warp that routed it
 * (route_row32: lane x is expert x, rank its place in idx, >= K if not chosen): each
 * chosen expert holds one entry, so an expert's offset is the number chosen below it and
 * the list of groups with rows is the chosen experts in order, then the shared group E.
 * The same integers moe_bucket_body writes, without its block barriers and shared counts. */
__device__ __forceinline__ void bucket_row32(int rank, int K, int E, int ns, int *off, int *order,
                                             int *spos)
{
    const int lane = threadIdx.x & 31, G = E + (ns > 0);
    unsigned chosen = __ballot_sync(0xffffffffu, rank < K);
    int below = __popc(chosen & ((1u << lane) - 1));
    if (lane < E)
        off[lane] = below;
    if (rank < K) {
        off[G + 2 + below] = lane;
        order[below] = rank;
        spos[rank] = below;
    }
    bucket_row_tail(K, E, ns, off, order);
}

/* bucket_row32 for up to 64 experts, two a lane (route_row64: lane x holds experts x and
 * 32 + x, rank[j] the place of expert 32 j + x in idx, >= K if not chosen): the same
 * integers. */
__device__ __forceinline__ void bucket_row64(const int (&rank)[2], int K, int E, int ns, int *off,
                                             int *order, int *spos)
{
    const int lane = threadIdx.x & 31, G = E + (ns > 0);
    const unsigned lt = (1u << lane) - 1;
    unsigned c0 = __ballot_sync(0xffffffffu, rank[0] < K);
    unsigned c1 = __ballot_sync(0xffffffffu, rank[1] < K);
    int below[2] = {__popc(c0 & lt), __popc(c0) + __popc(c1 & lt)};
#pragma unroll
    for (int j = 0; j < 2; j++) {
        int x = lane + 32 * j;
        if (x < E)
            off[x] = below[j];
        if (rank[j] < K) {
            off[G + 2 + below[j]] = x;
            order[below[j]] = rank[j];
            spos[rank[j]] = below[j];
        }
    }
    bucket_row_tail(K, E, ns, off, order);
}

__global__ void moe_bucket_k(int m, const int32_t *idx, int NK, int K, int E, int ns, int *off,
                             int *order, int *spos)
{
    gk_pdl_enter(m);
    __shared__ int cnt[1025];
    moe_bucket_body(idx, NK, K, E, ns, off, order, spos, cnt);
}

/* Before the wait: route_k's router rows and the norm weight nw (NULL: none). Not inlined,
 * nor is grouped_prefetch: inline, ptxas spilled a few bytes in route_k<1, false> and the
 * one-row grouped_k; a call leaves the kernels' registers as they were without it. */
__device__ __noinline__ void route_prefetch(int m, const float *router, const float *nw, int H,
                                            int E)
{
    int o = blockIdx.x * GK_WARPS + (threadIdx.x >> 5);
    const float *wr[1] = {router + (long)o * H};
    if (o < E)
        gk_prefetch_rows<GK_WARPS, 1>(m, wr, H);
    if (nw && gk_pdl_pf(m) && threadIdx.x == 0)
        gk_prefetch_l2(nw, (size_t)H * sizeof(float));
}

/* The router GEMV (fp32 weights, as gemv_k: a warp an expert), then, in the grid's last block
 * to finish (a counter, reset by that block), every row's top-k (route_row, a warp a row) and
 * the bucketing (moe_bucket_body): three launches in one. */
/* With NORM (the fused "post" launch, gk_route_norm): x is the residual stream and the rows
 * routed are add_norm_k's output for (x, delta, mo, nw, eps) with T threads: every block
 * normalises them, NT at a time, into shared memory (norm_row_to) and takes its dot products
 * from there; the last block writes x's sums and the normed rows (xn) as add_norm_k does. */
template <int NT, bool NORM>
__global__ void __launch_bounds__(GK_WARPS * 32)
    route_k(int m, const float *__restrict__ x, const float *__restrict__ router, const float *bias,
            float *logits, float *rs, float *rw, int32_t *idx, int N, int H, int E, int G,
            int TG, int K, int norm, float scale, int ns, int *off, int *order, int *spos,
            unsigned *count, float *xres, const float *delta, gk_moe_out mo, const float *nw,
            float eps, int T, float *xn)
{
    route_prefetch(m, router, NORM ? nw : NULL, H, E);
    gk_pdl_enter(m);
    /* GK_WARPS x [E] choices, then GK_WARPS x [E] flags; with NORM the rows [NT][H] first */
    extern __shared__ float rsm[];
    __shared__ int cnt[1025];
    __shared__ unsigned last;
    __shared__ float red[32];
    float *xs_sm = rsm, *csm = rsm + (NORM ? NT * H : 0);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int o = blockIdx.x * GK_WARPS + warp;
    if (o < E || NORM) {
        const float *wr[1] = {router + (long)(o < E ? o : E - 1) * H};
        for (int n0 = 0; n0 < N; n0 += NT) {
            int nv = min(NT, N - n0);
            if (NORM)
                for (int t = 0; t < nv; t++)
                    norm_row_to(xs_sm + t * H, xres, H, delta, mo, nw, n0 + t, H, T, eps, red);
            const float *xs[NT];
#pragma unroll
            for (int t = 0; t < NT; t++)
                xs[t] = NORM ? xs_sm + (t < nv ? t : 0) * H
                             : x + (long)(n0 + (t < nv ? t : 0)) * H;
            if (o < E) {
                float acc[1][NT];
                warp_dots<float, NT, 1>(wr, xs, nv, H, acc);
#pragma unroll
                for (int t = 0; t < NT; t++)
                    if (lane == t && t < nv)
                        logits[(long)(n0 + t) * E + o] = acc[0][t];
            }
            if (NORM)
                __syncthreads();  /* the rows read before the next chunk overwrites them */
        }
    }
    gk_pdl_late(m);  /* the experts' launch may start while the last block routes */
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0)
        last = atomicAdd(count, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last)
        return;
    __threadfence();
    if (NORM) {
        /* every block has read x: the sums and the normed rows out, for the experts and
         * the layers after (norm_row_to's values recomputed, the sums in add_norm_k's order).
         * Before the routing below: mo.rw and mo.spos are the buffers route_row and the
         * bucketing overwrite with this layer's weights and positions. */
        for (int n = 0; n < N; n++) {
            norm_row_to(xs_sm, xres, H, delta, mo, nw, n, H, T, eps, red);
            float *xr = xres + (long)n * H;
            const float *dr = delta ? delta + (long)n * H : NULL;
            for (int i = threadIdx.x; i < H; i += blockDim.x) {
                xr[i] = residual_sum(xr, dr, mo, n, H, i);
                xn[(long)n * H + i] = xs_sm[i];
            }
            __syncthreads();  /* xs_sm read before the next row's norm */
        }
    }
    float *choice = csm + warp * E;
    unsigned char *taken = (unsigned char *)(csm + GK_WARPS * E) + warp * E;
    for (int n = warp; n < N; n += GK_WARPS)
        route_row(idx, rw, rs, logits, bias, n, E, G, TG, K, norm, scale, choice, taken);
    __syncthreads();  /* the block's idx writes visible to the whole block */
    moe_bucket_body(idx, N * K, K, E, ns, off, order, spos, cnt);
    if (threadIdx.x == 0)
        *count = 0;
}

/* The router of one row in one cluster of ROUTE1_CTAS blocks of GK_WARPS warps (gk_route with
 * route1_fits): warp x of the cluster takes expert x's dot product as route_k's warp_dots does
 * (the same pieces a lane, the same order), with the router row in registers before the wait
 * (a weight: no kernel before writes it; spread over the cluster's SMs so each loads a quarter
 * of it), so after the wait only x's read from L2 and the sums are left; the logits go to
 * block 0's shared memory (distributed shared memory, one cluster barrier), where warp 0
 * routes (route_row32) and the block buckets (moe_bucket_body). route_k's outputs bitwise,
 * without its last-block hand-over (a fence, a counter's round trip, the logits read back
 * through L2) and TG + K dependent rounds of shuffles. */
#define ROUTE1_CHUNKS 4 /* 256-value pieces of a row a lane holds: H <= 1024 */
#define ROUTE1_CTAS 4   /* blocks of the cluster: 32 experts */
/* The wide form (route1_k<false, 8, 8>, without the norm): rows of H <= 2048 in 8 pieces a
 * lane, 64 experts in a cluster of 8 blocks (the most a portable cluster holds), ranked two
 * a lane (route_row64): DeepSeek-V2-Lite's router (64 experts over 2048 values), which
 * route_k's grid and last block took 14 us a layer to route (H200, docs/PERF.md). */
#define ROUTE1_WIDE_CHUNKS 8
#define ROUTE1_WIDE_CTAS 8

/* route1_k's post-attention norm (route1_k<true>): x += delta, xn = norm(x) (weight nw). */
struct route1_norm {
    float *x;
    const float *delta, *nw;
    float eps;
    float *xn;
};

/* Warp o's router logit (o < E; route1_k's layout), its row in registers before the wait.
 * NORM: the input is norm(na.x + na.delta) (add_norm_k's values, bitwise: each warp forms the
 * norm's sum of squares itself, warp_norm_ss), the norm weight in registers before the wait
 * too; sum and nrm: the lane's values of the new x and of xn in the dot's layout (value
 * lane * 8 + 256 j + k), for route1_k to store once every warp has read x. */
template <bool NORM, int CH>
__device__ __forceinline__ float route1_dot(int m, const float *__restrict__ x,
                                            const float *__restrict__ router, int H, int E, int o,
                                            const route1_norm &na, float (&sum)[CH][8],
                                            float (&nrm)[CH][8], unsigned long long *clk,
                                            gk_clock &ck)
{
    static_assert(!NORM || CH <= 4, "warp_norm_ss takes rows of at most 1024 values");
    int lane = threadIdx.x & 31;
    const float *wr = router + (long)(o < E ? o : 0) * H;
    float wv[CH][8], nwv[NORM ? CH : 1][8];
#pragma unroll
    for (int j = 0; j < CH; j++)
        if (lane * 8 + 256 * j < H) {
            ldw8(wr + lane * 8 + 256 * j, wv[j]);
            if (NORM)
                ldw8(na.nw + lane * 8 + 256 * j, nwv[NORM ? j : 0]);
        }
    gk_clk(clk, 0, ck);
    gk_pdl_enter(m);
    gk_clk(clk, 1, ck);
    /* the row in the dot's layout (x, or with NORM the sums x + delta), all loads first */
    float xc[CH][8];
#pragma unroll
    for (int j = 0; j < CH; j++) {
        int i = lane * 8 + 256 * j;
        if (i < H) {
            if (NORM) {
                float a[8], d[8];
                ldx8(na.x + i, a);
                ldx8(na.delta + i, d);
#pragma unroll
                for (int k = 0; k < 8; k++)
                    xc[j][k] = a[k] + d[k];
            } else {
                ldx8(x + i, xc[j]);
            }
        } else {
#pragma unroll
            for (int k = 0; k < 8; k++)
                xc[j][k] = 0.0f;
        }
    }
    if (NORM) {
        float sq[CH][8];
#pragma unroll
        for (int j = 0; j < CH; j++)
#pragma unroll
            for (int k = 0; k < 8; k++) {
                sum[j][k] = xc[j][k];
                sq[j][k] = __fmul_rn(xc[j][k], xc[j][k]);  /* add_norm_k's v * v; 0 past H */
            }
        float r = rsqrtf(warp_norm_ss<CH>(sq) / H + na.eps);
#pragma unroll
        for (int j = 0; j < CH; j++)
#pragma unroll
            for (int k = 0; k < 8; k++)
                xc[j][k] = nrm[j][k] = nwv[NORM ? j : 0][k] * (xc[j][k] * r);
    }
    float acc = 0.0f;
#pragma unroll
    for (int j = 0; j < CH; j++)
        if (lane * 8 + 256 * j < H)
#pragma unroll
            for (int k = 0; k < 8; k++)
                acc = fmaf(wv[j][k], xc[j][k], acc);
    acc = warp_sum(acc);
    gk_clk(clk, 2, ck);
    gk_pdl_late(m);
    return acc;
}

/* The one-row router in one cluster of CT blocks (gk_route1_fits): block b's warps w the
 * logits of experts 8 b + w, gathered in block 0's shared memory, where one warp ranks and
 * buckets (an expert a lane, or two: route_row64). CH: 256-value pieces of the row a lane
 * holds. NORM: the post-attention add_norm first (route1_dot); each warp stores its slice of
 * the new x and xn after the cluster barrier, when no warp reads x any more. */
template <bool NORM, int CH, int CT>
__global__ void __cluster_dims__(CT, 1, 1) __launch_bounds__(GK_WARPS * 32, NORM ? 1 : 0)
    route1_k(int m, const float *__restrict__ x, const float *__restrict__ router,
             const float *bias, float *logits, float *rs, float *rw, int32_t *idx, int H, int E,
             int G, int TG, int K, int norm, float scale, int ns, int *off, int *order, int *spos,
             route1_norm na, unsigned long long *clk)
{
    constexpr int NE = CT * GK_WARPS; /* experts the cluster takes: 32 or 64 */
    static_assert(NE == 32 || NE == 64, "route1_k ranks 32 or 64 experts");
    /* route_row32 reads 16 bytes a load */
    __shared__ __align__(16) float lg[NE], sc[NE], svr[NE];
    __shared__ int ir[NE];
    gk_clock ck;
    gk_clk_start(clk, ck);
    cg::cluster_group cl = cg::this_cluster();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int o = blockIdx.x * GK_WARPS + warp;
    float bx[NE / 32];
#pragma unroll
    for (int j = 0; j < NE / 32; j++)
        bx[j] = bias && blockIdx.x == 0 && warp == 0 && lane + 32 * j < E
                    ? __ldg(bias + lane + 32 * j)
                    : 0.0f;
    float sum[CH][8], nrm[CH][8];  /* only with NORM */
    float acc = route1_dot<NORM, CH>(m, x, router, H, E, o, na, sum, nrm, clk, ck);
    if (o < E && lane == 0)
        *cl.map_shared_rank(&lg[o], 0) = acc;
    /* the logits in block 0's shared memory (stored to device memory after the barrier: a
     * global store before it would be one more write its release waits for) */
    cl.sync();
    gk_clk(clk, 3, ck);
    if (NORM && lane / 4 == warp) {
        /* warp w of each block stores values 256 j + 32 w + [0, 32) for every j: each value
         * stored by the 4 blocks alike (as a piece chosen by the block, ptxas indexed the
         * arrays and put them in local memory) */
#pragma unroll
        for (int j = 0; j < CH; j++) {
            int i = lane * 8 + 256 * j;
            if (i < H)
#pragma unroll
                for (int k = 0; k < 8; k += 4) {
                    *(float4 *)&na.x[i + k] =
                        make_float4(sum[j][k], sum[j][k + 1], sum[j][k + 2], sum[j][k + 3]);
                    *(float4 *)&na.xn[i + k] =
                        make_float4(nrm[j][k], nrm[j][k + 1], nrm[j][k + 2], nrm[j][k + 3]);
                }
        }
    }
    if (blockIdx.x != 0 || warp != 0)
        return;
    float l[NE / 32];
#pragma unroll
    for (int j = 0; j < NE / 32; j++) {
        int x = lane + 32 * j;
        l[j] = x < E ? lg[x] : 0.0f;
        if (x < E)
            logits[x] = l[j];
    }
    if constexpr (NE == 32) {
        int rank = route_row32(idx, rw, rs, l[0], bx[0], 0, E, G, TG, K, norm, scale, sc, svr, ir);
        gk_clk(clk, 4, ck);
        bucket_row32(rank, K, E, ns, off, order, spos);
    } else {
        int rank[2];
        route_row64(idx, rw, rs, l, bx, 0, E, G, TG, K, norm, scale, sc, svr, ir, rank);
        gk_clk(clk, 4, ck);
        bucket_row64(rank, K, E, ns, off, order, spos);
    }
    gk_clk(clk, 5, ck);
    gk_clk_end(clk, ck);
}

/* The one-cluster router's shape for H and E (route1_k's CH and CT), or 0 (route_k then). */
static int route1_chunks(int H)
{
    return H <= 256 * ROUTE1_CHUNKS ? ROUTE1_CHUNKS
           : H <= 256 * ROUTE1_WIDE_CHUNKS ? ROUTE1_WIDE_CHUNKS : 0;
}

static int route1_ctas(int E)
{
    return E <= ROUTE1_CTAS * GK_WARPS ? ROUTE1_CTAS
           : E <= ROUTE1_WIDE_CTAS * GK_WARPS ? ROUTE1_WIDE_CTAS : 0;
}

int gk_route1_fits(int N, int H, int E)
{
    return N == 1 && route1_chunks(H) && route1_ctas(E);
}

/* With the norm inside (route1_k<true>): the narrow form only. */
int gk_route1_norm_fits(int N, int H, int E)
{
    return N == 1 && E <= ROUTE1_CTAS * GK_WARPS && H <= 256 * ROUTE1_CHUNKS;
}

/* The router's shapes (gk_route, gk_route_norm): -1 with e set on one it does not take. */
static int route_check(int H, int E, int G, int TG, int K, dsv3_err *e)
{
    if (E > 1024 || G < 1 || G > 32 || E % G || K < 1 || K > 32 || TG < 1 || TG > G ||
        K > TG * (E / G))
        return err_set(e, "router: unsupported shape E=%d n_group=%d topk_group=%d k=%d", E,
                       G, TG, K);
    if (H % 8)
        return err_set(e, "ginfer: hidden size %d (a multiple of 8 is needed)", H);
    return 0;
}

int gk_route(cudaStream_t s, const float *x, const float *router, const float *bias,
             float *logits, float *rs, float *rw, int32_t *idx, int N, int H, int E, int G,
             int TG, int K, int norm, float scale, int ns, int *off, int *order, int *spos,
             unsigned *count, int one, unsigned long long *clk, dsv3_err *e)
{
    if (route_check(H, E, G, TG, K, e))
        return -1;
    if (N <= 0)
        return 0;
    if (one && gk_route1_fits(N, H, E)) {
        int ch = route1_chunks(H), ct = route1_ctas(E);
        void (*k)(int, const float *, const float *, const float *, float *, float *, float *,
                  int32_t *, int, int, int, int, int, int, float, int, int *, int *, int *,
                  route1_norm, unsigned long long *) =
            ch == ROUTE1_CHUNKS
                ? (ct == ROUTE1_CTAS ? route1_k<false, ROUTE1_CHUNKS, ROUTE1_CTAS>
                                     : route1_k<false, ROUTE1_CHUNKS, ROUTE1_WIDE_CTAS>)
                : (ct == ROUTE1_CTAS ? route1_k<false, ROUTE1_WIDE_CHUNKS, ROUTE1_CTAS>
                                     : route1_k<false, ROUTE1_WIDE_CHUNKS, ROUTE1_WIDE_CTAS>);
        gk_launch_as("route", k, ct, GK_WARPS * 32, 0, s, x, router, bias, logits, rs, rw, idx, H,
                     E, G, TG, K, norm, scale, ns, off, order, spos, route1_norm{}, clk);
        LAUNCH_CHECK("route1", e);
        return 0;
    }
    size_t smem = (size_t)GK_WARPS * E * (sizeof(float) + 1);
    unsigned grid = (unsigned)((E + GK_WARPS - 1) / GK_WARPS);
    gk_launch(N == 1 ? route_k<1, false> : N <= 4 ? route_k<4, false> : route_k<8, false>, grid,
              GK_WARPS * 32, smem, s, x, router, bias, logits, rs, rw, idx, N, H, E, G, TG, K,
              norm, scale, ns, off, order, spos, count, (float *)NULL, (const float *)NULL,
              gk_moe_out{}, (const float *)NULL, 0.0f, 0, (float *)NULL);
    LAUNCH_CHECK("route", e);
    return 0;
}

int gk_route1_norm(cudaStream_t s, float *x, const float *delta, const float *nw, float eps,
                   float *xn, const float *router, const float *bias, float *logits, float *rs,
                   float *rw, int32_t *idx, int N, int H, int E, int G, int TG, int K, int norm,
                   float scale, int ns, int *off, int *order, int *spos, unsigned long long *clk,
                   dsv3_err *e)
{
    if (route_check(H, E, G, TG, K, e))
        return -1;
    if (!gk_route1_norm_fits(N, H, E))
        return err_set(e, "ginfer: the one-cluster router takes one row of <= %d values and <= %d "
                       "experts (%d rows, %d, %d)", 256 * ROUTE1_CHUNKS, ROUTE1_CTAS * GK_WARPS,
                       N, H, E);
    route1_norm na = {x, delta, nw, eps, xn};
    gk_launch(route1_k<true, ROUTE1_CHUNKS, ROUTE1_CTAS>, ROUTE1_CTAS, GK_WARPS * 32, 0, s, (const float *)NULL, router, bias,
              logits, rs, rw, idx, H, E, G, TG, K, norm, scale, ns, off, order, spos, na, clk);
    LAUNCH_CHECK("route1_norm", e);
    return 0;
}

static int route_norm_nt(int N)
{
    return N == 1 ? 1 : N <= 4 ? 4 : 8;
}

int gk_route_norm_fits(int N, int H, int E)
{
    return N <= 8 && E <= 1024 &&
           (size_t)route_norm_nt(N) * H * sizeof(float) + (size_t)GK_WARPS * E * 5 <= 40 * 1024;
}

int gk_route_norm(cudaStream_t s, float *x, const float *delta, const gk_moe_out *mo,
                  const float *nw, float eps, float *xn, const float *router, const float *bias,
                  float *logits, float *rs, float *rw, int32_t *idx, int N, int H, int E, int G,
                  int TG, int K, int norm, float scale, int ns, int *off, int *order, int *spos,
                  unsigned *count, dsv3_err *e)
{
    if (route_check(H, E, G, TG, K, e))
        return -1;
    if (N <= 0)
        return 0;
    if (!gk_route_norm_fits(N, H, E))
        return err_set(e, "ginfer: %d normalised rows of %d values do not fit the router", N, H);
    gk_moe_out m = {};
    if (mo)
        m = *mo;
    int nt = route_norm_nt(N);
    size_t smem = (size_t)nt * H * sizeof(float) + (size_t)GK_WARPS * E * (sizeof(float) + 1);
    unsigned grid = (unsigned)((E + GK_WARPS - 1) / GK_WARPS);
    gk_launch(nt == 1 ? route_k<1, true> : nt == 4 ? route_k<4, true> : route_k<8, true>, grid,
              GK_WARPS * 32, smem, s, (const float *)NULL, router, bias, logits, rs, rw, idx, N, H,
              E, G, TG, K, norm, scale, ns, off, order, spos, count, x, delta, m, nw, eps,
              norm_threads(H), xn);
    LAUNCH_CHECK("route_norm", e);
    return 0;
}

/* ginfer_route1_norm_run's device buffers: x, delta, nw, xn, router, bias, then route_run's
 * outputs and the counter. */
enum { RN_X, RN_D, RN_NW, RN_XN, RN_W, RN_B, RN_LOGITS, RN_RS, RN_RW, RN_IDX, RN_OFF, RN_ORDER,
       RN_SPOS, RN_CNT, RN_N };

extern "C" int ginfer_route1_norm_run(const float *x, const float *delta, const float *nw,
                                      float eps, const float *router, const float *bias, int H,
                                      int E, int G, int TG, int K, int norm, float scale, int ns,
                                      int fused, float *xo, float *xn, float *logits, float *rs,
                                      float *rw, int32_t *idx, int *off, int *order, int *spos,
                                      dsv3_err *e)
{
    size_t sz[RN_N] = {(size_t)H * 4, (size_t)H * 4, (size_t)H * 4, (size_t)H * 4,
                       (size_t)E * H * 4, (size_t)E * 4, (size_t)E * 4, (size_t)E * 4,
                       (size_t)K * 4, (size_t)K * 4, (size_t)(2 * E + 4) * 4,
                       (size_t)(K + ns) * 4, (size_t)K * 4, 16};
    const void *in[RN_N] = {x, delta, nw, NULL, router, bias};
    void *out[RN_N] = {xo, NULL, NULL, xn, NULL, NULL, logits, rs, rw, idx, off, order, spos};
    void *d[RN_N] = {};
    int rc = 0;
    for (int i = 0; i < RN_N && !rc; i++)
        if (cudaMalloc(&d[i], sz[i]) != cudaSuccess)
            rc = err_set(e, "ginfer_route1_norm_run: out of device memory");
    for (int i = 0; i < RN_N && !rc; i++) {
        cudaMemset(d[i], i == RN_CNT ? 0 : 0xff, sz[i]);
        if (in[i])
            cudaMemcpy(d[i], in[i], sz[i], cudaMemcpyHostToDevice);
    }
    const float *b = bias ? (const float *)d[RN_B] : NULL;
    float *const *f = (float *const *)d;
    if (!rc && fused)
        rc = gk_route1_norm(0, f[RN_X], f[RN_D], f[RN_NW], eps, f[RN_XN], f[RN_W], b,
                            f[RN_LOGITS], f[RN_RS], f[RN_RW], (int32_t *)d[RN_IDX], 1, H, E, G,
                            TG, K, norm, scale, ns, (int *)d[RN_OFF], (int *)d[RN_ORDER],
                            (int *)d[RN_SPOS], NULL, e);
    else if (!rc)
        rc = gk_add_norm(0, f[RN_X], H, f[RN_D], NULL, f[RN_NW], f[RN_XN], 1, H, eps, e) ||
             gk_route(0, f[RN_XN], f[RN_W], b, f[RN_LOGITS], f[RN_RS], f[RN_RW],
                      (int32_t *)d[RN_IDX], 1, H, E, G, TG, K, norm, scale, ns, (int *)d[RN_OFF],
                      (int *)d[RN_ORDER], (int *)d[RN_SPOS], (unsigned *)d[RN_CNT], 1, NULL, e);
    if (!rc) {
        cudaError_t c = cudaDeviceSynchronize();
        for (int i = 0; i < RN_N && c == cudaSuccess; i++)
            if (out[i])
                c = cudaMemcpy(out[i], d[i], sz[i], cudaMemcpyDeviceToHost);
        if (c != cudaSuccess)
            rc = err_set(e, "ginfer_route1_norm_run: %s", cudaGetErrorString(c));
    }
    for (int i = 0; i < RN_N; i++)
        cudaFree(d[i]);
    return rc ? -1 : 0;
}

/* The tests' rows x[N, V] and ban[V] (or NULL) on the device, and a zeroed scratch of ss
 * bytes: 0, or -1 with what is allocated left for the caller to free. */
static int rows_to_device(const float *x, int N, int V, const uint8_t *ban, size_t ss,
                          float **dx, uint8_t **db, void **scr, const char *who, dsv3_err *e)
{
    if (cudaMalloc(dx, (size_t)N * V * 4 + 4) != cudaSuccess ||
        cudaMalloc(db, (size_t)V + 1) != cudaSuccess || cudaMalloc(scr, ss) != cudaSuccess)
        return err_set(e, "%s: out of device memory", who);
    cudaMemcpy(*dx, x, (size_t)N * V * 4, cudaMemcpyHostToDevice);
    if (ban)
        cudaMemcpy(*db, ban, (size_t)V, cudaMemcpyHostToDevice);
    cudaMemset(*scr, 0, ss);
    return 0;
}

extern "C" int ginfer_topk_run(const float *x, int N, int V, const uint8_t *ban, int K,
                               int32_t *ids, float *logits, double *us, dsv3_err *e)
{
    float *dx = NULL;
    uint8_t *db = NULL;
    gk_cand *h = NULL, *d = NULL;
    void *scr = NULL;
    size_t ss = gk_topk_scratch(N, V, K);
    int rc = rows_to_device(x, N, V, ban, ss, &dx, &db, &scr, "ginfer_topk_run", e);
    if (!rc && (cudaHostAlloc((void **)&h, (size_t)N * K * sizeof *h + 8, cudaHostAllocMapped) !=
                    cudaSuccess ||
                cudaHostGetDevicePointer((void **)&d, h, 0) != cudaSuccess))
        rc = err_set(e, "ginfer_topk_run: out of mapped host memory");
    if (!rc) {
        /* twice: the second call finds the counters as the first left them */
        for (int t = 0; t < 2 && !rc; t++) {
            memset(h, 0xff, (size_t)N * K * sizeof *h);
            rc = gk_topk(0, dx, N, V, ban ? db : NULL, K, scr, N, d, e) ||
                 (cudaDeviceSynchronize() != cudaSuccess &&
                  err_set(e, "ginfer_topk_run: %s", cudaGetErrorString(cudaGetLastError())));
        }
    }
    for (long i = 0; !rc && i < (long)N * K; i++) {
        ids[i] = h[i].id;
        logits[i] = h[i].logit;
    }
    cudaEvent_t ev[2] = {NULL, NULL};
    if (!rc && us && cudaEventCreate(&ev[0]) == cudaSuccess &&
        cudaEventCreate(&ev[1]) == cudaSuccess) {  /* 20 calls back to back, timed */
        cudaEventRecord(ev[0], 0);
        for (int t = 0; t < 20 && !rc; t++)
            rc = gk_topk(0, dx, N, V, ban ? db : NULL, K, scr, N, d, e);
        cudaEventRecord(ev[1], 0);
        float ms = 0;
        if (!rc && cudaEventSynchronize(ev[1]) == cudaSuccess &&
            cudaEventElapsedTime(&ms, ev[0], ev[1]) == cudaSuccess)
            *us = ms * 1e3 / 20;
    }
    for (int i = 0; i < 2; i++)
        if (ev[i])
            cudaEventDestroy(ev[i]);
    cudaFree(dx), cudaFree(db), cudaFree(scr);
    if (h)
        cudaFreeHost(h);
    return rc ? -1 : 0;
}

extern "C" int ginfer_draw_run(const float *x, int N, int V, const uint8_t *ban, int K,
                               sampler_draw *draw, int32_t *ids, dsv3_err *e)
{
    float *dx = NULL;
    uint8_t *db = NULL;
    void *scr = NULL;
    int32_t *din = NULL, *dhost = NULL;
    sampler_draw *dd = NULL;
    size_t ss = gk_topk_scratch(N, V, K);
    int rc = rows_to_device(x, N, V, ban, ss, &dx, &db, &scr, "ginfer_draw_run", e);
    if (!rc && (cudaMalloc(&din, (size_t)4 * N * 4) != cudaSuccess ||
                cudaMalloc(&dhost, (size_t)2 * N * 4) != cudaSuccess ||
                cudaMalloc(&dd, (size_t)N * sizeof *dd) != cudaSuccess))
        rc = err_set(e, "ginfer_draw_run: out of device memory");
    int32_t *hin = (int32_t *)calloc((size_t)4 * N, 4), *hh = (int32_t *)malloc((size_t)2 * N * 4);
    if (!rc && (!hin || !hh))
        rc = err_set(e, "ginfer_draw_run: out of memory");
    for (int i = 0; !rc && i < N; i++)
        hin[i] = -1;  /* slot 0, position 0, ring place 0 of 2 */
    if (!rc) {
        cudaMemcpy(din, hin, (size_t)4 * N * 4, cudaMemcpyHostToDevice);
        cudaMemset(dhost, 0xff, (size_t)2 * N * 4);
        cudaMemcpy(dd, draw, (size_t)N * sizeof *dd, cudaMemcpyHostToDevice);
        gk_feed fd = {din, N, -1, dhost, 2, N};
        rc = gk_topk_draw(0, dx, N, V, ban ? db : NULL, K, scr, N, NULL, dd, &fd, NULL, e) ||
             (cudaDeviceSynchronize() != cudaSuccess &&
              err_set(e, "ginfer_draw_run: %s", cudaGetErrorString(cudaGetLastError())));
    }
    if (!rc) {
        cudaMemcpy(hin, din, (size_t)4 * N * 4, cudaMemcpyDeviceToHost);
        cudaMemcpy(hh, dhost, (size_t)2 * N * 4, cudaMemcpyDeviceToHost);
        cudaMemcpy(draw, dd, (size_t)N * sizeof *dd, cudaMemcpyDeviceToHost);
        for (int i = 0; i < N && !rc; i++) {
            ids[i] = hh[i];
            if (hin[i] != hh[i] || hh[N + i] != -1 || hin[2 * N + i] != 1 || hin[3 * N + i] != 1)
                rc = err_set(e, "ginfer_draw_run: row %d fed %d, host %d, place 1 %d, position "
                             "%d, place %d", i, hin[i], hh[i], hh[N + i], hin[2 * N + i],
                             hin[3 * N + i]);
        }
    }
    free(hin);
    free(hh);
    cudaFree(dx), cudaFree(db), cudaFree(scr), cudaFree(din), cudaFree(dhost), cudaFree(dd);
    return rc ? -1 : 0;
}

extern "C" int ginfer_argmax_run(const float *x, int N, int V, const uint8_t *ban, int32_t *out,
                                 dsv3_err *e)
{
    float *dx = NULL;
    uint8_t *db = NULL;
    int32_t *dout = NULL;
    void *scr = NULL;
    size_t ss = gk_argmax_scratch(N);
    int rc = rows_to_device(x, N, V, ban, ss, &dx, &db, &scr, "ginfer_argmax_run", e);
    if (!rc && cudaMalloc(&dout, (size_t)N * 4) != cudaSuccess)
        rc = err_set(e, "ginfer_argmax_run: out of device memory");
    if (!rc) {
        /* twice: the second call finds the counters as the first left them */
        for (int t = 0; t < 2 && !rc; t++) {
            cudaMemset(dout, 0xff, (size_t)N * 4);
            rc = gk_argmax(0, dx, N, V, ban ? db : NULL, scr, N, dout, NULL, e);
        }
    }
    if (!rc) {
        cudaError_t c = cudaDeviceSynchronize();
        if (c == cudaSuccess)
            c = cudaMemcpy(out, dout, (size_t)N * 4, cudaMemcpyDeviceToHost);
        if (c != cudaSuccess)
            rc = err_set(e, "ginfer_argmax_run: %s", cudaGetErrorString(c));
    }
    cudaFree(dx), cudaFree(db), cudaFree(dout), cudaFree(scr);
    return rc ? -1 : 0;
}

/* Host fp32 values n into device memory as the weights' type (bf16 unless wf32). */
static int grouped_weights(void **d, const float *w, size_t n, int wf32)
{
    size_t b = n * (wf32 ? 4 : 2);
    if (cudaMalloc(d, b) != cudaSuccess)
        return -1;
    if (wf32)
        return cudaMemcpy(*d, w, b, cudaMemcpyHostToDevice) == cudaSuccess ? 0 : -1;
    bf16 *t = (bf16 *)malloc(b);
    if (!t)
        return -1;
    for (size_t i = 0; i < n; i++)
        t[i] = __float2bfloat16(w[i]);
    int rc = cudaMemcpy(*d, t, b, cudaMemcpyHostToDevice) == cudaSuccess ? 0 : -1;
    free(t);
    return rc;
}

extern "C" int ginfer_gemv_run(const float *x, const float *w, int I, int O, int batch, int O1,
                               float *y, dsv3_err *e)
{
    float *dx = NULL, *dy = NULL;
    void *dw = NULL;
    int rc = 0;
    if (cudaMalloc(&dx, (size_t)batch * I * 4) != cudaSuccess ||
        cudaMalloc(&dy, (size_t)batch * O * 4) != cudaSuccess ||
        grouped_weights(&dw, w, (size_t)batch * O * I, 0))
        rc = err_set(e, "ginfer_gemv_run: out of device memory");
    if (!rc) {
        cudaMemcpy(dx, x, (size_t)batch * I * 4, cudaMemcpyHostToDevice);
        cudaMemset(dy, 0xff, (size_t)batch * O * 4);
        rc = O1 > 0 ? gk_gemv_two(0, dx, I, dw, 0, dy, O1, O1, dy + O1, O - O1, 1, I, O, e)
                    : gk_gemv(0, dx, I, I, dw, 0, (long)O * I, dy, O, O, 1, I, O, batch, e);
    }
    if (!rc) {
        cudaError_t c = cudaDeviceSynchronize();
        if (c == cudaSuccess)
            c = cudaMemcpy(y, dy, (size_t)batch * O * 4, cudaMemcpyDeviceToHost);
        if (c != cudaSuccess)
            rc = err_set(e, "ginfer_gemv_run: %s", cudaGetErrorString(c));
    }
    cudaFree(dx), cudaFree(dy), cudaFree(dw);
    return rc ? -1 : 0;
}

extern "C" int ginfer_lat_run(const float *x, const float *w, const float *ukT, int I, int nh,
                              int qk, int nope, int W, int kv, int lat, float *q, float *kva,
                              float *qlat, dsv3_err *e)
{
    const int Q = nh * qk, O = Q + W;
    float *dx = NULL, *dq = NULL, *dkva = NULL, *dlat = NULL;
    void *dw = NULL, *du = NULL;
    int rc = 0;
    if (cudaMalloc(&dx, (size_t)I * 4) != cudaSuccess ||
        cudaMalloc(&dq, (size_t)Q * 4) != cudaSuccess ||
        cudaMalloc(&dkva, (size_t)(W ? W : 1) * 4) != cudaSuccess ||
        cudaMalloc(&dlat, (size_t)nh * kv * 4) != cudaSuccess ||
        grouped_weights(&dw, w, (size_t)O * I, 0) ||
        grouped_weights(&du, ukT, (size_t)nh * kv * nope, 0))
        rc = err_set(e, "ginfer_lat_run: out of device memory");
    if (!rc) {
        cudaMemcpy(dx, x, (size_t)I * 4, cudaMemcpyHostToDevice);
        cudaMemset(dq, 0xff, (size_t)Q * 4);
        cudaMemset(dkva, 0xff, (size_t)(W ? W : 1) * 4);
        cudaMemset(dlat, 0xff, (size_t)nh * kv * 4);
        rc = lat ? gk_gemv_lat(0, dx, dw, I, nh, qk, nope, W, dq, dkva, du, kv, dlat, NULL, e)
                 : gk_gemv_two(0, dx, I, dw, 0, dq, Q, Q, dkva, W, 1, I, O, e) ||
                       gk_gemv(0, dq, Q, qk, du, 0, (long)kv * nope, dlat, (long)nh * kv, kv, 1,
                               nope, kv, nh, e);
    }
    if (!rc) {
        cudaError_t c = cudaDeviceSynchronize();
        if (c == cudaSuccess)
            c = cudaMemcpy(q, dq, (size_t)Q * 4, cudaMemcpyDeviceToHost);
        if (c == cudaSuccess && W)
            c = cudaMemcpy(kva, dkva, (size_t)W * 4, cudaMemcpyDeviceToHost);
        if (c == cudaSuccess)
            c = cudaMemcpy(qlat, dlat, (size_t)nh * kv * 4, cudaMemcpyDeviceToHost);
        if (c != cudaSuccess)
            rc = err_set(e, "ginfer_lat_run: %s", cudaGetErrorString(c));
    }
    cudaFree(dx), cudaFree(dq), cudaFree(dkva), cudaFree(dlat), cudaFree(dw), cudaFree(du);
    return rc ? -1 : 0;
}

extern "C" int ginfer_grouped_run(const float *x, const float *w1, const float *w2,
                                  const int32_t *idx, int E, int K, int sh, int H, int F,
                                  int wf32, int one, float *h, float *y, dsv3_err *e)
{
    int G = E + (sh ? 1 : 0), R = K + (sh ? 1 : 0);
    float *dx = NULL, *dh = NULL, *dy = NULL;
    int32_t *di = NULL;
    int *off = NULL, *order = NULL, *spos = NULL;
    void *dw1 = NULL, *dw2 = NULL;
    int rc = 0;
    if (cudaMalloc(&dx, (size_t)H * 4) != cudaSuccess ||
        cudaMalloc(&dh, (size_t)R * F * 4) != cudaSuccess ||
        cudaMalloc(&dy, (size_t)R * H * 4) != cudaSuccess ||
        cudaMalloc(&di, (size_t)K * 4) != cudaSuccess ||
        cudaMalloc(&off, (size_t)(2 * E + 4) * 4) != cudaSuccess ||
        cudaMalloc(&order, (size_t)R * 4) != cudaSuccess ||
        cudaMalloc(&spos, (size_t)R * 4) != cudaSuccess ||
        grouped_weights(&dw1, w1, (size_t)G * 2 * F * H, wf32) ||
        grouped_weights(&dw2, w2, (size_t)G * H * F, wf32))
        rc = err_set(e, "ginfer_grouped_run: out of device memory");
    if (!rc) {
        cudaMemcpy(dx, x, (size_t)H * 4, cudaMemcpyHostToDevice);
        cudaMemcpy(di, idx, (size_t)K * 4, cudaMemcpyHostToDevice);
        cudaMemset(dh, 0xff, (size_t)R * F * 4);
        cudaMemset(dy, 0xff, (size_t)R * H * 4);
        if (K == 0)  /* a dense MLP: one group, no bucket list */
            rc = gk_ffn_up(0, dx, dw1, wf32, 0, dh, NULL, NULL, 1, 1, 1, 1, 1, H, F, one, e) ||
                 gk_ffn_down(0, dh, dw2, wf32, 0, dy, NULL, 1, 1, 1, 1, F, H, one, e);
        else
            rc = gk_moe_bucket(0, di, K, K, E, sh ? 1 : 0, off, order, spos, e) ||
                 gk_ffn_up(0, dx, dw1, wf32, 2L * F * H, dh, order, off, K, G, R, 1, 1, H, F,
                           one, e) ||
                 gk_ffn_down(0, dh, dw2, wf32, (long)H * F, dy, off, G, R, 1, 1, F, H, one, e);
    }
    if (!rc) {
        cudaError_t c = cudaDeviceSynchronize();
        if (c == cudaSuccess)
            c = cudaMemcpy(h, dh, (size_t)R * F * 4, cudaMemcpyDeviceToHost);
        if (c == cudaSuccess)
            c = cudaMemcpy(y, dy, (size_t)R * H * 4, cudaMemcpyDeviceToHost);
        if (c != cudaSuccess)
            rc = err_set(e, "ginfer_grouped_run: %s", cudaGetErrorString(c));
    }
    cudaFree(dx), cudaFree(dh), cudaFree(dy), cudaFree(di), cudaFree(off), cudaFree(order);
    cudaFree(spos), cudaFree(dw1), cudaFree(dw2);
    return rc ? -1 : 0;
}

extern "C" int ginfer_add_norm_run(float *x, const float *delta, const float *ye,
                                   const float *rw, const int *spos, const float *ys,
                                   const float *w, int D, int K, float eps, float *out,
                                   dsv3_err *e)
{
    size_t nb = (size_t)D * 4;
    float *d[6] = {};  /* x, delta, ye, ys, w, out */
    float *drw = NULL;
    int *dsp = NULL, rc = 0;
    for (int i = 0; i < 6 && !rc; i++)
        if (cudaMalloc(&d[i], i == 2 ? nb * (K ? K : 1) : nb) != cudaSuccess)
            rc = err_set(e, "ginfer_add_norm_run: out of device memory");
    if (!rc && (cudaMalloc(&drw, 4 * (K ? K : 1)) != cudaSuccess ||
                cudaMalloc(&dsp, 4 * (K ? K : 1)) != cudaSuccess))
        rc = err_set(e, "ginfer_add_norm_run: out of device memory");
    if (!rc) {
        cudaMemcpy(d[0], x, nb, cudaMemcpyHostToDevice);
        if (delta)
            cudaMemcpy(d[1], delta, nb, cudaMemcpyHostToDevice);
        if (K) {
            cudaMemcpy(d[2], ye, nb * K, cudaMemcpyHostToDevice);
            cudaMemcpy(drw, rw, 4 * K, cudaMemcpyHostToDevice);
            cudaMemcpy(dsp, spos, 4 * K, cudaMemcpyHostToDevice);
        }
        if (ys)
            cudaMemcpy(d[3], ys, nb, cudaMemcpyHostToDevice);
        cudaMemcpy(d[4], w, nb, cudaMemcpyHostToDevice);
        /* a shared row alone is pending as the engine leaves a dense MLP's output: as ye too */
        gk_moe_out mo = {K ? d[2] : d[3], drw, ys ? d[3] : NULL, dsp, K};
        rc = gk_add_norm(0, d[0], D, delta ? d[1] : NULL, K || ys ? &mo : NULL, d[4], d[5], 1,
                         D, eps, e);
    }
    if (!rc) {
        cudaError_t c = cudaDeviceSynchronize();
        if (c == cudaSuccess)
            c = cudaMemcpy(x, d[0], nb, cudaMemcpyDeviceToHost);
        if (c == cudaSuccess)
            c = cudaMemcpy(out, d[5], nb, cudaMemcpyDeviceToHost);
        if (c != cudaSuccess)
            rc = err_set(e, "ginfer_add_norm_run: %s", cudaGetErrorString(c));
    }
    for (int i = 0; i < 6; i++)
        cudaFree(d[i]);
    cudaFree(drw), cudaFree(dsp);
    return rc ? -1 : 0;
}

/* ginfer_route_run's device buffers, in the order of its arguments after the inputs. */
enum { RR_LOGITS, RR_RS, RR_RW, RR_IDX, RR_OFF, RR_ORDER, RR_SPOS, RR_X, RR_W, RR_B, RR_CNT, RR_N };

extern "C" int ginfer_route_run(const float *x, const float *router, const float *bias, int N,
                                int H, int E, int G, int TG, int K, int norm, float scale,
                                int ns, int one, float *logits, float *rs, float *rw,
                                int32_t *idx, int *off, int *order, int *spos, dsv3_err *e)
{
    size_t sz[RR_N] = {(size_t)N * E * 4, (size_t)N * E * 4, (size_t)N * K * 4,
                       (size_t)N * K * 4, (size_t)(2 * E + 4) * 4, (size_t)(N * K + ns) * 4,
                       (size_t)N * K * 4, (size_t)N * H * 4, (size_t)E * H * 4, (size_t)E * 4,
                       16};
    void *host[RR_N] = {logits, rs, rw, idx, off, order, spos};
    void *d[RR_N] = {};
    int rc = 0;
    for (int i = 0; i < RR_N && !rc; i++)
        if (cudaMalloc(&d[i], sz[i] ? sz[i] : 4) != cudaSuccess)
            rc = err_set(e, "ginfer_route_run: out of device memory");
    for (int i = 0; i < RR_X && !rc; i++)
        cudaMemset(d[i], 0xff, sz[i]);
    if (!rc) {
        cudaMemset(d[RR_CNT], 0, 16);
        cudaMemcpy(d[RR_X], x, sz[RR_X], cudaMemcpyHostToDevice);
        cudaMemcpy(d[RR_W], router, sz[RR_W], cudaMemcpyHostToDevice);
        if (bias)
            cudaMemcpy(d[RR_B], bias, sz[RR_B], cudaMemcpyHostToDevice);
        rc = gk_route(0, (const float *)d[RR_X], (const float *)d[RR_W],
                      bias ? (const float *)d[RR_B] : NULL, (float *)d[RR_LOGITS],
                      (float *)d[RR_RS], (float *)d[RR_RW], (int32_t *)d[RR_IDX], N, H, E, G, TG,
                      K, norm, scale, ns, (int *)d[RR_OFF], (int *)d[RR_ORDER],
                      (int *)d[RR_SPOS], (unsigned *)d[RR_CNT], one,
                      (unsigned long long *)NULL, e);
    }
    if (!rc) {
        cudaError_t c = cudaDeviceSynchronize();
        for (int i = 0; i < RR_X && c == cudaSuccess; i++)
            c = cudaMemcpy(host[i], d[i], sz[i], cudaMemcpyDeviceToHost);
        if (c != cudaSuccess)
            rc = err_set(e, "ginfer_route_run: %s", cudaGetErrorString(c));
    }
    for (int i = 0; i < RR_N; i++)
        cudaFree(d[i]);
    return rc ? -1 : 0;
}

int gk_moe_bucket(cudaStream_t s, const int32_t *idx, int NK, int K, int E, int ns, int *off,
                  int *order, int *spos, dsv3_err *e)
{
    if (E > 1024)
        return err_set(e, "ginfer: %d routed experts (at most 1024)", E);
    gk_launch(moe_bucket_k, 1, 256, 0, s, idx, NK, K, E, ns, off, order, spos);
    LAUNCH_CHECK("moe_bucket", e);
    return 0;
}

__device__ __forceinline__ float silu_mul(float g, float u)
{
    return g * (1.0f / (1.0f + expf(-g))) * u;
}

/* Warp o's weight rows in group g of w [G][UP ? 2 O : O][I]: row o, and with UP the up row
 * O + o after the gate row o. */
template <typename W, bool UP>
__device__ __forceinline__ void group_rows(const W *w, long wstride, int g, int o, int O, int I,
                                           const W *(&wr)[UP ? 2 : 1])
{
    wr[0] = w + g * wstride + (long)o * I;
    if (UP)
        wr[UP ? 1 : 0] = w + g * wstride + (long)(O + o) * I;
}

/* Before the wait: the weight rows of warp o in group entry y (grouped_k). Without off the
 * group is y. With off (routed experts) the up-projection cannot know its group before the
 * wait (the launch before it buckets the rows); the down-projection can: the bucketing is
 * two launches back, finished before the up-projection's wait returned and hence before
 * this launch could start (each kernel lets the next start only after its wait). Read
 * through L2 (__ldcg) and clamped: a value it got wrong could only waste a prefetch. */
template <typename W, bool UP>
__device__ __noinline__ void grouped_prefetch(int m, const W *w, long wstride, const int *off,
                                              int G, int I, int O, int o, int y)
{
    if (!gk_pdl_pf(m) || o >= O || (off && UP))
        return;
    int g = y;
    if (off) {
        if ((threadIdx.x & 31) || y >= __ldcg(off + G + 1))
            return;
        g = __ldcg(off + G + 2 + y);
        if (g < 0 || g >= G)
            return;
    }
    constexpr int NW = UP ? 2 : 1;
    const W *wr[NW];
    group_rows<W, UP>(w, wstride, g, o, O, I, wr);
    gk_prefetch_rows<GK_WARPS, NW>(m, wr, I);
}

/* Group g = blockIdx.y; each warp one output column o < F (UP: gate row o and up row F + o of
 * w1_g [2F, H]; else row o of w2_g [Hout = F here, I]). */
template <typename W, int NT, bool UP>
__global__ void __launch_bounds__(GK_WARPS * 32)
    grouped_k(int m, const float *__restrict__ x, const W *__restrict__ w, long wstride,
              float *__restrict__ y, const int *order, const int *off, int G, int K, int N, int I,
              int O)
{
    int o = blockIdx.x * GK_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    int g = blockIdx.y;
    grouped_prefetch<W, UP>(m, w, wstride, off, G, I, O, o, g);
    gk_pdl_enter(m);
    if (off) {  /* blockIdx.y-th group with rows (gk_moe_bucket's list) */
        if (g >= off[G + 1])
            return;
        g = off[G + 2 + g];
    }
    int base = off ? off[g] : 0, cnt = off ? off[g + 1] - base : N;
    if (o >= O || cnt <= 0)
        return;
    constexpr int NW = UP ? 2 : 1;
    const W *wr[NW];
    group_rows<W, UP>(w, wstride, g, o, O, I, wr);
    for (int j0 = 0; j0 < cnt; j0 += NT) {
        int nv = min(NT, cnt - j0);
        const float *xs[NT];
#pragma unroll
        for (int t = 0; t < NT; t++) {
            int j = base + j0 + (t < nv ? t : 0);
            long src = UP && order ? order[j] / K : j;
            xs[t] = x + src * I;
        }
        float acc[NW][NT];
        warp_dots<W, NT, NW>(wr, xs, nv, I, acc);
        gk_pdl_late(m);
#pragma unroll
        for (int t = 0; t < NT; t++)
            if (lane == t && t < nv)
                y[(long)(base + j0 + t) * O + o] =
                    UP ? silu_mul(acc[0][t], acc[NW - 1][t]) : acc[0][t];
    }
}

/* grouped_k for one row (batch-1 decode: routed groups through off, or without off the
 * groups in order, a dense MLP's one): each active group holds exactly one row, so entry
 * e's row is e (its off[g]) and, for UP, its source row is
 * row 0 (order[e] / K): after the wait one round trip (the count and the group) comes
 * before the weights and x, whose loads all go out together (warp_dots_ahead). grouped_k
 * at one row reads off four times one after another (count, group, offsets, order), then
 * the weights a 256-value piece at a time: with UP's weights only known after the wait, and
 * so read from HBM, that chain was most of the up launch's 5.6 us exposed. The same values
 * as grouped_k<W, 1, UP>, bitwise.
 * UP: at least 3 blocks an SM (85 registers): at its default ptxas held the kernel to 58
 * registers (4 blocks) and put most of the loads behind the first products; with 2 it took
 * 87 (2 blocks an SM, fewer than the up launch's 320 blocks of 1b-moe need). The down form
 * (two 256-value pieces ahead, 5 blocks an SM: its 640 blocks must all be resident to
 * prefetch their weights before the wait; with four pieces, 72 registers, it was 3 us
 * slower) only with DSV3_GINFER_G1=2. */
template <typename W, bool UP>
__global__ void __launch_bounds__(GK_WARPS * 32, UP ? 3 : 5)
    grouped1_k(int m, const float *__restrict__ x, const W *__restrict__ w, long wstride,
               float *__restrict__ y, const int *off, int G, int I, int O)
{
    int o = blockIdx.x * GK_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31, e = blockIdx.y;
    grouped_prefetch<W, UP>(m, w, wstride, off, G, I, O, o, e);
    gk_pdl_enter(m);
    /* without off: the groups in order, all active (one row through a dense MLP) */
    int na = off ? off[G + 1] : G, g = off ? off[G + 2 + e] : e;  /* in bounds: e < G */
    if (e >= na || o >= O || g < 0)  /* g is >= 0: tested so that both loads go out together */
        return;
    constexpr int NW = UP ? 2 : 1;
    const W *wr[NW];
    group_rows<W, UP>(w, wstride, g, o, O, I, wr);
    float acc[NW];
    warp_dots_ahead<W, NW, UP ? 4 : 2>(wr, x + (UP ? 0 : (long)e * I), I, acc);
    gk_pdl_late(m);
    if (lane == 0)
        y[(long)e * O + o] = UP ? silu_mul(acc[0], acc[NW - 1]) : acc[0];
}

/* Whether one row through a dense MLP (one group without a bucket list: DeepSeek-V2-Lite's
 * shared experts, a dense layer) takes grouped1_k, every load of a lane's four pieces out
 * before its products, as the routed experts do (the default), or grouped_k's loop
 * (DSV3_GINFER_DENSE1=0, to compare). Read at each launch: a decode graph keeps what held at
 * its capture. */
static int dense_one()
{
    const char *v = getenv("DSV3_GINFER_DENSE1");
    return !(v && !strcmp(v, "0"));
}

template <typename W, bool UP>
static void grouped_launch(cudaStream_t s, const float *x, const W *w, long wstride, float *y,
                           const int *order, const int *off, int K, int groups, int maxact,
                           int N, int rows_hint, int I, int O, int one)
{
    dim3 grid((O + GK_WARPS - 1) / GK_WARPS, off && maxact < groups ? maxact : groups);
    if (one > (UP ? 0 : 1) && N == 1 && (off || (groups == 1 && dense_one()))) {
        gk_launch_as(UP ? "up" : "down", grouped1_k<W, UP>, grid, GK_WARPS * 32, 0, s, x, w,
                     wstride, y, off, groups, I, O);
        return;
    }
    void (*k)(int, const float *, const W *, long, float *, const int *, const int *, int, int,
              int, int, int) = rows_hint <= 1   ? grouped_k<W, 1, UP>
                          : rows_hint <= 4 ? grouped_k<W, 4, UP>
                                           : grouped_k<W, 8, UP>;
    gk_launch_as(UP ? "up" : "down", k, grid, GK_WARPS * 32, 0, s, x, w, wstride, y, order, off,
                 groups, K, N, I, O);
}

int gk_ffn_up(cudaStream_t s, const float *x, const void *w1, int wf32, long w1_stride, float *h,
              const int *order, const int *off, int K, int groups, int maxact, int N,
              int rows_hint, int H, int F, int one, dsv3_err *e)
{
    if (H % 8)
        return err_set(e, "ginfer: hidden size %d (a multiple of 8 is needed)", H);
    if (wf32)
        grouped_launch<float, true>(s, x, (const float *)w1, w1_stride, h, order, off, K, groups,
                                    maxact, N, rows_hint, H, F, one);
    else
        grouped_launch<bf16, true>(s, x, (const bf16 *)w1, w1_stride, h, order, off, K, groups,
                                   maxact, N, rows_hint, H, F, one);
    LAUNCH_CHECK("ffn_up", e);
    return 0;
}

int gk_ffn_down(cudaStream_t s, const float *h, const void *w2, int wf32, long w2_stride,
                float *y, const int *off, int groups, int maxact, int N, int rows_hint, int F,
                int H, int one, dsv3_err *e)
{
    if (F % 8)
        return err_set(e, "ginfer: expert width %d (a multiple of 8 is needed)", F);
    if (wf32)
        grouped_launch<float, false>(s, h, (const float *)w2, w2_stride, y, NULL, off, 1, groups,
                                     maxact, N, rows_hint, F, H, one);
    else
        grouped_launch<bf16, false>(s, h, (const bf16 *)w2, w2_stride, y, NULL, off, 1, groups,
                                    maxact, N, rows_hint, F, H, one);
    LAUNCH_CHECK("ffn_down", e);
    return 0;
}

/* ---- the MoE down-projection with its combine (the fused "msum" decode launch) ---- */

/* The warp's dot products of np (<= NP) pairs: weight row w[a] with input row x[a] over I
 * values, each with warp_dots' operations in warp_dots' order (a lane's 8-value pieces in
 * order, then the fixed warp tree), so acc[a] is bitwise warp_dots' for that pair; the
 * pairs' loads are issued together. acc is the same in all lanes. */
template <typename W, int NP>
__device__ __forceinline__ void warp_dot_pairs(const W *const *w, const float *const *x, int np,
                                               int I, float (&acc)[NP])
{
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int a = 0; a < NP; a++)
        acc[a] = 0.0f;
#pragma unroll 2
    for (int i = lane * 8; i < I; i += 256) {
#pragma unroll
        for (int a = 0; a < NP; a++) {
            if (a < np) {
                float wf[8], xf[8];
                ldw8(w[a] + i, wf);
                ldx8(x[a] + i, xf);
#pragma unroll
                for (int k = 0; k < 8; k++)
                    acc[a] = fmaf(wf[k], xf[k], acc[a]);
            }
        }
    }
#pragma unroll
    for (int a = 0; a < NP; a++)
        acc[a] = warp_sum(acc[a]);
}

/* Before the wait: the down rows of row n's experts. The routing is two launches back (the
 * up-projection's launch waited for it before this one could start: see grouped_prefetch),
 * so idx can be read here, through L2 and clamped (a wrong value only wastes a prefetch). */
template <typename W>
__device__ __noinline__ void down_sum_prefetch(int m, const W *w2, long wstride,
                                               const int32_t *idx, int n, int K, int E, int ns,
                                               int F, int o, int H)
{
    int lane = threadIdx.x & 31;
    if (!gk_pdl_pf(m) || o >= H || lane > K || (lane == K && !ns))
        return;
    int g = lane < K ? __ldcg(idx + (long)n * K + lane) : E;
    if (g < 0 || g > E)
        return;
    gk_prefetch_l2(w2 + g * wstride + (long)o * F, (size_t)F * sizeof(W));
}

/* Row n = blockIdx.y; warp o takes output o of each expert the row went to: its K routed
 * ones in k order (group idx[n,k], h row spos[n,k]) and, with ns, the shared group E (h row
 * NK + n), and adds their sum to x in place with residual_sum's operations in its order:
 * x[n,o] + (sum_k rw[n,k] * y_k + y_shared), where each y is bitwise grouped_k's. So x
 * holds what the down launch and the next add_norm_k's sum would leave, and no MoE output
 * stays pending: the next norm reads one row instead of K + 2. */
template <typename W, int KMAX>
__global__ void __launch_bounds__(GK_WARPS * 32)
    down_sum_k(int m, float *x, const float *h, const W *__restrict__ w2, long wstride,
               const int32_t *idx, const int *spos, const float *rw, int K, int E, int ns,
               int NK, int F, int H)
{
    int o = blockIdx.x * GK_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31, n = blockIdx.y;
    down_sum_prefetch<W>(m, w2, wstride, idx, n, K, E, ns, F, o, H);
    gk_pdl_enter(m);
    if (o >= H)
        return;
    /* entry k: routed expert k (k < K), the shared group (k == K, with ns), else unused
     * (pointing at valid rows); every index a constant after unrolling: no local memory */
    const W *wr[KMAX + 1];
    const float *xs[KMAX + 1];
#pragma unroll
    for (int k = 0; k <= KMAX; k++) {
        bool routed = k < K, shared = ns && k == K;
        long a = (long)n * K + (routed ? k : 0);
        long g = shared ? E : idx[a], row = shared ? NK + n : spos[a];
        wr[k] = w2 + g * wstride + (long)o * F;
        xs[k] = h + row * F;
    }
    float y[KMAX + 1];
    warp_dot_pairs<W, KMAX + 1>(wr, xs, K + (ns ? 1 : 0), F, y);
    gk_pdl_late(m);
    if (lane == 0) {
        float acc = 0;
#pragma unroll
        for (int k = 0; k < KMAX; k++)
            if (k < K)
                acc += rw[(long)n * K + k] * y[k];
#pragma unroll
        for (int k = 0; k <= KMAX; k++)
            if (ns && k == K)
                acc += y[k];
        float *xo = x + (long)n * H + o;
        float v = *xo;
        v += acc;
        *xo = v;
    }
}

int gk_down_sum_fits(int N, int K)
{
    return N >= 1 && N <= 4 && K >= 1 && K <= 8;
}

template <typename W>
static void down_sum_launch(cudaStream_t s, float *x, const float *h, const W *w2, long wstride,
                            const int32_t *idx, const int *spos, const float *rw, int N, int K,
                            int E, int ns, int F, int H)
{
    dim3 grid((H + GK_WARPS - 1) / GK_WARPS, N);
    gk_launch(K <= 4 ? down_sum_k<W, 4> : down_sum_k<W, 8>, grid, GK_WARPS * 32, 0, s, x, h, w2,
              wstride, idx, spos, rw, K, E, ns, N * K, F, H);
}

int gk_down_sum(cudaStream_t s, float *x, const float *h, const void *w2, int wf32,
                long w2_stride, const int32_t *idx, const int *spos, const float *rw, int N,
                int K, int E, int ns, int F, int H, dsv3_err *e)
{
    if (N <= 0)
        return 0;
    if (F % 8)
        return err_set(e, "ginfer: expert width %d (a multiple of 8 is needed)", F);
    if (!gk_down_sum_fits(N, K))
        return err_set(e, "ginfer: %d rows of %d experts each for the fused MoE down launch", N,
                       K);
    if (wf32)
        down_sum_launch(s, x, h, (const float *)w2, w2_stride, idx, spos, rw, N, K, E, ns, F, H);
    else
        down_sum_launch(s, x, h, (const bf16 *)w2, w2_stride, idx, spos, rw, N, K, E, ns, F, H);
    LAUNCH_CHECK("down_sum", e);
    return 0;
}

__global__ void gather_rows_k(int m, float *out, const float *x, const int *rows, int n, int D)
{
    gk_pdl_enter(m);
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= (long)n * D)
        return;
    int k = (int)(i / D), j = (int)(i % D);
    out[i] = x[(long)rows[k] * D + j];
}

int gk_gather_rows(cudaStream_t s, float *out, const float *x, const int *rows, int n, int D,
                   dsv3_err *e)
{
    if (n <= 0)
        return 0;
    long m = (long)n * D;
    gk_launch(gather_rows_k, (unsigned)((m + 255) / 256), 256, 0, s, out, x, rows, n, D);
    LAUNCH_CHECK("gather_rows", e);
    return 0;
}

/* ---- greedy choice ---- */

/* A logit as a key whose unsigned order is the float order (-0 taken as +0), above it the
 * id's complement: the largest key of a row is its largest logit at its lowest id. */
__device__ __forceinline__ unsigned long long argmax_key(float x, int v)
{
    unsigned u = __float_as_uint(x == 0.0f ? 0.0f : x);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((unsigned long long)u << 32) | (0xFFFFFFFFu - (unsigned)v);
}

/* The largest of each thread's key in thread 0 (red: 32 slots of shared memory). */
__device__ __forceinline__ unsigned long long block_max_key(unsigned long long best,
                                                            unsigned long long *red)
{
    for (int o = 16; o; o >>= 1) {
        unsigned long long k = __shfl_xor_sync(0xffffffffu, best, o);
        best = k > best ? k : best;
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (!lane)
        red[warp] = best;
    __syncthreads();
    if (threadIdx.x == 0)
        for (int w = 1; w < (int)(blockDim.x >> 5); w++)
            best = red[w] > best ? red[w] : best;
    return best;
}

/* A row's feed inputs (its ring place, slot and position), read when the kernel starts:
 * only the feed itself writes them, at the graph's end, so reading them ahead leaves three
 * dependent loads off the step's last path. */
struct gk_feed_row {
    int place, slot, pos;
};

__device__ __forceinline__ gk_feed_row gk_feed_read(const gk_feed &f, int row)
{
    gk_feed_row r = {0, 0, 0};
    if (f.in) {
        r.place = f.in[3 * f.stride + row];
        r.slot = f.in[f.stride + row];
        r.pos = f.in[2 * f.stride + row];
    }
    return r;
}

/* Row's chosen id to the host's ids at its ring place and into the next step's input row:
 * its position one further (not for padding rows), its ring place the next. The host reads
 * the id after the step's event: the kernel's completion makes the write visible, so no
 * system fence waits for it here. */
__device__ __forceinline__ void gk_feed_write(const gk_feed &f, int row, gk_feed_row r,
                                              int32_t id)
{
    f.host[r.place * f.cap + row] = id;
    f.in[row] = id;
    if (r.slot != f.spare)
        f.in[2 * f.stride + row] = r.pos + 1;
    f.in[3 * f.stride + row] = (r.place + 1) % f.places;
}

/* Grid (ARG_PARTS, N): each block the largest key of its part of row blockIdx.y into
 * part[row][blockIdx.x]; the row's last block to finish (a counter, reset by that block for
 * the next step) takes the largest of the parts, one a thread, and writes its id to out,
 * and with feed the next step's input row too (gk_argmax).
 * Max is order-free, so the result does not depend on which block is last. A thread loads
 * its ARG_U logits and ban bytes before it compares any: the loop it replaced loaded the ban
 * byte, then the logit, one pair at a time (16 dependent round trips, 18 us of a 1b-moe
 * step on an H200; one block a row was 60 us). */
#define ARG_PARTS 128
#define ARG_THREADS 256
#define ARG_U 4
static_assert(ARG_PARTS <= ARG_THREADS, "the last block reads one part a thread");
__global__ void __launch_bounds__(ARG_THREADS)
    argmax_k(int m, const float *x, int V, const uint8_t *ban, unsigned long long *part,
             unsigned *count, int32_t *out, gk_feed feed)
{
    __shared__ unsigned long long red[32];
    __shared__ unsigned last;
    const float *r = x + (long)blockIdx.y * V;
    int per = (V + ARG_PARTS - 1) / ARG_PARTS, v0 = blockIdx.x * per, v1 = min(V, v0 + per);
    if (gk_pdl_pf(m) && ban && threadIdx.x == 0 && v1 > v0)  /* the host's: no kernel writes them */
        gk_prefetch_l2(ban + v0, (size_t)(v1 - v0));
    gk_feed_row fr = threadIdx.x == 0 ? gk_feed_read(feed, blockIdx.y) : gk_feed_row{0, 0, 0};
    gk_pdl_enter(m);
    unsigned long long best = 0;
    for (int v = v0 + threadIdx.x; v < v1; v += ARG_U * ARG_THREADS) {
        float lv[ARG_U];
        uint8_t bv[ARG_U];
#pragma unroll
        for (int u = 0; u < ARG_U; u++) {
            int i = v + u * ARG_THREADS;
            lv[u] = i < v1 ? r[i] : 0.0f;
            bv[u] = i < v1 && ban ? ban[i] : 0;
        }
#pragma unroll
        for (int u = 0; u < ARG_U; u++) {
            int i = v + u * ARG_THREADS;
            unsigned long long k = i < v1 ? argmax_key(bv[u] ? -INFINITY : lv[u], i) : 0;
            best = k > best ? k : best;
        }
    }
    gk_pdl_late(m);
    best = block_max_key(best, red);
    if (threadIdx.x == 0) {
        part[(long)blockIdx.y * ARG_PARTS + blockIdx.x] = best;
        __threadfence();
        last = atomicAdd(count + blockIdx.y, 1u) == ARG_PARTS - 1;
    }
    __syncthreads();
    if (!last)
        return;
    __threadfence();
    best = threadIdx.x < ARG_PARTS ? __ldcg(part + (long)blockIdx.y * ARG_PARTS + threadIdx.x) : 0;
    __syncthreads();  /* red reused */
    best = block_max_key(best, red);
    if (threadIdx.x)
        return;
    int32_t id = (int32_t)(0xFFFFFFFFu - (unsigned)(best & 0xFFFFFFFFu));
    out[blockIdx.y] = id;
    count[blockIdx.y] = 0;
    if (feed.in)
        gk_feed_write(feed, blockIdx.y, fr, id);
}

/* ---- the largest logits of a row (sampled steps) ---- */

/* A row's K largest keys (argmax_key: the logit, then the lower id; all keys of a row differ,
 * and 0 is below every one) by radix selection, not by sorting: a block holds its keys in
 * registers and finds the K-th largest a byte at a time from the top (a 256-bin histogram
 * of the keys that match the bytes found so far, then the bin where the count from the top
 * reaches K), stopping once the bin holds exactly the keys still wanted; the keys at or
 * above it are then the K. A selection is bound by its warp-wide matches (each ~9 us when
 * every warp matched every byte, docs/PERF.md fifteenth session call 7): past the first
 * byte, warps with no key left under the prefix skip them. */
#define TK_THREADS 1024
#define TK_ITEMS 8                            /* a part's keys a thread */
#define TK_PER (TK_THREADS * TK_ITEMS)        /* a part's keys */
#define TK_ITEMS2 16                          /* the parts' K largest a thread, merged */
#define TK_SORT 256                           /* the final sort: GK_TOPK_MAX */
static_assert(GK_TOPK_MAX <= TK_SORT && TK_SORT <= TK_THREADS, "one key a thread to sort");

/* State of a selection in shared memory. */
struct tk_shared {
    unsigned hist[256];
    unsigned long long prefix;
    int need, done, count;
};

/* The need-th largest of the block's keys, every thread of the block the same. Keys of 0 are
 * padding: need is at most the count of the others, so the bound is a real key. */
template <int ITEMS>
__device__ unsigned long long tk_kth(tk_shared *sh, const unsigned long long (&key)[ITEMS],
                                     int need)
{
    unsigned long long prefix = 0, mask = 0;
    for (int shift = 56; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += TK_THREADS)
            sh->hist[i] = 0;
        __syncthreads();
#pragma unroll
        for (int j = 0; j < ITEMS; j++) {
            int bin = (key[j] & mask) == prefix ? (int)((key[j] >> shift) & 255) : -1;
            /* one atomic a bin a warp (the top bytes of a row's logits share few bins); past
             * the first byte most warps have no key left to count */
            if (!__any_sync(0xffffffffu, bin >= 0))
                continue;
            unsigned same = __match_any_sync(0xffffffffu, bin);
            if (bin >= 0 && (threadIdx.x & 31) == __ffs(same) - 1)
                atomicAdd(&sh->hist[bin], (unsigned)__popc(same));
        }
        __syncthreads();
        if (threadIdx.x < 32) {  /* lane l: bins 255 - 8l down to 248 - 8l */
            int l = threadIdx.x, c = 0;
            for (int j = 0; j < 8; j++)
                c += (int)sh->hist[255 - 8 * l - j];
            int incl = c;
            for (int o = 1; o < 32; o <<= 1) {
                int t = __shfl_up_sync(0xffffffffu, incl, o);
                if (l >= o)
                    incl += t;
            }
            int above = incl - c;
            if (above < need && need <= incl) {  /* exactly one lane */
                for (int j = 0; j < 8; j++) {
                    int bin = 255 - 8 * l - j, h = (int)sh->hist[bin];
                    if (need <= above + h) {
                        sh->prefix = prefix | ((unsigned long long)bin << shift);
                        sh->need = need - above;
                        sh->done = h == need - above;
                        break;
                    }
                    above += h;
                }
            }
        }
        __syncthreads();
        prefix = sh->prefix;
        need = sh->need;
        mask |= 255ull << shift;
        int done = sh->done;
        __syncthreads();  /* sh read by all before the next pass writes it */
        if (done)
            break;  /* every key in the bin is wanted: the bin's least is the bound */
    }
    return prefix;
}

/* The block's keys >= t into out[0..), in any order. */
template <int ITEMS>
__device__ void tk_collect(tk_shared *sh, const unsigned long long (&key)[ITEMS],
                           unsigned long long t, unsigned long long *out)
{
    if (threadIdx.x == 0)
        sh->count = 0;
    __syncthreads();
#pragma unroll
    for (int j = 0; j < ITEMS; j++)
        if (key[j] >= t)
            out[atomicAdd(&sh->count, 1)] = key[j];
    __syncthreads();
}

/* The K largest of the m keys rows[] (m <= TK_THREADS x ITEMS) into out[0..K). */
template <int ITEMS>
__device__ void tk_merge(tk_shared *sh, const unsigned long long *rows, int m, int K,
                         unsigned long long *out)
{
    unsigned long long k2[ITEMS];
#pragma unroll
    for (int j = 0; j < ITEMS; j++) {
        int i = j * TK_THREADS + threadIdx.x;
        k2[j] = i < m ? __ldcg(rows + i) : 0;
    }
    tk_collect(sh, k2, tk_kth(sh, k2, K), out);
}

/* A key's (id, logit): argmax_key's map undone. */
__device__ __forceinline__ gk_cand tk_cand(unsigned long long k)
{
    unsigned u = (unsigned)(k >> 32);
    u = (u & 0x80000000u) ? (u & 0x7FFFFFFFu) : ~u;
    return gk_cand{(int32_t)(0xFFFFFFFFu - (unsigned)(k & 0xFFFFFFFFu)), __uint_as_float(u)};
}

/* The running sums of pf[0..n) into cum[] by thread 0, in order (the host's rounding), and
 * then by the whole block how many of them satisfy below(): as the sums never fall, the
 * index of the first that does not. A loop that stops at that index would wait on each
 * shared load in turn (9 us of a draw, clocked). */
template <typename F>
__device__ int tk_first_not(const float *pf, double *cum, int n, F below)
{
    if (threadIdx.x == 0) {
        double c = 0;
        for (int j = 0; j < n; j++)
            cum[j] = c += pf[j];
    }
    __syncthreads();
    return __syncthreads_count(threadIdx.x < n && below(cum[threadIdx.x]));
}

/* Row's draw (lib/sampler's chain after top-k, no penalty: sampler_draw) from its n largest
 * keys srt[0..n), sorted: the candidates' softmax terms and probabilities in parallel, the
 * sums that must run in the host's order by thread 0, each value rounded as the host rounds
 * it (sampler_exp, double sums and division, float p); then the row fed to the next step as
 * gk_argmax feeds it. */
__device__ void tk_draw(const unsigned long long *srt, int n, const sampler_draw &d,
                        sampler_draw *dr, gk_feed feed, gk_feed_row fr, int row,
                        unsigned long long *clk)
{
    __shared__ float lg[TK_SORT], pf[TK_SORT];
    __shared__ double t[TK_SORT];
    __shared__ double sum;
    int i = threadIdx.x, pick = 0;
    long long c0 = clk && i == 0 ? clock64() : 0;
    if (i < n)
        lg[i] = tk_cand(srt[i]).logit;
    __syncthreads();
    /* two softmaxes (top-p's at temperature 1, the draw's), each: terms, sum, p, running sum */
    for (int pass = 0; d.temp > 0 && pass < 2; pass++) {
        if (pass == 0 && !(d.top_p < 1 && n > 1))
            continue;
        if (pass == 1) {
            if (d.min_p > 0 && n > 1) {  /* min-p: logit >= the largest + log(min_p) */
                float cut = (float)((double)lg[0] + d.log_min_p);
                n = 1 + __syncthreads_count(i >= 1 && i < n && lg[i] >= cut);
            }
            float l = i < n ? (float)((double)lg[i] / d.temp) : 0;
            __syncthreads();  /* lg read by all */
            if (i < n)
                lg[i] = l;
            __syncthreads();
        }
        if (i < n)
            t[i] = sampler_exp((double)lg[i] - (double)lg[0]);
        __syncthreads();
        if (i == 0) {
            double s = 0;
            for (int j = 0; j < n; j++)
                s += t[j];
            sum = s;
        }
        __syncthreads();
        if (i < n)
            pf[i] = (float)(t[i] / sum);
        __syncthreads();
        if (pass == 0) {  /* top-p: the prefix whose mass reaches p */
            double p = d.top_p;
            int j = tk_first_not(pf, t, n, [p](double c) { return !(c >= p); });
            n = j < n ? j + 1 : n;
        } else {  /* the draw: where the running sum passes u (the last if it never does) */
            uint64_t st = d.rng;
            double u = sampler_splitmix(&st);
            int j = tk_first_not(pf, t, n - 1, [u](double c) { return !(u < c); });
            pick = j;
            if (i == 0)
                dr->rng = st;
        }
        __syncthreads();  /* t reused */
        if (clk && i == 0) {
            long long c1 = clock64();
            atomicAdd(clk + 8 + pass, (unsigned long long)(c1 - c0));
            c0 = c1;
        }
    }
    if (i)
        return;
    gk_feed_write(feed, row, fr, tk_cand(srt[pick]).id);
    if (clk)
        atomicAdd(clk + 10, (unsigned long long)(clock64() - c0));
}

/* Grid (parts, N): each block the K largest keys (banned ids as -inf) of its TK_PER of row
 * blockIdx.y into part[row][blockIdx.x][K] (unordered; 0 where the part has fewer); the
 * row's last block (a counter, reset by it) the K largest of the parts' (parts x K <=
 * TK_THREADS x TK_ITEMS2), sorted (bitonic, one key a thread), to best[row][K] as (id,
 * logit) pairs (mapped host memory). */
__global__ void __launch_bounds__(TK_THREADS)
    topk_k(const float *x, int V, const uint8_t *ban, int Kcap, unsigned long long *part,
           unsigned *count, gk_cand *best, sampler_draw *draw, gk_feed feed,
           unsigned long long *clk)
{
    __shared__ tk_shared sh;
    __shared__ unsigned long long srt[TK_SORT], ord[TK_SORT];
    __shared__ unsigned last;
    __shared__ sampler_draw sd;  /* the row's draw, read at the start as the keys are */
    gk_clock ck;
    gk_clk_start(clk, ck);  /* block 0's part phases, then the last block's own */
    const float *r = x + (long)blockIdx.y * V;
    gk_feed_row fr = gk_feed_row{0, 0, 0};
    if (draw && threadIdx.x == 0) {
        sd = draw[blockIdx.y];
        fr = gk_feed_read(feed, blockIdx.y);
    }
    /* a row's parts take Kcap keys each in the scratch; a drawing row selects only its top_k */
    int K = draw ? max(1, min(draw[blockIdx.y].top_k, Kcap)) : Kcap;
    int v0 = blockIdx.x * TK_PER, n = min(V - v0, TK_PER), want = min(K, n);
    /* every load issued before any is used: a logit loaded only where its ban byte is clear
     * waited for that byte first (the keys took 4.2 us, clocked) */
    float lv[TK_ITEMS];
    uint8_t bv[TK_ITEMS];
#pragma unroll
    for (int j = 0; j < TK_ITEMS; j++) {
        int i = j * TK_THREADS + threadIdx.x;
        lv[j] = i < n ? r[v0 + i] : 0.0f;
        bv[j] = i < n && ban ? ban[v0 + i] : 0;
    }
    unsigned long long key[TK_ITEMS];
#pragma unroll
    for (int j = 0; j < TK_ITEMS; j++) {
        int i = j * TK_THREADS + threadIdx.x;
        key[j] = i < n ? argmax_key(bv[j] ? -INFINITY : lv[j], v0 + i) : 0;
    }
    unsigned long long *mine = part + (long)blockIdx.y * gridDim.x * Kcap + (long)blockIdx.x * K;
    for (int i = want + threadIdx.x; i < K; i += TK_THREADS)
        mine[i] = 0;
    __syncthreads();
    gk_clk(clk, 0, ck);
    unsigned long long bound = tk_kth(&sh, key, want);
    gk_clk(clk, 1, ck);
    tk_collect(&sh, key, bound, mine);
    gk_clk(clk, 2, ck);
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0)
        last = atomicAdd(count + blockIdx.y, 1u) == gridDim.x - 1;
    __syncthreads();
    gk_clk(clk, 3, ck);
    gk_clk_end(clk, ck);  /* "in all": block 0's part */
    if (!last)
        return;
    /* the last block's phases: its own thread 0, whichever block it is */
    bool lk = clk && threadIdx.x == 0 && blockIdx.y == 0;
    long long t0 = lk ? clock64() : 0, t1 = 0;
    __threadfence();
    const unsigned long long *rows = part + (long)blockIdx.y * gridDim.x * Kcap;
    int m = gridDim.x * K;
    /* K <= V: K keys that are not 0; as few registers a thread as the parts' keys need */
    if (m <= TK_THREADS)
        tk_merge<1>(&sh, rows, m, K, srt);
    else if (m <= 4 * TK_THREADS)
        tk_merge<4>(&sh, rows, m, K, srt);
    else
        tk_merge<TK_ITEMS2>(&sh, rows, m, K, srt);
    if (lk) {
        t1 = clock64();
        atomicAdd(clk + 4, (unsigned long long)(t1 - t0));
        t0 = t1;
    }
    /* sorted by rank: the keys of a row all differ, so each key's count of greater ones is
     * its place */
    if (threadIdx.x < K) {
        unsigned long long k = srt[threadIdx.x];
        int above = 0;
        for (int j = 0; j < K; j++)
            above += srt[j] > k;
        ord[above] = k;
    }
    __syncthreads();
    if (lk) {
        t1 = clock64();
        atomicAdd(clk + 5, (unsigned long long)(t1 - t0));
        t0 = t1;
    }
    if (draw) {  /* its one host write fenced by the thread that made it */
        tk_draw(ord, K, sd, draw + blockIdx.y, feed, fr, blockIdx.y, lk ? clk : NULL);
    } else {
        if (threadIdx.x < K)
            best[(long)blockIdx.y * K + threadIdx.x] = tk_cand(ord[threadIdx.x]);
        __threadfence_system();
    }
    if (threadIdx.x == 0)
        count[blockIdx.y] = 0;
    if (lk) {
        t1 = clock64();
        atomicAdd(clk + 6, (unsigned long long)(t1 - t0));
        atomicAdd(clk + 7, 1ull);
    }
}

static int topk_parts(int V)
{
    return V < 1 ? 1 : (V + TK_PER - 1) / TK_PER;
}

int gk_topk_max(int V)
{
    int k = TK_THREADS * TK_ITEMS2 / topk_parts(V);
    return k < GK_TOPK_MAX ? k : GK_TOPK_MAX;
}

size_t gk_topk_scratch(int cap, int V, int K)
{
    return ((size_t)cap * 4 + 15) / 16 * 16 + (size_t)cap * topk_parts(V) * K * 8;
}

int gk_topk(cudaStream_t s, const float *logits, int N, int V, const uint8_t *ban, int K,
            void *scratch, int cap, gk_cand *best, dsv3_err *e)
{
    return gk_topk_draw(s, logits, N, V, ban, K, scratch, cap, best, NULL, NULL, NULL, e);
}

int gk_topk_draw(cudaStream_t s, const float *logits, int N, int V, const uint8_t *ban, int K,
                 void *scratch, int cap, gk_cand *best, sampler_draw *draw,
                 const gk_feed *feed, unsigned long long *clk, dsv3_err *e)
{
    gk_feed none = {NULL, 0, 0, NULL, 1, 0};
    if (N <= 0)
        return 0;
    if (N > cap || K < 1 || K > gk_topk_max(V) || K > V)
        return err_set(e, "ginfer: the %d largest logits of %d rows (at most %d of %d rows, "
                       "%d ids)", K, N, gk_topk_max(V), cap, V);
    unsigned *count = (unsigned *)scratch;
    unsigned long long *part =
        (unsigned long long *)((char *)scratch + ((size_t)cap * 4 + 15) / 16 * 16);
    topk_k<<<dim3((unsigned)topk_parts(V), (unsigned)N), TK_THREADS, 0, s>>>(
        logits, V, ban, K, part, count, best, draw, draw && feed ? *feed : none, clk);
    LAUNCH_CHECK("topk", e);
    return 0;
}

/* The counters first, then the parts: both at places that do not depend on N. */
static size_t argmax_counts(int cap)
{
    return ((size_t)cap * 4 + 15) / 16 * 16;
}

size_t gk_argmax_scratch(int cap)
{
    return argmax_counts(cap) + (size_t)cap * ARG_PARTS * 8;
}

int gk_argmax(cudaStream_t s, const float *logits, int N, int V, const uint8_t *ban,
              void *scratch, int cap, int32_t *out, const gk_feed *feed, dsv3_err *e)
{
    gk_feed none = {NULL, 0, 0, NULL, 1, 0};
    if (N <= 0)
        return 0;
    if (N > cap)
        return err_set(e, "ginfer: greedy choices of %d rows (scratch for %d)", N, cap);
    unsigned *count = (unsigned *)scratch;
    unsigned long long *part = (unsigned long long *)((char *)scratch + argmax_counts(cap));
    gk_launch(argmax_k, dim3(ARG_PARTS, N), ARG_THREADS, 0, s, logits, V, ban, part, count, out,
              feed ? *feed : none);
    LAUNCH_CHECK("argmax", e);
    return 0;
}
