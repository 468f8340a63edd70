/* GPU test of kernels/moe: the router against lib/ops router_forward/backward (DeepSeek-V3's
 * shape and smaller ones, with and without normalisation); the dispatch plan against a
 * counting sort; and a whole routed-expert layer (gather, grouped gate-up GEMM, SwiGLU,
 * grouped down GEMM, weighted combine) forward and backward against a per-assignment CPU
 * composition of lib/ops, with empty experts. */
#include "../../kernels/layers.h"
#include "../../kernels/moe.h"
#include "../../lib/ops.h"
#include "bench.h"

static void router_matches_cpu(void)
{
    GT_NEED_GPU();
    dsv3_err e;
    /* N, E, n_group, topk_group, k, norm */
    static const int sh[][6] = {{333, 256, 8, 4, 8, 1}, {50, 8, 2, 1, 2, 1}, {77, 64, 1, 1, 6, 0},
                                {5, 160, 32, 3, 4, 1}};
    double ww = 0, ws = 0, wd = 0;
    int bad_idx = 0;
    for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++) {
        int N = sh[s][0], E = sh[s][1], G = sh[s][2], TG = sh[s][3], K = sh[s][4], norm = sh[s][5];
        float scale = 2.5f;
        size_t mark = gpu_arena_mark(gt_ctx_);
        float *l = malloc((size_t)N * E * 4), *bias = malloc((size_t)E * 4);
        for (int i = 0; i < N * E; i++)
            l[i] = gt_uniform(4);
        for (int i = 0; i < E; i++)
            bias[i] = gt_uniform(0.2f);
        float *dw = gt_rand_bf((size_t)N * K, 1);
        float *gl = gt_up(l, (size_t)N * E * 4), *gb = gt_up(bias, (size_t)E * 4);
        float *gw = gt_poisoned((size_t)N * K * 4), *gs = gt_poisoned((size_t)N * E * 4);
        float *gdw = gt_up(dw, (size_t)N * K * 4), *gdl = gt_up(l, (size_t)N * E * 4);
        int32_t *gidx = gt_poisoned((size_t)N * K * 4);
        REQUIRE(gl && gb && gw && gs && gdw && gdl && gidx);
        CHECKF(gpu_router_fwd(gt_ctx_, gidx, gw, gs, gl, gb, N, E, G, TG, K, norm, scale, &e) == 0,
               "%s", e.msg);
        /* backward adds into d_logits, which starts as a copy of the logits */
        CHECKF(gpu_router_bwd(gt_ctx_, gdl, gdw, gidx, gs, N, E, K, norm, scale, &e) == 0, "%s",
               e.msg);
        int32_t *idx = malloc((size_t)N * K * 4);
        REQUIRE(gpu_download(gt_ctx_, idx, gidx, (size_t)N * K * 4, &e) == 0);
        float *w = gt_down_f(gw, (size_t)N * K), *sg = gt_down_f(gs, (size_t)N * E);
        float *dl = gt_down_f(gdl, (size_t)N * E);
        float *rw = gt_zeros((size_t)N * K), *rs = gt_zeros((size_t)N * E);
        float *rdl = malloc((size_t)N * E * 4);
        memcpy(rdl, l, (size_t)N * E * 4);
        int *ridx = malloc((size_t)N * K * sizeof(int));
        for (int n = 0; n < N; n++) {
            router_forward(ridx + n * K, rw + n * K, rs + (size_t)n * E, l + (size_t)n * E, bias,
                           E, G, TG, K, norm, scale);
            router_backward(rdl + (size_t)n * E, dw + n * K, ridx + n * K, rs + (size_t)n * E, E,
                            K, norm, scale);
        }
        for (int i = 0; i < N * K; i++)
            bad_idx += idx[i] != ridx[i];
        double a = gt_relerr(w, rw, (size_t)N * K), b = gt_relerr(sg, rs, (size_t)N * E);
        double c = gt_relerr(dl, rdl, (size_t)N * E);
        ww = a > ww ? a : ww, ws = b > ws ? b : ws, wd = c > wd ? c : wd;
        CHECKF(a <= F32_BOUND && b <= F32_BOUND && c <= F32_BOUND,
               "N=%d E=%d G=%d TG=%d k=%d norm=%d: w %.2e s %.2e d_logits %.2e", N, E, G, TG, K,
               norm, a, b, c);
        free(l), free(bias), free(dw), free(idx), free(w), free(sg), free(dl), free(rw), free(rs),
            free(rdl), free(ridx);
        gt_reset(mark);
    }
    CHECKF(bad_idx == 0, "%d expert choices differ from the CPU's", bad_idx);
    gt_stat("router choices (mismatches)", bad_idx, 0);
    gt_stat("router weights", ww, F32_BOUND);
    gt_stat("router sigmoid", ws, F32_BOUND);
    gt_stat("router bwd d_logits", wd, F32_BOUND);
}

