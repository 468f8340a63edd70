/* ginfer_prefill: the prompt's prefill on the tensor cores (the default; DSV3_GINFER_PREFILL), part of
 * ginfer.cu's translation unit (as ginfer_mtp.cuh: it reads the engine's weights and cache).
 *
 * Taken by a ginfer_forward call of at least pf_min rows (64 unless "gemm:N") that are one
 * slot's positions 0, 1, ..., n-1 (a prompt on an empty slot), on the bf16 engine without the
 * MTP module, when the attention kernel takes the head dims (qk <= 192, dv <= 128); every
 * other call (decode, later chunks over a cache, the fp32 "exact" engine: the training
 * kernels are bf16-only) keeps the GEMV path. All n rows go in one pass:
 * - dense products through kernels/gemm (cuBLASLt, bf16 operands, fp32 accumulation; fp32
 *   outputs where the engine keeps fp32: the residual's deltas, q, kv_a);
 * - MLA in the non-absorbed form (DeepSeek's prefill): q and kv_a as the GEMV path, the cache
 *   rows written by the same gk_kv_write (normed latent, rotated k_pe; q_pe rotated), then
 *   k_nope and v up-projected from the cached latent rows with kv_b for all heads, and causal
 *   attention (kernels/attention's flash forward) over [q_nope q_pe] . [k_nope k_pe];
 * - the MoE through kernels/moe: the router as the GEMV path (fp32 GEMV, gpu_router_fwd: the
 *   same expert choices for the same input), plan, gather, the grouped expert GEMMs, and a
 *   weighted combine in fp32 (with the shared experts as one more dense MLP);
 * - norms, embedding and the head as the GEMV path (gk_add_norm, gk_embed, head_rows).
 * The residual stream stays fp32; activations entering a GEMM are rounded to bf16 (the GEMV
 * path reads them in fp32), so results agree with it within bf16 rounding, not bitwise.
 *
 * The pass runs on its own context (own stream, cuBLAS handle and an arena holding every
 * buffer, sized for the longest prompt so far), after the engine's stream is drained. */
#include "attention.h"
#include "gemm.h"

struct gpf {
    gpu_ctx *c;
    cudaStream_t s;
    int cap;      /* rows the arena was sized for */
    long passes;  /* prefill passes run this way */
};

/* DSV3_GINFER_PREFILL: unset, empty or "gemm": this pass for prompts of 64 rows or more;
 * "gemm:N": of N or more; "gemv" (or "0"): never (every row through the GEMVs, fp32
 * activations: for comparisons). */
static int pf_threshold(void)
{
    const char *v = getenv("DSV3_GINFER_PREFILL");
    if (v && (!strcmp(v, "gemv") || !strcmp(v, "0")))
        return 0;
    int n = v && !strncmp(v, "gemm:", 5) ? atoi(v + 5) : 64;
    return n < 1 ? 1 : n;
}

/* ---- small kernels of the pass ---- */

/* h[r, j] = silu(g) * u with g = x[r, j], u = x[r, F + j] (x rows 2F wide), bf16 in and out,
 * fp32 math as lib/ops swiglu. */
__global__ void pf_swiglu_k(bf16 *h, const bf16 *x, long rows, int F)
{
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= rows * F)
        return;
    long r = i / F;
    int j = (int)(i % F);
    float g = b2f(x[r * 2 * F + j]), u = b2f(x[r * 2 * F + F + j]);
    h[i] = f2b(g / (1.0f + expf(-g)) * u);
}

/* K[t, h] = [kvo[t, h, 0:nope], cache[t, kv:kv+rope]], V[t, h] = kvo[t, h, nope:nope+dv];
 * kvo rows nh (nope + dv) wide, cache rows W apart. */
__global__ void pf_kv_k(bf16 *K, bf16 *V, const bf16 *kvo, const bf16 *cache, int T, int nh,
                        int nope, int rope, int dv, int kv, int W)
{
    int qk = nope + rope, per = qk + dv;
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= (long)T * nh * per)
        return;
    int j = (int)(i % per);
    long th = i / per;
    int h = (int)(th % nh);
    long t = th / nh;
    const bf16 *src = kvo + (t * nh + h) * (nope + dv);
    if (j < nope)
        K[th * qk + j] = src[j];
    else if (j < qk)
        K[th * qk + j] = cache[t * W + kv + (j - nope)];
    else
        V[th * dv + (j - qk)] = src[nope + (j - qk)];
}

/* out[n, :] = sum over k (in order) of w[n K + k] * y[pos[n K + k], :], + ys[n, :] when ys;
 * kernels/moe's combine, in fp32. */
