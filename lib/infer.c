#include "infer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"
#include "sampler.h"
#include "../kernels/ginfer.h"
#include "../kernels/ginfer_mtp.h"

/* ---- linear layers for decoding ----
 * lib/ops' matmul_forward walks rows outside and weights inside, so a call of B rows streams
 * every weight matrix from memory B times, and its scalar four-way sum leaves most of a SIMD
 * unit idle. Decoding is bound by reading weights: here each weight row is read once for all
 * the call's rows (it stays in L1 while they pass), and the dot product runs on four
 * 4-float vector accumulators. Every output element is one dot() in a fixed order, whatever
 * the number of rows or threads, so a row's result does not depend on its batch. */
typedef float v4f __attribute__((vector_size(16)));

static float dot(const float *x, const float *w, int I)
{
    v4f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    int i = 0;
    for (; i + 16 <= I; i += 16) {
        v4f x0, x1, x2, x3, w0, w1, w2, w3;
        memcpy(&x0, x + i, 16);
        memcpy(&x1, x + i + 4, 16);
        memcpy(&x2, x + i + 8, 16);
        memcpy(&x3, x + i + 12, 16);
        memcpy(&w0, w + i, 16);
        memcpy(&w1, w + i + 4, 16);
        memcpy(&w2, w + i + 8, 16);
        memcpy(&w3, w + i + 12, 16);
        a0 += x0 * w0;
        a1 += x1 * w1;
        a2 += x2 * w2;
        a3 += x3 * w3;
    }
    v4f a = (a0 + a1) + (a2 + a3);
    float sum = (a[0] + a[1]) + (a[2] + a[3]);
    for (; i < I; i++)
        sum += x[i] * w[i];
    return sum;
}

/* out[N,O] = in[N,I] . w[O,I]^T, as matmul_forward. */
static void linear(float *out, const float *in, const float *w, int N, int I, int O)
{
#pragma omp parallel for schedule(static) if ((int64_t)N * I * O > 65536)
    for (int o = 0; o < O; o++) {
        const float *wr = w + (size_t)o * I;
        for (int n = 0; n < N; n++)
            out[(size_t)n * O + o] = dot(in + (size_t)n * I, wr, I);
    }
}

/* Per-call buffers, grown to the largest call so far. */
typedef struct scratch {
    int rows;
    int *pos;
    float *x, *xn, *x2, *x2n, *out, *rstd;
    float *qa, *qan, *q, *kva, *ckv, *ckvn, *kpe, *ao;
    float *g, *u, *h;                      /* dense MLP or shared experts [R, inter] */
    float *rl, *rs, *rw;                   /* router logits, affinities [R,E], weights [R,K] */
    int *idx, *off, *sl;                   /* [R,K], [E+1], [R,K] */
    float *xe, *ye, *ey;                   /* expert inputs, work, outputs per slot */
    float *cat;                            /* MTP: [R, 2H] embedding and hidden, normed */
    int *sl2;                              /* MTP: [R] each row's slot */
} scratch;

struct infer {
    const dsv3_model *m;
    ginfer *g;                  /* the GPU engine, or NULL: the CPU path below */
    int vocab, layers;
    int *gpos;                  /* [gpos_n] positions of a GPU call's rows */
    int gpos_n;
    uint8_t *ban;               /* [vocab] or NULL: ids greedy steps leave out */
    float *glog;                /* [glog_n * vocab]: the CPU's logits of a greedy step */
    int glog_n;
    int n_ctx, n_slots, width;  /* width = kv_lora_rank + qk_rope_head_dim */
    float *cache;               /* [layers][slots][n_ctx][width] */
    int *len;                   /* [slots] */
    float *cos_t, *sin_t;       /* [n_ctx, rope/2] */
    scratch s;
    /* The MTP stream (infer_use_mtp): module 1's block caches its latents as layer `layers`
     * of cache. mlen[slot] positions of the stream are cached; the main model's hidden
     * states (before the final norm) and ids of positions mlen..len-1 wait in ph / pid
     * until the token after each is known. */
    int mtp;
    int *mlen, *pcap;           /* [slots] */
    float **ph;                 /* [slots][pcap * hidden] */
    int32_t **pid;              /* [slots][pcap] */
    /* On the GPU the hidden states stay on the device (kernels/ginfer_mtp); the ids fed at
     * each position of each slot are kept here: [slots][n_ctx]. */
    int32_t *gid;
    /* Greedy steps queued (infer_greedy_submit), oldest first from aq0 (anq of them), ring
     * place k: aq_n[k] rows, on the device (aq_dev) or run at once with the ids in aq_out[k].
     * a_slot, a_pos: the slots of the rows last given (a_n of them; room for a_cap) and
     * their positions in the last step on the device. */
    int aq0, anq, aq_n[2], aq_dev[2];
    int32_t *aq_out[2];
    int *a_slot, *a_pos, a_n, a_cap;
    /* the rows' draws (infer_draw_submit; a_drawn 0: greedy), moved on by each step run
     * here; the candidates of such a step */
    sampler_draw *a_draw;
    int a_drawn;
    sampler_cand *a_cand;
    int32_t *a_tid;
    float *a_tlg;
    size_t a_top;  /* room of those three, candidates */
};

static float *cache_at(const infer *f, int l, int slot, int pos)
{
    return f->cache + (((size_t)l * f->n_slots + slot) * f->n_ctx + pos) * f->width;
}

