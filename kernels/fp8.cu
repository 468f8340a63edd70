/* fp8: block-scaled E4M3 quantisation kernels. See fp8.h.
 *
 * Bit-exact with lib/fp8: the rule (scale, codes) is fp8_quant.cuh's, and every amax here
 * is exact (a max of absolute values). */
#include <cuda_fp8.h>

#include "fp8.h"
#include "fp8_quant.cuh"
#include "gpuctx_internal.cuh"

__device__ __forceinline__ float ld(const float *p) { return *p; }
__device__ __forceinline__ float ld(const bf16 *p) { return b2f(*p); }

/* ---- activations, 1x128 along a row ---------------------------------------------------- */

/* One warp per 1x128 tile, four elements a lane. vec: cols % 4 == 0 and x 8-byte aligned,
 * so a lane's four values are one 8-byte load and its four codes one 4-byte store. */
template <bool vec>
__global__ void quant_act_kernel(uint8_t *q, float *s, const bf16 *x, int rows, int cols)
{
    int lane = threadIdx.x & 31, nb = (cols + FP8_BLOCK - 1) / FP8_BLOCK;
    int64_t tiles = (int64_t)rows * nb;
    int64_t warp = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
    int64_t nwarps = ((int64_t)gridDim.x * blockDim.x) >> 5;
    for (int64_t t = warp; t < tiles; t += nwarps) {
        int64_t r = t / nb;
        int cb = (int)(t % nb), c = cb * FP8_BLOCK + lane * 4;
        const bf16 *xr = x + r * cols;
        float v[4] = {0, 0, 0, 0};
        if (vec) {
            if (c < cols) {
                uint2 u = *(const uint2 *)(xr + c);
                float2 a = __bfloat1622float2(*(__nv_bfloat162 *)&u.x);
                float2 b = __bfloat1622float2(*(__nv_bfloat162 *)&u.y);
                v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
            }
        } else {
#pragma unroll
            for (int j = 0; j < 4; j++)
                if (c + j < cols)
                    v[j] = b2f(xr[c + j]);
        }
        float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
        float sc = fp8_tile_scale(warp_max(amax));
        uint8_t *qr = q + r * cols;
        if (vec) {
            if (c < cols)
                *(uint32_t *)(qr + c) = fp8_code4(v[0], v[1], v[2], v[3], sc);
        } else {
#pragma unroll
            for (int j = 0; j < 4; j++)
                if (c + j < cols)
                    qr[c + j] = fp8_code(v[j], sc);
        }
        if (lane == 0)
            s[(int64_t)cb * rows + r] = sc;
    }
}

/* 16-byte version: cols % 8 == 0, x 16-byte and q 8-byte aligned. A half-warp per tile, eight
 * values a lane (one 16-byte load), two tiles in flight per half-warp; the loop bound is
 * the same for the whole warp, so the shuffles never diverge. */
#define QA_UNROLL 2
__global__ void quant_act_vec8_kernel(uint8_t *q, float *s, const bf16 *x, int rows, int cols)
{
    int lane = threadIdx.x & 31, half = lane >> 4, hl = lane & 15;
    int nb = (cols + FP8_BLOCK - 1) / FP8_BLOCK;
    int64_t tiles = (int64_t)rows * nb;
    int64_t warp = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
    int64_t nwarps = ((int64_t)gridDim.x * blockDim.x) >> 5;
    for (int64_t base = warp * 2 * QA_UNROLL; base < tiles; base += nwarps * 2 * QA_UNROLL) {
        float v[QA_UNROLL][8];
        int64_t t[QA_UNROLL];
#pragma unroll
        for (int u = 0; u < QA_UNROLL; u++) {
            t[u] = base + 2 * u + half;
            int64_t r = t[u] / nb;
            int c = (int)(t[u] % nb) * FP8_BLOCK + hl * 8;
            if (t[u] < tiles && c < cols) {
                uint4 w = *(const uint4 *)(x + r * cols + c);
                const __nv_bfloat162 *h = (const __nv_bfloat162 *)&w;
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    float2 f = __bfloat1622float2(h[i]);
                    v[u][2 * i] = f.x, v[u][2 * i + 1] = f.y;
                }
            } else {
#pragma unroll
                for (int i = 0; i < 8; i++)
                    v[u][i] = 0.0f;
            }
        }
#pragma unroll
        for (int u = 0; u < QA_UNROLL; u++) {
            float sc = fp8_tile_scale(fp8_amax_half(v[u]));
            int64_t r = t[u] / nb;
            int cb = (int)(t[u] % nb), c = cb * FP8_BLOCK + hl * 8;
            if (t[u] < tiles && c < cols) {
                uint2 out;
                out.x = fp8_code4(v[u][0], v[u][1], v[u][2], v[u][3], sc);
                out.y = fp8_code4(v[u][4], v[u][5], v[u][6], v[u][7], sc);
                *(uint2 *)(q + r * cols + c) = out;
            }
            if (t[u] < tiles && hl == 0)
                s[(int64_t)cb * rows + r] = sc;
        }
    }
}

