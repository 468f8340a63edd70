/* fp8lin: a model's linear layers in bf16 or, switched on, in FP8 as DeepSeek-V3 trains them.
 *
 * The three products of y = x w^T (gemm.h's gpu_linear_fwd/dgrad/wgrad, same arguments) with
 * a switch: off, they are those bf16 products; on, the operands are quantised (kernels/fp8.h:
 * activations and gradients 1x128 along the reduction, weights 128x128 from the bf16 compute
 * copy) into buffers of the gpu_lin's own and the product runs as the block-scaled FP8 GEMM
 * (fp8gemm.h), fp32 accumulation, bf16 outputs and fp32 weight gradients as before. Shapes
 * the FP8 GEMM cannot take (a dimension or the token count not a multiple of 16) stay bf16,
 * and so do those with min(I, O) below min_dim (a policy of the caller's: where FP8 does not
 * pay; 0, the default, sends every shape to FP8).
 *
 * What is quantised when (DeepSeek-V3 quantises each operand once):
 * - weights once per optimizer step: the first product that reads w after
 *   gpu_lin_weights_changed quantises it 128x128 in both layouts (fprop's w, dgrad's w^T) into
 *   a buffer kept per weight; the caller says when the bf16 weights change;
 * - a linear's input once per forward: fprop quantises x 1x128 row-wise and, in the same pass,
 *   transposed (wgrad's x^T), and keeps both per weight; a wgrad that directly follows the
 *   dgrad of the same weight (same dy; gmodel's order), with the forward's input pointer and
 *   shape, in the same pass (gpu_lin_new_pass) reads the kept x^T, so the backward never
 *   re-reads x (the FP8 input of a linear is what the backward holds, as in V3; the
 *   caller must not rewrite x between that forward and backward, as gmodel does not);
 * - an output gradient once: dgrad quantises dy in both layouts in one pass, and the wgrad
 *   that follows it directly (same dy, same shape) reads dy^T from there.
 * The weight is known to the wgrad through that dgrad, never through pointers alone, so a
 * buffer reused for several layers' inputs (recomputation) cannot mix up their codes.
 * Anything else (a wgrad with no matching forward, a different pointer) quantises afresh,
 * so the caches change no result: every code is the one the uncached path would compute. */
#ifndef DSV3_KERNELS_FP8LIN_H
#define DSV3_KERNELS_FP8LIN_H

#include "gpuctx.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct gpu_lin_ent gpu_lin_ent; /* one weight's quantisations (fp8lin.cu) */

typedef struct gpu_lin {
    gpu_ctx *c;
    int fp8;
    uint8_t *buf; /* device scratch for quantised operands and scales */
    size_t bytes;
    gpu_lin_ent *ent;   /* per weight: its codes, and its last forward input's */
    int n_ent, cap_ent;
    unsigned wgen;      /* weight generation: bumped by gpu_lin_weights_changed */
    unsigned pass;      /* forward pass: bumped by gpu_lin_new_pass */
    int keep_inputs;    /* this pass has a backward: keep the inputs' x^T */
    const void *last_dy;/* dgrad's dy, both layouts in buf, until the next call ... */
    int last_rows, last_cols, last_ent; /* ... its shape and weight's entry */
    int min_dim;        /* FP8 on: shapes with min(I, O) below it stay bf16 (0: none do) */
} gpu_lin;

/* FP8 on for products of up to max_tokens rows and dimensions up to max_dim (the scratch is
 * sized for them: about max_tokens * max_dim * 2 + max_dim^2 bytes). */
int gpu_lin_fp8_on(gpu_lin *L, int64_t max_tokens, int64_t max_dim, dsv3_err *e);
void gpu_lin_free(gpu_lin *L);
/* The bf16 weights were written (optimizer step, upload): quantise them again on next use. */
void gpu_lin_weights_changed(gpu_lin *L);
/* A new forward begins (new inputs); backward: whether a backward will follow it (keep the
 * transposed input codes for wgrad). */
void gpu_lin_new_pass(gpu_lin *L, int backward);

int gpu_lin_fwd(gpu_lin *L, gpu_bf16 *out, const gpu_bf16 *in, const gpu_bf16 *w, int N, int I,
                int O, float beta, dsv3_err *e);
/* SwiGLU then the linear: h [N x I] = silu(g) * u (row stride ld; gpu_swiglu_fwd), out =
 * h w^T + beta out. In FP8 with a backward to follow, h is quantised as it is made
 * (gpu_fp8_swiglu_quant) and kept like any input; the same numbers either way. */
int gpu_lin_swiglu_fwd(gpu_lin *L, gpu_bf16 *out, gpu_bf16 *h, const gpu_bf16 *g,
                       const gpu_bf16 *u, int ld, const gpu_bf16 *w, int N, int I, int O,
                       float beta, dsv3_err *e);
int gpu_lin_dgrad(gpu_lin *L, gpu_bf16 *d_in, const gpu_bf16 *d_out, const gpu_bf16 *w, int N,
                  int I, int O, float beta, dsv3_err *e);
int gpu_lin_wgrad(gpu_lin *L, float *d_w, const gpu_bf16 *d_out, const gpu_bf16 *in, int N,
                  int I, int O, float beta, dsv3_err *e);

#ifdef __cplusplus
}
#endif

#endif