int infer_new(infer **out, const dsv3_model *m, int n_ctx, int n_slots, dsv3_err *e)
{
    const dsv3_config *c = &m->cfg;
    if (n_ctx < 1 || n_slots < 1)
        return err_set(e, "infer: a context of %d tokens and %d slots", n_ctx, n_slots);
    infer *f = calloc(1, sizeof *f);
    if (!f)
        return err_set(e, "infer: out of memory");
    f->m = m;
    f->n_ctx = n_ctx;
    f->n_slots = n_slots;
    f->vocab = c->vocab_size;
    f->layers = c->num_hidden_layers;
    f->width = c->kv_lora_rank + c->qk_rope_head_dim;
    size_t cache = (size_t)c->num_hidden_layers * n_slots * n_ctx * f->width;
    int half = c->qk_rope_head_dim / 2;
    f->cache = malloc(cache * sizeof(float));
    f->len = calloc((size_t)n_slots, sizeof *f->len);
    f->cos_t = malloc((size_t)n_ctx * (half ? half : 1) * sizeof(float));
    f->sin_t = malloc((size_t)n_ctx * (half ? half : 1) * sizeof(float));
    if (!f->cache || !f->len || !f->cos_t || !f->sin_t) {
        infer_free(f);
        return err_set(e, "infer: out of memory for a cache of %d slots x %d tokens (%.1f MiB)",
                       n_slots, n_ctx, cache * 4.0 / (1 << 20));
    }
    double inv_freq[half > 0 ? half : 1];
    config_rope_inv_freq(c, inv_freq);
    rope_tables(f->cos_t, f->sin_t, inv_freq, n_ctx, half, config_rope_attention_factor(c));
    *out = f;
    return 0;
}

static void scratch_free(scratch *s)
{
    void *p[] = {s->pos, s->x, s->xn, s->x2, s->x2n, s->out, s->rstd, s->qa, s->qan, s->q,
                 s->kva, s->ckv, s->ckvn, s->kpe, s->ao, s->g, s->u, s->h, s->rl, s->rs,
                 s->rw, s->idx, s->off, s->sl, s->xe, s->ye, s->ey, s->cat, s->sl2};
    for (size_t i = 0; i < sizeof p / sizeof *p; i++)
        free(p[i]);
    memset(s, 0, sizeof *s);
}

/* The GPU engine from a model (m) or a folder (dir); mtp: with the MTP module. */
static int new_gpu(infer **out, const dsv3_model *m, const char *dir, int n_ctx, int n_slots,
                   int dev, int exact, int mtp, dsv3_err *e)
{
    if (n_ctx < 1 || n_slots < 1)
        return err_set(e, "infer: a context of %d tokens and %d slots", n_ctx, n_slots);
    infer *f = calloc(1, sizeof *f);
    if (!f || !(f->len = calloc((size_t)n_slots, sizeof *f->len))) {
        free(f);
        return err_set(e, "infer: out of memory");
    }
    f->n_ctx = n_ctx;
    f->n_slots = n_slots;
    if (mtp ? ginfer_create_mtp(&f->g, m, dir, n_ctx, n_slots, dev, exact, e)
        : m ? ginfer_create(&f->g, m, n_ctx, n_slots, dev, exact, e)
            : ginfer_create_dir(&f->g, dir, n_ctx, n_slots, dev, e)) {
        infer_free(f);
        return -1;
    }
    ginfer_dims(f->g, &f->vocab, &f->layers, &f->width);
    *out = f;
    return 0;
}

int infer_new_gpu(infer **out, const dsv3_model *m, int n_ctx, int n_slots, int dev, int exact,
                  dsv3_err *e)
{
    return new_gpu(out, m, NULL, n_ctx, n_slots, dev, exact, 0, e);
}

int infer_new_gpu_dir(infer **out, const char *dir, int n_ctx, int n_slots, int dev,
                      dsv3_err *e)
{
    return new_gpu(out, NULL, dir, n_ctx, n_slots, dev, 0, 0, e);
}

int infer_new_gpu_mtp(infer **out, const dsv3_model *m, const char *dir, int n_ctx, int n_slots,
                      int dev, int exact, dsv3_err *e)
{
    return new_gpu(out, m, m ? NULL : dir, n_ctx, n_slots, dev, exact, 1, e);
}

const char *infer_device(const infer *f)
{
    return f->g ? ginfer_describe(f->g) : "cpu";
}

long infer_graph_replays(const infer *f)
{
    return f->g ? ginfer_graph_replays(f->g) : 0;
}

double infer_graph_seconds(const infer *f)
{
    return f->g ? ginfer_graph_seconds(f->g) : 0;
}

void infer_free(infer *f)
{
    if (!f)
        return;
    ginfer_destroy(f->g);
    free(f->gpos);
    free(f->aq_out[0]);
    free(f->aq_out[1]);
    free(f->a_slot);
    free(f->a_pos);
    free(f->a_draw);
    free(f->a_cand);
    free(f->a_tid);
    free(f->a_tlg);
    free(f->ban);
    free(f->glog);
    scratch_free(&f->s);
    free(f->cache);
    free(f->len);
    free(f->cos_t);
    free(f->sin_t);
    for (int i = 0; f->ph && i < f->n_slots; i++) {
        free(f->ph[i]);
        free(f->pid[i]);
    }
    free(f->gid);
    free(f->mlen);
    free(f->pcap);
    free(f->ph);
    free(f->pid);
    free(f);
}

int infer_n_ctx(const infer *f) { return f->n_ctx; }
int infer_n_slots(const infer *f) { return f->n_slots; }
int infer_vocab(const infer *f) { return f->vocab; }

size_t infer_cache_bytes(const infer *f)
{
    if (f->g)
        return ginfer_cache_bytes(f->g);
    return (size_t)(f->layers + f->mtp) * f->n_slots * f->n_ctx * f->width * 4;
}

size_t infer_cache_bytes_per_token(const infer *f)
{
    if (f->g)
        return ginfer_cache_bytes_per_token(f->g);
    return (size_t)(f->layers + f->mtp) * f->width * 4;
}

int infer_slot_len(const infer *f, int slot) { return f->len[slot]; }

void infer_slot_clear(infer *f, int slot)
{
    f->len[slot] = 0;
    if (f->mtp)
        f->mlen[slot] = 0;
}

int infer_slot_truncate(infer *f, int slot, int n, dsv3_err *e)
{
    if (slot < 0 || slot >= f->n_slots || n < 0 || n > f->len[slot])
        return err_set(e, "infer: cannot cut slot %d to %d tokens", slot, n);
    /* The MTP stream's position n-1 needs the hidden state of main position n-1 and the
     * token after it, which must not be one that is cut. */
    if (f->mtp && n > 0 && n <= f->mlen[slot])
        return err_set(e, "infer: slot %d: the MTP stream has passed position %d", slot, n - 1);
    f->len[slot] = n;
    if (f->mtp && !n)
        f->mlen[slot] = 0;
    return 0;
}

