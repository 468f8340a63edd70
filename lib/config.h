/* config: the model's hyper-parameters, read from and written to HF's config.json.
 *
 * Owns the dsv3_config record: every DeepseekV3Config field the model code needs, parsed
 * from either spelling in use (DeepSeek's released file and transformers 4.x: top-level
 * rope_theta plus rope_scaling {"type": "yarn", ...}; transformers 5.x: rope_parameters
 * {"rope_type", "rope_theta", ...}, rope_interleave, head_dim, qk_head_dim), checked for
 * combinations the architecture cannot run, and the JSON document itself so that fields we
 * do not know are written back unchanged and in their order. Also the parameter counts
 * (total and activated per token) that follow from the shapes.
 *
 * Fields that size the model are required (a missing one is an error naming it); the others
 * take transformers' defaults (rms_norm_eps 1e-6, rope_theta 10000, rope_interleave true,
 * norm_topk_prob true, num_nextn_predict_layers 0, tie_word_embeddings false, ...). */
#ifndef DSV3_CONFIG_H
#define DSV3_CONFIG_H

#include <stdint.h>

#include "err.h"

typedef struct json_t json_t;

typedef struct dsv3_config {
    int vocab_size, hidden_size, intermediate_size, moe_intermediate_size;
    int num_hidden_layers, num_attention_heads;
    int q_lora_rank;  /* 0 when config.json has null: q = W_q x without compression */
    int kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim;
    int n_shared_experts, n_routed_experts, num_experts_per_tok, n_group, topk_group;
    double routed_scaling_factor;
    int norm_topk_prob;
    int first_k_dense_replace;  /* layers [0, k) are dense SwiGLU, the rest MoE */
    double rms_norm_eps;
    int max_position_embeddings;
    int num_nextn_predict_layers;  /* MTP depth D */
    int tie_word_embeddings;
    double initializer_range;
    int bos_token_id, eos_token_id;  /* -1 when absent or null */

    /* RoPE on the qk_rope_head_dim part of q and k. */
    double rope_theta;
    int rope_interleave;  /* 1: DeepSeek's layout, pairs (2i, 2i+1); 0: pairs (i, i + d/2) */
    int rope_yarn;        /* 0: plain RoPE; 1: YaRN with the fields below */
    double yarn_factor;
    int yarn_original_max_position_embeddings;
    double yarn_beta_fast, yarn_beta_slow;
    double yarn_mscale, yarn_mscale_all_dim;  /* 0 when absent */
    double yarn_attention_factor;             /* <0 when absent: derived as transformers does */
    int yarn_truncate;

    json_t *json;  /* the document as read (or built), owned; config_save writes from it */
} dsv3_config;

/* Reads and checks PATH. On failure c is left empty and e names PATH and the field. */
int config_load(dsv3_config *c, const char *path, dsv3_err *e);

/* As config_load from a string; NAME is used in messages. */
int config_parse(dsv3_config *c, const char *text, const char *name, dsv3_err *e);

/* Writes c as a config.json that transformers 5.x loads: the numeric fields of c override
 * the document's, rope settings in the 5.x spelling (rope_parameters, rope_interleave,
 * head_dim, qk_head_dim) and, for 4.x readers, top-level rope_theta and rope_scaling with
 * the same values; every other field kept in its place. Atomic (lib/outfile). */
int config_save(const dsv3_config *c, const char *path, dsv3_err *e);

/* The JSON text config_save would write (malloc'd), for tests and --print. */
char *config_dumps(const dsv3_config *c, dsv3_err *e);

/* Checks the fields of c against each other; NAME is used in messages. */
int config_check(const dsv3_config *c, const char *name, dsv3_err *e);

void config_free(dsv3_config *c);

/* Derived quantities. */
static inline int config_qk_head_dim(const dsv3_config *c)
{
    return c->qk_nope_head_dim + c->qk_rope_head_dim;
}
static inline int config_layer_is_moe(const dsv3_config *c, int layer)
{
    return layer >= c->first_k_dense_replace;
}

/* The softmax scale of MLA: qk_head_dim^-1/2, times mscale(factor, mscale_all_dim)^2 with
 * YaRN when mscale_all_dim is set (DeepSeek's reference and transformers agree). */
double config_softmax_scale(const dsv3_config *c);

/* The factor transformers multiplies cos and sin by (YaRN's attention_factor; 1 without). */
double config_rope_attention_factor(const dsv3_config *c);

/* Inverse frequencies for the qk_rope_head_dim/2 rotary pairs (plain or YaRN), as
 * transformers computes them. inv_freq has qk_rope_head_dim/2 entries. */
void config_rope_inv_freq(const dsv3_config *c, double *inv_freq);

typedef struct config_counts {
    int64_t embed, lm_head, final_norm;
    int64_t attn_per_layer, dense_mlp, moe_total, moe_active; /* one layer each */
    int64_t mtp_total, mtp_active;  /* all MTP modules, counting their own embed/head copies */
    int64_t total, active;          /* main model, without MTP */
} config_counts;

/* Parameter counts from the shapes. Activated: the parameters one token touches, so one
 * row of the embedding table, not all of it (V3: 36.6B, the report's "37B"). */
void config_count_params(const dsv3_config *c, config_counts *n);

#endif
