/* gmodel: lib/model's forward and backward on the GPU (see gmodel.h). The order of the
 * operations, and every equation, follow lib/model.c block by block; the comments name
 * the CPU function each part mirrors. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* lib/ headers are plain C without extern "C" guards */
extern "C" {
#include "../lib/ep.h"
#include "../lib/model.h"
#include "../lib/ops.h"
}
#include "attention.h"
#include "cuda_util.cuh"
#include "fp8lin.h"
#include "gemm.h"
#include "gep.h"
#include "gmodel.h"
#include "layers.h"
#include "loss.h"
#include "mla.h"
#include "moe.h"
#include "moe_fp8.h"
#include "optim.h"

#define NONE SIZE_MAX

/* Offsets (floats, device layout) of one block's tensors; NONE when absent. */
typedef struct gm_block {
    int moe;
    int index;                   /* layer index: main layers, then MTP module k at nl + k - 1 */
    size_t ln1, qa, qaln, qb, q, kva, kvaln, kvb, o, ln2;
    size_t w1, w2;               /* dense gate|up [2I,H], down [H,I] */
    size_t router, rbias;
    size_t ew1, ew2;             /* routed experts, regrouped: [E,2mi,H], [E,H,mi] */
    size_t sw1, sw2;             /* shared experts gate|up, down */
    size_t region;               /* start of the routed experts' region (flat = device) */
} gm_block;

/* Activations of one block (device, arena). */
typedef struct gm_acts {
    bf16 *x, *xn, *qa, *qan, *q, *kva, *ckv, *ckvn, *kvb, *k, *v, *ao, *x2, *x2n;
    bf16 *gu, *h;                /* dense MLP or shared experts */
    bf16 *xp, *egu, *eh, *yp;    /* routed experts, rows in expert order */
    float *rstd1, *rstdq, *rstdkv, *rstd2, *lse, *logits, *s, *w;
    int32_t *idx;
    gpu_moe_plan plan;
    int have_plan;
    const int32_t *valid;        /* [N] device, MTP blocks: rows that count in the balance
                                  * loss (a real t_{i+k}); NULL: all */
    float *bal_g;                /* [B,E]: d(balance loss)/d(s'_i) per sequence (forward) */
} gm_acts;

/* One MTP module (lib/model's mtp_acts): module k's block is blk/a[nl + k - 1]. */
typedef struct gm_mtp {
    size_t enorm, hnorm, eh, head_norm;
    int32_t *eid, *tg, *valid;   /* device [N]: embedded id t_{i+k}, target, row in its doc */
    int32_t *h_eid, *h_tg, *h_valid;  /* host copies */
    bf16 *e, *en, *hn, *cat, *hout, *xf, *d_xf;
    float *rstde, *rstdh, *rstdf;
    double sum;                  /* cross-entropy sum over count used rows */
    int count;
    int64_t norm;                /* what the sum is divided by (norm_mtp[k] or count) */
} gm_mtp;

struct gmodel {
    const dsv3_model *m;
    gpu_ctx *c;
    int B, T, N, nl;
    float *master, *grads, *region_tmp;
    bf16 *wbf;
    size_t n_params, region_floats;
    gm_block *blk;               /* num_hidden_layers, then the D MTP modules' blocks */
    size_t *regions;             /* starts of every MoE block's expert region, MTP included */
    int n_regions;
    gm_acts *a;                  /* nl + D, as blk */
    int D;                       /* MTP modules of the config */
    gm_mtp *mt;                  /* [D] */
    bf16 *dcarry, *dcat, *dsplit;/* MTP backward (D > 0) */
    int mtp_ran;                 /* the last forward ran the MTP modules ... */
    float mtp_lambda;            /* ... with this weight */
    double ce_sum;               /* main cross-entropy sum of the last forward */
    int64_t ce_norm;             /* what it is divided by (norm_main or count) */
    float *h_mtp_loss;           /* host [N], an MTP module's row losses */
    /* sequence-wise balance loss of the last forward: per-block, per-sequence sums */
    int bal_on;
    float bal_alpha;
    int64_t seq_norm;
    double balance;              /* alpha-weighted total (model_losses.balance) */
    float *bal_S, *bal_loss, *h_bal;  /* [N] row sums of s; [(nl+D)*B] device and host */
    uint8_t *bal_ran;            /* [nl+D]: the block ran and wrote its bal_loss row */
    /* documents (gmodel_set_segments) */
    int32_t *seg, *h_seg;        /* [N] device, host */
    int has_seg;
    int pos_custom;              /* g->pos holds positions other than 0..T-1 */
    bf16 *hfinal, *xf, *d_xf, *dx, *dn;
    float *rstdf, *losses, *cos_t, *sin_t;
    int32_t *ids, *tgt, *pos;
    int32_t *h_tgt;              /* host copy of the last targets */
    float *h_loss;               /* host copy of the last forward's per-row losses */
    size_t acts_mark;
    int recompute;               /* GMODEL_RECOMPUTE: see "recomputation" below */
    int ep_arena;                /* GMODEL_EP_ARENA */
    int nondet;                  /* GMODEL_NONDET */
    int count, grad_ready, routed;
    int chunk_rows;
    /* device AdamW (gmodel_optim_init): bf16 moments in the device layout, the list of
     * trainable spans, the last gradient norm */
    bf16 *mom_m, *mom_v;
    gpu_tensor_list *tl;
    float *d_norm;
    gpu_lin lin;                 /* dense linear layers: bf16, or FP8 (gmodel_set_fp8) */
    gpu_moe_fp8 mfp8;            /* routed experts' grouped GEMMs in FP8 when .on */
    /* data parallelism on device buffers (gmodel_dp_init): arrays padded to n_alloc, the
     * moments and summed gradient of this rank's shard only, the communication stream */
    size_t n_alloc;
    int dp_on;
    float *gshard;
    cudaStream_t cstream;
    cudaEvent_t ev_fence, ev_join;
    gmodel_bwd_hook hook;
    void *hook_ctx;
    /* Sums over a step kept on the device, read once by gmodel_take_stats: the per-row
     * losses of the forwards asked for no loss, and the expert loads [nl][E] of the
     * forwards with grad (count_loads). Token ids and targets go up through two pinned
     * staging buffers, used in turn; staged[i] marks the copy out of buffer i. */
    double *d_loss_acc;
    long long *d_load_acc;
    int count_loads, rows_on_host;
    int32_t *h_stage[2];
    cudaEvent_t staged[2];
    int stage_next;
    /* gmodel_set_range's uploads go through one pinned buffer, filled front to back and
     * reused from the start once range_ev (recorded after the last copy out of it) has
     * passed: the host never waits for the device's queue (the AdamW before them) */
    float *h_range;
    size_t range_used;
    cudaEvent_t range_ev;
    gep *ep;                     /* expert parallelism (gmodel_ep_attach), else NULL */
};

/* gmodel_set_range's pinned staging buffer, in floats (every correction bias of a model with
 * 256 experts and 64 layers, several steps' worth) */
#define RANGE_FLOATS ((size_t)1 << 16)

/* ---- small kernels ---- */

__global__ void k_scale(float *y, float f, int64_t n)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        y[i] *= f;
}

/* S[n] = sum over the experts of s[n,:] (the router's sigmoid affinities), a warp a row. */
__global__ void k_row_sum(float *S, const float *s, int N, int E)
{
    int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (n >= N)
        return;
    float v = 0;
    for (int i = lane; i < E; i += 32)
        v += s[(int64_t)n * E + i];
    v = warp_sum(v);
    if (lane == 0)
        S[n] = v;
}

/* lib/model's balance_loss for sequence b = blockIdx.x, over its valid rows (Tb of T):
 * f_i = E/(K Tb) * (slots that chose i), P_i = mean of s'_i = s_i / S; out[b] = sum_i f_i
 * P_i (0 when Tb = 0), and G[b,i] = alpha f_i / (Tb * seq_norm), the gradient of alpha *
 * out[b] / seq_norm with respect to each row's s'_i (balance_backward's g). Shared memory:
 * E ints and 32 floats. Integer counts and fixed-order sums: the same on every run. */
__global__ void k_balance_fwd(float *out, float *G, const float *s, const float *S,
                              const int32_t *idx, const int32_t *valid, int T, int E, int K,
                              float alpha, float seq_norm)
{
    extern __shared__ int bal_sh[];
    int *f = bal_sh;
    float *red = (float *)(bal_sh + E);
    __shared__ int Tb;
    const int b = blockIdx.x;
    const int64_t r0 = (int64_t)b * T;
    for (int i = threadIdx.x; i < E; i += blockDim.x)
        f[i] = 0;
    if (threadIdx.x == 0)
        Tb = 0;
    __syncthreads();
    int mine = 0;
    for (int t = threadIdx.x; t < T; t += blockDim.x)
        mine += !valid || valid[r0 + t];
    if (mine)
        atomicAdd(&Tb, mine);
    for (int j = threadIdx.x; j < T * K; j += blockDim.x) {
        int t = j / K;
        if (!valid || valid[r0 + t])
            atomicAdd(&f[idx[(r0 + t) * K + j % K]], 1);
    }
    __syncthreads();
    const int tb = Tb;
    float part = 0;
    for (int i = threadIdx.x; i < E; i += blockDim.x) {
        float P = 0;
        for (int t = 0; t < T && tb; t++)
            if (!valid || valid[r0 + t])
                P += s[(r0 + t) * E + i] / S[r0 + t];
        float fi = tb ? (float)f[i] * E / ((float)K * tb) : 0.0f;
        part += fi * (tb ? P / tb : 0.0f);
        G[(int64_t)b * E + i] = tb ? alpha * fi / ((float)tb * seq_norm) : 0.0f;
    }
    float tot = block_sum(part, red);
    if (threadIdx.x == 0)
        out[b] = tot;
}

/* balance_backward: dlogits[n,j] += (G_j - sum_i G_i s'_i) / S * s_j (1 - s_j) for the
 * valid rows n of sequence n / T, a warp a row. */
__global__ void k_balance_bwd(float *dlog, const float *G, const float *s, const int32_t *valid,
                              int N, int T, int E)
{
    int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (n >= N || (valid && !valid[n]))
        return;
    const float *sn = s + (int64_t)n * E, *Gb = G + (int64_t)(n / T) * E;
    float S = 0, dot = 0;
    for (int i = lane; i < E; i += 32) {
        S += sn[i];
        dot += Gb[i] * sn[i];
    }
    S = warp_sum(S);
    dot = warp_sum(dot) / S;
    for (int j = lane; j < E; j += 32)
        dlog[(int64_t)n * E + j] += (Gb[j] - dot) / S * sn[j] * (1 - sn[j]);
}

static unsigned blocks(int64_t n)
{
    return (unsigned)((n + 255) / 256);
}

#define ST(g) ((cudaStream_t)gpu_ctx_stream((g)->c))

/* dst[rows, w] (row pitch dld) = src[rows, w] (row pitch sld), bf16. */
static int copy_cols(gmodel *g, bf16 *dst, int dld, const bf16 *src, int sld, int rows, int w,
                     dsv3_err *e)
{
    CUDA_TRY(cudaMemcpy2DAsync(dst, (size_t)dld * 2, src, (size_t)sld * 2, (size_t)w * 2,
                               (size_t)rows, cudaMemcpyDeviceToDevice, ST(g)),
             e);
    return 0;
}

static int add(gmodel *g, bf16 *out, const bf16 *a, const bf16 *b, int64_t n, dsv3_err *e)
{
    return gpu_add_bf16(g->c, (gpu_bf16 *)out, (const gpu_bf16 *)a, (const gpu_bf16 *)b, n, e);
}

/* ---- layout ---- */

static size_t off_of(const dsv3_model *m, const float *p)
{
    return p ? (size_t)(p - m->params) : NONE;
}

/* The routed experts of a MoE block this model holds: all, or one group under expert
 * parallelism (lib/model's ep_size; their region then holds that group only). */
static int held_experts(const dsv3_model *m)
{
    int E = m->cfg.n_routed_experts;
    return m->ep_size > 1 ? E / m->ep_size : E;
}

static void block_offsets(const dsv3_model *m, const model_layer *L, int moe, int index,
                          gm_block *b)
{
    const dsv3_config *c = &m->cfg;
    b->moe = moe;
    b->index = index;
    b->ln1 = off_of(m, L->input_layernorm);
    b->qa = off_of(m, L->q_a_proj);
    b->qaln = off_of(m, L->q_a_layernorm);
    b->qb = off_of(m, L->q_b_proj);
    b->q = off_of(m, L->q_proj);
    b->kva = off_of(m, L->kv_a_proj);
    b->kvaln = off_of(m, L->kv_a_layernorm);
    b->kvb = off_of(m, L->kv_b_proj);
    b->o = off_of(m, L->o_proj);
    b->ln2 = off_of(m, L->post_attention_layernorm);
    b->w1 = off_of(m, L->gate_proj);  /* up_proj follows gate_proj in the layout */
    b->w2 = off_of(m, L->down_proj);
    b->router = off_of(m, L->router);
    b->rbias = off_of(m, L->router_bias);
    b->sw1 = off_of(m, L->s_gate);
    b->sw2 = off_of(m, L->s_down);
    b->region = b->ew1 = b->ew2 = NONE;
    if (moe) {
        size_t E = (size_t)held_experts(m), mi = (size_t)c->moe_intermediate_size;
        b->region = off_of(m, L->e_gate[m->ep_size > 1 ? m->ep_group * E : 0]);
        b->ew1 = b->region;
        b->ew2 = b->region + E * 2 * mi * (size_t)c->hidden_size;
    }
}