/* The GPU engine's stream: the module is on the device already (infer_new_gpu_mtp). */
static int use_mtp_gpu(infer *f, dsv3_err *e)
{
    if (!ginfer_has_mtp(f->g))
        return err_set(e, "infer: this GPU engine was made without the MTP module "
                       "(infer_new_gpu_mtp)");
    f->mlen = calloc((size_t)f->n_slots, sizeof *f->mlen);
    f->gid = malloc((size_t)f->n_slots * f->n_ctx * sizeof *f->gid);
    if (!f->mlen || !f->gid)
        return err_set(e, "infer: out of memory");
    f->mtp = 1;
    for (int i = 0; i < f->n_slots; i++)
        f->len[i] = 0;
    return 0;
}

int infer_use_mtp(infer *f, dsv3_err *e)
{
    if (f->mtp)
        return 0;
    if (f->g)
        return use_mtp_gpu(f, e);
    if (f->m->cfg.num_nextn_predict_layers < 1 || !f->m->w.mtp)
        return err_set(e, "the model has no MTP module (num_nextn_predict_layers is 0, or the "
                       "checkpoint holds no MTP tensors)");
    size_t per = (size_t)f->n_slots * f->n_ctx * f->width;
    float *c = realloc(f->cache, (f->layers + 1) * per * sizeof(float));
    if (!c)
        return err_set(e, "infer: out of memory for the MTP module's cache");
    f->cache = c;
    f->mlen = calloc((size_t)f->n_slots, sizeof *f->mlen);
    f->pcap = calloc((size_t)f->n_slots, sizeof *f->pcap);
    f->ph = calloc((size_t)f->n_slots, sizeof *f->ph);
    f->pid = calloc((size_t)f->n_slots, sizeof *f->pid);
    if (!f->mlen || !f->pcap || !f->ph || !f->pid)
        return err_set(e, "infer: out of memory");
    f->mtp = 1;
    /* Sequences already cached have no waiting hidden states: the stream starts over. */
    for (int i = 0; i < f->n_slots; i++)
        f->len[i] = 0;
    return 0;
}

int infer_mtp_on(const infer *f) { return f->mtp; }

static int scratch_grow(scratch *s, const dsv3_config *c, int R)
{
    if (R <= s->rows)
        return 0;
    scratch_free(s);
    size_t H = (size_t)c->hidden_size, nh = (size_t)c->num_attention_heads;
    size_t qk = (size_t)config_qk_head_dim(c), kv = (size_t)c->kv_lora_rank;
    size_t rope = (size_t)c->qk_rope_head_dim, dv = (size_t)c->v_head_dim;
    size_t E = (size_t)c->n_routed_experts, K = (size_t)c->num_experts_per_tok;
    size_t mi = (size_t)c->moe_intermediate_size;
    size_t inter = (size_t)c->intermediate_size;
    if (mi * c->n_shared_experts > inter)
        inter = mi * c->n_shared_experts;
    size_t r = (size_t)R, q = c->q_lora_rank ? (size_t)c->q_lora_rank : 1;
#define A(p, n) ((p) = malloc(((size_t)(n) + 1) * sizeof *(p)))
    int bad = !A(s->pos, r) | !A(s->x, r * H) | !A(s->xn, r * H) | !A(s->x2, r * H) |
              !A(s->x2n, r * H) | !A(s->out, r * H) | !A(s->rstd, r) | !A(s->qa, r * q) |
              !A(s->qan, r * q) | !A(s->q, r * nh * qk) | !A(s->kva, r * (kv + rope)) |
              !A(s->ckv, r * kv) | !A(s->ckvn, r * kv) | !A(s->kpe, r * rope) |
              !A(s->ao, r * nh * dv) | !A(s->g, r * inter) | !A(s->u, r * inter) |
              !A(s->h, r * inter) | !A(s->rl, r * E) | !A(s->rs, r * E) | !A(s->rw, r * K) |
              !A(s->idx, r * K) | !A(s->off, E + 1) | !A(s->sl, r * K) |
              !A(s->xe, r * K * H) | !A(s->ye, r * K * (3 * mi + H)) | !A(s->ey, r * K * H) |
              !A(s->cat, r * 2 * H) | !A(s->sl2, r);
#undef A
    if (bad) {
        scratch_free(s);
        return -1;
    }
    s->rows = R;
    return 0;
}

/* Absorbed attention of one row and head over its slot's cached positions 0..pos:
 * q_lat = W_uk^T q_nope; p = softmax(scale (q_lat . c_kv_t + q_pe . k_pe_t));
 * o = W_uv (sum_t p_t c_kv_t). Dot products in double, as attention_forward takes them. */
static void attend(const infer *f, int l, int slot, int pos, const float *qh, const float *wkvb,
                   float *o, double *qlat, float *p, double *olat)
{
    const dsv3_config *c = &f->m->cfg;
    int nope = c->qk_nope_head_dim, rope = c->qk_rope_head_dim, kv = c->kv_lora_rank;
    int dv = c->v_head_dim;
    float scale = (float)config_softmax_scale(c);
    for (int j = 0; j < kv; j++)
        qlat[j] = 0;
    for (int d = 0; d < nope; d++) {
        double qd = qh[d];
        const float *w = wkvb + (size_t)d * kv;
        for (int j = 0; j < kv; j++)
            qlat[j] += qd * w[j];
    }
    const float *qpe = qh + nope;
    float mx = -INFINITY;
    for (int t = 0; t <= pos; t++) {
        const float *ct = cache_at(f, l, slot, t);
        double sc = 0;
        for (int j = 0; j < kv; j++)
            sc += qlat[j] * ct[j];
        for (int j = 0; j < rope; j++)
            sc += (double)qpe[j] * ct[kv + j];
        p[t] = (float)sc * scale;
        if (p[t] > mx)
            mx = p[t];
    }
    double sum = 0;
    for (int t = 0; t <= pos; t++) {
        p[t] = expf(p[t] - mx);
        sum += p[t];
    }
    for (int j = 0; j < kv; j++)
        olat[j] = 0;
    for (int t = 0; t <= pos; t++) {
        double pt = p[t] / sum;
        const float *ct = cache_at(f, l, slot, t);
        for (int j = 0; j < kv; j++)
            olat[j] += pt * ct[j];
    }
    const float *wuv = wkvb + (size_t)nope * kv;
    for (int d = 0; d < dv; d++) {
        double a = 0;
        const float *w = wuv + (size_t)d * kv;
        for (int j = 0; j < kv; j++)
            a += olat[j] * w[j];
        o[d] = (float)a;
    }
}

