#include "model.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ep.h"
#include "fp8.h"
#include "ops.h"
#include "safetensors.h"

/* ---- parameter layout ---- */

/* One walk over the parameters in checkpoint order. With record set it appends to m->t;
 * with base set it points the fields of v into base. Both walks see the same offsets. */
typedef struct walk {
    dsv3_model *m;
    float *base;
    int record;
    size_t off;        /* next offset of a replicated tensor */
    size_t eoff;       /* expert parallelism: next offset among the held experts ... */
    size_t ebase;      /* ... which start here (n_dense) */
    uint64_t draws;    /* normals model_init_random draws before the next tensor */
    int failed;
} walk;

static int is_norm(const char *name);

/* expert: the routed expert a tensor belongs to (-1: none). Under expert parallelism the
 * tensors of experts outside the held group are neither stored nor listed (NULL), but
 * still counted in draws, so every layout initialises a held tensor alike. */
static float *add_x(walk *w, const char *name, int ndim, int64_t d0, int64_t d1, int trainable,
                    int expert)
{
    dsv3_model *m = w->m;
    int64_t numel = ndim == 1 ? d0 : d0 * d1;
    uint64_t draw0 = w->draws;
    if (trainable && !is_norm(name))
        w->draws += (uint64_t)numel;
    int split = m->ep_size > 1 && expert >= 0;
    if (split && expert / (m->cfg.n_routed_experts / m->ep_size) != m->ep_group)
        return NULL;
    size_t off = split ? w->ebase + w->eoff : w->off;
    float *p = w->base ? w->base + off : NULL;
    if (w->record) {
        if (!(m->n_t & (m->n_t - 1))) {  /* grow at powers of two */
            model_tensor *t = realloc(m->t, (size_t)(m->n_t ? 2 * m->n_t : 1) * sizeof *t);
            if (!t) {
                w->failed = 1;
                return p;
            }
            m->t = t;
        }
        model_tensor *t = &m->t[m->n_t++];
        memset(t, 0, sizeof *t);
        snprintf(t->name, sizeof t->name, "%s", name);
        t->ndim = ndim;
        t->shape[0] = d0;
        t->shape[1] = ndim == 2 ? d1 : 0;
        t->off = off;
        t->numel = numel;
        t->trainable = trainable;
        t->expert = expert;
        t->draw0 = draw0;
    }
    if (split)
        w->eoff += (size_t)numel;
    else
        w->off += (size_t)numel;
    return p;
}

static float *add(walk *w, const char *name, int ndim, int64_t d0, int64_t d1, int trainable)
{
    return add_x(w, name, ndim, d0, d1, trainable, -1);
}

#define ADD(field, nd, a, b, tr, ...)                                                      \
    do {                                                                                   \
        snprintf(n, sizeof n, __VA_ARGS__);                                                \
        float *p_ = add(w, n, nd, a, b, tr);                                               \
        if (L)                                                                             \
            field = p_;                                                                    \
    } while (0)

/* One transformer block at layer index l (main layers and MTP modules alike). L may be
 * NULL (recording only). */
static int layout_block(walk *w, model_layer *L, int l)
{
    const dsv3_config *c = &w->m->cfg;
    int64_t H = c->hidden_size, nh = c->num_attention_heads;
    int64_t qk = config_qk_head_dim(c), kv = c->kv_lora_rank, rope = c->qk_rope_head_dim;
    int64_t E = c->n_routed_experts, mi = c->moe_intermediate_size;
    const char *p = "model.layers";
    char n[96];
    model_layer dummy;
    model_layer *D = L ? L : &dummy;
    ADD(D->input_layernorm, 1, H, 0, 1, "%s.%d.input_layernorm.weight", p, l);
    if (c->q_lora_rank) {
        ADD(D->q_a_proj, 2, c->q_lora_rank, H, 1, "%s.%d.self_attn.q_a_proj.weight", p, l);
        ADD(D->q_a_layernorm, 1, c->q_lora_rank, 0, 1, "%s.%d.self_attn.q_a_layernorm.weight",
            p, l);
        ADD(D->q_b_proj, 2, nh * qk, c->q_lora_rank, 1, "%s.%d.self_attn.q_b_proj.weight", p, l);
    } else {
        ADD(D->q_proj, 2, nh * qk, H, 1, "%s.%d.self_attn.q_proj.weight", p, l);
    }
    ADD(D->kv_a_proj, 2, kv + rope, H, 1, "%s.%d.self_attn.kv_a_proj_with_mqa.weight", p, l);
    ADD(D->kv_a_layernorm, 1, kv, 0, 1, "%s.%d.self_attn.kv_a_layernorm.weight", p, l);
    ADD(D->kv_b_proj, 2, nh * (c->qk_nope_head_dim + c->v_head_dim), kv, 1,
        "%s.%d.self_attn.kv_b_proj.weight", p, l);
    ADD(D->o_proj, 2, H, nh * c->v_head_dim, 1, "%s.%d.self_attn.o_proj.weight", p, l);
    ADD(D->post_attention_layernorm, 1, H, 0, 1, "%s.%d.post_attention_layernorm.weight", p, l);
    if (!config_layer_is_moe(c, l)) {
        int64_t I = c->intermediate_size;
        ADD(D->gate_proj, 2, I, H, 1, "%s.%d.mlp.gate_proj.weight", p, l);
        ADD(D->up_proj, 2, I, H, 1, "%s.%d.mlp.up_proj.weight", p, l);
        ADD(D->down_proj, 2, H, I, 1, "%s.%d.mlp.down_proj.weight", p, l);
        return 0;
    }
    ADD(D->router, 2, E, H, 1, "%s.%d.mlp.gate.weight", p, l);
    ADD(D->router_bias, 1, E, 0, 0, "%s.%d.mlp.gate.e_score_correction_bias", p, l);
    if (L) {
        L->e_gate = calloc((size_t)E, sizeof(float *));
        L->e_up = calloc((size_t)E, sizeof(float *));
        L->e_down = calloc((size_t)E, sizeof(float *));
        if (!L->e_gate || !L->e_up || !L->e_down)
            return -1;
    }
    for (int x = 0; x < E; x++) {
        float *pg = add_x(w, (snprintf(n, sizeof n, "%s.%d.mlp.experts.%d.gate_proj.weight", p,
                                       l, x), n), 2, mi, H, 1, x);
        float *pu = add_x(w, (snprintf(n, sizeof n, "%s.%d.mlp.experts.%d.up_proj.weight", p, l,
                                       x), n), 2, mi, H, 1, x);
        float *pd = add_x(w, (snprintf(n, sizeof n, "%s.%d.mlp.experts.%d.down_proj.weight", p,
                                       l, x), n), 2, H, mi, 1, x);
        if (L) {
            L->e_gate[x] = pg;
            L->e_up[x] = pu;
            L->e_down[x] = pd;
        }
    }
    if (c->n_shared_experts) {
        int64_t si = mi * c->n_shared_experts;
        ADD(D->s_gate, 2, si, H, 1, "%s.%d.mlp.shared_experts.gate_proj.weight", p, l);
        ADD(D->s_up, 2, si, H, 1, "%s.%d.mlp.shared_experts.up_proj.weight", p, l);
        ADD(D->s_down, 2, H, si, 1, "%s.%d.mlp.shared_experts.down_proj.weight", p, l);
    }
    return 0;
}

static int layout(walk *w, model_weights *v)
{
    const dsv3_config *c = &w->m->cfg;
    int64_t H = c->hidden_size, V = c->vocab_size;
    int nl = c->num_hidden_layers, D = c->num_nextn_predict_layers;
    char n[96];
    model_weights dummy;
    model_weights *L = v;  /* ADD assigns when L is set */
    if (v) {
        memset(v, 0, sizeof *v);
        v->layers = calloc((size_t)nl, sizeof *v->layers);
        v->mtp = D ? calloc((size_t)D, sizeof *v->mtp) : NULL;
        if (!v->layers || (D && !v->mtp))
            return -1;
    } else {
        v = &dummy;
    }
    ADD(v->embed, 2, V, H, 1, "model.embed_tokens.weight");
    for (int l = 0; l < nl; l++)
        if (layout_block(w, L ? &v->layers[l] : NULL, l))
            return -1;
    ADD(v->final_norm, 1, H, 0, 1, "model.norm.weight");
    if (!c->tie_word_embeddings)
        ADD(v->lm_head, 2, V, H, 1, "lm_head.weight");
    else if (L)
        v->lm_head = v->embed;
    for (int k = 0; k < D; k++) {
        model_mtp *M = L ? &v->mtp[k] : NULL, md;
        if (!M)
            M = &md;
        int l = nl + k;
        ADD(M->enorm, 1, H, 0, 1, "model.layers.%d.enorm.weight", l);
        ADD(M->hnorm, 1, H, 0, 1, "model.layers.%d.hnorm.weight", l);
        ADD(M->eh_proj, 2, H, 2 * H, 1, "model.layers.%d.eh_proj.weight", l);
        if (layout_block(w, L ? &M->block : NULL, l))
            return -1;
        ADD(M->head_norm, 1, H, 0, 1, "model.layers.%d.shared_head.norm.weight", l);
    }
    return 0;
}
#undef ADD

static void free_layer(model_layer *L)
{
    free(L->e_gate);
    free(L->e_up);
    free(L->e_down);
}

static void free_view(const dsv3_config *c, model_weights *v)
{
    if (v->layers)
        for (int l = 0; l < c->num_hidden_layers; l++)
            free_layer(&v->layers[l]);
    if (v->mtp)
        for (int k = 0; k < c->num_nextn_predict_layers; k++)
            free_layer(&v->mtp[k].block);
    free(v->layers);
    free(v->mtp);
    memset(v, 0, sizeof *v);
}

void model_free(dsv3_model *m)
{
    free_view(&m->cfg, &m->w);
    free_view(&m->cfg, &m->g);
    free(m->t);
    free(m->params);
    free(m->grads);
    if (m->cfg.json)
        json_decref(m->cfg.json);
    memset(m, 0, sizeof *m);
}

static int is_norm(const char *name)
{
    size_t n = strlen(name);
    return n > 11 && (!strcmp(name + n - 11, "norm.weight"));
}

int model_init(dsv3_model *m, const dsv3_config *c, dsv3_err *e)
{
    return model_init_ep(m, c, 1, 0, e);
}

int model_init_ep(dsv3_model *m, const dsv3_config *c, int size, int group, dsv3_err *e)
{
    memset(m, 0, sizeof *m);
    if (config_check(c, "config", e))
        return -1;
    if (size < 1 || group < 0 || group >= size || (size > 1 && c->n_routed_experts % size))
        return err_set(e, "model: expert group %d of %d does not split %d routed experts",
                       group, size, c->n_routed_experts);
    m->cfg = *c;
    m->ep_size = size;
    m->ep_group = group;
    if (c->json)
        json_incref(c->json);
    walk count = {.m = m};  /* sizes the replicated part: the held experts go after it */
    layout(&count, NULL);
    walk w = {.m = m, .record = 1, .ebase = count.off};
    if (layout(&w, NULL) || w.failed) {
        model_free(m);
        return err_set(e, "model: out of memory for the parameter table");
    }
    m->n_params = w.off + w.eoff;
    m->n_dense = size > 1 ? w.off : m->n_params;
    m->params = malloc(m->n_params * sizeof(float));
    m->grads = calloc(m->n_params, sizeof(float));
    if (!m->params || !m->grads) {
        size_t gib = m->n_params * 8 >> 30;
        model_free(m);
        return err_set(e, "model: cannot allocate %zu GiB for parameters and gradients", gib);
    }
    walk wp = {.m = m, .base = m->params, .ebase = count.off};
    walk wg = {.m = m, .base = m->grads, .ebase = count.off};
    if (layout(&wp, &m->w) || layout(&wg, &m->g)) {
        model_free(m);
        return err_set(e, "model: out of memory");
    }
    /* Each tensor draws from its own stream, so tensors fill in parallel with the same
     * values in any order; a 16B-parameter config took minutes on one core. */
#pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < m->n_t; i++) {
        float *p = m->params + m->t[i].off;
        float val = is_norm(m->t[i].name) ? 1.0f : 0.0f;
        for (int64_t j = 0; j < m->t[i].numel; j++)
            p[j] = val;
    }
    return 0;
}