/* ---- activations ---- */

typedef struct carve {
    gmodel *g;
    int measure;
    size_t bytes;
    int failed;
    dsv3_err *e;
} carve;

static void *take(carve *k, size_t bytes)
{
    size_t b = (bytes + 255) & ~(size_t)255;
    k->bytes += b;
    if (k->measure || k->failed)
        return NULL;
    void *p = gpu_arena_alloc(k->g->c, bytes ? bytes : 1, k->e);
    if (!p)
        k->failed = 1;
    return p;
}

#define TB(n) (bf16 *)take(k, (size_t)(n) * 2)
#define TF(n) (float *)take(k, (size_t)(n) * 4)

/* ---- recomputation (GMODEL_RECOMPUTE) ----
 * DeepSeek-V3's memory saving: instead of keeping each block's normalised activations
 * (xn, qan, ckvn, x2n and x2n's expert-order copy xp) and MLA's up-projections (q after
 * RoPE, kvb and the assembled k, v) until backward, one set of these buffers serves every
 * block: the forward writes them and moves on, and backward makes a block's set again from
 * what stays (x, qa, ckv, kva after RoPE, x2 and the rstds) just before it needs them. The
 * same kernels on the same inputs give the same bits, so the gradients are those of the
 * run that keeps everything; the cost is three RMSNorms, two GEMMs, RoPE, the k/v assembly
 * and the expert gather again per block. */

static void recompute_carve(carve *k, gm_acts *S, int any_moe)
{
    const dsv3_config *c = &k->g->m->cfg;
    int64_t N = k->g->N, H = c->hidden_size, nh = c->num_attention_heads;
    int64_t qk = config_qk_head_dim(c), kv = c->kv_lora_rank, ql = c->q_lora_rank;
    S->xn = TB(N * H);
    if (ql)
        S->qan = TB(N * ql);
    S->q = TB(N * nh * qk);
    S->ckvn = TB(N * kv);
    S->kvb = TB(N * nh * (c->qk_nope_head_dim + c->v_head_dim));
    S->k = TB(N * nh * qk);
    S->v = TB(N * nh * c->v_head_dim);
    S->x2n = TB(N * H);
    if (any_moe)
        S->xp = TB(N * c->num_experts_per_tok * H);
}

static void carve_acts(carve *k)
{
    gmodel *g = k->g;
    const dsv3_config *c = &g->m->cfg;
    int64_t N = g->N, H = c->hidden_size, nh = c->num_attention_heads;
    int64_t qk = config_qk_head_dim(c), kv = c->kv_lora_rank, rope = c->qk_rope_head_dim;
    int64_t dv = c->v_head_dim, K = c->num_experts_per_tok, E = c->n_routed_experts;
    int64_t mi = c->moe_intermediate_size, ql = c->q_lora_rank;
    /* recomputation: the tensors backward makes again live once, shared by all blocks */
    gm_acts S;
    memset(&S, 0, sizeof S);
    int any_moe = 0;
    for (int l = 0; l < g->nl + g->D; l++)
        any_moe |= g->blk[l].moe;
    if (g->recompute)
        recompute_carve(k, &S, any_moe);
    for (int l = 0; l < g->nl + g->D; l++) {
        gm_acts *A = &g->a[l];
        int moe = g->blk[l].moe;
        int rc = g->recompute;
        A->x = TB(N * H);
        A->xn = rc ? S.xn : TB(N * H);
        A->rstd1 = TF(N);
        if (ql) {
            A->qa = TB(N * ql);
            A->qan = rc ? S.qan : TB(N * ql);
            A->rstdq = TF(N);
        }
        A->q = rc ? S.q : TB(N * nh * qk);
        A->kva = TB(N * (kv + rope));
        A->ckv = TB(N * kv);
        A->ckvn = rc ? S.ckvn : TB(N * kv);
        A->rstdkv = TF(N);
        A->kvb = rc ? S.kvb : TB(N * nh * (c->qk_nope_head_dim + dv));
        A->k = rc ? S.k : TB(N * nh * qk);
        A->v = rc ? S.v : TB(N * nh * dv);
        A->ao = TB(N * nh * dv);
        A->lse = TF(N * nh);
        A->x2 = TB(N * H);
        A->x2n = rc ? S.x2n : TB(N * H);
        A->rstd2 = TF(N);
        int64_t inter = moe ? mi * c->n_shared_experts : c->intermediate_size;
        if (inter) {
            A->gu = TB(N * 2 * inter);
            A->h = TB(N * inter);
        }
        if (moe) {
            A->logits = TF(N * E);
            A->s = TF(N * E);
            A->w = TF(N * K);
            A->idx = (int32_t *)take(k, (size_t)(N * K) * 4);
            A->xp = rc ? S.xp : TB(N * K * H);
            A->egu = TB(N * K * 2 * mi);
            A->eh = TB(N * K * mi);
            A->yp = TB(N * K * H);
            A->bal_g = TF(g->B * E);
        }
    }
    for (int d = 0; d < g->D; d++) {
        gm_mtp *M = &g->mt[d];
        M->eid = (int32_t *)take(k, (size_t)N * 4);
        M->tg = (int32_t *)take(k, (size_t)N * 4);
        M->valid = (int32_t *)take(k, (size_t)N * 4);
        g->a[g->nl + d].valid = M->valid;
        M->e = TB(N * H);
        M->en = TB(N * H);
        M->hn = TB(N * H);
        M->cat = TB(N * 2 * H);
        M->hout = TB(N * H);
        M->xf = TB(N * H);
        M->d_xf = TB(N * H);
        M->rstde = TF(N);
        M->rstdh = TF(N);
        M->rstdf = TF(N);
    }
    if (g->D) {
        g->dcarry = TB(N * H);
        g->dcat = TB(N * 2 * H);
        g->dsplit = TB(N * H);
    }
    g->bal_S = TF(N);
    g->bal_loss = TF((int64_t)(g->nl + g->D) * g->B);
    g->seg = (int32_t *)take(k, (size_t)N * 4);
    g->hfinal = TB(N * H);
    g->xf = TB(N * H);
    g->d_xf = TB(N * H);
    g->dx = TB(N * H);
    g->dn = TB(N * H);
    g->rstdf = TF(N);
    g->losses = TF(N);
    g->cos_t = TF(g->T * (rope / 2 > 0 ? rope / 2 : 1));
    g->sin_t = TF(g->T * (rope / 2 > 0 ? rope / 2 : 1));
    g->ids = (int32_t *)take(k, (size_t)N * 4);
    g->tgt = (int32_t *)take(k, (size_t)N * 4);
    g->pos = (int32_t *)take(k, (size_t)N * 4);
}

/* Scratch above the activations: the larger of the head's chunks and one block's backward
 * temporaries (the attention backward's own from kernels/attention: with GMODEL_NONDET and
 * head dims up to 96/64 its fused dQ accumulator too), plus the MoE plans that live from
 * forward to backward. */
static size_t scratch_bytes(const gmodel *g)
{
    const dsv3_config *c = &g->m->cfg;
    size_t N = (size_t)g->N, H = c->hidden_size, nh = c->num_attention_heads;
    size_t qk = config_qk_head_dim(c), kv = c->kv_lora_rank, rope = c->qk_rope_head_dim;
    size_t dv = c->v_head_dim, K = c->num_experts_per_tok, E = c->n_routed_experts;
    size_t mi = c->moe_intermediate_size, ql = c->q_lora_rank, I = c->intermediate_size;
    size_t si = mi * c->n_shared_experts, V = c->vocab_size;
    size_t head = (size_t)g->chunk_rows * V * 6 + N * 16;
    size_t per_tok = 2 * (nh * dv + 2 * nh * qk + nh * dv + nh * (qk + dv) + 2 * (kv + rope) +
                          2 * kv + 2 * ql + H) +
                     2 * (2 * K * H + 3 * K * mi + 3 * (si > I ? si : I)) + 4 * K + 6 * E + 64;
    size_t w = E * 2 * mi * H * 2 + E * H * mi * 2;
    size_t attn = gpu_attention_bwd_arena_bytes(g->B, g->T, (int)nh, (int)qk, (int)dv, g->nondet);
    size_t bwd = N * per_tok + attn + w + N * 64 + ((size_t)64 << 20);
    size_t plans = (size_t)(g->nl + g->D) * (N * K * 8 + 4096);
    return (head > bwd ? head : bwd) + plans + ((size_t)16 << 20);
}

static size_t gmodel_ep_arena(const gmodel *g);

/* ---- parameters and gradients ---- */

static int cmp_size(const void *a, const void *b)
{
    size_t x = *(const size_t *)a, y = *(const size_t *)b;
    return x < y ? -1 : x > y;
}

/* An expert region of elements of es bytes from flat order in src to grouped order in dst
 * (to_grouped) or back. */
static int regroup(gmodel *g, void *dst, const void *src, int to_grouped, size_t es,
                   dsv3_err *e)
{
    const dsv3_config *c = &g->m->cfg;
    size_t E = (size_t)held_experts(g->m);
    size_t w1 = 2 * (size_t)c->moe_intermediate_size * c->hidden_size * es;
    size_t w2 = w1 / 2, blk = w1 + w2;
    const char *s = (const char *)src;
    char *d = (char *)dst;
    for (size_t x = 0; x < E; x++) {
        const char *s1 = to_grouped ? s + x * blk : s + x * w1;
        const char *s2 = to_grouped ? s + x * blk + w1 : s + E * w1 + x * w2;
        char *d1 = to_grouped ? d + x * w1 : d + x * blk;
        char *d2 = to_grouped ? d + E * w1 + x * w2 : d + x * blk + w1;
        CUDA_TRY(cudaMemcpyAsync(d1, s1, w1, cudaMemcpyDeviceToDevice, ST(g)), e);
        CUDA_TRY(cudaMemcpyAsync(d2, s2, w2, cudaMemcpyDeviceToDevice, ST(g)), e);
    }
    return 0;
}

/* Every expert region of a device buffer (elements of es bytes) from flat to grouped order,
 * in place (through region_tmp). */
static int group_all(gmodel *g, void *buf, size_t es, dsv3_err *e)
{
    for (int r = 0; r < g->n_regions; r++) {
        char *at = (char *)buf + g->regions[r] * es;
        if (regroup(g, g->region_tmp, at, 1, es, e))
            return -1;
        CUDA_TRY(cudaMemcpyAsync(at, g->region_tmp, g->region_floats * es,
                                 cudaMemcpyDeviceToDevice, ST(g)),
                 e);
    }
    return 0;
}

/* A device buffer in the device layout to the host in the flat layout. */
static int download_flat(gmodel *g, void *host, const void *dev, size_t es, dsv3_err *e)
{
    size_t at = 0;
    char *h = (char *)host;
    const char *d = (const char *)dev;
    for (int r = 0; r <= g->n_regions; r++) {
        size_t end = r < g->n_regions ? g->regions[r] : g->n_params;
        if (end > at && gpu_download(g->c, h + at * es, d + at * es, (end - at) * es, e))
            return -1;
        if (r == g->n_regions)
            break;
        if (regroup(g, g->region_tmp, d + end * es, 0, es, e) ||
            gpu_download(g->c, h + end * es, g->region_tmp, g->region_floats * es, e))
            return -1;
        at = end + g->region_floats;
    }
    return 0;
}

/* The bf16 compute weights are written: the FP8 codes kept from them are made afresh. */
static void weights_changed(gmodel *g)
{
    gpu_lin_weights_changed(&g->lin);
    gpu_moe_fp8_weights_changed(&g->mfp8);
}

extern "C" int gmodel_set_params(gmodel *g, const float *params, dsv3_err *e)
{
    weights_changed(g); /* FP8 weight codes made afresh */
    if (gpu_upload(g->c, g->master, params, g->n_params * 4, e) || group_all(g, g->master, 4, e) ||
        gpu_f32_to_bf16(g->c, (gpu_bf16 *)g->wbf, g->master, (int64_t)g->n_params, e))
        return -1;
    return gpu_sync(g->c, e);
}

extern "C" int gmodel_get_grads(gmodel *g, float *grads, dsv3_err *e)
{
    return download_flat(g, grads, g->grads, 4, e);
}

