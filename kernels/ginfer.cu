/* ginfer: the GPU inference engine (see ginfer.h): weights and cache on the device, one
 * forward over a call's rows, decode steps replayed from CUDA graphs. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <stdint.h>
#include "cuda_util.cuh"
#include "ginfer.h"
#include "ginfer_attn.cuh"
#include "ginfer_k.cuh"
#include "gpu.h"
#include "gpuctx.h"
#include "moe.h"

extern "C" {
#include "../lib/config.h"
#include "../lib/fp8.h"
#include "../lib/hfdir.h"
#include "../lib/ops.h"
}

enum {
    PCHUNK = 256,     /* rows of one direct (prefill) pass */
    MAX_BUCKETS = 16, /* graphs for 1, 2, 4, ... rows */
    AHEAD = 2,        /* decode steps queued at most (ginfer_greedy_submit) */
    STAGE = 1 << 22,  /* host conversion buffer, values */
};

struct glayer {
    float *in_norm, *post_norm, *q_a_norm, *kv_a_norm;
    void *q_a, *q_b, *q, *kv_a, *ukT, *kvb, *o;
    int moe, F;        /* F: width of the dense MLP or of the shared experts (0: none) */
    int sh;            /* the shared expert is group E of ew1/ew2 (w1, w2 point there) */
    int qkv;           /* no q_lora: q's rows then kv_a's in one allocation (q, kv_a point
                        * there), multiplied by one GEMV (gk_gemv_two) */
    void *w1, *w2;     /* dense MLP or shared experts: [2F, H] (gate rows, up rows), [H, F] */
    float *router, *bias;
    void *ew1, *ew2;   /* routed experts: [E][2mi][H], [E][H][mi] */
};

/* The kernels DSV3_GINFER_CLOCK times (one-row decode launches only), each GK_CLK_N
 * counters at clk + k * GK_CLK_N (kernels/ginfer_k.cuh gk_clk), and their phases' names in
 * the order of the slots. */
enum { CLK_ROUTE1, CLK_PARTS, CLK_UVC, CLK_TOPK, CLK_KERNELS };
static const char *const clk_phases[CLK_KERNELS][GK_CLK_CYC + 1] = {
    {"route1_k", "rows in", "wait", "dot", "exchange", "top-k", "bucket"},
    {"attn_split_k", "ids", "pre-stage", "wait", "queries", "rows", "scores", "softmax", "acc",
     "write"},
    {"gemv_uvc_k", "prefetch", "wait", "combine", "gemv"},
    /* block 0's part; then the last block's (slot 7 counts those) */
    {"topk_k (draw)", "keys in", "select", "collect", "arrive", "last: merge", "last: sort",
     "last: draw", "last blocks", "draw: top-p", "draw: pick", "draw: feed"},
};

enum { PROF_MAX = 1024 };  /* launches a profiled step can mark */

/* Per-launch times of the decode step of one row (DSV3_GINFER_PROFILE; see mark). */
struct gprof {
    int armed, n;                 /* marks being captured; marks in the profiled graph */
    long steps;                   /* replays summed */
    cudaEvent_t ev[PROF_MAX + 1]; /* ev[0] before the first launch, ev[i + 1] after launch i */
    int n_ev;                     /* events created */
    const char *name[PROF_MAX];
    double bytes[PROF_MAX], ms[PROF_MAX];
};

/* A decode step queued: n rows through bucket b's graph, whose argmax writes the greedy ids to
 * h_tok (mapped pinned memory: no copy between the graphs); tail: TAIL_LOGITS, the logits
 * copied to h_logits after it, or TAIL_TOPK, their largest found or drawn from (gk_topk:
 * counted as device time); events before and after the replay and after the tail; done once
 * waited for (its device time counted). */
enum { TAIL_NONE, TAIL_LOGITS, TAIL_TOPK };
struct gstep {
    int n, b, done, tail;
    int32_t *h_tok;
    cudaEvent_t ev[3];
};

struct ginfer {
    gpu_ctx *c;
    cudaStream_t s;
    /* the side stream of shared experts of their own width (shared_fork), its fork and join
     * events, and their hidden rows; s2 NULL: none (no such layer, profiling, or
     * DSV3_GINFER_ASIDE=0) */
    cudaStream_t s2;
    cudaEvent_t ev_fork, ev_join;
    float *hs;
    int exact, wsz;
    int L, H, nh, qk, nope, rope, kv, dv, qr, E, K, mi, V, inter, n_group, topk_group, norm_topk;
    int interleave;
    float scale, eps, route_scale;
    int n_ctx, n_slots, W, nsplit, bucket_max, rmax;
    glayer *ly;
    struct gmtp *mtp;   /* the MTP module (ginfer_mtp.cuh; its block is ly[L]), or NULL */
    void *embed, *head;
    float *fnorm, *cos_t, *sin_t;
    void *cache;
    size_t cache_bytes, weight_bytes;
    int *d_in;          /* [4][rmax]: ids, slots, positions, ring places (gk_feed) */
    int *d_rows;
    float *x, *xn, *delta, *qa, *qan, *q, *kva, *qlat, *olat, *ao, *pm, *pl, *pacc;
    float *rl, *rs, *rw, *h, *ye, *ys, *xl, *logits;
    int32_t *idx;
    int *off, *order, *spos;
    int *h_in;          /* host [4][rmax] */
    int32_t *h_tokm, *d_tokm; /* [AHEAD][bucket_max] mapped pinned: the steps' greedy ids */
    /* ginfer_forward_top: gk_topk's scratch and its mapped output, for top_rows rows of
     * top_k candidates (made on first use, grown as asked) */
    void *topscr;
    gk_cand *h_top, *d_top;
    int top_rows, top_k;
    uint16_t *stage;
    gpu_graph *graph[MAX_BUCKETS];
    /* the same steps ending in gk_topk_draw instead of the argmax (ginfer_draw_submit; made on
     * first use), over the rows' draws d_draw, with a scratch of their own */
    gpu_graph *dgraph[MAX_BUCKETS];
    void *drawscr;
    gk_moe_out mo;      /* an MLP or MoE layer's output, summed by the next add_norm (pend) */
    int pend;
    /* fusions (DSV3_GINFER_FUSE, read at creation; see fuse_flags): norms inside the GEMVs
     * that read them, the attention combine inside the split kernel, the router GEMV + top-k
     * + bucketing in one launch, the cache write in the q_lat GEMV's launch; fin: the input
     * norm is fused in the pass being queued */
    int fz_norm, fz_attn, fz_route, fz_kvw, fin;
    /* more of them: the post-attention norm inside the router's launch (fpost: in this
     * layer, 1 in route_k's grid, 2 in the one-row cluster route1_k; see post_fused), the
     * attention combine inside the uv GEMV */
    int fz_post, fz_uvc, fpost;
    /* and the MoE down-projection summing its rows into x itself (nothing left pending);
     * route1: the fused router of one row in one cluster (DSV3_GINFER_ROUTE1=0: route_k's
     * grid and last block, for comparisons) */
    int fz_msum, route1;
    /* qkv: without q_lora, q and kv_a by one GEMV where their rows are stored together
     * (DSV3_GINFER_QKV=0: two, for comparisons) */
    int qkv;
    /* the q_a norm alone inside q_b's GEMV, at one row (each warp forms the norm itself; at
     * more rows gemv_norm_k's blocks would normalise through shared memory) */
    int fz_qa;
    /* g1: the one-row expert GEMVs (grouped1_k) at batch 1: 1 the up-projection, 2 the down
     * too (DSV3_GINFER_G1; 0: grouped_k's, to compare) */
    int g1;
    char dup[64];  /* DSV3_GINFER_DUP (see twice) */
    unsigned *acnt, *rcnt;  /* counters of the fused attention combine and router */
    float *dd;              /* a dense MLP's output, pending for the next add_norm */
    gprof *prof;        /* NULL unless profiling */
    unsigned long long *clk; /* DSV3_GINFER_CLOCK: the timed kernels' phases (clock_report) */
    long replays;
    float *h_logits;    /* pinned host copy of a decode step's logits */
    int32_t *tok;       /* [bucket_max]: each decode row's greedy choice (gk_argmax) */
    void *argscr;       /* gk_argmax's scratch for bucket_max rows */
    uint8_t *ban;       /* [V]: ids greedy choices leave out */
    /* Decode steps queued, oldest first from q0 (nq of them; the synchronous calls use one
     * and wait for it) */
    gstep st[AHEAD];
    int q0, nq;
    int feed_n;         /* rows of the last step queued by ginfer_greedy_submit, whose next
                         * inputs its argmax left in d_in; -1 after anything else */
    int feed_draw;         /* whether that step drew (ginfer_draw_submit: its draw graph) */
    sampler_draw *d_draw; /* [rmax]: the rows' draws, their random states moved on by each */
    double graph_s;     /* device time of the replays */
    void **allocs;
    int n_allocs, cap_allocs;
    int fp8;            /* DSV3_GINFER_FP8=1: FP8 weight slots (ginfer_fp8.cuh) */
    struct f8reg *f8;   /* those slots */
    int n_f8, cap_f8;
    char desc[320];
    struct gpf *pf;     /* the tensor-core prefill (ginfer_prefill.cuh), made on first use */
    int pf_min;         /* the tensor-core prefill's least rows (0: off; DSV3_GINFER_PREFILL) */
};

static void *dal(ginfer *g, size_t bytes, dsv3_err *e)
{
    if (g->n_allocs == g->cap_allocs) {
        int cap = g->cap_allocs ? 2 * g->cap_allocs : 64;
        void **a = (void **)realloc(g->allocs, (size_t)cap * sizeof *a);
        if (!a) {
            err_set(e, "ginfer: out of host memory");
            return NULL;
        }
        g->allocs = a;
        g->cap_allocs = cap;
    }
    void *p = gpu_malloc(bytes ? bytes : 16, e);
    if (p)
        g->allocs[g->n_allocs++] = p;
    return p;
}

/* n fp32 values into device dst at element off: as they are (wsz 4) or as bf16 (wsz 2). */
static int put(ginfer *g, void *dst, size_t off, const float *src, size_t n, int wsz,
               dsv3_err *e)
{
    if (wsz == 4)
        return gpu_upload(g->c, (float *)dst + off, src, n * 4, e);
    for (size_t i = 0; i < n; i += STAGE) {
        size_t k = n - i < (size_t)STAGE ? n - i : (size_t)STAGE;
        for (size_t j = 0; j < k; j++)
            g->stage[j] = gpu_f2bf(src[i + j]);
        if (gpu_upload(g->c, (uint16_t *)dst + off + i, g->stage, k * 2, e))
            return -1;
    }
    return 0;
}

/* Where the weights come from: a model in host memory (fp32), or a checkpoint folder whose
 * shards are memory-mapped (BF16 tensors go to the device straight from the mapping; F32,
 * F16 and FP8 E4M3 with 128x128 block scales are converted on the way). */
typedef struct wsrc {
    const dsv3_model *m;
    const hfdir *h;
    int mtp;  /* load MTP module 1 too (ginfer_mtp.cuh) */
} wsrc;

