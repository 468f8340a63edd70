#include "config.h"

#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "outfile.h"

/* ---- reading fields ---- */

/* An integer field. required: missing or null is an error; otherwise *out = dflt. */
static int get_int(json_t *o, const char *key, int required, int dflt, int *out,
                   const char *name, dsv3_err *e)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        if (required)
            return err_set(e, "%s: missing field \"%s\"", name, key);
        *out = dflt;
        return 0;
    }
    double d;
    if (json_is_integer(v))
        d = (double)json_integer_value(v);
    else if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)))
        d = json_real_value(v);  /* 64.0 is written by some tools */
    else
        return err_set(e, "%s: field \"%s\" must be an integer", name, key);
    if (d < -2147483648.0 || d > 2147483647.0)
        return err_set(e, "%s: field \"%s\" out of range (%.0f)", name, key, d);
    *out = (int)d;
    return 0;
}

static int get_num(json_t *o, const char *key, int required, double dflt, double *out,
                   const char *name, dsv3_err *e)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        if (required)
            return err_set(e, "%s: missing field \"%s\"", name, key);
        *out = dflt;
        return 0;
    }
    if (!json_is_number(v))
        return err_set(e, "%s: field \"%s\" must be a number", name, key);
    *out = json_number_value(v);
    if (!isfinite(*out))
        return err_set(e, "%s: field \"%s\" is not finite", name, key);
    return 0;
}

static int get_bool(json_t *o, const char *key, int dflt, int *out, const char *name,
                    dsv3_err *e)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        *out = dflt;
        return 0;
    }
    if (!json_is_boolean(v))
        return err_set(e, "%s: field \"%s\" must be true or false", name, key);
    *out = json_is_true(v);
    return 0;
}

/* A string field that, when present, must be one of the values we implement. */
static int want_string(json_t *o, const char *key, const char *const *ok, const char *name,
                       dsv3_err *e)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_string(v))
        return err_set(e, "%s: field \"%s\" must be a string", name, key);
    for (; *ok; ok++)
        if (!strcmp(json_string_value(v), *ok))
            return 0;
    return err_set(e, "%s: field \"%s\" is \"%s\", which dsv3 does not implement", name, key,
                   json_string_value(v));
}

/* The rope settings, from rope_parameters (5.x) or rope_scaling + rope_theta (4.x and
 * DeepSeek's files). When both dicts are present they must agree. */