/* MLA of one layer over the call's rows: s->xn in, s->out [R,H] (o_proj applied); appends
 * each row's c_kv and k_pe to its slot's cache first, so rows of one slot see each other. */
static void mla(infer *f, const model_layer *W, int l, int R, const int *slot)
{
    const dsv3_config *c = &f->m->cfg;
    scratch *s = &f->s;
    int H = c->hidden_size, nh = c->num_attention_heads, qk = config_qk_head_dim(c);
    int nope = c->qk_nope_head_dim, rope = c->qk_rope_head_dim, kv = c->kv_lora_rank;
    int dv = c->v_head_dim, half = rope / 2;
    /* The q_a and kv_a norms use transformers' default eps of 1e-6, as lib/model does. */
    if (c->q_lora_rank) {
        linear(s->qa, s->xn, W->q_a_proj, R, H, c->q_lora_rank);
        rmsnorm_forward(s->qan, s->rstd, s->qa, W->q_a_layernorm, R, c->q_lora_rank, 1e-6f);
        linear(s->q, s->qan, W->q_b_proj, R, c->q_lora_rank, nh * qk);
    } else {
        linear(s->q, s->xn, W->q_proj, R, H, nh * qk);
    }
    rope_forward(s->q + nope, R * nh, qk, nh, s->pos, f->cos_t, f->sin_t, half,
                 c->rope_interleave);
    linear(s->kva, s->xn, W->kv_a_proj, R, H, kv + rope);
    for (int r = 0; r < R; r++) {
        memcpy(s->ckv + (size_t)r * kv, s->kva + (size_t)r * (kv + rope), (size_t)kv * 4);
        memcpy(s->kpe + (size_t)r * rope, s->kva + (size_t)r * (kv + rope) + kv,
               (size_t)rope * 4);
    }
    rmsnorm_forward(s->ckvn, s->rstd, s->ckv, W->kv_a_layernorm, R, kv, 1e-6f);
    rope_forward(s->kpe, R, rope, 1, s->pos, f->cos_t, f->sin_t, half, c->rope_interleave);
    for (int r = 0; r < R; r++) {
        float *dst = cache_at(f, l, slot[r], s->pos[r]);
        memcpy(dst, s->ckvn + (size_t)r * kv, (size_t)kv * 4);
        memcpy(dst + kv, s->kpe + (size_t)r * rope, (size_t)rope * 4);
    }
    int max_pos = 0;
    for (int r = 0; r < R; r++)
        if (s->pos[r] > max_pos)
            max_pos = s->pos[r];
#pragma omp parallel
    {
        double *qlat = malloc((size_t)kv * 2 * sizeof(double));
        float *p = malloc((size_t)(max_pos + 1) * sizeof(float));
#pragma omp for collapse(2) schedule(static)
        for (int r = 0; r < R; r++)
            for (int h = 0; h < nh; h++)
                attend(f, l, slot[r], s->pos[r], s->q + ((size_t)r * nh + h) * qk,
                       W->kv_b_proj + (size_t)h * (nope + dv) * kv,
                       s->ao + ((size_t)r * nh + h) * dv, qlat, p, qlat + kv);
        free(qlat);
        free(p);
    }
    linear(s->out, s->ao, W->o_proj, R, nh * dv, H);
}

static void mlp(float *y, float *g, float *u, float *h, const float *x, const float *wg,
                const float *wu, const float *wd, int N, int H, int I)
{
    linear(g, x, wg, N, H, I);
    linear(u, x, wu, N, H, I);
    swiglu_forward(h, g, u, (int64_t)N * I);
    linear(y, h, wd, N, I, H);
}

/* DeepSeekMoE over the rows: s->x2n in, s->out. Experts one after another over the (row, k)
 * slots routed to them (each expert's weights read once per call), summed per row in k
 * order and then the shared experts, as lib/model sums them. */