/* Tensor `name` (n values) as fp32: *out points at it; *own is a buffer to free (or NULL). */
static int src_f32(const wsrc *src, const char *name, size_t n, const float **out, float **own,
                   dsv3_err *e)
{
    *own = NULL;
    if (src->m) {
        const model_tensor *t = model_find(src->m, name);
        if (!t || (size_t)t->numel != n)
            return err_set(e, "ginfer: the model has no tensor %s of %zu values", name, n);
        *out = src->m->params + t->off;
        return 0;
    }
    const st_tensor *t = hfdir_find(src->h, name, NULL);
    if (!t)
        return err_set(e, "%s: no tensor %s", src->h->dir, name);
    if ((size_t)t->numel != n)
        return err_set(e, "%s: tensor %s has %lld values, the config wants %zu", src->h->dir,
                       name, (long long)t->numel, n);
    float *b = (float *)malloc(n * sizeof *b);
    if (!b)
        return err_set(e, "ginfer: out of host memory for %s", name);
    *own = b;
    *out = b;
    if (t->dtype != ST_F8_E4M3)
        return st_to_f32(t, b, (int64_t)n, e);
    /* DeepSeek's FP8: w = e4m3(q) * scale_inv[row / 128][col / 128] */
    char sn[300];
    snprintf(sn, sizeof sn, "%s_scale_inv", name);
    const st_tensor *st = hfdir_find(src->h, sn, NULL);
    int64_t rows = t->ndim == 2 ? t->shape[0] : 1, cols = t->ndim == 2 ? t->shape[1] : t->numel;
    int64_t bc = fp8_blocks(cols);
    if (!st || st->dtype != ST_F32 || st->numel != fp8_blocks(rows) * bc)
        return err_set(e, "%s: FP8 tensor %s without its F32 %s of %lld x %lld block scales",
                       src->h->dir, name, sn, (long long)fp8_blocks(rows), (long long)bc);
    const uint8_t *q = (const uint8_t *)t->data;
    const float *sc = (const float *)st->data;
    float lut[256];
    for (int i = 0; i < 256; i++)
        lut[i] = fp8_e4m3_to_f32((uint8_t)i);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++)
            b[r * cols + c] = lut[q[r * cols + c]] * sc[(r / FP8_BLOCK) * bc + c / FP8_BLOCK];
    return 0;
}

/* Tensor `name` (n values) into device dst at element off, in wsz-byte values. */
static int fetch(ginfer *g, const wsrc *src, const char *name, void *dst, size_t off, size_t n,
                 int wsz, dsv3_err *e)
{
    if (src->h && wsz == 2) {
        const st_tensor *t = hfdir_find(src->h, name, NULL);
        if (t && t->dtype == ST_BF16 && (size_t)t->numel == n)  /* from the mapping */
            return gpu_upload(g->c, (uint16_t *)dst + off, t->data, n * 2, e);
    }
    const float *p;
    float *own;
    int rc = src_f32(src, name, n, &p, &own, e) || put(g, dst, off, p, n, wsz, e);
    free(own);
    return rc;
}

/* A weight tensor (compute dtype) or an fp32 one (norms, router), its own allocation. */
static void *get(ginfer *g, const wsrc *src, const char *name, size_t n, int wsz, dsv3_err *e)
{
    void *d = dal(g, n * wsz, e);
    if (!d || fetch(g, src, name, d, 0, n, wsz, e))
        return NULL;
    g->weight_bytes += n * wsz;
    return d;
}

#include "ginfer_fp8.cuh"

/* Gate and up [F, H] each as one [2F, H] tensor (at element offset off of w1, whose
 * allocation the caller made), down [H, F] at off of w2; ws 1: FP8 slots (f8_alloc). */
static int get_mlp(ginfer *g, const wsrc *src, const char *pre, void *w1, void *w2, size_t off,
                   int F, int ws, dsv3_err *e)
{
    size_t n = (size_t)F * g->H;
    char nm[300];
    snprintf(nm, sizeof nm, "%s.gate_proj.weight", pre);
    if (fetchw(g, src, nm, w1, 2 * off, F, g->H, ws, e))
        return -1;
    snprintf(nm, sizeof nm, "%s.up_proj.weight", pre);
    if (fetchw(g, src, nm, w1, 2 * off + n, F, g->H, ws, e))
        return -1;
    snprintf(nm, sizeof nm, "%s.down_proj.weight", pre);
    if (fetchw(g, src, nm, w2, off, g->H, F, ws, e))
        return -1;
    if (ws != 1)
        g->weight_bytes += 3 * n * ws;
    return 0;
}

/* Whether an MLP's three tensors can be FP8 slots. */
static int mlp_f8(const ginfer *g, const wsrc *src, const char *pre, int F)
{
    char nm[300];
    const char *part[3] = {"gate_proj", "up_proj", "down_proj"};
    for (int i = 0; i < 3; i++) {
        snprintf(nm, sizeof nm, "%s.%s.weight", pre, part[i]);
        if (!f8_ok(g, src, nm, i < 2 ? F : g->H, i < 2 ? g->H : F))
            return 0;
    }
    return 1;
}

/* An MLP slot of n weights: FP8 (ws 1) or the compute dtype. */
static void *mlp_alloc(ginfer *g, size_t n, int ws, dsv3_err *e)
{
    return ws == 1 ? f8_alloc(g, n, e) : dal(g, n * ws, e);
}

static int up_layer(ginfer *g, const wsrc *src, const dsv3_config *c, int l, glayer *y,
                    dsv3_err *e)
{
    int H = g->H, nh = g->nh, kv = g->kv, nope = g->nope, dv = g->dv, qk = g->qk, w = g->wsz;
    char nm[300];
#define NAME(...) (snprintf(nm, sizeof nm, __VA_ARGS__), nm)
    const char *a = "model.layers";
    if (!(y->in_norm = (float *)get(g, src, NAME("%s.%d.input_layernorm.weight", a, l), H, 4, e)) ||
        !(y->post_norm = (float *)get(g, src, NAME("%s.%d.post_attention_layernorm.weight", a, l),
                                      H, 4, e)) ||
        !(y->kv_a_norm = (float *)get(g, src, NAME("%s.%d.self_attn.kv_a_layernorm.weight", a, l),
                                      kv, 4, e)) ||
        !(y->kvb = get(g, src, NAME("%s.%d.self_attn.kv_b_proj.weight", a, l),
                       (size_t)nh * (nope + dv) * kv, w, e)) ||
        !(y->o = getw(g, src, NAME("%s.%d.self_attn.o_proj.weight", a, l), H, (long)nh * dv, e)))
        return -1;
    size_t nkva = (size_t)(kv + g->rope) * H, nqa = (size_t)g->qr * H;
    if (g->qr) {
        /* q_a's rows then kv_a's: both read the normed input, so one GEMV a layer does both */
        int wa = f8_ok(g, src, NAME("%s.%d.self_attn.q_a_proj.weight", a, l), g->qr, H) &&
                         f8_ok(g, src, NAME("%s.%d.self_attn.kv_a_proj_with_mqa.weight", a, l),
                               kv + g->rope, H)
                     ? 1
                     : w;
        if (!(y->q_a_norm = (float *)get(g, src, NAME("%s.%d.self_attn.q_a_layernorm.weight", a, l),
                                         g->qr, 4, e)) ||
            !(y->q_a = mlp_alloc(g, nqa + nkva, wa, e)) ||
            fetchw(g, src, NAME("%s.%d.self_attn.q_a_proj.weight", a, l), y->q_a, 0, g->qr, H,
                   wa, e) ||
            fetchw(g, src, NAME("%s.%d.self_attn.kv_a_proj_with_mqa.weight", a, l), y->q_a, nqa,
                   kv + g->rope, H, wa, e) ||
            !(y->q_b = getw(g, src, NAME("%s.%d.self_attn.q_b_proj.weight", a, l),
                            (long)nh * qk, g->qr, e)))
            return -1;
        y->kv_a = (char *)y->q_a + nqa * wa;
        if (wa != 1)
            g->weight_bytes += (nqa + nkva) * w;
    } else if (!f8_ok(g, src, NAME("%s.%d.self_attn.q_proj.weight", a, l), (long)nh * qk, H) &&
               !f8_ok(g, src, NAME("%s.%d.self_attn.kv_a_proj_with_mqa.weight", a, l),
                      kv + g->rope, H)) {
        /* q's rows then kv_a's, as q_a's and kv_a's above: both read the normed input */
        size_t nq = (size_t)nh * qk * H;
        y->qkv = 1;
        if (!(y->q = dal(g, (nq + nkva) * w, e)) ||
            fetch(g, src, NAME("%s.%d.self_attn.q_proj.weight", a, l), y->q, 0, nq, w, e) ||
            fetch(g, src, NAME("%s.%d.self_attn.kv_a_proj_with_mqa.weight", a, l), y->q, nq,
                  nkva, w, e))
            return -1;
        y->kv_a = (char *)y->q + nq * w;
        g->weight_bytes += (nq + nkva) * w;
    } else if (!(y->q = getw(g, src, NAME("%s.%d.self_attn.q_proj.weight", a, l),
                             (long)nh * qk, H, e)) ||
               !(y->kv_a = getw(g, src, NAME("%s.%d.self_attn.kv_a_proj_with_mqa.weight", a, l),
                                kv + g->rope, H, e))) {
        return -1;
    }
    /* W_uk^T per head: ukT[h][j][d] = kv_b[h (nope + dv) + d][j], rows of the q_lat product */
    size_t nu = (size_t)nh * kv * nope;
    const float *kvb;
    float *own, *t = (float *)malloc(nu * sizeof *t);
    if (!t)
        return err_set(e, "ginfer: out of host memory");
    if (src_f32(src, NAME("%s.%d.self_attn.kv_b_proj.weight", a, l), (size_t)nh * (nope + dv) * kv,
                &kvb, &own, e)) {
        free(t);
        free(own);
        return -1;
    }
    for (int h = 0; h < nh; h++)
        for (int j = 0; j < kv; j++)
            for (int d = 0; d < nope; d++)
                t[((size_t)h * kv + j) * nope + d] = kvb[((size_t)h * (nope + dv) + d) * kv + j];
    free(own);
    y->ukT = dal(g, nu * w, e);
    int rc = !y->ukT || put(g, y->ukT, 0, t, nu, w, e);
    free(t);
    if (rc)
        return -1;
    g->weight_bytes += nu * w;
    y->moe = config_layer_is_moe(c, l);
    if (!y->moe) {
        y->F = g->inter;
        size_t n = (size_t)y->F * H;
        int wm = mlp_f8(g, src, NAME("%s.%d.mlp", a, l), y->F) ? 1 : w;
        return !(y->w1 = mlp_alloc(g, 2 * n, wm, e)) || !(y->w2 = mlp_alloc(g, n, wm, e)) ||
               get_mlp(g, src, NAME("%s.%d.mlp", a, l), y->w1, y->w2, 0, y->F, wm, e);
    }
    size_t ne = (size_t)g->mi * H;
    /* the routed experts (and a shared expert stored with them) FP8 only all together */
    int we = g->fp8 ? 1 : w;
    for (int x = 0; x < g->E && we == 1; x++)
        we = mlp_f8(g, src, NAME("%s.%d.mlp.experts.%d", a, l, x), g->mi) ? 1 : w;
    if (we == 1 && g->mi * c->n_shared_experts == g->mi &&
        !mlp_f8(g, src, NAME("%s.%d.mlp.shared_experts", a, l), g->mi))
        we = w;
    if (!(y->router = (float *)get(g, src, NAME("%s.%d.mlp.gate.weight", a, l), (size_t)g->E * H,
                                   4, e)) ||
        !(y->bias = (float *)get(g, src, NAME("%s.%d.mlp.gate.e_score_correction_bias", a, l),
                                 g->E, 4, e)) ||
        !(y->ew1 = mlp_alloc(g, (size_t)(g->E + 1) * 2 * ne, we, e)) ||
        !(y->ew2 = mlp_alloc(g, (size_t)(g->E + 1) * ne, we, e)))
        return -1;
    for (int x = 0; x < g->E; x++) {
        char pre[200];
        snprintf(pre, sizeof pre, "%s.%d.mlp.experts.%d", a, l, x);
        if (get_mlp(g, src, pre, y->ew1, y->ew2, ne * x, g->mi, we, e))
            return -1;
    }
    y->F = g->mi * c->n_shared_experts;
    if (!y->F)
        return 0;
    if (y->F == g->mi) {
        /* one shared expert, as wide as a routed one: stored as expert E, run as one more
         * group of the grouped GEMVs (two launches a layer fewer) */
        y->sh = 1;
        y->w1 = (char *)y->ew1 + (size_t)g->E * 2 * ne * we;
        y->w2 = (char *)y->ew2 + (size_t)g->E * ne * we;
        return get_mlp(g, src, NAME("%s.%d.mlp.shared_experts", a, l), y->ew1, y->ew2,
                       ne * g->E, g->mi, we, e);
    }
    size_t n = (size_t)y->F * H;
    int ws = mlp_f8(g, src, NAME("%s.%d.mlp.shared_experts", a, l), y->F) ? 1 : w;
    return !(y->w1 = mlp_alloc(g, 2 * n, ws, e)) || !(y->w2 = mlp_alloc(g, n, ws, e)) ||
           get_mlp(g, src, NAME("%s.%d.mlp.shared_experts", a, l), y->w1, y->w2, 0, y->F, ws,
                   e);
#undef NAME
}