static int read_rope(dsv3_config *c, json_t *root, const char *name, dsv3_err *e)
{
    json_t *rp = json_object_get(root, "rope_parameters");
    json_t *rs = json_object_get(root, "rope_scaling");
    if (rp && json_is_null(rp))
        rp = NULL;
    if (rs && json_is_null(rs))
        rs = NULL;
    if (rp && !json_is_object(rp))
        return err_set(e, "%s: field \"rope_parameters\" must be an object", name);
    if (rs && !json_is_object(rs))
        return err_set(e, "%s: field \"rope_scaling\" must be an object or null", name);

    double top_theta;
    if (get_num(root, "rope_theta", 0, 10000.0, &top_theta, name, e))
        return -1;
    json_t *d = rp ? rp : rs;
    const char *dname = rp ? "rope_parameters" : "rope_scaling";
    c->rope_theta = top_theta;
    c->rope_yarn = 0;
    if (!d)
        goto checks;

    char where[256];
    snprintf(where, sizeof where, "%s: %s", name, dname);
    if (json_object_get(d, "rope_theta")) {
        if (get_num(d, "rope_theta", 1, 0, &c->rope_theta, where, e))
            return -1;
        if (json_object_get(root, "rope_theta") && c->rope_theta != top_theta)
            return err_set(e, "%s: \"rope_theta\" (%g) contradicts %s.rope_theta (%g)", name,
                           top_theta, dname, c->rope_theta);
    }
    json_t *t = json_object_get(d, "rope_type");
    json_t *t2 = json_object_get(d, "type");
    if (t && t2 && json_is_string(t) && json_is_string(t2) &&
        strcmp(json_string_value(t), json_string_value(t2)))
        return err_set(e, "%s: \"rope_type\" and \"type\" disagree", where);
    if (!t)
        t = t2;
    const char *type = t && json_is_string(t) ? json_string_value(t) : NULL;
    if (t && !type)
        return err_set(e, "%s: \"rope_type\" must be a string", where);
    if (!type || !strcmp(type, "default")) {
        c->rope_yarn = 0;
    } else if (!strcmp(type, "yarn") || !strcmp(type, "deepseek_yarn")) {
        c->rope_yarn = 1;
        if (get_num(d, "factor", 0, -1, &c->yarn_factor, where, e) ||
            get_int(d, "original_max_position_embeddings", 1, 0,
                    &c->yarn_original_max_position_embeddings, where, e) ||
            get_num(d, "beta_fast", 0, 32, &c->yarn_beta_fast, where, e) ||
            get_num(d, "beta_slow", 0, 1, &c->yarn_beta_slow, where, e) ||
            get_num(d, "mscale", 0, 0, &c->yarn_mscale, where, e) ||
            get_num(d, "mscale_all_dim", 0, 0, &c->yarn_mscale_all_dim, where, e) ||
            get_num(d, "attention_factor", 0, -1, &c->yarn_attention_factor, where, e) ||
            get_bool(d, "truncate", 1, &c->yarn_truncate, where, e))
            return -1;
        /* transformers: beta_fast/beta_slow of 0 mean the defaults ("or 32"). */
        if (c->yarn_beta_fast == 0)
            c->yarn_beta_fast = 32;
        if (c->yarn_beta_slow == 0)
            c->yarn_beta_slow = 1;
        if (c->yarn_factor < 0) {
            if (c->yarn_original_max_position_embeddings <= 0)
                return err_set(e, "%s: \"original_max_position_embeddings\" must be positive",
                               where);
            c->yarn_factor = (double)c->max_position_embeddings /
                             c->yarn_original_max_position_embeddings;
        }
    } else {
        return err_set(e, "%s: rope type \"%s\" is not implemented (default or yarn)", where,
                       type);
    }
    /* Both dicts present: a file written for 4.x and 5.x at once must say the same thing. */
    if (rp && rs) {
        static const char *const keys[] = {"factor", "original_max_position_embeddings",
                                           "beta_fast", "beta_slow", "mscale",
                                           "mscale_all_dim", NULL};
        for (const char *const *k = keys; *k; k++) {
            json_t *a = json_object_get(rp, *k), *b = json_object_get(rs, *k);
            if (a && b && json_is_number(a) && json_is_number(b) &&
                json_number_value(a) != json_number_value(b))
                return err_set(e, "%s: rope_parameters.%s (%g) contradicts rope_scaling.%s (%g)",
                               name, *k, json_number_value(a), *k, json_number_value(b));
        }
    }
checks:
    return get_bool(root, "rope_interleave", 1, &c->rope_interleave, name, e);
}

