/* fp8lin: bf16-or-FP8 linear products. See fp8lin.h. */
#include "fp8gemm.h"
#include "fp8lin.h"
#include "gemm.h"
#include "gpuctx_internal.cuh"

/* Carves aligned pieces off the scratch buffer. */
typedef struct carver {
    uint8_t *base;
    size_t used, cap;
} carver;

static void *carve(carver *k, size_t bytes)
{
    size_t at = (k->used + 255) / 256 * 256;
    k->used = at + bytes;
    return k->used <= k->cap ? k->base + at : NULL;
}

/* An activation [rows x K] 1x128-quantised along K: codes and scales [Kb x rows]. */
static size_t act_bytes(int64_t rows, int64_t K)
{
    return (size_t)(rows * K + 256 + fp8_blocks(K) * rows * 4 + 256);
}

static size_t weight_bytes(int64_t rows, int64_t K)
{
    return (size_t)(rows * K + 256 + fp8_blocks(rows) * gpu_fp8_ld(K) * 4 + 256);
}

extern "C" int gpu_lin_fp8_on(gpu_lin *L, int64_t max_tokens, int64_t max_dim, dsv3_err *e)
{
    size_t need = 2 * act_bytes(max_tokens, max_dim) + weight_bytes(max_dim, max_dim) + 4096;
    if (L->bytes < need) {
        gpu_free(L->buf);
        L->bytes = 0;
        if (!(L->buf = (uint8_t *)gpu_malloc(need, e)))
            return err_prefix(e, "fp8 linear scratch");
        L->bytes = need;
    }
    L->fp8 = 1;
    return 0;
}

extern "C" void gpu_lin_free(gpu_lin *L)
{
    gpu_free(L->buf);
    L->buf = NULL;
    L->bytes = 0;
    L->fp8 = 0;
}

static int use_fp8(const gpu_lin *L, int N, int I, int O)
{
    return L->fp8 && N % 16 == 0 && I % 16 == 0 && O % 16 == 0;
}

static int no_room(dsv3_err *e, int N, int I, int O)
{
    return err_set(e, "fp8 linear: N=%d I=%d O=%d does not fit the scratch sized at "
                   "gpu_lin_fp8_on", N, I, O);
}

extern "C" int gpu_lin_fwd(gpu_lin *L, gpu_bf16 *out, const gpu_bf16 *in, const gpu_bf16 *w,
                           int N, int I, int O, float beta, dsv3_err *e)
{
    if (!use_fp8(L, N, I, O))
        return gpu_linear_fwd(L->c, out, in, w, N, I, O, beta, e);
    carver k = {L->buf, 0, L->bytes};
    uint8_t *xq = (uint8_t *)carve(&k, (size_t)N * I), *wq = (uint8_t *)carve(&k, (size_t)O * I);
    float *xs = (float *)carve(&k, fp8_blocks(I) * N * 4);
    float *ws = (float *)carve(&k, fp8_blocks(O) * gpu_fp8_ld(I) * 4);
    if (!ws)
        return no_room(e, N, I, O);
    return gpu_fp8_quant_act(L->c, xq, xs, in, N, I, e) ||
           gpu_fp8_quant_weight_bf16(L->c, wq, ws, NULL, NULL, w, O, I, e) ||
           gpu_fp8_linear_fwd(L->c, out, xq, xs, wq, ws, N, I, O, beta, e);
}

extern "C" int gpu_lin_dgrad(gpu_lin *L, gpu_bf16 *d_in, const gpu_bf16 *d_out,
                             const gpu_bf16 *w, int N, int I, int O, float beta, dsv3_err *e)
{
    if (!use_fp8(L, N, I, O))
        return gpu_linear_dgrad(L->c, d_in, d_out, w, N, I, O, beta, e);
    carver k = {L->buf, 0, L->bytes};
    uint8_t *dyq = (uint8_t *)carve(&k, (size_t)N * O), *wtq = (uint8_t *)carve(&k, (size_t)O * I);
    float *dys = (float *)carve(&k, fp8_blocks(O) * N * 4);
    float *wts = (float *)carve(&k, fp8_blocks(I) * gpu_fp8_ld(O) * 4);
    if (!wts)
        return no_room(e, N, I, O);
    return gpu_fp8_quant_act(L->c, dyq, dys, d_out, N, O, e) ||
           gpu_fp8_quant_weight_bf16(L->c, NULL, NULL, wtq, wts, w, O, I, e) ||
           gpu_fp8_linear_dgrad(L->c, d_in, dyq, dys, wtq, wts, N, I, O, beta, e);
}

extern "C" int gpu_lin_wgrad(gpu_lin *L, float *d_w, const gpu_bf16 *d_out, const gpu_bf16 *in,
                             int N, int I, int O, float beta, dsv3_err *e)
{
    if (!use_fp8(L, N, I, O))
        return gpu_linear_wgrad(L->c, d_w, d_out, in, N, I, O, beta, e);
    carver k = {L->buf, 0, L->bytes};
    uint8_t *dytq = (uint8_t *)carve(&k, (size_t)N * O), *xtq = (uint8_t *)carve(&k, (size_t)N * I);
    float *dyts = (float *)carve(&k, fp8_blocks(N) * O * 4);
    float *xts = (float *)carve(&k, fp8_blocks(N) * I * 4);
    if (!xts)
        return no_room(e, N, I, O);
    return gpu_fp8_quant_act_t(L->c, dytq, dyts, d_out, N, O, e) ||
           gpu_fp8_quant_act_t(L->c, xtq, xts, in, N, I, e) ||
           gpu_fp8_linear_wgrad(L->c, d_w, dytq, dyts, xtq, xts, N, I, O, beta, e);
}