/* ---- activations transposed (and, fused, row-wise): one 128x128 tile a block ----------- */

/* The tile goes to shared memory as bf16 pairs, rows 65 words apart (column reads below hit
 * 32 banks). While loading, each half-warp holds one row of the tile (eight values a lane),
 * which is a row-wise 1x128 tile: with q given, it is quantised there and then (the fused
 * form: x read once for both layouts). Then each warp quantises 16 columns: lane l holds
 * rows l, l+32, l+64, l+96 of a column, so a warp's store is 32 consecutive bytes of qt. */
#define QT_STRIDE 65 /* words (bf16 pairs) per shared row */
/* SwiGLU's value as kernels/swiglu.cu computes it (same expression, same rounding). */
__device__ __forceinline__ float swiglu_val(float gv, float uv)
{
    return b2f(f2b(gv * (1.0f / (1.0f + __expf(-gv))) * uv));
}

/* The tile's source: x [rows x cols] itself, or (swiglu) h = silu(g) * u computed here from
 * g and u (row stride ld) and written to h [rows x cols] on the way. */
struct act_src {
    const bf16 *x;
    const bf16 *g, *u;
    bf16 *h;
    int ld;
};

/* Eight values of row r from column c (all in range: vec), or those in range (scalar). */
template <bool vec, bool swiglu>
__device__ __forceinline__ void load_row8(const act_src &a, int64_t r, int c, int cols, bool ok,
                                          float (&v)[8])
{
    if (!swiglu) {
        if (vec) {
            if (ok && c < cols) {
                load8(a.x + r * cols + c, v);
            } else {
#pragma unroll
                for (int i = 0; i < 8; i++)
                    v[i] = 0.0f;
            }
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++)
                v[i] = ok && c + i < cols ? b2f(a.x[r * cols + c + i]) : 0.0f;
        }
        return;
    }
    if (vec) {
        if (ok && c < cols) {
            uint4 gu = *(const uint4 *)(a.g + r * a.ld + c), uu = *(const uint4 *)(a.u + r * a.ld + c);
            const __nv_bfloat162 *gh = (const __nv_bfloat162 *)&gu, *uh = (const __nv_bfloat162 *)&uu;
            uint4 out;
            __nv_bfloat162 *oh = (__nv_bfloat162 *)&out;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                float2 gf = __bfloat1622float2(gh[i]), uf = __bfloat1622float2(uh[i]);
                v[2 * i] = swiglu_val(gf.x, uf.x), v[2 * i + 1] = swiglu_val(gf.y, uf.y);
                oh[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]); /* exact */
            }
            *(uint4 *)(a.h + r * cols + c) = out;
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++)
                v[i] = 0.0f;
        }
    } else {
#pragma unroll
        for (int i = 0; i < 8; i++) {
            v[i] = 0.0f;
            if (ok && c + i < cols) {
                v[i] = swiglu_val(b2f(a.g[r * a.ld + c + i]), b2f(a.u[r * a.ld + c + i]));
                a.h[r * cols + c + i] = f2b(v[i]);
            }
        }
    }
}

template <bool vec, bool swiglu>
__global__ void __launch_bounds__(256) quant_act_t_kernel(uint8_t *q, float *s, uint8_t *qt,
                                                          float *st, act_src src, int rows,
                                                          int cols)
{
    __shared__ uint32_t tile[FP8_BLOCK * QT_STRIDE];
    int64_t r0 = (int64_t)blockIdx.y * FP8_BLOCK;
    int c0 = blockIdx.x * FP8_BLOCK, tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    int hl = tid & 15;
    for (int pass = 0; pass < FP8_BLOCK / 16; pass++) {
        int r = pass * 16 + (tid >> 4), c = hl * 8;
        float v[8];
        bool in_row = r0 + r < rows;
        load_row8<vec, swiglu>(src, r0 + r, c0 + c, cols, in_row, v);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            __nv_bfloat162 p = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]); /* exact */
            tile[r * QT_STRIDE + hl * 4 + i] = *(uint32_t *)&p;
        }
        if (q) {
            float sc = fp8_tile_scale(fp8_amax_half(v));
            uint8_t *qr = q + (r0 + r) * cols + c0;
            if (in_row) {
                if (vec && c0 + c < cols) {
                    uint2 out;
                    out.x = fp8_code4(v[0], v[1], v[2], v[3], sc);
                    out.y = fp8_code4(v[4], v[5], v[6], v[7], sc);
                    *(uint2 *)(qr + c) = out;
                } else if (!vec) {
                    for (int i = 0; i < 8; i++)
                        if (c0 + c + i < cols)
                            qr[c + i] = fp8_code(v[i], sc);
                }
                if (hl == 0)
                    s[(int64_t)blockIdx.x * rows + r0 + r] = sc;
            }
        }
    }
    __syncthreads();
    const __nv_bfloat16 *tb = (const __nv_bfloat16 *)tile;
    for (int k = 0; k < FP8_BLOCK / 8; k++) {
        int c = w * (FP8_BLOCK / 8) + k;
        if (c0 + c >= cols)
            break;
        float v[4];
#pragma unroll
        for (int j = 0; j < 4; j++)
            v[j] = b2f(tb[(lane + 32 * j) * QT_STRIDE * 2 + c]);
        float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
        float sc = fp8_tile_scale(warp_max(amax));
        uint8_t *qr = qt + (int64_t)(c0 + c) * rows;
#pragma unroll
        for (int j = 0; j < 4; j++)
            if (r0 + lane + 32 * j < rows)
                qr[r0 + lane + 32 * j] = fp8_code(v[j], sc);
        if (lane == 0)
            st[(int64_t)blockIdx.y * cols + c0 + c] = sc;
    }
}