static int from_json(dsv3_config *c, json_t *root, const char *name, dsv3_err *e)
{
    memset(c, 0, sizeof *c);
    if (!json_is_object(root))
        return err_set(e, "%s: not a JSON object", name);
    static const char *const silu[] = {"silu", NULL};
    static const char *const sigmoid[] = {"sigmoid", NULL};
    static const char *const noaux[] = {"noaux_tc", NULL};
    static const char *const mtype[] = {"deepseek_v3", NULL};
    if (want_string(root, "hidden_act", silu, name, e) ||
        want_string(root, "scoring_func", sigmoid, name, e) ||
        want_string(root, "topk_method", noaux, name, e) ||
        want_string(root, "model_type", mtype, name, e))
        return -1;

    int kvh = 0, head_dim = 0, qk_head_dim = 0, moe_freq = 1, attn_bias = 0;
    if (get_int(root, "vocab_size", 1, 0, &c->vocab_size, name, e) ||
        get_int(root, "hidden_size", 1, 0, &c->hidden_size, name, e) ||
        get_int(root, "num_hidden_layers", 1, 0, &c->num_hidden_layers, name, e) ||
        get_int(root, "num_attention_heads", 1, 0, &c->num_attention_heads, name, e) ||
        get_int(root, "num_key_value_heads", 0, 0, &kvh, name, e) ||
        get_int(root, "q_lora_rank", 0, 0, &c->q_lora_rank, name, e) ||
        get_int(root, "kv_lora_rank", 1, 0, &c->kv_lora_rank, name, e) ||
        get_int(root, "qk_nope_head_dim", 1, 0, &c->qk_nope_head_dim, name, e) ||
        get_int(root, "qk_rope_head_dim", 1, 0, &c->qk_rope_head_dim, name, e) ||
        get_int(root, "v_head_dim", 1, 0, &c->v_head_dim, name, e) ||
        get_int(root, "head_dim", 0, 0, &head_dim, name, e) ||
        get_int(root, "qk_head_dim", 0, 0, &qk_head_dim, name, e) ||
        get_int(root, "first_k_dense_replace", 0, 0, &c->first_k_dense_replace, name, e) ||
        get_int(root, "max_position_embeddings", 0, 4096, &c->max_position_embeddings, name,
                e) ||
        get_num(root, "rms_norm_eps", 0, 1e-6, &c->rms_norm_eps, name, e) ||
        get_int(root, "num_nextn_predict_layers", 0, 0, &c->num_nextn_predict_layers, name,
                e) ||
        get_bool(root, "tie_word_embeddings", 0, &c->tie_word_embeddings, name, e) ||
        get_bool(root, "attention_bias", 0, &attn_bias, name, e) ||
        get_num(root, "initializer_range", 0, 0.02, &c->initializer_range, name, e) ||
        get_int(root, "moe_layer_freq", 0, 1, &moe_freq, name, e) ||
        get_bool(root, "norm_topk_prob", 1, &c->norm_topk_prob, name, e) ||
        get_int(root, "bos_token_id", 0, -1, &c->bos_token_id, name, e) ||
        get_int(root, "eos_token_id", 0, -1, &c->eos_token_id, name, e))
        return -1;
    /* The question of q compression must be answered explicitly: V3 uses it, V2-Lite not. */
    if (!json_object_get(root, "q_lora_rank"))
        return err_set(e, "%s: missing field \"q_lora_rank\" (a number, or null for none)",
                       name);
    int dense_only = c->first_k_dense_replace >= c->num_hidden_layers;
    int need_moe = !dense_only || c->num_nextn_predict_layers > 0;
    if (get_int(root, "intermediate_size", c->first_k_dense_replace > 0, 0,
                &c->intermediate_size, name, e) ||
        get_int(root, "moe_intermediate_size", need_moe, 0, &c->moe_intermediate_size, name,
                e) ||
        get_int(root, "n_routed_experts", need_moe, 0, &c->n_routed_experts, name, e) ||
        get_int(root, "num_experts_per_tok", need_moe, 0, &c->num_experts_per_tok, name, e) ||
        get_int(root, "n_shared_experts", 0, 0, &c->n_shared_experts, name, e) ||
        get_int(root, "n_group", 0, 1, &c->n_group, name, e) ||
        get_int(root, "topk_group", 0, 1, &c->topk_group, name, e) ||
        get_num(root, "routed_scaling_factor", 0, 1.0, &c->routed_scaling_factor, name, e))
        return -1;
    if (head_dim && head_dim != c->qk_rope_head_dim)
        return err_set(e, "%s: \"head_dim\" (%d) must equal \"qk_rope_head_dim\" (%d): "
                       "transformers sizes the rotary part with it", name, head_dim,
                       c->qk_rope_head_dim);
    if (qk_head_dim && qk_head_dim != c->qk_nope_head_dim + c->qk_rope_head_dim)
        return err_set(e, "%s: \"qk_head_dim\" (%d) must equal qk_nope_head_dim + "
                       "qk_rope_head_dim (%d)", name, qk_head_dim,
                       c->qk_nope_head_dim + c->qk_rope_head_dim);
    if (kvh && kvh != c->num_attention_heads)
        return err_set(e, "%s: \"num_key_value_heads\" (%d) must equal \"num_attention_heads\" "
                       "(%d): MLA has one latent shared by all heads", name, kvh,
                       c->num_attention_heads);
    if (moe_freq != 1)
        return err_set(e, "%s: \"moe_layer_freq\" must be 1 (every layer after "
                       "first_k_dense_replace is MoE)", name);
    if (attn_bias)
        return err_set(e, "%s: \"attention_bias\" true is not implemented (DeepSeek-V3 has "
                       "no attention biases)", name);
    if (read_rope(c, root, name, e))
        return -1;
    return config_check(c, name, e);
}

