/* fp8gemm: FP8 (E4M3) matrix products with DeepSeek-V3's block scaling, through cuBLASLt.
 *
 * C[M,N] = A[M,K] . B[N,K]^T + beta C, row-major, both operands E4M3 with K contiguous (the
 * "TN" form, the only one Hopper's FP8 tensor cores take), fp32 accumulation, C bf16 or fp32.
 * Each operand has its own scaling, in the layouts kernels/fp8.h writes:
 *   GPU_FP8_VEC128  one fp32 per 1x128 tile along K: s [fp8_blocks(K) x rows]
 *   GPU_FP8_BLK128  one fp32 per 128x128 block: s [fp8_blocks(rows) x gpu_fp8_ld(K)]
 *   GPU_FP8_TENSOR  one fp32 for the whole operand (s may be NULL: 1); the plain FP8 GEMM
 * cuBLASLt's block modes (CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F, _BLK128x128_32F) take the
 * pairs VEC128 x BLK128 (either way round) and VEC128 x VEC128; sizes: K and N multiples of 16,
 * pointers 16-byte aligned. What cuBLASLt refuses comes back as an error naming the shape.
 *
 * The three products of a linear layer y = x w^T in FP8, as V3 runs them:
 *   fprop  y[N,O]  = x[N,I] w[O,I]^T    x 1x128 (gpu_fp8_quant_act), w 128x128 (quant_weight q)
 *   dgrad  dx[N,I] = dy[N,O] w[O,I]     dy 1x128 (quant_act), w^T 128x128 (quant_weight qt)
 *   wgrad  dw[O,I] += dy^T x            dy^T and x^T, 1x128 along the tokens (quant_act_t) */
#ifndef DSV3_KERNELS_FP8GEMM_H
#define DSV3_KERNELS_FP8GEMM_H

#include "fp8.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { GPU_FP8_TENSOR = 0, GPU_FP8_VEC128 = 1, GPU_FP8_BLK128 = 2 };
/* flags: cuBLASLt's fast accumulation (no periodic promotion; for the per-tensor peak only). */
#define GPU_FP8_FAST_ACCUM 1

int gpu_fp8_gemm(gpu_ctx *c, int M, int N, int K, const uint8_t *A, const float *sa, int a_mode,
                 const uint8_t *B, const float *sb, int b_mode, float beta, void *C, int c_f32,
                 int flags, dsv3_err *e);

/* out[N,O] (bf16) = x . w^T + beta out: xq/xs from gpu_fp8_quant_act(x [N,I]), wq/ws from
 * gpu_fp8_quant_weight(w [O,I]). */
int gpu_fp8_linear_fwd(gpu_ctx *c, gpu_bf16 *out, const uint8_t *xq, const float *xs,
                       const uint8_t *wq, const float *ws, int N, int I, int O, float beta,
                       dsv3_err *e);
/* d_in[N,I] (bf16) = d_out . w + beta d_in: dyq/dys from gpu_fp8_quant_act(d_out [N,O]),
 * wtq/wts the transposed output of gpu_fp8_quant_weight(w [O,I]). */
int gpu_fp8_linear_dgrad(gpu_ctx *c, gpu_bf16 *d_in, const uint8_t *dyq, const float *dys,
                         const uint8_t *wtq, const float *wts, int N, int I, int O, float beta,
                         dsv3_err *e);
/* d_w[O,I] (fp32) = d_out^T . in + beta d_w: dytq/dyts from gpu_fp8_quant_act_t(d_out
 * [N,O]), xtq/xts from gpu_fp8_quant_act_t(in [N,I]). */
int gpu_fp8_linear_wgrad(gpu_ctx *c, float *d_w, const uint8_t *dytq, const float *dyts,
                         const uint8_t *xtq, const float *xts, int N, int I, int O, float beta,
                         dsv3_err *e);

#ifdef __cplusplus
}
#endif

#endif
