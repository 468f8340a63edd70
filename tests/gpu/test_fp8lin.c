/* GPU test of what kernels/fp8lin keeps between products, and of the SwiGLU -> quantise
 * kernel it uses (kernels/fp8.h gpu_fp8_swiglu_quant).
 *
 * - gpu_fp8_swiglu_quant: its h against gpu_swiglu_fwd byte for byte, its codes and scales
 *   (both layouts) against lib/fp8's quantiser of that h byte for byte and scale for scale,
 *   on fresh random gate/up values (g and u the halves of one row of stride 2*cols, and a
 *   ragged stride), ragged sizes included.
 * - gpu_lin's caches change no result: the forward, dgrad and wgrad of a linear through
 *   gpu_lin (weights quantised once and kept, the forward's input kept for wgrad, dy's two
 *   layouts kept from dgrad for wgrad, SwiGLU fused) give the same bits as the products run
 *   from operands quantised afresh by the plain kernels; after gpu_lin_weights_changed and new
 *   weights, the new weights' codes are used; a wgrad whose input is not the forward's
 *   quantises that input itself.
 * With DSV3_GPU_BENCH=1 (scripts/bench-fp8.sh): one linear layer's step through gpu_lin, as
 * gmodel runs it (forward, dgrad, wgrad; the weights quantised once per optimizer step, so
 * not in the timed loop), bf16 against FP8 with the caches, on the linear layers of
 * configs/1b-moe.json and of V3 at M = 16384 tokens (1b-moe's micro-batch, 4 x 4096) and
 * 8192; the MLP down-projections also with the SwiGLU before them (bf16: swiglu kernel +
 * products; FP8: SwiGLU fused with the quantisation). */
#include "../../kernels/fp8gemm.h"
#include "../../kernels/fp8lin.h"
#include "../../kernels/layers.h"
#include "../../lib/fp8.h"
#include "bench.h"

static void *down(const void *d, size_t bytes)
{
    dsv3_err e;
    void *h = malloc(bytes + 4);
    if (gpu_download(gt_ctx_, h, d, bytes, &e))
        fprintf(stderr, "    download: %s\n", e.msg);
    return h;
}

static long diff_bytes(const void *a, const void *b, size_t n)
{
    const uint8_t *x = a, *y = b;
    long d = 0;
    for (size_t i = 0; i < n; i++)
        d += x[i] != y[i];
    return d;
}

/* bf16 values spread over 2^-12 .. 2^4 (gate values where silu bends, and past it). */
static float *rand_spread(size_t n)
{
    float *x = malloc(n * sizeof *x + 4);
    for (size_t i = 0; i < n; i++)
        x[i] = gpu_bf2f(gpu_f2bf(ldexpf(gt_uniform(1), 4 - (int)(test_rand() % 17))));
    return x;
}

static const int sshapes[][3] = {{1, 16, 32}, {3, 100, 200}, {130, 257, 514}, {257, 384, 768},
                                 {64, 1000, 2000}, {200, 512, 1030}, {129, 1, 2}};