int config_check(const dsv3_config *c, const char *name, dsv3_err *e)
{
#define POS(f)                                                                             \
    if (c->f <= 0)                                                                         \
        return err_set(e, "%s: \"" #f "\" must be positive (is %d)", name, c->f);
    POS(vocab_size) POS(hidden_size) POS(num_hidden_layers) POS(num_attention_heads)
    POS(kv_lora_rank) POS(qk_rope_head_dim) POS(v_head_dim) POS(max_position_embeddings)
#undef POS
    if (c->qk_nope_head_dim < 0)
        return err_set(e, "%s: \"qk_nope_head_dim\" must not be negative", name);
    if (c->qk_rope_head_dim % 2)
        return err_set(e, "%s: \"qk_rope_head_dim\" (%d) must be even (RoPE rotates pairs)",
                       name, c->qk_rope_head_dim);
    if (c->q_lora_rank < 0)
        return err_set(e, "%s: \"q_lora_rank\" must be positive or null", name);
    if (c->first_k_dense_replace < 0 || c->first_k_dense_replace > c->num_hidden_layers)
        return err_set(e, "%s: \"first_k_dense_replace\" (%d) must be in [0, "
                       "num_hidden_layers=%d]", name, c->first_k_dense_replace,
                       c->num_hidden_layers);
    if (c->first_k_dense_replace > 0 && c->intermediate_size <= 0)
        return err_set(e, "%s: \"intermediate_size\" must be positive (dense layers exist)",
                       name);
    if (!(c->rms_norm_eps > 0))
        return err_set(e, "%s: \"rms_norm_eps\" must be positive", name);
    if (c->num_nextn_predict_layers < 0)
        return err_set(e, "%s: \"num_nextn_predict_layers\" must not be negative", name);
    int has_moe = c->first_k_dense_replace < c->num_hidden_layers || c->num_nextn_predict_layers;
    if (has_moe) {
        if (c->n_routed_experts <= 0)
            return err_set(e, "%s: \"n_routed_experts\" must be positive (MoE layers exist)",
                           name);
        if (c->moe_intermediate_size <= 0)
            return err_set(e, "%s: \"moe_intermediate_size\" must be positive", name);
        if (c->n_shared_experts < 0)
            return err_set(e, "%s: \"n_shared_experts\" must not be negative", name);
        if (c->n_group <= 0 || c->n_routed_experts % c->n_group)
            return err_set(e, "%s: \"n_group\" (%d) must divide \"n_routed_experts\" (%d)",
                           name, c->n_group, c->n_routed_experts);
        if (c->n_routed_experts / c->n_group < 2)
            return err_set(e, "%s: \"n_group\" (%d) leaves fewer than 2 experts a group; a "
                           "group is scored by its top 2", name, c->n_group);
        if (c->topk_group <= 0 || c->topk_group > c->n_group)
            return err_set(e, "%s: \"topk_group\" (%d) must be in [1, n_group=%d]", name,
                           c->topk_group, c->n_group);
        int reachable = c->topk_group * (c->n_routed_experts / c->n_group);
        if (c->num_experts_per_tok <= 0 || c->num_experts_per_tok > reachable)
            return err_set(e, "%s: \"num_experts_per_tok\" (%d) must be in [1, %d] (topk_group "
                           "x experts per group)", name, c->num_experts_per_tok, reachable);
        if (!(c->routed_scaling_factor > 0))
            return err_set(e, "%s: \"routed_scaling_factor\" must be positive", name);
    }
    if (c->rope_yarn) {
        if (!(c->yarn_factor > 0))
            return err_set(e, "%s: rope \"factor\" must be positive", name);
        if (c->yarn_original_max_position_embeddings <= 0)
            return err_set(e, "%s: rope \"original_max_position_embeddings\" must be positive",
                           name);
        if (!(c->yarn_beta_fast > 0 && c->yarn_beta_slow > 0))
            return err_set(e, "%s: rope \"beta_fast\" and \"beta_slow\" must be positive", name);
    }
    if (!(c->rope_theta > 1))
        return err_set(e, "%s: \"rope_theta\" must be greater than 1", name);
    return 0;
}

int config_parse(dsv3_config *c, const char *text, const char *name, dsv3_err *e)
{
    json_error_t je;
    memset(c, 0, sizeof *c);
    json_t *root = json_loads(text, JSON_REJECT_DUPLICATES, &je);
    if (!root)
        return err_set(e, "%s: bad JSON at line %d column %d: %s", name, je.line, je.column,
                       je.text);
    if (from_json(c, root, name, e)) {
        json_decref(root);
        memset(c, 0, sizeof *c);
        return -1;
    }
    c->json = root;
    return 0;
}

int config_load(dsv3_config *c, const char *path, dsv3_err *e)
{
    json_error_t je;
    memset(c, 0, sizeof *c);
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!root) {
        if (je.line <= 0)
            return err_set(e, "%s: %s", path, je.text);
        return err_set(e, "%s: bad JSON at line %d column %d: %s", path, je.line, je.column,
                       je.text);
    }
    if (from_json(c, root, path, e)) {
        json_decref(root);
        memset(c, 0, sizeof *c);
        return -1;
    }
    c->json = root;
    return 0;
}

