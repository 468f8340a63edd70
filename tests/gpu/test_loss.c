/* GPU test of kernels/loss: the per-row cross-entropy kernel against lib/ops
 * crossentropy_forward/backward (ignored rows included, up to the 129K vocabulary), and the
 * chunked output head (logits, loss, d_hidden, d_w) against the CPU composition of
 * matmul_forward, crossentropy_* and matmul_backward, with a ragged last chunk. */
#include "../../kernels/loss.h"
#include "../../lib/ops.h"
#include "bench.h"

static int32_t *rand_targets(int N, int V)
{
    int32_t *t = malloc((size_t)N * 4);
    for (int i = 0; i < N; i++)
        t[i] = test_rand() % 7 == 0 ? -1 : (int32_t)(test_rand() % (uint64_t)V);
    if (N > 0)
        t[0] = V - 1; /* the last class is reachable */
    return t;
}

static void ce_rows_match_cpu(void)
{
    GT_NEED_GPU();
    dsv3_err e;
    static const int sh[][2] = {{1, 10}, {37, 1000}, {8, 129280}, {300, 517}};
    double wl = 0, wd = 0;
    for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++) {
        int R = sh[s][0], V = sh[s][1];
        size_t n = (size_t)R * V, mark = gpu_arena_mark(gt_ctx_);
        float *l = malloc(n * 4);
        for (size_t i = 0; i < n; i++)
            l[i] = gt_uniform(8);
        int32_t *t = rand_targets(R, V);
        float *gl = gt_up(l, n * 4), *gloss = gt_poisoned((size_t)R * 4);
        int32_t *gtg = gt_up(t, (size_t)R * 4);
        gpu_bf16 *gd = gt_poisoned(n * 2);
        REQUIRE(gl && gloss && gtg && gd);
        CHECKF(gpu_crossentropy_rows(gt_ctx_, gloss, gd, gl, gtg, R, V, 0.5f, &e) == 0, "%s",
               e.msg);
        float *loss = gt_down_f(gloss, (size_t)R), *d = gt_down_bf(gd, n);
        float *rloss = gt_zeros((size_t)R), *rd = gt_zeros(n);
        double sum;
        int count;
        crossentropy_forward(&sum, &count, rloss, l, t, R, V);
        crossentropy_backward(rd, l, t, R, V, 0.5f);
        double a = gt_relerr(loss, rloss, (size_t)R), b = gt_relerr(d, rd, n);
        wl = a > wl ? a : wl;
        wd = b > wd ? b : wd;
        CHECKF(a <= F32_BOUND && b <= BF16_BOUND, "R=%d V=%d: loss %.2e d_logits %.2e", R, V, a,
               b);
        free(l), free(t), free(loss), free(d), free(rloss), free(rd);
        gt_reset(mark);
    }
    gt_stat("crossentropy rows loss", wl, F32_BOUND);
    gt_stat("crossentropy rows d_logits", wd, BF16_BOUND);
}