extern "C" int gmodel_set_range(gmodel *g, const float *params, size_t off, size_t n,
                                dsv3_err *e)
{
    for (int r = 0; r < g->n_regions; r++)
        if (off < g->regions[r] + g->region_floats && off + n > g->regions[r])
            return err_set(e, "gmodel_set_range: [%zu, +%zu) overlaps an expert region", off, n);
    weights_changed(g);
    if (n > RANGE_FLOATS)  /* larger than the staging buffer: a plain upload */
        return gpu_upload(g->c, g->master + off, params + off, n * 4, e) ||
                       gpu_f32_to_bf16(g->c, (gpu_bf16 *)g->wbf + off, g->master + off,
                                       (int64_t)n, e)
                   ? -1
                   : 0;
    if (!g->h_range) {
        CUDA_TRY(cudaHostAlloc((void **)&g->h_range, RANGE_FLOATS * 4, cudaHostAllocDefault), e);
        CUDA_TRY(cudaEventCreateWithFlags(&g->range_ev, cudaEventDisableTiming), e);
        g->range_used = RANGE_FLOATS;  /* nothing staged yet: start at the front */
    }
    if (g->range_used + n > RANGE_FLOATS) {  /* every earlier copy out of it is done first */
        CUDA_TRY(cudaEventSynchronize(g->range_ev), e);
        g->range_used = 0;
    }
    float *h = g->h_range + g->range_used;
    memcpy(h, params + off, n * 4);
    g->range_used += n;
    CUDA_TRY(cudaMemcpyAsync(g->master + off, h, n * 4, cudaMemcpyHostToDevice, ST(g)), e);
    CUDA_TRY(cudaEventRecord(g->range_ev, ST(g)), e);
    return gpu_f32_to_bf16(g->c, (gpu_bf16 *)g->wbf + off, g->master + off, (int64_t)n, e);
}

/* ---- device AdamW ---- */

static int is_in_region(const gmodel *g, size_t off)
{
    for (int r = 0; r < g->n_regions; r++)
        if (off >= g->regions[r] && off < g->regions[r] + g->region_floats)
            return 1;
    return 0;
}

extern "C" int gmodel_optim_init(gmodel *g, const uint16_t *m, const uint16_t *v, dsv3_err *e)
{
    const dsv3_model *mo = g->m;
    size_t nb = g->n_params * 2;
    if (!(g->mom_m = (bf16 *)gpu_malloc(nb, e)) || !(g->mom_v = (bf16 *)gpu_malloc(nb, e)) ||
        !(g->d_norm = (float *)gpu_malloc(4, e)) || gpu_upload(g->c, g->mom_m, m, nb, e) ||
        gpu_upload(g->c, g->mom_v, v, nb, e) || group_all(g, g->mom_m, 2, e) ||
        group_all(g, g->mom_v, 2, e))
        return -1;
    /* one span per trainable tensor outside the expert regions, one per region (all its
     * tensors are 2-D expert weights: decaying) */
    int cap = mo->n_t + g->n_regions;
    float **P = (float **)calloc((size_t)cap, sizeof *P), **Gr = (float **)calloc((size_t)cap, sizeof *Gr);
    gpu_bf16 **M = (gpu_bf16 **)calloc((size_t)cap, sizeof *M), **Vv = (gpu_bf16 **)calloc((size_t)cap, sizeof *Vv);
    gpu_bf16 **Wb = (gpu_bf16 **)calloc((size_t)cap, sizeof *Wb);
    int64_t *n = (int64_t *)calloc((size_t)cap, sizeof *n);
    int *dec = (int *)calloc((size_t)cap, sizeof *dec);
    int k = 0, rc = -1;
    if (P && Gr && M && Vv && Wb && n && dec) {
        for (int i = 0; i < mo->n_t; i++) {
            const model_tensor *t = &mo->t[i];
            if (!t->trainable || is_in_region(g, t->off))
                continue;
            P[k] = g->master + t->off, Gr[k] = g->grads + t->off;
            M[k] = (gpu_bf16 *)g->mom_m + t->off, Vv[k] = (gpu_bf16 *)g->mom_v + t->off;
            Wb[k] = (gpu_bf16 *)g->wbf + t->off, n[k] = t->numel, dec[k] = t->ndim == 2;
            k++;
        }
        for (int r = 0; r < g->n_regions; r++) {
            size_t o = g->regions[r];
            P[k] = g->master + o, Gr[k] = g->grads + o;
            M[k] = (gpu_bf16 *)g->mom_m + o, Vv[k] = (gpu_bf16 *)g->mom_v + o;
            Wb[k] = (gpu_bf16 *)g->wbf + o, n[k] = (int64_t)g->region_floats, dec[k] = 1;
            k++;
        }
        rc = gpu_tensor_list_create(g->c, &g->tl, k, P, Gr, M, Vv, Wb, n, dec, e);
    } else {
        err_set(e, "gmodel: out of memory");
    }
    free(P), free(Gr), free(M), free(Vv), free(Wb), free(n), free(dec);
    return rc;
}

extern "C" int gmodel_grad_norm(gmodel *g, float *norm, dsv3_err *e)
{
    if (!g->tl)
        return err_set(e, "gmodel: no device optimizer (gmodel_optim_init)");
    return gpu_grad_norm(g->c, g->tl, g->d_norm, e) || gpu_download(g->c, norm, g->d_norm, 4, e)
               ? -1
               : 0;
}

extern "C" int gmodel_adamw(gmodel *g, float lr, float beta1, float beta2, float eps,
                            float weight_decay, float clip, int step, dsv3_err *e)
{
    if (!g->tl)
        return err_set(e, "gmodel: no device optimizer (gmodel_optim_init)");
    gpu_adamw_hp hp = {lr, beta1, beta2, eps, weight_decay, clip, step};
    weights_changed(g);
    return gpu_adamw_step(g->c, g->tl, &hp, clip > 0 ? g->d_norm : NULL, e);
}

extern "C" int gmodel_sync_host(gmodel *g, float *params, uint16_t *m, uint16_t *v, dsv3_err *e)
{
    if (download_flat(g, params, g->master, 4, e))
        return -1;
    if (g->tl && !g->dp_on &&
        (download_flat(g, m, g->mom_m, 2, e) || download_flat(g, v, g->mom_v, 2, e)))
        return -1;
    return 0;
}

extern "C" int gmodel_zero_grad(gmodel *g, dsv3_err *e)
{
    return gpu_memset(g->c, g->grads, 0, g->n_alloc * 4, e);
}

extern "C" int gmodel_scale_grads(gmodel *g, float f, dsv3_err *e)
{
    k_scale<<<blocks((int64_t)g->n_params), 256, 0, ST(g)>>>(g->grads, f, (int64_t)g->n_params);
    LAUNCH_CHECK("k_scale", e);
    return 0;
}

/* ---- data parallelism on device buffers ---- */

extern "C" void gmodel_set_bwd_hook(gmodel *g, gmodel_bwd_hook fn, void *ctx)
{
    g->hook = fn;
    g->hook_ctx = ctx;
}

/* The lowest offset of block b's tensors: where its part of the flat array starts. */
static size_t block_lo(const gm_block *b)
{
    size_t v[] = {b->ln1, b->qa, b->qaln, b->qb, b->q, b->kva, b->kvaln, b->kvb, b->o,
                  b->ln2, b->w1, b->w2, b->router, b->rbias, b->sw1, b->sw2, b->region};
    size_t lo = NONE;
    for (size_t i = 0; i < sizeof v / sizeof *v; i++)
        lo = v[i] < lo ? v[i] : lo;
    return lo;
}

extern "C" int gmodel_ready_points(const gmodel *g, size_t *pts)
{
    /* the MTP modules follow the head in the layout and keep zero gradients here */
    pts[0] = off_of(g->m, g->m->w.final_norm);
    for (int l = g->nl - 1; l >= 0; l--)
        pts[g->nl - l] = block_lo(&g->blk[l]);
    pts[g->nl + 1] = 0;
    return g->nl + 2;
}

/* A device buffer of n floats grown to n_alloc, the tail zero. */
static int grow(gmodel *g, float **p, size_t n, size_t n_alloc, dsv3_err *e)
{
    float *q = (float *)gpu_malloc(n_alloc * 4, e);
    if (!q)
        return -1;
    CUDA_TRY(cudaMemcpyAsync(q, *p, n * 4, cudaMemcpyDeviceToDevice, ST(g)), e);
    CUDA_TRY(cudaMemsetAsync(q + n, 0, (n_alloc - n) * 4, ST(g)), e);
    CUDA_TRY(cudaStreamSynchronize(ST(g)), e);
    gpu_free(*p);
    *p = q;
    return 0;
}

typedef struct unit { size_t off, n; int decay; } unit;

static int cmp_unit(const void *a, const void *b)
{
    size_t x = ((const unit *)a)->off, y = ((const unit *)b)->off;
    return x < y ? -1 : x > y;
}

/* The optimizer's list over the shard: every trainable tensor (or expert region) cut by
 * the spans, master and compute copy at the device offset, gradient and moments at the
 * shard offset. */
static int shard_list(gmodel *g, int ns, const size_t *dev, const size_t *sh, const size_t *len,
                      dsv3_err *e)
{
    const dsv3_model *mo = g->m;
    int nu = 0, cap = mo->n_t + g->n_regions;
    unit *u = (unit *)calloc((size_t)cap, sizeof *u);
    if (!u)
        return err_set(e, "gmodel: out of memory");
    for (int i = 0; i < mo->n_t; i++)
        if (mo->t[i].trainable && !is_in_region(g, mo->t[i].off))
            u[nu++] = (unit){mo->t[i].off, (size_t)mo->t[i].numel, mo->t[i].ndim == 2};
    for (int r = 0; r < g->n_regions; r++)
        u[nu++] = (unit){g->regions[r], g->region_floats, 1};
    qsort(u, (size_t)nu, sizeof *u, cmp_unit);
    int k = 0, kcap = nu + 2 * ns + 8, rc = -1;
    float **P = (float **)calloc((size_t)kcap, sizeof *P), **Gr = (float **)calloc((size_t)kcap, sizeof *Gr);
    gpu_bf16 **M = (gpu_bf16 **)calloc((size_t)kcap, sizeof *M), **Vv = (gpu_bf16 **)calloc((size_t)kcap, sizeof *Vv);
    gpu_bf16 **Wb = (gpu_bf16 **)calloc((size_t)kcap, sizeof *Wb);
    int64_t *n = (int64_t *)calloc((size_t)kcap, sizeof *n);
    int *dec = (int *)calloc((size_t)kcap, sizeof *dec);
    if (P && Gr && M && Vv && Wb && n && dec) {
        for (int s = 0; s < ns; s++)
            for (int i = 0; i < nu; i++) {
                size_t lo = u[i].off > dev[s] ? u[i].off : dev[s];
                size_t hi = u[i].off + u[i].n < dev[s] + len[s] ? u[i].off + u[i].n
                                                                : dev[s] + len[s];
                if (lo >= hi)
                    continue;
                size_t so = sh[s] + (lo - dev[s]);
                P[k] = g->master + lo, Gr[k] = g->gshard + so;
                M[k] = (gpu_bf16 *)g->mom_m + so, Vv[k] = (gpu_bf16 *)g->mom_v + so;
                Wb[k] = (gpu_bf16 *)g->wbf + lo, n[k] = (int64_t)(hi - lo), dec[k] = u[i].decay;
                k++;
            }
        rc = gpu_tensor_list_create(g->c, &g->tl, k, P, Gr, M, Vv, Wb, n, dec, e);
    } else {
        err_set(e, "gmodel: out of memory");
    }
    free(u), free(P), free(Gr), free(M), free(Vv), free(Wb), free(n), free(dec);
    return rc;
}

/* Moments of the whole array (flat layout, host) into the shard: grouped on the device
 * through tmp, then each span copied out. */
static int shard_moments(gmodel *g, bf16 *dst, const uint16_t *src, bf16 *tmp, int ns,
                         const size_t *dev, const size_t *sh, const size_t *len, dsv3_err *e)
{
    if (gpu_upload(g->c, tmp, src, g->n_params * 2, e) || group_all(g, tmp, 2, e))
        return -1;
    for (int s = 0; s < ns; s++)
        CUDA_TRY(cudaMemcpyAsync(dst + sh[s], tmp + dev[s], len[s] * 2,
                                 cudaMemcpyDeviceToDevice, ST(g)),
                 e);
    return gpu_sync(g->c, e);
}