static float rb(float x)
{
    return gpu_bf2f(gpu_f2bf(x));
}

static void round_all(float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = rb(x[i]);
}

/* One routed-expert layer, forward and backward, GPU vs CPU. */
static void expert_layer_matches_cpu(void)
{
    GT_NEED_GPU();
    dsv3_err e;
    static const int sh[][5] = {{100, 64, 8, 2, 48}, {37, 128, 16, 4, 96}, {1, 32, 4, 1, 16}};
    double wo = 0, wx = 0, ww1 = 0, ww2 = 0, wdw = 0;
    for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++) {
        int N = sh[s][0], H = sh[s][1], E = sh[s][2], K = sh[s][3], F = sh[s][4];
        int used = E - 2 > K ? E - 2 : K; /* the last experts stay empty */
        size_t mark = gpu_arena_mark(gt_ctx_);
        int32_t *idx = malloc((size_t)N * K * 4);
        for (int n = 0; n < N; n++)
            for (int r = 0; r < K; r++) {
                int x, dup;
                do {
                    x = (int)(test_rand() % (uint64_t)used);
                    dup = 0;
                    for (int q = 0; q < r; q++)
                        dup |= idx[n * K + q] == x;
                } while (dup);
                idx[n * K + r] = x;
            }
        float *x = gt_rand_bf((size_t)N * H, 1), *w = gt_rand_bf((size_t)N * K, 1);
        float *W1 = gt_rand_bf((size_t)E * 2 * F * H, 0.2f), *W2 = gt_rand_bf((size_t)E * H * F, 0.2f);
        float *dout = gt_rand_bf((size_t)N * H, 1);
        int nk = N * K;
        gpu_bf16 *gx = gt_up_bf(x, (size_t)N * H), *gW1 = gt_up_bf(W1, (size_t)E * 2 * F * H);
        gpu_bf16 *gW2 = gt_up_bf(W2, (size_t)E * H * F), *gdout = gt_up_bf(dout, (size_t)N * H);
        float *gw = gt_up(w, (size_t)nk * 4);
        int32_t *gidx = gt_up(idx, (size_t)nk * 4);
        gpu_bf16 *xp = gt_poisoned((size_t)nk * H * 2), *gu = gt_poisoned((size_t)nk * 2 * F * 2);
        gpu_bf16 *act = gt_poisoned((size_t)nk * F * 2), *yp = gt_poisoned((size_t)nk * H * 2);
        gpu_bf16 *out = gt_poisoned((size_t)N * H * 2), *dyp = gt_poisoned((size_t)nk * H * 2);
        gpu_bf16 *dact = gt_poisoned((size_t)nk * F * 2), *dgu = gt_poisoned((size_t)nk * 2 * F * 2);
        gpu_bf16 *dxp = gt_poisoned((size_t)nk * H * 2), *dx = gt_poisoned((size_t)N * H * 2);
        float *gdw = gt_poisoned((size_t)nk * 4);
        float *zero1 = gt_zeros((size_t)E * 2 * F * H), *zero2 = gt_zeros((size_t)E * H * F);
        float *dW1 = gt_up(zero1, (size_t)E * 2 * F * H * 4);
        float *dW2 = gt_up(zero2, (size_t)E * H * F * 4);
        REQUIRE(gx && gW1 && gW2 && gdout && gw && gidx && xp && gu && act && yp && out && dyp &&
                dact && dgu && dxp && dx && dW1 && dW2 && gdw);
        gpu_moe_plan p;
        REQUIRE(gpu_moe_plan_make(gt_ctx_, &p, gidx, N, K, E, &e) == 0);
        int ok = gpu_moe_gather(gt_ctx_, &p, xp, gx, H, &e) == 0 &&
                 gpu_moe_linear_fwd(gt_ctx_, &p, gu, xp, gW1, H, 2 * F, &e) == 0 &&
                 gpu_swiglu_fwd(gt_ctx_, act, gu, gu + F, nk, F, 2 * F, &e) == 0 &&
                 gpu_moe_linear_fwd(gt_ctx_, &p, yp, act, gW2, F, H, &e) == 0 &&
                 gpu_moe_combine(gt_ctx_, &p, out, 0.0f, yp, gw, H, &e) == 0 &&
                 gpu_moe_combine_bwd(gt_ctx_, &p, dyp, gdw, gdout, yp, gw, H, &e) == 0 &&
                 gpu_moe_linear_dgrad(gt_ctx_, &p, dact, dyp, gW2, F, H, &e) == 0 &&
                 gpu_moe_linear_wgrad(gt_ctx_, &p, dW2, dyp, act, F, H, &e) == 0 &&
                 gpu_swiglu_bwd(gt_ctx_, dgu, dgu + F, dact, gu, gu + F, nk, F, 2 * F, &e) == 0 &&
                 gpu_moe_linear_dgrad(gt_ctx_, &p, dxp, dgu, gW1, H, 2 * F, &e) == 0 &&
                 gpu_moe_linear_wgrad(gt_ctx_, &p, dW1, dgu, xp, H, 2 * F, &e) == 0 &&
                 gpu_moe_gather_bwd(gt_ctx_, &p, dx, 0.0f, dxp, H, &e) == 0;
        CHECKF(ok, "%s", e.msg);
        /* offsets are a counting sort of idx */
        int cnt[64] = {0};
        for (int i = 0; i < nk; i++)
            cnt[idx[i]]++;
        for (int x2 = 0, acc = 0; x2 <= E; acc += x2 < E ? cnt[x2] : 0, x2++)
            CHECKF(p.offsets_host[x2] == acc, "offsets[%d] = %d, want %d", x2, p.offsets_host[x2],
                   acc);
        float *o_out = gt_down_bf(out, (size_t)N * H), *o_dx = gt_down_bf(dx, (size_t)N * H);
        float *o_dW1 = gt_down_f(dW1, (size_t)E * 2 * F * H), *o_dW2 = gt_down_f(dW2, (size_t)E * H * F);
        float *o_dw = gt_down_f(gdw, (size_t)nk);
        /* CPU: per assignment, intermediates rounded to bf16 where the GPU stores them */
        float *r_out = gt_zeros((size_t)N * H), *r_dx = gt_zeros((size_t)N * H);
        float *r_dW1 = gt_zeros((size_t)E * 2 * F * H), *r_dW2 = gt_zeros((size_t)E * H * F);
        float *r_dw = gt_zeros((size_t)nk);
        float *g2 = malloc((size_t)2 * F * 4), *hh = malloc((size_t)F * 4), *y = malloc((size_t)H * 4);
        float *dy = malloc((size_t)H * 4), *dh = malloc((size_t)F * 4), *dg2 = malloc((size_t)2 * F * 4);
        for (int n = 0; n < N; n++)
            for (int r = 0; r < K; r++) {
                int ex = idx[n * K + r];
                const float *xn = x + (size_t)n * H, *w1 = W1 + (size_t)ex * 2 * F * H;
                const float *w2 = W2 + (size_t)ex * H * F;
                matmul_forward(g2, xn, w1, 1, H, 2 * F);
                round_all(g2, (size_t)2 * F);
                swiglu_forward(hh, g2, g2 + F, F);
                round_all(hh, (size_t)F);
                matmul_forward(y, hh, w2, 1, F, H);
                round_all(y, (size_t)H);
                float wr = w[n * K + r];
                double dot = 0;
                for (int i = 0; i < H; i++) {
                    r_out[(size_t)n * H + i] += wr * y[i];
                    dot += (double)dout[(size_t)n * H + i] * y[i];
                    dy[i] = rb(wr * dout[(size_t)n * H + i]);
                }
                r_dw[n * K + r] = (float)dot;
                memset(dh, 0, (size_t)F * 4);
                matmul_backward(dh, r_dW2 + (size_t)ex * H * F, dy, hh, w2, 1, F, H);
                round_all(dh, (size_t)F);
                memset(dg2, 0, (size_t)2 * F * 4);
                swiglu_backward(dg2, dg2 + F, dh, g2, g2 + F, F);
                round_all(dg2, (size_t)2 * F);
                float *dxr = gt_zeros((size_t)H);
                matmul_backward(dxr, r_dW1 + (size_t)ex * 2 * F * H, dg2, xn, w1, 1, H, 2 * F);
                round_all(dxr, (size_t)H);
                for (int i = 0; i < H; i++)
                    r_dx[(size_t)n * H + i] += dxr[i];
                free(dxr);
            }
        double a = gt_relerr(o_out, r_out, (size_t)N * H), b = gt_relerr(o_dx, r_dx, (size_t)N * H);
        double c = gt_relerr(o_dW1, r_dW1, (size_t)E * 2 * F * H);
        double d = gt_relerr(o_dW2, r_dW2, (size_t)E * H * F), f = gt_relerr(o_dw, r_dw, (size_t)nk);
        wo = a > wo ? a : wo, wx = b > wx ? b : wx, ww1 = c > ww1 ? c : ww1;
        ww2 = d > ww2 ? d : ww2, wdw = f > wdw ? f : wdw;
        CHECKF(a <= BF16_BOUND && b <= BF16_BOUND && c <= BF16_BOUND && d <= BF16_BOUND &&
                   f <= BF16_BOUND,
               "N=%d H=%d E=%d k=%d F=%d: out %.2e dx %.2e dW1 %.2e dW2 %.2e dw %.2e", N, H, E, K,
               F, a, b, c, d, f);
        gpu_moe_plan_free(&p);
        free(idx), free(x), free(w), free(W1), free(W2), free(dout), free(zero1), free(zero2);
        free(o_out), free(o_dx), free(o_dW1), free(o_dW2), free(o_dw), free(r_out), free(r_dx);
        free(r_dW1), free(r_dW2), free(r_dw), free(g2), free(hh), free(y), free(dy), free(dh),
            free(dg2);
        gt_reset(mark);
    }
    gt_stat("moe layer fwd out", wo, BF16_BOUND);
    gt_stat("moe layer bwd d_x", wx, BF16_BOUND);
    gt_stat("moe layer bwd d_W1 (grouped wgrad)", ww1, BF16_BOUND);
    gt_stat("moe layer bwd d_W2 (grouped wgrad)", ww2, BF16_BOUND);
    gt_stat("moe layer bwd d_router_w", wdw, BF16_BOUND);
}

