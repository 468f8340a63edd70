/* gmodel: the DeepSeek-V3 model of lib/model on the GPU, forward and backward, through the
 * kernels of this directory (bf16 operands, fp32 accumulation and weight gradients).
 *
 * The contract is lib/model's: the host dsv3_model keeps the fp32 master weights in its
 * flat array; gmodel_set_params uploads them (fp32 master on the device, for the router's
 * correction bias, and a bf16 compute copy of everything); gmodel_forward gives the mean
 * cross-entropy of the batch; gmodel_backward adds d(loss)/d(params) into fp32 device
 * gradients, which gmodel_get_grads copies into a host array of lib/model's flat layout
 * (m->grads), so the trainer's optimizer, clipping and ZeRO code run unchanged.
 *
 * Device layout: the flat layout, except that each MoE block's routed experts (stored per
 * expert as gate, up, down in lib/model) are regrouped as W1[E, 2*mi, H] (gate rows then up
 * rows per expert) followed by W2[E, H, mi] in the same region, which is the form the
 * grouped expert GEMMs of moe.h read and write. The conversion is done on the device when
 * parameters are set and gradients fetched.
 *
 * Activations live in the context's arena, laid out once at gmodel_create for B x T tokens;
 * nothing is allocated in forward or backward. The head's loss and gradient are taken in
 * one chunked pass during the forward (loss.h), its weight gradient held apart until
 * backward adds it (the trainer rescales accumulated gradients between the two).
 *
 * The whole loss of lib/model: the MTP modules' loss (mtp_lambda > 0: D modules, their
 * heads' gradients formed in the forward too), the sequence-wise balance loss
 * (balance_alpha > 0) of every MoE block that runs, documents packed in a sequence
 * (gmodel_set_segments: attention masked by document, positions restarting), and the
 * step's normalisers m->norm_main / norm_mtp / norm_seqs read at each forward, so the
 * gradients of a step's forwards add up exactly as lib/model's do. */
#ifndef DSV3_GMODEL_H
#define DSV3_GMODEL_H

#include <stdint.h>

#include "gpuctx.h"

#ifdef __cplusplus
extern "C" {
#endif

#include "../lib/model.h"

typedef struct gmodel gmodel;

/* Device state for model m (which must outlive it) and B sequences of T tokens on device
 * dev; makes its own context with an arena sized for the step. Parameters are uploaded. */
int gmodel_create(gmodel **out, const dsv3_model *m, int B, int T, int dev, dsv3_err *e);
/* gmodel_create with options (flags: GMODEL_* or'ed; 0 is gmodel_create). */
#define GMODEL_RECOMPUTE 1u /* RMSNorm outputs and MLA up-projections (q, kvb, k, v) are not
                             * kept per block but made again in backward (one shared set in
                             * the arena): less activation memory, the same gradients */
#define GMODEL_EP_ARENA 2u  /* the arena gmodel_ep_attach needs, even for a model holding
                             * every expert (one process, --ep 1: tests of kernels/gep) */
#define GMODEL_NONDET 4u    /* kernels whose sums vary run to run where they are faster:
                             * today the fused attention backward on document-masked
                             * batches (gpu_attention_set_nondet; head dims up to 96/64),
                             * its fp32 dQ accumulator reserved in the arena. Off: every
                             * step's bits repeat (resume equality, recompute's same bits) */
int gmodel_create_opt(gmodel **out, const dsv3_model *m, int B, int T, int dev, unsigned flags,
                      dsv3_err *e);
void gmodel_destroy(gmodel *g);
gpu_ctx *gmodel_ctx(gmodel *g);

/* FP8 on (GMODEL_FP8_ALL, GMODEL_FP8_PAYS) or off (0) for the linear layers: attention
 * projections, dense MLPs and shared experts run their three products as DeepSeek-V3 does
 * (kernels/fp8lin.h), the routed experts their grouped GEMMs (kernels/moe_fp8.h;
 * DSV3_MOE_FP8=0 in the environment keeps these bf16); the router, the head and the
 * embedding stay bf16. GMODEL_FP8_ALL: every linear layer whose shape the FP8 kernels take.
 * GMODEL_FP8_PAYS (dsv3-train --fp8): only those with min(in, out) >= GMODEL_FP8_MIN_DIM
 * (DSV3_FP8_MIN_DIM=N in the environment overrides; 0 = every layer): below it the FP8
 * products plus the quantisation of their operands were measured slower than the bf16
 * products (docs/PERF.md, "FP8 where it pays"), so those layers stay bf16. Expert weights'
 * codes are kept from one optimizer step to the next in both modes. */
enum { GMODEL_FP8_ALL = 1, GMODEL_FP8_PAYS = 2 };
#define GMODEL_FP8_MIN_DIM 1536
int gmodel_set_fp8(gmodel *g, int on, dsv3_err *e);
/* Under FP8: the least min(in, out) of a linear layer that runs in FP8 (0: every one); -1
 * with FP8 off. */
