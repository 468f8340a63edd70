/* ginfer_fp8.cuh: FP8 E4M3 weights kept FP8 on the GPU engine (included from ginfer.cu; uses
 * its struct ginfer, wsrc, dal, get, fetch).
 *
 * Opt-in: DSV3_GINFER_FP8=1 at creation, for a checkpoint folder (ginfer_create_dir) whose
 * linear weights are FP8 E4M3 with 128x128 block scales (weight_scale_inv, as DeepSeek
 * releases them and dsv3-quant writes them). Unset, or any other value, changes nothing.
 *
 * Which weights: a weight slot (q_a+kv_a, q_b, q, kv_a, o, a dense MLP's gate+up and down,
 * a layer's routed experts with its shared ones) stays FP8 when every tensor in it is FP8
 * with its scales and every row length is a multiple of 128; else it is dequantised to bf16
 * as without the option. kv_b stays bf16 (its transpose W_uk^T per head, the q_lat GEMV's
 * rows, does not keep 128-column blocks), and so do the embedding, the head and the router.
 *
 * Layout: the e4m3 bytes as in the file ([rows][I] row-major; slots concatenate tensors as
 * the bf16 layout does), and one fp32 scale per 128 consecutive weights of a row (row r,
 * column block b: the checkpoint's scale_inv[r / 128][b]), so that any offset into a slot
 * that is a multiple of 128 weights (a row, an expert, kv_a after q_a) finds its scales at
 * offset / 128. That costs 4 bytes per 128 weights (1/32 byte a weight) over DeepSeek's
 * 128x128 blocks, for GEMV kernels that need no block-row arithmetic.
 *
 * Kernels: one family for every row count (decode and prefill alike): a warp per output
 * row, each lane loading 16 e4m3 weights with one 16-byte load, converting them exactly to
 * fp32 (e4m3 -> half -> float, both exact) and multiplying by the block scale in fp32, so
 * each weight is f32(q * s), bitwise lib/fp8's dequantised value that the CPU engine uses
 * (the bf16 path has bf16(f32(q * s))); the products accumulate in fp32, lanes then a fixed
 * warp tree. Rows of the call are taken 1, 4 or 8 at a time (the weight row re-read per
 * 8 rows, from L2 for prefill-sized calls). Fused GEMVs (DSV3_GINFER_FUSE norm) are turned
 * off under FP8; the other fusions do not touch FP8 weights. */
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "scratch.cuh"

/* An FP8 slot: n weight bytes at w, n / 128 scales at sc. */
struct f8reg {
    const char *w;
    size_t n;
    float *sc;
};

static int fp8_wanted(const wsrc *src, int exact)
{
    const char *v = getenv("DSV3_GINFER_FP8");
    return src->h && !exact && v && !strcmp(v, "1");
}

/* The scales of the FP8 slot holding device address w (at w's offset), or NULL: w is bf16. */
static float *f8_scales(const ginfer *g, const void *w)
{
    const char *p = (const char *)w;
    for (int i = 0; i < g->n_f8; i++)
        if (p >= g->f8[i].w && p < g->f8[i].w + g->f8[i].n)
            return g->f8[i].sc + (p - g->f8[i].w) / 128;
    return NULL;
}

/* Whether tensor `name` of the folder can stay FP8: [rows, I] E4M3, I a multiple of 128, with
 * its F32 block scales. */
static int f8_ok(const ginfer *g, const wsrc *src, const char *name, long rows, long I)
{
    if (!g->fp8 || !src->h || I % 128)
        return 0;
    const st_tensor *t = hfdir_find(src->h, name, NULL);
    if (!t || t->dtype != ST_F8_E4M3 || t->ndim != 2 || t->shape[0] != rows || t->shape[1] != I)
        return 0;
    char sn[320];
    snprintf(sn, sizeof sn, "%s_scale_inv", name);
    const st_tensor *s = hfdir_find(src->h, sn, NULL);
    return s && s->dtype == ST_F32 && s->numel == fp8_blocks(rows) * fp8_blocks(I);
}

/* An FP8 slot of n weights (n a multiple of 128), registered. */
static void *f8_alloc(ginfer *g, size_t n, dsv3_err *e)
{
    if (!grow_for(&g->f8, g->n_f8, &g->cap_f8, 32)) {
        err_set(e, "ginfer: out of host memory");
        return NULL;
    }
    char *w = (char *)dal(g, n, e);
    float *sc = w ? (float *)dal(g, n / 128 * 4, e) : NULL;
    if (!sc)
        return NULL;
    g->f8[g->n_f8++] = (f8reg){w, n, sc};
    g->weight_bytes += n + n / 128 * 4;
    return w;
}

