/* fp8lin: bf16-or-FP8 linear products, with the quantisations kept where they can be reused.
 * See fp8lin.h. */
#include <stdlib.h>

#include "fp8gemm.h"
#include "fp8lin.h"
#include "gemm.h"
#include "gpuctx_internal.cuh"
#include "layers.h"
#include "scratch.cuh"

/* One weight's quantisations: w 128x128 both layouts (valid for generation wdone), and the
 * last forward input x 1x128 both layouts (valid for pass xdone). */
struct gpu_lin_ent {
    const gpu_bf16 *w;
    int O, I;
    uint8_t *wbuf, *wq, *wtq;
    float *ws, *wts;
    unsigned wdone;
    uint8_t *xbuf;
    size_t xcap;
    const gpu_bf16 *x;
    int N;
    uint8_t *xq, *xtq;
    float *xs, *xts;
    unsigned xdone;
};

/* Both layouts of an activation [rows x K] 1x128-quantised (carve_act2), alignment included. */
static size_t act2_bytes(int64_t rows, int64_t K)
{
    return (size_t)(2 * rows * K + (fp8_blocks(K) * rows + fp8_blocks(rows) * K) * 4 + 4 * 256);
}

/* Both layouts of an activation [rows x K]: q [rows x K] with s, qt [K x rows] with st. */
typedef struct act2 {
    uint8_t *q, *qt;
    float *s, *st;
} act2;

static int carve_act2(carver *k, act2 *a, int64_t rows, int64_t K)
{
    a->q = (uint8_t *)carve(k, (size_t)(rows * K));
    a->s = (float *)carve(k, (size_t)(fp8_blocks(K) * rows * 4));
    a->qt = (uint8_t *)carve(k, (size_t)(rows * K));
    a->st = (float *)carve(k, (size_t)(fp8_blocks(rows) * K * 4));
    return a->st ? 0 : -1;
}

extern "C" int gpu_lin_fp8_on(gpu_lin *L, int64_t max_tokens, int64_t max_dim, dsv3_err *e)
{
    /* dy in both layouts, and a transposed input quantised afresh (a subset of both) */
    if (scratch_room(&L->buf, &L->bytes, 2 * act2_bytes(max_tokens, max_dim),
                     "fp8 linear scratch", e))
        return -1;
    L->fp8 = 1;
    gpu_lin_weights_changed(L);
    gpu_lin_new_pass(L, 1);
    return 0;
}

extern "C" void gpu_lin_free(gpu_lin *L)
{
    for (int i = 0; i < L->n_ent; i++) {
        gpu_free(L->ent[i].wbuf);
        gpu_free(L->ent[i].xbuf);
    }
    free(L->ent);
    L->ent = NULL;
    L->n_ent = L->cap_ent = 0;
    gpu_free(L->buf);
    L->buf = NULL;
    L->bytes = 0;
    L->fp8 = 0;
}

extern "C" void gpu_lin_weights_changed(gpu_lin *L)
{
    L->wgen = next_gen(L->wgen);
}

extern "C" void gpu_lin_new_pass(gpu_lin *L, int backward)
{
    L->pass = next_gen(L->pass);
    L->keep_inputs = backward;
    L->last_dy = NULL;
}

static int use_fp8(const gpu_lin *L, int N, int I, int O)
{
    return L->fp8 && N % 16 == 0 && I % 16 == 0 && O % 16 == 0 && (I < O ? I : O) >= L->min_dim;
}

static int no_room(dsv3_err *e, int N, int I, int O)
{
    return err_set(e, "fp8 linear: N=%d I=%d O=%d does not fit the scratch sized at "
                   "gpu_lin_fp8_on", N, I, O);
}

