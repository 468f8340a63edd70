/* model: the DeepSeek-V3 transformer on the CPU: parameter layout, checkpoint I/O,
 * forward, loss and backward, in float32.
 *
 * Owns all parameters in one array (and their gradients in a second of the same layout),
 * named as HF checkpoints name them, so a folder written by transformers' save_pretrained
 * loads here and one written here loads there. The forward is the architecture of
 * DESIGN.md: embedding; per layer RMSNorm, MLA (q optionally through a LoRA-style
 * compression, a shared compressed KV latent, RoPE on a 64-dim slice in DeepSeek's rotary
 * layout, YaRN's mscale in the softmax scale), RMSNorm, dense SwiGLU for the first
 * first_k_dense_replace layers and DeepSeekMoE (sigmoid router with the selection-only
 * correction bias, group-limited top-k, shared experts) after; final RMSNorm, lm_head,
 * cross-entropy. Every step calls the reference ops of lib/ops.h, which GPU kernels are
 * tested against.
 *
 * Not here yet: the MTP modules (their tensors in a checkpoint are skipped on load), the
 * sequence-wise balance loss, threads. */
#ifndef DSV3_MODEL_H
#define DSV3_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "err.h"

typedef struct model_tensor {
    char name[96];
    int ndim;
    int64_t shape[2];
    size_t off;        /* into params / grads, in floats */
    int64_t numel;
    int trainable;     /* 0 for e_score_correction_bias, which the balance rule updates */
} model_tensor;

/* Pointers into params (or grads) for one decoder layer; unused ones are NULL. */
typedef struct model_layer {
    float *input_layernorm, *post_attention_layernorm;
    float *q_proj;                    /* q_lora_rank == 0 */
    float *q_a_proj, *q_a_layernorm, *q_b_proj;
    float *kv_a_proj, *kv_a_layernorm, *kv_b_proj, *o_proj;
    float *gate_proj, *up_proj, *down_proj;  /* dense layers */
    float *router, *router_bias;             /* mlp.gate.weight, .e_score_correction_bias */
    float **e_gate, **e_up, **e_down;        /* [n_routed_experts] */
    float *s_gate, *s_up, *s_down;           /* shared experts, fused as HF stores them */
} model_layer;

typedef struct model_weights {
    float *embed, *final_norm, *lm_head;
    model_layer *layers;  /* num_hidden_layers */
} model_weights;

typedef struct dsv3_model {
    dsv3_config cfg;      /* owned copy (its json referenced) */
    model_tensor *t;
    int n_t;
    size_t n_params;
    float *params, *grads;
    model_weights w, g;   /* views of params and grads */
} dsv3_model;

/* Lays out the parameters of c (without the MTP modules) and allocates them: linear
 * weights zero, norm weights one. grads are allocated too, zero. */
int model_init(dsv3_model *m, const dsv3_config *c, dsv3_err *e);

/* Seeded normal initialisation of every linear weight and the embedding with std (the
 * config's initializer_range when std <= 0); norms one, correction biases zero. */
void model_init_random(dsv3_model *m, uint64_t seed, double std);

/* Reads DIR/config.json and DIR/model.safetensors (or the shards listed in
 * DIR/model.safetensors.index.json). Every tensor of the layout must be present with its
 * shape (F32, BF16 or F16); tensors of the MTP layer (index num_hidden_layers) are skipped;
 * any other unknown tensor is an error. */
int model_load(dsv3_model *m, const char *dir, dsv3_err *e);

/* Writes DIR/config.json and DIR/model.safetensors (F32). DIR is created if missing. */
int model_save(const dsv3_model *m, const char *dir, dsv3_err *e);

void model_free(dsv3_model *m);

const model_tensor *model_find(const dsv3_model *m, const char *name);

void model_zero_grad(dsv3_model *m);

/* Activations of one forward pass over B sequences of T tokens, kept for backward. */
typedef struct model_acts model_acts;

model_acts *model_acts_new(const dsv3_model *m, int B, int T, dsv3_err *e);
void model_acts_free(model_acts *a);

/* Logits [B*T, vocab] of the last forward. */
const float *model_acts_logits(const model_acts *a);
/* The hidden state entering layer l (l = num_hidden_layers: after the last layer, before
 * the final norm): [B*T, hidden]. */
const float *model_acts_hidden(const model_acts *a, int l);

/* When set, the next forwards reuse the expert choices of the last one (weights are still
 * recomputed): makes the loss a smooth function of the parameters for gradient checks. */
void model_acts_freeze_routing(model_acts *a, int on);

/* Forward over ids [B*T]; with targets (target < 0 ignored), *loss = mean cross-entropy over
 * the used targets (as transformers' loss with labels shifted by one). targets may be NULL. */
int model_forward(dsv3_model *m, model_acts *a, const int32_t *ids, const int32_t *targets,
                  float *loss, dsv3_err *e);

/* Adds d(loss)/d(params) of the last forward (which needs targets) into m->grads. */
int model_backward(dsv3_model *m, model_acts *a, const int32_t *ids, const int32_t *targets,
                   dsv3_err *e);

/* Per-expert load of MoE layer l in the last forward: counts[E] = tokens routed to each.
 * Returns -1 for a dense layer. */
int model_expert_load(const dsv3_model *m, const model_acts *a, int l, int64_t *counts);

/* Auxiliary-loss-free balancing (V3 report, section 2.1.2): after a step, every MoE layer's
 * correction bias moves by gamma against its load, b_i += gamma * sign(mean load - load_i).
 * Uses the routing of the last forward. */
void model_balance_update(dsv3_model *m, const model_acts *a, float gamma);

#endif
