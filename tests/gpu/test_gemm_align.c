/* GPU test of kernels/gemm on operands below 16-byte alignment: a model's flat parameter
 * layout puts bf16 weights at any even byte offset (configs/small: every tensor after a
 * router bias of 20 floats sits at an 8-byte boundary), and cuBLASLt must be told so or its
 * kernels fault ("misaligned address"). The three linear products (forward, input gradient,
 * weight gradient with beta 1) with the weight, and then every operand, moved off 16-byte
 * alignment by 2, 4 and 8 bytes, against a CPU product of the same bf16 inputs; then the
 * aligned case again, which must still work after the misaligned ones were cached. */
#include "../../kernels/gemm.h"
#include "gpu_test.h"

/* y[N,O] = x[N,I] w[O,I]^T in double. */
static void ref_fwd(float *y, const float *x, const float *w, int N, int I, int O)
{
    for (int n = 0; n < N; n++)
        for (int o = 0; o < O; o++) {
            double s = 0;
            for (int i = 0; i < I; i++)
                s += (double)x[(size_t)n * I + i] * w[(size_t)o * I + i];
            y[(size_t)n * O + o] = (float)s;
        }
}

static void case_at(int shift_w, int shift_all)
{
    dsv3_err e;
    const int N = 72, I = 136, O = 200; /* multiples of 8, not of the tiles */
    size_t mark = gpu_arena_mark(gt_ctx_);
    float *x = gt_rand_bf((size_t)N * I, 1), *w = gt_rand_bf((size_t)O * I, 1);
    float *dy = gt_rand_bf((size_t)N * O, 1);
    /* shift in bf16 elements: 1, 2, 4 elements = 2, 4, 8 bytes */
    gpu_bf16 *gx = gt_up_bf(x, (size_t)N * I + 8), *gw = gt_up_bf(w, (size_t)O * I + 8);
    gpu_bf16 *gdy = gt_up_bf(dy, (size_t)N * O + 8);
    gpu_bf16 *gy = gt_poisoned(((size_t)N * O + 8) * 2), *gdx = gt_poisoned(((size_t)N * I + 8) * 2);
    float *gdw = gt_poisoned(((size_t)O * I + 8) * 4);
    REQUIRE(gx && gw && gdy && gy && gdx && gdw);
    int sa = shift_all;
    /* the operands uploaded again at the shifted addresses (dw zeroed: beta 1 adds) */
    gpu_bf16 *xs = gx + sa, *ws = gw + shift_w, *dys = gdy + sa, *ys = gy + sa, *dxs = gdx + sa;
    float *dws = gdw + (sa ? 1 : 0);
    {
        gpu_bf16 *h = malloc(((size_t)O * I) * 2);
        for (size_t i = 0; i < (size_t)O * I; i++)
            h[i] = gpu_f2bf(w[i]);
        CHECK(gpu_upload(gt_ctx_, ws, h, (size_t)O * I * 2, &e) == 0);
        free(h);
        h = malloc((size_t)N * I * 2);
        for (size_t i = 0; i < (size_t)N * I; i++)
            h[i] = gpu_f2bf(x[i]);
        CHECK(gpu_upload(gt_ctx_, xs, h, (size_t)N * I * 2, &e) == 0);
        free(h);
        h = malloc((size_t)N * O * 2);
        for (size_t i = 0; i < (size_t)N * O; i++)
            h[i] = gpu_f2bf(dy[i]);
        CHECK(gpu_upload(gt_ctx_, dys, h, (size_t)N * O * 2, &e) == 0);
        free(h);
        float *z = calloc((size_t)O * I, 4);
        CHECK(gpu_upload(gt_ctx_, dws, z, (size_t)O * I * 4, &e) == 0);
        free(z);
    }
    CHECKF(gpu_linear_fwd(gt_ctx_, ys, xs, ws, N, I, O, 0.0f, &e) == 0 &&
               gpu_linear_dgrad(gt_ctx_, dxs, dys, ws, N, I, O, 0.0f, &e) == 0 &&
               gpu_linear_wgrad(gt_ctx_, dws, dys, xs, N, I, O, 1.0f, &e) == 0 &&
               gpu_sync(gt_ctx_, &e) == 0,
           "shift w %d all %d: %s", shift_w, shift_all, e.msg);
    if (!test_failed_) {
        float *y = gt_down_bf(ys, (size_t)N * O), *dx = gt_down_bf(dxs, (size_t)N * I);
        float *dw = gt_down_f(dws, (size_t)O * I);
        float *ry = malloc((size_t)N * O * 4), *rdx = malloc((size_t)N * I * 4);
        float *rdw = malloc((size_t)O * I * 4), *wt = malloc((size_t)O * I * 4);
        float *dyt = malloc((size_t)N * O * 4), *xt = malloc((size_t)N * I * 4);
        ref_fwd(ry, x, w, N, I, O);
        for (int o = 0; o < O; o++) /* dx = dy w: w^T as [I,O] */
            for (int i = 0; i < I; i++)
                wt[(size_t)i * O + o] = w[(size_t)o * I + i];
        ref_fwd(rdx, dy, wt, N, O, I);
        for (int n = 0; n < N; n++) { /* dw = dy^T x */
            for (int o = 0; o < O; o++)
                dyt[(size_t)o * N + n] = dy[(size_t)n * O + o];
            for (int i = 0; i < I; i++)
                xt[(size_t)i * N + n] = x[(size_t)n * I + i];
        }
        ref_fwd(rdw, dyt, xt, O, N, I);
        double a = gt_relerr(y, ry, (size_t)N * O), b = gt_relerr(dx, rdx, (size_t)N * I);
        double c = gt_relerr(dw, rdw, (size_t)O * I);
        printf("# gemm shift w %d B all %d B: fwd %.2e dgrad %.2e wgrad %.2e\n", 2 * shift_w,
               2 * shift_all, a, b, c);
        CHECKF(a <= BF16_BOUND && b <= BF16_BOUND && c <= F32_BOUND,
               "shift w %d all %d: fwd %.2e dgrad %.2e wgrad %.2e", shift_w, shift_all, a, b, c);
        free(y), free(dx), free(dw), free(ry), free(rdx), free(rdw), free(wt), free(dyt), free(xt);
    }
    free(x), free(w), free(dy);
    gt_reset(mark);
}

static void gemm_misaligned_operands(void)
{
    GT_NEED_GPU();
    static const int cases[][2] = {{4, 0}, {2, 0}, {1, 0}, {4, 4}, {1, 1}, {0, 0}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0] && !test_failed_; i++)
        case_at(cases[i][0], cases[i][1]);
}

int main(void)
{
    test_seed();
    RUN(gemm_misaligned_operands);
    if (gt_ctx_)
        gpu_ctx_destroy(gt_ctx_);
    TEST_EXIT();
}