void config_free(dsv3_config *c)
{
    if (c->json)
        json_decref(c->json);
    memset(c, 0, sizeof *c);
}

/* ---- writing ---- */

static void set_int(json_t *o, const char *k, int v)
{
    json_object_set_new(o, k, json_integer(v));
}
static void set_num(json_t *o, const char *k, double v)
{
    json_object_set_new(o, k, json_real(v));
}

static json_t *rope_dict(const dsv3_config *c, int v5)
{
    json_t *d = json_object();
    if (v5) {
        set_num(d, "rope_theta", c->rope_theta);
        json_object_set_new(d, "rope_type", json_string(c->rope_yarn ? "yarn" : "default"));
    } else {
        json_object_set_new(d, "type", json_string("yarn"));
    }
    if (c->rope_yarn) {
        set_num(d, "factor", c->yarn_factor);
        set_int(d, "original_max_position_embeddings", c->yarn_original_max_position_embeddings);
        set_num(d, "beta_fast", c->yarn_beta_fast);
        set_num(d, "beta_slow", c->yarn_beta_slow);
        if (c->yarn_mscale != 0)
            set_num(d, "mscale", c->yarn_mscale);
        if (c->yarn_mscale_all_dim != 0)
            set_num(d, "mscale_all_dim", c->yarn_mscale_all_dim);
        if (c->yarn_attention_factor >= 0)
            set_num(d, "attention_factor", c->yarn_attention_factor);
        if (!c->yarn_truncate)
            json_object_set_new(d, "truncate", json_false());
    }
    return d;
}