struct moe_job {
    int kind, N, H, E, K, F;
    gpu_moe_plan *p;
    gpu_bf16 *x, *xp, *W1, *gu, *dgu, *dxp;
    float *dW1;
};

static int moe_run(void *arg, dsv3_err *e)
{
    struct moe_job *j = arg;
    switch (j->kind) {
    case 0: return gpu_moe_linear_fwd(gt_ctx_, j->p, j->gu, j->xp, j->W1, j->H, 2 * j->F, e);
    case 1: return gpu_moe_linear_dgrad(gt_ctx_, j->p, j->dxp, j->dgu, j->W1, j->H, 2 * j->F, e);
    default: return gpu_moe_linear_wgrad(gt_ctx_, j->p, j->dW1, j->dgu, j->xp, j->H, 2 * j->F, e);
    }
}

/* The gate-up grouped GEMM of the 1B-class MoE (configs/1b-moe.json: 32 experts, 4 a token,
 * hidden 1024, expert width 512) for 16384 tokens, against the dense 8192^3 rate. */
static void bench_grouped_gemm(void)
{
    GT_NEED_GPU();
    if (!gt_bench())
        SKIP("set DSV3_GPU_BENCH=1");
    dsv3_err e;
    struct moe_job j = {0, 16384, 1024, 32, 4, 512, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    int nk = j.N * j.K;
    int32_t *idx = malloc((size_t)nk * 4);
    for (int n = 0; n < j.N; n++) /* balanced: distinct experts, 2048 rows each */
        for (int r = 0; r < j.K; r++)
            idx[n * j.K + r] = (int32_t)((n % 8) + 8 * r);
    size_t mark = gpu_arena_mark(gt_ctx_);
    int32_t *gidx = gt_up(idx, (size_t)nk * 4);
    gpu_moe_plan p;
    REQUIRE(gidx && gpu_moe_plan_make(gt_ctx_, &p, gidx, j.N, j.K, j.E, &e) == 0);
    j.p = &p;
    j.xp = gb_random_bf((size_t)nk * j.H, 1), j.W1 = gb_random_bf((size_t)j.E * 2 * j.F * j.H, 0.1f);
    j.gu = gpu_malloc((size_t)nk * 2 * j.F * 2, &e), j.dgu = gb_random_bf((size_t)nk * 2 * j.F, 1);
    j.dxp = gpu_malloc((size_t)nk * j.H * 2, &e), j.dW1 = gpu_malloc((size_t)j.E * 2 * j.F * j.H * 4, &e);
    REQUIRE(j.xp && j.W1 && j.gu && j.dgu && j.dxp && j.dW1);
    gpu_memset(gt_ctx_, j.dW1, 0, (size_t)j.E * 2 * j.F * j.H * 4, &e);
    static const char *names[] = {"fwd", "dgrad", "wgrad"};
    double fl = 2.0 * nk * j.H * 2.0 * j.F;
    for (int k = 0; k < 3; k++) {
        j.kind = k;
        float ms = gb_time(moe_run, &j, 20);
        CHECK(ms > 0);
        char name[80];
        snprintf(name, sizeof name, "moe grouped %s 1B-MoE 65536x1024->1024", names[k]);
        printf("# bench %-36s %8.3f ms %7.1f TFLOP/s (32 experts, one launch)\n", name, ms,
               fl / (ms * 1e-3) / 1e12);
    }
    gpu_moe_plan_free(&p);
    gpu_free(j.xp), gpu_free(j.W1), gpu_free(j.gu), gpu_free(j.dgu), gpu_free(j.dxp), gpu_free(j.dW1);
    free(idx);
    gt_reset(mark);
}

int main(void)
{
    test_seed();
    RUN(router_matches_cpu);
    RUN(expert_layer_matches_cpu);
    RUN(bench_grouped_gemm);
    if (gt_ctx_)
        gpu_ctx_destroy(gt_ctx_);
    TEST_EXIT();
}
