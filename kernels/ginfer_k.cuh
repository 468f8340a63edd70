/* ginfer_k: the kernels of kernels/ginfer (C++ only): launchers on a stream, each returning 0
 * or -1 with a message. Weights are bf16 or, with wf32, fp32 (void pointers); activations
 * fp32; the cache bf16 or, with cf32, fp32. All pointers are device memory. Every row's
 * results are summed in an order that does not depend on the other rows or on N. */
#ifndef DSV3_GINFER_K_CUH
#define DSV3_GINFER_K_CUH

#include <cuda_runtime.h>
#include <stdint.h>

#include "../lib/err.h"

/* x[N,H] = table[ids[n]]. */
int gk_embed(cudaStream_t s, float *x, const void *table, int wf32, const int32_t *ids, int N,
             int H, dsv3_err *e);
/* x += delta (delta may be NULL), then out = w * x * rstd(x) per row of D. */
int gk_add_norm(cudaStream_t s, float *x, const float *delta, const float *w, float *out, int N,
                int D, float eps, dsv3_err *e);
/* For b < batch: y[b][n][o] = sum_i x[b][n][i] w[b][o][i], with row n of x at
 * x + b*xbs + n*ldx, weight row o at w + b*wbs + o*I, y at y + b*ybs + n*ldy + o.
 * I a multiple of 8; x rows 16-byte aligned. */
int gk_gemv(cudaStream_t s, const float *x, long ldx, long xbs, const void *w, int wf32, long wbs,
            float *y, long ldy, long ybs, int N, int I, int O, int batch, dsv3_err *e);
/* From kva[N, kv+rope]: c_kv = norm(kva[:kv]) (weight w), k_pe = rope(kva[kv:]), stored at
 * cache + (slot[n]*n_ctx + pos[n]) * (kv+rope) (one layer's cache); and RoPE (lib/ops
 * rope_forward) on the q_pe part (from nope) of every head of q[N, nh, qk] in place. */
int gk_kv_write(cudaStream_t s, const float *kva, const float *w, void *cache, int cf32,
                const int *slot, const int *pos, int N, int kv, int rope, int n_ctx,
                const float *cos_t, const float *sin_t, int interleave, float eps, float *q,
                int nh, int qk, int nope, dsv3_err *e);
/* Buckets the NK expert choices idx[NK] by expert (stable): off[E+1], order[sorted] = a,
 * spos[a] = sorted position. E <= 1024. */
int gk_moe_bucket(cudaStream_t s, const int32_t *idx, int NK, int E, int *off, int *order,
                  int *spos, dsv3_err *e);
/* Gate-up-SwiGLU over groups: group g's weights w1 + g*w1_stride ([2F, H]: gate rows then up
 * rows). With order: group g owns sorted rows off[g]..off[g+1]-1, whose input is
 * x[order[j] / K]; h row j (sorted) = silu(gate) * up. Without: one group of N rows, h[n]
 * from x[n]. rows_hint: the most rows a group can have (picks the tile). */
int gk_ffn_up(cudaStream_t s, const float *x, const void *w1, int wf32, long w1_stride, float *h,
              const int *order, const int *off, int K, int groups, int N, int rows_hint, int H,
              int F, dsv3_err *e);
/* Down projection over the same groups: y row j = w2_g [H, F] . h row j. */
int gk_ffn_down(cudaStream_t s, const float *h, const void *w2, int wf32, long w2_stride,
                float *y, const int *off, int groups, int N, int rows_hint, int F, int H,
                dsv3_err *e);
/* out[n] = sum_k rw[n*K+k] * ye[spos[n*K+k]] (k in order), + ys[n] when ys. */
int gk_moe_combine(cudaStream_t s, float *out, const float *ye, const float *rw,
                   const int *spos, const float *ys, int N, int K, int H, dsv3_err *e);
/* out[k] = x[rows[k]] for k < n (rows of D floats). */
int gk_gather_rows(cudaStream_t s, float *out, const float *x, const int *rows, int n, int D,
                   dsv3_err *e);

/* decode_attn.cu: absorbed MLA attention over one layer's latent cache.
 * qlat[N, nh, kv] (q_nope through W_uk), q[N, nh, qk] (q_pe at nope..qk, rotated); row n
 * sees positions 0..pos[n] of slot slot[n]. Each sequence is cut into nsplit parts; part
 * results (max, sum, weighted latents: pm, pl [N*nh*nsplit], pacc [N*nh*nsplit*kv]) are
 * combined into olat[N, nh, kv]. The split count changes the rounding, so callers keep it
 * fixed for a given n_ctx. gk_attn_setup (outside any capture) allows the shared memory. */
int gk_attn_setup(int cf32, int nh, int kv, int rope, dsv3_err *e);
int gk_attn(cudaStream_t s, float *olat, float *pm, float *pl, float *pacc, const float *qlat,
            const float *q, int qk, int nope, const void *cache, int cf32, const int *slot,
            const int *pos, int N, int nh, int kv, int rope, int n_ctx, int nsplit, float scale,
            dsv3_err *e);

#endif