static json_t *build(const dsv3_config *c)
{
    json_t *o = c->json ? json_deep_copy(c->json) : json_object();
    if (!o)
        return NULL;
    if (!json_object_get(o, "architectures")) {
        json_t *a = json_array();
        json_array_append_new(a, json_string("DeepseekV3ForCausalLM"));
        json_object_set_new(o, "architectures", a);
    }
    json_object_set_new(o, "model_type", json_string("deepseek_v3"));
    set_int(o, "vocab_size", c->vocab_size);
    set_int(o, "hidden_size", c->hidden_size);
    set_int(o, "intermediate_size", c->intermediate_size);
    set_int(o, "moe_intermediate_size", c->moe_intermediate_size);
    set_int(o, "num_hidden_layers", c->num_hidden_layers);
    set_int(o, "num_attention_heads", c->num_attention_heads);
    set_int(o, "num_key_value_heads", c->num_attention_heads);
    if (c->q_lora_rank)
        set_int(o, "q_lora_rank", c->q_lora_rank);
    else
        json_object_set_new(o, "q_lora_rank", json_null());
    set_int(o, "kv_lora_rank", c->kv_lora_rank);
    set_int(o, "qk_nope_head_dim", c->qk_nope_head_dim);
    set_int(o, "qk_rope_head_dim", c->qk_rope_head_dim);
    set_int(o, "v_head_dim", c->v_head_dim);
    set_int(o, "head_dim", c->qk_rope_head_dim);
    set_int(o, "qk_head_dim", config_qk_head_dim(c));
    set_int(o, "n_shared_experts", c->n_shared_experts);
    set_int(o, "n_routed_experts", c->n_routed_experts);
    set_int(o, "num_experts_per_tok", c->num_experts_per_tok);
    set_int(o, "n_group", c->n_group);
    set_int(o, "topk_group", c->topk_group);
    set_num(o, "routed_scaling_factor", c->routed_scaling_factor);
    json_object_set_new(o, "norm_topk_prob", json_boolean(c->norm_topk_prob));
    set_int(o, "first_k_dense_replace", c->first_k_dense_replace);
    set_num(o, "rms_norm_eps", c->rms_norm_eps);
    set_int(o, "max_position_embeddings", c->max_position_embeddings);
    set_int(o, "num_nextn_predict_layers", c->num_nextn_predict_layers);
    json_object_set_new(o, "tie_word_embeddings", json_boolean(c->tie_word_embeddings));
    set_num(o, "initializer_range", c->initializer_range);
    json_object_set_new(o, "hidden_act", json_string("silu"));
    json_object_set_new(o, "rope_interleave", json_boolean(c->rope_interleave));
    /* 5.x reads rope_parameters (and takes rope_scaling over it when both are there, so the
     * two must carry the same values); 4.x and DeepSeek's code read rope_theta and
     * rope_scaling. */
    set_num(o, "rope_theta", c->rope_theta);
    json_object_set_new(o, "rope_parameters", rope_dict(c, 1));
    json_object_set_new(o, "rope_scaling", c->rope_yarn ? rope_dict(c, 0) : json_null());
    return o;
}

char *config_dumps(const dsv3_config *c, dsv3_err *e)
{
    json_t *o = build(c);
    char *s = o ? json_dumps(o, JSON_INDENT(2) | JSON_REAL_PRECISION(17)) : NULL;
    json_decref(o);
    if (!s)
        err_set(e, "config: out of memory");
    return s;
}

int config_save(const dsv3_config *c, const char *path, dsv3_err *e)
{
    char *s = config_dumps(c, e);
    if (!s)
        return -1;
    outfile of;
    if (outfile_open(&of, path, e)) {
        free(s);
        return -1;
    }
    size_t n = strlen(s);
    int bad = fwrite(s, 1, n, of.f) != n || fputc('\n', of.f) == EOF;
    free(s);
    if (bad) {
        err_errno(e, "%s: write failed", outfile_name(&of));
        outfile_abort(&of);
        return -1;
    }
    return outfile_commit(&of, e);
}

/* ---- derived quantities ---- */

/* YaRN's attention temperature, as DeepSeek's reference and transformers write it. */
static double yarn_mscale(double scale, double mscale)
{
    return scale <= 1 ? 1.0 : 0.1 * mscale * log(scale) + 1.0;
}

double config_softmax_scale(const dsv3_config *c)
{
    double s = 1.0 / sqrt((double)config_qk_head_dim(c));
    if (c->rope_yarn && c->yarn_mscale_all_dim != 0) {
        double m = yarn_mscale(c->yarn_factor, c->yarn_mscale_all_dim);
        s *= m * m;
    }
    return s;
}

double config_rope_attention_factor(const dsv3_config *c)
{
    if (!c->rope_yarn)
        return 1.0;
    if (c->yarn_attention_factor >= 0)
        return c->yarn_attention_factor;
    if (c->yarn_mscale != 0 && c->yarn_mscale_all_dim != 0)
        return yarn_mscale(c->yarn_factor, c->yarn_mscale) /
               yarn_mscale(c->yarn_factor, c->yarn_mscale_all_dim);
    return yarn_mscale(c->yarn_factor, 1.0);
}

/* The rotary dimension index at which a wavelength completes num_rot turns over the
 * original context (YaRN paper, eq. 17 inverted). */
static double correction_dim(double num_rot, int dim, double base, int max_pos)
{
    return dim * log(max_pos / (num_rot * 2 * M_PI)) / (2 * log(base));
}