int gmodel_fp8_min_dim(const gmodel *g);
/* Under FP8: sets that least min(in, out) (0: every layer in FP8), after gmodel_set_fp8;
 * dsv3-train --fp8-min-dim. */
int gmodel_set_fp8_min_dim(gmodel *g, int min_dim);

/* Uploads params (m->params' layout, fp32) as master and bf16 compute copies. */
int gmodel_set_params(gmodel *g, const float *params, dsv3_err *e);

/* Forward over ids [B*T] (host); with targets (host, < 0 ignored) *loss is the mean
 * cross-entropy. grad: keep what gmodel_backward needs (the head's gradient is formed
 * here). With loss NULL nothing waits for the device: the per-row losses are summed on
 * the device instead (and, with grad, the expert loads), for gmodel_take_stats. */
int gmodel_forward(gmodel *g, const int32_t *ids, const int32_t *targets, int grad,
                   float *loss, dsv3_err *e);
/* Documents packed in each sequence for the next forwards, as model_acts_set_segments
 * (segment[N] non-decreasing along a sequence, NULL: one document; position[N] in 0..T-1,
 * NULL: 0..T-1). Error (nothing changed) on a bad position or a decreasing number. */
int gmodel_set_segments(gmodel *g, const int32_t *segment, const int32_t *position,
                        dsv3_err *e);

/* The losses of the last forward with targets, as model_acts_losses (main, mtp, mtp_k,
 * balance, total = what gmodel_backward differentiates). */
void gmodel_losses(const gmodel *g, model_losses *out);

/* MTP module k's block's load in the last forward (model_mtp_expert_load): counts[E] and
 * *slots over its rows with a real t_{i+k}. Returns 1 when the module did not run or its
 * block is dense, -1 on a device error. */
int gmodel_mtp_expert_load(gmodel *g, int k, int64_t *counts, int64_t *slots, dsv3_err *e);

/* Adds d(total loss)/d(params) of the last forward (which had targets and grad) into the
 * device gradients. Queued only: a fault shows at the next synchronising call. */
int gmodel_backward(gmodel *g, dsv3_err *e);
/* Reads and clears the sums since the last call (one synchronising read): *loss_sum, the
 * sum of the per-row cross-entropies of the forwards given no loss pointer; loads (NULL to
 * skip) [num_hidden_layers][n_routed_experts], the tokens each expert took in the forwards
 * with grad (0 for dense layers). */
int gmodel_take_stats(gmodel *g, double *loss_sum, int64_t *loads, dsv3_err *e);

int gmodel_zero_grad(gmodel *g, dsv3_err *e);
int gmodel_scale_grads(gmodel *g, float f, dsv3_err *e);
/* Writes the device gradients into grads (host, m->grads' layout). */
int gmodel_get_grads(gmodel *g, float *grads, dsv3_err *e);

/* Uploads params[off, off+n) (host, flat layout) into the master and compute copies: for
 * tensors outside the expert regions (the correction biases the balance rule moves). */
int gmodel_set_range(gmodel *g, const float *params, size_t off, size_t n, dsv3_err *e);

/* The optimizer on the device, for one process: AdamW over the fp32 master weights on the
 * device with bf16 moments (lib/optim's m and v, flat layout [n_params], uploaded here),
 * refreshing the bf16 compute copy in the same pass (optim.h). Decay: 2-D tensors, as
 * optim_decays. After gmodel_optim_init the device holds the training state; the host
 * arrays are brought up to date only by gmodel_sync_host (checkpoints). */
int gmodel_optim_init(gmodel *g, const uint16_t *m, const uint16_t *v, dsv3_err *e);
/* *norm = the L2 norm of the trainable gradients (kept on the device for clipping). */
int gmodel_grad_norm(gmodel *g, float *norm, dsv3_err *e);
/* One AdamW step, step counting from 1 (clip > 0: gradients scaled by
 * min(1, clip/(norm + 1e-6)) with the norm of the last gmodel_grad_norm). (kernels/optim.h
 * is not included here: its guard name is lib/optim.h's.) */
int gmodel_adamw(gmodel *g, float lr, float beta1, float beta2, float eps, float weight_decay,
                 float clip, int step, dsv3_err *e);
/* Master weights and moments (when the device optimizer is on) to the host arrays. */
int gmodel_sync_host(gmodel *g, float *params, uint16_t *m, uint16_t *v, dsv3_err *e);

/* ---- data parallelism on device buffers (lib/dp's bucketed layout; lib/train.c) ----
 * The trainer reduce-scatters each bucket of gradients on a communication stream as soon as
 * the backward has finished it, AdamW runs over this rank's shard, the master weights are
 * all-gathered in place and the compute copy refreshed. */