extern "C" int gmodel_dp_init(gmodel *g, size_t n_pad, size_t shard, int ns, const size_t *dev,
                              const size_t *sh, const size_t *len, const uint16_t *m,
                              const uint16_t *v, dsv3_err *e)
{
    if (g->tl || g->dp_on)
        return err_set(e, "gmodel_dp_init: the device optimizer is already set up");
    if (grow(g, &g->master, g->n_params, n_pad, e) || grow(g, &g->grads, g->n_params, n_pad, e))
        return -1;
    g->n_alloc = n_pad;
    size_t sb = (shard ? shard : 1) * 2;
    if (!(g->gshard = (float *)gpu_malloc(sb * 2, e)) ||
        !(g->mom_m = (bf16 *)gpu_malloc(sb, e)) || !(g->mom_v = (bf16 *)gpu_malloc(sb, e)) ||
        !(g->d_norm = (float *)gpu_malloc(4, e)) ||
        gpu_memset(g->c, g->gshard, 0, sb * 2, e) || gpu_memset(g->c, g->mom_m, 0, sb, e) ||
        gpu_memset(g->c, g->mom_v, 0, sb, e))
        return -1;
    if (m && v) {
        bf16 *tmp = (bf16 *)gpu_malloc(g->n_params * 2, e);
        int rc = !tmp || shard_moments(g, g->mom_m, m, tmp, ns, dev, sh, len, e) ||
                 shard_moments(g, g->mom_v, v, tmp, ns, dev, sh, len, e);
        gpu_free(tmp);
        if (rc)
            return -1;
    }
    CUDA_TRY(cudaStreamCreateWithFlags(&g->cstream, cudaStreamNonBlocking), e);
    CUDA_TRY(cudaEventCreateWithFlags(&g->ev_fence, cudaEventDisableTiming), e);
    CUDA_TRY(cudaEventCreateWithFlags(&g->ev_join, cudaEventDisableTiming), e);
    g->dp_on = 1;
    return shard_list(g, ns, dev, sh, len, e);
}

extern "C" void *gmodel_dp_stream(gmodel *g) { return g->cstream; }
extern "C" void *gmodel_stream(gmodel *g) { return gpu_ctx_stream(g->c); }
extern "C" float *gmodel_dev_grads(gmodel *g) { return g->grads; }
extern "C" float *gmodel_dev_master(gmodel *g) { return g->master; }
extern "C" float *gmodel_dp_gshard(gmodel *g) { return g->gshard; }
extern "C" void *gmodel_dp_moment(gmodel *g, int which) { return which ? g->mom_v : g->mom_m; }

extern "C" int gmodel_scale_range(gmodel *g, size_t lo, size_t hi, float f, dsv3_err *e)
{
    if (hi <= lo || f == 1.0f)
        return 0;
    int64_t n = (int64_t)(hi - lo);
    k_scale<<<blocks(n), 256, 0, ST(g)>>>(g->grads + lo, f, n);
    LAUNCH_CHECK("k_scale", e);
    return 0;
}

extern "C" int gmodel_dp_fence(gmodel *g, dsv3_err *e)
{
    CUDA_TRY(cudaEventRecord(g->ev_fence, ST(g)), e);
    CUDA_TRY(cudaStreamWaitEvent(g->cstream, g->ev_fence, 0), e);
    return 0;
}

extern "C" int gmodel_dp_join(gmodel *g, dsv3_err *e)
{
    CUDA_TRY(cudaEventRecord(g->ev_join, g->cstream), e);
    CUDA_TRY(cudaStreamWaitEvent(ST(g), g->ev_join, 0), e);
    return 0;
}

extern "C" int gmodel_set_grad_norm(gmodel *g, float norm, dsv3_err *e)
{
    return gpu_upload(g->c, g->d_norm, &norm, 4, e);
}

extern "C" int gmodel_refresh_bf16(gmodel *g, dsv3_err *e)
{
    weights_changed(g);
    return gpu_f32_to_bf16(g->c, (gpu_bf16 *)g->wbf, g->master, (int64_t)g->n_params, e);
}

extern "C" int gmodel_download_flat(gmodel *g, void *host, const void *dev, size_t es,
                                    dsv3_err *e)
{
    return download_flat(g, host, dev, es, e);
}

extern "C" void *gmodel_dev_alloc(size_t bytes, dsv3_err *e)
{
    return gpu_malloc(bytes, e);
}

/* ---- per-step sums on the device, staged uploads ---- */

/* acc += sum of x[0..n) in double, one block, fixed order: the same on every run. */
__global__ void k_sum_into(double *acc, const float *x, int n)
{
    __shared__ double red[1024];
    double s = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        s += x[i];
    red[threadIdx.x] = s;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o)
            red[threadIdx.x] += red[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0)
        *acc += red[0];
}

/* load[x] += rows of expert x in a dispatch plan (offsets[E+1]). */
__global__ void k_add_loads(long long *load, const int *off, int E)
{
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    if (x < E)
        load[x] += off[x + 1] - off[x];
}

static int stats_zero(gmodel *g, dsv3_err *e)
{
    int E = g->m->cfg.n_routed_experts;
    return gpu_memset(g->c, g->d_loss_acc, 0, sizeof(double), e) ||
           gpu_memset(g->c, g->d_load_acc, 0, (size_t)g->nl * (E ? E : 1) * 8, e);
}

static int stage_init(gmodel *g, dsv3_err *e)
{
    for (int i = 0; i < 2; i++) {
        CUDA_TRY(cudaHostAlloc((void **)&g->h_stage[i], (size_t)g->N * 4, cudaHostAllocDefault),
                 e);
        CUDA_TRY(cudaEventCreateWithFlags(&g->staged[i], cudaEventDisableTiming), e);
    }
    return stats_zero(g, e);
}

/* dst[0..N) = src through the next pinned buffer, queued on the stream: the host waits
 * only for the copy that used that buffer two uploads ago (long done when the host runs
 * ahead of the device by less than that), never for the device's queue. */
static int upload_ids(gmodel *g, int32_t *dst, const int32_t *src, dsv3_err *e)
{
    int i = g->stage_next;
    g->stage_next ^= 1;
    CUDA_TRY(cudaEventSynchronize(g->staged[i]), e);
    memcpy(g->h_stage[i], src, (size_t)g->N * 4);
    CUDA_TRY(cudaMemcpyAsync(dst, g->h_stage[i], (size_t)g->N * 4, cudaMemcpyHostToDevice, ST(g)),
             e);
    CUDA_TRY(cudaEventRecord(g->staged[i], ST(g)), e);
    return 0;
}

extern "C" int gmodel_take_stats(gmodel *g, double *loss_sum, int64_t *loads, dsv3_err *e)
{
    int E = g->m->cfg.n_routed_experts;
    size_t nl = (size_t)g->nl * (E ? E : 1);
    if (gpu_download(g->c, loss_sum, g->d_loss_acc, sizeof(double), e))
        return -1;
    if (loads && E) {
        long long *h = (long long *)malloc(nl * 8);
        if (!h)
            return err_set(e, "gmodel: out of memory");
        int rc = gpu_download(g->c, h, g->d_load_acc, nl * 8, e);
        for (size_t i = 0; !rc && i < nl; i++)
            loads[i] = h[i];
        free(h);
        if (rc)
            return -1;
    }
    return stats_zero(g, e);
}

/* ---- create ---- */

extern "C" void gmodel_destroy(gmodel *g)
{
    if (!g)
        return;
    for (int l = 0; g->a && l < g->nl + g->D; l++)
        if (g->a[l].have_plan)
            gpu_moe_plan_free(&g->a[l].plan);
    gep_destroy(g->ep);
    gpu_lin_free(&g->lin);
    gpu_moe_fp8_free(&g->mfp8);
    for (int k = 0; g->mt && k < g->D; k++) {
        free(g->mt[k].h_eid);
        free(g->mt[k].h_tg);
        free(g->mt[k].h_valid);
    }
    free(g->mt);
    free(g->h_mtp_loss);
    free(g->h_bal);
    free(g->bal_ran);
    free(g->h_seg);
    gpu_free(g->master);
    gpu_free(g->grads);
    gpu_free(g->wbf);
    gpu_free(g->region_tmp);
    gpu_free(g->mom_m);
    gpu_free(g->mom_v);
    gpu_free(g->d_norm);
    gpu_free(g->d_loss_acc);
    gpu_free(g->d_load_acc);
    for (int i = 0; i < 2; i++) {
        if (g->staged[i])
            cudaEventDestroy(g->staged[i]);
        if (g->h_stage[i])
            cudaFreeHost(g->h_stage[i]);
    }
    if (g->h_range) {
        cudaEventSynchronize(g->range_ev);
        cudaEventDestroy(g->range_ev);
        cudaFreeHost(g->h_range);
    }
    gpu_tensor_list_destroy(g->tl);
    gpu_free(g->gshard);
    if (g->cstream) {
        cudaStreamDestroy(g->cstream);
        cudaEventDestroy(g->ev_fence);
        cudaEventDestroy(g->ev_join);
    }
    if (g->c)
        gpu_ctx_destroy(g->c);
    free(g->blk);
    free(g->regions);
    free(g->a);
    free(g->h_tgt);
    free(g->h_loss);
    free(g);
}

extern "C" gpu_ctx *gmodel_ctx(gmodel *g)
{
    return g->c;
}

extern "C" size_t gmodel_arena_peak(const gmodel *g)
{
    return gpu_arena_peak(g->c);
}

extern "C" int gmodel_set_fp8(gmodel *g, int on, dsv3_err *e)
{
    if (!on) {
        g->lin.fp8 = 0;
        g->mfp8.on = 0;
        return 0;
    }
    int min_dim = 0;
    if (on == GMODEL_FP8_PAYS) {
        const char *md = getenv("DSV3_FP8_MIN_DIM");
        min_dim = md && *md ? atoi(md) : GMODEL_FP8_MIN_DIM;
        min_dim = min_dim < 0 ? 0 : min_dim;
    }
    g->lin.min_dim = min_dim, g->mfp8.min_dim = min_dim;
    /* expert codes kept (gmodel calls weights_changed wherever wbf is written, and
     * gpu_moe_fp8_new_pass with each forward); DSV3_MOE_FP8_KEEP=0 quantises every operand
     * in every call instead (the earlier path, for comparison) */
    const char *kw = getenv("DSV3_MOE_FP8_KEEP");
    g->mfp8.keep = !(kw && kw[0] == '0');
    weights_changed(g);
    const dsv3_config *c = &g->m->cfg;
    int64_t nh = c->num_attention_heads, si = (int64_t)c->moe_intermediate_size * c->n_shared_experts;
    int64_t dims[] = {c->hidden_size, c->q_lora_rank, nh * config_qk_head_dim(c),
                      (int64_t)c->kv_lora_rank + c->qk_rope_head_dim,
                      nh * (c->qk_nope_head_dim + c->v_head_dim), nh * c->v_head_dim,
                      2 * (int64_t)c->intermediate_size, 2 * si};
    int64_t D = 0;
    for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++)
        D = dims[i] > D ? dims[i] : D;
    int64_t mi = c->moe_intermediate_size, md = 2 * mi > c->hidden_size ? 2 * mi : c->hidden_size;
    /* DSV3_MOE_FP8=0 keeps the routed experts in bf16 under FP8, for comparison */
    const char *mv = getenv("DSV3_MOE_FP8");
    int moe8 = c->n_routed_experts > 0 && !(mv && mv[0] == '0');
    g->mfp8.on = 0;
    return gpu_lin_fp8_on(&g->lin, g->N, D, e) ||
           (moe8 &&
            gpu_moe_fp8_init(&g->mfp8, (int64_t)g->N * c->num_experts_per_tok,
                             c->n_routed_experts, md, e));
}

extern "C" int gmodel_set_fp8_min_dim(gmodel *g, int min_dim)
{
    if (!g->lin.fp8)
        return -1;
    g->lin.min_dim = g->mfp8.min_dim = min_dim < 0 ? 0 : min_dim;
    weights_changed(g);
    return 0;
}

extern "C" int gmodel_fp8_min_dim(const gmodel *g)
{
    return g->lin.fp8 ? g->lin.min_dim : -1;
}

/* The routed experts' grouped linear products: bf16, or FP8 under gmodel_set_fp8. */
static int moe_lin_fwd(gmodel *g, const gpu_moe_plan *p, gpu_bf16 *out, const gpu_bf16 *in,
                       const gpu_bf16 *W, int I, int O, dsv3_err *e)
{
    return g->mfp8.on ? gpu_moe_fp8_fwd(g->c, &g->mfp8, p, out, in, W, I, O, e)
                      : gpu_moe_linear_fwd(g->c, p, out, in, W, I, O, e);
}

static int moe_lin_dgrad(gmodel *g, const gpu_moe_plan *p, gpu_bf16 *d_in,
                         const gpu_bf16 *d_out, const gpu_bf16 *W, int I, int O, dsv3_err *e)
{
    return g->mfp8.on ? gpu_moe_fp8_dgrad(g->c, &g->mfp8, p, d_in, d_out, W, I, O, e)
                      : gpu_moe_linear_dgrad(g->c, p, d_in, d_out, W, I, O, e);
}

static int moe_lin_wgrad(gmodel *g, const gpu_moe_plan *p, float *d_W, const gpu_bf16 *d_out,
                         const gpu_bf16 *in, int I, int O, dsv3_err *e)
{
    return g->mfp8.on ? gpu_moe_fp8_wgrad(g->c, &g->mfp8, p, d_W, d_out, in, I, O, e)
                      : gpu_moe_linear_wgrad(g->c, p, d_W, d_out, in, I, O, e);
}

