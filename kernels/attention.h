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
/* Writes d_q, d_k, d_v (overwrites). Scratch from the arena: gpu_attention_bwd_arena_bytes. */
int gpu_attention_bwd(gpu_ctx *c, gpu_bf16 *d_q, gpu_bf16 *d_k, gpu_bf16 *d_v,
                      const gpu_bf16 *d_out, const gpu_bf16 *out, const float *lse,
                      const gpu_bf16 *q, const gpu_bf16 *k, const gpu_bf16 *v, int B, int T,
                      int nh, int dk, int dv, float scale, dsv3_err *e);

/* Attention masked by document: seg[B*T] (device, int32) numbers the document of each
 * token, non-decreasing along a sequence; query i then sees key j only when j <= i and
 * seg[j] == seg[i] (lib/ops attention_forward_seg / attention_backward_seg). seg NULL: the
 * plain causal kernels above, which call these. The same kernels as without seg (wgmma on
 * Hopper, variant 3's forward then variant 0's), with the mask added: key tiles before a
 * query tile's first document and query tiles past a key tile's last one are skipped, and
 * tiles that lie in one document take only the causal mask. */
int gpu_attention_fwd_seg(gpu_ctx *c, gpu_bf16 *out, float *lse, const gpu_bf16 *q,
                          const gpu_bf16 *k, const gpu_bf16 *v, const int32_t *seg, int B,
                          int T, int nh, int dk, int dv, float scale, dsv3_err *e);
int gpu_attention_bwd_seg(gpu_ctx *c, gpu_bf16 *d_q, gpu_bf16 *d_k, gpu_bf16 *d_v,
                          const gpu_bf16 *d_out, const gpu_bf16 *out, const float *lse,
                          const gpu_bf16 *q, const gpu_bf16 *k, const gpu_bf16 *v,
                          const int32_t *seg, int B, int T, int nh, int dk, int dv, float scale,
                          dsv3_err *e);

/* Reproducibility of the backward on ctx c. 0, the default: every kernel sums in a fixed
 * order, so the same inputs give the same bits run after run. 1: document-masked calls (seg
 * not NULL) of head dims above 32/32 up to 96/64 on compute capability 9.x take the fused
 * backward (attention_fa.cuh: dQ summed by fp32 atomics in an arena buffer, so its last
 * bits vary run to run), 22% faster than the two-kernel one on the 1B-class MoE's packed
 * documents (H200, docs/PERF.md); causal calls keep the two-kernel backward, which is faster
 * there. DSV3_ATTN_BWD in the environment overrides both (timings). */
void gpu_attention_set_nondet(gpu_ctx *c, int nondet);
/* The most arena gpu_attention_bwd_seg takes on a context set to nondet: a float per row
 * (B*nh*T), and with nondet 1 and head dims the fused backward takes, its fp32 dQ
 * accumulator (B*T*nh*dk floats), each rounded up to the arena's 256-byte pieces. */
size_t gpu_attention_bwd_arena_bytes(int B, int T, int nh, int dk, int dv, int nondet);

/* Benchmarks and tests only: picks the kernels. 0, the default: on compute capability 9.x
 * the warp-specialised TMA forward (attention_ws.cuh; head dim 96 kept) and the wgmma
 * backward for head dims above 32, elsewhere as 1. 6: on 9.x the wgmma forward that was the
 * default before (the same bits as 0), with the same backward. 4, 5: the warp-specialised
 * forward with head dim 96 padded to 128 (4) or kept (5, as 0). 1: the
 * mma.sync kernels (head dim 192: two 8-warp blocks an SM, Q re-read from shared memory;
 * 96: two 8-warp blocks an SM). 2: mma.sync forward with 4-warp blocks (three an SM), the
 * mma.sync backward. 3: on 9.x, the pipelined wgmma forward (key tiles of 64, the next
 * tile's S issued before this tile's softmax) with the wgmma backward. Head dims up to 32
 * always take the mma.sync kernels. */
void gpu_attention_set_variant(gpu_ctx *c, int fwd_variant);

#ifdef __cplusplus
}
#endif

#endif
