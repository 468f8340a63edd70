/* GPU test of kernels/loss: both per-row cross-entropy kernels (the cluster kernel and the
 * block-a-row kernel) against lib/ops crossentropy_forward/backward (ignored rows included,
 * up to the 129K vocabulary, the cluster kernel's largest row and one past it, odd V; the
 * loss alone without a gradient too), and the
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
    static const int sh[][2] = {{1, 10},     {37, 1000},  {8, 129280}, {300, 517},
                                {5, 131072}, {3, 131074}, {65, 40002}, {4, 2}};
    static const int variants[] = {GPU_CE_CLUSTER, GPU_CE_ROWS};
    double wl = 0, wd = 0;
    for (size_t v = 0; v < 2; v++)
        for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++) {
            int R = sh[s][0], V = sh[s][1];
            size_t n = (size_t)R * V, mark = gpu_arena_mark(gt_ctx_);
            float *l = malloc(n * 4);
            for (size_t i = 0; i < n; i++)
                l[i] = gt_uniform(8);
            int32_t *t = rand_targets(R, V);
            float *gl = gt_up(l, n * 4), *gloss = gt_poisoned((size_t)R * 4),
                  *gloss2 = gt_poisoned((size_t)R * 4);
            int32_t *gtg = gt_up(t, (size_t)R * 4);
            gpu_bf16 *gd = gt_poisoned(n * 2);
            REQUIRE(gl && gloss && gloss2 && gtg && gd);
            CHECKF(gpu_crossentropy_rows_variant(gt_ctx_, variants[v], gloss, gd, gl, gtg, R, V,
                                                 0.5f, &e) == 0 &&
                       gpu_crossentropy_rows_variant(gt_ctx_, variants[v], gloss2, NULL, gl, gtg,
                                                     R, V, 0.5f, &e) == 0,
                   "%s", e.msg);
            float *loss = gt_down_f(gloss, (size_t)R), *loss2 = gt_down_f(gloss2, (size_t)R),
                  *d = gt_down_bf(gd, n);
            float *rloss = gt_zeros((size_t)R), *rd = gt_zeros(n);
            double sum;
            int count;
            crossentropy_forward(&sum, &count, rloss, l, t, R, V);
            crossentropy_backward(rd, l, t, R, V, 0.5f);
            double a = gt_relerr(loss, rloss, (size_t)R), b = gt_relerr(d, rd, n),
                   a2 = gt_relerr(loss2, rloss, (size_t)R);
            a = a2 > a ? a2 : a;
            wl = a > wl ? a : wl;
            wd = b > wd ? b : wd;
            CHECKF(a <= F32_BOUND && b <= BF16_BOUND, "variant %d R=%d V=%d: loss %.2e d_logits %.2e",
                   variants[v], R, V, a, b);
            free(l), free(t), free(loss), free(loss2), free(d), free(rloss), free(rd);
            gt_reset(mark);
        }
    gt_stat("crossentropy rows loss (both kernels)", wl, F32_BOUND);
    gt_stat("crossentropy rows d_logits (both kernels)", wd, BF16_BOUND);
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
    gpu_ctx *c;
    float *loss, *dw;
    gpu_bf16 *dh, *h, *w;
    int32_t *t;
    int N, H, V, chunk;
};

static int head_run(void *arg, dsv3_err *e)
{
    struct head_job *j = arg;
    return gpu_lm_head_loss(j->c, j->loss, j->dh, j->dw, j->h, j->w, j->t, j->N, j->H, j->V,
                            1.0f / j->N, j->chunk, e);
}

/* Median ms of n timed calls after 2 warm-ups, timed on c's own stream (bench.h's gb_time
 * times the test context's). */
static float ctx_time(gpu_ctx *c, int (*fn)(void *, dsv3_err *), void *arg, int n)
{
    dsv3_err e;
    float ms[16];
    for (int i = -2; i < n; i++) {
        gpu_timer t;
        float x;
        if (gpu_timer_start(c, &t, &e) || fn(arg, &e) || gpu_timer_stop(c, &t, &x, &e)) {
            fprintf(stderr, "    bench: %s\n", e.msg);
            return -1;
        }
        if (i >= 0)
            ms[i] = x;
    }
    qsort(ms, (size_t)n, sizeof *ms, gb_cmpf);
    return ms[n / 2];
}