static int check_shapes(const dsv3_config *c, dsv3_err *e)
{
    int qk = config_qk_head_dim(c), dv = c->v_head_dim;
    if (qk % 8 || dv % 8 || qk > 192 || dv > 128)
        return err_set(e, "gmodel: head dims %d/%d unsupported by the attention kernel "
                       "(multiples of 8, at most 192/128)", qk, dv);
    if (c->n_routed_experts > 1024 || c->num_experts_per_tok > 32)
        return err_set(e, "gmodel: at most 1024 experts and 32 per token on the GPU");
    if (c->hidden_size % 8 || c->moe_intermediate_size % 8 || c->intermediate_size % 8)
        return err_set(e, "gmodel: hidden and intermediate sizes must be multiples of 8");
    return 0;
}

extern "C" int gmodel_create(gmodel **out, const dsv3_model *m, int B, int T, int dev,
                             dsv3_err *e)
{
    return gmodel_create_opt(out, m, B, T, dev, 0, e);
}

extern "C" int gmodel_create_opt(gmodel **out, const dsv3_model *m, int B, int T, int dev,
                                 unsigned flags, dsv3_err *e)
{
    const dsv3_config *c = &m->cfg;
    *out = NULL;
    if (check_shapes(c, e))
        return -1;
    gmodel *g = (gmodel *)calloc(1, sizeof *g);
    if (!g)
        return err_set(e, "gmodel: out of memory");
    g->m = m;
    g->B = B;
    g->T = T;
    g->N = B * T;
    g->recompute = (flags & GMODEL_RECOMPUTE) != 0;
    g->ep_arena = (flags & GMODEL_EP_ARENA) != 0;
    g->nondet = (flags & GMODEL_NONDET) != 0;
    g->nl = c->num_hidden_layers;
    g->n_params = g->n_alloc = m->n_params;
    int V = c->vocab_size;
    g->chunk_rows = gpu_lm_head_chunk_rows(g->N, V);
    int D = c->num_nextn_predict_layers;
    g->D = D;
    g->blk = (gm_block *)calloc((size_t)(g->nl + D), sizeof *g->blk);
    g->a = (gm_acts *)calloc((size_t)(g->nl + D), sizeof *g->a);
    g->mt = (gm_mtp *)calloc((size_t)(D ? D : 1), sizeof *g->mt);
    g->regions = (size_t *)calloc((size_t)(g->nl + D + 1), sizeof *g->regions);
    g->h_tgt = (int32_t *)malloc((size_t)g->N * 4);
    g->h_loss = (float *)malloc((size_t)g->N * 4);
    g->h_mtp_loss = (float *)malloc((size_t)g->N * 4);
    g->h_seg = (int32_t *)malloc((size_t)g->N * 4);
    g->h_bal = (float *)malloc((size_t)(g->nl + D) * B * 4);
    g->bal_ran = (uint8_t *)calloc((size_t)(g->nl + D), 1);
    int ok = g->blk && g->a && g->mt && g->regions && g->h_tgt && g->h_loss && g->h_mtp_loss &&
             g->h_seg && g->h_bal && g->bal_ran;
    for (int k = 0; ok && k < D; k++) {
        gm_mtp *M = &g->mt[k];
        M->h_eid = (int32_t *)malloc((size_t)g->N * 4);
        M->h_tg = (int32_t *)malloc((size_t)g->N * 4);
        M->h_valid = (int32_t *)malloc((size_t)g->N * 4);
        ok = M->h_eid && M->h_tg && M->h_valid;
    }
    if (!ok) {
        gmodel_destroy(g);
        return err_set(e, "gmodel: out of memory");
    }
    for (int l = 0; l < g->nl; l++) {
        block_offsets(m, &m->w.layers[l], config_layer_is_moe(c, l), l, &g->blk[l]);
        if (g->blk[l].moe)
            g->regions[g->n_regions++] = g->blk[l].region;
    }
    for (int k = 0; k < D; k++) {
        const model_mtp *W = &m->w.mtp[k];
        gm_block *b = &g->blk[g->nl + k];
        block_offsets(m, &W->block, config_layer_is_moe(c, g->nl + k), g->nl + k, b);
        if (b->moe)
            g->regions[g->n_regions++] = b->region;
        g->mt[k].enorm = off_of(m, W->enorm);
        g->mt[k].hnorm = off_of(m, W->hnorm);
        g->mt[k].eh = off_of(m, W->eh_proj);
        g->mt[k].head_norm = off_of(m, W->head_norm);
    }
    qsort(g->regions, (size_t)g->n_regions, sizeof *g->regions, cmp_size);
    g->region_floats = (size_t)held_experts(m) * 3 * c->moe_intermediate_size *
                       (size_t)c->hidden_size;
    carve k = {g, 1, 0, 0, e};
    carve_acts(&k);
    size_t arena = k.bytes + scratch_bytes(g) + gmodel_ep_arena(g);
    if (gpu_ctx_create(&g->c, dev, arena, e) ||
        !(g->master = (float *)gpu_malloc(g->n_params * 4, e)) ||
        !(g->grads = (float *)gpu_malloc(g->n_params * 4, e)) ||
        !(g->wbf = (bf16 *)gpu_malloc(g->n_params * 2, e)) ||
        !(g->region_tmp = (float *)gpu_malloc((g->region_floats ? g->region_floats : 1) * 4, e)) ||
        !(g->d_loss_acc = (double *)gpu_malloc(sizeof(double), e)) ||
        !(g->d_load_acc = (long long *)gpu_malloc(
              (size_t)g->nl * (c->n_routed_experts ? c->n_routed_experts : 1) * 8, e)) ||
        stage_init(g, e)) {
        gmodel_destroy(g);
        return err_prefix(e, "gmodel");
    }
    g->lin.c = g->c;
    gpu_attention_set_nondet(g->c, g->nondet);
    carve k2 = {g, 0, 0, 0, e};
    carve_acts(&k2);
    if (k2.failed) {
        gmodel_destroy(g);
        return -1;
    }
    g->acts_mark = gpu_arena_mark(g->c);
    /* positions and RoPE tables, as model_acts_new */
    int half = c->qk_rope_head_dim / 2;
    int32_t *pos = (int32_t *)malloc((size_t)g->N * 4);
    float *ct = (float *)malloc((size_t)T * (half ? half : 1) * 4);
    float *st = (float *)malloc((size_t)T * (half ? half : 1) * 4);
    double *inv = (double *)malloc((size_t)(half ? half : 1) * sizeof(double));
    int rc = -1;
    if (pos && ct && st && inv) {
        for (int i = 0; i < g->N; i++)
            pos[i] = i % T;
        config_rope_inv_freq(c, inv);
        rope_tables(ct, st, inv, T, half, config_rope_attention_factor(c));
        rc = gpu_upload(g->c, g->pos, pos, (size_t)g->N * 4, e) ||
             gpu_upload(g->c, g->cos_t, ct, (size_t)T * half * 4, e) ||
             gpu_upload(g->c, g->sin_t, st, (size_t)T * half * 4, e) ||
             gmodel_set_params(g, m->params, e) || gmodel_zero_grad(g, e);
    } else {
        err_set(e, "gmodel: out of memory");
    }
    free(pos);
    free(ct);
    free(st);
    free(inv);
    if (rc) {
        gmodel_destroy(g);
        return -1;
    }
    *out = g;
    return 0;
}

/* ---- forward ---- */

#define W(o) ((gpu_bf16 *)g->wbf + (o))
#define G(o) (g->grads + (o))
#define B16(p) ((gpu_bf16 *)(p))

/* mla_forward: A->xn in, out [N,H]. */
static int mla_fwd(gmodel *g, const gm_block *b, gm_acts *A, bf16 *out, dsv3_err *e)
{
    const dsv3_config *c = &g->m->cfg;
    gpu_ctx *x = g->c;
    int N = g->N, H = c->hidden_size, nh = c->num_attention_heads, qk = config_qk_head_dim(c);
    int nope = c->qk_nope_head_dim, rope = c->qk_rope_head_dim, kv = c->kv_lora_rank;
    int dv = c->v_head_dim, half = rope / 2, ql = c->q_lora_rank;
    if (ql) {
        if (gpu_lin_fwd(&g->lin, B16(A->qa), B16(A->xn), W(b->qa), N, H, ql, 0, e) ||
            gpu_rmsnorm_fwd(x, B16(A->qan), A->rstdq, B16(A->qa), W(b->qaln), N, ql, 1e-6f, e) ||
            gpu_lin_fwd(&g->lin, B16(A->q), B16(A->qan), W(b->qb), N, ql, nh * qk, 0, e))
            return -1;
    } else if (gpu_lin_fwd(&g->lin, B16(A->q), B16(A->xn), W(b->q), N, H, nh * qk, 0, e)) {
        return -1;
    }
    if (half && gpu_rope_fwd(x, B16(A->q + nope), N * nh, qk, nh, g->pos, g->cos_t, g->sin_t,
                             half, c->rope_interleave, e))
        return -1;
    if (gpu_lin_fwd(&g->lin, B16(A->kva), B16(A->xn), W(b->kva), N, H, kv + rope, 0, e) ||
        copy_cols(g, A->ckv, kv, A->kva, kv + rope, N, kv, e) ||
        gpu_rmsnorm_fwd(x, B16(A->ckvn), A->rstdkv, B16(A->ckv), W(b->kvaln), N, kv, 1e-6f, e) ||
        gpu_lin_fwd(&g->lin, B16(A->kvb), B16(A->ckvn), W(b->kvb), N, kv, nh * (nope + dv), 0, e))
        return -1;
    if (half && gpu_rope_fwd(x, B16(A->kva + kv), N, kv + rope, 1, g->pos, g->cos_t, g->sin_t,
                             half, c->rope_interleave, e))
        return -1;
    if (gpu_mla_assemble(x, B16(A->k), B16(A->v), B16(A->kvb), B16(A->kva), N, nh, nope, rope,
                         dv, kv, e))
        return -1;
    return gpu_attention_fwd_seg(x, B16(A->ao), A->lse, B16(A->q), B16(A->k), B16(A->v),
                                 g->has_seg ? g->seg : NULL, g->B, g->T, nh, qk, dv,
                                 (float)config_softmax_scale(c), e) ||
           gpu_lin_fwd(&g->lin, B16(out), B16(A->ao), W(b->o), N, nh * dv, H, 0, e);
}

/* moe_forward (routed experts and shared experts) into out [N,H]. */
static int moe_fwd(gmodel *g, const gm_block *b, gm_acts *A, bf16 *out, dsv3_err *e)
{
    const dsv3_config *c = &g->m->cfg;
    gpu_ctx *x = g->c;
    int N = g->N, H = c->hidden_size, E = c->n_routed_experts, K = c->num_experts_per_tok;
    int mi = c->moe_intermediate_size, si = mi * c->n_shared_experts, nk = N * K;
    if (A->have_plan) {
        gpu_moe_plan_free(&A->plan);
        A->have_plan = 0;
    }
    if (gpu_gemm(x, 0, 1, N, E, H, 1.0f, B16(A->x2n), H, W(b->router), H, 0.0f, A->logits, E, 1,
                 e) ||
        gpu_router_fwd(x, A->idx, A->w, A->s, A->logits, g->master + b->rbias, N, E, c->n_group,
                       c->topk_group, K, c->norm_topk_prob, (float)c->routed_scaling_factor, e) ||
        gpu_moe_plan_make(x, &A->plan, A->idx, N, K, E, e))
        return -1;
    A->have_plan = 1;
    if (g->count_loads && nk && A - g->a < g->nl) { /* main layers; MTP loads apart */
        k_add_loads<<<(E + 255) / 256, 256, 0, ST(g)>>>(g->d_load_acc + (A - g->a) * E,
                                                        A->plan.offsets, E);
        LAUNCH_CHECK("k_add_loads", e);
    }
    if (g->bal_on) {  /* moe_forward's balance_loss */
        k_row_sum<<<blocks((int64_t)N * 32), 256, 0, ST(g)>>>(g->bal_S, A->s, N, E);
        LAUNCH_CHECK("k_row_sum", e);
        k_balance_fwd<<<g->B, 256, (size_t)E * 4 + 32 * 4, ST(g)>>>(
            g->bal_loss + (size_t)b->index * g->B, A->bal_g, A->s, g->bal_S, A->idx, A->valid,
            g->T, E, K, g->bal_alpha, (float)g->seq_norm);
        LAUNCH_CHECK("k_balance_fwd", e);
        g->bal_ran[b->index] = 1;
    }
    if (gpu_moe_gather(x, &A->plan, B16(A->xp), B16(A->x2n), H, e) ||
        (g->ep ? gep_forward(g->ep, b->index, &A->plan, B16(A->xp), B16(A->yp), W(b->ew1),
                             W(b->ew2), e)
               : moe_lin_fwd(g, &A->plan, B16(A->egu), B16(A->xp), W(b->ew1), H, 2 * mi, e) ||
                     gpu_swiglu_fwd(x, B16(A->eh), B16(A->egu), B16(A->egu + mi), nk, mi,
                                    2 * mi, e) ||
                     moe_lin_fwd(g, &A->plan, B16(A->yp), B16(A->eh), W(b->ew2), mi, H, e)) ||
        gpu_moe_combine(x, &A->plan, B16(out), 0.0f, B16(A->yp), A->w, H, e))
        return -1;
    if (!si)
        return 0;
    return gpu_lin_fwd(&g->lin, B16(A->gu), B16(A->x2n), W(b->sw1), N, H, 2 * si, 0, e) ||
           gpu_lin_swiglu_fwd(&g->lin, B16(out), B16(A->h), B16(A->gu), B16(A->gu + si), 2 * si,
                              W(b->sw2), N, si, H, 1.0f, e);
}