/* The entry of weight w [O x I], made on first use. */
static gpu_lin_ent *entry(gpu_lin *L, const gpu_bf16 *w, int O, int I, dsv3_err *e)
{
    for (int i = 0; i < L->n_ent; i++)
        if (L->ent[i].w == w && L->ent[i].O == O && L->ent[i].I == I)
            return &L->ent[i];
    if (!grow_for(&L->ent, L->n_ent, &L->cap_ent, 64)) {
        err_set(e, "fp8 linear: out of memory");
        return NULL;
    }
    gpu_lin_ent *t = &L->ent[L->n_ent];
    memset(t, 0, sizeof *t);
    t->w = w, t->O = O, t->I = I;
    size_t bytes = 2 * ((size_t)O * I + 256) + 2 * (size_t)(fp8_blocks(O) * gpu_fp8_ld(I) +
                                                            fp8_blocks(I) * gpu_fp8_ld(O)) * 4 + 1024;
    if (!(t->wbuf = (uint8_t *)gpu_malloc(bytes, e))) {
        err_prefix(e, "fp8 weight codes");
        return NULL;
    }
    carver k = {t->wbuf, 0, bytes};
    t->wq = (uint8_t *)carve(&k, (size_t)O * I);
    t->wtq = (uint8_t *)carve(&k, (size_t)O * I);
    t->ws = (float *)carve(&k, (size_t)(fp8_blocks(O) * gpu_fp8_ld(I) * 4));
    t->wts = (float *)carve(&k, (size_t)(fp8_blocks(I) * gpu_fp8_ld(O) * 4));
    L->n_ent++;
    return t;
}

/* The entry of w with its codes of the current generation. */
static gpu_lin_ent *weight(gpu_lin *L, const gpu_bf16 *w, int O, int I, dsv3_err *e)
{
    gpu_lin_ent *t = entry(L, w, O, I, e);
    if (!t)
        return NULL;
    if (t->wdone != L->wgen) {
        if (gpu_fp8_quant_weight_bf16(L->c, t->wq, t->ws, t->wtq, t->wts, w, O, I, e))
            return NULL;
        t->wdone = L->wgen;
    }
    return t;
}

/* Room in t for an input of N rows, both layouts. */
static int input_room(gpu_lin_ent *t, int N, dsv3_err *e)
{
    if (scratch_room(&t->xbuf, &t->xcap, act2_bytes(N, t->I), "fp8 input codes", e))
        return -1;
    carver k = {t->xbuf, 0, t->xcap};
    act2 a;
    if (carve_act2(&k, &a, N, t->I))
        return err_set(e, "fp8 input codes: %d x %d do not fit", N, t->I); /* cannot happen */
    t->xq = a.q, t->xs = a.s, t->xtq = a.qt, t->xts = a.st;
    return 0;
}

extern "C" int gpu_lin_fwd(gpu_lin *L, gpu_bf16 *out, const gpu_bf16 *in, const gpu_bf16 *w,
                           int N, int I, int O, float beta, dsv3_err *e)
{
    if (!use_fp8(L, N, I, O))
        return gpu_linear_fwd(L->c, out, in, w, N, I, O, beta, e);
    L->last_dy = NULL;
    gpu_lin_ent *t = weight(L, w, O, I, e);
    if (!t)
        return -1;
    if (L->keep_inputs) { /* both layouts, kept for wgrad */
        if (input_room(t, N, e) ||
            gpu_fp8_quant_act_both(L->c, t->xq, t->xs, t->xtq, t->xts, in, N, I, e))
            return -1;
        t->x = in, t->N = N, t->xdone = L->pass;
        return gpu_fp8_linear_fwd(L->c, out, t->xq, t->xs, t->wq, t->ws, N, I, O, beta, e);
    }
    carver k = {L->buf, 0, L->bytes};
    uint8_t *xq = (uint8_t *)carve(&k, (size_t)N * I);
    float *xs = (float *)carve(&k, fp8_blocks(I) * N * 4);
    if (!xs)
        return no_room(e, N, I, O);
    return gpu_fp8_quant_act(L->c, xq, xs, in, N, I, e) ||
           gpu_fp8_linear_fwd(L->c, out, xq, xs, t->wq, t->ws, N, I, O, beta, e);
}