struct ce_job {
    gpu_ctx *c;
    int variant, R, V;
    float *loss, *logits;
    gpu_bf16 *d;
    int32_t *t;
};

static int ce_run(void *arg, dsv3_err *e)
{
    struct ce_job *j = arg;
    return gpu_crossentropy_rows_variant(j->c, j->variant, j->loss, j->d, j->logits, j->t, j->R,
                                         j->V, 1.0f, e);
}

/* The head of the 1B-MoE (16384 rows, H 1024, V 129280): the earlier setting (chunks of 512
 * rows, the two-read CE kernel) and the new one (gpu_lm_head_chunk_rows, the cluster CE
 * kernel), same process; and the CE kernels alone on 4096 rows (floor: 6 bytes a logit). */
static void bench_head(void)
{
    GT_NEED_GPU();
    if (!gt_bench())
        SKIP("set DSV3_GPU_BENCH=1");
    dsv3_err e;
    gpu_ctx *c = NULL;
    struct head_job j = {0};
    j.N = 16384, j.H = 1024, j.V = 129280;
    int chunk_new = gpu_lm_head_chunk_rows(j.N, j.V);
    REQUIRE(gpu_ctx_create(&c, 0, (size_t)chunk_new * j.V * 6 + ((size_t)64 << 20), &e) == 0);
    j.c = c;
    int32_t *t = rand_targets(j.N, j.V);
    j.h = gb_random_bf((size_t)j.N * j.H, 1);
    j.w = gb_random_bf((size_t)j.V * j.H, 0.05f);
    j.dh = gpu_malloc((size_t)j.N * j.H * 2, &e);
    j.dw = gpu_malloc((size_t)j.V * j.H * 4, &e);
    j.loss = gpu_malloc((size_t)j.N * 4, &e);
    j.t = gpu_malloc((size_t)j.N * 4, &e);
    REQUIRE(j.h && j.w && j.dh && j.dw && j.loss && j.t);
    REQUIRE(gpu_upload(c, j.t, t, (size_t)j.N * 4, &e) == 0);
    double fl = 3 * 2.0 * j.N * (double)j.H * j.V;
    static const struct { int chunk; const char *ce; const char *what; } runs[] = {
        {512, "1", "before: chunk 512, CE 2 reads"},
        {512, "0", "chunk 512, cluster CE"},
        {0, "1", "default chunk, CE 2 reads"},
        {0, "0", "now: default chunk, cluster CE"}};
    for (size_t i = 0; i < sizeof runs / sizeof runs[0]; i++) {
        j.chunk = runs[i].chunk ? runs[i].chunk : chunk_new;
        setenv("DSV3_CE_KERNEL", runs[i].ce, 1);
        float ms = ctx_time(c, head_run, &j, 5);
        CHECK(ms > 0);
        printf("# bench lm head 16384x1024 V=129280 %-32s %8.3f ms %7.1f TFLOP/s (3 GEMMs + CE, "
               "chunk %d)\n", runs[i].what, ms, fl / (ms * 1e-3) / 1e12, j.chunk);
    }
    unsetenv("DSV3_CE_KERNEL");
    gpu_free(j.dh), gpu_free(j.dw), gpu_free(j.h);
    /* logits: random bf16 pairs read as fp32 (the high half sets a value in [-4, 4]) */
    struct ce_job k = {c, 0, 4096, j.V, j.loss, (float *)gb_random_bf((size_t)4096 * j.V * 2, 4),
                       NULL, j.t};
    k.d = gpu_malloc((size_t)4096 * j.V * 2, &e);
    REQUIRE(k.logits && k.d);
    double bytes = 4096.0 * j.V * 6;
    for (int v = 0; v < 2; v++) {
        k.variant = v ? GPU_CE_ROWS : GPU_CE_CLUSTER;
        float ms = ctx_time(c, ce_run, &k, 10);
        CHECK(ms > 0);
        printf("# bench cross-entropy 4096x129280 %-14s %8.3f ms %7.0f GB/s at the floor's 6 "
               "bytes a logit\n", v ? "2 reads" : "cluster", ms, bytes / (ms * 1e-3) / 1e9);
    }
    gpu_free(k.logits), gpu_free(k.d), gpu_free(j.w), gpu_free(j.loss), gpu_free(j.t);
    gpu_ctx_destroy(c);
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