static int mlp_fwd(gmodel *g, const gm_block *b, gm_acts *A, bf16 *out, dsv3_err *e)
{
    const dsv3_config *c = &g->m->cfg;
    int N = g->N, H = c->hidden_size, I = c->intermediate_size;
    return gpu_lin_fwd(&g->lin, B16(A->gu), B16(A->x2n), W(b->w1), N, H, 2 * I, 0, e) ||
           gpu_lin_swiglu_fwd(&g->lin, B16(out), B16(A->h), B16(A->gu), B16(A->gu + I), 2 * I,
                              W(b->w2), N, I, H, 0, e);
}

/* block_forward: A->x in, next [N,H] out. */
static int block_fwd(gmodel *g, const gm_block *b, gm_acts *A, bf16 *next, dsv3_err *e)
{
    const dsv3_config *c = &g->m->cfg;
    int N = g->N, H = c->hidden_size;
    float eps = (float)c->rms_norm_eps;
    bf16 *out = g->dn;  /* free during the forward */
    int rc = gpu_rmsnorm_fwd(g->c, B16(A->xn), A->rstd1, B16(A->x), W(b->ln1), N, H, eps, e) ||
             mla_fwd(g, b, A, out, e) || add(g, A->x2, A->x, out, (int64_t)N * H, e) ||
             gpu_rmsnorm_fwd(g->c, B16(A->x2n), A->rstd2, B16(A->x2), W(b->ln2), N, H, eps, e) ||
             (b->moe ? moe_fwd(g, b, A, out, e) : mlp_fwd(g, b, A, out, e)) ||
             add(g, next, A->x2, out, (int64_t)N * H, e);
    return rc ? -1 : 0;
}

/* The row losses of a head pass (g->losses) summed on the host into *sum; buf [N]. */
static int sum_losses(gmodel *g, float *buf, double *sum, dsv3_err *e)
{
    if (gpu_download(g->c, buf, g->losses, (size_t)g->N * 4, e))
        return -1;
    double s = 0;
    for (int n = 0; n < g->N; n++)
        s += buf[n];
    *sum = s;
    return 0;
}

/* mtp_forward: the D modules over the main model's last hidden state (lib/model.h). Row i
 * of module k embeds t_{i+k} and predicts t_{i+k+1} when t_{i+k} lies in the row and in
 * row i's document; else it is a placeholder (token 0, target ignored, out of the
 * balance loss and the load). The head's gradient is formed here as for the main head,
 * scaled by lambda / D / (the step's count of module k's targets). */
static int mtp_fwd(gmodel *g, const int32_t *ids, const int32_t *targets, int grad,
                   dsv3_err *e)
{
    const dsv3_model *m = g->m;
    const dsv3_config *c = &m->cfg;
    int N = g->N, T = g->T, H = c->hidden_size, V = c->vocab_size, D = g->D;
    float eps = (float)c->rms_norm_eps;
    const bf16 *prev = g->hfinal;
    for (int k = 1; k <= D; k++) {
        gm_mtp *M = &g->mt[k - 1];
        gm_acts *A = &g->a[g->nl + k - 1];
        int count = 0;
        for (int n = 0; n < N; n++) {
            int in = n % T + k < T && (!g->has_seg || g->h_seg[n + k] == g->h_seg[n]);
            M->h_valid[n] = in;
            M->h_eid[n] = in ? ids[n + k] : 0;
            M->h_tg[n] = in ? targets[n + k] : -1;
            count += M->h_tg[n] >= 0;
        }
        M->count = count;
        M->norm = m->norm_mtp && m->norm_mtp[k - 1] > 0 ? m->norm_mtp[k - 1] : count;
        float scale = M->norm ? g->mtp_lambda / (float)D / (float)M->norm : 0.0f;
        if (gpu_upload(g->c, M->eid, M->h_eid, (size_t)N * 4, e) ||
            gpu_upload(g->c, M->tg, M->h_tg, (size_t)N * 4, e) ||
            gpu_upload(g->c, M->valid, M->h_valid, (size_t)N * 4, e) ||
            gpu_embedding_fwd(g->c, B16(M->e), W(off_of(m, m->w.embed)), M->eid, N, H, e) ||
            gpu_rmsnorm_fwd(g->c, B16(M->en), M->rstde, B16(M->e), W(M->enorm), N, H, eps, e) ||
            gpu_rmsnorm_fwd(g->c, B16(M->hn), M->rstdh, B16(prev), W(M->hnorm), N, H, eps, e) ||
            copy_cols(g, M->cat, 2 * H, M->en, H, N, H, e) ||
            copy_cols(g, M->cat + H, 2 * H, M->hn, H, N, H, e) ||
            gpu_linear_fwd(g->c, B16(A->x), B16(M->cat), W(M->eh), N, 2 * H, H, 0, e) ||
            block_fwd(g, &g->blk[g->nl + k - 1], A, M->hout, e) ||
            gpu_rmsnorm_fwd(g->c, B16(M->xf), M->rstdf, B16(M->hout), W(M->head_norm), N, H, eps,
                            e) ||
            gpu_lm_head_loss(g->c, g->losses, grad ? B16(M->d_xf) : NULL,
                             grad ? G(off_of(m, m->w.lm_head)) : NULL, B16(M->xf),
                             W(off_of(m, m->w.lm_head)),
                             M->tg, N, H, V, scale, g->chunk_rows, e) ||
            sum_losses(g, g->h_mtp_loss, &M->sum, e))
            return -1;
        prev = M->hout;
    }
    return 0;
}

/* The balance loss of the last forward from the per-block, per-sequence sums. */
static int balance_total(gmodel *g, dsv3_err *e)
{
    int nb = g->nl + g->D, B = g->B;
    g->balance = 0;
    if (!g->bal_on)
        return 0;
    if (gpu_download(g->c, g->h_bal, g->bal_loss, (size_t)nb * B * 4, e))
        return -1;
    for (int l = 0; l < nb; l++) {
        if (!g->bal_ran[l])
            continue;
        double t = 0;
        for (int b = 0; b < B; b++)
            t += g->h_bal[(size_t)l * B + b];
        g->balance += g->bal_alpha * (t / (double)g->seq_norm);
    }
    return 0;
}

extern "C" int gmodel_forward(gmodel *g, const int32_t *ids, const int32_t *targets, int grad,
                              float *loss, dsv3_err *e)
{
    const dsv3_model *m = g->m;
    const dsv3_config *c = &m->cfg;
    int N = g->N, H = c->hidden_size, V = c->vocab_size;
    for (int n = 0; n < N; n++)
        if (ids[n] < 0 || ids[n] >= V || (targets && targets[n] >= V))
            return err_set(e, "gmodel: token id or target at position %d outside the "
                           "vocabulary (vocab_size %d)", n, V);
    int run_mtp = targets && m->mtp_lambda > 0 && g->D > 0;
    g->grad_ready = 0;
    g->mtp_ran = 0;
    g->mtp_lambda = run_mtp ? m->mtp_lambda : 0.0f;
    g->bal_on = m->balance_alpha > 0;
    g->bal_alpha = m->balance_alpha;
    g->seq_norm = m->norm_seqs > 0 ? m->norm_seqs : g->B;
    g->balance = 0;
    g->ce_sum = 0;
    g->count = 0;
    memset(g->bal_ran, 0, (size_t)(g->nl + g->D));
    for (int l = 0; l < g->nl + g->D; l++)
        if (g->a[l].have_plan) {
            gpu_moe_plan_free(&g->a[l].plan);
            g->a[l].have_plan = 0;
        }
    gpu_arena_reset(g->c, g->acts_mark);
    gpu_lin_new_pass(&g->lin, grad && targets); /* FP8: new inputs; keep x^T for a backward */
    gpu_moe_fp8_new_pass(&g->mfp8, grad && targets);
    g->count_loads = grad && targets;
    if (upload_ids(g, g->ids, ids, e) ||
        gpu_embedding_fwd(g->c, B16(g->a[0].x), W(off_of(m, m->w.embed)), g->ids, N, H, e))
        return -1;
    for (int l = 0; l < g->nl; l++) {
        bf16 *next = l + 1 < g->nl ? g->a[l + 1].x : g->hfinal;
        if (block_fwd(g, &g->blk[l], &g->a[l], next, e))
            return -1;
    }
    g->routed = 1;
    if (gpu_rmsnorm_fwd(g->c, B16(g->xf), g->rstdf, B16(g->hfinal), W(off_of(m, m->w.final_norm)),
                        N, H, (float)c->rms_norm_eps, e))
        return -1;
    if (!targets)
        return balance_total(g, e) || gpu_sync(g->c, e) ? -1 : 0;
    int count = 0;
    for (int n = 0; n < N; n++)
        count += targets[n] >= 0;
    memcpy(g->h_tgt, targets, (size_t)N * 4);
    g->count = count;
    g->ce_norm = m->norm_main > 0 ? m->norm_main : count;
    /* the per-forward sums on the host only where wanted: a caller's loss, or the MTP and
     * balance losses' report; otherwise the loss is summed on the device and read once per
     * step (gmodel_take_stats) */
    int host_sums = loss || run_mtp || g->bal_on;
    if (upload_ids(g, g->tgt, targets, e) ||
        gpu_lm_head_loss(g->c, g->losses, grad ? B16(g->d_xf) : NULL,
                         grad ? G(off_of(m, m->w.lm_head)) : NULL, B16(g->xf),
                         W(off_of(m, m->w.lm_head)),
                         g->tgt, N, H, V, g->ce_norm ? 1.0f / (float)g->ce_norm : 0.0f,
                         g->chunk_rows, e))
        return -1;
    if (!loss) {
        k_sum_into<<<1, 1024, 0, ST(g)>>>(g->d_loss_acc, g->losses, N);
        LAUNCH_CHECK("k_sum_into", e);
    }
    g->rows_on_host = host_sums;
    if (host_sums && sum_losses(g, g->h_loss, &g->ce_sum, e))
        return -1;
    if (run_mtp) {
        if (mtp_fwd(g, ids, targets, grad, e))
            return -1;
        g->mtp_ran = 1;
    }
    if (balance_total(g, e))
        return -1;
    if (loss)
        *loss = count ? (float)(g->ce_sum / count) : 0.0f;
    g->grad_ready = grad;
    return 0;
}

extern "C" int gmodel_set_segments(gmodel *g, const int32_t *segment, const int32_t *position,
                                   dsv3_err *e)
{
    int T = g->T, N = g->N;
    if (!segment && !position && !g->has_seg && !g->pos_custom)
        return 0;  /* as it is */
    for (int n = 0; n < N; n++) {
        if (position && (position[n] < 0 || position[n] >= T))
            return err_set(e, "gmodel: position %d of row %d outside 0..%d", position[n], n,
                           T - 1);
        if (segment && n % T && segment[n] < segment[n - 1])
            return err_set(e, "gmodel: document numbers decrease at row %d", n);
    }
    int32_t *pos = (int32_t *)malloc((size_t)N * 4);
    if (!pos)
        return err_set(e, "gmodel: out of memory");
    for (int n = 0; n < N; n++)
        pos[n] = position ? position[n] : n % T;
    int rc = gpu_upload(g->c, g->pos, pos, (size_t)N * 4, e);
    free(pos);
    if (rc)
        return -1;
    g->pos_custom = position != NULL;
    g->has_seg = segment != NULL;
    if (segment) {
        memcpy(g->h_seg, segment, (size_t)N * 4);
        return gpu_upload(g->c, g->seg, segment, (size_t)N * 4, e);
    }
    return 0;
}

extern "C" void gmodel_losses(const gmodel *g, model_losses *out)
{
    memset(out, 0, sizeof *out);
    out->main = g->count && g->ce_norm ? g->ce_sum / (double)g->ce_norm : 0;
    if (g->mtp_ran) {
        double sum = 0;
        for (int k = 0; k < g->D; k++) {
            const gm_mtp *M = &g->mt[k];
            double lk = M->count ? M->sum / (double)M->norm : 0;
            if (k < 8)
                out->mtp_k[k] = lk;
            sum += lk;
        }
        out->mtp = g->mtp_lambda / g->D * sum;
    }
    out->balance = g->balance;
    out->total = out->main + out->mtp + out->balance;
}

