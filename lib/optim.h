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
 * get no moments and are never touched here.
 *
 * Sharded (ZeRO-1, lib/dp): an optimizer may own only the elements [lo, lo + n) of the flat
 * parameter array; its moments then cover that range alone and its update reads a gradient
 * of that range. Weight decay still follows the tensor each element belongs to. A single
 * process owns the whole array (lo 0, n = n_params), and its files name every tensor. */
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
    size_t lo, n;      /* the elements [lo, lo + n) of the model's parameter array it updates */
    uint16_t *m, *v;   /* [n] bf16 moments, same layout as the parameters (0 where unused) */
} optim;

/* The whole parameter array. */
int optim_init(optim *o, const dsv3_model *model, const optim_params *p, dsv3_err *e);
/* The elements [lo, hi) only (hi <= n_params). */
int optim_init_range(optim *o, const dsv3_model *model, const optim_params *p, size_t lo,
                     size_t hi, dsv3_err *e);
void optim_free(optim *o);

/* 1 if the tensor takes weight decay (2-D and trainable). */
int optim_decays(const model_tensor *t);

/* The L2 norm of the gradients of trainable tensors, accumulated in double. Inf or NaN when
 * a gradient is. */
double optim_grad_norm(const dsv3_model *m);

/* The sum of squares, in double, of g[0 .. hi-lo) where it holds the gradient of the
 * elements [lo, hi) of the parameter array, over the elements of trainable tensors, tensor
 * by tensor in the model's order (optim_grad_norm is the square root of it over the whole
 * array of grads). */
double optim_grad_sumsq(const dsv3_model *m, const float *g, size_t lo, size_t hi);

/* Scales the trainable gradients by max_norm / norm when norm > max_norm (norm as
 * optim_grad_norm returned it); returns the factor applied (1 when none). max_norm <= 0
 * turns clipping off. */
double optim_clip(dsv3_model *m, double norm, double max_norm);
/* The same on g, the gradient of the elements [lo, hi) (norm: the global one). */
double optim_clip_range(const dsv3_model *m, float *g, size_t lo, size_t hi, double norm,
                        double max_norm);

/* One AdamW update with learning rate lr, from the model's gradients:
 *   m = bf16(b1 m + (1-b1) g);  v = bf16(b2 v + (1-b2) g^2)
 *   p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps) + lr * wd * p  (wd: decaying only)
 * The update reads the moments as stored (rounded), so the saved state is the whole state. */
void optim_step(optim *o, dsv3_model *m, double lr);
/* The same update of o's range [lo, lo + n) of the parameters from g[0 .. n), the gradient
 * of that range (optim_step: g = the model's grads, whole array). */
void optim_step_grads(optim *o, dsv3_model *m, const float *g, double lr);

/* Optimizer state as safetensors: "NAME.exp_avg" and "NAME.exp_avg_sq" (BF16, the model
 * tensor's shape) for every trainable tensor, and "optim.step" (I64 [1]: t). Atomic. */
int optim_save(const optim *o, const dsv3_model *m, const char *path, dsv3_err *e);

/* Reads a file optim_save wrote for the same model layout; every trainable tensor's moments
 * must be present with the right shape. Restores t and the moments of o's range; the
 * hyper-parameters stay those of o. */
int optim_load(optim *o, const dsv3_model *m, const char *path, dsv3_err *e);

/* One rank's shard as safetensors: "optim.step" (I64 [1]), "optim.shard" (I64 [5]: rank,
 * world, n_params, lo, hi) and the flat moments of its range, "exp_avg" and "exp_avg_sq"
 * (BF16 [hi - lo]; 0 on elements of tensors that are not trainable). Atomic. */
int optim_save_shard(const optim *o, const dsv3_model *m, int rank, int world,
                     const char *path, dsv3_err *e);

/* Copies from a shard file the moments of the part of o's range it holds, after checking
 * it is shard `rank` of `world` of this model's layout; sets *covered to the elements of
 * o's range it held and restores t (which every shard of one checkpoint shares; a shard
 * whose step differs from *step when *step >= 0 is refused; *step is then set). */
int optim_load_shard(optim *o, const dsv3_model *m, const char *path, int rank, int world,
                     int64_t *step, size_t *covered, dsv3_err *e);

#endif
