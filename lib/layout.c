/* layout: tensor names and shapes from a config. See layout.h. */
#include "layout.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct builder {
    layout *L;
    int cap, failed, layer;
} builder;

static void add(builder *b, int ndim, int64_t d0, int64_t d1, int copy, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));

static void add(builder *b, int ndim, int64_t d0, int64_t d1, int copy, const char *fmt, ...)
{
    if (b->failed)
        return;
    layout *L = b->L;
    if (L->n == b->cap) {
        int cap = b->cap ? 2 * b->cap : 256;
        layout_tensor *t = realloc(L->t, (size_t)cap * sizeof *t);
        if (!t) {
            b->failed = 1;
            return;
        }
        L->t = t;
        b->cap = cap;
    }
    layout_tensor *t = &L->t[L->n++];
    memset(t, 0, sizeof *t);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->name, sizeof t->name, fmt, ap);
    va_end(ap);
    t->ndim = ndim;
    t->shape[0] = d0;
    t->shape[1] = ndim == 2 ? d1 : 0;
    t->mtp_copy = copy;
    t->layer = b->layer;
}

/* One transformer block at layer index l, in lib/model's order. */
static void block(builder *b, const dsv3_config *c, int l)
{
    int64_t H = c->hidden_size, nh = c->num_attention_heads, qk = config_qk_head_dim(c);
    int64_t kv = c->kv_lora_rank, rope = c->qk_rope_head_dim;
    const char *p = "model.layers";
    b->layer = l;
    add(b, 1, H, 0, 0, "%s.%d.input_layernorm.weight", p, l);
    if (c->q_lora_rank) {
        add(b, 2, c->q_lora_rank, H, 0, "%s.%d.self_attn.q_a_proj.weight", p, l);
        add(b, 1, c->q_lora_rank, 0, 0, "%s.%d.self_attn.q_a_layernorm.weight", p, l);
        add(b, 2, nh * qk, c->q_lora_rank, 0, "%s.%d.self_attn.q_b_proj.weight", p, l);
    } else {
        add(b, 2, nh * qk, H, 0, "%s.%d.self_attn.q_proj.weight", p, l);
    }
    add(b, 2, kv + rope, H, 0, "%s.%d.self_attn.kv_a_proj_with_mqa.weight", p, l);
    add(b, 1, kv, 0, 0, "%s.%d.self_attn.kv_a_layernorm.weight", p, l);
    add(b, 2, nh * (c->qk_nope_head_dim + c->v_head_dim), kv, 0,
        "%s.%d.self_attn.kv_b_proj.weight", p, l);
    add(b, 2, H, nh * c->v_head_dim, 0, "%s.%d.self_attn.o_proj.weight", p, l);
    add(b, 1, H, 0, 0, "%s.%d.post_attention_layernorm.weight", p, l);
    if (!config_layer_is_moe(c, l)) {
        int64_t I = c->intermediate_size;
        add(b, 2, I, H, 0, "%s.%d.mlp.gate_proj.weight", p, l);
        add(b, 2, I, H, 0, "%s.%d.mlp.up_proj.weight", p, l);
        add(b, 2, H, I, 0, "%s.%d.mlp.down_proj.weight", p, l);
        return;
    }
    int64_t E = c->n_routed_experts, mi = c->moe_intermediate_size;
    add(b, 2, E, H, 0, "%s.%d.mlp.gate.weight", p, l);
    add(b, 1, E, 0, 0, "%s.%d.mlp.gate.e_score_correction_bias", p, l);
    for (int x = 0; x < E; x++) {
        add(b, 2, mi, H, 0, "%s.%d.mlp.experts.%d.gate_proj.weight", p, l, x);
        add(b, 2, mi, H, 0, "%s.%d.mlp.experts.%d.up_proj.weight", p, l, x);
        add(b, 2, H, mi, 0, "%s.%d.mlp.experts.%d.down_proj.weight", p, l, x);
    }
    if (c->n_shared_experts) {
        int64_t si = mi * c->n_shared_experts;
        add(b, 2, si, H, 0, "%s.%d.mlp.shared_experts.gate_proj.weight", p, l);
        add(b, 2, si, H, 0, "%s.%d.mlp.shared_experts.up_proj.weight", p, l);
        add(b, 2, H, si, 0, "%s.%d.mlp.shared_experts.down_proj.weight", p, l);
    }
}

int layout_build(layout *L, const dsv3_config *c, int mtp_layers, dsv3_err *e)
{
    memset(L, 0, sizeof *L);
    builder b = {.L = L, .layer = -1};
    int64_t H = c->hidden_size, V = c->vocab_size;
    int nl = c->num_hidden_layers;
    add(&b, 2, V, H, 0, "model.embed_tokens.weight");
    for (int l = 0; l < nl; l++)
        block(&b, c, l);
    b.layer = -1;
    add(&b, 1, H, 0, 0, "model.norm.weight");
    if (!c->tie_word_embeddings)
        add(&b, 2, V, H, 0, "lm_head.weight");
    for (int k = 0; k < mtp_layers; k++) {
        int l = nl + k;
        b.layer = l;
        add(&b, 1, H, 0, 0, "model.layers.%d.enorm.weight", l);
        add(&b, 1, H, 0, 0, "model.layers.%d.hnorm.weight", l);
        add(&b, 2, H, 2 * H, 0, "model.layers.%d.eh_proj.weight", l);
        block(&b, c, l);
        add(&b, 1, H, 0, 0, "model.layers.%d.shared_head.norm.weight", l);
        add(&b, 2, V, H, 1, "model.layers.%d.embed_tokens.weight", l);
        add(&b, 2, V, H, 1, "model.layers.%d.shared_head.head.weight", l);
    }
    if (b.failed) {
        layout_free(L);
        return err_set(e, "layout: out of memory");
    }
    return 0;
}

void layout_free(layout *L)
{
    free(L->t);
    memset(L, 0, sizeof *L);
}

const layout_tensor *layout_find(const layout *L, const char *name)
{
    for (int i = 0; i < L->n; i++)
        if (!strcmp(L->t[i].name, name))
            return &L->t[i];
    return NULL;
}

int layout_layer_of(const char *name)
{
    int l, end = 0;
    if (sscanf(name, "model.layers.%d.%n", &l, &end) == 1 && end && l >= 0)
        return l;
    return -1;
}

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && !strcmp(s + n - m, suffix);
}

int layout_is_fp8(const char *name)
{
    static const char *const mods[] = {
        ".self_attn.q_proj.weight", ".self_attn.q_a_proj.weight", ".self_attn.q_b_proj.weight",
        ".self_attn.kv_a_proj_with_mqa.weight", ".self_attn.kv_b_proj.weight",
        ".self_attn.o_proj.weight",
    };
    if (layout_layer_of(name) < 0)
        return 0;
    for (int i = 0; i < 6; i++)
        if (ends_with(name, mods[i]))
            return 1;
    /* MLP projections: model.layers.N.mlp.{,experts.X.,shared_experts.}{gate,up,down}_proj */
    if (!strstr(name, ".mlp."))
        return 0;
    return ends_with(name, ".gate_proj.weight") || ends_with(name, ".up_proj.weight") ||
           ends_with(name, ".down_proj.weight");
}