const model_tensor *model_find(const dsv3_model *m, const char *name)
{
    for (int i = 0; i < m->n_t; i++)
        if (!strcmp(m->t[i].name, name))
            return &m->t[i];
    return NULL;
}

void model_zero_grad(dsv3_model *m)
{
    memset(m->grads, 0, m->n_params * sizeof(float));
}

/* splitmix64 and Box-Muller: a normal stream that is the same on every machine. */
static uint64_t mix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static double normal(uint64_t *s)
{
    double u1 = ((mix(s) >> 11) + 1.0) * 0x1p-53, u2 = (mix(s) >> 11) * 0x1p-53;
    return sqrt(-2 * log(u1)) * cos(2 * M_PI * u2);
}

void model_init_random(dsv3_model *m, uint64_t seed, double std)
{
    if (std <= 0)
        std = m->cfg.initializer_range;
    /* Each tensor draws from its own stream, so tensors fill in parallel with the same
     * values in any order; a 16B-parameter config took minutes on one core. */
#pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < m->n_t; i++) {
        float *p = m->params + m->t[i].off;
        int norm = is_norm(m->t[i].name), bias = !m->t[i].trainable;
        /* the stream as if every earlier tensor had drawn: two mix() a normal */
        uint64_t s = seed + 2 * m->t[i].draw0 * 0x9e3779b97f4a7c15ULL;
        for (int64_t j = 0; j < m->t[i].numel; j++)
            p[j] = norm ? 1.0f : bias ? 0.0f : (float)(std * normal(&s));
    }
}

/* ---- checkpoints ---- */

/* Tensors of the MTP modules live at layer indices >= num_hidden_layers. */
static int is_mtp_name(const dsv3_config *c, const char *name)
{
    int l;
    if (sscanf(name, "model.layers.%d.", &l) == 1)
        return l >= c->num_hidden_layers;
    return 0;
}

/* The copies of the embedding and head that DeepSeek's checkpoint stores per MTP layer. */
static int is_mtp_copy(const dsv3_config *c, const char *name)
{
    int l, end = 0;
    if (sscanf(name, "model.layers.%d.%n", &l, &end) != 1 || !end)
        return 0;
    if (l < c->num_hidden_layers || l >= c->num_hidden_layers + c->num_nextn_predict_layers)
        return 0;
    return !strcmp(name + end, "embed_tokens.weight") ||
           !strcmp(name + end, "shared_head.head.weight");
}

/* Under expert parallelism: a routed expert's tensor of a group this model does not hold. */
static int other_group(const dsv3_model *m, const char *name)
{
    int l, x, end = 0;
    if (m->ep_size <= 1 ||
        sscanf(name, "model.layers.%d.mlp.experts.%d.%n", &l, &x, &end) != 2 || !end)
        return 0;
    int per = m->cfg.n_routed_experts / m->ep_size;
    return x >= 0 && x < m->cfg.n_routed_experts && x / per != m->ep_group;
}

/* The folder's tensor of that name in any of its files (the file in *file), or NULL. */
static const st_tensor *find_any(const st_file *fs, int nf, const char *name, int *file)
{
    for (int i = 0; i < nf; i++) {
        const st_tensor *t = st_find(&fs[i], name);
        if (t) {
            if (file)
                *file = i;
            return t;
        }
    }
    return NULL;
}

/* NAME_scale_inv of an F8_E4M3 tensor NAME of the folder: read with NAME, not a tensor of
 * its own. */
static int is_fp8_scale(const st_file *fs, int nf, const char *name)
{
    size_t n = strlen(name), k = strlen("_scale_inv");
    char base[256];
    if (n <= k || n - k >= sizeof base || strcmp(name + n - k, "_scale_inv"))
        return 0;
    memcpy(base, name, n - k);
    base[n - k] = 0;
    const st_tensor *b = find_any(fs, nf, base, NULL);
    return b && b->dtype == ST_F8_E4M3;
}

/* FP8 tensor s (in file path) into out as DeepSeek's release defines it: each element
 * f32(q) * the F32 scale of its 128x128 block (lib/fp8, ragged edge blocks), the scales in
 * s's NAME_scale_inv, which may lie in another shard. */
static int load_fp8(const st_file *fs, int nf, const char *path, const st_tensor *s,
                    float *out, dsv3_err *e)
{
    if (s->ndim != 2)
        return err_set(e, "%s: FP8 tensor \"%s\" is not 2-D (block scales need rows and "
                       "columns)", path, s->name);
    char sn[300];
    snprintf(sn, sizeof sn, "%s_scale_inv", s->name);
    int f = 0;
    const st_tensor *sc = find_any(fs, nf, sn, &f);
    int64_t br = fp8_blocks(s->shape[0]), bc = fp8_blocks(s->shape[1]);
    if (!sc)
        return err_set(e, "%s: FP8 tensor \"%s\" has no %s", path, s->name, sn);
    if (sc->dtype != ST_F32 || sc->ndim != 2 || sc->shape[0] != br || sc->shape[1] != bc) {
        char got[64] = "";
        for (int d = 0; d < sc->ndim && d < 4; d++)
            snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", d ? "," : "",
                     (long long)sc->shape[d]);
        return err_set(e, "%s: \"%s\" is %s [%s], the 128x128 blocks of \"%s\" need F32 "
                       "[%lld,%lld]", fs[f].path, sn, st_dtype_name(sc->dtype), got, s->name,
                       (long long)br, (long long)bc);
    }
    float *scale = malloc((size_t)(br * bc) * sizeof *scale);  /* the mapping may be unaligned */
    if (!scale)
        return err_set(e, "%s: out of memory", path);
    memcpy(scale, sc->data, (size_t)(br * bc) * sizeof *scale);
    fp8_dequant_weight(s->data, scale, s->shape[0], s->shape[1], out, 0);
    free(scale);
    return 0;
}

static int load_file(dsv3_model *m, const st_file *fs, int nf, int fi, unsigned char *seen,
                     int flags, dsv3_err *e)
{
    const st_file *f = &fs[fi];
    const char *path = f->path;
    for (int i = 0; i < f->n; i++) {
        const st_tensor *s = &f->t[i];
        const model_tensor *t = model_find(m, s->name);
        if (!t && is_fp8_scale(fs, nf, s->name))
            continue;
        if (!t && other_group(m, s->name))
            continue;
        if (!t && is_mtp_copy(&m->cfg, s->name)) {
            if (s->ndim != 2 || s->shape[0] != m->cfg.vocab_size ||
                s->shape[1] != m->cfg.hidden_size)
                return err_set(e, "%s: tensor \"%s\" is not [vocab_size, hidden_size]", path,
                               s->name);
            continue;
        }
        if (!t) {
            if ((flags & MODEL_LOAD_NO_MTP) && is_mtp_name(&m->cfg, s->name))
                continue;
            return err_set(e, "%s: tensor \"%s\" is not part of this model's config", path,
                           s->name);
        }
        int ok = s->ndim == t->ndim && s->shape[0] == t->shape[0] &&
                 (t->ndim == 1 || s->shape[1] == t->shape[1]);
        if (!ok) {
            char got[64] = "";
            for (int d = 0; d < s->ndim && d < 4; d++)
                snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", d ? "," : "",
                         (long long)s->shape[d]);
            return err_set(e, "%s: tensor \"%s\" has shape [%s], the config needs [%lld%s%.0lld]",
                           path, s->name, got, (long long)t->shape[0], t->ndim == 2 ? "," : "",
                           (long long)t->shape[1]);
        }
        if (s->dtype == ST_F8_E4M3) {
            if (load_fp8(fs, nf, path, s, m->params + t->off, e))
                return -1;
        } else if (st_to_f32(s, m->params + t->off, t->numel, e)) {
            return err_prefix(e, "%s", path);
        }
        seen[t - m->t] = 1;
    }
    return 0;
}

/* Opens DIR's safetensors files: the shards of model.safetensors.index.json, each once in
 * the order of first mention, or model.safetensors. */
static int open_files(const char *dir, st_file **out, int *n_out, dsv3_err *e)
{
    char path[4096];
    st_file *fs = NULL;
    int n = 0, rc = 0;
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    struct stat sb;
    if (stat(path, &sb) != 0) {
        fs = calloc(1, sizeof *fs);
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        if (!fs || st_open(fs, path, e)) {
            free(fs);
            return fs ? -1 : err_set(e, "%s: out of memory", dir);
        }
        *out = fs;
        *n_out = 1;
        return 0;
    }
    json_error_t je;
    json_t *idx = json_load_file(path, 0, &je);
    json_t *wm = idx ? json_object_get(idx, "weight_map") : NULL;
    if (!json_is_object(wm)) {
        json_decref(idx);
        return idx ? err_set(e, "%s: no \"weight_map\" object", path)
                   : err_set(e, "%s: %s (line %d)", path, je.text, je.line);
    }
    fs = calloc(json_object_size(wm) + 1, sizeof *fs);
    json_t *done = json_object();
    const char *key;
    json_t *val;
    json_object_foreach(wm, key, val) {
        if (!json_is_string(val) || strchr(json_string_value(val), '/')) {
            rc = err_set(e, "%s: weight_map[\"%s\"] is not a file name", path, key);
            break;
        }
        const char *fn = json_string_value(val);
        if (json_object_get(done, fn))
            continue;
        json_object_set_new(done, fn, json_true());
        char sp[4096];
        snprintf(sp, sizeof sp, "%s/%s", dir, fn);
        if ((rc = st_open(&fs[n], sp, e)))
            break;
        n++;
    }
    json_decref(done);
    json_decref(idx);
    if (rc) {
        for (int i = 0; i < n; i++)
            st_close(&fs[i]);
        free(fs);
        return -1;
    }
    *out = fs;
    *n_out = n;
    return 0;
}

int model_load(dsv3_model *m, const char *dir, dsv3_err *e)
{
    return model_load_flags(m, dir, 0, e);
}

int model_load_flags(dsv3_model *m, const char *dir, int flags, dsv3_err *e)
{
    return model_load_ep(m, dir, flags, 1, 0, e);
}

