/* fp8: block-scaled E4M3 quantisation kernels. See fp8.h.
 *
 * Bit-exactness with lib/fp8 rests on three things: the amax is exact (a max of absolute
 * values), s = amax / 448 and x / s are IEEE float divisions (no fast math here: __fdiv_rn
 * spells it out), and the hardware conversion cvt.rn.satfinite.e4m3x2.f32 rounds to nearest
 * even and saturates at 448 like fp8_e4m3_from_f32. */
#include <cuda_fp8.h>

#include "fp8.h"
#include "gpuctx_internal.cuh"

__device__ __forceinline__ float tile_scale(float amax)
{
    return amax > 0.0f ? __fdiv_rn(amax, FP8_E4M3_MAX) : 1.0f;
}

__device__ __forceinline__ uint8_t to_e4m3(float x, float s)
{
    return (uint8_t)__nv_cvt_float_to_fp8(__fdiv_rn(x, s), __NV_SATFINITE, __NV_E4M3);
}

/* Two codes at once, a in the low byte. */
__device__ __forceinline__ uint16_t to_e4m3x2(float a, float b, float s)
{
    return (uint16_t)__nv_cvt_float2_to_fp8x2(make_float2(__fdiv_rn(a, s), __fdiv_rn(b, s)),
                                              __NV_SATFINITE, __NV_E4M3);
}

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
        float sc = tile_scale(warp_max(amax));
        uint8_t *qr = q + r * cols;
        if (vec) {
            if (c < cols)
                *(uint32_t *)(qr + c) = (uint32_t)to_e4m3x2(v[0], v[1], sc) |
                                        ((uint32_t)to_e4m3x2(v[2], v[3], sc) << 16);
        } else {
#pragma unroll
            for (int j = 0; j < 4; j++)
                if (c + j < cols)
                    qr[c + j] = to_e4m3(v[j], sc);
        }
        if (lane == 0)
            s[(int64_t)cb * rows + r] = sc;
    }
}

/* ---- activations transposed: 1x128 tiles down a column --------------------------------- */

#define QT_ROWS 128
#define QT_COLS 64

/* A block takes 128 rows x 64 columns of x into shared memory (stride 65: the column reads
 * below hit 32 different banks), then each of its 8 warps quantises 8 columns: lane l holds
 * rows l, l+32, l+64, l+96 of the column, so the codes of a warp's store are 32 consecutive
 * bytes of a row of qt. */
__global__ void __launch_bounds__(256) quant_act_t_kernel(uint8_t *qt, float *st, const bf16 *x,
                                                          int rows, int cols)
{
    __shared__ float tile[QT_ROWS][QT_COLS + 1];
    int64_t r0 = (int64_t)blockIdx.y * QT_ROWS;
    int c0 = blockIdx.x * QT_COLS, tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    for (int i = tid; i < QT_ROWS * QT_COLS; i += 256) {
        int r = i / QT_COLS, c = i % QT_COLS;
        tile[r][c] = (r0 + r < rows && c0 + c < cols) ? b2f(x[(r0 + r) * cols + c0 + c]) : 0.0f;
    }
    __syncthreads();
    for (int k = 0; k < QT_COLS / 8; k++) {
        int c = w * (QT_COLS / 8) + k;
        if (c0 + c >= cols)
            break;
        float v[4];
#pragma unroll
        for (int j = 0; j < 4; j++)
            v[j] = tile[lane + 32 * j][c];
        float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
        float sc = tile_scale(warp_max(amax));
        uint8_t *qr = qt + (int64_t)(c0 + c) * rows;
#pragma unroll
        for (int j = 0; j < 4; j++)
            if (r0 + lane + 32 * j < rows)
                qr[r0 + lane + 32 * j] = to_e4m3(v[j], sc);
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
    float sc = tile_scale(block_max(amax, scratch));
    uint8_t *qp = q ? q + (r0 + rr) * cols + c0 + c : NULL;
#pragma unroll
    for (int i = 0; i < QW_PER; i++) {
        uint8_t code = to_e4m3(v[i], sc);
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
    unsigned grid = grid_for(tiles * 32, 256);
    const bf16 *xb = (const bf16 *)x;
    if (cols % 4 == 0 && ((uintptr_t)x & 7) == 0 && ((uintptr_t)q & 3) == 0)
        quant_act_kernel<true><<<grid, 256, 0, c->stream>>>(q, s, xb, rows, cols);
    else
        quant_act_kernel<false><<<grid, 256, 0, c->stream>>>(q, s, xb, rows, cols);
    LAUNCH_CHECK("quant_act_kernel", e);
    return 0;
}

extern "C" int gpu_fp8_quant_act_t(gpu_ctx *c, uint8_t *qt, float *st, const gpu_bf16 *x,
                                   int rows, int cols, dsv3_err *e)
{
    if (rows <= 0 || cols <= 0)
        return 0;
    if (fp8_blocks(rows) > 65535)
        return err_set(e, "fp8: %d rows are too many for one transposed quantisation", rows);
    dim3 grid((cols + QT_COLS - 1) / QT_COLS, (unsigned)fp8_blocks(rows));
    quant_act_t_kernel<<<grid, 256, 0, c->stream>>>(qt, st, (const bf16 *)x, rows, cols);
    LAUNCH_CHECK("quant_act_t_kernel", e);
    return 0;
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