extern "C" int gmodel_mtp_expert_load(gmodel *g, int k, int64_t *counts, int64_t *slots,
                                      dsv3_err *e)
{
    const dsv3_config *c = &g->m->cfg;
    if (k < 0 || k >= g->D || !g->mtp_ran || !g->blk[g->nl + k].moe)
        return 1;
    int N = g->N, K = c->num_experts_per_tok;
    int32_t *idx = (int32_t *)malloc((size_t)N * K * 4);
    if (!idx)
        return err_set(e, "gmodel: out of memory");
    if (gpu_download(g->c, idx, g->a[g->nl + k].idx, (size_t)N * K * 4, e)) {
        free(idx);
        return -1;
    }
    memset(counts, 0, (size_t)c->n_routed_experts * sizeof *counts);
    int64_t used = 0;
    const int32_t *valid = g->mt[k].h_valid;
    for (int n = 0; n < N; n++)
        if (valid[n]) {
            for (int j = 0; j < K; j++)
                counts[idx[(size_t)n * K + j]]++;
            used += K;
        }
    *slots = used;
    free(idx);
    return 0;
}

/* ---- backward ---- */

/* The block's FFN input again: x2n = RMSNorm(x2) and, for MoE, its expert-order copy xp
 * (the plan and rstd2 of the forward stay). */
static int recompute_ffn_in(gmodel *g, const gm_block *b, gm_acts *A, dsv3_err *e)
{
    const dsv3_config *c = &g->m->cfg;
    int N = g->N, H = c->hidden_size;
    return gpu_rmsnorm_fwd(g->c, B16(A->x2n), A->rstd2, B16(A->x2), W(b->ln2), N, H,
                           (float)c->rms_norm_eps, e) ||
                   (b->moe && gpu_moe_gather(g->c, &A->plan, B16(A->xp), B16(A->x2n), H, e))
               ? -1
               : 0;
}

/* MLA's inputs to backward again, as mla_fwd made them: xn, qan, q (after RoPE), ckvn, kvb,
 * k and v, from x, qa, ckv and kva (whose k_pe the forward already rotated). */
static int recompute_mla_in(gmodel *g, const gm_block *b, gm_acts *A, dsv3_err *e)
{
    const dsv3_config *c = &g->m->cfg;
    gpu_ctx *x = g->c;
    int N = g->N, H = c->hidden_size, nh = c->num_attention_heads, qk = config_qk_head_dim(c);
    int nope = c->qk_nope_head_dim, rope = c->qk_rope_head_dim, kv = c->kv_lora_rank;
    int dv = c->v_head_dim, half = rope / 2, ql = c->q_lora_rank;
    if (gpu_rmsnorm_fwd(x, B16(A->xn), A->rstd1, B16(A->x), W(b->ln1), N, H,
                        (float)c->rms_norm_eps, e))
        return -1;
    if (ql) {
        if (gpu_rmsnorm_fwd(x, B16(A->qan), A->rstdq, B16(A->qa), W(b->qaln), N, ql, 1e-6f, e) ||
            gpu_lin_fwd(&g->lin, B16(A->q), B16(A->qan), W(b->qb), N, ql, nh * qk, 0, e))
            return -1;
    } else if (gpu_lin_fwd(&g->lin, B16(A->q), B16(A->xn), W(b->q), N, H, nh * qk, 0, e)) {
        return -1;
    }
    if ((half && gpu_rope_fwd(x, B16(A->q + nope), N * nh, qk, nh, g->pos, g->cos_t, g->sin_t,
                              half, c->rope_interleave, e)) ||
        gpu_rmsnorm_fwd(x, B16(A->ckvn), A->rstdkv, B16(A->ckv), W(b->kvaln), N, kv, 1e-6f, e) ||
        gpu_lin_fwd(&g->lin, B16(A->kvb), B16(A->ckvn), W(b->kvb), N, kv, nh * (nope + dv), 0, e))
        return -1;
    return gpu_mla_assemble(x, B16(A->k), B16(A->v), B16(A->kvb), B16(A->kva), N, nh, nope,
                            rope, dv, kv, e);
}

/* mlp_backward of a SwiGLU MLP (dense or shared experts): dy [N,H] in, d(x2n) into dn
 * (beta: 0 writes, 1 adds). */
static int mlp_bwd(gmodel *g, bf16 *dn, float beta, const bf16 *dy, const bf16 *x2n,
                   const bf16 *gu, const bf16 *h, size_t w1, size_t w2, int I, dsv3_err *e)
{
    gpu_ctx *x = g->c;
    int N = g->N, H = g->m->cfg.hidden_size;
    size_t mark = gpu_arena_mark(x);
    bf16 *dh = (bf16 *)gpu_arena_alloc(x, (size_t)N * I * 2, e);
    bf16 *dgu = dh ? (bf16 *)gpu_arena_alloc(x, (size_t)N * 2 * I * 2, e) : NULL;
    int rc = !dgu ||
             gpu_lin_dgrad(&g->lin, B16(dh), B16(dy), W(w2), N, I, H, 0, e) ||
             gpu_lin_wgrad(&g->lin, G(w2), B16(dy), B16(h), N, I, H, 1.0f, e) ||
             gpu_swiglu_bwd(x, B16(dgu), B16(dgu + I), B16(dh), B16(gu), B16(gu + I), N, I,
                            2 * I, e) ||
             gpu_lin_dgrad(&g->lin, B16(dn), B16(dgu), W(w1), N, H, 2 * I, beta, e) ||
             gpu_lin_wgrad(&g->lin, G(w1), B16(dgu), B16(x2n), N, H, 2 * I, 1.0f, e);
    gpu_arena_reset(x, mark);
    return rc ? -1 : 0;
}

/* balance_backward into dlog [N,E] (fp32) from the forward's G. */
static int balance_bwd(gmodel *g, const gm_acts *A, float *dlog, dsv3_err *e)
{
    int N = g->N, E = g->m->cfg.n_routed_experts;
    k_balance_bwd<<<blocks((int64_t)N * 32), 256, 0, ST(g)>>>(dlog, A->bal_g, A->s, A->valid, N,
                                                             g->T, E);
    LAUNCH_CHECK("k_balance_bwd", e);
    return 0;
}

/* moe_backward: dy in, d(x2n) written into dn. */
static int moe_bwd(gmodel *g, const gm_block *b, gm_acts *A, const bf16 *dy, bf16 *dn,
                   dsv3_err *e)
{
    const dsv3_config *c = &g->m->cfg;
    gpu_ctx *x = g->c;
    int N = g->N, H = c->hidden_size, E = c->n_routed_experts, K = c->num_experts_per_tok;
    int mi = c->moe_intermediate_size, si = mi * c->n_shared_experts, nk = N * K;
    const gpu_moe_plan *p = &A->plan;
    size_t mark = gpu_arena_mark(x);
    bf16 *dyp = (bf16 *)gpu_arena_alloc(x, (size_t)nk * H * 2, e);
    bf16 *dh = dyp ? (bf16 *)gpu_arena_alloc(x, (size_t)nk * mi * 2, e) : NULL;
    bf16 *dgu = dh ? (bf16 *)gpu_arena_alloc(x, (size_t)nk * 2 * mi * 2, e) : NULL;
    float *dw = dgu ? (float *)gpu_arena_alloc(x, (size_t)nk * 4, e) : NULL;
    float *dlog = dw ? (float *)gpu_arena_alloc(x, (size_t)N * E * 4, e) : NULL;
    bf16 *dlogb = dlog ? (bf16 *)gpu_arena_alloc(x, (size_t)N * E * 2, e) : NULL;
    int rc = !dlogb ||
             gpu_moe_combine_bwd(x, p, B16(dyp), dw, B16(dy), B16(A->yp), A->w, H, e) ||
             (g->ep ? gep_backward(g->ep, b->index, B16(dyp), B16(dyp), W(b->ew1), W(b->ew2),
                                   G(b->ew1), G(b->ew2), e)
                    : moe_lin_dgrad(g, p, B16(dh), B16(dyp), W(b->ew2), mi, H, e) ||
             moe_lin_wgrad(g, p, G(b->ew2), B16(dyp), B16(A->eh), mi, H, e) ||
             gpu_swiglu_bwd(x, B16(dgu), B16(dgu + mi), B16(dh), B16(A->egu), B16(A->egu + mi),
                            nk, mi, 2 * mi, e) ||
             /* dyp's rows are free again: d(xp) goes there */
             moe_lin_dgrad(g, p, B16(dyp), B16(dgu), W(b->ew1), H, 2 * mi, e) ||
             moe_lin_wgrad(g, p, G(b->ew1), B16(dgu), B16(A->xp), H, 2 * mi, e)) ||
             gpu_moe_gather_bwd(x, p, B16(dn), 0.0f, B16(dyp), H, e) ||
             (si && mlp_bwd(g, dn, 1.0f, dy, A->x2n, A->gu, A->h, b->sw1, b->sw2, si, e)) ||
             gpu_memset(x, dlog, 0, (size_t)N * E * 4, e) ||
             gpu_router_bwd(x, dlog, dw, A->idx, A->s, N, E, K, c->norm_topk_prob,
                            (float)c->routed_scaling_factor, e) ||
             (g->bal_on && balance_bwd(g, A, dlog, e)) ||
             gpu_f32_to_bf16(x, B16(dlogb), dlog, (int64_t)N * E, e) ||
             gpu_linear_wgrad(x, G(b->router), B16(dlogb), B16(A->x2n), N, H, E, 1.0f, e) ||
             gpu_linear_dgrad(x, B16(dn), B16(dlogb), W(b->router), N, H, E, 1.0f, e);
    gpu_arena_reset(x, mark);
    return rc ? -1 : 0;
}

/* mla_backward: dout [N,H] in, d(xn) written into dxn. */
static int mla_bwd(gmodel *g, const gm_block *b, gm_acts *A, const bf16 *dout, bf16 *dxn,
                   dsv3_err *e)
{
    const dsv3_config *c = &g->m->cfg;
    gpu_ctx *x = g->c;
    int N = g->N, H = c->hidden_size, nh = c->num_attention_heads, qk = config_qk_head_dim(c);
    int nope = c->qk_nope_head_dim, rope = c->qk_rope_head_dim, kv = c->kv_lora_rank;
    int dv = c->v_head_dim, half = rope / 2, ql = c->q_lora_rank;
    size_t mark = gpu_arena_mark(x);
    size_t n_ao = (size_t)N * nh * dv, n_q = (size_t)N * nh * qk;
    bf16 *dao = (bf16 *)gpu_arena_alloc(x, n_ao * 2, e);
    bf16 *dq = dao ? (bf16 *)gpu_arena_alloc(x, n_q * 2, e) : NULL;
    bf16 *dk = dq ? (bf16 *)gpu_arena_alloc(x, n_q * 2, e) : NULL;
    bf16 *dvv = dk ? (bf16 *)gpu_arena_alloc(x, n_ao * 2, e) : NULL;
    bf16 *dkvb = dvv ? (bf16 *)gpu_arena_alloc(x, (size_t)N * nh * (nope + dv) * 2, e) : NULL;
    bf16 *dkva = dkvb ? (bf16 *)gpu_arena_alloc(x, (size_t)N * (kv + rope) * 2, e) : NULL;
    bf16 *dckvn = dkva ? (bf16 *)gpu_arena_alloc(x, (size_t)N * kv * 2, e) : NULL;
    bf16 *dckv = dckvn ? (bf16 *)gpu_arena_alloc(x, (size_t)N * kv * 2, e) : NULL;
    bf16 *dqan = dckv && ql ? (bf16 *)gpu_arena_alloc(x, (size_t)N * ql * 2, e) : NULL;
    bf16 *dqa = dqan ? (bf16 *)gpu_arena_alloc(x, (size_t)N * ql * 2, e) : NULL;
    float scale = (float)config_softmax_scale(c);
    int rc = !dckv || (ql && !dqa) ||
             gpu_lin_dgrad(&g->lin, B16(dao), B16(dout), W(b->o), N, nh * dv, H, 0, e) ||
             gpu_lin_wgrad(&g->lin, G(b->o), B16(dout), B16(A->ao), N, nh * dv, H, 1.0f, e) ||
             gpu_attention_bwd_seg(x, B16(dq), B16(dk), B16(dvv), B16(dao), B16(A->ao), A->lse,
                                   B16(A->q), B16(A->k), B16(A->v), g->has_seg ? g->seg : NULL,
                                   g->B, g->T, nh, qk, dv, scale, e);
    if (rc) {
        gpu_arena_reset(x, mark);
        return -1;
    }
    if (gpu_mla_assemble_bwd(x, B16(dkvb), B16(dkva), B16(dk), B16(dvv), N, nh, nope, rope, dv,
                             kv, e)) {
        gpu_arena_reset(x, mark);
        return -1;
    }
    rc = (half && gpu_rope_bwd(x, B16(dkva + kv), N, kv + rope, 1, g->pos, g->cos_t, g->sin_t,
                               half, c->rope_interleave, e)) ||
         gpu_lin_dgrad(&g->lin, B16(dckvn), B16(dkvb), W(b->kvb), N, kv, nh * (nope + dv), 0, e) ||
         gpu_lin_wgrad(&g->lin, G(b->kvb), B16(dkvb), B16(A->ckvn), N, kv, nh * (nope + dv), 1.0f,
                          e) ||
         gpu_rmsnorm_bwd(x, B16(dckv), 0.0f, G(b->kvaln), B16(dckvn), B16(A->ckv), W(b->kvaln),
                         A->rstdkv, N, kv, 1e-6f, e) ||
         copy_cols(g, dkva, kv + rope, dckv, kv, N, kv, e) ||
         gpu_lin_dgrad(&g->lin, B16(dxn), B16(dkva), W(b->kva), N, H, kv + rope, 0, e) ||
         gpu_lin_wgrad(&g->lin, G(b->kva), B16(dkva), B16(A->xn), N, H, kv + rope, 1.0f, e) ||
         (half && gpu_rope_bwd(x, B16(dq + nope), N * nh, qk, nh, g->pos, g->cos_t, g->sin_t,
                               half, c->rope_interleave, e));
    if (!rc && ql)
        rc = gpu_lin_dgrad(&g->lin, B16(dqan), B16(dq), W(b->qb), N, ql, nh * qk, 0, e) ||
             gpu_lin_wgrad(&g->lin, G(b->qb), B16(dq), B16(A->qan), N, ql, nh * qk, 1.0f, e) ||
             gpu_rmsnorm_bwd(x, B16(dqa), 0.0f, G(b->qaln), B16(dqan), B16(A->qa), W(b->qaln),
                             A->rstdq, N, ql, 1e-6f, e) ||
             gpu_lin_dgrad(&g->lin, B16(dxn), B16(dqa), W(b->qa), N, H, ql, 1.0f, e) ||
             gpu_lin_wgrad(&g->lin, G(b->qa), B16(dqa), B16(A->xn), N, H, ql, 1.0f, e);
    else if (!rc)
        rc = gpu_lin_dgrad(&g->lin, B16(dxn), B16(dq), W(b->q), N, H, nh * qk, 1.0f, e) ||
             gpu_lin_wgrad(&g->lin, G(b->q), B16(dq), B16(A->xn), N, H, nh * qk, 1.0f, e);
    gpu_arena_reset(x, mark);
    return rc ? -1 : 0;
}