static void swiglu_quant_matches_cpu(void)
{
    GT_NEED_GPU();
    dsv3_err e;
    long bad_h = 0, bad_q = 0;
    for (size_t k = 0; k < sizeof sshapes / sizeof sshapes[0]; k++) {
        int R = sshapes[k][0], C = sshapes[k][1], ld = sshapes[k][2];
        size_t n = (size_t)R * C, mark = gpu_arena_mark(gt_ctx_);
        int64_t cb = fp8_blocks(C), rb = fp8_blocks(R);
        float *gu = rand_spread((size_t)R * ld);
        gpu_bf16 *dgu = gt_up_bf(gu, (size_t)R * ld);
        gpu_bf16 *href = gt_poisoned(n * 2), *h = gt_poisoned(n * 2);
        uint8_t *dq = gt_poisoned(n), *dqt = gt_poisoned(n);
        float *ds = gt_poisoned((size_t)cb * R * 4), *dst = gt_poisoned((size_t)rb * C * 4);
        REQUIRE(dgu && href && h && dq && dqt && ds && dst);
        /* u starts where the row's gate part ends when ld = 2C, else one past: ragged */
        const gpu_bf16 *g = dgu, *u = dgu + (ld - C);
        CHECKF(gpu_swiglu_fwd(gt_ctx_, href, g, u, R, C, ld, &e) == 0, "%s", e.msg);
        CHECKF(gpu_fp8_swiglu_quant(gt_ctx_, h, dq, ds, dqt, dst, g, u, R, C, ld, &e) == 0, "%s",
               e.msg);
        uint16_t *hr = down(href, n * 2), *hh = down(h, n * 2);
        long bh = diff_bytes(hr, hh, n * 2);
        float *x = malloc(n * sizeof *x + 4), *xt = malloc(n * sizeof *xt + 4);
        for (size_t i = 0; i < n; i++)
            x[i] = gpu_bf2f(hr[i]);
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++)
                xt[(size_t)c * R + r] = x[(size_t)r * C + c];
        uint8_t *rq = malloc(n + 4), *rqt = malloc(n + 4);
        float *rs = malloc((size_t)cb * R * 4 + 4), *rst = malloc((size_t)rb * C * 4 + 4);
        REQUIRE(fp8_quant_act(x, R, C, rq, rs, 0, NULL) == 0);
        REQUIRE(fp8_quant_act(xt, C, R, rqt, rst, 0, NULL) == 0);
        uint8_t *q = down(dq, n), *qt = down(dqt, n);
        float *s = down(ds, (size_t)cb * R * 4), *st = down(dst, (size_t)rb * C * 4);
        long bq = diff_bytes(q, rq, n) + diff_bytes(qt, rqt, n);
        for (int r = 0; r < R; r++)
            for (int64_t b = 0; b < cb; b++)
                bq += memcmp(&s[b * R + r], &rs[r * cb + b], 4) != 0;
        for (int c = 0; c < C; c++)
            for (int64_t b = 0; b < rb; b++)
                bq += memcmp(&st[b * C + c], &rst[c * rb + b], 4) != 0;
        CHECKF(bh == 0 && bq == 0, "%dx%d ld %d: h %ld bytes, codes/scales %ld differ", R, C, ld,
               bh, bq);
        bad_h += bh, bad_q += bq;
        free(gu), free(hr), free(hh), free(x), free(xt), free(rq), free(rqt), free(rs), free(rst);
        free(q), free(qt), free(s), free(st);
        gt_reset(mark);
    }
    gt_stat("fp8 swiglu+quant h vs gpu_swiglu_fwd (byte diffs)", (double)bad_h, 0);
    gt_stat("fp8 swiglu+quant codes/scales vs lib/fp8 (mismatches)", (double)bad_q, 0);
}

/* The three products from operands quantised afresh by the plain kernels (no caches). */
typedef struct ref3 {
    gpu_bf16 *out, *dx;
    float *dw;
} ref3;

static int ref_products(ref3 *r, const gpu_bf16 *x, const gpu_bf16 *w, const gpu_bf16 *dy,
                        int N, int I, int O, dsv3_err *e)
{
    size_t ni = (size_t)N * I, oi = (size_t)O * I, no = (size_t)N * O;
    uint8_t *xq = gt_poisoned(ni), *xtq = gt_poisoned(ni), *wq = gt_poisoned(oi),
            *wtq = gt_poisoned(oi), *dyq = gt_poisoned(no), *dytq = gt_poisoned(no);
    float *xs = gt_poisoned(fp8_blocks(I) * N * 4), *xts = gt_poisoned(fp8_blocks(N) * I * 4),
          *ws = gt_poisoned(fp8_blocks(O) * gpu_fp8_ld(I) * 4),
          *wts = gt_poisoned(fp8_blocks(I) * gpu_fp8_ld(O) * 4),
          *dys = gt_poisoned(fp8_blocks(O) * N * 4), *dyts = gt_poisoned(fp8_blocks(N) * O * 4);
    r->out = gt_poisoned(no * 2), r->dx = gt_poisoned(ni * 2), r->dw = gt_poisoned(oi * 4);
    if (!(xq && xtq && wq && wtq && dyq && dytq && xs && xts && ws && wts && dys && dyts &&
          r->out && r->dx && r->dw))
        return err_set(e, "arena full");
    return gpu_fp8_quant_act(gt_ctx_, xq, xs, x, N, I, e) ||
           gpu_fp8_quant_act_t(gt_ctx_, xtq, xts, x, N, I, e) ||
           gpu_fp8_quant_weight_bf16(gt_ctx_, wq, ws, NULL, NULL, w, O, I, e) ||
           gpu_fp8_quant_weight_bf16(gt_ctx_, NULL, NULL, wtq, wts, w, O, I, e) ||
           gpu_fp8_quant_act(gt_ctx_, dyq, dys, dy, N, O, e) ||
           gpu_fp8_quant_act_t(gt_ctx_, dytq, dyts, dy, N, O, e) ||
           gpu_fp8_linear_fwd(gt_ctx_, r->out, xq, xs, wq, ws, N, I, O, 0, e) ||
           gpu_fp8_linear_dgrad(gt_ctx_, r->dx, dyq, dys, wtq, wts, N, I, O, 0, e) ||
           gpu_fp8_linear_wgrad(gt_ctx_, r->dw, dytq, dyts, xtq, xts, N, I, O, 0, e);
}