static int capture_all(ginfer *g, dsv3_err *e);
static int lat_takes(const ginfer *g, int n, int nsplit);
static void prof_print(const ginfer *g);
static void clock_report(const ginfer *g);
static int mtp_setup(ginfer *g, const wsrc *src, const dsv3_config *c, dsv3_err *e);
static int mtp_keep(ginfer *g, int n, dsv3_err *e);
static int decode_rows(const ginfer *g);
static int pf_threshold(void);
static int pf_takes(const ginfer *g, int n, const int *slot, const int *pos);
static int pf_forward(ginfer *g, int n, const int *slot, const int32_t *ids,
                      const uint8_t *want, float *logits, dsv3_err *e);
static void pf_free(ginfer *g);
static int pf_warm(ginfer *g, dsv3_err *e);

static int check_shapes(const dsv3_config *c, dsv3_err *e)
{
    int dims[] = {c->hidden_size, c->q_lora_rank, c->kv_lora_rank, c->qk_nope_head_dim,
                  c->qk_rope_head_dim, c->v_head_dim, c->moe_intermediate_size,
                  c->intermediate_size, c->moe_intermediate_size * c->n_shared_experts};
    const char *names[] = {"hidden_size", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                           "qk_rope_head_dim", "v_head_dim", "moe_intermediate_size",
                           "intermediate_size", "shared experts' width"};
    for (size_t i = 0; i < sizeof dims / sizeof *dims; i++)
        if (dims[i] % 8)
            return err_set(e, "ginfer: %s %d is not a multiple of 8 (the GPU kernels read 8 "
                           "values at a time; use --device cpu)", names[i], dims[i]);
    if (c->qk_rope_head_dim > 256 || c->n_routed_experts > 1024)
        return err_set(e, "ginfer: qk_rope_head_dim %d or %d routed experts too large",
                       c->qk_rope_head_dim, c->n_routed_experts);
    return 0;
}

/* The widest MLP of shared experts that runs aside (shared_aside), 0 if none: layers and the
 * MTP block. */
static int aside_width(const ginfer *g)
{
    int w = 0;
    for (int l = 0; l < g->L + !!g->mtp; l++)
        if (g->ly[l].moe && g->ly[l].F && !g->ly[l].sh && g->ly[l].F > w)
            w = g->ly[l].F;
    return w;
}

static int alloc_acts(ginfer *g, dsv3_err *e)
{
    size_t R = (size_t)g->rmax, H = g->H, nh = g->nh, K = g->K ? g->K : 1, E = g->E ? g->E : 1;
    size_t parts = (size_t)g->bucket_max * g->nsplit > R ? (size_t)g->bucket_max * g->nsplit : R;
    size_t hw = R * (K + 1) * g->mi;  /* routed rows and the shared group's */
    if (R * g->inter > hw)
        hw = R * g->inter;
    for (int l = 0; l < g->L; l++)
        if (R * g->ly[l].F > hw)
            hw = R * g->ly[l].F;
#define F32(p, n) (((p) = (float *)dal(g, (size_t)(n) * 4, e)) == NULL)
#define I32(p, n) (((p) = (decltype(p))dal(g, (size_t)(n) * 4, e)) == NULL)
    if (I32(g->d_in, 4 * R) || I32(g->d_rows, R) || F32(g->x, R * H) || F32(g->xn, R * H) ||
        F32(g->delta, R * H) || F32(g->qa, R * (g->qr ? g->qr + g->W : 8)) ||
        F32(g->qan, R * (g->qr ? g->qr : 8)) || F32(g->q, R * nh * g->qk) ||
        F32(g->kva, R * g->W) || F32(g->qlat, R * nh * g->kv) || F32(g->olat, R * nh * g->kv) ||
        F32(g->ao, R * nh * g->dv) || F32(g->pm, parts * nh) || F32(g->pl, parts * nh) ||
        F32(g->pacc, parts * nh * g->kv) || F32(g->rl, R * E) || F32(g->rs, R * E) ||
        F32(g->rw, R * K) || I32(g->idx, R * K) || I32(g->off, 2 * E + 4) ||
        I32(g->order, R * (K + 1)) ||
        I32(g->spos, R * K) || F32(g->h, hw) || F32(g->ye, R * (K + 1) * H) || F32(g->ys, R * H) ||
        F32(g->xl, (size_t)g->bucket_max * H) || F32(g->dd, R * H) ||
        !(g->acnt = (unsigned *)dal(g, gk_attn_counts(g->rmax, g->nh), e)) ||
        !(g->rcnt = (unsigned *)dal(g, 16, e)) ||
        F32(g->logits, (size_t)g->bucket_max * g->V) ||
        !(g->tok = (int32_t *)dal(g, (size_t)g->bucket_max * 4, e)) ||
        !(g->argscr = dal(g, gk_argmax_scratch(g->bucket_max), e)) ||
        !(g->ban = (uint8_t *)dal(g, (size_t)g->V, e)))
        return -1;
    CUDA_TRY(cudaMemsetAsync(g->ban, 0, (size_t)g->V, g->s), e);
    CUDA_TRY(cudaMemsetAsync(g->argscr, 0, gk_argmax_scratch(g->bucket_max), g->s), e);
    CUDA_TRY(cudaMemsetAsync(g->acnt, 0, gk_attn_counts(g->rmax, g->nh), g->s), e);
    CUDA_TRY(cudaMemsetAsync(g->rcnt, 0, 16, g->s), e);
#undef F32
#undef I32
    return 0;
}

/* DSV3_GINFER_FUSE: "1": every fusion; "0": none (the launches of before, for comparisons in
 * one process); else a comma-separated list of those wanted: "norm", "attn", "router", "kvw",
 * "post", "uvc", "msum", "qa" (the q_a norm inside q_b's GEMV, which "norm" does too). Unset
 * or empty: router, kvw, uvc and qa, the four that each made 1b-moe's batch-1 decode faster
 * on their own on an H200 (docs/PERF.md: +1%, +2.4%, +1.7%, +2.3%; norm, post and attn made
 * it slower or no faster: their extra work per block outweighs the launch saved). */
static void fuse_flags(ginfer *g)
{
    const char *v = getenv("DSV3_GINFER_FUSE");
    if (!v || !*v)
        v = "router,kvw,uvc,qa";
    int all = !strcmp(v, "1"), none = !strcmp(v, "0");
    g->fz_norm = all || (!none && strstr(v, "norm"));
    g->fz_attn = all || (!none && strstr(v, "attn"));
    g->fz_route = all || (!none && strstr(v, "router"));
    g->fz_kvw = all || (!none && strstr(v, "kvw"));
    g->fz_post = all || (!none && strstr(v, "post"));
    g->fz_uvc = all || (!none && strstr(v, "uvc"));
    g->fz_msum = all || (!none && strstr(v, "msum"));
    g->fz_qa = all || (!none && strstr(v, "qa"));
    const char *r1 = getenv("DSV3_GINFER_ROUTE1");
    g->route1 = !r1 || strcmp(r1, "0");
    const char *qkv = getenv("DSV3_GINFER_QKV");
    g->qkv = !qkv || strcmp(qkv, "0");
    const char *g1 = getenv("DSV3_GINFER_G1");
    g->g1 = g1 && *g1 ? atoi(g1) : 2;
    const char *d = getenv("DSV3_GINFER_DUP");
    snprintf(g->dup, sizeof g->dup, ",%s,", d ? d : "");
}

/* Whether launch kind key (norm, qa, qkv, qanorm, qb, parts, uvc, o, route, up, down; with
 * the router unfused rgemv, topk, bucket) is queued twice:
 * DSV3_GINFER_DUP=key,... (read at creation), for timing only. Each of these launches
 * writes only buffers it does not read, so the second computes the same values; what a step
 * gains in time is what one more such launch costs in the running graph, which no profiler
 * of single kernels shows. */
static int twice(const ginfer *g, const char *key)
{
    char k[16];
    snprintf(k, sizeof k, ",%s,", key);
    return strstr(g->dup, k) != NULL;
}

/* The fusions on, appended to the description inside its parentheses ("cuda:0 (NVIDIA H200,
 * bf16; fused decode: norm,attn)"): statistics and tests see which launches a step makes. */
static void describe_fusions(ginfer *g)
{
    const char *nm[] = {"norm", "attn", "router", "kvw", "post", "uvc", "msum", "qa"};
    int on[] = {g->fz_norm, g->fz_attn, g->fz_route, g->fz_kvw,
                g->fz_post, g->fz_uvc,  g->fz_msum, g->fz_qa};
    char list[64] = "";
    for (int i = 0; i < 8; i++)
        if (on[i])
            snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", *list ? "," : "",
                     nm[i]);
    size_t len = strlen(g->desc);
    if (*list && len && g->desc[len - 1] == ')')
        snprintf(g->desc + len - 1, sizeof g->desc - (len - 1), "; fused decode: %s)", list);
}

/* "; what" appended inside the description's parentheses. */
static void describe_add(ginfer *g, const char *what)
{
    size_t len = strlen(g->desc);
    if (len && g->desc[len - 1] == ')')
        snprintf(g->desc + len - 1, sizeof g->desc - (len - 1), "; %s)", what);
}

/* "; PDL" when the kernels are launched with programmatic dependent launch at the default
 * scheme (ginfer_k.cuh: DSV3_GINFER_PDL, compute capability 9.0+; "PDL late", "PDL early",
 * "PDL entry" for the others, "PDL late for LIST" for another list of kinds kept late),
 * "; carveout N%" with DSV3_GINFER_CARVEOUT. */