int model_load_ep(dsv3_model *m, const char *dir, int flags, int size, int group,
                  dsv3_err *e)
{
    char path[4096];
    dsv3_config c;
    memset(m, 0, sizeof *m);
    snprintf(path, sizeof path, "%s/config.json", dir);
    if (config_load(&c, path, e))
        return -1;
    st_file *fs = NULL;
    int nf = 0;
    if (open_files(dir, &fs, &nf, e)) {
        config_free(&c);
        return -1;
    }
    /* transformers' save_pretrained writes num_nextn_predict_layers 1 but no MTP tensors:
     * such a checkpoint has no MTP modules to load. */
    int any_mtp = 0;
    for (int i = 0; i < nf; i++)
        for (int j = 0; j < fs[i].n; j++)
            any_mtp |= is_mtp_name(&c, fs[i].t[j].name);
    if ((flags & MODEL_LOAD_NO_MTP) || !any_mtp)
        c.num_nextn_predict_layers = 0;
    int rc = model_init_ep(m, &c, size, group, e);
    config_free(&c);
    unsigned char *seen = rc ? NULL : calloc((size_t)m->n_t, 1);
    if (!rc && !seen)
        rc = err_set(e, "%s: out of memory", dir);
    for (int i = 0; i < nf && !rc; i++)
        rc = load_file(m, fs, nf, i, seen, flags | MODEL_LOAD_NO_MTP * !any_mtp, e);
    for (int i = 0; i < m->n_t && !rc; i++)
        if (!seen[i])
            rc = err_set(e, "%s: tensor \"%s\" is missing", dir, m->t[i].name);
    for (int i = 0; i < nf; i++)
        st_close(&fs[i]);
    free(fs);
    free(seen);
    if (rc)
        model_free(m);
    return rc;
}

int model_each_saved(const dsv3_model *m,
                     int (*fn)(void *ctx, const char *name, int ndim, const int64_t *shape,
                               const float *data),
                     void *ctx)
{
    const dsv3_config *c = &m->cfg;
    int64_t vh[2] = {c->vocab_size, c->hidden_size};
    char name[96];
    for (int i = 0; i < m->n_t; i++) {
        const model_tensor *t = &m->t[i];
        int rc = fn(ctx, t->name, t->ndim, t->shape, m->params + t->off);
        if (rc)
            return rc;
        /* After each MTP module's own tensors (its head norm closes it), the copies. */
        int l, end = 0;
        if (sscanf(t->name, "model.layers.%d.%n", &l, &end) == 1 && end &&
            l >= c->num_hidden_layers && !strcmp(t->name + end, "shared_head.norm.weight")) {
            snprintf(name, sizeof name, "model.layers.%d.embed_tokens.weight", l);
            if ((rc = fn(ctx, name, 2, vh, m->w.embed)))
                return rc;
            snprintf(name, sizeof name, "model.layers.%d.shared_head.head.weight", l);
            if ((rc = fn(ctx, name, 2, vh, m->w.lm_head)))
                return rc;
        }
    }
    return 0;
}

static int add_f32(void *ctx, const char *name, int ndim, const int64_t *shape,
                   const float *data)
{
    st_add(ctx, name, ST_F32, ndim, shape, data);
    return 0;
}

int model_save(const dsv3_model *m, const char *dir, dsv3_err *e)
{
    if (mkdir(dir, 0777) && errno != EEXIST)
        return err_errno(e, "%s", dir);
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    if (config_save(&m->cfg, path, e))
        return -1;
    st_writer w = {0};
    model_each_saved(m, add_f32, &w);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    int rc = st_write(&w, path, e);
    st_writer_free(&w);
    /* A sharded save's index would otherwise win over this file on the next load. */
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    if (!rc && unlink(path) && errno != ENOENT)
        rc = err_errno(e, "%s", path);
    return rc;
}

/* ---- activations ---- */

typedef struct layer_acts {
    float *x;                  /* [N,H] input of the layer (residual stream) */
    float *xn, *rstd1;         /* input_layernorm */
    float *qa, *qan, *rstdq;   /* q compression */
    float *q;                  /* [N, nh*qk], rope applied */
    float *kva;                /* [N, kv+rope] raw */
    float *ckv, *ckvn, *rstdkv;/* [N,kv] */
    float *kvb;                /* [N, nh*(nope+v)] */
    float *k, *v;              /* [N, nh*qk], [N, nh*v] assembled per head */
    float *att;                /* [B,nh,T,T] */
    float *ao;                 /* [N, nh*v] */
    float *x2, *x2n, *rstd2;   /* after attention residual; post_attention_layernorm */
    float *g, *u, *h;          /* dense [N,I] or shared experts [N, n_shared*mi] */
    float *logits, *s, *w;     /* router: [N,E], [N,E], [N,K] */
    int *idx;                  /* [N,K] */
    float *eg, *eu, *eh, *ey;  /* per routed slot (token, k): [N*K, mi] x3, [N*K, H] */
    int routed;                /* idx holds a routing (frozen routing may reuse it) */
    /* Expert parallelism, the holder's side of the last forward: rows received for this
     * rank's experts, kept for the backward. */
    int64_t *ep_cnt;           /* [ep size * per]: rows from block member g for held expert j */
    float *ep_buf;             /* x [R,H] then g, u, h [R,mi], rows expert by expert */
    size_t ep_cap;             /* floats ep_buf holds */
    int64_t ep_rows;           /* R */
    const uint8_t *valid;      /* [N] or NULL (all): MTP module k's block has placeholder
                                * rows (no t_{i+k} in the sequence or its document), left
                                * out of the balance loss and the load */
} layer_acts;

/* One MTP module's activations. */
typedef struct mtp_acts {
    int32_t *eid;              /* [N] id embedded at position i: t_{i+k}, 0 past the end */
    int32_t *tg;               /* [N] target t_{i+k+1} (targets shifted by k), -1 past the end */
    uint8_t *in;               /* [N] 1 where t_{i+k} lies in the row and row i's document */
    float *e, *en, *rstde;     /* embedding, enorm */
    float *hn, *rstdh;         /* hnorm of the previous depth's hidden state */
    float *cat;                /* [N, 2H] = [en; hn] */
    layer_acts blk;            /* blk.x = eh_proj(cat) */
    float *hout, *xf, *rstdf;  /* block output; shared_head.norm */
    float *logits;             /* [N, V] */
    double sum;                /* cross-entropy sum over count used rows */
    int count;
} mtp_acts;

struct model_acts {
    int B, T, N, n_layers;
    int freeze;
    int have_routing;
    int *pos;               /* [N] RoPE position of each row (0..T-1 unless set) */
    int32_t *seg;           /* [N] document of each row, NULL: one per sequence */
    int32_t *seg_buf;       /* storage behind seg */
    float *cos_t, *sin_t;
    layer_acts *l;
    float *hfinal, *xf, *rstdf, *logits;
    mtp_acts *mtp;          /* n_mtp modules, allocated at the first forward that runs them */
    int n_mtp, mtp_ran;     /* mtp_ran: the last forward ran them (with lambda mtp_lambda) */
    float mtp_lambda, balance_alpha;  /* the options the last forward used */
    double ce_sum;          /* main cross-entropy sum and count of the last forward */
    int ce_count;
    int64_t ce_norm;        /* what the main sum is divided by (norm_main or ce_count) */
    int64_t *mtp_norm;      /* [n_mtp]: the same for each MTP module */
    int64_t seq_norm;       /* what the balance loss's sum over sequences is divided by */
    int ep_failed;          /* this pass failed on this rank (or, ep_down, on another): ep_err */
    int ep_down;            /* the ranks agreed that the pass failed: no more exchanges */
    dsv3_err ep_err;
    double balance;         /* alpha-weighted balance loss of the last forward */
    float **all;   /* every allocation, for freeing */
    int n_all, cap_all;
    int failed;
};

static void *acts_alloc(model_acts *a, size_t n, size_t size)
{
    if (a->failed)
        return NULL;
    if (a->n_all == a->cap_all) {
        int cap = a->cap_all ? 2 * a->cap_all : 64;
        float **p = realloc(a->all, (size_t)cap * sizeof *p);
        if (!p) {
            a->failed = 1;
            return NULL;
        }
        a->all = p;
        a->cap_all = cap;
    }
    void *p = calloc(n ? n : 1, size);
    if (!p) {
        a->failed = 1;
        return NULL;
    }
    a->all[a->n_all++] = p;
    return p;
}

#define FL(n) acts_alloc(a, (size_t)(n), sizeof(float))

static void alloc_layer(model_acts *a, const dsv3_config *c, layer_acts *L, int l)
{
    int64_t N = a->N, B = a->B, T = a->T;
    int64_t H = c->hidden_size, nh = c->num_attention_heads, qk = config_qk_head_dim(c);
    int64_t kv = c->kv_lora_rank, rope = c->qk_rope_head_dim, dv = c->v_head_dim;
    int64_t K = c->num_experts_per_tok, E = c->n_routed_experts, mi = c->moe_intermediate_size;
    L->x = FL(N * H);
    L->xn = FL(N * H);
    L->rstd1 = FL(N);
    if (c->q_lora_rank) {
        L->qa = FL(N * c->q_lora_rank);
        L->qan = FL(N * c->q_lora_rank);
        L->rstdq = FL(N);
    }
    L->q = FL(N * nh * qk);
    L->kva = FL(N * (kv + rope));
    L->ckv = FL(N * kv);
    L->ckvn = FL(N * kv);
    L->rstdkv = FL(N);
    L->kvb = FL(N * nh * (c->qk_nope_head_dim + dv));
    L->k = FL(N * nh * qk);
    L->v = FL(N * nh * dv);
    L->att = FL(B * nh * T * T);
    L->ao = FL(N * nh * dv);
    L->x2 = FL(N * H);
    L->x2n = FL(N * H);
    L->rstd2 = FL(N);
    int64_t inter = config_layer_is_moe(c, l) ? mi * c->n_shared_experts : c->intermediate_size;
    L->g = FL(N * inter);
    L->u = FL(N * inter);
    L->h = FL(N * inter);
    if (config_layer_is_moe(c, l)) {
        L->logits = FL(N * E);
        L->s = FL(N * E);
        L->w = FL(N * K);
        L->idx = acts_alloc(a, (size_t)(N * K), sizeof(int));
        L->eg = FL(N * K * mi);
        L->eu = FL(N * K * mi);
        L->eh = FL(N * K * mi);
        L->ey = FL(N * K * H);
    }
}

/* The MTP modules' activations, on first use (most forwards never run them). */
static int alloc_mtp(model_acts *a, const dsv3_config *c)
{
    if (a->mtp)
        return 0;
    int D = c->num_nextn_predict_layers;
    int64_t N = a->N, H = c->hidden_size, V = c->vocab_size;
    mtp_acts *mt = acts_alloc(a, (size_t)D, sizeof *mt);
    for (int k = 0; k < D && mt && !a->failed; k++) {
        mtp_acts *M = &mt[k];
        M->eid = acts_alloc(a, (size_t)N, sizeof(int32_t));
        M->tg = acts_alloc(a, (size_t)N, sizeof(int32_t));
        M->in = acts_alloc(a, (size_t)N, 1);
        M->e = FL(N * H);
        M->en = FL(N * H);
        M->rstde = FL(N);
        M->hn = FL(N * H);
        M->rstdh = FL(N);
        M->cat = FL(N * 2 * H);
        alloc_layer(a, c, &M->blk, c->num_hidden_layers + k);
        M->blk.valid = M->in;
        M->hout = FL(N * H);
        M->xf = FL(N * H);
        M->rstdf = FL(N);
        M->logits = FL(N * V);
    }
    int64_t *mn = acts_alloc(a, (size_t)D, sizeof *mn);
    if (a->failed)
        return -1;
    a->mtp = mt;
    a->mtp_norm = mn;
    a->n_mtp = D;
    return 0;
}