/* ---- weights, 128x128 blocks ----------------------------------------------------------- */

/* One block of 512 threads per 128x128 tile: thread t holds column t % 128 of rows t / 128,
 * +4, +8, ... (32 values in registers: the tile is read once), the block's amax gives the
 * scale, codes go out row-major and, through a shared byte tile, transposed. */
#define QW_THREADS 512
#define QW_PER (FP8_BLOCK * FP8_BLOCK / QW_THREADS)
template <typename T>
__global__ void __launch_bounds__(QW_THREADS) quant_weight_kernel(uint8_t *q, float *s,
                                                                  uint8_t *qt, float *st,
                                                                  const T *w, int rows,
                                                                  int cols, int ld_s, int ld_st)
{
    __shared__ uint8_t tq[FP8_BLOCK][FP8_BLOCK + 4];
    __shared__ float scratch[32];
    const int step = QW_THREADS / FP8_BLOCK;
    int tid = threadIdx.x, c = tid % FP8_BLOCK, rr = tid / FP8_BLOCK;
    int64_t r0 = (int64_t)blockIdx.y * FP8_BLOCK;
    int c0 = blockIdx.x * FP8_BLOCK;
    int nr = rows - r0 < FP8_BLOCK ? (int)(rows - r0) : FP8_BLOCK;
    bool col_ok = c0 + c < cols;
    const T *wp = w + (r0 + rr) * cols + c0 + c;
    float v[QW_PER];
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < QW_PER; i++) {
        v[i] = (col_ok && rr + step * i < nr) ? ld(wp + (int64_t)step * i * cols) : 0.0f;
        amax = fmaxf(amax, fabsf(v[i]));
    }
    float sc = fp8_tile_scale(block_max(amax, scratch));
    uint8_t *qp = q ? q + (r0 + rr) * cols + c0 + c : NULL;
#pragma unroll
    for (int i = 0; i < QW_PER; i++) {
        uint8_t code = fp8_code(v[i], sc);
        if (qp && col_ok && rr + step * i < nr)
            qp[(int64_t)step * i * cols] = code;
        tq[c][rr + step * i] = code;
    }
    if (tid == 0) {
        if (s)
            s[(int64_t)blockIdx.y * ld_s + blockIdx.x] = sc;
        if (st)
            st[(int64_t)blockIdx.x * ld_st + blockIdx.y] = sc;
    }
    if (!qt)
        return;
    __syncthreads();
    for (int idx = tid; idx < FP8_BLOCK * FP8_BLOCK; idx += QW_THREADS) {
        int cc = idx / FP8_BLOCK, r = idx % FP8_BLOCK;
        if (c0 + cc < cols && r < nr)
            qt[(int64_t)(c0 + cc) * rows + r0 + r] = tq[cc][r];
    }
}

/* ---- entry points ---------------------------------------------------------------------- */

extern "C" int gpu_fp8_quant_act(gpu_ctx *c, uint8_t *q, float *s, const gpu_bf16 *x, int rows,
                                 int cols, dsv3_err *e)
{
    if (rows <= 0 || cols <= 0)
        return 0;
    int64_t tiles = (int64_t)rows * fp8_blocks(cols);
    const bf16 *xb = (const bf16 *)x;
    if (cols % 8 == 0 && aligned16(x) && ((uintptr_t)q & 7) == 0) {
        unsigned grid = grid_for(tiles * 16 / QA_UNROLL, 256);
        quant_act_vec8_kernel<<<grid, 256, 0, c->stream>>>(q, s, xb, rows, cols);
    } else if (cols % 4 == 0 && ((uintptr_t)x & 7) == 0 && ((uintptr_t)q & 3) == 0) {
        quant_act_kernel<true><<<grid_for(tiles * 32, 256), 256, 0, c->stream>>>(q, s, xb, rows,
                                                                                  cols);
    } else {
        quant_act_kernel<false><<<grid_for(tiles * 32, 256), 256, 0, c->stream>>>(q, s, xb, rows,
                                                                                   cols);
    }
    LAUNCH_CHECK("quant_act_kernel", e);
    return 0;
}