static void describe_pdl(ginfer *g)
{
    char c[160];
    int m = gk_pdl_mode();
    const char *late = gk_pdl_late_kinds();
    if (m == GK_PDL_EARLY && !*late)
        describe_add(g, "PDL early");
    else if (m == GK_PDL_EARLY && strcmp(late, GK_PDL_LATE_KINDS)) {
        snprintf(c, sizeof c, "PDL late for %.140s", late);
        describe_add(g, c);
    } else if (m != GK_PDL_OFF)
        describe_add(g, m == GK_PDL_LATE ? "PDL late" : m == GK_PDL_ENTRY ? "PDL entry" : "PDL");
    if (gk_carveout() >= 0) {
        snprintf(c, sizeof c, "carveout %d%%", gk_carveout());
        describe_add(g, c);
    }
}

/* The side stream and its events, where some layer's shared experts run aside (see
 * shared_fork): not while profiling (the profile's events follow g->s alone) nor with
 * DSV3_GINFER_ASIDE=0 (one stream, for comparisons). */
static int aside_setup(ginfer *g, dsv3_err *e)
{
    const char *v = getenv("DSV3_GINFER_ASIDE");
    if ((v && !strcmp(v, "0")) || g->prof || !aside_width(g))
        return 0;
    CUDA_TRY(cudaStreamCreateWithFlags(&g->s2, cudaStreamNonBlocking), e);
    CUDA_TRY(cudaEventCreateWithFlags(&g->ev_fork, cudaEventDisableTiming), e);
    CUDA_TRY(cudaEventCreateWithFlags(&g->ev_join, cudaEventDisableTiming), e);
    if (!(g->hs = (float *)dal(g, (size_t)g->rmax * aside_width(g) * 4, e)))
        return -1;
    describe_add(g, "shared experts aside");
    return 0;
}

static int create(ginfer **out, const wsrc *src, const dsv3_config *c, int n_ctx, int n_slots,
                  int dev, int exact, dsv3_err *e)
{
    *out = NULL;
    if (n_ctx < 1 || n_slots < 1)
        return err_set(e, "ginfer: a context of %d tokens and %d slots", n_ctx, n_slots);
    if (check_shapes(c, e))
        return -1;
    ginfer *g = (ginfer *)calloc(1, sizeof *g);
    if (!g)
        return err_set(e, "ginfer: out of host memory");
    g->exact = exact;
    g->wsz = exact ? 4 : 2;
    fuse_flags(g);
    g->pf_min = pf_threshold();
    if ((g->fp8 = fp8_wanted(src, exact)))
        g->fz_norm = 0;  /* the norm-fused GEMVs have no FP8 form */
    g->L = c->num_hidden_layers;
    g->H = c->hidden_size;
    g->nh = c->num_attention_heads;
    g->qk = config_qk_head_dim(c);
    g->nope = c->qk_nope_head_dim;
    g->rope = c->qk_rope_head_dim;
    g->kv = c->kv_lora_rank;
    g->dv = c->v_head_dim;
    g->qr = c->q_lora_rank;
    g->E = c->n_routed_experts;
    g->K = c->num_experts_per_tok;
    g->mi = c->moe_intermediate_size;
    g->V = c->vocab_size;
    g->inter = c->intermediate_size;
    g->n_group = c->n_group;
    g->topk_group = c->topk_group;
    g->norm_topk = c->norm_topk_prob;
    g->interleave = c->rope_interleave;
    g->route_scale = (float)c->routed_scaling_factor;
    g->scale = (float)config_softmax_scale(c);
    g->eps = (float)c->rms_norm_eps;
    g->n_ctx = n_ctx;
    g->n_slots = n_slots;
    g->W = g->kv + g->rope;
    /* parts of about 32 positions at full context: one sequence fills many SMs */
    g->nsplit = n_ctx / 32 < 1 ? 1 : n_ctx / 32 > ATT_MAXSPLIT ? ATT_MAXSPLIT : n_ctx / 32;
    {   /* DSV3_GINFER_NSPLIT=P (1..64): P parts instead, to time the trade between the parts'
         * own work and the combine's (the parts' sums change with P, not their bound) */
        const char *v = getenv("DSV3_GINFER_NSPLIT");
        char *end;
        long p = v && *v ? strtol(v, &end, 10) : 0;
        if (v && *v && !*end && p >= 1 && p <= ATT_MAXSPLIT)
            g->nsplit = (int)p;
    }
    g->bucket_max = 1;
    while (g->bucket_max < n_slots * (src->mtp ? 2 : 1))  /* a slot's row and its draft's */
        g->bucket_max *= 2;
    g->rmax = g->bucket_max > PCHUNK ? g->bucket_max : PCHUNK;
    int rc = gpu_ctx_create(&g->c, dev, 0, e);
    if (!rc) {
        g->s = (cudaStream_t)gpu_ctx_stream(g->c);
        g->stage = (uint16_t *)malloc((size_t)STAGE * 2);
        g->h_in = (int *)malloc((size_t)4 * g->rmax * sizeof(int));
        g->ly = (glayer *)calloc((size_t)g->L + 1, sizeof *g->ly);  /* + the MTP block */
        if (!g->stage || !g->h_in || !g->ly)
            rc = err_set(e, "ginfer: out of host memory");
    }
    size_t VH = (size_t)g->V * g->H;
    if (!rc && (!(g->embed = get(g, src, "model.embed_tokens.weight", VH, g->wsz, e)) ||
                !(g->head = c->tie_word_embeddings
                                ? g->embed
                                : get(g, src, "lm_head.weight", VH, g->wsz, e)) ||
                !(g->fnorm = (float *)get(g, src, "model.norm.weight", g->H, 4, e))))
        rc = -1;
    for (int l = 0; l < g->L && !rc; l++)
        rc = up_layer(g, src, c, l, &g->ly[l], e);
    if (!rc && src->mtp)
        rc = mtp_setup(g, src, c, e);
    int half = g->rope / 2;
    if (!rc) {
        size_t nt = (size_t)n_ctx * (half ? half : 1);
        float *ct = (float *)malloc(nt * 4), *st = (float *)malloc(nt * 4);
        double *inv = (double *)malloc((half ? half : 1) * sizeof(double));
        if (!ct || !st || !inv) {
            rc = err_set(e, "ginfer: out of host memory");
        } else {
            config_rope_inv_freq(c, inv);
            rope_tables(ct, st, inv, n_ctx, half, config_rope_attention_factor(c));
            if (!(g->cos_t = (float *)dal(g, nt * 4, e)) ||
                !(g->sin_t = (float *)dal(g, nt * 4, e)) ||
                gpu_upload(g->c, g->cos_t, ct, nt * 4, e) ||
                gpu_upload(g->c, g->sin_t, st, nt * 4, e))
                rc = -1;
        }
        free(ct);
        free(st);
        free(inv);
    }
    /* the cache: layers x (slots + the spare slot padding rows write to) x n_ctx x W */
    g->cache_bytes = (size_t)(g->L + !!src->mtp) * (n_slots + 1) * n_ctx * g->W * g->wsz;
    if (!rc && !(g->cache = dal(g, g->cache_bytes, e))) {
        rc = err_set(e, "ginfer: no device memory for a cache of %d slots x %d tokens "
                     "(%.1f MiB; lower --ctx or --parallel)", n_slots, n_ctx,
                     g->cache_bytes / 1048576.0);
    }
    if (!rc)
        rc = alloc_acts(g, e) || gk_attn_setup(exact, g->nh, g->kv, g->rope, e);
    gpu_props p;
    const char *dt = exact ? "fp32" : g->n_f8 ? "fp8+bf16" : "bf16";
    snprintf(g->desc, sizeof g->desc, "cuda:%d (%s)", dev, dt);
    if (!rc && !gpu_describe(dev, &p, e))
        snprintf(g->desc, sizeof g->desc, "cuda:%d (%s, %s)", dev, p.name, dt);
    describe_fusions(g);
    describe_pdl(g);
    if (!rc && !g->qr && g->qkv && g->ly[0].qkv && lat_takes(g, 1, g->nsplit) &&
        !(g->fz_norm && !g->fp8 && gk_gemv_norm_fits(1, g->H)))  /* layers()' g->fin */
        describe_add(g, "q_lat in the q GEMV");
    if (!rc && cudaMallocHost((void **)&g->h_logits, (size_t)g->bucket_max * g->V * 4) !=
                   cudaSuccess) {
        g->h_logits = NULL;
        rc = err_set(e, "ginfer: no pinned host memory for %d rows of logits", g->bucket_max);
    }
    g->feed_n = -1;
    if (!rc && (cudaHostAlloc((void **)&g->h_tokm, (size_t)AHEAD * g->bucket_max * 4,
                              cudaHostAllocMapped) != cudaSuccess ||
                cudaHostGetDevicePointer((void **)&g->d_tokm, g->h_tokm, 0) != cudaSuccess))
        rc = err_set(e, "ginfer: no mapped pinned host memory for %d greedy ids",
                     AHEAD * g->bucket_max);
    for (int k = 0; k < AHEAD && !rc; k++) {
        gstep *t = &g->st[k];
        t->h_tok = g->h_tokm + (size_t)k * g->bucket_max;
        for (int i = 0; i < 3 && !rc; i++)
            if (cudaEventCreate(&t->ev[i]) != cudaSuccess) {
                t->ev[i] = NULL;
                rc = err_set(e, "ginfer: cannot create the decode steps' events");
            }
    }
    const char *pe = getenv("DSV3_GINFER_PROFILE");
    if (!rc && pe && *pe && strcmp(pe, "0")) {
        if (!(g->prof = (gprof *)calloc(1, sizeof *g->prof)))
            rc = err_set(e, "ginfer: out of host memory");
        for (int i = 0; !rc && i <= PROF_MAX; i++, g->prof->n_ev++)
            if (cudaEventCreate(&g->prof->ev[i]) != cudaSuccess)
                rc = err_set(e, "ginfer: cannot create the profile's events");
    }
    const char *ck = getenv("DSV3_GINFER_CLOCK");
    if (!rc && ck && *ck && strcmp(ck, "0")) {
        size_t b = (size_t)CLK_KERNELS * GK_CLK_N * sizeof *g->clk;
        g->clk = (unsigned long long *)dal(g, b, e);
        if (!g->clk || cudaMemset(g->clk, 0, b) != cudaSuccess)
            rc = err_set(e, "ginfer: cannot set up DSV3_GINFER_CLOCK's counters");
    }
    if (!rc)
        rc = aside_setup(g, e) || capture_all(g, e) || pf_warm(g, e);
    if (rc) {
        ginfer_destroy(g);
        return -1;
    }
    *out = g;
    return 0;
}

extern "C" int ginfer_create(ginfer **out, const dsv3_model *m, int n_ctx, int n_slots, int dev,
                             int exact, dsv3_err *e)
{
    wsrc src = {m, NULL, 0};
    return create(out, &src, &m->cfg, n_ctx, n_slots, dev, exact, e);
}

extern "C" int ginfer_create_dir(ginfer **out, const char *dir, int n_ctx, int n_slots, int dev,
                                 dsv3_err *e)
{
    hfdir h;
    *out = NULL;
    if (hfdir_open(&h, dir, e))
        return -1;
    wsrc src = {NULL, &h, 0};
    int rc = create(out, &src, &h.cfg, n_ctx, n_slots, dev, 0, e);
    hfdir_close(&h);
    return rc;
}

