/* attention: causal multi-head attention as fused flash-style kernels (bf16 operands on the
 * tensor cores, fp32 online softmax; the T x T matrix never exists in memory).
 *
 * Layouts as lib/ops attention_*: q, k [B,T,nh,dk]; v, out [B,T,nh,dv]; scores are
 * scale * q.k. Instead of the probabilities the forward keeps lse[B,nh,T] (fp32, the log of
 * each row's softmax denominator), from which backward recomputes them. dk and dv must be
 * multiples of 8 and at most 192 and 128 (MLA: 192 and 128; the smaller configs' 96/64 and
 * 24/16 are padded inside the kernel). */
#ifndef DSV3_ATTENTION_H
#define DSV3_ATTENTION_H

#include "gpuctx.h"

#ifdef __cplusplus
extern "C" {
#endif

int gpu_attention_fwd(gpu_ctx *c, gpu_bf16 *out, float *lse, const gpu_bf16 *q,
                      const gpu_bf16 *k, const gpu_bf16 *v, int B, int T, int nh, int dk,
                      int dv, float scale, dsv3_err *e);
/* Writes d_q, d_k, d_v (overwrites). Scratch (B*nh*T floats) from the arena. */
int gpu_attention_bwd(gpu_ctx *c, gpu_bf16 *d_q, gpu_bf16 *d_k, gpu_bf16 *d_v,
                      const gpu_bf16 *d_out, const gpu_bf16 *out, const float *lse,
                      const gpu_bf16 *q, const gpu_bf16 *k, const gpu_bf16 *v, int B, int T,
                      int nh, int dk, int dv, float scale, dsv3_err *e);

/* Attention masked by document: seg[B*T] (device, int32) numbers the document of each
 * token, non-decreasing along a sequence; query i then sees key j only when j <= i and
 * seg[j] == seg[i] (lib/ops attention_forward_seg / attention_backward_seg). seg NULL: the
 * plain causal kernels above, which call these. */
int gpu_attention_fwd_seg(gpu_ctx *c, gpu_bf16 *out, float *lse, const gpu_bf16 *q,
                          const gpu_bf16 *k, const gpu_bf16 *v, const int32_t *seg, int B,
                          int T, int nh, int dk, int dv, float scale, dsv3_err *e);
int gpu_attention_bwd_seg(gpu_ctx *c, gpu_bf16 *d_q, gpu_bf16 *d_k, gpu_bf16 *d_v,
                          const gpu_bf16 *d_out, const gpu_bf16 *out, const float *lse,
                          const gpu_bf16 *q, const gpu_bf16 *k, const gpu_bf16 *v,
                          const int32_t *seg, int B, int T, int nh, int dk, int dv, float scale,
                          dsv3_err *e);

/* Benchmarks only: picks the forward kernel variant. Head dim 192: 0, the default: two
 * 8-warp blocks an SM, Q re-read from shared memory, one K/V stage; 1: one 8-warp block an
 * SM, Q in registers, K/V double-buffered; 2: three 4-warp blocks an SM, Q in registers,
 * one K/V stage. Head dim 96: 0, the default: two 8-warp blocks an SM; 1 and 2: 4-warp
 * blocks, up to three an SM. */
void gpu_attention_set_variant(gpu_ctx *c, int fwd_variant);

#ifdef __cplusplus
}
#endif

#endif