model_acts *model_acts_new(const dsv3_model *m, int B, int T, dsv3_err *e)
{
    const dsv3_config *c = &m->cfg;
    model_acts *a = calloc(1, sizeof *a);
    if (!a) {
        err_set(e, "model: out of memory");
        return NULL;
    }
    a->B = B;
    a->T = T;
    int64_t N = (int64_t)B * T;
    a->N = (int)N;
    a->n_layers = c->num_hidden_layers;
    int64_t H = c->hidden_size, rope = c->qk_rope_head_dim;
    a->pos = acts_alloc(a, (size_t)N, sizeof(int));
    a->seg_buf = acts_alloc(a, (size_t)N, sizeof(int32_t));
    a->cos_t = FL(T * rope / 2);
    a->sin_t = FL(T * rope / 2);
    a->l = acts_alloc(a, (size_t)c->num_hidden_layers, sizeof(layer_acts));
    for (int l = 0; l < c->num_hidden_layers && !a->failed; l++)
        alloc_layer(a, c, &a->l[l], l);
    a->hfinal = FL(N * H);
    a->xf = FL(N * H);
    a->rstdf = FL(N);
    a->logits = FL(N * c->vocab_size);
    if (a->failed) {
        model_acts_free(a);
        err_set(e, "model: out of memory for activations of %d x %d tokens", B, T);
        return NULL;
    }
    for (int64_t i = 0; i < N; i++)
        a->pos[i] = (int)(i % T);
    double inv_freq[rope / 2 > 0 ? rope / 2 : 1];
    config_rope_inv_freq(c, inv_freq);
    rope_tables(a->cos_t, a->sin_t, inv_freq, T, (int)(rope / 2),
                config_rope_attention_factor(c));
    return a;
}

static void free_ep(layer_acts *L)
{
    free(L->ep_cnt);
    free(L->ep_buf);
}

void model_acts_free(model_acts *a)
{
    if (!a)
        return;
    for (int l = 0; a->l && l < a->n_layers; l++)
        free_ep(&a->l[l]);
    for (int k = 0; a->mtp && k < a->n_mtp; k++)
        free_ep(&a->mtp[k].blk);
    for (int i = 0; i < a->n_all; i++)
        free(a->all[i]);
    free(a->all);
    free(a);
}

const float *model_acts_logits(const model_acts *a)
{
    return a->logits;
}

const float *model_acts_hidden(const model_acts *a, int l)
{
    if (l < 0 || l > a->n_layers)
        return NULL;
    return l < a->n_layers ? a->l[l].x : a->hfinal;
}

int model_acts_set_segments(model_acts *a, const int32_t *segment, const int32_t *position)
{
    int T = a->T;
    for (int n = 0; n < a->N; n++) {
        if (position && (position[n] < 0 || position[n] >= T))
            return -1;
        if (segment && n % T && segment[n] < segment[n - 1])
            return -1;
    }
    for (int n = 0; n < a->N; n++)
        a->pos[n] = position ? position[n] : n % T;
    if (segment)
        memcpy(a->seg_buf, segment, (size_t)a->N * sizeof *segment);
    a->seg = segment ? a->seg_buf : NULL;
    return 0;
}

void model_acts_freeze_routing(model_acts *a, int on)
{
    a->freeze = on;
}

const float *model_acts_mtp_logits(const model_acts *a, int k)
{
    return a->mtp_ran && k >= 0 && k < a->n_mtp ? a->mtp[k].logits : NULL;
}

void model_acts_losses(const model_acts *a, model_losses *out)
{
    memset(out, 0, sizeof *out);
    out->main = a->ce_count ? a->ce_sum / (double)a->ce_norm : 0;
    if (a->mtp_ran) {
        double sum = 0;
        for (int k = 0; k < a->n_mtp; k++) {
            double lk = a->mtp[k].count ? a->mtp[k].sum / (double)a->mtp_norm[k] : 0;
            if (k < 8)
                out->mtp_k[k] = lk;
            sum += lk;
        }
        out->mtp = a->mtp_lambda / a->n_mtp * sum;
    }
    out->balance = a->balance;
    out->total = out->main + out->mtp + out->balance;
}

/* ---- forward ---- */

/* SwiGLU MLP on rows: y = W_down (silu(W_gate x) * W_up x). */
static void mlp_forward(float *y, float *g, float *u, float *h, const float *x, const float *wg,
                        const float *wu, const float *wd, int N, int H, int I)
{
    matmul_forward(g, x, wg, N, H, I);
    matmul_forward(u, x, wu, N, H, I);
    swiglu_forward(h, g, u, (int64_t)N * I);
    matmul_forward(y, h, wd, N, I, H);
}

/* Multi-head latent attention of one layer: L->xn in, out [N,H] (o_proj applied). */
static void mla_forward(const dsv3_model *m, model_acts *a, const model_layer *W, layer_acts *L,
                        float *out, float *scratch)
{
    const dsv3_config *c = &m->cfg;
    int N = a->N, H = c->hidden_size, nh = c->num_attention_heads, qk = config_qk_head_dim(c);
    int nope = c->qk_nope_head_dim, rope = c->qk_rope_head_dim, kv = c->kv_lora_rank;
    int dv = c->v_head_dim, half = rope / 2;
    float eps = (float)c->rms_norm_eps;
    /* q = W_qb RMSNorm(W_qa x), or W_q x without compression. The q_a_layernorm uses
     * transformers' default eps of 1e-6 (it is built without the config's), as does
     * kv_a_layernorm. */
    if (c->q_lora_rank) {
        matmul_forward(L->qa, L->xn, W->q_a_proj, N, H, c->q_lora_rank);
        rmsnorm_forward(L->qan, L->rstdq, L->qa, W->q_a_layernorm, N, c->q_lora_rank, 1e-6f);
        matmul_forward(L->q, L->qan, W->q_b_proj, N, c->q_lora_rank, nh * qk);
    } else {
        matmul_forward(L->q, L->xn, W->q_proj, N, H, nh * qk);
    }
    (void)eps;
    rope_forward(L->q + nope, N * nh, qk, nh, a->pos, a->cos_t, a->sin_t, half,
                 c->rope_interleave);
    /* [c_kv, k_pe] = W_kva x; k_nope and v come out of W_kvb RMSNorm(c_kv) per head, k_pe is
     * one rotated vector shared by all heads. */
    matmul_forward(L->kva, L->xn, W->kv_a_proj, N, H, kv + rope);
    float *kpe = scratch;  /* [N, rope] */
    for (int n = 0; n < N; n++) {
        memcpy(L->ckv + (int64_t)n * kv, L->kva + (int64_t)n * (kv + rope), (size_t)kv * 4);
        memcpy(kpe + (int64_t)n * rope, L->kva + (int64_t)n * (kv + rope) + kv,
               (size_t)rope * 4);
    }
    rmsnorm_forward(L->ckvn, L->rstdkv, L->ckv, W->kv_a_layernorm, N, kv, 1e-6f);
    matmul_forward(L->kvb, L->ckvn, W->kv_b_proj, N, kv, nh * (nope + dv));
    rope_forward(kpe, N, rope, 1, a->pos, a->cos_t, a->sin_t, half, c->rope_interleave);
    for (int n = 0; n < N; n++)
        for (int h = 0; h < nh; h++) {
            const float *src = L->kvb + ((int64_t)n * nh + h) * (nope + dv);
            float *kd = L->k + ((int64_t)n * nh + h) * qk;
            memcpy(kd, src, (size_t)nope * 4);
            memcpy(kd + nope, kpe + (int64_t)n * rope, (size_t)rope * 4);
            memcpy(L->v + ((int64_t)n * nh + h) * dv, src + nope, (size_t)dv * 4);
        }
    attention_forward_seg(L->ao, L->att, L->q, L->k, L->v, a->seg, a->B, a->T, nh, qk, dv,
                          (float)config_softmax_scale(c));
    matmul_forward(out, L->ao, W->o_proj, N, nh * dv, H);
}

/* Rows of sequence b that count in MTP block L's balance loss and load (all for a main
 * layer). */
static int row_valid(const layer_acts *L, int64_t n)
{
    return !L->valid || L->valid[n];
}

static int valid_rows(const model_acts *a, const layer_acts *L, int b)
{
    int T = 0;
    for (int t = 0; t < a->T; t++)
        T += row_valid(L, (int64_t)b * a->T + t);
    return T;
}

/* The sequence-wise balance loss of one MoE block (V3 report eq. 17-20), without alpha and
 * averaged over the B sequences: per sequence sum_i f_i P_i with f_i = E/(K T) * (tokens
 * that chose i) and P_i = mean over tokens of s'_i = s_i / sum_j s_j (unbiased affinities
 * of all routed experts). T counts the rows that are tokens: in MTP module k's block the
 * sequence is T - k long (report eq. 22), the rest placeholders; with documents packed in
 * a sequence, also the last k rows of each document. The sequence stays the unit (a packed
 * row, documents and all), as in V3's pre-training. */
static double balance_loss(const dsv3_config *c, const model_acts *a, const layer_acts *L)
{
    int E = c->n_routed_experts, K = c->num_experts_per_tok;
    double total = 0, f[E], P[E];
    for (int b = 0; b < a->B; b++) {
        int T = valid_rows(a, L, b);
        if (!T)
            continue;
        memset(f, 0, sizeof f);
        memset(P, 0, sizeof P);
        for (int t = 0; t < a->T; t++) {
            int64_t n = (int64_t)b * a->T + t;
            if (!row_valid(L, n))
                continue;
            const float *s = L->s + n * E;
            double S = 0;
            for (int i = 0; i < E; i++)
                S += s[i];
            for (int i = 0; i < E; i++)
                P[i] += s[i] / S;
            for (int k = 0; k < K; k++)
                f[L->idx[n * K + k]] += 1;
        }
        for (int i = 0; i < E; i++)
            total += (f[i] * E / ((double)K * T)) * (P[i] / T);
    }
    return total / (double)a->seq_norm;
}

/* Adds d(alpha * balance_loss)/d(router logits) into dlogits [N,E]; f is a constant (the
 * top-k choice), so only P carries a gradient: dL/ds'_i = alpha f_i / (B T), then through
 * s' = s / S and s = sigmoid(logit). */
static void balance_backward(const dsv3_config *c, const model_acts *a, const layer_acts *L,
                             float alpha, float *dlogits)
{
    int E = c->n_routed_experts, K = c->num_experts_per_tok;
    double f[E], g[E];
    for (int b = 0; b < a->B; b++) {
        int T = valid_rows(a, L, b);
        if (!T)
            continue;
        memset(f, 0, sizeof f);
        for (int t = 0; t < a->T; t++)
            if (row_valid(L, (int64_t)b * a->T + t))
                for (int k = 0; k < K; k++)
                    f[L->idx[((int64_t)b * a->T + t) * K + k]] += 1;
        for (int i = 0; i < E; i++)
            g[i] = alpha * (f[i] * E / ((double)K * T)) / ((double)T * (double)a->seq_norm);
        for (int t = 0; t < a->T; t++) {
            int64_t n = (int64_t)b * a->T + t;
            if (!row_valid(L, n))
                continue;
            const float *s = L->s + n * E;
            double S = 0, dot = 0;
            for (int i = 0; i < E; i++)
                S += s[i];
            for (int i = 0; i < E; i++)
                dot += g[i] * s[i] / S;
            for (int j = 0; j < E; j++)
                dlogits[n * E + j] += (float)((g[j] - dot) / S * s[j] * (1 - s[j]));
        }
    }
}

/* The (token, k) slots [0, n) grouped by expert: slots sorted by expert, then by slot;
 * expert x's are slots[off[x] .. off[x+1]). */
static int *sort_slots(const int *idx, int n, int E, int *off)
{
    int *slots = malloc((size_t)(n > 0 ? n : 1) * sizeof *slots);
    memset(off, 0, (size_t)(E + 1) * sizeof *off);
    for (int s = 0; s < n; s++)
        off[idx[s] + 1]++;
    for (int x = 0; x < E; x++)
        off[x + 1] += off[x];
    int *fill = malloc((size_t)(E > 0 ? E : 1) * sizeof *fill);
    memcpy(fill, off, (size_t)E * sizeof *fill);
    for (int s = 0; s < n; s++)
        slots[fill[idx[s]]++] = s;
    free(fill);
    return slots;
}