extern "C" void ginfer_destroy(ginfer *g)
{
    if (!g)
        return;
    if (g->nq)  /* steps never collected: done before their buffers go */
        cudaStreamSynchronize(g->s);
    if (g->clk)
        clock_report(g);
    if (g->prof) {
        prof_print(g);
        for (int i = 0; i < g->prof->n_ev; i++)
            cudaEventDestroy(g->prof->ev[i]);
        free(g->prof);
    }
    for (int b = 0; b < MAX_BUCKETS; b++) {
        gpu_graph_destroy(g->graph[b]);
        gpu_graph_destroy(g->dgraph[b]);
    }
    if (g->h_logits)
        cudaFreeHost(g->h_logits);
    if (g->h_tokm)
        cudaFreeHost(g->h_tokm);
    if (g->h_top)
        cudaFreeHost(g->h_top);
    if (g->topscr)
        cudaFree(g->topscr);
    for (int k = 0; k < AHEAD; k++) {
        for (int i = 0; i < 3; i++)
            if (g->st[k].ev[i])
                cudaEventDestroy(g->st[k].ev[i]);
    }
    if (g->s2) {
        cudaStreamSynchronize(g->s2);
        cudaStreamDestroy(g->s2);
    }
    if (g->ev_fork)
        cudaEventDestroy(g->ev_fork);
    if (g->ev_join)
        cudaEventDestroy(g->ev_join);
    for (int i = 0; i < g->n_allocs; i++)
        gpu_free(g->allocs[i]);
    free(g->allocs);
    pf_free(g);
    free(g->f8);
    gpu_ctx_destroy(g->c);
    free(g->ly);
    free(g->mtp);
    free(g->stage);
    free(g->h_in);
    free(g);
}

extern "C" void ginfer_dims(const ginfer *g, int *vocab, int *layers, int *width)
{
    *vocab = g->V;
    *layers = g->L;
    *width = g->W;
}
extern "C" size_t ginfer_cache_bytes(const ginfer *g) { return g->cache_bytes; }
extern "C" size_t ginfer_cache_bytes_per_token(const ginfer *g)
{
    return (size_t)(g->L + !!g->mtp) * g->W * g->wsz;
}
extern "C" size_t ginfer_weight_bytes(const ginfer *g) { return g->weight_bytes; }
extern "C" const char *ginfer_describe(const ginfer *g) { return g->desc; }
extern "C" long ginfer_graph_replays(const ginfer *g) { return g->replays; }
extern "C" double ginfer_graph_seconds(const ginfer *g) { return g->graph_s; }

static const void *wofs(const void *w, size_t elems, int wsz)
{
    return (const char *)w + elems * wsz;
}

/* The profile (DSV3_GINFER_PROFILE set): the decode graph of one row is captured with an
 * event after every launch (event record nodes, so without the launches' overlap), and each
 * replay's times between the events are summed under the launch's name; printed to stderr
 * by ginfer_destroy. bytes: the weights (and norms) the launch reads, for its GB/s. */
static void mark(ginfer *g, const char *name, double bytes)
{
    gprof *p = g->prof;
    if (!p || !p->armed || p->n >= PROF_MAX)
        return;
    if (cudaEventRecordWithFlags(p->ev[p->n + 1], g->s, cudaEventRecordExternal) ==
        cudaSuccess) {
        p->name[p->n] = name;
        p->bytes[p->n++] = bytes;
    }
}

static unsigned long long *clk_for(const ginfer *g, int kernel, int n)
{
    return g->clk && n == 1 ? g->clk + kernel * GK_CLK_N : NULL;
}

/* What DSV3_GINFER_CLOCK counted: a line a timed kernel with its launches, the mean SM clock
 * of its first block (cycles over global-timer time) and each phase's mean cycles and
 * microseconds at that clock, as seen by that block's thread 0. */
static void clock_report(const ginfer *g)
{
    unsigned long long h[CLK_KERNELS * GK_CLK_N];
    if (cudaDeviceSynchronize() != cudaSuccess ||
        cudaMemcpy(h, g->clk, sizeof h, cudaMemcpyDeviceToHost) != cudaSuccess) {
        fprintf(stderr, "ginfer clock: cannot read the counters\n");
        return;
    }
    for (int k = 0; k < CLK_KERNELS; k++) {
        const unsigned long long *c = h + k * GK_CLK_N;
        double n = (double)c[GK_CLK_CNT];
        if (n == 0)
            continue;
        double ghz = c[GK_CLK_NS] ? (double)c[GK_CLK_CYC] / (double)c[GK_CLK_NS] : 0;
        fprintf(stderr, "ginfer clock: %s, %.0f launches, %.3f GHz, %.2f us in all:",
                clk_phases[k][0], n, ghz, ghz > 0 ? c[GK_CLK_CYC] / n / ghz / 1e3 : 0);
        for (int i = 0; i < GK_CLK_CYC && clk_phases[k][i + 1]; i++)
            fprintf(stderr, " %s %.0f (%.2f us)", clk_phases[k][i + 1], c[i] / n,
                    ghz > 0 ? c[i] / n / ghz / 1e3 : 0);
        fprintf(stderr, "\n");
    }
}

static void prof_print(const ginfer *g)
{
    const gprof *p = g->prof;
    if (!p || !p->steps)
        return;
    double tot = 0, totb = 0;
    for (int i = 0; i < p->n; i++) {
        tot += p->ms[i];
        totb += p->bytes[i];
    }
    tot /= p->steps;
    fprintf(stderr, "ginfer profile: %ld decode steps of 1 row, %.1f us a step (events between "
            "the launches, no overlap)\n  %-18s %8s %9s %6s %9s %8s\n", p->steps, 1e3 * tot,
            "launch", "a step", "us/step", "share", "MB/step", "GB/s");
    for (int i = 0; i < p->n; i++) {
        int first = 1;
        for (int j = 0; j < i && first; j++)
            first = strcmp(p->name[j], p->name[i]) != 0;
        if (!first)
            continue;
        double ms = 0, by = 0;
        int cnt = 0;
        for (int j = i; j < p->n; j++)
            if (!strcmp(p->name[j], p->name[i])) {
                ms += p->ms[j] / p->steps;
                by += p->bytes[j];
                cnt++;
            }
        fprintf(stderr, "  %-18s %8d %9.1f %5.1f%% %9.2f %8.0f\n", p->name[i], cnt, 1e3 * ms,
                100 * ms / tot, by / 1e6, ms > 0 ? by / (ms * 1e-3) / 1e9 : 0.0);
    }
    fprintf(stderr, "  %-18s %8d %9.1f %5.1f%% %9.2f %8.0f\n", "all", p->n, 1e3 * tot, 100.0,
            totb / 1e6, totb / (tot * 1e-3) / 1e9);
}

/* The pending MoE output as add_norm's delta (see ffn). */
static const gk_moe_out *pending(ginfer *g)
{
    if (!g->pend)
        return NULL;
    g->pend = 0;
    return &g->mo;
}

/* x += the pending MLP or MoE output, x += delta, xn = norm(x) with weight w. */
static int add_norm(ginfer *g, int n, const float *delta, const float *w, const char *name,
                    dsv3_err *e)
{
    if (gk_add_norm(g->s, g->x, g->H, delta, pending(g), w, g->xn, n, g->H, g->eps, e))
        return -1;
    /* DSV3_GINFER_DUP's "norm": the norm again over the x just summed (nothing to add, x
     * not written): the same xn */
    if (twice(g, "norm") &&
        gk_add_norm(g->s, g->x, g->H, NULL, NULL, w, g->xn, n, g->H, g->eps, e))
        return -1;
    mark(g, name, g->H * 4.0);
    return 0;
}

/* y[n, O] = W . (the input norm's output), W [O, H]: a GEMV of xn, or with g->fin one that
 * normalises x plus the pending output itself (the norm's launch saved; x is updated by the
 * post-attention add_norm, which adds the pending output and the attention's). */
static int gemv_in(ginfer *g, const glayer *y, const void *w, float *out, long ldy, int n, int O,
                   dsv3_err *e)
{
    if (!g->fin)
        return gx_gemv(g, g->xn, g->H, 0, w, g->exact, 0, out, ldy, 0, n, g->H, O, 1, e);
    return gk_gemv_norm(g->s, g->x, g->H, NULL, g->pend ? &g->mo : NULL, y->in_norm, g->eps, w,
                        g->exact, out, ldy, n, g->H, O, e);
}

/* Whether q, kv_a and q_lat go in one launch (gk_gemv_lat) and the attention parts form the
 * cache row (gk_kv_new): one row of bf16 weights without q_lora, the uv launch combining the
 * parts, shapes those kernels take. One launch fewer a layer (the q_lat GEMV's). */
static int lat_takes(const ginfer *g, int n, int nsplit)
{
    return n == 1 && !g->exact && g->fz_uvc && gk_gemv_uvc_fits(n, g->kv) &&
           gk_attn_new_fits(n, g->kv, g->rope, g->n_ctx, nsplit) &&
           gk_gemv_lat_fits(n, g->H, g->nh, g->qk, g->nope, g->W, g->kv);
}

