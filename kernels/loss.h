/* loss: cross-entropy over a large vocabulary, chunked over rows so that a whole batch's
 * logits are never in memory at once. All pointers are device memory. */
#ifndef DSV3_LOSS_H
#define DSV3_LOSS_H

#include "gpuctx.h"

#ifdef __cplusplus
extern "C" {
#endif

/* For each of R rows of logits[R,V] (fp32): losses[r] = logsumexp - logit[target] (0 when
 * target < 0); d_logits[R,V] (bf16, may be NULL) = (softmax - onehot) * scale, 0 for
 * ignored rows (lib/ops crossentropy_forward + crossentropy_backward in one pass). */
int gpu_crossentropy_rows(gpu_ctx *c, float *losses, gpu_bf16 *d_logits, const float *logits,
                          const int32_t *targets, int R, int V, float scale, dsv3_err *e);

/* The same through a chosen kernel: GPU_CE_CLUSTER (a cluster of 8 blocks a row, the row
 * held in registers: one read of the logits; V even and at most 131072, else the general
 * kernel runs), GPU_CE_ROWS (one block a row, two reads), GPU_CE_AUTO (the cluster kernel;
 * DSV3_CE_KERNEL=1 picks the general one, for timings). gpu_crossentropy_rows is AUTO. */
enum { GPU_CE_AUTO = -1, GPU_CE_CLUSTER = 0, GPU_CE_ROWS = 1 };
int gpu_crossentropy_rows_variant(gpu_ctx *c, int variant, float *losses, gpu_bf16 *d_logits,
                                  const float *logits, const int32_t *targets, int R, int V,
                                  float scale, dsv3_err *e);

/* Rows per chunk of gpu_lm_head_loss for N rows of a V vocabulary: as many as fit
 * GPU_HEAD_CHUNK_BYTES of chunk scratch (V * 6 bytes a row), a multiple of 64, at most N
 * (DSV3_HEAD_CHUNK=rows overrides, for timings). Larger chunks cut the head's weight
 * gradient traffic: each chunk reads and writes the fp32 V x H gradient once. */
#define GPU_HEAD_CHUNK_BYTES ((size_t)3 << 30)
int gpu_lm_head_chunk_rows(int N, int V);

/* The output head and its loss: logits = hidden[N,H] . w[V,H]^T, computed chunk_rows rows
 * at a time (fp32, from the arena), each chunk's loss and gradient taken at once:
 * losses[N]; d_hidden[N,H] = d_logits . w (written, may be NULL); d_w[V,H] += d_logits^T .
 * hidden (fp32, may be NULL). Arena use: chunk_rows * V * 6 bytes. */
int gpu_lm_head_loss(gpu_ctx *c, float *losses, gpu_bf16 *d_hidden, float *d_w,
                     const gpu_bf16 *hidden, const gpu_bf16 *w, const int32_t *targets, int N,
                     int H, int V, float scale, int chunk_rows, dsv3_err *e);

#ifdef __cplusplus
}
#endif

#endif
