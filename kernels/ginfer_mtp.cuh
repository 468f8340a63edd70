/* ginfer_mtp.cuh: the MTP module on the GPU engine (ginfer_mtp.h says what it computes).
 * Not a header of its own: ginfer.cu includes it at its end, so the module's block runs
 * through the engine's own layer functions (mla, ffn, add_norm: the main layers' kernels and
 * fusions) over its layer ly[L] and cache layer L, and its loading through up_layer. */
#include "ginfer_mtp.h"

/* The module's tensors besides its block (ly[L]), and the stream's buffers. */
struct gmtp {
    float *enorm, *hnorm, *head_norm;  /* [H] each */
    void *eh;                          /* eh_proj [H, 2H], compute dtype */
    float *hid;                        /* [n_slots][n_ctx][H]: the main model's hidden states */
    float *cat;                        /* [rmax][2H]: a pass's normed embedding | hidden */
};

static int decode_rows(const ginfer *g)
{
    return g->n_slots * (g->mtp ? 2 : 1);
}

/* Whether the config and the weights have MTP module 1 (its eh_proj stands for the rest). */
static int mtp_present(const dsv3_config *c, const dsv3_model *m, const hfdir *h)
{
    char nm[96];
    snprintf(nm, sizeof nm, "model.layers.%d.eh_proj.weight", c->num_hidden_layers);
    if (c->num_nextn_predict_layers < 1)
        return 0;
    return m ? m->w.mtp && model_find(m, nm) : hfdir_find(h, nm, NULL) != NULL;
}

/* The module's weights (block as layer L, as lib/model numbers it: MoE or not by index L),
 * the hidden-state store and the input buffer. Called by create before the graphs exist. */
static int mtp_setup(ginfer *g, const wsrc *src, const dsv3_config *c, dsv3_err *e)
{
    int L = g->L, H = g->H;
    gmtp *t = (gmtp *)calloc(1, sizeof *t);
    if (!t)
        return err_set(e, "ginfer: out of host memory");
    g->mtp = t;
    char nm[3][96];
    snprintf(nm[0], sizeof nm[0], "model.layers.%d.enorm.weight", L);
    snprintf(nm[1], sizeof nm[1], "model.layers.%d.hnorm.weight", L);
    snprintf(nm[2], sizeof nm[2], "model.layers.%d.shared_head.norm.weight", L);
    char eh[96];
    snprintf(eh, sizeof eh, "model.layers.%d.eh_proj.weight", L);
    if (!(t->enorm = (float *)get(g, src, nm[0], H, 4, e)) ||
        !(t->hnorm = (float *)get(g, src, nm[1], H, 4, e)) ||
        !(t->head_norm = (float *)get(g, src, nm[2], H, 4, e)) ||
        !(t->eh = get(g, src, eh, (size_t)2 * H * H, g->wsz, e)) ||
        up_layer(g, src, c, L, &g->ly[L], e))
        return -1;
    size_t hid = (size_t)g->n_slots * g->n_ctx * H * 4;
    if (!(t->hid = (float *)dal(g, hid, e)))
        return err_set(e, "ginfer: no device memory for the MTP module's %d x %d hidden states "
                       "(%.1f MiB; lower --ctx)", g->n_slots, g->n_ctx, hid / 1048576.0);
    if (!(t->cat = (float *)dal(g, (size_t)g->rmax * 2 * H * 4, e)))
        return -1;
    return 0;
}

/* hid[slot[n]][pos[n]] = x[n] for the rows of real slots (padding rows: slot n_slots). */
__global__ void mtp_keep_k(int m, float *hid, const float *x, const int *slot, const int *pos,
                           int N, int H, int n_slots, int n_ctx)
{
    gk_pdl_enter(m);  /* launched as ginfer_k's kernels (PDL: ginfer_k.cuh) */
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= (long)N * H)
        return;
    int n = (int)(i / H), s = slot[n];
    if (s >= 0 && s < n_slots)
        hid[((long)s * n_ctx + pos[n]) * H + i % H] = x[i];
}

/* The end of a main pass (layers): each row's hidden state (x, before the final norm) kept
 * for the stream. Nothing without the module. */