/* MLA of layer l over n rows: xn (or, with g->fin, x and the pending output) in, delta out. */
static int mla(ginfer *g, int l, int n, int nsplit, dsv3_err *e)
{
    const glayer *y = &g->ly[l];
    int H = g->H, nh = g->nh, qk = g->qk, kv = g->kv, wf = g->exact, ws = g->wsz, W = g->W;
    const int *slot = g->d_in + g->rmax, *pos = g->d_in + 2 * g->rmax;
    void *cache = (char *)g->cache + (size_t)l * (g->n_slots + 1) * g->n_ctx * W * ws;
    const float *kva = g->kva;
    int ldkva = W, lat = 0;
    gk_kv_new nr = {g->kva, y->kv_a_norm, g->cos_t, g->sin_t, g->interleave, 1e-6f};
    gk_lat_pf pf = {cache, slot, pos, g->n_ctx, ws};
    if (g->qr) {
        int A = g->qr + W;  /* q_a's and kv_a's outputs side by side */
        for (int r_ = 0; r_ <= twice(g, "qa"); r_++)
            if (gemv_in(g, y, y->q_a, g->qa, A, n, A, e))
                return -1;
        mark(g, g->fin ? "gemv q_a+kv_a+norm" : "gemv q_a+kv_a", (double)A * H * ws);
        if ((g->fz_norm || (g->fz_qa && n == 1)) && !f8_scales(g, y->q_b) &&
            gk_gemv_norm_fits(n, g->qr)) {
            /* q_a's norm inside q_b's GEMV */
            for (int r_ = 0; r_ <= twice(g, "qb"); r_++)
                if (gk_gemv_norm(g->s, g->qa, A, NULL, NULL, y->q_a_norm, 1e-6f, y->q_b, wf, g->q,
                                 nh * qk, n, g->qr, nh * qk, e))
                    return -1;
            mark(g, "gemv q_b+norm", (double)nh * qk * g->qr * ws);
        } else {
            for (int r_ = 0; r_ <= twice(g, "qanorm"); r_++)
                if (gk_add_norm(g->s, g->qa, A, NULL, NULL, y->q_a_norm, g->qan, n, g->qr, 1e-6f,
                                e))
                    return -1;
            mark(g, "norm q_a", g->qr * 4.0);
            for (int r_ = 0; r_ <= twice(g, "qb"); r_++)
                if (gx_gemv(g, g->qan, g->qr, 0, y->q_b, wf, 0, g->q, nh * qk, 0, n, g->qr,
                            nh * qk, 1, e))
                    return -1;
            mark(g, "gemv q_b", (double)nh * qk * g->qr * ws);
        }
        kva = g->qa + g->qr;
        ldkva = A;
    } else if (y->qkv && !g->fin && g->qkv) {
        /* q and kv_a in one launch (their rows stored together); at one row with the uv
         * launch's combine, q_lat too, the cache row then formed by the attention parts */
        lat = lat_takes(g, n, nsplit);
        for (int r_ = 0; r_ <= twice(g, "qkv"); r_++)
            if (lat ? gk_gemv_lat(g->s, g->xn, y->q, H, nh, qk, g->nope, W, g->q, g->kva, y->ukT,
                                  kv, g->qlat, &pf, e)
                    : gk_gemv_two(g->s, g->xn, H, y->q, wf, g->q, nh * qk, nh * qk, g->kva, W, n,
                                  H, nh * qk + W, e))
                return -1;
        if (lat)
            mark(g, "gemv q+kv_a+q_lat",
                 ((double)(nh * qk + W) * H + (double)nh * kv * g->nope) * ws);
        else
            mark(g, "gemv q+kv_a", (double)(nh * qk + W) * H * ws);
    } else {
        if (gemv_in(g, y, y->q, g->q, nh * qk, n, nh * qk, e))
            return -1;
        mark(g, "gemv q", (double)nh * qk * H * ws);
        if (gemv_in(g, y, y->kv_a, g->kva, W, n, W, e))
            return -1;
        mark(g, "gemv kv_a", (double)W * H * ws);
    }
    if (lat) {
        /* q_lat written; the parts form the cache row and rotate q_pe */
    } else if (g->fz_kvw && gk_gemv_kvw_fits(n, kv)) {
        /* q_lat[n, h] = W_uk_h^T q_nope[n, h], and the cache row written, q_pe rotated */
        if (gk_gemv_kvw(g->s, g->q, (long)nh * qk, qk, y->ukT, wf, (long)kv * g->nope, g->qlat,
                        (long)nh * kv, kv, n, g->nope, kv, nh, kva, ldkva, y->kv_a_norm, cache,
                        slot, pos, kv, g->rope, g->n_ctx, g->cos_t, g->sin_t, g->interleave,
                        1e-6f, g->q, nh, qk, g->nope, e))
            return -1;
        mark(g, "gemv q_lat+kv_write", (double)nh * kv * g->nope * ws);
    } else {
        if (gk_kv_write(g->s, kva, ldkva, y->kv_a_norm, cache, wf, slot, pos, n, kv, g->rope,
                        g->n_ctx, g->cos_t, g->sin_t, g->interleave, 1e-6f, g->q, nh, qk,
                        g->nope, e))
            return -1;
        mark(g, "kv_write+rope", kv * 4.0);
        /* q_lat[n, h] = W_uk_h^T q_nope[n, h] */
        if (gk_gemv(g->s, g->q, (long)nh * qk, qk, y->ukT, wf, (long)kv * g->nope, g->qlat,
                    (long)nh * kv, kv, n, g->nope, kv, nh, e))
            return -1;
        mark(g, "gemv q_lat", (double)nh * kv * g->nope * ws);
    }
    if (g->fz_uvc && gk_gemv_uvc_fits(n, kv)) {
        /* the parts, combined by the uv GEMV's blocks (each its head's) */
        for (int r_ = 0; r_ <= twice(g, "parts"); r_++)
            if (gk_attn_parts(g->s, g->pm, g->pl, g->pacc, g->qlat, g->q, qk, g->nope, cache, wf,
                              slot, pos, n, nh, kv, g->rope, g->n_ctx, nsplit, g->scale,
                              lat ? &nr : NULL, clk_for(g, CLK_PARTS, n), e))
                return -1;
        mark(g, "attention parts", 0);
        for (int r_ = 0; r_ <= twice(g, "uvc"); r_++)
            if (gk_gemv_uvc(g->s, g->pm, g->pl, g->pacc, nsplit,
                            wofs(y->kvb, (size_t)g->nope * kv, ws), wf,
                            (long)(g->nope + g->dv) * kv, g->ao, (long)nh * g->dv, g->dv, n,
                            kv, g->dv, nh, clk_for(g, CLK_UVC, n), e))
                return -1;
        mark(g, "gemv uv+combine", (double)nh * g->dv * kv * ws);
        goto o_proj;
    }
    if (gk_attn(g->s, g->olat, g->pm, g->pl, g->pacc, g->qlat, g->q, qk, g->nope, cache, wf,
                slot, pos, n, nh, kv, g->rope, g->n_ctx, nsplit, g->scale,
                g->fz_attn ? g->acnt : NULL, e))
        return -1;
    mark(g, g->fz_attn ? "attention (fused)" : "attention", 0);
    /* ao[n, h] = W_uv_h o_lat[n, h] */
    if (gk_gemv(g->s, g->olat, (long)nh * kv, kv, wofs(y->kvb, (size_t)g->nope * kv, ws), wf,
                (long)(g->nope + g->dv) * kv, g->ao, (long)nh * g->dv, g->dv, n, kv, g->dv, nh,
                e))
        return -1;
    mark(g, "gemv uv", (double)nh * g->dv * kv * ws);
o_proj:
    for (int r_ = 0; r_ <= twice(g, "o"); r_++)
        if (gx_gemv(g, g->ao, (long)nh * g->dv, 0, y->o, wf, 0, g->delta, H, 0, n, nh * g->dv,
                    H, 1, e))
            return -1;
    mark(g, "gemv o", (double)H * nh * g->dv * ws);
    return 0;
}

/* Layer y's dense MLP (w1, w2; shared: the MoE's shared experts kept apart from the routed
 * ones) over the n rows of xn, into out, on stream st with its hidden rows in h. */
static int dense_mlp(ginfer *g, const glayer *y, int n, float *out, int shared,
                     cudaStream_t st, float *h, dsv3_err *e)
{
    int H = g->H, wf = g->exact, ws = g->wsz;
    if (gx_ffn_up(g, st, g->xn, y->w1, wf, 0, h, NULL, NULL, 1, 1, 1, n, n, H, y->F, e))
        return -1;
    mark(g, shared ? "shared up" : "dense up", 2.0 * y->F * H * ws);
    if (gx_ffn_down(g, st, h, y->w2, wf, 0, out, NULL, 1, 1, n, n, y->F, H, e))
        return -1;
    mark(g, shared ? "shared down" : "dense down", (double)y->F * H * ws);
    return 0;
}

/* The FFN's output, left for the next add_norm to sum (g->mo): routed rows ye weighted by rw
 * at spos (K a row), plus ys. */
static void leave_pending(ginfer *g, const float *ye, const float *rw, const float *ys,
                          const int *spos, int K)
{
    g->mo.ye = ye;
    g->mo.rw = rw;
    g->mo.ys = ys;
    g->mo.spos = spos;
    g->mo.K = K;
    g->pend = 1;
}

/* Layer y's shared experts, when they are an MLP of their own width (y->F: DeepSeek-V2-Lite's
 * two of 1408 are one of 2816, not one more group of the routed launches), run on the side
 * stream g->s2 beside the router and the routed experts: they need only xn. In a decode
 * graph they become a branch from xn's norm to the next layer's first launch, so their
 * reads overlap the router's launch (a few blocks) and the routed experts' hand-overs
 * instead of adding two launches to the chain. The same kernels on the same values: the
 * same bits as on one stream. */
static int shared_aside(const ginfer *g, const glayer *y)
{
    return g->s2 && y->F && !y->sh;
}

/* The shared experts queued on the side stream after what g->s has queued (the norm that
 * wrote xn), out to g->ys; ffn joins them back before the next layer reads ys. */
static int shared_fork(ginfer *g, const glayer *y, int n, dsv3_err *e)
{
    CUDA_TRY(cudaEventRecord(g->ev_fork, g->s), e);
    CUDA_TRY(cudaStreamWaitEvent(g->s2, g->ev_fork, 0), e);
    if (dense_mlp(g, y, n, g->ys, 1, g->s2, g->hs, e))
        return -1;
    CUDA_TRY(cudaEventRecord(g->ev_join, g->s2), e);
    return 0;
}

/* The MLP or MoE of layer l over n rows: xn in, delta out (a dense MLP) or the MoE output
 * left pending (g->mo) for the next add_norm to sum, which saves the combine a launch. */
static int ffn(ginfer *g, int l, int n, dsv3_err *e)
{
    const glayer *y = &g->ly[l];
    int H = g->H, wf = g->exact, K = g->K, E = g->E, mi = g->mi, ws = g->wsz;
    if (!y->moe) {
        if (dense_mlp(g, y, n, g->dd, 0, g->s, g->h, e))
            return -1;
        /* pending as an output of no routed rows (add_norm adds 0 + dd[i]: dd[i]) */
        leave_pending(g, g->dd, NULL, g->dd, NULL, 0);
        return 0;
    }
    /* the experts a step reads: at most n*K routed ones, and the shared one */
    int maxact = (n * K < E ? n * K : E) + y->sh;
    double act = maxact;
    int aside = shared_aside(g, y);
    if (aside && !g->fpost && shared_fork(g, y, n, e))  /* xn is the post norm's, queued */
        return -1;
    if (g->fpost == 2) {  /* the post-attention norm too (layers() left it out), one row */
        if (gk_route1_norm(g->s, g->x, g->delta, y->post_norm, g->eps, g->xn, y->router, y->bias,
                           g->rl, g->rs, g->rw, g->idx, n, H, E, g->n_group, g->topk_group, K,
                           g->norm_topk, g->route_scale, y->sh ? n : 0, g->off, g->order,
                           g->spos, clk_for(g, CLK_ROUTE1, n), e))
            return -1;
        mark(g, "router+norm+top-k+bucket", E * H * 4.0);
    } else if (g->fpost) {  /* the same in route_k's grid */
        const gk_moe_out *mo = pending(g);
        if (gk_route_norm(g->s, g->x, g->delta, mo, y->post_norm, g->eps, g->xn, y->router,
                          y->bias, g->rl, g->rs, g->rw, g->idx, n, H, E, g->n_group,
                          g->topk_group, K, g->norm_topk, g->route_scale, y->sh ? n : 0, g->off,
                          g->order, g->spos, g->rcnt, e))
            return -1;
        mark(g, "router+norm+top-k+bucket", E * H * 4.0);
    } else if (g->fz_route && n <= 64) {  /* decode-sized: the last block routes every row */
        for (int r_ = 0; r_ <= twice(g, "route"); r_++)
            if (gk_route(g->s, g->xn, y->router, y->bias, g->rl, g->rs, g->rw, g->idx, n, H, E,
                         g->n_group, g->topk_group, K, g->norm_topk, g->route_scale, y->sh ? n : 0,
                         g->off, g->order, g->spos, g->rcnt, g->route1,
                         clk_for(g, CLK_ROUTE1, n), e))
                return -1;
        mark(g, "router+top-k+bucket", E * H * 4.0);
    } else {
        for (int r_ = 0; r_ <= twice(g, "rgemv"); r_++)
            if (gk_gemv(g->s, g->xn, H, 0, y->router, 1, 0, g->rl, E, 0, n, H, E, 1, e))
                return -1;
        mark(g, "gemv router", E * H * 4.0);
        for (int r_ = 0; r_ <= twice(g, "topk"); r_++)
            if (gpu_router_fwd(g->c, g->idx, g->rw, g->rs, g->rl, y->bias, n, E, g->n_group,
                               g->topk_group, K, g->norm_topk, g->route_scale, e))
                return -1;
        mark(g, "router top-k", E * 4.0);
        for (int r_ = 0; r_ <= twice(g, "bucket"); r_++)
            if (gk_moe_bucket(g->s, g->idx, n * K, K, E, y->sh ? n : 0, g->off, g->order, g->spos,
                              e))
                return -1;
        mark(g, "moe bucket", 0);
    }
    if (aside && g->fpost && shared_fork(g, y, n, e))  /* xn is the router launch's */
        return -1;
    for (int r_ = 0; r_ <= twice(g, "up"); r_++)
        if (gx_ffn_up(g, g->s, g->xn, y->ew1, wf, 2L * mi * H, g->h, g->order, g->off, K,
                      E + y->sh, maxact, n, n, H, mi, e))
            return -1;
    mark(g, "experts up", act * 2 * mi * H * ws);
    if (g->fz_msum && (y->sh || !y->F) && !f8_scales(g, y->ew2) && gk_down_sum_fits(n, K)) {
        /* the down-projection adds each row's weighted expert outputs to x itself */
        if (gk_down_sum(g->s, g->x, g->h, y->ew2, wf, (long)mi * H, g->idx, g->spos, g->rw, n,
                        K, E, y->sh, mi, H, e))
            return -1;
        mark(g, "experts down+sum", act * mi * H * ws);
        return 0; /* nothing pending */
    }
    for (int r_ = 0; r_ <= twice(g, "down"); r_++)
        if (gx_ffn_down(g, g->s, g->h, y->ew2, wf, (long)mi * H, g->ye, g->off, E + y->sh,
                        maxact, n, n, mi, H, e))
            return -1;
    mark(g, "experts down", act * mi * H * ws);
    const float *ys = NULL;
    if (y->sh) {
        ys = g->ye + (size_t)n * K * H;  /* the shared group's rows follow the routed ones */
    } else if (aside) {
        CUDA_TRY(cudaStreamWaitEvent(g->s, g->ev_join, 0), e);
        ys = g->ys;
    } else if (y->F) {
        if (dense_mlp(g, y, n, g->ys, 1, g->s, g->h, e))
            return -1;
        ys = g->ys;
    }
    leave_pending(g, g->ye, g->rw, ys, g->spos, K);
    return 0;
}