void config_rope_inv_freq(const dsv3_config *c, double *inv_freq)
{
    int dim = c->qk_rope_head_dim, half = dim / 2;
    /* transformers evaluates base ** (2i/dim) in float32; doing the same keeps the angle
     * at long positions within float rounding of theirs. */
    for (int i = 0; i < half; i++) {
        float expo = (float)(2 * i) / (float)dim;
        float pf = powf((float)c->rope_theta, expo);
        inv_freq[i] = 1.0f / pf;
    }
    if (!c->rope_yarn)
        return;
    double low = correction_dim(c->yarn_beta_fast, dim, c->rope_theta,
                                c->yarn_original_max_position_embeddings);
    double high = correction_dim(c->yarn_beta_slow, dim, c->rope_theta,
                                 c->yarn_original_max_position_embeddings);
    if (c->yarn_truncate) {
        low = floor(low);
        high = ceil(high);
    }
    if (low < 0)
        low = 0;
    if (high > dim - 1)
        high = dim - 1;
    if (low == high)
        high += 0.001;  /* transformers' guard against a zero-width ramp */
    for (int i = 0; i < half; i++) {
        float pf = 1.0f / (float)inv_freq[i];
        float extra = 1.0f / pf, inter = 1.0f / ((float)c->yarn_factor * pf);
        float ramp = (float)((i - low) / (high - low));
        ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
        float ext_w = 1.0f - ramp;  /* weight of the unscaled frequency */
        inv_freq[i] = inter * (1 - ext_w) + extra * ext_w;
    }
}

/* ---- parameter counts ---- */

static int64_t swiglu_params(int64_t h, int64_t inter)
{
    return 3 * h * inter;
}

void config_count_params(const dsv3_config *c, config_counts *n)
{
    memset(n, 0, sizeof *n);
    int64_t H = c->hidden_size, V = c->vocab_size, nh = c->num_attention_heads;
    int64_t qk = config_qk_head_dim(c), kv = c->kv_lora_rank, rope = c->qk_rope_head_dim;
    int64_t a = 0;
    if (c->q_lora_rank)
        a += H * c->q_lora_rank + c->q_lora_rank + (int64_t)c->q_lora_rank * nh * qk;
    else
        a += H * nh * qk;
    a += H * (kv + rope) + kv + kv * nh * (c->qk_nope_head_dim + c->v_head_dim);
    a += nh * c->v_head_dim * H;
    a += 2 * H;  /* input_layernorm, post_attention_layernorm */
    n->attn_per_layer = a;
    n->dense_mlp = swiglu_params(H, c->intermediate_size);
    int64_t E = c->n_routed_experts, mi = c->moe_intermediate_size;
    int64_t router = E * H + E;  /* gate.weight and e_score_correction_bias */
    int64_t shared = swiglu_params(H, mi * c->n_shared_experts);
    n->moe_total = router + E * swiglu_params(H, mi) + shared;
    n->moe_active = router + c->num_experts_per_tok * swiglu_params(H, mi) + shared;
    n->embed = V * H;
    n->lm_head = c->tie_word_embeddings ? 0 : V * H;
    n->final_norm = H;
    int64_t dense = c->first_k_dense_replace, moe = c->num_hidden_layers - dense;
    n->total = n->embed + n->lm_head + n->final_norm + c->num_hidden_layers * a +
               dense * n->dense_mlp + moe * n->moe_total;
    /* A token reads one row of the embedding table, so the table is not "activated". */
    n->active = H + n->lm_head + n->final_norm + c->num_hidden_layers * a +
                dense * n->dense_mlp + moe * n->moe_active;
    /* An MTP module as DeepSeek stores it: enorm, hnorm, eh_proj, one MoE block, and its
     * own copies of the embedding and the output head (shared_head.norm, .head). */
    int64_t mtp_common = 2 * H + 2 * H * H + a + H + V * H + V * H;
    n->mtp_total = c->num_nextn_predict_layers * (mtp_common + n->moe_total);
    n->mtp_active = c->num_nextn_predict_layers * (mtp_common - V * H + H + n->moe_active);
}