extern "C" int gpu_fp8_quant_act_both(gpu_ctx *c, uint8_t *q, float *s, uint8_t *qt, float *st,
                                      const gpu_bf16 *x, int rows, int cols, dsv3_err *e)
{
    if (rows <= 0 || cols <= 0)
        return 0;
    if (fp8_blocks(rows) > 65535)
        return err_set(e, "fp8: %d rows are too many for one transposed quantisation", rows);
    dim3 grid((unsigned)fp8_blocks(cols), (unsigned)fp8_blocks(rows));
    act_src src = {(const bf16 *)x, NULL, NULL, NULL, 0};
    if (cols % 8 == 0 && aligned16(x) && (!q || ((uintptr_t)q & 7) == 0))
        quant_act_t_kernel<true, false><<<grid, 256, 0, c->stream>>>(q, s, qt, st, src, rows, cols);
    else
        quant_act_t_kernel<false, false><<<grid, 256, 0, c->stream>>>(q, s, qt, st, src, rows, cols);
    LAUNCH_CHECK("quant_act_t_kernel", e);
    return 0;
}

extern "C" int gpu_fp8_swiglu_quant(gpu_ctx *c, gpu_bf16 *h, uint8_t *q, float *s, uint8_t *qt,
                                    float *st, const gpu_bf16 *g, const gpu_bf16 *u, int rows,
                                    int cols, int ld, dsv3_err *e)
{
    if (rows <= 0 || cols <= 0)
        return 0;
    if (fp8_blocks(rows) > 65535)
        return err_set(e, "fp8: %d rows are too many for one transposed quantisation", rows);
    if (!q || !qt)
        return err_set(e, "fp8 swiglu: both layouts are written");
    dim3 grid((unsigned)fp8_blocks(cols), (unsigned)fp8_blocks(rows));
    act_src src = {NULL, (const bf16 *)g, (const bf16 *)u, (bf16 *)h, ld};
    if (cols % 8 == 0 && ld % 8 == 0 && aligned16(g) && aligned16(u) && aligned16(h) &&
        ((uintptr_t)q & 7) == 0)
        quant_act_t_kernel<true, true><<<grid, 256, 0, c->stream>>>(q, s, qt, st, src, rows, cols);
    else
        quant_act_t_kernel<false, true><<<grid, 256, 0, c->stream>>>(q, s, qt, st, src, rows, cols);
    LAUNCH_CHECK("quant_act_t_kernel (swiglu)", e);
    return 0;
}

extern "C" int gpu_fp8_quant_act_t(gpu_ctx *c, uint8_t *qt, float *st, const gpu_bf16 *x,
                                   int rows, int cols, dsv3_err *e)
{
    return gpu_fp8_quant_act_both(c, NULL, NULL, qt, st, x, rows, cols, e);
}

template <typename T>
static int quant_weight(gpu_ctx *c, uint8_t *q, float *s, uint8_t *qt, float *st, const T *w,
                        int rows, int cols, dsv3_err *e)
{
    if (rows <= 0 || cols <= 0)
        return 0;
    if (fp8_blocks(rows) > 65535)
        return err_set(e, "fp8: %d weight rows are too many", rows);
    dim3 grid((unsigned)fp8_blocks(cols), (unsigned)fp8_blocks(rows));
    quant_weight_kernel<T><<<grid, QW_THREADS, 0, c->stream>>>(
        q, s, qt, st, w, rows, cols, (int)gpu_fp8_ld(cols), (int)gpu_fp8_ld(rows));
    LAUNCH_CHECK("quant_weight_kernel", e);
    return 0;
}

extern "C" int gpu_fp8_quant_weight(gpu_ctx *c, uint8_t *q, float *s, uint8_t *qt, float *st,
                                    const float *w, int rows, int cols, dsv3_err *e)
{
    return quant_weight<float>(c, q, s, qt, st, w, rows, cols, e);
}

extern "C" int gpu_fp8_quant_weight_bf16(gpu_ctx *c, uint8_t *q, float *s, uint8_t *qt,
                                         float *st, const gpu_bf16 *w, int rows, int cols,
                                         dsv3_err *e)
{
    return quant_weight<bf16>(c, q, s, qt, st, (const bf16 *)w, rows, cols, e);
}
