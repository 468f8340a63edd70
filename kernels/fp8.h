/* fp8: DeepSeek-V3's block-scaled E4M3 quantisation on the GPU, bit for bit lib/fp8's.
 *
 * Every tile gets scale s = amax / 448 of its own values (online, no history; a tile of
 * zeros gets 1) and q = e4m3(x / s), round to nearest even, saturating: the rule of
 * lib/fp8, which tests/gpu/test_fp8 checks byte for byte. The tiles lie along the reduction
 * dimension of the GEMM that reads them, and the scales are laid out the way cuBLASLt's
 * block-scaling modes read them (kernels/fp8gemm.h), so no GEMM needs a copy:
 *
 * - activations, 1x128 tiles along a row: x [rows x cols] -> q [rows x cols] and
 *   s [fp8_blocks(cols) x rows] (VEC128_32F: the outer dimension, rows, is contiguous);
 * - activations transposed, for wgrad (whose reduction runs over the tokens): x [rows x cols]
 *   -> qt [cols x rows], 1x128 tiles along a row of qt (a column of x), st
 *   [fp8_blocks(rows) x cols];
 * - weights, 128x128 blocks: w [rows x cols] -> q [rows x cols], s [fp8_blocks(rows) x
 *   gpu_fp8_ld(cols)] (BLK128x128_32F: block columns contiguous, the row of blocks padded to a
 *   multiple of 4), and optionally the transpose for dgrad, qt [cols x rows] with st
 *   [fp8_blocks(cols) x gpu_fp8_ld(rows)] (the same blocks, so the same codes).
 *
 * Non-finite inputs give NaN codes (0x7F/0xFF) instead of lib/fp8's error: the trainer's loss
 * check sees the divergence. Sizes are any positive ints; the GEMMs need more (fp8gemm.h). */
#ifndef DSV3_KERNELS_FP8_H
#define DSV3_KERNELS_FP8_H

#include "../lib/fp8.h"
#include "gpuctx.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Leading dimension (in blocks) of a 128x128 scale grid's row: cuBLASLt wants a multiple of 4. */
static inline int64_t gpu_fp8_ld(int64_t n) { return (fp8_blocks(n) + 3) / 4 * 4; }

int gpu_fp8_quant_act(gpu_ctx *c, uint8_t *q, float *s, const gpu_bf16 *x, int rows, int cols,
                      dsv3_err *e);
int gpu_fp8_quant_act_t(gpu_ctx *c, uint8_t *qt, float *st, const gpu_bf16 *x, int rows,
                        int cols, dsv3_err *e);
/* Both at once, x read once (a gradient feeds dgrad row-wise and wgrad transposed). */
int gpu_fp8_quant_act_both(gpu_ctx *c, uint8_t *q, float *s, uint8_t *qt, float *st,
                           const gpu_bf16 *x, int rows, int cols, dsv3_err *e);
/* SwiGLU fused with the quantisation of its output: h [rows x cols] = silu(g) * u (g and u
 * with row stride ld, as kernels/layers.h's gpu_swiglu_fwd, bit for bit), written in bf16 and
 * quantised in both layouts as gpu_fp8_quant_act_both(h) would (the MLP down-projection's
 * fprop and wgrad operands; h is read by nothing else in FP8). */
int gpu_fp8_swiglu_quant(gpu_ctx *c, gpu_bf16 *h, uint8_t *q, float *s, uint8_t *qt, float *st,
                         const gpu_bf16 *g, const gpu_bf16 *u, int rows, int cols, int ld,
                         dsv3_err *e);
/* qt/st may be NULL (no transpose); q/s may be NULL (transpose only). */
int gpu_fp8_quant_weight(gpu_ctx *c, uint8_t *q, float *s, uint8_t *qt, float *st,
                         const float *w, int rows, int cols, dsv3_err *e);
int gpu_fp8_quant_weight_bf16(gpu_ctx *c, uint8_t *q, float *s, uint8_t *qt, float *st,
                              const gpu_bf16 *w, int rows, int cols, dsv3_err *e);

#ifdef __cplusplus
}
#endif

#endif