__global__ void pf_combine_k(float *out, const bf16 *y, const float *w, const int32_t *pos,
                             const float *ys, int N, int K, int H)
{
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= (long)N * H)
        return;
    long n = i / H;
    int j = (int)(i % H);
    float s = 0;
    for (int k = 0; k < K; k++)
        s += w[n * K + k] * b2f(y[(long)pos[n * K + k] * H + j]);
    if (ys)
        s += ys[i];
    out[i] = s;
}

static unsigned pf_blocks(long n) { return (unsigned)((n + 255) / 256); }

/* ---- buffers ---- */

struct pfbuf {
    int *ids, *slot, *pos;
    float *x, *xn, *qa, *qan, *q, *lse, *delta, *dd, *ys, *rl, *rs, *rw;
    gpu_bf16 *xb, *qanb, *qb, *kvo, *kb, *vb, *ob, *hb, *ab, *xp, *hp, *ap, *yp;
    int32_t *idx;
};

/* Widest dense MLP or shared experts. */
static int pf_fmax(const ginfer *g)
{
    int F = g->inter;
    for (int l = 0; l < g->L; l++)
        if (g->ly[l].F > F)
            F = g->ly[l].F;
    return F;
}

/* Carves pb for T rows out of c's arena (c NULL: only counts); returns the bytes. */
static size_t pf_carve(const ginfer *g, gpu_ctx *c, pfbuf *pb, int T, dsv3_err *e)
{
    size_t tot = 0, R = (size_t)T, H = g->H, nh = g->nh, K = g->K ? g->K : 1,
           E = g->E ? g->E : 1, F = pf_fmax(g), A = g->qr ? g->qr + g->W : g->W;
    int bad = 0;
#define PF(p, n, sz)                                                                       \
    do {                                                                                   \
        size_t b_ = ((size_t)(n) * (sz) + 255) / 256 * 256;                                \
        tot += b_;                                                                         \
        if (c && !bad && !((p) = (decltype(p))gpu_arena_alloc(c, b_, e)))                  \
            bad = 1;                                                                       \
    } while (0)
    PF(pb->ids, R, 4);
    PF(pb->slot, R, 4);
    PF(pb->pos, R, 4);
    PF(pb->x, R * H, 4);
    PF(pb->xn, R * H, 4);
    PF(pb->xb, R * H, 2);
    PF(pb->qa, R * A, 4);
    PF(pb->qan, R * (g->qr ? g->qr : 8), 4);
    PF(pb->qanb, R * (g->qr ? g->qr : 8), 2);
    PF(pb->q, R * nh * g->qk, 4);
    PF(pb->qb, R * nh * g->qk, 2);
    PF(pb->kvo, R * nh * (g->nope + g->dv), 2);
    PF(pb->kb, R * nh * g->qk, 2);
    PF(pb->vb, R * nh * g->dv, 2);
    PF(pb->ob, R * nh * g->dv, 2);
    PF(pb->lse, R * nh, 4);
    PF(pb->delta, R * H, 4);
    PF(pb->dd, R * H, 4);
    PF(pb->ys, R * H, 4);
    PF(pb->hb, R * 2 * F, 2);
    PF(pb->ab, R * F, 2);
    PF(pb->rl, R * E, 4);
    PF(pb->rs, R * E, 4);
    PF(pb->rw, R * K, 4);
    PF(pb->idx, R * K, 4);
    PF(pb->xp, R * K * H, 2);
    PF(pb->hp, R * K * 2 * g->mi, 2);
    PF(pb->ap, R * K * g->mi, 2);
    PF(pb->yp, R * K * H, 2);
#undef PF
    return bad ? 0 : tot;
}

/* The pass's context with an arena for T rows (made or remade larger). */
static int pf_ready(ginfer *g, int T, dsv3_err *e)
{
    if (g->pf && g->pf->cap >= T)
        return 0;
    if (!g->pf && !(g->pf = (gpf *)calloc(1, sizeof *g->pf)))
        return err_set(e, "ginfer: out of host memory");
    gpf *p = g->pf;
    if (p->c) {
        gpu_ctx_destroy(p->c);
        p->c = NULL;
    }
    pfbuf pb;
    /* + the MoE plan (order, pos, offsets) and its sort's scratch (CUB radix sort pairs) */
    size_t nk = (size_t)T * (g->K ? g->K : 1);
    size_t bytes = pf_carve(g, NULL, &pb, T, e) + 16 * nk + 4 * (size_t)(g->E + 1) +
                   ((size_t)32 << 20);
    int dev = 0;
    cudaGetDevice(&dev);
    if (gpu_ctx_create(&p->c, dev, bytes, e))
        return -1;
    p->s = (cudaStream_t)gpu_ctx_stream(p->c);
    p->cap = T;
    return 0;
}