/* block_backward: g->dx holds d(block output) on entry, d(block input) on return. */
static int block_bwd(gmodel *g, const gm_block *b, gm_acts *A, dsv3_err *e)
{
    const dsv3_config *c = &g->m->cfg;
    int N = g->N, H = c->hidden_size;
    float eps = (float)c->rms_norm_eps;
    gpu_ctx *x = g->c;
    if (g->recompute && recompute_ffn_in(g, b, A, e))
        return -1;
    int rc = b->moe ? moe_bwd(g, b, A, g->dx, g->dn, e)
                    : mlp_bwd(g, g->dn, 0.0f, g->dx, A->x2n, A->gu, A->h, b->w1, b->w2,
                              c->intermediate_size, e);
    return rc ||
           gpu_rmsnorm_bwd(x, B16(g->dx), 1.0f, G(b->ln2), B16(g->dn), B16(A->x2), W(b->ln2),
                           A->rstd2, N, H, eps, e) ||
           (g->recompute && recompute_mla_in(g, b, A, e)) ||
           mla_bwd(g, b, A, g->dx, g->dn, e) ||
           gpu_rmsnorm_bwd(x, B16(g->dx), 1.0f, G(b->ln1), B16(g->dn), B16(A->x), W(b->ln1),
                           A->rstd1, N, H, eps, e)
               ? -1
               : 0;
}

/* mtp_backward: the modules last depth first; leaves in g->dcarry d(loss)/d(the main model's
 * last hidden state) through module 1's hnorm. */
static int mtp_bwd(gmodel *g, dsv3_err *e)
{
    const dsv3_model *m = g->m;
    const dsv3_config *c = &m->cfg;
    gpu_ctx *x = g->c;
    int N = g->N, H = c->hidden_size, V = c->vocab_size;
    float eps = (float)c->rms_norm_eps;
    size_t nh = (size_t)N * H * 2;
    if (gpu_memset(x, g->dcarry, 0, nh, e))
        return -1;
    for (int k = g->D; k >= 1; k--) {
        gm_mtp *M = &g->mt[k - 1];
        const bf16 *prev = k > 1 ? g->mt[k - 2].hout : g->hfinal;
        CUDA_TRY(cudaMemcpyAsync(g->dx, g->dcarry, nh, cudaMemcpyDeviceToDevice, ST(g)), e);
        if (M->count && gpu_rmsnorm_bwd(x, B16(g->dx), 1.0f, G(M->head_norm), B16(M->d_xf),
                                        B16(M->hout), W(M->head_norm), M->rstdf, N, H, eps, e))
            return -1;
        if (block_bwd(g, &g->blk[g->nl + k - 1], &g->a[g->nl + k - 1], e) ||
            gpu_linear_dgrad(x, B16(g->dcat), B16(g->dx), W(M->eh), N, 2 * H, H, 0, e) ||
            gpu_linear_wgrad(x, G(M->eh), B16(g->dx), B16(M->cat), N, 2 * H, H, 1.0f, e) ||
            copy_cols(g, g->dsplit, H, g->dcat, 2 * H, N, H, e) ||
            gpu_rmsnorm_bwd(x, B16(g->dx), 0.0f, G(M->enorm), B16(g->dsplit), B16(M->e),
                            W(M->enorm), M->rstde, N, H, eps, e) ||
            gpu_embedding_bwd(x, G(off_of(m, m->w.embed)), B16(g->dx), M->eid, N, H, V, e) ||
            copy_cols(g, g->dsplit, H, g->dcat + H, 2 * H, N, H, e) ||
            gpu_rmsnorm_bwd(x, B16(g->dcarry), 0.0f, G(M->hnorm), B16(g->dsplit), B16(prev),
                            W(M->hnorm), M->rstdh, N, H, eps, e))
            return -1;
    }
    return 0;
}

extern "C" int gmodel_backward(gmodel *g, dsv3_err *e)
{
    const dsv3_model *m = g->m;
    const dsv3_config *c = &m->cfg;
    int N = g->N, H = c->hidden_size, V = c->vocab_size;
    if (!g->grad_ready)
        return err_set(e, "gmodel: backward without a forward with targets and grad");
    g->grad_ready = 0;
    if (!g->count && !g->mtp_ran && !g->bal_on && !g->ep)
        return 0;  /* the loss is a constant 0 (under expert parallelism the rows still move) */
    size_t nh = (size_t)N * H * 2;
    if (g->mtp_ran) {
        if (mtp_bwd(g, e))
            return -1;
        CUDA_TRY(cudaMemcpyAsync(g->dx, g->dcarry, nh, cudaMemcpyDeviceToDevice, ST(g)), e);
    } else if (!g->count && gpu_memset(g->c, g->dx, 0, nh, e)) {
        return -1;
    }
    if (g->count && gpu_rmsnorm_bwd(g->c, B16(g->dx), g->mtp_ran ? 1.0f : 0.0f,
                                    G(off_of(m, m->w.final_norm)), B16(g->d_xf), B16(g->hfinal),
                                    W(off_of(m, m->w.final_norm)), g->rstdf, N, H,
                                    (float)c->rms_norm_eps, e))
        return -1;
    if (g->hook && g->hook(g->hook_ctx, 0, e))
        return -1;
    for (int l = g->nl - 1; l >= 0; l--)
        if (block_bwd(g, &g->blk[l], &g->a[l], e) ||
            (g->hook && g->hook(g->hook_ctx, g->nl - l, e)))
            return -1;
    if (gpu_embedding_bwd(g->c, G(off_of(m, m->w.embed)), B16(g->dx), g->ids, N, H, V, e) ||
        (g->hook && g->hook(g->hook_ctx, g->nl + 1, e)))
        return -1;
    /* no wait for the device: a fault shows at the next synchronising call */
    return 0;
}

extern "C" int gmodel_expert_load(const gmodel *g, int l, int64_t *counts)
{
    if (l < 0 || l >= g->nl || !g->blk[l].moe || !g->a[l].have_plan)
        return -1;
    int E = g->m->cfg.n_routed_experts;
    int *off = (int *)malloc(((size_t)E + 1) * sizeof(int));
    dsv3_err e;
    if (!off || gpu_moe_plan_offsets(g->c, &g->a[l].plan, off, &e)) {
        free(off);
        return -1;
    }
    for (int x = 0; x < E; x++)
        counts[x] = off[x + 1] - off[x];
    free(off);
    return 0;
}

extern "C" int gmodel_row_losses(const gmodel *g, float *out)
{
    if (!g->h_tgt || !g->routed || !g->rows_on_host)
        return -1;
    memcpy(out, g->h_loss, (size_t)g->N * 4);
    return 0;
}

/* ---- expert parallelism (kernels/gep.h) ---- */

/* The arena above a one-GPU model's: per MoE block the received rows and their SwiGLU
 * activations (kept to the backward), and one block's exchange temporaries, for up to
 * twice the average load (N x K rows a block: with --ep 2 every case). */
static size_t gmodel_ep_arena(const gmodel *g)
{
    const dsv3_config *c = &g->m->cfg;
    if (g->m->ep_size <= 1 && !g->ep_arena)
        return 0;
    size_t rows = 2 * (size_t)g->N * c->num_experts_per_tok, H = c->hidden_size;
    size_t mi = c->moe_intermediate_size, E = c->n_routed_experts;
    size_t kept = rows * (H + 3 * mi) * 2 + E * 20 + 2048;
    return (size_t)g->n_regions * kept + rows * (2 * H + 3 * mi) * 2 + 4096;
}

extern "C" int gmodel_ep_attach(gmodel *g, struct ep *p, struct comm *dev, dsv3_err *e)
{
    const dsv3_config *c = &g->m->cfg;
    if (g->m->ep_size != p->size || g->m->ep_group != p->group)
        return err_set(e, "gmodel: the model holds expert group %d of %d, the job's layout "
                       "gives this rank group %d of %d", g->m->ep_group, g->m->ep_size,
                       p->group, p->size);
    gep_destroy(g->ep);
    g->ep = NULL;
    if (gep_create(&g->ep, p, dev, g->c, g->nl + g->D, c->hidden_size,
                   c->moe_intermediate_size, e))
        return -1;
    gep_set_fp8(g->ep, &g->mfp8);  /* the held experts follow gmodel_set_fp8, before or after */
    return 0;
}

extern "C" int gmodel_moe_fp8(const gmodel *g)
{
    const dsv3_config *c = &g->m->cfg;
    int H = c->hidden_size, mi = c->moe_intermediate_size, md = g->mfp8.min_dim;
    return g->mfp8.on && ((H < mi ? H : mi) >= md || (H < 2 * mi ? H : 2 * mi) >= md);
}

/* lib/model's model_ep_idle on the GPU: every MoE block's exchanges with no rows of this
 * rank's own, in the order a forward (with the MTP modules when mtp) and a backward run
 * them, the held experts serving the other ranks' rows (their weight gradients added). */
extern "C" int gmodel_ep_idle(gmodel *g, int mtp, int backward, dsv3_err *e)
{
    const dsv3_config *c = &g->m->cfg;
    if (!g->ep)
        return 0;
    int nb = g->nl + (mtp ? g->D : 0);
    gpu_moe_plan none;
    memset(&none, 0, sizeof none);
    none.k = c->num_experts_per_tok;
    none.E = c->n_routed_experts;
    for (int l = 0; l < g->nl + g->D; l++)
        if (g->a[l].have_plan) {
            gpu_moe_plan_free(&g->a[l].plan);
            g->a[l].have_plan = 0;
        }
    gpu_arena_reset(g->c, g->acts_mark);
    g->grad_ready = 0;
    for (int l = 0; l < nb; l++) {
        const gm_block *b = &g->blk[l];
        if (b->moe && gep_forward(g->ep, l, &none, NULL, NULL, W(b->ew1), W(b->ew2), e))
            return -1;
    }
    /* the backward's order: the MTP modules last first, then the main layers */
    for (int i = 0; backward && i < nb; i++) {
        int l = i < nb - g->nl ? nb - 1 - i : g->nl - 1 - (i - (nb - g->nl));
        const gm_block *b = &g->blk[l];
        if (b->moe && gep_backward(g->ep, l, NULL, NULL, W(b->ew1), W(b->ew2), G(b->ew1),
                                   G(b->ew2), e))
            return -1;
    }
    return 0;
}

extern "C" int64_t gmodel_ep_rows(const gmodel *g, int blk)
{
    return g->ep ? gep_rows(g->ep, blk) : 0;
}

extern "C" int gmodel_ep_take_time(gmodel *g, int64_t *n, double *ms, double *bytes,
                                   dsv3_err *e)
{
    *n = 0, *ms = *bytes = 0;
    return g->ep ? gep_take_time(g->ep, n, ms, bytes, e) : 0;
}