/* Where layer l's post-attention add_norm goes with the "post" fusion (g->fpost): 2 into
 * the one-row cluster router (route1_k, which takes no pending MoE output: the input norm
 * has summed it unless the norms are fused), 1 into route_k's grid, 0 a launch of its own. */
static int post_fused(const ginfer *g, int l, int n)
{
    if (!g->fz_post || !g->ly[l].moe)
        return 0;
    if (g->fz_route && g->route1 && !g->pend && gk_route1_norm_fits(n, g->H, g->E))
        return 2;
    return gk_route_norm_fits(n, g->H, g->E) ? 1 : 0;
}

/* The layers over the n rows in d_in; g->xn ends as the final-normed hidden states. Each
 * layer's input is x plus the layer before's pending output: summed and normed by the input
 * add_norm, or (fused norms) normed inside the attention's first GEMVs and summed by the
 * post-attention add_norm with the attention's output. */
static int layers(ginfer *g, int n, int nsplit, dsv3_err *e)
{
    g->pend = 0;
    /* (not with FP8 weight slots: the norm GEMVs read bf16 or fp32 weights only) */
    g->fin = g->fz_norm && !g->fp8 && gk_gemv_norm_fits(n, g->H);
    if (gk_embed(g->s, g->x, g->embed, g->exact, g->d_in, n, g->H, e))
        return -1;
    mark(g, "embed", (double)n * g->H * g->wsz);
    for (int l = 0; l < g->L; l++)
        if ((!g->fin && add_norm(g, n, NULL, g->ly[l].in_norm, "norm in (+moe sum)", e)) ||
            mla(g, l, n, nsplit, e) ||
            (!(g->fpost = post_fused(g, l, n)) &&
             add_norm(g, n, g->delta, g->ly[l].post_norm,
                      g->fin ? "norm post (+moe sum)" : "norm post", e)) ||
            ffn(g, l, n, e))
            return -1;
    g->fpost = 0;
    return add_norm(g, n, NULL, g->fnorm, "norm in (+moe sum)", e) ||
           mtp_keep(g, n, e) ? -1 : 0;
}

/* Packs rows [r0, r0+n) into the host input block, padding up to pad rows (the spare slot),
 * each with the ring place the next step queued takes. */
static void pack_rows(ginfer *g, int r0, int n, int pad, const int *slot, const int *pos,
                      const int32_t *ids)
{
    int R = g->rmax;
    g->feed_n = -1;
    for (int i = 0; i < pad; i++) {
        int in = i < n;
        g->h_in[i] = in ? ids[r0 + i] : 0;
        g->h_in[R + i] = in ? slot[r0 + i] : g->n_slots;
        g->h_in[2 * R + i] = in ? pos[r0 + i] : 0;
        g->h_in[3 * R + i] = (g->q0 + g->nq) % AHEAD;
    }
}

/* pack_rows, then the upload, waited for. */
static int upload_rows(ginfer *g, int r0, int n, int pad, const int *slot, const int *pos,
                       const int32_t *ids, dsv3_err *e)
{
    pack_rows(g, r0, n, pad, slot, pos, ids);
    return gpu_upload(g->c, g->d_in, g->h_in, (size_t)4 * g->rmax * sizeof(int), e);
}

/* The rows of a decode step (B with the padding), uploaded without waiting for the copy: the
 * host block is pageable, so the copy has taken it once the call returns. */
static int upload_step(ginfer *g, int n, int B, const int *slot, const int *pos,
                       const int32_t *ids, dsv3_err *e)
{
    pack_rows(g, 0, n, B, slot, pos, ids);
    CUDA_TRY(cudaMemcpyAsync(g->d_in, g->h_in, (size_t)4 * g->rmax * sizeof(int),
                             cudaMemcpyHostToDevice, g->s), e);
    return 0;
}

/* The feed that the decode graphs' argmax (capture) and a draw step's gk_topk_draw share. */
static gk_feed feed_of(const ginfer *g)
{
    return gk_feed{g->d_in, g->rmax, g->n_slots, g->d_tokm, AHEAD, g->bucket_max};
}

/* Captures the decode step of B rows (bucket b), ending in each row's greedy choice, or
 * (draw) in each row's draw (g->dgraph). */
static int capture(ginfer *g, int b, int B, int draw, dsv3_err *e)
{
    if (gpu_capture_begin(g->c, e))
        return -1;
    gprof *p = b == 0 && !draw ? g->prof : NULL;  /* the one-row greedy step is profiled */
    if (p) {
        p->armed = 1;
        p->n = 0;
        if (cudaEventRecordWithFlags(p->ev[0], g->s, cudaEventRecordExternal) != cudaSuccess)
            p->armed = 0;
    }
    int rc = layers(g, B, g->nsplit, e) ||
             gk_gemv(g->s, g->xn, g->H, 0, g->head, g->exact, 0, g->logits, g->V, 0, B, g->H,
                     g->V, 1, e);
    mark(g, "gemv head", (double)g->V * g->H * g->wsz);
    /* every step's greedy choices too (a few us): greedy decoding then copies ids, not
     * logits, to the host, and the next step's inputs are on the device already */
    gk_feed fd = feed_of(g);
    if (draw)
        rc = rc || gk_topk_draw(g->s, g->logits, B, g->V, g->ban, ginfer_top_max(g), g->drawscr,
                                g->bucket_max, NULL, g->d_draw, &fd, clk_for(g, CLK_TOPK, B), e);
    else
        rc = rc || gk_argmax(g->s, g->logits, B, g->V, g->ban, g->argscr, g->bucket_max,
                             g->tok, &fd, e);
    mark(g, draw ? "draw" : "argmax", (double)B * g->V * 4);
    if (p)
        p->armed = 0;
    dsv3_err e2;
    return gpu_capture_end(g->c, draw ? &g->dgraph[b] : &g->graph[b], rc ? &e2 : e) || rc ? -1
                                                                                        : 0;
}

static int draw_setup(ginfer *g, dsv3_err *e);

/* Every bucket's graphs (greedy and drawing), captured and run once on padding rows (which
 * write only the spare slot; they draw greedily), so that no decode step pays for a capture
 * or a first launch (a first draw step that did added ~2 ms to a 128-token run). */
static int capture_all(ginfer *g, dsv3_err *e)
{
    if (draw_setup(g, e))
        return -1;
    for (int b = 0, B = 1; B <= g->bucket_max; b++, B *= 2)
        for (int d = 0; d < 2; d++)
            if (upload_rows(g, 0, 0, B, NULL, NULL, NULL, e) || capture(g, b, B, d, e) ||
                gpu_graph_launch(g->c, d ? g->dgraph[b] : g->graph[b], e))
                return -1;
    return gpu_sync(g->c, e);
}

/* The bucket of a decode step of n rows: graph b of B = 2^b rows. */
static int bucket_of(int n, int *B)
{
    int b = 0;
    for (*B = 1; *B < n; *B *= 2)
        b++;
    return b;
}

/* Calls other than ginfer_greedy_submit and _collect find no step queued. */
static int idle(ginfer *g, dsv3_err *e)
{
    if (g->nq)  /* refused: the queued steps and their continuation stand */
        return err_set(e, "ginfer: %d greedy steps are queued (ginfer_greedy_collect them "
                       "first)", g->nq);
    g->feed_n = -1;
    return 0;
}

/* Queues step k (the ring place its rows carry in d_in): bucket b's graph over the n rows
 * (draw: its draw graph), and with logits the copy of their logits to h_logits. */
static int queue_step(ginfer *g, int k, int n, int b, int logits, int draw, dsv3_err *e)
{
    gstep *t = &g->st[k];
    t->n = n;
    t->b = b;
    t->done = 0;
    t->tail = logits ? TAIL_LOGITS : TAIL_NONE;
    CUDA_TRY(cudaEventRecord(t->ev[0], g->s), e);
    if (gpu_graph_launch(g->c, draw ? g->dgraph[b] : g->graph[b], e))
        return -1;
    CUDA_TRY(cudaEventRecord(t->ev[1], g->s), e);
    g->replays++;
    if (!logits)
        return 0;
    /* through pinned memory: a direct copy to pageable memory is staged by the driver */
    CUDA_TRY(cudaMemcpyAsync(g->h_logits, g->logits, (size_t)n * g->V * 4,
                             cudaMemcpyDeviceToHost, g->s), e);
    CUDA_TRY(cudaEventRecord(t->ev[2], g->s), e);
    return 0;
}