static void pf_free(ginfer *g)
{
    if (g->pf) {
        gpu_ctx_destroy(g->pf->c);
        free(g->pf);
        g->pf = NULL;
    }
}

/* ---- the pass ---- */

/* y f32 or bf16 [T, O] = x [T, I] . w[O, I]^T (x rows ldx apart, y rows ldy apart). */
static int pf_lin(ginfer *g, const gpu_bf16 *x, int ldx, const void *w, void *y, int ldy, int T,
                  int I, int O, int yf32, dsv3_err *e)
{
    return gpu_gemm(g->pf->c, 0, 1, T, O, I, 1.0f, x, ldx, (const gpu_bf16 *)w, I, 0.0f, y, ldy,
                    yf32, e);
}

static int pf_bf(ginfer *g, gpu_bf16 *dst, const float *src, size_t n, dsv3_err *e)
{
    return gpu_f32_to_bf16(g->pf->c, dst, src, (int64_t)n, e);
}

/* out f32 [T, H] = the MLP (w1 [2F, H], w2 [H, F]) of xb. */
static int pf_mlp(ginfer *g, pfbuf *b, const void *w1, const void *w2, int F, float *out, int T,
                  dsv3_err *e)
{
    if (pf_lin(g, b->xb, g->H, w1, b->hb, 2 * F, T, g->H, 2 * F, 0, e))
        return -1;
    pf_swiglu_k<<<pf_blocks((long)T * F), 256, 0, g->pf->s>>>((bf16 *)b->ab, (const bf16 *)b->hb,
                                                            T, F);
    LAUNCH_CHECK("prefill swiglu", e);
    return pf_lin(g, b->ab, F, w2, out, g->H, T, F, g->H, 1, e);
}

/* MLA of layer l over the T rows of slot sl: xn (xb) in, delta out, cache rows written. */
static int pf_mla(ginfer *g, pfbuf *b, int l, int sl, int T, dsv3_err *e)
{
    const glayer *y = &g->ly[l];
    int H = g->H, nh = g->nh, qk = g->qk, kv = g->kv, W = g->W, nope = g->nope, dv = g->dv;
    cudaStream_t s = g->pf->s;
    void *cache = (char *)g->cache + (size_t)l * (g->n_slots + 1) * g->n_ctx * W * g->wsz;
    const float *kva = b->qa;
    int ldkva = W;
    if (g->qr) {
        int A = g->qr + W;  /* q_a's and kv_a's rows are one weight */
        if (pf_lin(g, b->xb, H, y->q_a, b->qa, A, T, H, A, 1, e) ||
            gk_add_norm(s, b->qa, A, NULL, NULL, y->q_a_norm, b->qan, T, g->qr, 1e-6f, e) ||
            pf_bf(g, b->qanb, b->qan, (size_t)T * g->qr, e) ||
            pf_lin(g, b->qanb, g->qr, y->q_b, b->q, nh * qk, T, g->qr, nh * qk, 1, e))
            return -1;
        kva = b->qa + g->qr;
        ldkva = A;
    } else if (pf_lin(g, b->xb, H, y->q, b->q, nh * qk, T, H, nh * qk, 1, e) ||
               pf_lin(g, b->xb, H, y->kv_a, b->qa, W, T, H, W, 1, e)) {
        return -1;
    }
    /* the cache rows as the decode path writes them; q_pe rotated in place */
    if (gk_kv_write(s, kva, ldkva, y->kv_a_norm, cache, 0, b->slot, b->pos, T, kv, g->rope,
                    g->n_ctx, g->cos_t, g->sin_t, g->interleave, 1e-6f, b->q, nh, qk, nope, e))
        return -1;
    /* k_nope and v of every head from the cached (bf16) latent rows */
    const gpu_bf16 *cl = (const gpu_bf16 *)cache + (size_t)sl * g->n_ctx * W;
    if (gpu_gemm(g->pf->c, 0, 1, T, nh * (nope + dv), kv, 1.0f, cl, W, (const gpu_bf16 *)y->kvb,
                 kv, 0.0f, b->kvo, nh * (nope + dv), 0, e) ||
        pf_bf(g, b->qb, b->q, (size_t)T * nh * qk, e))
        return -1;
    pf_kv_k<<<pf_blocks((long)T * nh * (qk + dv)), 256, 0, s>>>(
        (bf16 *)b->kb, (bf16 *)b->vb, (const bf16 *)b->kvo, (const bf16 *)cl, T, nh, nope,
        g->rope, dv, kv, W);
    LAUNCH_CHECK("prefill k/v", e);
    return gpu_attention_fwd(g->pf->c, b->ob, b->lse, b->qb, b->kb, b->vb, 1, T, nh, qk, dv,
                             g->scale, e) ||
                   pf_lin(g, b->ob, nh * dv, y->o, b->delta, H, T, nh * dv, H, 1, e)
               ? -1
               : 0;
}

