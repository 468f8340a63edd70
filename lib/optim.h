/* optim: AdamW with FP32 master weights and BF16 moments, and global-norm gradient clipping.
 *
 * Owns the optimizer state of one model: the two Adam moments of every trainable tensor,
 * stored as bfloat16 (uint16, rounded to nearest even as torch converts: DeepSeek-V3 keeps
 * its AdamW moments in BF16 and its master weights in FP32, report section 3.3.2), and the
 * update count t that drives bias correction. The parameters themselves are the model's
 * float array: they are the master weights.
 *
 * Which tensors decay is decided per tensor: 2-D tensors (linear weights, the embedding,
 * lm_head, the router) take weight decay; 1-D tensors (RMSNorm weights, biases) do not.
 * Tensors the model marks not trainable (e_score_correction_bias, moved by the balance rule)
 * get no moments and are never touched here. */
#ifndef DSV3_OPTIM_H
#define DSV3_OPTIM_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "model.h"

typedef struct optim_params {
    double beta1, beta2, eps, weight_decay;
} optim_params;

/* DeepSeek-V3's: beta1 0.9, beta2 0.95, eps 1e-8, weight decay 0.1. */
void optim_params_default(optim_params *p);

typedef struct optim {
    optim_params p;
    uint64_t t;        /* updates done */
    size_t n;          /* floats in the model's parameter array */
    uint16_t *m, *v;   /* [n] bf16 moments, same layout as the parameters (0 where unused) */
} optim;

int optim_init(optim *o, const dsv3_model *model, const optim_params *p, dsv3_err *e);
void optim_free(optim *o);

/* 1 if the tensor takes weight decay (2-D and trainable). */
int optim_decays(const model_tensor *t);

/* The L2 norm of the gradients of trainable tensors, accumulated in double. Inf or NaN when
 * a gradient is. */
double optim_grad_norm(const dsv3_model *m);

/* Scales the trainable gradients by max_norm / norm when norm > max_norm (norm as
 * optim_grad_norm returned it); returns the factor applied (1 when none). max_norm <= 0
 * turns clipping off. */
double optim_clip(dsv3_model *m, double norm, double max_norm);

/* One AdamW update with learning rate lr, from the model's gradients:
 *   m = bf16(b1 m + (1-b1) g);  v = bf16(b2 v + (1-b2) g^2)
 *   p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps) + lr * wd * p  (wd: decaying only)
 * The update reads the moments as stored (rounded), so the saved state is the whole state. */
void optim_step(optim *o, dsv3_model *m, double lr);

/* Optimizer state as safetensors: "NAME.exp_avg" and "NAME.exp_avg_sq" (BF16, the model
 * tensor's shape) for every trainable tensor, and "optim.step" (I64 [1]: t). Atomic. */
int optim_save(const optim *o, const dsv3_model *m, const char *path, dsv3_err *e);

/* Reads a file optim_save wrote for the same model layout; every trainable tensor's moments
 * must be present with the right shape. Restores t; the hyper-parameters stay those of o. */
int optim_load(optim *o, const dsv3_model *m, const char *path, dsv3_err *e);

#endif