static void moe(infer *f, const model_layer *W, int R)
{
    const dsv3_config *c = &f->m->cfg;
    scratch *s = &f->s;
    int H = c->hidden_size, E = c->n_routed_experts, K = c->num_experts_per_tok;
    int mi = c->moe_intermediate_size;
    linear(s->rl, s->x2n, W->router, R, H, E);
    for (int r = 0; r < R; r++)
        router_forward(s->idx + (size_t)r * K, s->rw + (size_t)r * K, s->rs + (size_t)r * E,
                       s->rl + (size_t)r * E, W->router_bias, E, c->n_group, c->topk_group, K,
                       c->norm_topk_prob, (float)c->routed_scaling_factor);
    int n = R * K, *off = s->off;
    memset(off, 0, (size_t)(E + 1) * sizeof *off);
    for (int i = 0; i < n; i++)
        off[s->idx[i] + 1]++;
    for (int x = 0; x < E; x++)
        off[x + 1] += off[x];
    int cursor[E > 0 ? E : 1], *order = s->sl;  /* (row, k) slots sorted by expert */
    memcpy(cursor, off, (size_t)E * sizeof *cursor);
    for (int i = 0; i < n; i++)
        order[cursor[s->idx[i]]++] = i;
#pragma omp parallel for schedule(dynamic) \
    if ((int64_t)n * H * mi > (1 << 18))
    for (int x = 0; x < E; x++) {
        int cnt = off[x + 1] - off[x];
        if (!cnt)
            continue;
        const int *sl = order + off[x];
        float *xe = s->xe + (size_t)off[x] * H, *ye = s->ye + (size_t)off[x] * (3 * mi + H);
        for (int i = 0; i < cnt; i++)
            memcpy(xe + (size_t)i * H, s->x2n + (size_t)(sl[i] / K) * H, (size_t)H * 4);
        float *g = ye, *u = ye + (size_t)cnt * mi, *h = ye + 2 * (size_t)cnt * mi;
        float *y = ye + 3 * (size_t)cnt * mi;
        mlp(y, g, u, h, xe, W->e_gate[x], W->e_up[x], W->e_down[x], cnt, H, mi);
        for (int i = 0; i < cnt; i++)
            memcpy(s->ey + (size_t)sl[i] * H, y + (size_t)i * H, (size_t)H * 4);
    }
    memset(s->out, 0, (size_t)R * H * 4);
    for (int i = 0; i < n; i++) {
        float wt = s->rw[i];
        float *o = s->out + (size_t)(i / K) * H;
        const float *y = s->ey + (size_t)i * H;
        for (int j = 0; j < H; j++)
            o[j] += wt * y[j];
    }
    if (c->n_shared_experts) {
        int si = mi * c->n_shared_experts;
        float *ys = s->xe;  /* free again: [R,H] fits in [R*K,H] */
        mlp(ys, s->g, s->u, s->h, s->x2n, W->s_gate, W->s_up, W->s_down, R, H, si);
        for (size_t i = 0; i < (size_t)R * H; i++)
            s->out[i] += ys[i];
    }
}

/* Each row's position in its slot; fails, changing nothing, on a bad slot, id or a full
 * context. */
static int positions(const infer *f, int n, const int *slot, const int32_t *ids, int *pos,
                     dsv3_err *e)
{
    int grow[f->n_slots];
    memset(grow, 0, sizeof grow);
    for (int r = 0; r < n; r++) {
        if (slot[r] < 0 || slot[r] >= f->n_slots)
            return err_set(e, "infer: slot %d outside 0..%d", slot[r], f->n_slots - 1);
        if (ids && (ids[r] < 0 || ids[r] >= f->vocab))
            return err_set(e, "token id %d outside the vocabulary (vocab_size %d)", ids[r],
                           f->vocab);
        pos[r] = f->len[slot[r]] + grow[slot[r]]++;
        if (pos[r] >= f->n_ctx)
            return err_set(e, "the context is full: %d tokens (--ctx)", f->n_ctx);
    }
    return 0;
}

/* Room for the positions of a GPU call's n rows. */
static int gpos_reserve(infer *f, int n, dsv3_err *e)
{
    if (n > f->gpos_n) {
        int *p = realloc(f->gpos, (size_t)n * sizeof *p);
        if (!p)
            return err_set(e, "infer: out of memory for %d rows", n);
        f->gpos = p;
        f->gpos_n = n;
    }
    return 0;
}

/* With the MTP stream on a GPU engine: the ids of a call's rows, for the stream's rows. */
static void keep_ids(infer *f, int n, const int *slot, const int32_t *ids)
{
    for (int r = 0; f->gid && r < n; r++)
        f->gid[(size_t)slot[r] * f->n_ctx + f->gpos[r]] = ids[r];
}

static int forward_gpu(infer *f, int n, const int *slot, const int32_t *ids,
                       const uint8_t *want, float *logits, dsv3_err *e)
{
    if (gpos_reserve(f, n, e) || positions(f, n, slot, ids, f->gpos, e) ||
        ginfer_forward(f->g, n, slot, f->gpos, ids, want, logits, e))
        return -1;
    keep_ids(f, n, slot, ids);
    for (int r = 0; r < n; r++)
        f->len[slot[r]]++;
    return 0;
}

/* One transformer block (cache layer l, is-MoE by block index l) over s->x in place. */
static void block(infer *f, const model_layer *W, int l, int n, const int *slot)
{
    const dsv3_config *c = &f->m->cfg;
    scratch *s = &f->s;
    int H = c->hidden_size;
    float eps = (float)c->rms_norm_eps;
    rmsnorm_forward(s->xn, s->rstd, s->x, W->input_layernorm, n, H, eps);
    mla(f, W, l, n, slot);
    for (size_t i = 0; i < (size_t)n * H; i++)
        s->x2[i] = s->x[i] + s->out[i];
    rmsnorm_forward(s->x2n, s->rstd, s->x2, W->post_attention_layernorm, n, H, eps);
    if (config_layer_is_moe(c, l))
        moe(f, W, n);
    else
        mlp(s->out, s->g, s->u, s->h, s->x2n, W->gate_proj, W->up_proj, W->down_proj, n, H,
            c->intermediate_size);
    for (size_t i = 0; i < (size_t)n * H; i++)
        s->x[i] = s->x2[i] + s->out[i];
}

/* Room in each slot's waiting MTP rows for a call's rows (before anything changes). */
static int pending_reserve(infer *f, int n, const int *slot, const int *pos)
{
    int H = f->m->cfg.hidden_size;
    for (int r = 0; r < n; r++) {
        int sl = slot[r], need = pos[r] - f->mlen[sl] + 1;
        if (need <= f->pcap[sl])
            continue;
        int cap = need > 2 * f->pcap[sl] ? need : 2 * f->pcap[sl];
        float *h = realloc(f->ph[sl], (size_t)cap * H * sizeof *h);
        if (h)
            f->ph[sl] = h;
        int32_t *id = realloc(f->pid[sl], (size_t)cap * sizeof *id);
        if (id)
            f->pid[sl] = id;
        if (!h || !id)
            return -1;
        f->pcap[sl] = cap;
    }
    return 0;
}

/* Head over the wanted rows of s->x: norm (weight nw), lm_head, into logits. */
static void head(infer *f, int n, const uint8_t *want, const float *nw, float *logits)
{
    const dsv3_config *c = &f->m->cfg;
    scratch *s = &f->s;
    int H = c->hidden_size, k = 0;
    for (int r = 0; r < n; r++)
        if (!want || want[r])
            memcpy(s->xn + (size_t)k++ * H, s->x + (size_t)r * H, (size_t)H * 4);
    rmsnorm_forward(s->x2n, s->rstd, s->xn, nw, k, H, (float)c->rms_norm_eps);
    linear(logits, s->x2n, f->m->w.lm_head, k, H, c->vocab_size);
}