/* The MLP or MoE of layer l: xn (xb) in, dd out. */
static int pf_ffn(ginfer *g, pfbuf *b, int l, int T, dsv3_err *e)
{
    const glayer *y = &g->ly[l];
    if (!y->moe)
        return pf_mlp(g, b, y->w1, y->w2, y->F, b->dd, T, e);
    gpu_ctx *c = g->pf->c;
    int H = g->H, E = g->E, K = g->K, mi = g->mi;
    /* the router as the GEMV path computes it (each logit summed in an order independent of
     * the other rows): the same expert choices for the same rows. Its GEMV spreads over
     * outputs only, so the rows go as a batch of 8-row pieces (and the rest) to fill the GPU */
    int nb = T / 8, rest = T - 8 * nb;
    if (gk_gemv(g->pf->s, b->xn, H, 8L * H, y->router, 1, 0, b->rl, E, 8L * E, 8, H, E, nb, e) ||
        gk_gemv(g->pf->s, b->xn + (size_t)8 * nb * H, H, 0, y->router, 1, 0,
                b->rl + (size_t)8 * nb * E, E, 0, rest, H, E, 1, e) ||
        gpu_router_fwd(c, b->idx, b->rw, b->rs, b->rl, y->bias, T, E, g->n_group, g->topk_group,
                       K, g->norm_topk, g->route_scale, e))
        return -1;
    if (y->F && pf_mlp(g, b, y->w1, y->w2, y->F, b->ys, T, e))
        return -1;
    size_t mark = gpu_arena_mark(c);
    gpu_moe_plan p;
    int rc = gpu_moe_plan_make(c, &p, b->idx, T, K, E, e) ||
             gpu_moe_gather(c, &p, b->xp, b->xb, H, e) ||
             gpu_moe_linear_fwd(c, &p, b->hp, b->xp, (const gpu_bf16 *)y->ew1, H, 2 * mi, e);
    if (!rc) {
        pf_swiglu_k<<<pf_blocks((long)T * K * mi), 256, 0, g->pf->s>>>(
            (bf16 *)b->ap, (const bf16 *)b->hp, (long)T * K, mi);
        rc = cudaGetLastError() != cudaSuccess
                 ? err_set(e, "ginfer: prefill swiglu launch failed")
                 : gpu_moe_linear_fwd(c, &p, b->yp, b->ap, (const gpu_bf16 *)y->ew2, mi, H, e);
    }
    if (!rc) {
        pf_combine_k<<<pf_blocks((long)T * H), 256, 0, g->pf->s>>>(
            b->dd, (const bf16 *)b->yp, b->rw, p.pos, y->F ? b->ys : NULL, T, K, H);
        if (cudaGetLastError() != cudaSuccess)
            rc = err_set(e, "ginfer: prefill combine launch failed");
    }
    gpu_moe_plan_free(&p);
    gpu_arena_reset(c, mark);
    return rc ? -1 : 0;
}

/* Whether the engine has the pass: asked for, bf16, no MTP, head dims the attention takes. */
static int pf_on(const ginfer *g)
{
    return g->pf_min && !g->exact && !g->mtp && g->qk <= 192 && g->dv <= 128;
}

/* Whether the call's n rows are a prompt the pass takes (see the header). */
static int pf_takes(const ginfer *g, int n, const int *slot, const int *pos)
{
    if (!pf_on(g) || n < g->pf_min || n > g->n_ctx)
        return 0;
    for (int r = 0; r < n; r++)
        if (slot[r] != slot[0] || pos[r] != r)
            return 0;
    return 1;
}