/* Called by gmodel_backward (when set) after the head and final norm (point 0), after
 * block l (point nl - l) and after the embedding (point nl + 1), with the work queued on
 * the compute stream; the gradients of [pts[point], n) are then final once that work runs. */
typedef int (*gmodel_bwd_hook)(void *ctx, int point, dsv3_err *e);
void gmodel_set_bwd_hook(gmodel *g, gmodel_bwd_hook fn, void *ctx);
/* The nl + 2 ready points of the hook, descending offsets ending with 0; returns nl + 2. */
int gmodel_ready_points(const gmodel *g, size_t *pts);
/* The sharded device optimizer (instead of gmodel_optim_init): master and gradients padded
 * to n_pad; the shard's summed gradient and bf16 moments ([shard]); span i holds device
 * elements [dev[i], dev[i]+len[i]) at shard offset sh[i]; moments taken from m, v (flat
 * layout, whole array; NULL: zero). gmodel_grad_norm then gives the shard's norm and
 * gmodel_adamw updates the shard (clipping by the norm set with gmodel_set_grad_norm). */
int gmodel_dp_init(gmodel *g, size_t n_pad, size_t shard, int ns, const size_t *dev,
                   const size_t *sh, const size_t *len, const uint16_t *m, const uint16_t *v,
                   dsv3_err *e);
void *gmodel_stream(gmodel *g);       /* the compute stream (cudaStream_t) */
void *gmodel_dp_stream(gmodel *g);    /* the communication stream */
float *gmodel_dev_grads(gmodel *g);   /* [n_pad], device layout */
float *gmodel_dev_master(gmodel *g);  /* [n_pad], device layout */
float *gmodel_dp_gshard(gmodel *g);   /* [shard] */
void *gmodel_dp_moment(gmodel *g, int which);  /* 0: m, 1: v; bf16 [shard] */
/* Scales the device gradients [lo, hi) on the compute stream. */
int gmodel_scale_range(gmodel *g, size_t lo, size_t hi, float f, dsv3_err *e);
/* The communication stream waits for the compute stream's work so far (fence), or the
 * compute stream for the communication stream's (join). */
int gmodel_dp_fence(gmodel *g, dsv3_err *e);
int gmodel_dp_join(gmodel *g, dsv3_err *e);
int gmodel_set_grad_norm(gmodel *g, float norm, dsv3_err *e);
/* The bf16 compute copy from the master weights (after their all-gather). */
int gmodel_refresh_bf16(gmodel *g, dsv3_err *e);
/* A device buffer in the device layout to the host in the flat layout (es: 2 or 4). */
int gmodel_download_flat(gmodel *g, void *host, const void *dev, size_t es, dsv3_err *e);
void *gmodel_dev_alloc(size_t bytes, dsv3_err *e);

/* ---- expert parallelism (kernels/gep.h): m holds one expert group (model_init_ep) ----
 * gmodel_ep_attach gives the MoE blocks the job's layout p (lib/ep, its host comm carries
 * the counts) and a NCCL comm dev for the rows (NULL: through host buffers on p's comm);
 * every forward and backward is then collective over the job. */
struct ep;
struct comm;
int gmodel_ep_attach(gmodel *g, struct ep *p, struct comm *dev, dsv3_err *e);
/* model_ep_idle: a forward (and backward) serving the held experts without rows of this
 * rank's own; mtp: the MTP modules run in the other ranks' forwards. */
int gmodel_ep_idle(gmodel *g, int mtp, int backward, dsv3_err *e);
/* Rows block blk's held experts received in the last forward (0 without --ep). */
int64_t gmodel_ep_rows(const gmodel *g, int blk);
/* The row exchanges since the last call: count, stream milliseconds, bytes to other ranks. */
int gmodel_ep_take_time(gmodel *g, int64_t *n, double *ms, double *bytes, dsv3_err *e);
/* 1 when the routed experts' grouped GEMMs run in FP8 (gmodel_set_fp8 without
 * DSV3_MOE_FP8=0, and one of the two expert shapes at or above its min(in, out)), on one
 * GPU and, under gmodel_ep_attach, on the holders. */
int gmodel_moe_fp8(const gmodel *g);

/* Per-expert token counts of MoE layer l in the last forward (lib/model's
 * model_expert_load); -1 for a dense layer or before a forward. */
int gmodel_expert_load(const gmodel *g, int l, int64_t *counts);

/* The last forward's per-token cross-entropy (-log p(target); 0 where target < 0), [B*T],
 * as gmodel_forward read it back. -1 before a forward with targets and a loss pointer. */
int gmodel_row_losses(const gmodel *g, float *out);

/* Bytes of the arena the last step reached (activation memory). */
size_t gmodel_arena_peak(const gmodel *g);

#ifdef __cplusplus
}
#endif

#endif