/* Experts on threads when there is enough work for a team (the matmuls inside then run
 * on the expert's thread alone). */
static int experts_parallel(const dsv3_config *c, int N)
{
    return (int64_t)N * c->num_experts_per_tok * c->hidden_size * c->moe_intermediate_size >
           (1 << 18);
}

static void mlp_backward(float *dx, const float *dy, const float *x, const float *g,
                         const float *u, const float *h, const float *wg, const float *wu,
                         const float *wd, float *dwg, float *dwu, float *dwd, int N, int H,
                         int I, float *tmp);

/* ---- expert parallelism: the holder's side ---- */

/* A failure of this rank's: kept (the first) for the end of the pass. */
static int ep_fail(model_acts *a, dsv3_err *e)
{
    if (!a->ep_failed) {
        a->ep_failed = 1;
        a->ep_err = *e;
    }
    return -1;
}

/* The end of a pass under expert parallelism: its first failure, if any. */
static int ep_result(model_acts *a, dsv3_err *e)
{
    if (!a->ep_failed)
        return 0;
    *e = a->ep_err;
    return -1;
}

/* A broken exchange: the communicator is of no more use in this pass. */
static int ep_broken(model_acts *a, dsv3_err *e)
{
    a->ep_down = 1;
    return ep_fail(a, e);
}

/* Before a block's rows move, the ranks agree (a MAX over the world) whether any failed in
 * this pass so far: a rank that failed after the forward's agreement (out of memory for
 * the rows it is to receive) still calls every collective up to here, with nothing to
 * send, so none waits in an exchange; then every rank stops exchanging for the rest of the
 * pass and returns -1 from it, the failing rank with its own message. Returns 1 when the
 * pass failed. */
static int ep_agree_ok(const dsv3_model *m, model_acts *a)
{
    int64_t v = a->ep_failed;
    dsv3_err ce;
    if (ep_max(m->ep, &v, 1, &ce)) {
        ep_broken(a, &ce);
        return 1;
    }
    if (!v)
        return 0;
    a->ep_down = 1;
    if (!a->ep_failed) {
        err_set(&ce, "%s (its message says why)", MODEL_EP_PEER_FAILED);
        ep_fail(a, &ce);
    }
    return 1;
}

/* Test aid (ep.fail_rank, ep.fail_at): this rank's fail_at-th buffer for received expert
 * rows (forward and backward blocks counted alike) fails as if memory ran out. */
static int ep_test_fail(ep *p)
{
    return p->fail_at > 0 && p->rank == p->fail_rank && ++p->n_allocs == p->fail_at;
}

/* Where the rows of (block member g, held expert j) sit: src[g * per + j] in the order they
 * arrive (member by member, expert by expert within), dst[...] in expert-major order
 * (expert by expert, member by member within), which the expert MLPs run on. */
static void ep_offsets(const int64_t *cnt, int S, int per, int64_t *src, int64_t *dst,
                       int64_t *from, int64_t *R)
{
    int64_t o = 0;
    for (int g = 0; g < S; g++) {
        from[g] = 0;
        for (int j = 0; j < per; j++) {
            src[g * per + j] = o;
            o += cnt[g * per + j];
            from[g] += cnt[g * per + j];
        }
    }
    *R = o;
    o = 0;
    for (int j = 0; j < per; j++)
        for (int g = 0; g < S; g++) {
            dst[g * per + j] = o;
            o += cnt[g * per + j];
        }
}

/* Rows of width w between arrival order and expert-major order (to_expert: arrival ->
 * expert-major). */
static void ep_permute(const int64_t *cnt, const int64_t *src, const int64_t *dst, int n,
                       float *out, const float *in, size_t w, int to_expert)
{
    for (int i = 0; i < n; i++) {
        const float *f = in + (to_expert ? src[i] : dst[i]) * (int64_t)w;
        float *t = out + (to_expert ? dst[i] : src[i]) * (int64_t)w;
        memcpy(t, f, (size_t)cnt[i] * w * sizeof *t);
    }
}

/* Rows routed on this rank to expert x: cnt_to[x], in xs [sum, H] sorted by expert. They go
 * to the ranks holding the experts, which run them and return ys [sum, H] in the same order.
 * The rows received for the held experts stay in L for the backward. A rank with nothing to
 * send passes zero counts (xs, ys unused). */
static int ep_forward(const dsv3_model *m, model_acts *a, const model_layer *W, layer_acts *L,
                      const int64_t *cnt_to, const float *xs, float *ys, dsv3_err *e)
{
    ep *p = m->ep;
    const dsv3_config *c = &m->cfg;
    int S = p->size, per = p->per, H = c->hidden_size, mi = c->moe_intermediate_size;
    int64_t to[S], from[S], src[S * per], dst[S * per], R, cnt_tmp[S * per];
    if (a->ep_down)
        return -1;
    /* every failure from here to the rows' exchange is reported at ep_agree_ok: the
     * counts exchange still runs (into cnt_tmp where ep_cnt is missing) */
    if (!L->ep_cnt && !(L->ep_cnt = malloc((size_t)S * per * sizeof *L->ep_cnt)))
        ep_fail(a, (err_set(e, "model: out of memory"), e));
    int64_t *cnt = L->ep_cnt ? L->ep_cnt : cnt_tmp;
    if (ep_exchange_counts(p, cnt_to, cnt, e))
        return ep_broken(a, e);
    for (int g = 0; g < S; g++) {
        to[g] = 0;
        for (int j = 0; j < per; j++)
            to[g] += cnt_to[g * per + j];
    }
    ep_offsets(cnt, S, per, src, dst, from, &R);
    L->ep_rows = a->ep_failed ? 0 : R;
    size_t need = (size_t)R * (H + 3 * (size_t)mi) + 1;
    if (!a->ep_failed && need > L->ep_cap) {
        float *b = realloc(L->ep_buf, need * sizeof *b);
        if (!b)
            ep_fail(a, (err_set(e, "model: out of memory for %lld expert rows", (long long)R),
                        e));
        else {
            L->ep_buf = b;
            L->ep_cap = need;
        }
    }
    float *io = NULL, *y = NULL;
    if (!a->ep_failed) {
        io = ep_test_fail(p) ? NULL : malloc(((size_t)R * H + 1) * sizeof *io);
        y = malloc(((size_t)R * H + 1) * sizeof *y);
        if (!io || !y)
            ep_fail(a, (err_set(e, "model: out of memory for %lld expert rows", (long long)R),
                        e));
    }
    if (ep_agree_ok(m, a)) {
        free(io);
        free(y);
        return -1;
    }
    float *x = L->ep_buf, *g = x + R * H, *u = g + R * mi, *h = u + R * mi;
    int rc = ep_exchange_rows(p, xs, to, io, from, (size_t)H, e);
    if (!rc) {
        ep_permute(L->ep_cnt, src, dst, S * per, x, io, (size_t)H, 1);
#pragma omp parallel for schedule(dynamic) if (R * H * mi > (1 << 18))
        for (int j = 0; j < per; j++) {
            int64_t o = dst[j], n = 0;
            for (int q = 0; q < S; q++)
                n += L->ep_cnt[q * per + j];
            if (n)
                mlp_forward(y + o * H, g + o * mi, u + o * mi, h + o * mi, x + o * H,
                            W->e_gate[p->group * per + j], W->e_up[p->group * per + j],
                            W->e_down[p->group * per + j], (int)n, H, mi);
        }
        ep_permute(L->ep_cnt, src, dst, S * per, io, y, (size_t)H, 0);
        rc = ep_exchange_rows(p, io, from, ys, to, (size_t)H, e);
    }
    free(io);
    free(y);
    return rc ? ep_broken(a, e) : 0;
}

/* The backward of ep_forward: dys [sum, H] (the routing weight applied) for the rows this
 * rank routed, in the forward's order, go to the experts' ranks; those add their experts'
 * weight gradients and return the rows' input gradients into dxs [sum, H]. */
static int ep_backward(const dsv3_model *m, model_acts *a, const model_layer *W,
                       const model_layer *G, layer_acts *L, const int64_t *cnt_to,
                       const float *dys, float *dxs, dsv3_err *e)
{
    ep *p = m->ep;
    const dsv3_config *c = &m->cfg;
    int S = p->size, per = p->per, H = c->hidden_size, mi = c->moe_intermediate_size;
    int64_t to[S], from[S], src[S * per], dst[S * per], R;
    if (a->ep_down)
        return -1;
    for (int g = 0; g < S; g++) {
        to[g] = 0;
        for (int j = 0; j < per; j++)
            to[g] += cnt_to[g * per + j];
    }
    ep_offsets(L->ep_cnt, S, per, src, dst, from, &R);
    float *x = L->ep_buf, *g = x + R * H, *u = g + R * mi, *h = u + R * mi;
    float *io = NULL, *dy = NULL, *dx = NULL, *tmp = NULL;
    if (!a->ep_failed) {
        io = ep_test_fail(p) ? NULL : malloc(((size_t)R * H + 1) * sizeof *io);
        dy = malloc(((size_t)R * H + 1) * sizeof *dy);
        dx = calloc((size_t)R * H + 1, sizeof *dx);
        tmp = malloc(((size_t)R * 3 * mi + 1) * sizeof *tmp);
        if (!io || !dy || !dx || !tmp)
            ep_fail(a, (err_set(e, "model: out of memory for %lld expert rows", (long long)R),
                        e));
    }
    int rc = ep_agree_ok(m, a) ? -1 : ep_exchange_rows(p, dys, to, io, from, (size_t)H, e);
    if (!rc) {
        ep_permute(L->ep_cnt, src, dst, S * per, dy, io, (size_t)H, 1);
#pragma omp parallel for schedule(dynamic) if (R * H * mi > (1 << 18))
        for (int j = 0; j < per; j++) {
            int64_t o = dst[j], n = 0;
            int xi = p->group * per + j;
            for (int q = 0; q < S; q++)
                n += L->ep_cnt[q * per + j];
            if (n)
                mlp_backward(dx + o * H, dy + o * H, x + o * H, g + o * mi, u + o * mi,
                             h + o * mi, W->e_gate[xi], W->e_up[xi], W->e_down[xi],
                             G->e_gate[xi], G->e_up[xi], G->e_down[xi], (int)n, H, mi,
                             tmp + 3 * o * mi);
        }
        ep_permute(L->ep_cnt, src, dst, S * per, io, dx, (size_t)H, 0);
        rc = ep_exchange_rows(p, io, from, dxs, to, (size_t)H, e);
    }
    free(io);
    free(dy);
    free(dx);
    free(tmp);
    return rc && !a->ep_down ? ep_broken(a, e) : rc;
}

static int ep_on(const dsv3_model *m)
{
    return m->ep && m->ep->size > 1;
}

/* The routed experts of one MoE block under expert parallelism: the rows go out sorted by
 * expert (slots, off), come back into L->ey. xs and ys: scratch of N*K rows. */
static void moe_experts_ep(const dsv3_model *m, model_acts *a, const model_layer *W,
                           layer_acts *L, const int *slots, const int *off, float *xs,
                           float *ys)
{
    const dsv3_config *c = &m->cfg;
    int N = a->N, H = c->hidden_size, E = c->n_routed_experts, K = c->num_experts_per_tok;
    int64_t cnt[E];
    for (int x = 0; x < E; x++)
        cnt[x] = off[x + 1] - off[x];
    for (int64_t r = 0; r < (int64_t)N * K; r++)
        memcpy(xs + r * H, L->x2n + (int64_t)(slots[r] / K) * H, (size_t)H * 4);
    dsv3_err e;
    if (ep_forward(m, a, W, L, cnt, xs, ys, &e))
        return;
    for (int64_t r = 0; r < (int64_t)N * K; r++)
        memcpy(L->ey + (int64_t)slots[r] * H, ys + r * H, (size_t)H * 4);
}

