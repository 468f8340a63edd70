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
void gmodel_destroy(gmodel *g);
gpu_ctx *gmodel_ctx(gmodel *g);

/* Uploads params (m->params' layout, fp32) as master and bf16 compute copies. */
int gmodel_set_params(gmodel *g, const float *params, dsv3_err *e);

/* Forward over ids [B*T] (host); with targets (host, < 0 ignored) *loss is the mean
 * cross-entropy. grad: keep what gmodel_backward needs (the head's gradient is formed
 * here). */
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
 * device gradients. */
int gmodel_backward(gmodel *g, dsv3_err *e);

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

/* Per-expert token counts of MoE layer l in the last forward (lib/model's
 * model_expert_load); -1 for a dense layer or before a forward. */
int gmodel_expert_load(const gmodel *g, int l, int64_t *counts);

/* The last forward's per-token cross-entropy (-log p(target); 0 where target < 0), [B*T],
 * as gmodel_forward read it back. -1 before a forward with targets. */
int gmodel_row_losses(const gmodel *g, float *out);

/* Bytes of the arena the last step reached (activation memory). */
size_t gmodel_arena_peak(const gmodel *g);

#ifdef __cplusplus
}
#endif

#endif