int infer_set_banned(infer *f, const uint8_t *ban, dsv3_err *e)
{
    if (f->g && ginfer_set_banned(f->g, ban, e))
        return -1;
    free(f->ban);
    f->ban = NULL;
    if (!ban)
        return 0;
    if (!(f->ban = malloc((size_t)f->vocab)))
        return err_set(e, "infer: out of memory");
    memcpy(f->ban, ban, (size_t)f->vocab);
    return 0;
}

/* Room for n rows of logits in f->glog. */
static int glog_reserve(infer *f, int n, dsv3_err *e)
{
    if (n > f->glog_n) {
        float *p = realloc(f->glog, (size_t)n * f->vocab * sizeof *p);
        if (!p)
            return err_set(e, "infer: out of memory for %d rows", n);
        f->glog = p;
        f->glog_n = n;
    }
    return 0;
}

/* The id of the largest of a row of logits, banned ids left out, ties to the lowest. */
static int32_t greedy_id(const infer *f, const float *l)
{
    int32_t best = 0;
    float bv = f->ban && f->ban[0] ? -INFINITY : l[0];
    for (int v = 1; v < f->vocab; v++) {
        float x = f->ban && f->ban[v] ? -INFINITY : l[v];
        if (x > bv) {
            bv = x;
            best = v;
        }
    }
    return best;
}

int infer_top_max(const infer *f)
{
    int k = f->g ? ginfer_top_max(f->g) : INFER_TOP_MAX;
    return k < f->vocab ? k : f->vocab;
}

int infer_forward_top(infer *f, int n, const int *slot, const int32_t *ids, int K,
                      int32_t *top_id, float *top_logit, dsv3_err *e)
{
    if (n <= 0)
        return 0;
    if (K < 1 || K > infer_top_max(f))
        return err_set(e, "infer: the %d largest logits (1 to %d)", K, infer_top_max(f));
    if (f->g && n <= ginfer_decode_rows(f->g)) {
        if (gpos_reserve(f, n, e) || positions(f, n, slot, ids, f->gpos, e) ||
            ginfer_forward_top(f->g, n, slot, f->gpos, ids, K, top_id, top_logit, e))
            return -1;
        keep_ids(f, n, slot, ids);
        for (int r = 0; r < n; r++)
            f->len[slot[r]]++;
        return 0;
    }
    sampler_cand *c = malloc((size_t)f->vocab * sizeof *c);
    if (!c)
        return err_set(e, "infer: out of memory");
    int rc = glog_reserve(f, n, e) || infer_forward(f, n, slot, ids, NULL, f->glog, e);
    for (int r = 0; r < n && !rc; r++) {
        const float *l = f->glog + (size_t)r * f->vocab;
        for (int v = 0; v < f->vocab; v++)
            c[v] = (sampler_cand){v, f->ban && f->ban[v] ? -INFINITY : l[v], 0};
        sampler_cands cs = {c, f->vocab, 0};
        sampler_top_k(&cs, K);
        sampler_softmax(&cs);  /* sorted, even where K is the whole vocabulary */
        for (int i = 0; i < K; i++) {
            top_id[(size_t)r * K + i] = c[i].id;
            top_logit[(size_t)r * K + i] = c[i].logit;
        }
    }
    free(c);
    return rc;
}

int infer_forward_greedy(infer *f, int n, const int *slot, const int32_t *ids, int32_t *out,
                         dsv3_err *e)
{
    if (n <= 0)
        return 0;
    if (f->g && n <= ginfer_decode_rows(f->g)) {
        if (gpos_reserve(f, n, e) || positions(f, n, slot, ids, f->gpos, e) ||
            ginfer_forward_greedy(f->g, n, slot, f->gpos, ids, out, e))
            return -1;
        keep_ids(f, n, slot, ids);
        for (int r = 0; r < n; r++)
            f->len[slot[r]]++;
        return 0;
    }
    if (glog_reserve(f, n, e) || infer_forward(f, n, slot, ids, NULL, f->glog, e))
        return -1;
    for (int r = 0; r < n; r++)
        out[r] = greedy_id(f, f->glog + (size_t)r * f->vocab);
    return 0;
}

/* Room for n rows of queued greedy steps. */
static int ahead_reserve(infer *f, int n, dsv3_err *e)
{
    if (n <= f->a_cap)
        return 0;
    int *s = realloc(f->a_slot, (size_t)n * sizeof *s), *p = NULL;
    if (s)
        f->a_slot = s;
    if (s && (p = realloc(f->a_pos, (size_t)n * sizeof *p)))
        f->a_pos = p;
    else
        s = NULL;
    for (int k = 0; k < 2 && s; k++) {
        int32_t *o = realloc(f->aq_out[k], (size_t)n * sizeof *o);
        if (!o)
            s = NULL;
        else
            f->aq_out[k] = o;
    }
    sampler_draw *d = s ? realloc(f->a_draw, (size_t)n * sizeof *d) : NULL;
    if (d)
        f->a_draw = d;
    if (!d)
        return err_set(e, "infer: out of memory for %d rows", n);
    f->a_cap = n;
    return 0;
}

/* A draw step run here: the rows' K largest logits (infer_forward_top), each row drawn from
 * them as the device draws (sampler_draw_top), its random state moved on. */