/* The prompt's n rows through the layers in one pass; the wanted rows' logits to logits. */
static int pf_forward(ginfer *g, int n, const int *slot, const int32_t *ids,
                      const uint8_t *want, float *logits, dsv3_err *e)
{
    if (gpu_sync(g->c, e) || pf_ready(g, n, e))
        return -1;
    gpu_ctx *c = g->pf->c;
    cudaStream_t s = g->pf->s;
    gpu_arena_reset(c, 0);
    pfbuf b;
    memset(&b, 0, sizeof b);
    int *h = (int *)malloc((size_t)3 * n * sizeof *h);
    if (!h)
        return err_set(e, "ginfer: out of host memory");
    for (int r = 0; r < n; r++) {
        h[r] = ids[r];
        h[n + r] = slot[0];
        h[2 * n + r] = r;
    }
    int rc = !pf_carve(g, c, &b, n, e) || gpu_upload(c, b.ids, h, (size_t)n * 4, e) ||
             gpu_upload(c, b.slot, h + n, (size_t)n * 4, e) ||
             gpu_upload(c, b.pos, h + 2 * n, (size_t)n * 4, e) ||
             gk_embed(s, b.x, g->embed, 0, b.ids, n, g->H, e);
    free(h);
    for (int l = 0; l < g->L && !rc; l++)
        rc = gk_add_norm(s, b.x, g->H, l ? b.dd : NULL, NULL, g->ly[l].in_norm, b.xn, n, g->H,
                         g->eps, e) ||
             pf_bf(g, b.xb, b.xn, (size_t)n * g->H, e) || pf_mla(g, &b, l, slot[0], n, e) ||
             gk_add_norm(s, b.x, g->H, b.delta, NULL, g->ly[l].post_norm, b.xn, n, g->H, g->eps,
                         e) ||
             pf_bf(g, b.xb, b.xn, (size_t)n * g->H, e) || pf_ffn(g, &b, l, n, e);
    rc = rc ||
         gk_add_norm(s, b.x, g->H, g->L ? b.dd : NULL, NULL, g->fnorm, b.xn, n, g->H, g->eps,
                     e) ||
         gpu_sync(c, e);
    if (rc)
        return -1;
    g->pf->passes++;
    /* the head as the GEMV path's, over this pass's final-normed rows */
    float *keep = g->xn;
    int wrote;
    g->xn = b.xn;
    rc = head_rows(g, n, want, logits, &wrote, e);
    g->xn = keep;
    return rc;
}

/* At creation (as the decode graphs are run once there): the pass's context with an arena
 * for prompts of up to 2048 rows (a longer one remakes it), and one pass of pf_min rows on
 * the spare slot, so that a prompt's timing holds no set-up (cuBLAS handle, first launches). */
static int pf_warm(ginfer *g, dsv3_err *e)
{
    if (!pf_on(g))
        return 0;
    int n = g->pf_min < g->n_ctx ? g->pf_min : g->n_ctx;
    int *slot = (int *)malloc((size_t)n * sizeof *slot);
    int32_t *ids = (int32_t *)calloc((size_t)n, sizeof *ids);
    uint8_t *want = (uint8_t *)calloc((size_t)n, 1);
    int rc = !slot || !ids || !want ? err_set(e, "ginfer: out of host memory") : 0;
    for (int r = 0; !rc && r < n; r++)
        slot[r] = g->n_slots;
    rc = rc || pf_ready(g, g->n_ctx < 2048 ? g->n_ctx : 2048, e) ||
         pf_forward(g, n, slot, ids, want, NULL, e);
    if (!rc)
        g->pf->passes = 0;
    free(slot);
    free(ids);
    free(want);
    return rc;
}

extern "C" long ginfer_prefill_passes(const ginfer *g) { return g->pf ? g->pf->passes : 0; }

extern "C" int ginfer_read_cache(ginfer *g, int layer, int slot, int pos0, int n, float *out,
                                 dsv3_err *e)
{
    if (idle(g, e))
        return -1;
    if (layer < 0 || layer >= g->L || slot < 0 || slot >= g->n_slots || pos0 < 0 || n < 0 ||
        pos0 + n > g->n_ctx)
        return err_set(e, "ginfer: no cache rows %d..%d of layer %d, slot %d", pos0, pos0 + n,
                       layer, slot);
    size_t row = (((size_t)layer * (g->n_slots + 1) + slot) * g->n_ctx + pos0) * g->W;
    size_t cnt = (size_t)n * g->W;
    if (g->exact)
        return gpu_download(g->c, out, (const float *)g->cache + row, cnt * 4, e);
    uint16_t *t = (uint16_t *)malloc(cnt * 2 + 2);
    if (!t)
        return err_set(e, "ginfer: out of host memory");
    int rc = gpu_download(g->c, t, (const uint16_t *)g->cache + row, cnt * 2, e);
    for (size_t i = 0; !rc && i < cnt; i++)
        out[i] = gpu_bf2f(t[i]);
    free(t);
    return rc;
}
