/* GPU test of kernels/moe: the router against lib/ops router_forward/backward (DeepSeek-V3's
 * shape and smaller ones, with and without normalisation); the dispatch plan against a
 * counting sort; and a whole routed-expert layer (gather, grouped gate-up GEMM, SwiGLU,
 * grouped down GEMM, weighted combine) forward and backward against a per-assignment CPU
 * composition of lib/ops, with empty experts. */
#include "../../kernels/gemm.h"
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

/* One routed-expert layer, forward and backward, GPU vs CPU, through one grouped GEMM
 * implementation (moe.h GPU_MOE_GEMM_*). Ragged counts: the last experts stay
 * empty, expert 0 takes about a third of the choices, counts are not multiples of the tile
 * (128 rows), and the 600-token shape spans several row tiles and k-steps per expert. */
static void expert_layer_check(int variant)
{
    GT_NEED_GPU();
    dsv3_err e;
    static const int sh[][5] = {{100, 64, 8, 2, 48}, {37, 128, 16, 4, 96}, {1, 32, 4, 1, 16},
                                {600, 128, 12, 3, 136}};
    double wo = 0, wx = 0, ww1 = 0, ww2 = 0, wdw = 0;
    gpu_moe_set_gemm(gt_ctx_, variant);
    for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++) {
        int N = sh[s][0], H = sh[s][1], E = sh[s][2], K = sh[s][3], F = sh[s][4];
        int used = E - 2 > K ? E - 2 : K; /* the last experts stay empty */
        size_t mark = gpu_arena_mark(gt_ctx_);
        int32_t *idx = malloc((size_t)N * K * 4);
        for (int n = 0; n < N; n++)
            for (int r = 0; r < K; r++) {
                int x, dup;
                do {
                    x = test_rand() % 3 == 0 ? 0 : (int)(test_rand() % (uint64_t)used);
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
        int cnt[64] = {0}, offs[65];
        for (int i = 0; i < nk; i++)
            cnt[idx[i]]++;
        REQUIRE(gpu_moe_plan_offsets(gt_ctx_, &p, offs, &e) == 0);
        for (int x2 = 0, acc = 0; x2 <= E; acc += x2 < E ? cnt[x2] : 0, x2++)
            CHECKF(offs[x2] == acc, "offsets[%d] = %d, want %d", x2, offs[x2], acc);
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
    gpu_moe_set_gemm(gt_ctx_, GPU_MOE_GEMM_DEFAULT);
    const char *v = variant == GPU_MOE_GEMM_CUBLAS       ? " [cuBLAS grouped]"
                    : variant == GPU_MOE_GEMM_MMA        ? " [mma.sync kernel]"
                    : variant == GPU_MOE_GEMM_WGMMA      ? " [wgmma kernel]"
                    : variant == GPU_MOE_GEMM_WGMMA_PIPE ? " [wgmma, pipelined]"
                    : variant == GPU_MOE_GEMM_WGMMA_SW   ? " [wgmma, swizzled]"
                    : variant == GPU_MOE_GEMM_WS         ? (getenv("DSV3_MOE_WS_GRID")
                                                                ? " [warp-specialised, 3 blocks]"
                                                                : " [warp-specialised]")
                    : variant == GPU_MOE_GEMM_WS_TMA     ? (getenv("DSV3_MOE_WS_GRID")
                                                                ? " [ws + TMA, 3 blocks]"
                                                                : " [ws + TMA]")
                                                         : "";
    char name[96];
    snprintf(name, sizeof name, "moe layer fwd out%s", v);
    gt_stat(name, wo, BF16_BOUND);
    snprintf(name, sizeof name, "moe layer bwd d_x%s", v);
    gt_stat(name, wx, BF16_BOUND);
    snprintf(name, sizeof name, "moe layer bwd d_W1 (grouped wgrad)%s", v);
    gt_stat(name, ww1, BF16_BOUND);
    snprintf(name, sizeof name, "moe layer bwd d_W2 (grouped wgrad)%s", v);
    gt_stat(name, ww2, BF16_BOUND);
    snprintf(name, sizeof name, "moe layer bwd d_router_w%s", v);
    gt_stat(name, wdw, BF16_BOUND);
}

static void expert_layer_matches_cpu(void)
{
    expert_layer_check(GPU_MOE_GEMM_DEFAULT);
}

static void expert_layer_mma_matches_cpu(void)
{
    expert_layer_check(GPU_MOE_GEMM_MMA);
}

static void expert_layer_cublas_matches_cpu(void)
{
    expert_layer_check(GPU_MOE_GEMM_CUBLAS);
}

static void expert_layer_wgmma_matches_cpu(void)
{
    expert_layer_check(GPU_MOE_GEMM_WGMMA);
    expert_layer_check(GPU_MOE_GEMM_WGMMA_PIPE);
}

static void expert_layer_wgmma_sw_matches_cpu(void)
{
    expert_layer_check(GPU_MOE_GEMM_WGMMA_SW);
}

/* The persistent kernel, with its grid as sized for the GPU and capped at 3 blocks: then
 * each block runs many tiles (of several experts, wgrad's empty ones skipped) through one
 * ring, so the stages' mbarrier phases wrap across tiles. */
static void expert_layer_ws_matches_cpu(void)
{
    expert_layer_check(GPU_MOE_GEMM_WS);
    setenv("DSV3_MOE_WS_GRID", "3", 1);
    expert_layer_check(GPU_MOE_GEMM_WS);
    unsetenv("DSV3_MOE_WS_GRID");
}

/* The same with TMA loads (one thread issuing bulk tensor copies): A tiles that run past
 * their expert's rows, boxes past the tensors' edges (K 16, 48, 136; N 96, 272), wgrad's
 * zeroed tail rows, empty experts, and the ring wrapping on 3 blocks. */
static void expert_layer_ws_tma_matches_cpu(void)
{
    expert_layer_check(GPU_MOE_GEMM_WS_TMA);
    setenv("DSV3_MOE_WS_GRID", "3", 1);
    expert_layer_check(GPU_MOE_GEMM_WS_TMA);
    unsetenv("DSV3_MOE_WS_GRID");
}

/* One grouped linear of the benchmark: kind 0 fwd, 1 dgrad, 2 wgrad; I -> O per expert;
 * dense: the same total shape as one cuBLASLt GEMM (nk rows, no experts), for reference. */
struct moe_job {
    int kind, dense, nk, I, O;
    gpu_moe_plan *p;
    gpu_bf16 *in, *W, *out, *dout, *din;
    float *dW;
};

/* Expert weights 8 bytes off a 16-byte boundary (a flat layout with a 20-float router bias
 * before them, configs/small): the grouped GEMMs give bitwise what they give on aligned
 * weights (the call copies them to an aligned buffer rather than fall to cuBLAS's grouped
 * GEMM, whose align8 kernels faulted on them). */
static void misaligned_weights_same_bits(void)
{
    GT_NEED_GPU();
    dsv3_err e;
    int N = 200, H = 128, E = 20, K = 4, F = 64, nk = N * K;
    size_t mark = gpu_arena_mark(gt_ctx_);
    int32_t *idx = malloc((size_t)nk * 4);
    for (int n = 0; n < N; n++)
        for (int r = 0; r < K; r++)
            idx[n * K + r] = (n + 5 * r) % E;  /* distinct within a token */
    /* W holds 4 values, then the experts' weights: Wm + 4 is those at an 8-byte boundary */
    float *x = gt_rand_bf((size_t)nk * H, 1), *W = gt_rand_bf((size_t)E * F * H + 4, 0.2f);
    float *dy = gt_rand_bf((size_t)nk * F, 1);
    gpu_bf16 *gx = gt_up_bf(x, (size_t)nk * H), *gdy = gt_up_bf(dy, (size_t)nk * F);
    gpu_bf16 *Wa = gt_up_bf(W + 4, (size_t)E * F * H), *Wm = gt_up_bf(W, (size_t)E * F * H + 4);
    int32_t *gidx = gt_up(idx, (size_t)nk * 4);
    gpu_bf16 *ya = gt_poisoned((size_t)nk * F * 2), *ym = gt_poisoned((size_t)nk * F * 2);
    gpu_bf16 *da = gt_poisoned((size_t)nk * H * 2), *dm = gt_poisoned((size_t)nk * H * 2);
    REQUIRE(gx && gdy && Wa && Wm && gidx && ya && ym && da && dm);
    gpu_bf16 *Wo = Wm + 4;
    REQUIRE(((uintptr_t)Wo & 15) == 8);
    gpu_moe_plan p;
    REQUIRE(gpu_moe_plan_make(gt_ctx_, &p, gidx, N, K, E, &e) == 0);
    int ok = gpu_moe_linear_fwd(gt_ctx_, &p, ya, gx, Wa, H, F, &e) == 0 &&
             gpu_moe_linear_fwd(gt_ctx_, &p, ym, gx, Wo, H, F, &e) == 0 &&
             gpu_moe_linear_dgrad(gt_ctx_, &p, da, gdy, Wa, H, F, &e) == 0 &&
             gpu_moe_linear_dgrad(gt_ctx_, &p, dm, gdy, Wo, H, F, &e) == 0;
    CHECKF(ok, "%s", e.msg);
    if (ok) {
        float *a = gt_down_bf(ya, (size_t)nk * F), *m = gt_down_bf(ym, (size_t)nk * F);
        float *b = gt_down_bf(da, (size_t)nk * H), *n = gt_down_bf(dm, (size_t)nk * H);
        CHECK(a && m && !memcmp(a, m, (size_t)nk * F * 4));
        CHECK(b && n && !memcmp(b, n, (size_t)nk * H * 4));
        free(a), free(m), free(b), free(n);
    }
    gpu_moe_plan_free(&p);
    free(idx), free(x), free(W), free(dy);
    gt_reset(mark);
}

/* The TMA kernel's 16-byte epilogue (quad transposes through shuffles) against its plain
 * stores (DSV3_MOE_EPI_VEC=0): fwd, dgrad and wgrad bit for bit, on ragged expert loads with
 * an empty expert, rows that end mid-tile, N past a tile edge (O 264: one full 256-column
 * tile and an 8-column one), and a 3-block grid (tiles of several experts a block). */
static void epilogue_vec_same_bits(void)
{
    GT_NEED_GPU();
    dsv3_err e;
    int N = 173, H = 136, E = 9, K = 3, O = 264, nk = N * K;
    for (int grid = 0; grid < 2; grid++) {
        size_t mark = gpu_arena_mark(gt_ctx_);
        if (grid)
            setenv("DSV3_MOE_WS_GRID", "3", 1);
        int32_t *idx = malloc((size_t)nk * 4);
        for (int n = 0; n < N; n++)
            for (int r = 0; r < K; r++)  /* expert 8 gets no rows; 0 the most */
                idx[n * K + r] = (n % 5 == 0 ? r : (n * 7 + 3 * r) % 8);
        for (int n = 0; n < N; n++)  /* distinct within a token */
            if (idx[n * K] == idx[n * K + 1] || idx[n * K] == idx[n * K + 2] ||
                idx[n * K + 1] == idx[n * K + 2])
                idx[n * K] = 0, idx[n * K + 1] = 1, idx[n * K + 2] = 2;
        float *x = gt_rand_bf((size_t)nk * H, 1), *W = gt_rand_bf((size_t)E * O * H, 0.2f);
        float *dy = gt_rand_bf((size_t)nk * O, 1);
        gpu_bf16 *gx = gt_up_bf(x, (size_t)nk * H), *gdy = gt_up_bf(dy, (size_t)nk * O);
        gpu_bf16 *gW = gt_up_bf(W, (size_t)E * O * H);
        int32_t *gidx = gt_up(idx, (size_t)nk * 4);
        gpu_bf16 *y[2], *d[2];
        float *dW[2];
        for (int v = 0; v < 2; v++) {
            y[v] = gt_poisoned((size_t)nk * O * 2);
            d[v] = gt_poisoned((size_t)nk * H * 2);
            float *z = gt_zeros((size_t)E * O * H);
            dW[v] = gt_up(z, (size_t)E * O * H * 4);
            free(z);
        }
        REQUIRE(gx && gdy && gW && gidx && y[0] && y[1] && d[0] && d[1] && dW[0] && dW[1]);
        gpu_moe_plan p;
        REQUIRE(gpu_moe_plan_make(gt_ctx_, &p, gidx, N, K, E, &e) == 0);
        int ok = 1;
        for (int v = 0; v < 2 && ok; v++) {  /* v 0: plain stores, 1: the default */
            if (v == 0)
                setenv("DSV3_MOE_EPI_VEC", "0", 1);
            else
                unsetenv("DSV3_MOE_EPI_VEC");
            ok = gpu_moe_linear_fwd(gt_ctx_, &p, y[v], gx, gW, H, O, &e) == 0 &&
                 gpu_moe_linear_dgrad(gt_ctx_, &p, d[v], gdy, gW, H, O, &e) == 0 &&
                 gpu_moe_linear_wgrad(gt_ctx_, &p, dW[v], gdy, gx, H, O, &e) == 0;
        }
        unsetenv("DSV3_MOE_EPI_VEC");
        unsetenv("DSV3_MOE_WS_GRID");
        CHECKF(ok, "%s", e.msg);
        if (ok) {
            float *a = gt_down_bf(y[0], (size_t)nk * O), *b = gt_down_bf(y[1], (size_t)nk * O);
            float *c = gt_down_bf(d[0], (size_t)nk * H), *f = gt_down_bf(d[1], (size_t)nk * H);
            float *g = gt_down_f(dW[0], (size_t)E * O * H), *h = gt_down_f(dW[1], (size_t)E * O * H);
            CHECKF(a && b && !memcmp(a, b, (size_t)nk * O * 4), "fwd differs (grid %d)", grid);
            CHECKF(c && f && !memcmp(c, f, (size_t)nk * H * 4), "dgrad differs (grid %d)", grid);
            CHECKF(g && h && !memcmp(g, h, (size_t)E * O * H * 4), "wgrad differs (grid %d)", grid);
            free(a), free(b), free(c), free(f), free(g), free(h);
        }
        gpu_moe_plan_free(&p);
        free(idx), free(x), free(W), free(dy);
        gt_reset(mark);
    }
}

static int moe_run(void *arg, dsv3_err *e)
{
    struct moe_job *j = arg;
    if (j->dense)
        switch (j->kind) {
        case 0: return gpu_linear_fwd(gt_ctx_, j->out, j->in, j->W, j->nk, j->I, j->O, 0.0f, e);
        case 1: return gpu_linear_dgrad(gt_ctx_, j->din, j->dout, j->W, j->nk, j->I, j->O, 0.0f, e);
        default: return gpu_linear_wgrad(gt_ctx_, j->dW, j->dout, j->in, j->nk, j->I, j->O, 1.0f, e);
        }
    switch (j->kind) {
    case 0: return gpu_moe_linear_fwd(gt_ctx_, j->p, j->out, j->in, j->W, j->I, j->O, e);
    case 1: return gpu_moe_linear_dgrad(gt_ctx_, j->p, j->din, j->dout, j->W, j->I, j->O, e);
    default: return gpu_moe_linear_wgrad(gt_ctx_, j->p, j->dW, j->dout, j->in, j->I, j->O, e);
    }
}

static int ceiling_run(void *arg, dsv3_err *e)
{
    gpu_bf16 **b = arg;
    return gpu_linear_fwd(gt_ctx_, b[2], b[0], b[1], 8192, 8192, 8192, 0.0f, e);
}

/* The routed-expert GEMMs of the 1B-class MoE (configs/1b-moe.json: 32 experts, 4 a token,
 * hidden 1024, expert width 512) for 16384 tokens: gate-up 1024 -> 1024 and down 512 ->
 * 1024, forward, dgrad and wgrad, with balanced routing (2048 rows an expert) and random
 * top-4 routing (ragged), through our kernels (wgmma, mma.sync) and cuBLAS's grouped GEMM; against the
 * dense 8192^3 rate and one dense GEMM of the same total shape, measured in the same run. */
static void bench_grouped_gemm(void)
{
    GT_NEED_GPU();
    if (!gt_bench())
        SKIP("set DSV3_GPU_BENCH=1");
    dsv3_err e;
    int N = 16384, K = 4, E = 32, H = 1024, F = 512, nk = N * K;
    size_t n8 = (size_t)8192 * 8192;
    gpu_bf16 *cb[3] = {gb_random_bf(n8, 1), gb_random_bf(n8, 1), gb_random_bf(n8, 1)};
    REQUIRE(cb[0] && cb[1] && cb[2]);
    float cms = gb_time(ceiling_run, cb, 10);
    double ceil = 2.0 * n8 * 8192 / (cms * 1e-3) / 1e12;
    printf("# bench %-44s %8.3f ms %7.1f TFLOP/s (the ceiling)\n", "gemm 8192^3 bf16", cms, ceil);
    gpu_free(cb[0]), gpu_free(cb[1]), gpu_free(cb[2]);
    int32_t *idx = malloc((size_t)nk * 4);
    size_t mark = gpu_arena_mark(gt_ctx_);
    int32_t *gidx = gt_up(idx, (size_t)nk * 4);
    struct moe_job j = {0};
    j.nk = nk;
    j.in = gb_random_bf((size_t)nk * H, 1), j.W = gb_random_bf((size_t)E * H * H, 0.1f);
    j.out = gpu_malloc((size_t)nk * H * 2, &e), j.dout = gb_random_bf((size_t)nk * H, 1);
    j.din = gpu_malloc((size_t)nk * H * 2, &e), j.dW = gpu_malloc((size_t)E * H * H * 4, &e);
    REQUIRE(gidx && j.in && j.W && j.out && j.dout && j.din && j.dW);
    gpu_memset(gt_ctx_, j.dW, 0, (size_t)E * H * H * 4, &e);
    static const char *kinds[] = {"fwd", "dgrad", "wgrad"};
    for (int routing = 0; routing < 2; routing++) {
        for (int n = 0; n < N; n++) /* balanced: 2048 rows an expert; random: distinct top-4 */
            for (int r = 0; r < K; r++) {
                int x, dup;
                do {
                    x = routing == 0 ? (n % 8) + 8 * r : (int)(test_rand() % (uint64_t)E);
                    dup = 0;
                    for (int q = 0; q < r; q++)
                        dup |= idx[n * K + q] == x;
                } while (dup);
                idx[n * K + r] = x;
            }
        REQUIRE(gpu_upload(gt_ctx_, gidx, idx, (size_t)nk * 4, &e) == 0);
        gpu_moe_plan p; /* made on the cuBLAS setting: the host offsets read once, here */
        gpu_moe_set_gemm(gt_ctx_, GPU_MOE_GEMM_CUBLAS);
        REQUIRE(gpu_moe_plan_make(gt_ctx_, &p, gidx, N, K, E, &e) == 0);
        gpu_moe_set_gemm(gt_ctx_, GPU_MOE_GEMM_DEFAULT);
        j.p = &p;
        for (int shape = 0; shape < 2; shape++) {
            j.I = shape == 0 ? H : F, j.O = shape == 0 ? 2 * F : H;
            double fl = 2.0 * nk * j.I * j.O;
            for (int k = 0; k < 3; k++) {
                j.kind = k;
                /* default (wgmma swizzled on Hopper), wgmma, wgmma pipelined, mma.sync, cuBLAS
                 * grouped, warp-specialised, dense same shape, ws + TMA */
                float ms[8];
                static const int var[8] = {GPU_MOE_GEMM_DEFAULT,    GPU_MOE_GEMM_WGMMA,
                                           GPU_MOE_GEMM_WGMMA_PIPE, GPU_MOE_GEMM_MMA,
                                           GPU_MOE_GEMM_CUBLAS,     GPU_MOE_GEMM_WS,
                                           GPU_MOE_GEMM_DEFAULT,    GPU_MOE_GEMM_WS_TMA};
                for (int v = 0; v < 8; v++) {
                    j.dense = v == 6;
                    if (routing == 1 && v == 6) {
                        ms[v] = 0;
                        continue;
                    }
                    gpu_moe_set_gemm(gt_ctx_, var[v]);
                    ms[v] = gb_time(moe_run, &j, 20);
                    CHECK(ms[v] > 0);
                }
                gpu_moe_set_gemm(gt_ctx_, GPU_MOE_GEMM_DEFAULT);
                char name[96];
                snprintf(name, sizeof name, "moe %s %s %s %dx%d->%d", kinds[k],
                         shape ? "down" : "gate-up", routing ? "random" : "balanced", nk, j.I,
                         j.O);
#define TF(x) (fl / ((x) * 1e-3) / 1e12)
                printf("# bench %-40s %7.3f ms %6.1f TFLOP/s %5.1f%% of ceiling | wgmma %6.1f | "
                       "wgmma pipelined %6.1f | warp-specialised %6.1f | ws + TMA %6.1f | "
                       "mma.sync %6.1f | cuBLAS grouped %6.1f",
                       name, ms[0], TF(ms[0]), 100.0 * TF(ms[0]) / ceil, TF(ms[1]), TF(ms[2]),
                       TF(ms[5]), TF(ms[7]), TF(ms[3]), TF(ms[4]));
                if (ms[6] > 0)
                    printf(" | dense same shape %6.1f", TF(ms[6]));
#undef TF
                printf(" TFLOP/s\n");
            }
        }
        gpu_moe_plan_free(&p);
    }
    gpu_free(j.in), gpu_free(j.W), gpu_free(j.out), gpu_free(j.dout), gpu_free(j.din);
    gpu_free(j.dW);
    free(idx);
    gt_reset(mark);
}

int main(void)
{
    test_seed();
    RUN(router_matches_cpu);
    RUN(expert_layer_matches_cpu);
    RUN(expert_layer_mma_matches_cpu);
    RUN(expert_layer_cublas_matches_cpu);
    RUN(expert_layer_wgmma_matches_cpu);
    RUN(expert_layer_wgmma_sw_matches_cpu);
    RUN(expert_layer_ws_matches_cpu);
    RUN(expert_layer_ws_tma_matches_cpu);
    RUN(misaligned_weights_same_bits);
    RUN(epilogue_vec_same_bits);
    RUN(bench_grouped_gemm);
    if (gt_ctx_)
        gpu_ctx_destroy(gt_ctx_);
    TEST_EXIT();
}
