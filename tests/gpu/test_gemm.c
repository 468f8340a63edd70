/* GPU test of kernels/gemm: the three products of a linear layer (fprop, dgrad, wgrad)
 * against lib/ops matmul_forward / matmul_backward on fresh random bf16 inputs of ragged
 * shapes, with beta 0 and beta 1; with DSV3_GPU_BENCH=1 also timings on V3 shapes against
 * the measured matrix rate (an 8192^3 product). */
#include "../../kernels/gemm.h"
#include "../../lib/ops.h"
#include "bench.h"

static const int shapes[][3] = {{1, 16, 8}, {17, 40, 72}, {128, 256, 512}, {257, 136, 336},
                                {1000, 8, 304}, {64, 2048, 96}};

static void linear_matches_cpu(void)
{
    GT_NEED_GPU();
    dsv3_err e;
    double worst[3] = {0, 0, 0};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int N = shapes[s][0], I = shapes[s][1], O = shapes[s][2];
        size_t mark = gpu_arena_mark(gt_ctx_);
        float *x = gt_rand_bf((size_t)N * I, 1), *w = gt_rand_bf((size_t)O * I, 1);
        float *dy = gt_rand_bf((size_t)N * O, 1), *dw0 = gt_rand_bf((size_t)O * I, 1);
        gpu_bf16 *dx_ = gt_up_bf(x, (size_t)N * I), *dw_ = gt_up_bf(w, (size_t)O * I);
        gpu_bf16 *ddy = gt_up_bf(dy, (size_t)N * O);
        gpu_bf16 *dout = gt_poisoned((size_t)N * O * 2), *ddx = gt_poisoned((size_t)N * I * 2);
        float *ddw = gt_up(dw0, (size_t)O * I * 4);
        REQUIRE(dx_ && dw_ && ddy && dout && ddx && ddw);
        CHECKF(gpu_linear_fwd(gt_ctx_, dout, dx_, dw_, N, I, O, 0.0f, &e) == 0, "%s", e.msg);
        CHECKF(gpu_linear_dgrad(gt_ctx_, ddx, ddy, dw_, N, I, O, 0.0f, &e) == 0, "%s", e.msg);
        CHECKF(gpu_linear_wgrad(gt_ctx_, ddw, ddy, dx_, N, I, O, 1.0f, &e) == 0, "%s", e.msg);
        float *out = gt_down_bf(dout, (size_t)N * O), *gx = gt_down_bf(ddx, (size_t)N * I);
        float *gw = gt_down_f(ddw, (size_t)O * I);
        float *rout = gt_zeros((size_t)N * O), *rgx = gt_zeros((size_t)N * I);
        float *rgw = malloc((size_t)O * I * 4);
        memcpy(rgw, dw0, (size_t)O * I * 4);
        matmul_forward(rout, x, w, N, I, O);
        matmul_backward(rgx, rgw, dy, x, w, N, I, O);
        double e0 = gt_relerr(out, rout, (size_t)N * O), e1 = gt_relerr(gx, rgx, (size_t)N * I);
        double e2 = gt_relerr(gw, rgw, (size_t)O * I);
        if (e0 > worst[0]) worst[0] = e0;
        if (e1 > worst[1]) worst[1] = e1;
        if (e2 > worst[2]) worst[2] = e2;
        CHECKF(e0 <= BF16_BOUND && e1 <= BF16_BOUND && e2 <= F32_BOUND * 10,
               "N=%d I=%d O=%d: fprop %.2e dgrad %.2e wgrad %.2e", N, I, O, e0, e1, e2);
        free(x), free(w), free(dy), free(dw0), free(out), free(gx), free(gw), free(rout),
            free(rgx), free(rgw);
        gt_reset(mark);
    }
    gt_stat("gemm fprop (bf16 out)", worst[0], BF16_BOUND);
    gt_stat("gemm dgrad (bf16 out)", worst[1], BF16_BOUND);
    /* wgrad adds into fp32: only the fp32 accumulation order differs from the CPU. */
    gt_stat("gemm wgrad (fp32 out, +=)", worst[2], F32_BOUND * 10);
}