/* Tensor `name` [rows, I] (f8_ok) into FP8 slot dst at weight offset off (a multiple of 128):
 * the bytes straight from the mapping, the scales expanded to one per row and 128 columns. */
static int f8_put(ginfer *g, const wsrc *src, const char *name, void *dst, size_t off,
                  long rows, long I, dsv3_err *e)
{
    const st_tensor *t = hfdir_find(src->h, name, NULL);
    char sn[320];
    snprintf(sn, sizeof sn, "%s_scale_inv", name);
    const st_tensor *st = hfdir_find(src->h, sn, NULL);
    const float *bs = (const float *)st->data;
    long nb = I / 128;
    float *h = (float *)malloc((size_t)rows * nb * sizeof *h);
    if (!h)
        return err_set(e, "ginfer: out of host memory for %s", name);
    for (long r = 0; r < rows; r++)
        for (long b = 0; b < nb; b++)
            h[r * nb + b] = bs[(r / FP8_BLOCK) * nb + b];
    int rc = gpu_upload(g->c, (char *)dst + off, t->data, (size_t)rows * I, e) ||
             gpu_upload(g->c, f8_scales(g, dst) + off / 128, h, (size_t)rows * nb * 4, e);
    free(h);
    return rc ? -1 : 0;
}

/* A weight [rows, I]: an FP8 slot of its own when f8_ok, else get's compute dtype. */
static void *getw(ginfer *g, const wsrc *src, const char *name, long rows, long I, dsv3_err *e)
{
    if (!f8_ok(g, src, name, rows, I))
        return get(g, src, name, (size_t)rows * I, g->wsz, e);
    void *d = f8_alloc(g, (size_t)rows * I, e);
    return d && !f8_put(g, src, name, d, 0, rows, I, e) ? d : NULL;
}

/* fetch into a slot of ws-byte values (1: FP8). */
static int fetchw(ginfer *g, const wsrc *src, const char *name, void *dst, size_t off, long rows,
                  long I, int ws, dsv3_err *e)
{
    if (ws == 1)
        return f8_put(g, src, name, dst, off, rows, I, e);
    return fetch(g, src, name, dst, off, (size_t)rows * I, ws, e);
}

/* ---- kernels ---- */

/* Sixteen weights of a row from one 16-byte load, each f32(e4m3 * s). */
__device__ __forceinline__ void f8_ld16(const uint8_t *p, float s, float (&f)[16])
{
    uint4 u = __ldg((const uint4 *)p);
    const __nv_fp8x2_storage_t *q = (const __nv_fp8x2_storage_t *)&u;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        __half2 h = __half2(__nv_cvt_fp8x2_to_halfraw2(q[i], __NV_E4M3));
        float2 t = __half22float2(h);
        f[2 * i] = t.x * s;
        f[2 * i + 1] = t.y * s;
    }
}

/* The warp's dot products of NW FP8 rows (scales s[a], one per 128 weights) with nv <= NT
 * input rows over I values (a multiple of 128); acc is the same in all lanes. */
template <int NT, int NW>
__device__ __forceinline__ void f8_dots(const uint8_t *const *w, const float *const *s,
                                        const float *const *x, int nv, int I,
                                        float (&acc)[NW][NT])
{
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int a = 0; a < NW; a++)
#pragma unroll
        for (int t = 0; t < NT; t++)
            acc[a][t] = 0.0f;