/* Bytes of a and b (device) that differ. */
static long dev_diff(const void *a, const void *b, size_t bytes)
{
    void *x = down(a, bytes), *y = down(b, bytes);
    long d = diff_bytes(x, y, bytes);
    free(x), free(y);
    return d;
}

static void lin_caches_change_nothing(void)
{
    GT_NEED_GPU();
    dsv3_err e;
    const int N = 272, I = 384, O = 208;
    size_t mark = gpu_arena_mark(gt_ctx_), ni = (size_t)N * I, oi = (size_t)O * I,
           no = (size_t)N * O;
    float *hx = gt_rand_bf(ni, 2), *hw = gt_rand_bf(oi, 0.1f), *hw2 = gt_rand_bf(oi, 0.3f),
          *hdy = gt_rand_bf(no, 0.01f), *hgu = rand_spread(2 * ni);
    gpu_bf16 *x = gt_up_bf(hx, ni), *w = gt_up_bf(hw, oi), *dy = gt_up_bf(hdy, no),
             *gu = gt_up_bf(hgu, 2 * ni), *h = gt_poisoned(ni * 2);
    gpu_bf16 *out = gt_poisoned(no * 2), *dx = gt_poisoned(ni * 2);
    float *dw = gt_poisoned(oi * 4);
    REQUIRE(x && w && dy && gu && h && out && dx && dw);
    gpu_lin L = {0};
    L.c = gt_ctx_;
    REQUIRE(gpu_lin_fp8_on(&L, N, 512, &e) == 0);
    long bad = 0;
    for (int round = 0; round < 4; round++) {
        /* 0: plain; 1: the same weights again (kept codes); 2: new weights, announced;
         * 3: SwiGLU fused into the forward, wgrad of another input (quantised afresh) */
        if (round == 2) {
            gpu_bf16 *b = malloc(oi * 2);
            for (size_t i = 0; i < oi; i++)
                b[i] = gpu_f2bf(hw2[i]);
            REQUIRE(gpu_upload(gt_ctx_, w, b, oi * 2, &e) == 0);
            free(b);
            gpu_lin_weights_changed(&L);
        }
        gpu_lin_new_pass(&L, 1);
        const gpu_bf16 *in = x;
        if (round == 3) {
            REQUIRE(gpu_lin_swiglu_fwd(&L, out, h, gu, gu + I, 2 * I, w, N, I, O, 0, &e) == 0);
            in = h;
        } else {
            REQUIRE(gpu_lin_fwd(&L, out, x, w, N, I, O, 0, &e) == 0);
        }
        REQUIRE(gpu_lin_dgrad(&L, dx, dy, w, N, I, O, 0, &e) == 0);
        const gpu_bf16 *win = round == 3 ? x : in; /* round 3: not the forward's input */
        REQUIRE(gpu_lin_wgrad(&L, dw, dy, win, N, I, O, 0, &e) == 0);
        ref3 r, r2;
        REQUIRE(ref_products(&r, in, w, dy, N, I, O, &e) == 0);
        long d = dev_diff(out, r.out, no * 2) + dev_diff(dx, r.dx, ni * 2);
        if (round == 3) {
            REQUIRE(ref_products(&r2, x, w, dy, N, I, O, &e) == 0);
            d += dev_diff(dw, r2.dw, oi * 4);
            gpu_bf16 *href = gt_poisoned(ni * 2);
            REQUIRE(href && gpu_swiglu_fwd(gt_ctx_, href, gu, gu + I, N, I, 2 * I, &e) == 0);
            d += dev_diff(h, href, ni * 2);
        } else {
            d += dev_diff(dw, r.dw, oi * 4);
        }
        CHECKF(d == 0, "round %d: %ld bytes of out/dx/dw differ from the uncached products",
               round, d);
        bad += d;
    }
    gt_stat("fp8 gpu_lin cached vs afresh (byte diffs)", (double)bad, 0);
    gpu_lin_free(&L);
    free(hx), free(hw), free(hw2), free(hdy), free(hgu);
    gt_reset(mark);
}

/* ---- benchmark ------------------------------------------------------------------------- */