/* DeepSeekMoE: routed experts weighted by the router plus the shared experts. */
static void moe_forward(const dsv3_model *m, model_acts *a, const model_layer *W, layer_acts *L,
                        float *out, float *xs, float *ys)
{
    const dsv3_config *c = &m->cfg;
    int N = a->N, H = c->hidden_size, E = c->n_routed_experts, K = c->num_experts_per_tok;
    int mi = c->moe_intermediate_size;
    matmul_forward(L->logits, L->x2n, W->router, N, H, E);
    for (int n = 0; n < N; n++) {
        int *idx = L->idx + (int64_t)n * K;
        int frozen[K];
        int reuse = a->freeze && L->routed;
        if (reuse)
            memcpy(frozen, idx, sizeof frozen);
        if (m->route_nodes > 0)
            router_forward_limited(idx, L->w + (int64_t)n * K, L->s + (int64_t)n * E,
                                   L->logits + (int64_t)n * E, W->router_bias, E,
                                   m->route_nodes, m->route_limit, K / m->route_limit, K,
                                   c->norm_topk_prob, (float)c->routed_scaling_factor);
        else
            router_forward(idx, L->w + (int64_t)n * K, L->s + (int64_t)n * E,
                           L->logits + (int64_t)n * E, W->router_bias, E, c->n_group,
                           c->topk_group, K, c->norm_topk_prob,
                           (float)c->routed_scaling_factor);
        if (reuse) {
            /* Same experts as before, weights from this forward's affinities. */
            const float *s = L->s + (int64_t)n * E;
            double sum = 0;
            for (int k = 0; k < K; k++) {
                idx[k] = frozen[k];
                sum += s[idx[k]];
            }
            for (int k = 0; k < K; k++)
                L->w[(int64_t)n * K + k] =
                    (float)(c->norm_topk_prob ? s[idx[k]] / (sum + 1e-20) : s[idx[k]]) *
                    (float)c->routed_scaling_factor;
        }
    }
    /* Expert by expert over the (token, k) slots routed to it; experts on threads, each
     * in its own rows of the scratch (slots sorted by expert), writing only its slots. */
    int *off = malloc((size_t)(E + 1) * sizeof *off);
    int *slots = sort_slots(L->idx, N * K, E, off);
    if (ep_on(m))
        moe_experts_ep(m, a, W, L, slots, off, xs, ys);
#pragma omp parallel for schedule(dynamic) if (experts_parallel(c, N))
    for (int x = 0; x < (ep_on(m) ? 0 : E); x++) {
        int cnt = off[x + 1] - off[x];
        if (!cnt)
            continue;
        const int *sl = slots + off[x];
        float *xe = xs + (int64_t)off[x] * H, *ye = ys + (int64_t)off[x] * (3 * mi + H);
        for (int i = 0; i < cnt; i++)
            memcpy(xe + (int64_t)i * H, L->x2n + (int64_t)(sl[i] / K) * H, (size_t)H * 4);
        float *g = ye, *u = ye + (int64_t)cnt * mi, *h = ye + 2 * (int64_t)cnt * mi;
        float *y = ye + 3 * (int64_t)cnt * mi;
        mlp_forward(y, g, u, h, xe, W->e_gate[x], W->e_up[x], W->e_down[x], cnt, H, mi);
        for (int i = 0; i < cnt; i++) {
            int64_t s = sl[i];
            memcpy(L->eg + s * mi, g + (int64_t)i * mi, (size_t)mi * 4);
            memcpy(L->eu + s * mi, u + (int64_t)i * mi, (size_t)mi * 4);
            memcpy(L->eh + s * mi, h + (int64_t)i * mi, (size_t)mi * 4);
            memcpy(L->ey + s * H, y + (int64_t)i * H, (size_t)H * 4);
        }
    }
    free(slots);
    free(off);
    memset(out, 0, (size_t)N * H * 4);
    for (int64_t s = 0; s < (int64_t)N * K; s++) {
        float wt = L->w[s];
        float *o = out + (s / K) * H;
        const float *y = L->ey + s * H;
        for (int i = 0; i < H; i++)
            o[i] += wt * y[i];
    }
    if (c->n_shared_experts) {
        int si = mi * c->n_shared_experts;
        mlp_forward(ys, L->g, L->u, L->h, L->x2n, W->s_gate, W->s_up, W->s_down, N, H, si);
        for (int64_t i = 0; i < (int64_t)N * H; i++)
            out[i] += ys[i];
    }
    L->routed = 1;
    if (m->balance_alpha > 0)
        a->balance += m->balance_alpha * balance_loss(c, a, L);
}

/* Scratch big enough for any temporary of forward or backward. */
static size_t scratch_floats(const dsv3_config *c, int N)
{
    size_t H = (size_t)c->hidden_size, nh = (size_t)c->num_attention_heads;
    size_t K = (size_t)(c->num_experts_per_tok > 0 ? c->num_experts_per_tok : 1);
    size_t mi = (size_t)c->moe_intermediate_size, I = (size_t)c->intermediate_size;
    size_t qk = (size_t)config_qk_head_dim(c), kv = (size_t)c->kv_lora_rank;
    size_t wide = nh * (qk + c->v_head_dim + c->qk_nope_head_dim) + kv + 2 * qk + H + I + 4 * mi +
                  (size_t)c->n_shared_experts * mi;
    size_t per = 4 * H + wide + K * (H + 4 * mi) + (size_t)c->n_routed_experts + (size_t)c->q_lora_rank;
    if (per < (size_t)c->vocab_size)
        per = (size_t)c->vocab_size;
    return (size_t)N * per * 3 + 64;
}

/* One transformer block at layer index l: L->x in, next out [N,H]. */
static void block_forward(const dsv3_model *m, model_acts *a, const model_layer *W,
                          layer_acts *L, int l, float *next, float *scratch)
{
    const dsv3_config *c = &m->cfg;
    int N = a->N, H = c->hidden_size;
    float eps = (float)c->rms_norm_eps;
    float *out = scratch, *tmp = scratch + (int64_t)N * H;
    rmsnorm_forward(L->xn, L->rstd1, L->x, W->input_layernorm, N, H, eps);
    mla_forward(m, a, W, L, out, tmp);
    for (int64_t i = 0; i < (int64_t)N * H; i++)
        L->x2[i] = L->x[i] + out[i];
    rmsnorm_forward(L->x2n, L->rstd2, L->x2, W->post_attention_layernorm, N, H, eps);
    if (config_layer_is_moe(c, l))
        moe_forward(m, a, W, L, out, tmp, tmp + (int64_t)N * c->num_experts_per_tok * H);
    else
        mlp_forward(out, L->g, L->u, L->h, L->x2n, W->gate_proj, W->up_proj, W->down_proj, N,
                    H, c->intermediate_size);
    for (int64_t i = 0; i < (int64_t)N * H; i++)
        next[i] = L->x2[i] + out[i];
}

/* The MTP modules over the main model's last hidden state (see model.h). */
static void mtp_forward(const dsv3_model *m, model_acts *a, const int32_t *ids,
                        const int32_t *targets, float *scratch)
{
    const dsv3_config *c = &m->cfg;
    int N = a->N, T = a->T, H = c->hidden_size, V = c->vocab_size;
    float eps = (float)c->rms_norm_eps;
    const float *prev = a->hfinal;
    for (int k = 1; k <= a->n_mtp; k++) {
        mtp_acts *M = &a->mtp[k - 1];
        const model_mtp *W = &m->w.mtp[k - 1];
        /* Past the sequence's end there is no t_{i+k}: the module sees T - k tokens (report
         * eq. 22); with documents packed in the sequence, past the end of row i's document
         * neither (t_{i+k} belongs to another document: its target is ignored, as in a
         * document run alone and padded). The other rows embed token 0 as placeholders:
         * ignored by the cross-entropy, left out of the balance loss and the load; they
         * are the last rows of their document and attention stays inside it and causal,
         * so they reach no used row (their gradients are exactly zero). */
        for (int n = 0; n < N; n++) {
            int inside = n % T + k < T && (!a->seg || a->seg[n + k] == a->seg[n]);
            M->in[n] = (uint8_t)inside;
            M->eid[n] = inside ? ids[n + k] : 0;
            M->tg[n] = inside ? targets[n + k] : -1;
        }
        embedding_forward(M->e, m->w.embed, M->eid, N, H);
        rmsnorm_forward(M->en, M->rstde, M->e, W->enorm, N, H, eps);
        rmsnorm_forward(M->hn, M->rstdh, prev, W->hnorm, N, H, eps);
        for (int n = 0; n < N; n++) {
            memcpy(M->cat + (int64_t)n * 2 * H, M->en + (int64_t)n * H, (size_t)H * 4);
            memcpy(M->cat + (int64_t)n * 2 * H + H, M->hn + (int64_t)n * H, (size_t)H * 4);
        }
        matmul_forward(M->blk.x, M->cat, W->eh_proj, N, 2 * H, H);
        block_forward(m, a, &W->block, &M->blk, c->num_hidden_layers + k - 1, M->hout, scratch);
        rmsnorm_forward(M->xf, M->rstdf, M->hout, W->head_norm, N, H, eps);
        matmul_forward(M->logits, M->xf, m->w.lm_head, N, H, V);
        crossentropy_forward(&M->sum, &M->count, NULL, M->logits, M->tg, N, V);
        a->mtp_norm[k - 1] = m->norm_mtp && m->norm_mtp[k - 1] > 0 ? m->norm_mtp[k - 1]
                                                                     : M->count;
        prev = M->hout;
    }
}

int model_forward(dsv3_model *m, model_acts *a, const int32_t *ids, const int32_t *targets,
                  float *loss, dsv3_err *e)
{
    const dsv3_config *c = &m->cfg;
    int N = a->N, H = c->hidden_size, V = c->vocab_size;
    int run_mtp = targets && m->mtp_lambda > 0 && c->num_nextn_predict_layers > 0;
    /* under expert parallelism a failure here still takes part in the pass's exchanges
     * (model_ep_fail), so no other rank waits in one */
    for (int n = 0; n < N; n++)
        if (ids[n] < 0 || ids[n] >= V)
            return model_ep_fail(m, a, run_mtp, 0, (err_set(e, "model: token id %d at position %d "
                                "outside the vocabulary (vocab_size %d)", ids[n], n, V), e));
    if (targets)
        for (int n = 0; n < N; n++)
            if (targets[n] >= V)
                return model_ep_fail(m, a, run_mtp, 0, (err_set(e, "model: target %d at position "
                                    "%d outside the vocabulary", targets[n], n), e));
    if (run_mtp && alloc_mtp(a, c))
        return model_ep_fail(m, a, run_mtp, 0, (err_set(e, "model: out of memory for the MTP "
                                                     "modules' activations"), e));
    float *scratch = malloc(scratch_floats(c, N) * sizeof(float));
    if (!scratch)
        return model_ep_fail(m, a, run_mtp, 0, (err_set(e, "model: out of memory for scratch"), e));
    a->balance = 0;
    a->ep_failed = a->ep_down = 0;
    a->balance_alpha = m->balance_alpha;
    a->seq_norm = m->norm_seqs > 0 ? m->norm_seqs : a->B;
    a->ce_sum = 0;
    a->ce_count = 0;
    embedding_forward(a->l[0].x, m->w.embed, ids, N, H);
    for (int l = 0; l < c->num_hidden_layers; l++) {
        float *next = l + 1 < c->num_hidden_layers ? a->l[l + 1].x : a->hfinal;
        block_forward(m, a, &m->w.layers[l], &a->l[l], l, next, scratch);
    }
    rmsnorm_forward(a->xf, a->rstdf, a->hfinal, m->w.final_norm, N, H, (float)c->rms_norm_eps);
    matmul_forward(a->logits, a->xf, m->w.lm_head, N, H, V);
    a->mtp_ran = run_mtp;
    a->mtp_lambda = run_mtp ? m->mtp_lambda : 0;
    if (run_mtp)
        mtp_forward(m, a, ids, targets, scratch);
    a->have_routing = 1;
    free(scratch);
    if (ep_result(a, e))
        return -1;
    if (targets) {
        crossentropy_forward(&a->ce_sum, &a->ce_count, NULL, a->logits, targets, N, V);
        a->ce_norm = m->norm_main > 0 ? m->norm_main : a->ce_count;
        if (loss)
            *loss = a->ce_count ? (float)(a->ce_sum / a->ce_count) : 0.0f;
    }
    return 0;
}

