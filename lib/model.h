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
 * Multi-Token Prediction (V3 report, section 2.2): the config's num_nextn_predict_layers (D)
 * modules live at layer indices num_hidden_layers + k, named as DeepSeek's released
 * checkpoint names them (enorm, hnorm, eh_proj, one transformer block, shared_head.norm).
 * Module k (1-based) at position i takes h^{k-1}_i (the main model's last hidden state
 * before model.norm for k = 1, else module k-1's output) and the embedding of t_{i+k}:
 * h' = eh_proj [enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)] (embedding first, as the released
 * weights are used by vLLM/SGLang), runs the block, and predicts t_{i+k+1} through
 * shared_head.norm and the main lm_head. Embedding and head are the main model's; the
 * released checkpoint also stores copies of them under the MTP layer's index
 * (embed_tokens, shared_head.head), which model_save writes and model_load accepts and
 * ignores.
 *
 * Auxiliary losses are options of the model (fields below, zero = off): the MTP loss
 * lambda/D * sum_k CE_k, and the sequence-wise balance loss alpha * sum_i f_i P_i (report
 * eq. 17-20) of every MoE block that runs (MTP module k's over the T - k tokens it sees),
 * averaged over the B sequences and summed over blocks. model_forward's *loss stays the main
 * cross-entropy; model_acts_losses gives the parts and the total, which model_backward
 * differentiates. A trainer that accumulates forwards sets the norm_* fields so that each
 * forward's parts are sums divided by the whole step's counts instead of its own means.
 *
 * Expert parallelism (model_init_ep, the ep_* fields): a model may hold one group of every
 * MoE block's routed experts; its forward and backward then exchange the routed rows with
 * the ranks holding the others (lib/ep), computing the same function as the whole model.
 *
 * The matmuls, attention heads and cross-entropy rows run on OpenMP threads; every output
 * element is summed in the same order whatever the thread count, so results are bitwise
 * the same as on one thread (tests/unit/test_model.c checks it). */
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
    int expert;        /* routed expert index of an expert's tensor, else -1 */
    uint64_t draw0;    /* normals model_init_random draws before this tensor in the whole
                          model's order (the same for every expert-parallel layout) */
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

/* One MTP module: its norms, projection, transformer block and head norm. */
typedef struct model_mtp {
    float *enorm, *hnorm, *eh_proj;  /* eh_proj [H, 2H] */
    model_layer block;
    float *head_norm;                /* shared_head.norm.weight */
} model_mtp;

typedef struct model_weights {
    float *embed, *final_norm, *lm_head;
    model_layer *layers;  /* num_hidden_layers */
    model_mtp *mtp;       /* num_nextn_predict_layers, NULL when 0 */
} model_weights;

typedef struct dsv3_model {
    dsv3_config cfg;      /* owned copy (its json referenced) */
    model_tensor *t;
    int n_t;
    size_t n_params;
    float *params, *grads;
    model_weights w, g;   /* views of params and grads */
    /* Options, zero = off; set after model_init/model_load, read by forward and backward. */
    float mtp_lambda;     /* weight of the MTP loss (V3: 0.3, later 0.1); needs D > 0 */
    float balance_alpha;  /* weight of the sequence-wise balance loss (V3: 0.0001) */
    /* The normalisers of an accumulated step (0 / NULL = those of the forward itself): with
     * them, each forward's losses are sums over its part divided by counts of the whole
     * step, so the gradients of a step's forwards add up to the gradient of the step's
     * loss however it is grouped into forwards and ranks (model_count_targets). */
    int64_t norm_main;          /* main counted targets of the step */
    const int64_t *norm_mtp;    /* [D]: MTP module k's counted targets of the step */
    int64_t norm_seqs;          /* sequences of the step (the balance loss's mean) */
    /* Expert parallelism (lib/ep, model_init_ep): with ep_size > 1 the model holds only
     * expert group ep_group (experts [ep_group * E/ep_size, ...)) of every MoE layer; its
     * parameter array is then the replicated part [0, n_dense) (every tensor but the routed
     * experts, in checkpoint order) followed by the group's experts [n_dense, n_params).
     * The tensor table lists the held tensors only. ep (set by the trainer) exchanges the
     * routed rows with the ranks holding the other groups; forwards and backwards are then
     * collective over the job. ep_size 1: everything held, n_dense = n_params. */
    int ep_size, ep_group;
    size_t n_dense;
    struct ep *ep;
    /* Node-limited routing (0 = off, the config's group rule): experts cut into route_nodes
     * contiguous groups ("nodes"), a token's experts within the route_limit best nodes, a
     * node scored by the sum of its k / route_limit best biased affinities (V3, M = 4).
     * Replaces the config's n_group/topk_group rule, which is this rule with a top of 2. */
    int route_nodes, route_limit;
} dsv3_model;

/* Lays out the parameters of c (with its MTP modules) and allocates them: linear
 * weights zero, norm weights one. grads are allocated too, zero. */
int model_init(dsv3_model *m, const dsv3_config *c, dsv3_err *e);

/* model_init holding only expert group `group` of `size` (see ep_size above). */
int model_init_ep(dsv3_model *m, const dsv3_config *c, int size, int group, dsv3_err *e);

/* Seeded normal initialisation of every linear weight and the embedding with std (the
 * config's initializer_range when std <= 0); norms one, correction biases zero. */
void model_init_random(dsv3_model *m, uint64_t seed, double std);

/* Reads DIR/config.json and DIR/model.safetensors (or the shards listed in
 * DIR/model.safetensors.index.json). Every tensor of the layout must be present with its
 * shape (F32, BF16 or F16, or FP8 E4M3 as DeepSeek releases and dsv3-quant writes: a 2-D
 * F8_E4M3 tensor NAME with an F32 NAME_scale_inv of one scale per 128x128 block, in any
 * of the folder's files, dequantized to f32(q) * scale by lib/fp8), the MTP modules'
 * included when the config has them; the MTP layers' copies of the embedding and head are
 * checked for shape and otherwise ignored. Any other unknown tensor (a NAME_scale_inv
 * without an FP8 NAME included) is an error, as is a missing or misshaped scale. */
int model_load(dsv3_model *m, const char *dir, dsv3_err *e);

enum {
    MODEL_LOAD_NO_MTP = 1,  /* skip the MTP modules' tensors and set D to 0 (inference) */
};
/* model_load with MODEL_LOAD_* flags. */
int model_load_flags(dsv3_model *m, const char *dir, int flags, dsv3_err *e);

/* model_load_flags holding expert group `group` of `size`: the other groups' tensors in
 * DIR are skipped (shape unchecked). */
int model_load_ep(dsv3_model *m, const char *dir, int flags, int size, int group,
                  dsv3_err *e);

/* Writes DIR/config.json and DIR/model.safetensors (F32). DIR is created if missing; a
 * stale model.safetensors.index.json there is removed. lib/ckpt writes sharded, BF16 and
 * whole-folder-atomic checkpoints. */
int model_save(const dsv3_model *m, const char *dir, dsv3_err *e);

/* Calls fn for every tensor of the checkpoint layout in order: the parameters, plus, for
 * each MTP module, the copies of the embedding and head that DeepSeek's checkpoint stores
 * (data pointing at the shared parameters). Stops at and returns fn's first non-zero. */
int model_each_saved(const dsv3_model *m,
                     int (*fn)(void *ctx, const char *name, int ndim, const int64_t *shape,
                               const float *data),
                     void *ctx);

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

/* Documents packed in each sequence, for the next forwards (until set again): segment[N]
 * numbers the document of every row (non-decreasing along a sequence; NULL: the whole
 * sequence is one document), position[N] its RoPE position (0 <= position < T; NULL:
 * 0..T-1 in every sequence). Attention from row i to row j then needs j <= i and
 * segment[j] == segment[i], in forward and backward, so each document computes what it
 * would compute as a sequence of its own when its positions restart at 0. MTP module k
 * treats t_{i+k} of another document like a position past the sequence's end: row i is a
 * placeholder, its target ignored, left out of the balance loss and the load. The
 * balance loss stays per sequence (packed row). Returns -1 (nothing changed) when a
 * position is out of range or a segment number decreases inside a sequence. */
int model_acts_set_segments(model_acts *a, const int32_t *segment, const int32_t *position);

/* When set, the next forwards reuse the expert choices of the last one (weights are still
 * recomputed): makes the loss a smooth function of the parameters for gradient checks. */
void model_acts_freeze_routing(model_acts *a, int on);

/* Forward over ids [B*T]; with targets (target < 0 ignored), *loss = mean cross-entropy over
 * the used targets (as transformers' loss with labels shifted by one). targets may be NULL. */
int model_forward(dsv3_model *m, model_acts *a, const int32_t *ids, const int32_t *targets,
                  float *loss, dsv3_err *e);

/* Counted targets of a forward over ids [B*T] with these targets and documents (segment
 * NULL: none): *main of the next token, mtp[k] of MTP module k (D entries; what
 * model_forward counts). Summed over a step's forwards and ranks: the norm_* fields. */
void model_count_targets(const dsv3_model *m, const int32_t *targets, const int32_t *segment,
                         int B, int T, int64_t *main, int64_t *mtp);

/* The losses of the last forward with targets (with the norm_* fields set: its share of
 * the step's losses, the sums over its part divided by the step's counts). total = main + mtp + balance is what
 * model_backward differentiates. */
typedef struct model_losses {
    double main;      /* mean cross-entropy of the next token (model_forward's *loss, unless
                         norm_main is set) */
    double mtp;       /* lambda/D * sum of mtp_k; 0 when off */
    double mtp_k[8];  /* module k's mean cross-entropy (k < 8 reported) */
    double balance;   /* alpha * sum over MoE blocks of the mean over sequences; 0 when off */
    double total;
} model_losses;
void model_acts_losses(const model_acts *a, model_losses *out);

/* Logits [B*T, vocab] of MTP module k (0-based) in the last forward, or NULL when the MTP
 * modules did not run (mtp_lambda 0). Row i of sequence b predicts t_{i+k+2}. */
const float *model_acts_mtp_logits(const model_acts *a, int k);

/* Adds d(total loss)/d(params) of the last forward (which needs targets) into m->grads. */
int model_backward(dsv3_model *m, model_acts *a, const int32_t *ids, const int32_t *targets,
                   dsv3_err *e);

/* Per-expert load of MoE layer l in the last forward: counts[E] = tokens routed to each.
 * Returns -1 for a dense layer. */
int model_expert_load(const dsv3_model *m, const model_acts *a, int l, int64_t *counts);

/* The same for the block of MTP module k (0-based) when the last forward ran it: counts[E],
 * and *slots = tokens routed there times num_experts_per_tok (its last k+1 positions of a
 * sequence, or of a document when segments are set, are placeholders and do not count).
 * Returns -1 when the module did not run or its block is dense. */
int model_mtp_expert_load(const dsv3_model *m, const model_acts *a, int k, int64_t *counts,
                          int64_t *slots);

/* Expert parallelism: a rank with no rows for a forward (its share ran out, or a forward
 * without targets) still serves its experts to the others: the exchanges of one forward
 * (mtp: the MTP modules ran, as on the ranks with rows), and of its backward when
 * backward is set. Collective like model_forward with m->ep set. */
int model_ep_idle(dsv3_model *m, model_acts *a, int mtp, int backward, dsv3_err *e);

/* A failure of this rank in a pass under expert parallelism (e says why): the rank still
 * takes part in the pass's exchanges, the forward's (backward 0) or, after a forward that
 * succeeded, its backward's (1), sending nothing, until the ranks agree that the pass
 * failed (before the first block's rows move, a MAX over the world), so no rank waits in
 * an exchange; every rank's pass then returns -1, the others with "another rank failed".
 * Returns -1 (e kept). Without expert parallelism it only returns -1. mtp: as for
 * model_ep_idle. */
#define MODEL_EP_PEER_FAILED "stopping: another rank failed in an expert-parallel exchange"
int model_ep_fail(dsv3_model *m, model_acts *a, int mtp, int backward, dsv3_err *e);

/* Rows this rank's experts received in the last forward at block l (l < num_hidden_layers:
 * a main layer, num_hidden_layers + k: MTP module k's block); 0 for a dense block or
 * without expert parallelism. */
int64_t model_ep_rows(const model_acts *a, int l);

/* Auxiliary-loss-free balancing (V3 report, section 2.1.2): after a step, every MoE layer's
 * correction bias moves by gamma against its load, b_i += gamma * sign(mean load - load_i).
 * Uses the routing of the last forward, MTP blocks included when it ran them. */
void model_balance_update(dsv3_model *m, const model_acts *a, float gamma);

#endif