static int mtp_keep(ginfer *g, int n, dsv3_err *e)
{
    if (!g->mtp || n <= 0)
        return 0;
    const int *slot = g->d_in + g->rmax, *pos = g->d_in + 2 * g->rmax;
    unsigned blocks = (unsigned)(((long)n * g->H + 255) / 256);
    gk_launch(mtp_keep_k, blocks, 256, 0, g->s, g->mtp->hid, (const float *)g->x, slot, pos, n,
              g->H, g->n_slots, g->n_ctx);
    LAUNCH_CHECK("mtp keep", e);
    mark(g, "mtp keep hidden", 0);
    return 0;
}

/* The sum of v over the block (blockDim a multiple of 32), in every thread. */
__device__ float mtp_block_sum(float v, float *red)
{
    for (int o = 16; o; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    int w = threadIdx.x / 32, l = threadIdx.x % 32, nw = blockDim.x / 32;
    __syncthreads();  /* red may still be read by an earlier call */
    if (!l)
        red[w] = v;
    __syncthreads();
    v = l < nw ? red[l] : 0.0f;
    for (int o = 16; o; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* One block a row: cat[n] = [enorm * rms(embed[ids[n]]) ; hnorm * rms(hid[slot[n]][pos[n]])]
 * (lib/ops rmsnorm_forward's w * (x * r)). */
template <typename W>
__global__ void mtp_in_k(int m, float *cat, const W *table, const int32_t *ids, const float *hid,
                         const int *slot, const int *pos, int n_ctx, int H, const float *enorm,
                         const float *hnorm, float eps)
{
    gk_pdl_enter(m);
    __shared__ float red[32];
    int n = blockIdx.x;
    const W *er = table + (long)ids[n] * H;
    const float *hr = hid + ((long)slot[n] * n_ctx + pos[n]) * H;
    float *o = cat + (long)n * 2 * H;
    float se = 0, sh = 0;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        float a = (float)er[i], b = hr[i];
        se += a * a;
        sh += b * b;
    }
    se = mtp_block_sum(se, red);
    sh = mtp_block_sum(sh, red);
    float re = rsqrtf(se / H + eps), rh = rsqrtf(sh / H + eps);
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        o[i] = enorm[i] * ((float)er[i] * re);
        o[H + i] = hnorm[i] * (hr[i] * rh);
    }
}

/* The head over k rows of x (H apart): their logits to logits or, logits NULL, their greedy
 * ids to out. */
static int mtp_out(ginfer *g, const float *x, int k, float *logits, int32_t *out, dsv3_err *e)
{
    if (gk_gemv(g->s, x, g->H, 0, g->head, g->exact, 0, g->logits, g->V, 0, k, g->H, g->V, 1,
                e))
        return -1;
    if (logits)
        return gpu_download(g->c, logits, g->logits, (size_t)k * g->V * 4, e);
    return gk_argmax(g->s, g->logits, k, g->V, g->ban, g->argscr, g->bucket_max, g->tok, NULL, e) ||
                   gpu_download(g->c, out, g->tok, (size_t)k * 4, e)
               ? -1
               : 0;
}

/* The head over the wanted rows of the pass just queued (rows of g->xn), as head_rows does:
 * gathered, at most bucket_max rows a head GEMV; when every row of a decode-sized pass is
 * wanted (a draft of one row a slot), straight from g->xn. */
static int mtp_head(ginfer *g, int n, const uint8_t *want, float *logits, int32_t *out,
                    int *written, dsv3_err *e)
{
    int k = 0, all = n <= g->bucket_max;
    for (int r = 0; r < n && want && all; r++)
        all = want[r] != 0;
    *written = all ? n : 0;
    if (all)
        return mtp_out(g, g->xn, n, logits, out, e);
    for (int r = 0; r <= n; r++) {
        if (r < n && want && !want[r])
            continue;
        if (r < n)
            g->h_in[k++] = r;
        if (k == g->bucket_max || (r == n && k)) {
            if (gpu_upload(g->c, g->d_rows, g->h_in, (size_t)k * sizeof(int), e) ||
                gk_gather_rows(g->s, g->xl, g->xn, g->d_rows, k, g->H, e) ||
                mtp_out(g, g->xl, k, logits ? logits + (size_t)*written * g->V : NULL,
                        logits ? NULL : out + *written, e))
                return -1;
            *written += k;
            k = 0;
        }
    }
    return 0;
}

/* One pass of the stream over cn rows (uploaded to d_in: next ids, slots, positions): the
 * module's input, its block over cache layer L, its head norm; g->xn ends as the normed
 * outputs. The block runs as a main layer does in layers(). */
static int mtp_pass(ginfer *g, int cn, int nsplit, dsv3_err *e)
{
    const gmtp *t = g->mtp;
    int L = g->L, H = g->H;
    const glayer *y = &g->ly[L];
    const int32_t *ids = g->d_in;
    const int *slot = g->d_in + g->rmax, *pos = g->d_in + 2 * g->rmax;
    if (g->exact)
        gk_launch(mtp_in_k<float>, cn, 256, 0, g->s, t->cat, (const float *)g->embed, ids,
                  (const float *)t->hid, slot, pos, g->n_ctx, H, (const float *)t->enorm,
                  (const float *)t->hnorm, g->eps);
    else
        gk_launch(mtp_in_k<bf16>, cn, 256, 0, g->s, t->cat, (const bf16 *)g->embed, ids,
                  (const float *)t->hid, slot, pos, g->n_ctx, H, (const float *)t->enorm,
                  (const float *)t->hnorm, g->eps);
    LAUNCH_CHECK("mtp input", e);
    if (gk_gemv(g->s, t->cat, 2 * H, 0, t->eh, g->exact, 0, g->x, H, 0, cn, 2 * H, H, 1, e))
        return -1;
    g->pend = 0;
    g->fin = g->fz_norm && gk_gemv_norm_fits(cn, H);
    return (!g->fin && add_norm(g, cn, NULL, y->in_norm, "norm in (+moe sum)", e)) ||
           mla(g, L, cn, nsplit, e) ||
           add_norm(g, cn, g->delta, y->post_norm, g->fin ? "norm post (+moe sum)" : "norm post",
                    e) ||
           ffn(g, L, cn, e) || add_norm(g, cn, NULL, t->head_norm, "norm in (+moe sum)", e)
               ? -1
               : 0;
}

extern "C" int ginfer_mtp_forward(ginfer *g, int n, const int *slot, const int *pos,
                                  const int32_t *next, const uint8_t *want, float *logits,
                                  int32_t *out, dsv3_err *e)
{
    if (!g->mtp)
        return err_set(e, "ginfer: the engine was made without the MTP module");
    if (n <= 0 || idle(g, e))
        return n <= 0 ? 0 : -1;
    /* a decode-sized call in one pass with the decode steps' attention split; longer ones
     * (the first draft after a prompt) in prefill-sized chunks, a slot's rows in order */
    int one = n <= g->bucket_max, chunk = one ? n : PCHUNK, done = 0;
    for (int r0 = 0; r0 < n; r0 += chunk) {
        int cn = n - r0 < chunk ? n - r0 : chunk, wrote;
        if (upload_rows(g, r0, cn, cn, slot, pos, next, e) ||
            mtp_pass(g, cn, one ? g->nsplit : 1, e) ||
            mtp_head(g, cn, want ? want + r0 : NULL, logits ? logits + (size_t)done * g->V : NULL,
                     logits ? NULL : out + done, &wrote, e))
            return -1;
        done += wrote;
    }
    return 0;
}

extern "C" int ginfer_create_mtp(ginfer **out, const dsv3_model *m, const char *dir, int n_ctx,
                                 int n_slots, int dev, int exact, dsv3_err *e)
{
    static const char none[] = "the model has no MTP module (num_nextn_predict_layers is 0, "
                               "or the checkpoint holds no MTP tensors)";
    *out = NULL;
    if (m) {
        if (!mtp_present(&m->cfg, m, NULL))
            return err_set(e, "%s", none);
        wsrc src = {m, NULL, 1};
        return create(out, &src, &m->cfg, n_ctx, n_slots, dev, exact, e);
    }
    hfdir h;
    if (hfdir_open(&h, dir, e))
        return -1;
    wsrc src = {NULL, &h, 1};
    int rc = mtp_present(&h.cfg, NULL, &h)
                 ? create(out, &src, &h.cfg, n_ctx, n_slots, dev, exact, e)
                 : err_set(e, "%s", none);
    hfdir_close(&h);
    return rc;
}

extern "C" int ginfer_has_mtp(const ginfer *g) { return g->mtp != NULL; }
extern "C" int ginfer_decode_rows(const ginfer *g) { return decode_rows(g); }