void model_count_targets(const dsv3_model *m, const int32_t *targets, const int32_t *segment,
                         int B, int T, int64_t *main, int64_t *mtp)
{
    int D = m->cfg.num_nextn_predict_layers;
    int64_t N = (int64_t)B * T;
    *main = 0;
    for (int64_t n = 0; n < N; n++)
        *main += targets[n] >= 0;
    /* module k's target at row n: targets[n + k], with t_{n+k} in the row and document
     * (mtp_forward's rule) */
    for (int k = 1; k <= D; k++) {
        int64_t c = 0;
        for (int64_t n = 0; n < N; n++)
            c += n % T + k < T && (!segment || segment[n + k] == segment[n]) &&
                 targets[n + k] >= 0;
        mtp[k - 1] = c;
    }
}

/* ---- backward ---- */

static void mlp_backward(float *dx, const float *dy, const float *x, const float *g,
                         const float *u, const float *h, const float *wg, const float *wu,
                         const float *wd, float *dwg, float *dwu, float *dwd, int N, int H,
                         int I, float *tmp)
{
    float *dh = tmp, *dg = tmp + (int64_t)N * I, *du = tmp + 2 * (int64_t)N * I;
    memset(tmp, 0, (size_t)3 * N * I * sizeof(float));
    matmul_backward(dh, dwd, dy, h, wd, N, I, H);
    swiglu_backward(dg, du, dh, g, u, (int64_t)N * I);
    matmul_backward(dx, dwg, dg, x, wg, N, H, I);
    matmul_backward(dx, dwu, du, x, wu, N, H, I);
}

static void moe_backward(const dsv3_model *m, model_acts *a, const model_layer *W,
                         const model_layer *G, layer_acts *L, const float *dy, float *dx2n,
                         float *tmp)
{
    const dsv3_config *c = &m->cfg;
    int N = a->N, H = c->hidden_size, E = c->n_routed_experts, K = c->num_experts_per_tok;
    int mi = c->moe_intermediate_size;
    if (c->n_shared_experts)
        mlp_backward(dx2n, dy, L->x2n, L->g, L->u, L->h, W->s_gate, W->s_up, W->s_down,
                     G->s_gate, G->s_up, G->s_down, N, H, mi * c->n_shared_experts, tmp);
    /* d w_{t,k} = dy_t . y_{t,k}; d y_{t,k} = w_{t,k} dy_t. */
    float *dlogits = tmp;  /* [N,E] */
    memset(dlogits, 0, (size_t)N * E * 4);
    for (int n = 0; n < N; n++) {
        float dw[K];
        for (int k = 0; k < K; k++) {
            const float *y = L->ey + ((int64_t)n * K + k) * H;
            double d = 0;
            for (int i = 0; i < H; i++)
                d += (double)dy[(int64_t)n * H + i] * y[i];
            dw[k] = (float)d;
        }
        router_backward(dlogits + (int64_t)n * E, dw, L->idx + (int64_t)n * K,
                        L->s + (int64_t)n * E, E, K, c->norm_topk_prob,
                        (float)c->routed_scaling_factor);
    }
    if (a->balance_alpha > 0)
        balance_backward(c, a, L, a->balance_alpha, dlogits);
    matmul_backward(dx2n, G->router, dlogits, L->x2n, W->router, N, H, E);
    int *off = malloc((size_t)(E + 1) * sizeof *off);
    int *slots = sort_slots(L->idx, N * K, E, off);
    float *xs = tmp, *dys = xs + (int64_t)N * K * H, *g = dys + (int64_t)N * K * H;
    float *u = g + (int64_t)N * K * mi, *h = u + (int64_t)N * K * mi;
    float *dxs = h + (int64_t)N * K * mi, *t2 = dxs + (int64_t)N * K * H;
    if (ep_on(m)) {  /* the experts' ranks return the rows' input gradients in dxs */
        int64_t cnt[E];
        for (int x = 0; x < E; x++)
            cnt[x] = off[x + 1] - off[x];
        for (int64_t r = 0; r < (int64_t)N * K; r++) {
            int64_t sl = slots[r], n = sl / K;
            for (int j = 0; j < H; j++)
                dys[r * H + j] = L->w[sl] * dy[n * H + j];
        }
        dsv3_err e;
        if (ep_backward(m, a, W, G, L, cnt, dys, dxs, &e))
            memset(dxs, 0, (size_t)N * K * H * 4);
    }
    /* Experts on threads, each in its own rows (its weight gradients are its own); the
     * input gradients are summed into dx2n afterwards, in the serial order. */
#pragma omp parallel for schedule(dynamic) if (experts_parallel(c, N))
    for (int x = 0; x < (ep_on(m) ? 0 : E); x++) {
        int cnt = off[x + 1] - off[x];
        if (!cnt)
            continue;
        const int *sl = slots + off[x];
        int64_t o = off[x];
        for (int i = 0; i < cnt; i++) {
            int64_t s = sl[i], n = s / K, r = o + i;
            memcpy(xs + r * H, L->x2n + n * H, (size_t)H * 4);
            for (int j = 0; j < H; j++)
                dys[r * H + j] = L->w[s] * dy[n * H + j];
            memcpy(g + r * mi, L->eg + s * mi, (size_t)mi * 4);
            memcpy(u + r * mi, L->eu + s * mi, (size_t)mi * 4);
            memcpy(h + r * mi, L->eh + s * mi, (size_t)mi * 4);
        }
        memset(dxs + o * H, 0, (size_t)cnt * H * 4);
        mlp_backward(dxs + o * H, dys + o * H, xs + o * H, g + o * mi, u + o * mi, h + o * mi,
                     W->e_gate[x], W->e_up[x], W->e_down[x], G->e_gate[x], G->e_up[x],
                     G->e_down[x], cnt, H, mi, t2 + 3 * o * mi);
    }
    for (int r = 0; r < N * K; r++) {
        float *d = dx2n + (int64_t)(slots[r] / K) * H;
        for (int j = 0; j < H; j++)
            d[j] += dxs[(int64_t)r * H + j];
    }
    free(slots);
    free(off);
}

/* dout: gradient w.r.t. the attention block's output [N,H]; adds into dxn [N,H]. */
static void mla_backward(const dsv3_model *m, model_acts *a, const model_layer *W,
                         const model_layer *G, layer_acts *L, const float *dout, float *dxn,
                         float *tmp)
{
    const dsv3_config *c = &m->cfg;
    int N = a->N, H = c->hidden_size, nh = c->num_attention_heads, qk = config_qk_head_dim(c);
    int nope = c->qk_nope_head_dim, rope = c->qk_rope_head_dim, kv = c->kv_lora_rank;
    int dv = c->v_head_dim, half = rope / 2;
    float *dao = tmp, *dq = dao + (int64_t)N * nh * dv, *dk = dq + (int64_t)N * nh * qk;
    float *dvv = dk + (int64_t)N * nh * qk, *dkvb = dvv + (int64_t)N * nh * dv;
    float *dkva = dkvb + (int64_t)N * nh * (nope + dv), *dckv = dkva + (int64_t)N * (kv + rope);
    float *dckvn = dckv + (int64_t)N * kv, *dqa = dckvn + (int64_t)N * kv;
    float *dqan = dqa + (int64_t)N * c->q_lora_rank;
    size_t total = (size_t)(dqan + (int64_t)N * c->q_lora_rank - tmp);
    memset(tmp, 0, total * 4);
    matmul_backward(dao, G->o_proj, dout, L->ao, W->o_proj, N, nh * dv, H);
    attention_backward_seg(dq, dk, dvv, dao, L->att, L->q, L->k, L->v, a->seg, a->B, a->T, nh,
                           qk, dv, (float)config_softmax_scale(c));
    /* Split dK back into k_nope (per head, into kv_b's output) and k_pe (summed over heads:
     * one vector serves them all). */
    for (int n = 0; n < N; n++)
        for (int h = 0; h < nh; h++) {
            const float *dkh = dk + ((int64_t)n * nh + h) * qk;
            float *dst = dkvb + ((int64_t)n * nh + h) * (nope + dv);
            memcpy(dst, dkh, (size_t)nope * 4);
            memcpy(dst + nope, dvv + ((int64_t)n * nh + h) * dv, (size_t)dv * 4);
            float *dpe = dkva + (int64_t)n * (kv + rope) + kv;
            for (int r = 0; r < rope; r++)
                dpe[r] += dkh[nope + r];
        }
    rope_backward(dkva + kv, N, kv + rope, 1, a->pos, a->cos_t, a->sin_t, half,
                  c->rope_interleave);
    matmul_backward(dckvn, G->kv_b_proj, dkvb, L->ckvn, W->kv_b_proj, N, kv, nh * (nope + dv));
    rmsnorm_backward(dckv, G->kv_a_layernorm, dckvn, L->ckv, W->kv_a_layernorm, L->rstdkv, N,
                     kv);
    for (int n = 0; n < N; n++)
        memcpy(dkva + (int64_t)n * (kv + rope), dckv + (int64_t)n * kv, (size_t)kv * 4);
    matmul_backward(dxn, G->kv_a_proj, dkva, L->xn, W->kv_a_proj, N, H, kv + rope);
    rope_backward(dq + nope, N * nh, qk, nh, a->pos, a->cos_t, a->sin_t, half,
                  c->rope_interleave);
    if (c->q_lora_rank) {
        matmul_backward(dqan, G->q_b_proj, dq, L->qan, W->q_b_proj, N, c->q_lora_rank, nh * qk);
        rmsnorm_backward(dqa, G->q_a_layernorm, dqan, L->qa, W->q_a_layernorm, L->rstdq, N,
                         c->q_lora_rank);
        matmul_backward(dxn, G->q_a_proj, dqa, L->xn, W->q_a_proj, N, H, c->q_lora_rank);
    } else {
        matmul_backward(dxn, G->q_proj, dq, L->xn, W->q_proj, N, H, nh * qk);
    }
}

/* One block backward: dx holds d(loss)/d(block output) on entry and d(loss)/d(block input)
 * on return; dn and tmp are scratch. */