/* Waits for step k; counts its device time (and the profile's, for the one-row graph). */
static int wait_step(ginfer *g, int k, dsv3_err *e)
{
    gstep *t = &g->st[k];
    if (t->done)
        return 0;
    CUDA_TRY(cudaEventSynchronize(t->ev[t->tail ? 2 : 1]), e);
    t->done = 1;
    float ms = 0;
    if (cudaEventElapsedTime(&ms, t->ev[0], t->ev[t->tail == TAIL_TOPK ? 2 : 1]) == cudaSuccess)
        g->graph_s += ms * 1e-3;
    if (t->b == 0 && g->prof && g->prof->n) {
        gprof *p = g->prof;
        for (int i = 0; i < p->n; i++)
            if (cudaEventElapsedTime(&ms, p->ev[i], p->ev[i + 1]) == cudaSuccess)
                p->ms[i] += ms;
        p->steps++;
    }
    return 0;
}

/* A decode step of n rows through the graph of its bucket, waited for: the logits to logits,
 * or (logits NULL) the greedy choices to tok. */
static int decode(ginfer *g, int n, const int *slot, const int *pos, const int32_t *ids,
                  float *logits, int32_t *tok, dsv3_err *e)
{
    int B, b = bucket_of(n, &B);
    if (idle(g, e) || upload_step(g, n, B, slot, pos, ids, e) ||
        (!g->graph[b] && capture(g, b, B, 0, e)) ||
        queue_step(g, g->q0, n, b, logits != NULL, 0, e) ||
        wait_step(g, g->q0, e))
        return -1;
    if (logits)
        memcpy(logits, g->h_logits, (size_t)n * g->V * 4);
    else
        memcpy(tok, g->st[g->q0].h_tok, (size_t)n * sizeof *tok);
    return 0;
}

/* Logits of the wanted rows of the last pass (rows of g->xn) to out; returns how many. */
static int head_rows(ginfer *g, int n, const uint8_t *want, float *out, int *written,
                     dsv3_err *e)
{
    int k = 0;
    *written = 0;
    for (int r = 0; r <= n; r++) {
        if (r < n && (want && !want[r]))
            continue;
        if (r < n)
            g->h_in[k++] = r;  /* h_in is free again once the pass is queued */
        if (k == g->bucket_max || (r == n && k)) {
            if (gpu_upload(g->c, g->d_rows, g->h_in, (size_t)k * sizeof(int), e) ||
                gk_gather_rows(g->s, g->xl, g->xn, g->d_rows, k, g->H, e) ||
                gk_gemv(g->s, g->xl, g->H, 0, g->head, g->exact, 0, g->logits, g->V, 0, k, g->H,
                        g->V, 1, e) ||
                gpu_download(g->c, out + (size_t)*written * g->V, g->logits,
                             (size_t)k * g->V * 4, e))
                return -1;
            *written += k;
            k = 0;
        }
    }
    return 0;
}

extern "C" int ginfer_forward(ginfer *g, int n, const int *slot, const int *pos,
                              const int32_t *ids, const uint8_t *want, float *logits,
                              dsv3_err *e)
{
    int all = 1;
    for (int r = 0; r < n && want; r++)
        all &= want[r] != 0;
    if (n <= 0 || idle(g, e))
        return n <= 0 ? 0 : -1;
    if (pf_takes(g, n, slot, pos))  /* a prompt: the tensor-core pass */
        return pf_forward(g, n, slot, ids, want, logits, e);
    if (all && n <= decode_rows(g))
        return decode(g, n, slot, pos, ids, logits, NULL, e);
    /* direct passes of at most PCHUNK rows; a slot's rows stay in order, so a later chunk
     * sees the cache an earlier one wrote */
    size_t done = 0;
    for (int r0 = 0; r0 < n; r0 += PCHUNK) {
        int cn = n - r0 < PCHUNK ? n - r0 : PCHUNK, wrote;
        if (upload_rows(g, r0, cn, cn, slot, pos, ids, e) || layers(g, cn, 1, e) ||
            head_rows(g, cn, want ? want + r0 : NULL, logits + done * g->V, &wrote, e))
            return -1;
        done += (size_t)wrote;
    }
    return 0;
}

extern "C" int ginfer_forward_greedy(ginfer *g, int n, const int *slot, const int *pos,
                                     const int32_t *ids, int32_t *out, dsv3_err *e)
{
    if (n <= 0)
        return 0;
    if (n > decode_rows(g))
        return err_set(e, "ginfer: a greedy step of %d rows (at most %d)", n, decode_rows(g));
    return decode(g, n, slot, pos, ids, NULL, out, e);
}

/* A draw step's rows' draws into d_draw: the n given, and greedy ones for the padding rows
 * up to B (their ids go nowhere); the draw graphs' buffers made on first use. */
static int draw_rows(ginfer *g, int n, int B, const sampler_draw *draw, dsv3_err *e)
{
    for (int r = 0; r < n; r++)
        if (draw[r].top_k < 1 || draw[r].top_k > ginfer_top_max(g))
            return err_set(e, "ginfer: row %d draws from its %d largest logits (1 to %d)", r,
                           draw[r].top_k, ginfer_top_max(g));
    sampler_draw *h = (sampler_draw *)g->stage;  /* free between calls */
    for (int r = 0; r < B; r++) {
        h[r] = r < n ? draw[r] : sampler_draw{};
        if (r >= n)
            h[r].top_k = 1;
    }
    CUDA_TRY(cudaMemcpyAsync(g->d_draw, h, (size_t)B * sizeof *h, cudaMemcpyHostToDevice, g->s),
             e);
    return 0;
}

/* The draw graphs' buffers: every row's draw greedy until given, and the top-k scratch. */
static int draw_setup(ginfer *g, dsv3_err *e)
{
    size_t sb = gk_topk_scratch(g->bucket_max, g->V, ginfer_top_max(g));
    if (!(g->d_draw = (sampler_draw *)dal(g, (size_t)g->rmax * sizeof *g->d_draw, e)) ||
        !(g->drawscr = dal(g, sb, e)))
        return -1;
    CUDA_TRY(cudaMemsetAsync(g->drawscr, 0, sb, g->s), e);
    CUDA_TRY(cudaMemsetAsync(g->d_draw, 0, (size_t)g->rmax * sizeof *g->d_draw, g->s), e);
    return draw_rows(g, 0, g->rmax, NULL, e);
}

extern "C" int ginfer_draw_submit(ginfer *g, int n, const int *slot, const int *pos,
                                  const int32_t *ids, const sampler_draw *draw, dsv3_err *e)
{
    if (n <= 0 || n > decode_rows(g))
        return err_set(e, "ginfer: a decode step of %d rows (1 to %d)", n, decode_rows(g));
    if (g->nq == AHEAD)
        return err_set(e, "ginfer: %d decode steps queued already (collect one first)", AHEAD);
    if (ids && g->nq)
        return err_set(e, "ginfer: new rows while decode steps are queued (collect them first)");
    if (!ids && g->feed_n != n)
        return err_set(e, "ginfer: no decode step of %d rows queued before to continue", n);
    int B, b = bucket_of(n, &B), k = (g->q0 + g->nq) % AHEAD;
    int dr = ids ? draw != NULL : g->feed_draw;
    gpu_graph **gr = dr ? &g->dgraph[b] : &g->graph[b];
    if (ids && ((dr && draw_rows(g, n, B, draw, e)) || upload_step(g, n, B, slot, pos, ids, e) ||
                (!*gr && capture(g, b, B, dr, e))))
        return -1;
    if (queue_step(g, k, n, b, 0, dr, e))
        return -1;
    g->nq++;
    g->feed_n = n;
    g->feed_draw = dr;
    /* the profile's events are recorded again by every replay: read them before the next */
    return g->prof ? wait_step(g, k, e) : 0;
}

extern "C" int ginfer_greedy_submit(ginfer *g, int n, const int *slot, const int *pos,
                                    const int32_t *ids, dsv3_err *e)
{
    return ginfer_draw_submit(g, n, slot, pos, ids, NULL, e);
}

extern "C" int ginfer_greedy_collect(ginfer *g, int32_t *out, dsv3_err *e)
{
    if (!g->nq)
        return err_set(e, "ginfer: no greedy step queued to collect");
    int k = g->q0;
    if (wait_step(g, k, e))
        return -1;
    memcpy(out, g->st[k].h_tok, (size_t)g->st[k].n * sizeof *out);
    g->q0 = (g->q0 + 1) % AHEAD;
    g->nq--;
    return 0;
}

extern "C" int ginfer_top_max(const ginfer *g)
{
    int k = gk_topk_max(g->V);
    return k < g->V ? k : g->V;
}

/* Room for gk_topk over n rows of K candidates: its scratch (zeroed) and mapped output. */
static int top_room(ginfer *g, int n, int K, dsv3_err *e)
{
    if (n <= g->top_rows && K <= g->top_k)
        return 0;
    int rows = n > g->top_rows ? n : g->top_rows, k = K > g->top_k ? K : g->top_k;
    if (g->topscr)
        cudaFree(g->topscr);  /* idle: no step uses it */
    if (g->h_top)
        cudaFreeHost(g->h_top);
    g->topscr = NULL;
    g->h_top = NULL;
    g->top_rows = g->top_k = 0;
    size_t sb = gk_topk_scratch(rows, g->V, k);
    CUDA_TRY(cudaMalloc(&g->topscr, sb), e);
    CUDA_TRY(cudaMemset(g->topscr, 0, sb), e);
    CUDA_TRY(cudaHostAlloc((void **)&g->h_top, (size_t)rows * k * sizeof *g->h_top,
                           cudaHostAllocMapped), e);
    CUDA_TRY(cudaHostGetDevicePointer((void **)&g->d_top, g->h_top, 0), e);
    g->top_rows = rows;
    g->top_k = k;
    return 0;
}

extern "C" int ginfer_forward_top(ginfer *g, int n, const int *slot, const int *pos,
                                  const int32_t *ids, int K, int32_t *top_id, float *top_logit,
                                  dsv3_err *e)
{
    if (n <= 0)
        return 0;
    if (n > decode_rows(g) || K < 1 || K > ginfer_top_max(g))
        return err_set(e, "ginfer: the %d largest logits of a step of %d rows (1 to %d "
                       "rows, %d logits)", K, n, decode_rows(g), ginfer_top_max(g));
    int B, b = bucket_of(n, &B), k = g->q0;
    gstep *t = &g->st[k];
    if (idle(g, e) || top_room(g, n, K, e) || upload_step(g, n, B, slot, pos, ids, e) ||
        (!g->graph[b] && capture(g, b, B, 0, e)) || queue_step(g, k, n, b, 0, 0, e) ||
        gk_topk(g->s, g->logits, n, g->V, g->ban, K, g->topscr, g->top_rows, g->d_top, e))
        return -1;
    CUDA_TRY(cudaEventRecord(t->ev[2], g->s), e);
    t->tail = TAIL_TOPK;
    if (wait_step(g, k, e))
        return -1;
    for (long i = 0; i < (long)n * K; i++) {
        top_id[i] = g->h_top[i].id;
        top_logit[i] = g->h_top[i].logit;
    }
    return 0;
}

extern "C" int ginfer_set_banned(ginfer *g, const uint8_t *ban, dsv3_err *e)
{
    if (idle(g, e))
        return -1;
    if (!ban)
        CUDA_TRY(cudaMemsetAsync(g->ban, 0, (size_t)g->V, g->s), e);
    else if (gpu_upload(g->c, g->ban, ban, (size_t)g->V, e))
        return -1;
    return gpu_sync(g->c, e);
}

/* speculative decoding with the MTP module: part of this translation unit */
#include "ginfer_mtp.cuh"
/* the prompt's prefill through the tensor cores: part of this translation unit too */
#include "ginfer_prefill.cuh"