static int draw_here(infer *f, int n, const int *slot, const int32_t *ids, int32_t *out,
                     dsv3_err *e)
{
    int K = 1;
    for (int r = 0; r < n; r++)
        K = f->a_draw[r].top_k > K ? f->a_draw[r].top_k : K;
    if (K > infer_top_max(f))
        return err_set(e, "infer: a draw from the %d largest logits (at most %d)", K,
                       infer_top_max(f));
    if ((size_t)n * K > f->a_top) {  /* grown, never shrunk: the same sizes step after step */
        free(f->a_cand);
        free(f->a_tid);
        free(f->a_tlg);
        f->a_top = 0;
        f->a_cand = malloc((size_t)n * K * sizeof *f->a_cand);
        f->a_tid = malloc((size_t)n * K * sizeof *f->a_tid);
        f->a_tlg = malloc((size_t)n * K * sizeof *f->a_tlg);
        if (!f->a_cand || !f->a_tid || !f->a_tlg)
            return err_set(e, "infer: out of memory for %d rows' candidates", n);
        f->a_top = (size_t)n * K;
    }
    if (infer_forward_top(f, n, slot, ids, K, f->a_tid, f->a_tlg, e))
        return -1;
    for (int r = 0; r < n; r++) {
        for (int i = 0; i < K; i++)
            f->a_cand[i] = (sampler_cand){f->a_tid[(size_t)r * K + i],
                                          f->a_tlg[(size_t)r * K + i], 0};
        if ((out[r] = sampler_draw_top(&f->a_draw[r], f->a_cand, K, e)) < 0)
            return -1;
    }
    return 0;
}

int infer_draw_submit(infer *f, int n, const int *slot, const int32_t *ids,
                      const sampler_draw *draw, dsv3_err *e)
{
    if (f->anq == 2)
        return err_set(e, "infer: two decode steps queued already (collect one first)");
    if (ids && f->anq)
        return err_set(e, "infer: new rows while decode steps are queued (collect them first)");
    if (n <= 0 || (!ids && n != f->a_n))
        return err_set(e, "infer: no decode step of %d rows to continue", n);
    if (ids) {
        if (ahead_reserve(f, n, e))
            return -1;
        memcpy(f->a_slot, slot, (size_t)n * sizeof *slot);
        f->a_n = n;
        f->a_drawn = draw != NULL;
        if (draw)
            memcpy(f->a_draw, draw, (size_t)n * sizeof *draw);
    }
    /* steps take the ring's places in turn: the step before is at k ^ 1 */
    int k = (f->aq0 + f->anq) % 2, dev = f->g && !f->mtp && n <= ginfer_decode_rows(f->g);
    const int *sl = f->a_slot;
    const int32_t *in = ids ? ids : f->aq_out[k ^ 1];
    if (dev) {
        if (gpos_reserve(f, n, e) || positions(f, n, sl, ids, f->gpos, e))
            return -1;
        /* the device moves each row on by one: the host's lengths must agree */
        for (int r = 0; !ids && r < n; r++)
            if (f->gpos[r] != f->a_pos[r] + 1)
                return err_set(e, "infer: slot %d changed since the step before (%d tokens, "
                               "not %d): submit its rows anew", sl[r], f->gpos[r],
                               f->a_pos[r] + 1);
        if (ginfer_draw_submit(f->g, n, sl, f->gpos, ids, ids && draw ? f->a_draw : NULL, e))
            return -1;
        memcpy(f->a_pos, f->gpos, (size_t)n * sizeof *f->a_pos);
        for (int r = 0; r < n; r++)
            f->len[sl[r]]++;
    } else if (f->a_drawn ? draw_here(f, n, sl, in, f->aq_out[k], e)
                          : infer_forward_greedy(f, n, sl, in, f->aq_out[k], e)) {
        return -1;
    }
    f->aq_n[k] = n;
    f->aq_dev[k] = dev;
    f->anq++;
    return 0;
}

int infer_greedy_submit(infer *f, int n, const int *slot, const int32_t *ids, dsv3_err *e)
{
    return infer_draw_submit(f, n, slot, ids, NULL, e);
}

int infer_greedy_collect(infer *f, int32_t *out, dsv3_err *e)
{
    if (!f->anq)
        return err_set(e, "infer: no decode step queued to collect");
    int k = f->aq0;
    if (!f->aq_dev[k])
        memcpy(out, f->aq_out[k], (size_t)f->aq_n[k] * sizeof *out);
    else if (ginfer_greedy_collect(f->g, out, e))
        return -1;
    f->aq0 = k ^ 1;
    f->anq--;
    return 0;
}

int infer_forward(infer *f, int n, const int *slot, const int32_t *ids, const uint8_t *want,
                  float *logits, dsv3_err *e)
{
    if (n <= 0)
        return 0;
    if (f->g)
        return forward_gpu(f, n, slot, ids, want, logits, e);
    const dsv3_model *m = f->m;
    const dsv3_config *c = &m->cfg;
    int H = c->hidden_size;
    if (scratch_grow(&f->s, c, n))
        return err_set(e, "infer: out of memory for %d rows", n);
    scratch *s = &f->s;
    if (positions(f, n, slot, ids, s->pos, e))
        return -1;
    if (f->mtp && pending_reserve(f, n, slot, s->pos))
        return err_set(e, "infer: out of memory for %d rows", n);
    embedding_forward(s->x, m->w.embed, ids, n, H);
    for (int l = 0; l < c->num_hidden_layers; l++)
        block(f, &m->w.layers[l], l, n, slot);
    /* The MTP stream takes each row's hidden state before the final norm, once the token
     * after it is known. */
    for (int r = 0; f->mtp && r < n; r++) {
        int j = s->pos[r] - f->mlen[slot[r]];
        memcpy(f->ph[slot[r]] + (size_t)j * H, s->x + (size_t)r * H, (size_t)H * 4);
        f->pid[slot[r]][j] = ids[r];
    }
    /* Only the wanted rows go through the final norm and the head. */
    head(f, n, want, m->w.final_norm, logits);
    for (int r = 0; r < n; r++)
        f->len[slot[r]]++;
    return 0;
}

/* The rows an MTP call of n slots runs (the positions each has waiting); -1 with a message
 * on a bad call. */
