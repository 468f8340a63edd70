/* gemm: matrix products through cuBLASLt, bf16 operands, fp32 accumulation.
 *
 * Row-major throughout, as in lib/ops: C[M,N] = alpha * op(A)[M,K] . op(B)[K,N] + beta * C,
 * op(X) = X or X^T (ta, tb). C is bf16 or fp32 (c_f32). The three products of a linear
 * layer y = x . w^T (torch nn.Linear, lib/ops matmul_*) are named for what they compute.
 * The algorithm cuBLASLt picks for a shape is cached in the context. */
#ifndef DSV3_GEMM_H
#define DSV3_GEMM_H

#include "gpuctx.h"

#ifdef __cplusplus
extern "C" {
#endif

int gpu_gemm(gpu_ctx *c, int ta, int tb, int M, int N, int K, float alpha, const gpu_bf16 *A,
             int lda, const gpu_bf16 *B, int ldb, float beta, void *C, int ldc, int c_f32,
             dsv3_err *e);

/* out[N,O] = in[N,I] . w[O,I]^T + beta * out  (fprop). */
int gpu_linear_fwd(gpu_ctx *c, gpu_bf16 *out, const gpu_bf16 *in, const gpu_bf16 *w, int N,
                   int I, int O, float beta, dsv3_err *e);
/* d_in[N,I] = d_out[N,O] . w[O,I] + beta * d_in  (dgrad). */
int gpu_linear_dgrad(gpu_ctx *c, gpu_bf16 *d_in, const gpu_bf16 *d_out, const gpu_bf16 *w,
                     int N, int I, int O, float beta, dsv3_err *e);
/* d_w[O,I] (fp32) = d_out^T . in + beta * d_w  (wgrad; beta 1 accumulates). */
int gpu_linear_wgrad(gpu_ctx *c, float *d_w, const gpu_bf16 *d_out, const gpu_bf16 *in, int N,
                     int I, int O, float beta, dsv3_err *e);

#ifdef __cplusplus
}
#endif

#endif