#pragma unroll 2
    for (int i = lane * 16; i < I; i += 512) {
        float wf[NW][16];
#pragma unroll
        for (int a = 0; a < NW; a++)
            f8_ld16(w[a] + i, __ldg(s[a] + (i >> 7)), wf[a]);
#pragma unroll
        for (int t = 0; t < NT; t++) {
            if (t < nv) {
#pragma unroll
                for (int k4 = 0; k4 < 4; k4++) {
                    float4 xv = *(const float4 *)(x[t] + i + 4 * k4);
#pragma unroll
                    for (int a = 0; a < NW; a++) {
                        acc[a][t] = fmaf(wf[a][4 * k4], xv.x, acc[a][t]);
                        acc[a][t] = fmaf(wf[a][4 * k4 + 1], xv.y, acc[a][t]);
                        acc[a][t] = fmaf(wf[a][4 * k4 + 2], xv.z, acc[a][t]);
                        acc[a][t] = fmaf(wf[a][4 * k4 + 3], xv.w, acc[a][t]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int a = 0; a < NW; a++)
#pragma unroll
        for (int t = 0; t < NT; t++)
            acc[a][t] = warp_sum(acc[a][t]);
}

/* Before the wait (ginfer_k.cuh): a warp's NW FP8 weight rows of I values and their scales. */
template <int NW>
__device__ __forceinline__ void f8_prefetch(int m, const uint8_t *const *w, const float *const *s,
                                            int I)
{
    gk_prefetch_rows<8, NW>(m, w, I);
    if (gk_pdl_pf(m) && (threadIdx.x & 31) == 0)
#pragma unroll
        for (int a = 0; a < NW; a++)
            gk_prefetch_line(s[a]);
}

/* Warp o's weight rows of group g and their scale rows (group g's weights at g * wstride,
 * its scales at g * wstride / 128): row o, and with UP also row O + o (the up half). */
template <bool UP>
__device__ __forceinline__ void f8_group_rows(const uint8_t *w, const float *sc, long wstride,
                                              int g, int o, int O, int I,
                                              const uint8_t *(&wr)[UP ? 2 : 1],
                                              const float *(&sr)[UP ? 2 : 1])
{
    constexpr int NW = UP ? 2 : 1;
    wr[0] = w + g * wstride + (long)o * I;
    sr[0] = sc + (g * wstride + (long)o * I) / 128;
    if (UP) {
        wr[NW - 1] = w + g * wstride + (long)(O + o) * I;
        sr[NW - 1] = sc + (g * wstride + (long)(O + o) * I) / 128;
    }
}

/* f8_grouped_k's rows of warp o in group entry y, as kernels/ginfer_k.cu's grouped_prefetch
 * (the routed up-projection none: its groups are known only after the wait). Not inlined:
 * inline, ptxas spilled in f8_grouped_k<1, true>; a call leaves the kernel's registers as
 * they were without it. */
template <bool UP>
__device__ __noinline__ void f8_grouped_prefetch(int m, const uint8_t *w, const float *sc,
                                                 long wstride, const int *off, int G, int I, int O,
                                                 int o, int y)
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
    const uint8_t *wr[NW];
    const float *sr[NW];
    f8_group_rows<UP>(w, sc, wstride, g, o, O, I, wr, sr);
    f8_prefetch<NW>(m, wr, sr, I);
}

/* y[n][o] = sum_i x[n][i] w[o][i] (x rows ldx apart, y rows ldy apart). */
template <int NT>
__global__ void __launch_bounds__(256)
    f8_gemv_k(int m, const float *__restrict__ x, long ldx, const uint8_t *__restrict__ w,
              const float *__restrict__ sc, float *__restrict__ y, long ldy, int N, int I, int O)
{
    int o = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    const uint8_t *wr[1] = {w + (long)o * I};
    const float *sr[1] = {sc + (long)o * (I / 128)};
    if (o < O)
        f8_prefetch<1>(m, wr, sr, I);
    gk_pdl_enter(m);
    if (o >= O)
        return;
    for (int n0 = 0; n0 < N; n0 += NT) {
        int nv = min(NT, N - n0);
        const float *xs[NT];
#pragma unroll
        for (int t = 0; t < NT; t++)
            xs[t] = x + (long)(n0 + (t < nv ? t : 0)) * ldx;
        float acc[1][NT];
        f8_dots<NT, 1>(wr, sr, xs, nv, I, acc);
        gk_pdl_late(m);
#pragma unroll
        for (int t = 0; t < NT; t++)
            if (lane == t && t < nv)
                y[(long)(n0 + t) * ldy + o] = acc[0][t];
    }
}

/* kernels/ginfer_k.cu's grouped_k over FP8 groups (group g's weights at g * wstride, its
 * scales at g * wstride / 128). */
template <int NT, bool UP>
__global__ void __launch_bounds__(256)
    f8_grouped_k(int m, const float *__restrict__ x, const uint8_t *__restrict__ w,
                 const float *__restrict__ sc, long wstride, float *__restrict__ y,
                 const int *order, const int *off, int G, int K, int N, int I, int O)
{
    int o = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    int g = blockIdx.y;
    f8_grouped_prefetch<UP>(m, w, sc, wstride, off, G, I, O, o, g);
    gk_pdl_enter(m);
    if (off) {
        if (g >= off[G + 1])
            return;
        g = off[G + 2 + g];
    }
    int base = off ? off[g] : 0, cnt = off ? off[g + 1] - base : N;
    if (o >= O || cnt <= 0)
        return;
    constexpr int NW = UP ? 2 : 1;
    const uint8_t *wr[NW];
    const float *sr[NW];
    f8_group_rows<UP>(w, sc, wstride, g, o, O, I, wr, sr);
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
        f8_dots<NT, NW>(wr, sr, xs, nv, I, acc);
        gk_pdl_late(m);
#pragma unroll
        for (int t = 0; t < NT; t++)
            if (lane == t && t < nv) {
                float gt = acc[0][t], up = acc[NW - 1][t];
                y[(long)(base + j0 + t) * O + o] =
                    UP ? gt * (1.0f / (1.0f + expf(-gt))) * up : gt;
            }
    }
}

/* ---- the engine's GEMV calls: FP8 kernels for FP8 slots, ginfer_k's otherwise ---- */

static int gx_gemv(ginfer *g, const float *x, long ldx, long xbs, const void *w, int wf32,
                   long wbs, float *y, long ldy, long ybs, int N, int I, int O, int batch,
                   dsv3_err *e)
{
    const float *sc = f8_scales(g, w);
    if (!sc)
        return gk_gemv(g->s, x, ldx, xbs, w, wf32, wbs, y, ldy, ybs, N, I, O, batch, e);
    if (batch != 1 || I % 128)
        return err_set(e, "ginfer: an FP8 GEMV of %d batches over %d values", batch, I);
    if (N <= 0 || O <= 0)
        return 0;
    void (*k)(int, const float *, long, const uint8_t *, const float *, float *, long, int, int,
              int) =
        N == 1 ? f8_gemv_k<1> : N <= 4 ? f8_gemv_k<4> : f8_gemv_k<8>;
    gk_launch(k, dim3((O + 7) / 8), dim3(256), 0, g->s, x, ldx, (const uint8_t *)w, sc, y, ldy,
              N, I, O);
    LAUNCH_CHECK("fp8 gemv", e);
    return 0;
}

template <bool UP>
static int f8_grouped(cudaStream_t st, const float *x, const void *w, const float *sc, long wstride,
                      float *y, const int *order, const int *off, int K, int groups, int maxact,
                      int N, int rows_hint, int I, int O, dsv3_err *e)
{
    if (I % 128 || wstride % 128)
        return err_set(e, "ginfer: FP8 expert weights of rows of %d values", I);
    dim3 grid((O + 7) / 8, off && maxact < groups ? maxact : groups);
    void (*k)(int, const float *, const uint8_t *, const float *, long, float *, const int *,
              const int *, int, int, int, int, int) = rows_hint <= 1   ? f8_grouped_k<1, UP>
                                                      : rows_hint <= 4 ? f8_grouped_k<4, UP>
                                                                       : f8_grouped_k<8, UP>;
    gk_launch(k, grid, dim3(256), 0, st, x, (const uint8_t *)w, sc, wstride, y, order, off,
              groups, K, N, I, O);
    LAUNCH_CHECK(UP ? "fp8 ffn_up" : "fp8 ffn_down", e);
    return 0;
}

/* On stream st: the engine's own (g->s) or the shared experts' side stream (ffn). */
static int gx_ffn_up(ginfer *g, cudaStream_t st, const float *x, const void *w1, int wf32,
                     long w1_stride, float *h, const int *order, const int *off, int K,
                     int groups, int maxact, int N, int rows_hint, int H, int F, dsv3_err *e)
{
    const float *sc = f8_scales(g, w1);
    if (!sc)
        return gk_ffn_up(st, x, w1, wf32, w1_stride, h, order, off, K, groups, maxact, N,
                         rows_hint, H, F, g->g1, e);
    return f8_grouped<true>(st, x, w1, sc, w1_stride, h, order, off, K, groups, maxact, N,
                            rows_hint, H, F, e);
}

static int gx_ffn_down(ginfer *g, cudaStream_t st, const float *h, const void *w2, int wf32,
                       long w2_stride, float *y, const int *off, int groups, int maxact, int N,
                       int rows_hint, int F, int H, dsv3_err *e)
{
    const float *sc = f8_scales(g, w2);
    if (!sc)
        return gk_ffn_down(st, h, w2, wf32, w2_stride, y, off, groups, maxact, N, rows_hint,
                           F, H, g->g1, e);
    return f8_grouped<false>(st, h, w2, sc, w2_stride, y, NULL, off, 1, groups, maxact, N,
                             rows_hint, F, H, e);
}
