/* optim: AdamW and the gradient norm over all parameters in a fixed number of launches.
 *
 * A gpu_tensor_list names every parameter once (fp32 master weights, fp32 gradients, bf16
 * moments, an optional bf16 working copy the forward pass reads) and is uploaded once; the
 * kernels then walk all tensors in 16K-element chunks, one block per chunk. The update is
 * torch.optim.AdamW's; gradients are scaled by min(1, clip / (norm + 1e-6)) first when a
 * device norm is given (torch's clip_grad_norm_), without the host ever reading the norm. */
#ifndef DSV3_OPTIM_H
#define DSV3_OPTIM_H

#include "gpuctx.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct gpu_tensor_list gpu_tensor_list;

/* n tensors; the arrays hold device pointers (param_bf16[i] may be NULL) and sizes;
 * decay[i] says whether weight decay applies (not to norms and biases, by custom). */
int gpu_tensor_list_create(gpu_ctx *c, gpu_tensor_list **out, int n, float *const *param,
                           float *const *grad, gpu_bf16 *const *m, gpu_bf16 *const *v,
                           gpu_bf16 *const *param_bf16, const int64_t *numel, const int *decay,
                           dsv3_err *e);
void gpu_tensor_list_destroy(gpu_tensor_list *l);

/* *d_norm (device float) = sqrt(sum of squares of every gradient), in a fixed order. */
int gpu_grad_norm(gpu_ctx *c, const gpu_tensor_list *l, float *d_norm, dsv3_err *e);

typedef struct gpu_adamw_hp {
    float lr, beta1, beta2, eps, weight_decay;
    float clip; /* max gradient norm; 0: no clipping */
    int step;   /* 1 for the first step (bias correction) */
} gpu_adamw_hp;

/* One AdamW step over every tensor; d_norm (device) from gpu_grad_norm, or NULL. */
int gpu_adamw_step(gpu_ctx *c, const gpu_tensor_list *l, const gpu_adamw_hp *hp,
                   const float *d_norm, dsv3_err *e);

#ifdef __cplusplus
}
#endif

#endif