static void beta_accumulates(void)
{
    GT_NEED_GPU();
    dsv3_err e;
    int N = 33, I = 64, O = 48;
    size_t mark = gpu_arena_mark(gt_ctx_);
    float *x = gt_rand_bf((size_t)N * I, 1), *w = gt_rand_bf((size_t)O * I, 1);
    float *y0 = gt_rand_bf((size_t)N * O, 1);
    gpu_bf16 *dx_ = gt_up_bf(x, (size_t)N * I), *dw_ = gt_up_bf(w, (size_t)O * I);
    gpu_bf16 *dy = gt_up_bf(y0, (size_t)N * O);
    REQUIRE(dx_ && dw_ && dy);
    CHECKF(gpu_linear_fwd(gt_ctx_, dy, dx_, dw_, N, I, O, 1.0f, &e) == 0, "%s", e.msg);
    float *out = gt_down_bf(dy, (size_t)N * O), *ref = gt_zeros((size_t)N * O);
    matmul_forward(ref, x, w, N, I, O);
    for (int i = 0; i < N * O; i++)
        ref[i] += y0[i];
    gt_stat("gemm fprop beta=1", gt_relerr(out, ref, (size_t)N * O), BF16_BOUND);
    free(x), free(w), free(y0), free(out), free(ref);
    gt_reset(mark);
}

struct gemm_job {
    int kind, N, I, O;
    gpu_bf16 *a, *b, *c;
    float *cf;
};

static int gemm_job_run(void *arg, dsv3_err *e)
{
    struct gemm_job *j = arg;
    switch (j->kind) {
    case 0: return gpu_linear_fwd(gt_ctx_, j->c, j->a, j->b, j->N, j->I, j->O, 0.0f, e);
    case 1: return gpu_linear_dgrad(gt_ctx_, j->a, j->c, j->b, j->N, j->I, j->O, 0.0f, e);
    default: return gpu_linear_wgrad(gt_ctx_, j->cf, j->c, j->a, j->N, j->I, j->O, 1.0f, e);
    }
}

static float bench_one(int kind, int N, int I, int O)
{
    struct gemm_job j = {kind, N, I, O, gb_random_bf((size_t)N * I, 1),
                         gb_random_bf((size_t)O * I, 1), gb_random_bf((size_t)N * O, 1), NULL};
    dsv3_err e;
    if (kind == 2)
        j.cf = gpu_malloc((size_t)O * I * 4, &e);
    float ms = -1;
    if (j.a && j.b && j.c && (kind != 2 || j.cf))
        ms = gb_time(gemm_job_run, &j, 20);
    gpu_free(j.a), gpu_free(j.b), gpu_free(j.c), gpu_free(j.cf);
    return ms;
}

static void bench_v3_shapes(void)
{
    GT_NEED_GPU();
    if (!gt_bench())
        SKIP("set DSV3_GPU_BENCH=1");
    float ms = bench_one(0, 8192, 8192, 8192);
    REQUIRE(ms > 0);
    double ceil = 2.0 * 8192.0 * 8192 * 8192 / (ms * 1e-3) / 1e12;
    printf("# bench %-36s %8.3f ms %7.1f TFLOP/s (the ceiling)\n", "gemm 8192^3 bf16", ms, ceil);
    static const struct { const char *name; int N, I, O; } sh[] = {
        {"V3 MLP up 16384x7168->18432", 16384, 7168, 18432},
        {"V3 q_b 16384x1536->24576", 16384, 1536, 24576},
        {"V3 o_proj 16384x16384->7168", 16384, 16384, 7168},
        {"1B-MoE q 16384x1024->1536", 16384, 1024, 1536},
    };
    static const char *kinds[] = {"fprop", "dgrad", "wgrad"};
    for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++)
        for (int k = 0; k < 3; k++) {
            float t = bench_one(k, sh[s].N, sh[s].I, sh[s].O);
            CHECK(t > 0);
            double tf = 2.0 * sh[s].N * (double)sh[s].I * sh[s].O / (t * 1e-3) / 1e12;
            char name[96];
            snprintf(name, sizeof name, "gemm %s %s", kinds[k], sh[s].name);
            printf("# bench %-36s %8.3f ms %7.1f TFLOP/s %5.1f%% of ceiling\n", name, t, tf,
                   100 * tf / ceil);
        }
}

int main(void)
{
    test_seed();
    RUN(linear_matches_cpu);
    RUN(beta_accumulates);
    RUN(bench_v3_shapes);
    if (gt_ctx_)
        gpu_ctx_destroy(gt_ctx_);
    TEST_EXIT();
}