static void lm_head_matches_cpu(void)
{
    GT_NEED_GPU();
    dsv3_err e;
    static const int sh[][4] = {{100, 64, 1000, 32}, {7, 128, 4099, 3}, {64, 32, 50, 64}};
    double wl = 0, wh = 0, ww = 0;
    for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++) {
        int N = sh[s][0], H = sh[s][1], V = sh[s][2], chunk = sh[s][3];
        size_t mark = gpu_arena_mark(gt_ctx_);
        float *h = gt_rand_bf((size_t)N * H, 1), *w = gt_rand_bf((size_t)V * H, 0.3f);
        float *dw0 = gt_rand_bf((size_t)V * H, 0.01f);
        int32_t *t = rand_targets(N, V);
        float scale = 1.0f / N;
        gpu_bf16 *gh = gt_up_bf(h, (size_t)N * H), *gw = gt_up_bf(w, (size_t)V * H);
        gpu_bf16 *gdh = gt_poisoned((size_t)N * H * 2);
        float *gdw = gt_up(dw0, (size_t)V * H * 4), *gloss = gt_poisoned((size_t)N * 4);
        int32_t *gtg = gt_up(t, (size_t)N * 4);
        REQUIRE(gh && gw && gdh && gdw && gloss && gtg);
        CHECKF(gpu_lm_head_loss(gt_ctx_, gloss, gdh, gdw, gh, gw, gtg, N, H, V, scale, chunk,
                                &e) == 0,
               "%s", e.msg);
        float *loss = gt_down_f(gloss, (size_t)N), *dh = gt_down_bf(gdh, (size_t)N * H);
        float *dw = gt_down_f(gdw, (size_t)V * H);
        float *logits = gt_zeros((size_t)N * V), *dl = gt_zeros((size_t)N * V);
        float *rloss = gt_zeros((size_t)N), *rdh = gt_zeros((size_t)N * H);
        float *rdw = malloc((size_t)V * H * 4);
        memcpy(rdw, dw0, (size_t)V * H * 4);
        double sum;
        int count;
        matmul_forward(logits, h, w, N, H, V);
        crossentropy_forward(&sum, &count, rloss, logits, t, N, V);
        crossentropy_backward(dl, logits, t, N, V, scale);
        matmul_backward(rdh, rdw, dl, h, w, N, H, V);
        /* d_w: compare the increment (dw0 would hide it) */
        for (size_t i = 0; i < (size_t)V * H; i++)
            dw[i] -= dw0[i], rdw[i] -= dw0[i];
        double a = gt_relerr(loss, rloss, (size_t)N), b = gt_relerr(dh, rdh, (size_t)N * H);
        double c = gt_relerr(dw, rdw, (size_t)V * H);
        wl = a > wl ? a : wl, wh = b > wh ? b : wh, ww = c > ww ? c : ww;
        CHECKF(a <= F32_BOUND && b <= BF16_BOUND && c <= BF16_BOUND,
               "N=%d H=%d V=%d chunk=%d: loss %.2e d_hidden %.2e d_w %.2e", N, H, V, chunk, a, b,
               c);
        free(h), free(w), free(dw0), free(t), free(loss), free(dh), free(dw), free(logits),
            free(dl), free(rloss), free(rdh), free(rdw);
        gt_reset(mark);
    }
    gt_stat("lm head loss (chunked)", wl, F32_BOUND);
    gt_stat("lm head d_hidden", wh, BF16_BOUND);
    gt_stat("lm head d_w increment", ww, BF16_BOUND);
}

struct head_job {
    float *loss, *dw;
    gpu_bf16 *dh, *h, *w;
    int32_t *t;
    int N, H, V, chunk;
};

static int head_run(void *arg, dsv3_err *e)
{
    struct head_job *j = arg;
    return gpu_lm_head_loss(gt_ctx_, j->loss, j->dh, j->dw, j->h, j->w, j->t, j->N, j->H, j->V,
                            1.0f / j->N, j->chunk, e);
}

static void bench_head(void)
{
    GT_NEED_GPU();
    if (!gt_bench())
        SKIP("set DSV3_GPU_BENCH=1");
    dsv3_err e;
    struct head_job j = {0};
    j.N = 16384, j.H = 1024, j.V = 129280, j.chunk = 512;
    int32_t *t = rand_targets(j.N, j.V);
    j.h = gb_random_bf((size_t)j.N * j.H, 1);
    j.w = gb_random_bf((size_t)j.V * j.H, 0.05f);
    j.dh = gpu_malloc((size_t)j.N * j.H * 2, &e);
    j.dw = gpu_malloc((size_t)j.V * j.H * 4, &e);
    j.loss = gpu_malloc((size_t)j.N * 4, &e);
    j.t = gpu_malloc((size_t)j.N * 4, &e);
    REQUIRE(j.h && j.w && j.dh && j.dw && j.loss && j.t);
    REQUIRE(gpu_upload(gt_ctx_, j.t, t, (size_t)j.N * 4, &e) == 0);
    float ms = gb_time(head_run, &j, 5);
    CHECK(ms > 0);
    double fl = 3 * 2.0 * j.N * (double)j.H * j.V;
    printf("# bench %-36s %8.3f ms %7.1f TFLOP/s (3 GEMMs + CE, chunk %d)\n",
           "lm head 16384x1024 V=129280", ms, fl / (ms * 1e-3) / 1e12, j.chunk);
    gpu_free(j.h), gpu_free(j.w), gpu_free(j.dh), gpu_free(j.dw), gpu_free(j.loss),
        gpu_free(j.t);
    free(t);
}

int main(void)
{
    test_seed();
    RUN(ce_rows_match_cpu);
    RUN(lm_head_matches_cpu);
    RUN(bench_head);
    if (gt_ctx_)
        gpu_ctx_destroy(gt_ctx_);
    TEST_EXIT();
}
