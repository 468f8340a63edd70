/* gep: expert parallelism on the GPU, the exchange of one MoE block's routed rows between
 * the ranks that route tokens and the ranks that hold their experts (lib/ep's layout: rank
 * r holds expert group r mod N), on device buffers.
 *
 * Forward of a block: the sender's rows are sorted by expert on the device (moe.h's plan);
 * their per-expert counts go to the host (one synchronising copy of E + 1 integers a block
 * and forward: the receive buffers are sized exactly from them) and are exchanged over the
 * job's host comm (lib/ep, an alltoallv of E/N integers a peer); the bf16 rows then travel
 * over NCCL (one alltoallv: grouped ncclSend/ncclRecv) or, where ranks share a GPU, through
 * host buffers on the host comm. The holder puts them expert-major (expert by expert,
 * sender by sender within), runs the grouped expert GEMMs of moe.h over its E/N experts,
 * and returns the outputs in arrival order; the sender combines them with its routing
 * weights as on one GPU. The received rows and SwiGLU activations stay in the context's
 * arena until the backward, which mirrors the exchange (output gradients out, input
 * gradients back; the held experts' weight gradients stay on the holder). The backward
 * reuses the forward's counts: no host wait.
 *
 * Before rows move in each block and pass, the ranks agree (a MAX over the host comm) that
 * none failed to get its buffers, so a rank out of arena memory stops every rank with a
 * message instead of leaving them waiting. Every call is collective over the job, in the
 * same block order on every rank.
 *
 * Under FP8 (gep_set_fp8) the held experts' products are moe_fp8's, quantised where the
 * single-GPU block quantises: fprop and dgrad per row (1x128 along the reduction), so a row
 * gives the same bits wherever it is computed; wgrad in 128-row token tiles from each held
 * expert's first row, over the rows of every sender in sender order: the tiles one GPU
 * makes for a micro-batch holding the senders' micro-batches one after the other. */
#ifndef DSV3_GEP_H
#define DSV3_GEP_H

#include <stdint.h>

#include "gpuctx.h"
#include "moe.h"

#ifdef __cplusplus
extern "C" {
#endif

struct ep;
struct comm;
struct gpu_moe_fp8;
typedef struct gep gep;

/* Exchange state for n_blocks MoE blocks (indexed like gmodel's blocks) of width H with
 * expert intermediate size mi. p: the job's lib/ep layout (its host comm carries the
 * counts); dev: a NCCL comm of the same job for the rows (NULL: rows through host buffers
 * on p's comm), its stream set to c's. */
int gep_create(gep **out, struct ep *p, struct comm *dev, gpu_ctx *c, int n_blocks, int H,
               int mi, dsv3_err *e);
void gep_destroy(gep *q);

/* The held experts' grouped GEMMs through m (kernels/moe_fp8.h): FP8 while m->on, bf16
 * otherwise, as the single-GPU MoE block runs them (gmodel passes its own; NULL: bf16).
 * m's scratch grows to the rows received, collectively checked like the arena buffers. */
void gep_set_fp8(gep *q, struct gpu_moe_fp8 *m);

/* Block blk's routed experts: xp [plan rows, H] (sorted by expert, moe.h's plan over the
 * E routed experts) to the holders, their outputs back into yp [plan rows, H] in the same
 * order. W1 [E/N, 2 mi, H], W2 [E/N, H, mi]: this rank's held experts (grouped layout). */
int gep_forward(gep *q, int blk, const gpu_moe_plan *plan, const gpu_bf16 *xp, gpu_bf16 *yp,
                const gpu_bf16 *W1, const gpu_bf16 *W2, dsv3_err *e);
/* Its backward: dyp [plan rows, H] (routing weights applied) to the holders, which add
 * their experts' weight gradients into dW1, dW2 (fp32, grouped layout) and return the rows'
 * input gradients into dxp (may be dyp). */
int gep_backward(gep *q, int blk, const gpu_bf16 *dyp, gpu_bf16 *dxp, const gpu_bf16 *W1,
                 const gpu_bf16 *W2, float *dW1, float *dW2, dsv3_err *e);

/* Rows block blk's held experts received in the last forward. */
int64_t gep_rows(const gep *q, int blk);

/* The rows' exchanges since the last call (synchronising): their count, the milliseconds
 * the NCCL (or host) all-to-alls took on the stream, and the bytes sent to other ranks. */
int gep_take_time(gep *q, int64_t *n, double *ms, double *bytes, dsv3_err *e);

#ifdef __cplusplus
}
#endif

#endif