static void block_backward(const dsv3_model *m, model_acts *a, const model_layer *W,
                           const model_layer *G, layer_acts *L, int l, float *dx, float *dn,
                           float *tmp)
{
    const dsv3_config *c = &m->cfg;
    int N = a->N, H = c->hidden_size;
    /* x_{l+1} = x2 + mlp(norm(x2)): dx flows to x2 directly and through the MLP. */
    memset(dn, 0, (size_t)N * H * 4);
    if (config_layer_is_moe(c, l))
        moe_backward(m, a, W, G, L, dx, dn, tmp);
    else
        mlp_backward(dn, dx, L->x2n, L->g, L->u, L->h, W->gate_proj, W->up_proj, W->down_proj,
                     G->gate_proj, G->up_proj, G->down_proj, N, H, c->intermediate_size, tmp);
    rmsnorm_backward(dx, G->post_attention_layernorm, dn, L->x2, W->post_attention_layernorm,
                     L->rstd2, N, H);
    /* x2 = x + attn(norm(x)). */
    memset(dn, 0, (size_t)N * H * 4);
    mla_backward(m, a, W, G, L, dx, dn, tmp);
    rmsnorm_backward(dx, G->input_layernorm, dn, L->x, W->input_layernorm, L->rstd1, N, H);
}

/* The MTP modules backward, last depth first. Leaves in dcarry d(loss)/d(main model's last
 * hidden state) from module 1's hnorm. Buffers: dlogits [N,V], dx, dn, dh, dcarry [N,H],
 * dcat [N,2H], tmp. */
static void mtp_backward(dsv3_model *m, model_acts *a, float *dlogits, float *dx, float *dn,
                         float *dh, float *dcarry, float *dcat, float *tmp)
{
    const dsv3_config *c = &m->cfg;
    int N = a->N, H = c->hidden_size, V = c->vocab_size, D = a->n_mtp;
    memset(dcarry, 0, (size_t)N * H * 4);
    for (int k = D; k >= 1; k--) {
        mtp_acts *M = &a->mtp[k - 1];
        const model_mtp *W = &m->w.mtp[k - 1], *G = &m->g.mtp[k - 1];
        const float *prev = k > 1 ? a->mtp[k - 2].hout : a->hfinal;
        memcpy(dx, dcarry, (size_t)N * H * 4);
        if (M->count) {
            crossentropy_backward(dlogits, M->logits, M->tg, N, V,
                                  a->mtp_lambda / D / (float)a->mtp_norm[k - 1]);
            memset(dn, 0, (size_t)N * H * 4);
            matmul_backward(dn, m->g.lm_head, dlogits, M->xf, m->w.lm_head, N, H, V);
            rmsnorm_backward(dx, G->head_norm, dn, M->hout, W->head_norm, M->rstdf, N, H);
        }
        block_backward(m, a, &W->block, &G->block, &M->blk, c->num_hidden_layers + k - 1, dx,
                       dn, tmp);
        memset(dcat, 0, (size_t)N * 2 * H * 4);
        matmul_backward(dcat, G->eh_proj, dx, M->cat, W->eh_proj, N, 2 * H, H);
        for (int n = 0; n < N; n++) {
            memcpy(dn + (int64_t)n * H, dcat + (int64_t)n * 2 * H, (size_t)H * 4);
            memcpy(dh + (int64_t)n * H, dcat + (int64_t)n * 2 * H + H, (size_t)H * 4);
        }
        memset(dx, 0, (size_t)N * H * 4);
        rmsnorm_backward(dx, G->enorm, dn, M->e, W->enorm, M->rstde, N, H);
        embedding_backward(m->g.embed, dx, M->eid, N, H);
        memset(dcarry, 0, (size_t)N * H * 4);
        rmsnorm_backward(dcarry, G->hnorm, dh, prev, W->hnorm, M->rstdh, N, H);
    }
}

int model_backward(dsv3_model *m, model_acts *a, const int32_t *ids, const int32_t *targets,
                   dsv3_err *e)
{
    const dsv3_config *c = &m->cfg;
    int N = a->N, H = c->hidden_size, V = c->vocab_size;
    if (!a->have_routing)
        return err_set(e, "model: backward without a forward");  /* a caller's bug */
    int count = 0;
    for (int n = 0; n < N; n++)
        count += targets[n] >= 0;
    if (!count && !a->mtp_ran && a->balance_alpha <= 0 && !ep_on(m))
        return 0;  /* the loss is a constant 0 (with experts on other ranks: still serve) */
    a->ep_failed = a->ep_down = 0;
    size_t sf = scratch_floats(c, N);
    float *buf = malloc((sf + (size_t)N * V + 7 * (size_t)N * H) * sizeof(float));
    if (!buf)
        return model_ep_fail(m, a, a->mtp_ran, 1,
                             (err_set(e, "model: out of memory for backward"), e));
    float *dlogits = buf, *dx = dlogits + (int64_t)N * V, *dn = dx + (int64_t)N * H;
    float *dy = dn + (int64_t)N * H, *dc = dy + (int64_t)N * H, *dcat = dc + (int64_t)N * H;
    float *tmp = dcat + 2 * (int64_t)N * H;
    memset(dx, 0, (size_t)N * H * 4);
    if (a->mtp_ran) {
        mtp_backward(m, a, dlogits, dx, dn, dy, dc, dcat, tmp);
        memcpy(dx, dc, (size_t)N * H * 4);
    }
    if (count) {
        crossentropy_backward(dlogits, a->logits, targets, N, V, 1.0f / (float)a->ce_norm);
        memset(dn, 0, (size_t)N * H * 4);
        matmul_backward(dn, m->g.lm_head, dlogits, a->xf, m->w.lm_head, N, H, V);
        rmsnorm_backward(dx, m->g.final_norm, dn, a->hfinal, m->w.final_norm, a->rstdf, N, H);
    }
    for (int l = c->num_hidden_layers - 1; l >= 0; l--)
        block_backward(m, a, &m->w.layers[l], &m->g.layers[l], &a->l[l], l, dx, dn, tmp);
    embedding_backward(m->g.embed, dx, ids, N, H);
    free(buf);
    return ep_result(a, e);
}

/* The exchanges of a pass with no rows of this rank's: the forward's blocks in order
 * (fwd), then the backward's in reverse (bwd). A module whose activations are missing (their
 * allocation failed: a->ep_failed) exchanges through a scratch block. */
static void ep_walk(dsv3_model *m, model_acts *a, int mtp, int fwd, int bwd)
{
    const dsv3_config *c = &m->cfg;
    int nl = c->num_hidden_layers, D = c->num_nextn_predict_layers;
    int64_t zero[c->n_routed_experts > 0 ? c->n_routed_experts : 1];
    memset(zero, 0, sizeof zero);
    layer_acts none;
    memset(&none, 0, sizeof none);
    dsv3_err e;
    for (int l = 0; fwd && l < nl; l++)
        if (config_layer_is_moe(c, l))
            ep_forward(m, a, &m->w.layers[l], &a->l[l], zero, NULL, NULL, &e);
    for (int k = 0; fwd && mtp && k < D; k++)
        if (config_layer_is_moe(c, nl + k))
            ep_forward(m, a, &m->w.mtp[k].block, a->mtp ? &a->mtp[k].blk : &none, zero, NULL,
                       NULL, &e);
    for (int k = D - 1; bwd && mtp && k >= 0; k--)
        if (config_layer_is_moe(c, nl + k))
            ep_backward(m, a, &m->w.mtp[k].block, &m->g.mtp[k].block,
                        a->mtp ? &a->mtp[k].blk : &none, zero, NULL, NULL, &e);
    for (int l = nl - 1; bwd && l >= 0; l--)
        if (config_layer_is_moe(c, l))
            ep_backward(m, a, &m->w.layers[l], &m->g.layers[l], &a->l[l], zero, NULL, NULL, &e);
    free(none.ep_cnt);
    free(none.ep_buf);
}

int model_ep_idle(dsv3_model *m, model_acts *a, int mtp, int backward, dsv3_err *e)
{
    const dsv3_config *c = &m->cfg;
    if (!ep_on(m))
        return 0;
    a->ep_failed = a->ep_down = 0;
    mtp = mtp && c->num_nextn_predict_layers > 0;
    if (mtp && alloc_mtp(a, c))
        ep_fail(a, (err_set(e, "model: out of memory for the MTP modules' activations"), e));
    ep_walk(m, a, mtp, 1, 0);
    /* the backward's exchanges run only where the forward's all did (its ranks agreed) */
    if (backward && !a->ep_down) {
        a->ep_failed = 0;
        ep_walk(m, a, mtp, 0, 1);
    }
    return ep_result(a, e);
}

int model_ep_fail(dsv3_model *m, model_acts *a, int mtp, int backward, dsv3_err *e)
{
    if (!ep_on(m))
        return -1;
    a->ep_failed = a->ep_down = 0;
    ep_fail(a, e);
    ep_walk(m, a, mtp && m->cfg.num_nextn_predict_layers > 0, !backward, backward);
    *e = a->ep_err;
    return -1;
}

int64_t model_ep_rows(const model_acts *a, int l)
{
    if (l >= 0 && l < a->n_layers)
        return a->l[l].ep_rows;
    l -= a->n_layers;
    return a->mtp && l >= 0 && l < a->n_mtp ? a->mtp[l].blk.ep_rows : 0;
}

/* ---- load balancing ---- */

int model_expert_load(const dsv3_model *m, const model_acts *a, int l, int64_t *counts)
{
    const dsv3_config *c = &m->cfg;
    if (l < 0 || l >= c->num_hidden_layers || !config_layer_is_moe(c, l) || !a->have_routing)
        return -1;
    memset(counts, 0, (size_t)c->n_routed_experts * sizeof *counts);
    for (int64_t s = 0; s < (int64_t)a->N * c->num_experts_per_tok; s++)
        counts[a->l[l].idx[s]]++;
    return 0;
}

static void bias_step(float *b, const int64_t *load, int E, int64_t total, float gamma)
{
    for (int i = 0; i < E; i++) {
        int64_t d = total - load[i] * E;
        b[i] += d > 0 ? gamma : d < 0 ? -gamma : 0.0f;
    }
}

void model_balance_update(dsv3_model *m, const model_acts *a, float gamma)
{
    const dsv3_config *c = &m->cfg;
    int E = c->n_routed_experts;
    int64_t *load = malloc((size_t)(E > 0 ? E : 1) * sizeof *load);
    if (!load)
        return;
    /* mean load = N*K/E; compare load_i * E with N*K to stay in integers. */
    int64_t total = (int64_t)a->N * c->num_experts_per_tok;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        if (model_expert_load(m, a, l, load))
            continue;
        bias_step(m->w.layers[l].router_bias, load, E, total, gamma);
    }
    /* The MTP modules' blocks route too, when the last forward ran them. */
    for (int k = 0; k < c->num_nextn_predict_layers; k++) {
        int64_t used;
        if (model_mtp_expert_load(m, a, k, load, &used) == 0)
            bias_step(m->w.mtp[k].block.router_bias, load, E, used, gamma);
    }
    free(load);
}

int model_mtp_expert_load(const dsv3_model *m, const model_acts *a, int k, int64_t *counts,
                          int64_t *slots)
{
    const dsv3_config *c = &m->cfg;
    if (k < 0 || !a->mtp_ran || k >= a->n_mtp || !a->mtp[k].blk.routed)
        return -1;
    const layer_acts *L = &a->mtp[k].blk;
    memset(counts, 0, (size_t)c->n_routed_experts * sizeof *counts);
    int64_t used = 0, K = c->num_experts_per_tok;
    /* only the positions with a real t_{i+k} route (report eq. 22) */
    for (int64_t n = 0; n < a->N; n++)
        if (row_valid(L, n)) {
            for (int64_t j = 0; j < K; j++)
                counts[L->idx[n * K + j]]++;
            used += K;
        }
    *slots = used;
    return 0;
}
