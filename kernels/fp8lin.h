/* fp8lin: a model's linear layers in bf16 or, switched on, in FP8 as DeepSeek-V3 trains them.
 *
 * The three products of y = x w^T (gemm.h's gpu_linear_fwd/dgrad/wgrad, same arguments) with
 * a switch: off, they are those bf16 products; on, each call quantises its operands
 * (kernels/fp8.h: activations and gradients 1x128 along the reduction, weights 128x128 from
 * the bf16 compute copy) into a scratch buffer of its own and runs the block-scaled FP8 GEMM
 * (fp8gemm.h), fp32 accumulation, bf16 outputs and fp32 weight gradients as before. Shapes
 * the FP8 GEMM cannot take (a dimension or the token count not a multiple of 16) stay bf16.
 * Not yet: quantised activations cached between forward and backward (each product quantises
 * what it reads), weights quantised once per optimizer step. */
#ifndef DSV3_KERNELS_FP8LIN_H
#define DSV3_KERNELS_FP8LIN_H

#include "gpuctx.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct gpu_lin {
    gpu_ctx *c;
    int fp8;
    uint8_t *buf; /* device scratch for quantised operands and scales */
    size_t bytes;
} gpu_lin;

/* FP8 on for products of up to max_tokens rows and dimensions up to max_dim (the scratch is
 * sized for them: about max_tokens * max_dim * 2 + max_dim^2 bytes). */
int gpu_lin_fp8_on(gpu_lin *L, int64_t max_tokens, int64_t max_dim, dsv3_err *e);
void gpu_lin_free(gpu_lin *L);

int gpu_lin_fwd(gpu_lin *L, gpu_bf16 *out, const gpu_bf16 *in, const gpu_bf16 *w, int N, int I,
                int O, float beta, dsv3_err *e);
int gpu_lin_dgrad(gpu_lin *L, gpu_bf16 *d_in, const gpu_bf16 *d_out, const gpu_bf16 *w, int N,
                  int I, int O, float beta, dsv3_err *e);
int gpu_lin_wgrad(gpu_lin *L, float *d_w, const gpu_bf16 *d_out, const gpu_bf16 *in, int N,
                  int I, int O, float beta, dsv3_err *e);

#ifdef __cplusplus
}
#endif

#endif
