/* layers: the small fused operations of a transformer layer on the GPU (RMSNorm, RoPE,
 * SwiGLU, embedding), bf16 storage with fp32 arithmetic. Each is the lib/ops function of
 * the same name (see there for the equations), with these differences: activation
 * gradients are written (beta 0) or added (beta 1) as the caller says, rather than always
 * added; weight gradients are fp32 and always added; every reduction has a fixed order, so
 * results are bitwise reproducible. All pointers are device memory. */
#ifndef DSV3_LAYERS_H
#define DSV3_LAYERS_H

#include "gpuctx.h"

#ifdef __cplusplus
extern "C" {
#endif

/* out[N,D] = w * x * rstd; rstd[N] (fp32, may be NULL) kept for backward. */
int gpu_rmsnorm_fwd(gpu_ctx *c, gpu_bf16 *out, float *rstd, const gpu_bf16 *in,
                    const gpu_bf16 *w, int N, int D, float eps, dsv3_err *e);
/* d_in = beta * d_in + dx (d_in may be NULL); d_w[D] += sum over rows (may be NULL).
 * rstd may be NULL: it is then recomputed from in (recomputation instead of storing). */
int gpu_rmsnorm_bwd(gpu_ctx *c, gpu_bf16 *d_in, float beta, float *d_w, const gpu_bf16 *d_out,
                    const gpu_bf16 *in, const gpu_bf16 *w, const float *rstd, int N, int D,
                    float eps, dsv3_err *e);

/* In place on `count` vectors of 2*half values at x + i*stride (elements), vector i at
 * position pos[i / per_pos]; cos_t/sin_t [T, half] fp32 from rope_tables. interleave:
 * pairs (2j, 2j+1), else (j, j+half). Backward rotates gradients by the transpose. */
int gpu_rope_fwd(gpu_ctx *c, gpu_bf16 *x, int count, int stride, int per_pos, const int *pos,
                 const float *cos_t, const float *sin_t, int half, int interleave, dsv3_err *e);
int gpu_rope_bwd(gpu_ctx *c, gpu_bf16 *dx, int count, int stride, int per_pos, const int *pos,
                 const float *cos_t, const float *sin_t, int half, int interleave, dsv3_err *e);

/* h[r, j] = silu(g[r*ld + j]) * u[r*ld + j] for rows x cols (h has row length cols), so
 * g and u may be the two halves of one fused gate-up output (ld = 2*cols). Backward writes
 * d_g, d_u at the same places (overwrites). */
int gpu_swiglu_fwd(gpu_ctx *c, gpu_bf16 *h, const gpu_bf16 *g, const gpu_bf16 *u, int rows,
                   int cols, int ld, dsv3_err *e);
int gpu_swiglu_bwd(gpu_ctx *c, gpu_bf16 *d_g, gpu_bf16 *d_u, const gpu_bf16 *d_h,
                   const gpu_bf16 *g, const gpu_bf16 *u, int rows, int cols, int ld,
                   dsv3_err *e);

/* out[N,H] = table[ids[n]] (ids must lie in [0, V): the loader checks them). */
int gpu_embedding_fwd(gpu_ctx *c, gpu_bf16 *out, const gpu_bf16 *table, const int32_t *ids,
                      int N, int H, dsv3_err *e);
/* d_table[V,H] (fp32) += rows of d_out by id, without atomics: the tokens are sorted by id
 * (stable) and each id's rows summed in token order. Scratch from the arena. */
int gpu_embedding_bwd(gpu_ctx *c, float *d_table, const gpu_bf16 *d_out, const int32_t *ids,
                      int N, int H, int V, dsv3_err *e);

#ifdef __cplusplus
}
#endif

#endif