static int draft_rows(const infer *f, int n, const int *slot, const int32_t *next,
                      dsv3_err *e)
{
    if (!f->mtp)
        return err_set(e, "infer: the MTP module is off (infer_use_mtp)");
    int R = 0;
    for (int i = 0; i < n; i++) {
        int sl = slot[i];
        if (sl < 0 || sl >= f->n_slots || f->len[sl] <= f->mlen[sl])
            return err_set(e, "infer: slot %d has no position waiting for the MTP module", sl);
        if (next[i] < 0 || next[i] >= f->vocab)
            return err_set(e, "token id %d outside the vocabulary (vocab_size %d)", next[i],
                           f->vocab);
        for (int j = 0; j < i; j++)
            if (slot[j] == sl)
                return err_set(e, "infer: slot %d twice in one MTP call", sl);
        R += f->len[sl] - f->mlen[sl];
    }
    return R;
}

/* The GPU stream over the R rows of an MTP call: logits of each slot's newest row, or
 * (logits NULL) its greedy id to out. */
static int draft_gpu(infer *f, int n, const int *slot, const int32_t *next, int R,
                     float *logits, int32_t *out, dsv3_err *e)
{
    int *rs = calloc((size_t)R + 1, sizeof *rs), *rp = calloc((size_t)R + 1, sizeof *rp);
    int32_t *rid = calloc((size_t)R + 1, sizeof *rid);
    uint8_t *rw = calloc((size_t)R + 1, 1);
    if (!rs || !rp || !rid || !rw) {
        free(rs);
        free(rp);
        free(rid);
        free(rw);
        return err_set(e, "infer: out of memory");
    }
    for (int i = 0, r = 0; i < n; i++) {
        int sl = slot[i], w = f->len[sl] - f->mlen[sl];
        for (int j = 0; j < w; j++, r++) {
            rs[r] = sl;
            rp[r] = f->mlen[sl] + j;
            rid[r] = j + 1 < w ? f->gid[(size_t)sl * f->n_ctx + rp[r] + 1] : next[i];
            rw[r] = j + 1 == w;
        }
    }
    int rc = ginfer_mtp_forward(f->g, R, rs, rp, rid, rw, logits, out, e);
    for (int i = 0; i < n && !rc; i++)
        f->mlen[slot[i]] = f->len[slot[i]];
    free(rs);
    free(rp);
    free(rid);
    free(rw);
    return rc;
}

int infer_mtp_draft_greedy(infer *f, int n, const int *slot, const int32_t *next, int32_t *out,
                           dsv3_err *e)
{
    if (n <= 0)
        return 0;
    if (f->g) {
        int R = draft_rows(f, n, slot, next, e);
        return R < 0 ? -1 : draft_gpu(f, n, slot, next, R, NULL, out, e);
    }
    if (glog_reserve(f, n, e) || infer_mtp_draft(f, n, slot, next, f->glog, e))
        return -1;
    for (int i = 0; i < n; i++)
        out[i] = greedy_id(f, f->glog + (size_t)i * f->vocab);
    return 0;
}

int infer_mtp_draft(infer *f, int n, const int *slot, const int32_t *next, float *logits,
                    dsv3_err *e)
{
    int R = draft_rows(f, n, slot, next, e);
    if (R < 0)
        return -1;
    if (f->g)
        return draft_gpu(f, n, slot, next, R, logits, NULL, e);
    const dsv3_model *m = f->m;
    const dsv3_config *c = &m->cfg;
    const model_mtp *W = &m->w.mtp[0];
    int H = c->hidden_size;
    if (scratch_grow(&f->s, c, R))
        return err_set(e, "infer: out of memory for %d rows", R);
    scratch *s = &f->s;
    /* Row of stream position p: the main model's hidden state at p and the token at p + 1
     * (the one fed at p + 1, or next for the newest). s->x2 holds the hidden states,
     * s->out the embeddings; the last row of each slot is wanted. */
    int r = 0;
    int32_t *rid = malloc((size_t)R * sizeof *rid);
    uint8_t *rw = malloc((size_t)R);
    if (!rid || !rw) {
        free(rid);
        free(rw);
        return err_set(e, "infer: out of memory");
    }
    for (int i = 0; i < n; i++) {
        int sl = slot[i], w = f->len[sl] - f->mlen[sl];
        for (int j = 0; j < w; j++, r++) {
            s->sl2[r] = sl;
            s->pos[r] = f->mlen[sl] + j;
            rid[r] = j + 1 < w ? f->pid[sl][j + 1] : next[i];
            rw[r] = j + 1 == w;
            memcpy(s->x2 + (size_t)r * H, f->ph[sl] + (size_t)j * H, (size_t)H * 4);
        }
    }
    float eps = (float)c->rms_norm_eps;
    embedding_forward(s->out, m->w.embed, rid, R, H);
    rmsnorm_forward(s->xn, s->rstd, s->out, W->enorm, R, H, eps);
    rmsnorm_forward(s->x2n, s->rstd, s->x2, W->hnorm, R, H, eps);
    for (int k = 0; k < R; k++) {
        memcpy(s->cat + (size_t)k * 2 * H, s->xn + (size_t)k * H, (size_t)H * 4);
        memcpy(s->cat + (size_t)k * 2 * H + H, s->x2n + (size_t)k * H, (size_t)H * 4);
    }
    linear(s->x, s->cat, W->eh_proj, R, 2 * H, H);
    /* sl2 is overwritten by nothing below: mla and moe use their own buffers. */
    block(f, &W->block, c->num_hidden_layers, R, s->sl2);
    head(f, R, rw, W->head_norm, logits);
    for (int i = 0; i < n; i++)
        f->mlen[slot[i]] = f->len[slot[i]];
    free(rid);
    free(rw);
    return 0;
}

int infer_prefill(infer *f, int slot, const int32_t *ids, int n, float *logits, dsv3_err *e)
{
    if (n <= 0)
        return err_set(e, "infer: an empty prompt");
    int *sl = malloc((size_t)n * sizeof *sl);
    uint8_t *want = calloc((size_t)n, 1);
    if (!sl || !want) {
        free(sl);
        free(want);
        return err_set(e, "infer: out of memory");
    }
    for (int i = 0; i < n; i++)
        sl[i] = slot;
    want[n - 1] = 1;
    int rc = infer_forward(f, n, sl, ids, want, logits, e);
    free(sl);
    free(want);
    return rc;
}