typedef struct lin_bench {
    gpu_lin L;
    int N, I, O, swiglu;
    gpu_bf16 *x, *w, *dy, *out, *dx, *gu;
    float *dw;
} lin_bench;

static int lin_step(void *arg, dsv3_err *e)
{
    lin_bench *b = arg;
    gpu_lin_new_pass(&b->L, 1);
    int N = b->N, I = b->I, O = b->O;
    int rc = b->swiglu ? gpu_lin_swiglu_fwd(&b->L, b->out, b->x, b->gu, b->gu + I, 2 * I, b->w,
                                            N, I, O, 0, e)
                       : gpu_lin_fwd(&b->L, b->out, b->x, b->w, N, I, O, 0, e);
    return rc || gpu_lin_dgrad(&b->L, b->dx, b->dy, b->w, N, I, O, 0, e) ||
           gpu_lin_wgrad(&b->L, b->dw, b->dy, b->x, N, I, O, 1, e);
}

static void bench_layers(void)
{
    GT_NEED_GPU();
    if (!gt_bench())
        SKIP("DSV3_GPU_BENCH not set");
    static const struct { const char *name; int I, O, swiglu; } sh[] = {
        {"1B q_a 1024->384", 1024, 384, 0},      {"1B q_b 384->1536", 384, 1536, 0},
        {"1B kv_a 1024->288", 1024, 288, 0},     {"1B kv_b 256->2048", 256, 2048, 0},
        {"1B o 1024->1024", 1024, 1024, 0},      {"1B mlp up 1024->8192", 1024, 8192, 0},
        {"1B mlp down 4096->1024", 4096, 1024, 0}, {"1B mlp down+swiglu", 4096, 1024, 1},
        {"1B shared up 1024->1024", 1024, 1024, 0}, {"1B shared down+swiglu", 512, 1024, 1},
        {"V3 q_a 7168->1536", 7168, 1536, 0},    {"V3 o 16384->7168", 16384, 7168, 0},
        {"V3 mlp up 7168->36864", 7168, 36864, 0}, {"V3 mlp down+swiglu", 18432, 7168, 1},
    };
    static const int Ms[] = {16384, 8192};
    printf("# bench %-36s %7s %9s %9s %7s\n", "layer step (fwd+dgrad+wgrad)", "M", "bf16 ms",
           "fp8 ms", "speedup");
    for (int mi = 0; mi < 2; mi++)
        for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++) {
            dsv3_err e;
            lin_bench b;
            memset(&b, 0, sizeof b);
            int N = Ms[mi], I = sh[s].I, O = sh[s].O;
            if (N == 16384 && I > 8192)
                continue; /* V3's widest at 8192 tokens only (memory) */
            b.N = N, b.I = I, b.O = O, b.swiglu = sh[s].swiglu;
            size_t ni = (size_t)N * I;
            b.x = gb_random_bf(ni, 1), b.w = gb_random_bf((size_t)O * I, 0.05f);
            b.dy = gb_random_bf((size_t)N * O, 0.01f), b.out = gpu_malloc((size_t)N * O * 2, &e);
            b.dx = gpu_malloc(ni * 2, &e), b.dw = gpu_malloc((size_t)O * I * 4, &e);
            b.gu = b.swiglu ? gb_random_bf(2 * ni, 2) : NULL;
            b.L.c = gt_ctx_;
            float t16 = -1, t8 = -1;
            if (b.x && b.w && b.dy && b.out && b.dx && b.dw && (!b.swiglu || b.gu)) {
                t16 = gb_time(lin_step, &b, 10);
                if (gpu_lin_fp8_on(&b.L, N, I > O ? I : O, &e) == 0)
                    t8 = gb_time(lin_step, &b, 10);
            }
            CHECKF(t16 > 0 && t8 > 0, "bench %s M=%d", sh[s].name, N);
            if (t16 > 0 && t8 > 0)
                printf("# bench %-36s %7d %9.3f %9.3f %6.2fx\n", sh[s].name, N, t16, t8,
                       t16 / t8);
            gpu_lin_free(&b.L);
            void *p[] = {b.x, b.w, b.dy, b.out, b.dx, b.dw, b.gu};
            for (size_t i = 0; i < sizeof p / sizeof p[0]; i++)
                gpu_free(p[i]);
        }
}

int main(void)
{
    test_seed();
    RUN(swiglu_quant_matches_cpu);
    RUN(lin_caches_change_nothing);
    RUN(bench_layers);
    if (gt_ctx_)
        gpu_ctx_destroy(gt_ctx_);
    TEST_EXIT();
}