extern "C" int gpu_lin_swiglu_fwd(gpu_lin *L, gpu_bf16 *out, gpu_bf16 *h, const gpu_bf16 *g,
                                  const gpu_bf16 *u, int ld, const gpu_bf16 *w, int N, int I,
                                  int O, float beta, dsv3_err *e)
{
    if (!use_fp8(L, N, I, O) || !L->keep_inputs)
        return gpu_swiglu_fwd(L->c, h, g, u, N, I, ld, e) ||
               gpu_lin_fwd(L, out, h, w, N, I, O, beta, e);
    L->last_dy = NULL;
    gpu_lin_ent *t = weight(L, w, O, I, e);
    if (!t || input_room(t, N, e) ||
        gpu_fp8_swiglu_quant(L->c, h, t->xq, t->xs, t->xtq, t->xts, g, u, N, I, ld, e))
        return -1;
    t->x = h, t->N = N, t->xdone = L->pass;
    return gpu_fp8_linear_fwd(L->c, out, t->xq, t->xs, t->wq, t->ws, N, I, O, beta, e);
}

extern "C" int gpu_lin_dgrad(gpu_lin *L, gpu_bf16 *d_in, const gpu_bf16 *d_out,
                             const gpu_bf16 *w, int N, int I, int O, float beta, dsv3_err *e)
{
    if (!use_fp8(L, N, I, O))
        return gpu_linear_dgrad(L->c, d_in, d_out, w, N, I, O, beta, e);
    L->last_dy = NULL;
    gpu_lin_ent *t = weight(L, w, O, I, e);
    if (!t)
        return -1;
    carver k = {L->buf, 0, L->bytes};
    act2 dy;
    if (carve_act2(&k, &dy, N, O))
        return no_room(e, N, I, O);
    if (gpu_fp8_quant_act_both(L->c, dy.q, dy.s, dy.qt, dy.st, d_out, N, O, e) ||
        gpu_fp8_linear_dgrad(L->c, d_in, dy.q, dy.s, t->wtq, t->wts, N, I, O, beta, e))
        return -1;
    L->last_dy = d_out, L->last_rows = N, L->last_cols = O, L->last_ent = (int)(t - L->ent);
    return 0;
}

extern "C" int gpu_lin_wgrad(gpu_lin *L, float *d_w, const gpu_bf16 *d_out, const gpu_bf16 *in,
                             int N, int I, int O, float beta, dsv3_err *e)
{
    if (!use_fp8(L, N, I, O))
        return gpu_linear_wgrad(L->c, d_w, d_out, in, N, I, O, beta, e);
    int dy_kept = L->last_dy == d_out && L->last_rows == N && L->last_cols == O;
    L->last_dy = NULL;
    carver k = {L->buf, 0, L->bytes};
    act2 dy;
    int fail = carve_act2(&k, &dy, N, O);
    uint8_t *xtq = (uint8_t *)carve(&k, (size_t)N * I);
    float *xts = (float *)carve(&k, (size_t)(fp8_blocks(N) * I * 4));
    if (fail || !xts)
        return no_room(e, N, I, O);
    if (!dy_kept && gpu_fp8_quant_act_t(L->c, dy.qt, dy.st, d_out, N, O, e))
        return -1;
    /* the weight is the one of the dgrad just before, whose forward kept its input */
    const gpu_lin_ent *t = dy_kept ? &L->ent[L->last_ent] : NULL;
    if (t && t->x == in && t->N == N && t->I == I && t->xdone == L->pass)
        xtq = t->xtq, xts = t->xts;
    else if (gpu_fp8_quant_act_t(L->c, xtq, xts, in, N, I, e))
        return -1;
    return gpu_fp8_linear_wgrad(L->c, d_w, dy.qt, dy.st, xtq, xts, N, I, O, beta, e);
}
