/* GPU test of kernels/fp8 and kernels/fp8gemm.
 *
 * Quantisation: every kernel against lib/fp8 (the CPU reference, itself checked bit for bit
 * against torch) byte for byte and scale for scale, on fresh random bf16/fp32 inputs whose
 * magnitudes spread over 2^-24 .. 2^10 (so subnormal codes, saturation at 448 and all-zero
 * tiles occur), ragged sizes included. GEMMs: fprop, dgrad and wgrad against a float64
 * product of the dequantised operands (the GPU's own codes and scales), on inputs whose
 * magnitude changes per 128-block, so a scale applied to the wrong block shows. With
 * DSV3_GPU_BENCH=1 also the benchmark of scripts/bench-fp8.sh: per-GEMM TFLOP/s of the
 * block-scaled FP8 path, cuBLASLt BF16 and a per-tensor-scaled FP8 GEMM on the linear layers
 * of configs/1b-moe.json and of V3, and the quantisers' GB/s against the copy rate. */
#include <omp.h>

#include "../../kernels/fp8gemm.h"
#include "../../kernels/gemm.h"
#include "../../lib/fp8.h"
#include "bench.h"

/* bf16 values u * 2^e, e spread so a 128-tile holds values 2^-24 .. 1 of its amax; one row
 * in 16 zero (zero tiles: scale 1). */
static float *rand_wide(int rows, int cols, int as_bf16)
{
    float *x = malloc((size_t)rows * cols * sizeof *x + 4);
    for (int r = 0; r < rows; r++) {
        int zero = test_rand() % 16 == 0, tile_e = (int)(test_rand() % 21) - 10;
        for (int c = 0; c < cols; c++) {
            float v = zero ? 0.0f : ldexpf(gt_uniform(1), tile_e - (int)(test_rand() % 25));
            x[(size_t)r * cols + c] = as_bf16 ? gpu_bf2f(gpu_f2bf(v)) : v;
        }
    }
    return x;
}

static void *down(const void *d, size_t bytes)
{
    dsv3_err e;
    void *h = malloc(bytes + 4);
    if (gpu_download(gt_ctx_, h, d, bytes, &e))
        fprintf(stderr, "    download: %s\n", e.msg);
    return h;
}

static float *transpose(const float *x, int rows, int cols)
{
    float *t = malloc((size_t)rows * cols * sizeof *t + 4);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++)
            t[(size_t)c * rows + r] = x[(size_t)r * cols + c];
    return t;
}

static long count_diff_bytes(const uint8_t *a, const uint8_t *b, size_t n)
{
    long d = 0;
    for (size_t i = 0; i < n; i++)
        d += a[i] != b[i];
    return d;
}

static int same_bits(float a, float b)
{
    return memcmp(&a, &b, 4) == 0;
}

static const int qshapes[][2] = {{1, 16}, {3, 100}, {130, 257}, {257, 384}, {64, 1000},
                                 {300, 7168}, {129, 1}};

static void quant_act_matches_cpu(void)
{
    GT_NEED_GPU();
    dsv3_err e;
    long bad_q = 0, bad_s = 0, bad_qt = 0, bad_st = 0, bad_f = 0;
    for (size_t k = 0; k < sizeof qshapes / sizeof qshapes[0]; k++) {
        int R = qshapes[k][0], C = qshapes[k][1];
        size_t n = (size_t)R * C, mark = gpu_arena_mark(gt_ctx_);
        int64_t cb = fp8_blocks(C), rb = fp8_blocks(R);
        float *x = rand_wide(R, C, 1);
        gpu_bf16 *dx = gt_up_bf(x, n);
        uint8_t *dq = gt_poisoned(n), *dqt = gt_poisoned(n);
        float *ds = gt_poisoned((size_t)cb * R * 4), *dst = gt_poisoned((size_t)rb * C * 4);
        REQUIRE(dx && dq && dqt && ds && dst);
        CHECKF(gpu_fp8_quant_act(gt_ctx_, dq, ds, dx, R, C, &e) == 0, "%s", e.msg);
        CHECKF(gpu_fp8_quant_act_t(gt_ctx_, dqt, dst, dx, R, C, &e) == 0, "%s", e.msg);
        /* the fused form must give the same bytes as the two separate kernels */
        uint8_t *fq = gt_poisoned(n), *fqt = gt_poisoned(n);
        float *fs = gt_poisoned((size_t)cb * R * 4), *fst = gt_poisoned((size_t)rb * C * 4);
        REQUIRE(fq && fqt && fs && fst);
        CHECKF(gpu_fp8_quant_act_both(gt_ctx_, fq, fs, fqt, fst, dx, R, C, &e) == 0, "%s", e.msg);
        uint8_t *q = down(dq, n), *qt = down(dqt, n), *hfq = down(fq, n), *hfqt = down(fqt, n);
        float *s = down(ds, (size_t)cb * R * 4), *st = down(dst, (size_t)rb * C * 4);
        float *hfs = down(fs, (size_t)cb * R * 4), *hfst = down(fst, (size_t)rb * C * 4);
        long fused = (memcmp(q, hfq, n) != 0) + (memcmp(qt, hfqt, n) != 0) +
                     (memcmp(s, hfs, (size_t)cb * R * 4) != 0) +
                     (memcmp(st, hfst, (size_t)rb * C * 4) != 0);
        CHECKF(fused == 0, "%dx%d: the fused quantisation differs in %ld outputs", R, C, fused);
        bad_f += fused;
        free(hfq), free(hfqt), free(hfs), free(hfst);
        /* CPU: rows as they are, then the transpose quantised the same way */
        uint8_t *rq = malloc(n + 4), *rqt = malloc(n + 4);
        float *rs = malloc((size_t)cb * R * 4 + 4), *rst = malloc((size_t)rb * C * 4 + 4);
        float *xt = transpose(x, R, C);
        REQUIRE(fp8_quant_act(x, R, C, rq, rs, 0, NULL) == 0);
        REQUIRE(fp8_quant_act(xt, C, R, rqt, rst, 0, NULL) == 0);
        long bq = count_diff_bytes(q, rq, n), bqt = count_diff_bytes(qt, rqt, n), bs = 0, bst = 0;
        for (int r = 0; r < R; r++)
            for (int64_t b = 0; b < cb; b++)
                bs += !same_bits(s[b * R + r], rs[r * cb + b]);
        for (int c = 0; c < C; c++)
            for (int64_t b = 0; b < rb; b++)
                bst += !same_bits(st[b * C + c], rst[c * rb + b]);
        CHECKF(bq + bs + bqt + bst == 0, "%dx%d: codes %ld, scales %ld, transposed %ld/%ld differ",
               R, C, bq, bs, bqt, bst);
        bad_q += bq, bad_s += bs, bad_qt += bqt, bad_st += bst;
        free(x), free(xt), free(q), free(qt), free(s), free(st), free(rq), free(rqt), free(rs),
            free(rst);
        gt_reset(mark);
    }
    gt_stat("fp8 quant act codes (mismatches)", (double)bad_q, 0);
    gt_stat("fp8 quant act scales (mismatches)", (double)bad_s, 0);
    gt_stat("fp8 quant act^T codes (mismatches)", (double)bad_qt, 0);
    gt_stat("fp8 quant act^T scales (mismatches)", (double)bad_st, 0);
    gt_stat("fp8 quant act both = separate (diffs)", (double)bad_f, 0);
}

static void quant_weight_matches_cpu(void)
{
    GT_NEED_GPU();
    dsv3_err e;
    long bad[2] = {0, 0};
    for (int as_bf16 = 0; as_bf16 < 2; as_bf16++)
        for (size_t k = 0; k < sizeof qshapes / sizeof qshapes[0]; k++) {
            int R = qshapes[k][0], C = qshapes[k][1];
            size_t n = (size_t)R * C, mark = gpu_arena_mark(gt_ctx_);
            int64_t rb = fp8_blocks(R), cb = fp8_blocks(C), lds = gpu_fp8_ld(C),
                    ldt = gpu_fp8_ld(R);
            float *w = rand_wide(R, C, as_bf16);
            void *dw = as_bf16 ? (void *)gt_up_bf(w, n) : gt_up(w, n * 4);
            uint8_t *dq = gt_poisoned(n), *dqt = gt_poisoned(n);
            float *ds = gt_poisoned((size_t)rb * lds * 4), *dst = gt_poisoned((size_t)cb * ldt * 4);
            REQUIRE(dw && dq && dqt && ds && dst);
            int rc = as_bf16 ? gpu_fp8_quant_weight_bf16(gt_ctx_, dq, ds, dqt, dst, dw, R, C, &e)
                             : gpu_fp8_quant_weight(gt_ctx_, dq, ds, dqt, dst, dw, R, C, &e);
            CHECKF(rc == 0, "%s", e.msg);
            uint8_t *q = down(dq, n), *qt = down(dqt, n);
            float *s = down(ds, (size_t)rb * lds * 4), *st = down(dst, (size_t)cb * ldt * 4);
            uint8_t *rq = malloc(n + 4);
            float *rs = malloc((size_t)rb * cb * 4 + 4);
            REQUIRE(fp8_quant_weight(w, R, C, rq, rs, 0, NULL) == 0);
            long bq = count_diff_bytes(q, rq, n), bqt = 0, bs = 0;
            for (int r = 0; r < R; r++)
                for (int c = 0; c < C; c++)
                    bqt += qt[(size_t)c * R + r] != rq[(size_t)r * C + c];
            for (int64_t i = 0; i < rb; i++)
                for (int64_t j = 0; j < cb; j++)
                    bs += !same_bits(s[i * lds + j], rs[i * cb + j]) +
                          !same_bits(st[j * ldt + i], rs[i * cb + j]);
            CHECKF(bq + bqt + bs == 0, "%s %dx%d: codes %ld, transposed %ld, scales %ld differ",
                   as_bf16 ? "bf16" : "fp32", R, C, bq, bqt, bs);
            bad[as_bf16] += bq + bqt + bs;
            free(w), free(q), free(qt), free(s), free(st), free(rq), free(rs);
            gt_reset(mark);
        }
    gt_stat("fp8 quant weight fp32 (mismatches)", (double)bad[0], 0);
    gt_stat("fp8 quant weight bf16 (mismatches)", (double)bad[1], 0);
}

/* ---- GEMMs ----------------------------------------------------------------------------- */

/* bf16 values uniform in [-1, 1] times 2^(row exponent + 128-column-block exponent), both in
 * [-3, 3]: each 1x128 tile and 128x128 block gets its own scale. */
static float *rand_blocky(int rows, int cols)
{
    float *x = malloc((size_t)rows * cols * sizeof *x + 4);
    int nb = (int)fp8_blocks(cols), *be = malloc(nb * sizeof *be);
    for (int b = 0; b < nb; b++)
        be[b] = (int)(test_rand() % 7) - 3;
    for (int r = 0; r < rows; r++) {
        int re = (int)(test_rand() % 7) - 3;
        for (int c = 0; c < cols; c++)
            x[(size_t)r * cols + c] =
                gpu_bf2f(gpu_f2bf(ldexpf(gt_uniform(1), re + be[c / FP8_BLOCK])));
    }
    free(be);
    return x;
}

/* The operands the GPU multiplied, from its codes and scales: act (1x128 tiles along the row
 * of q [rows x K], s [Kb x rows]) or weight (q [rows x K], s [rows_b x ld]). */
static double *deq_act(const uint8_t *q, const float *s, int rows, int K)
{
    double *x = malloc((size_t)rows * K * sizeof *x + 8);
    for (int r = 0; r < rows; r++)
        for (int k = 0; k < K; k++)
            x[(size_t)r * K + k] = (double)fp8_e4m3_to_f32(q[(size_t)r * K + k]) *
                                   s[(size_t)(k / FP8_BLOCK) * rows + r];
    return x;
}

static double *deq_weight(const uint8_t *q, const float *s, int rows, int K)
{
    double *x = malloc((size_t)rows * K * sizeof *x + 8);
    int64_t ld = gpu_fp8_ld(K);
    for (int r = 0; r < rows; r++)
        for (int k = 0; k < K; k++)
            x[(size_t)r * K + k] = (double)fp8_e4m3_to_f32(q[(size_t)r * K + k]) *
                                   s[(r / FP8_BLOCK) * ld + k / FP8_BLOCK];
    return x;
}

/* ref[M,N] = c0 + a[M,K] . b[N,K]^T in float64. */
static double *ref_tn(const double *a, const double *b, const float *c0, int M, int N, int K)
{
    double *y = malloc((size_t)M * N * sizeof *y + 8);
#pragma omp parallel for schedule(static)
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double acc = c0 ? c0[(size_t)i * N + j] : 0;
            const double *ai = a + (size_t)i * K, *bj = b + (size_t)j * K;
            for (int k = 0; k < K; k++)
                acc += ai[k] * bj[k];
            y[(size_t)i * N + j] = acc;
        }
    return y;
}

static double relerr_d(const float *out, const double *ref, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        if (isnan(out[i]) || isinf(out[i]))
            return INFINITY;
        num += (out[i] - ref[i]) * (out[i] - ref[i]);
        den += ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* fp32 output: fp32 accumulation alone would land far under 1e-5 here, but Hopper's FP8
 * tensor cores add each 128-long block of products with about 14 bits of precision (DeepSeek-V3
 * report, 3.3.2) before cuBLASLt promotes the block sum to fp32: measured 0.5-1.1e-4 (fprop)
 * and 2-3e-4 (wgrad) on an H200, 2026-11-27. Bound 1e-3, still 30x under the FP8 rounding of
 * the operands (~3e-2), so a misapplied scale cannot pass; bf16 output 1e-2. */
#define FP8_F32_BOUND 1e-3

/* If a product misses, the same product with each scale array transposed: says whether
 * cuBLASLt read the scales in another layout than fp8gemm.h states. */
static void probe_layouts(int N, int I, int O, const uint8_t *dxq, const float *xs_h,
                          const uint8_t *dwq, const float *ws_h, const double *ref)
{
    dsv3_err e;
    int64_t ib = fp8_blocks(I), ob = fp8_blocks(O), ld = gpu_fp8_ld(I);
    int64_t ldo = gpu_fp8_ld(O), wn = ob * ld > ib * ldo ? ob * ld : ib * ldo;
    float *xs_t = malloc((size_t)ib * N * 4), *ws_t = malloc((size_t)wn * 4);
    for (int n = 0; n < N; n++)
        for (int64_t b = 0; b < ib; b++)
            xs_t[n * ib + b] = xs_h[b * N + n];
    for (int64_t i = 0; i < wn; i++)
        ws_t[i] = 1;
    for (int64_t i = 0; i < ob; i++)
        for (int64_t j = 0; j < ib; j++)
            ws_t[j * ldo + i] = ws_h[i * ld + j];
    float *dxs[2] = {gt_up(xs_h, (size_t)ib * N * 4), gt_up(xs_t, (size_t)ib * N * 4)};
    float *dws[2] = {gt_up(ws_h, (size_t)ob * ld * 4), gt_up(ws_t, (size_t)wn * 4)};
    gpu_bf16 *dout = gt_poisoned((size_t)N * O * 2);
    for (int a = 0; a < 2; a++)
        for (int b = 0; b < 2; b++) {
            if (gpu_fp8_linear_fwd(gt_ctx_, dout, dxq, dxs[a], dwq, dws[b], N, I, O, 0, &e)) {
                printf("# probe act scales %s, weight scales %s: %s\n", a ? "[rows x Kb]" : "[Kb x rows]",
                       b ? "transposed" : "as stated", e.msg);
                continue;
            }
            float *out = gt_down_bf(dout, (size_t)N * O);
            printf("# probe act scales %s, weight scales %s: relative error %.3e\n",
                   a ? "[rows x Kb]" : "[Kb x rows]", b ? "transposed" : "as stated",
                   relerr_d(out, ref, (size_t)N * O));
            free(out);
        }
    free(xs_t), free(ws_t);
}

static const int gshapes[][3] = {{128, 128, 128}, {272, 336, 208}, {16, 1024, 48},
                                 {512, 1536, 640}, {256, 7168, 1536}, {128, 2048, 7168}};

static void gemms_match_float64(void)
{
    GT_NEED_GPU();
    dsv3_err e;
    double worst[4] = {0, 0, 0, 0}, worst_beta = 0;
    int probed = 0;
    for (size_t k = 0; k < sizeof gshapes / sizeof gshapes[0]; k++) {
        int N = gshapes[k][0], I = gshapes[k][1], O = gshapes[k][2];
        size_t mark = gpu_arena_mark(gt_ctx_);
        int64_t ib = fp8_blocks(I), ob = fp8_blocks(O), nb = fp8_blocks(N);
        float *x = rand_blocky(N, I), *w = rand_blocky(O, I), *dy = rand_blocky(N, O);
        float *dw0 = gt_rand_bf((size_t)O * I, 1);
        gpu_bf16 *bx = gt_up_bf(x, (size_t)N * I), *bw = gt_up_bf(w, (size_t)O * I),
                 *bdy = gt_up_bf(dy, (size_t)N * O);
        uint8_t *xq = gt_poisoned((size_t)N * I), *xtq = gt_poisoned((size_t)N * I),
                *wq = gt_poisoned((size_t)O * I), *wtq = gt_poisoned((size_t)O * I),
                *dyq = gt_poisoned((size_t)N * O), *dytq = gt_poisoned((size_t)N * O);
        float *xs = gt_poisoned((size_t)ib * N * 4), *xts = gt_poisoned((size_t)nb * I * 4),
              *ws = gt_poisoned((size_t)ob * gpu_fp8_ld(I) * 4),
              *wts = gt_poisoned((size_t)ib * gpu_fp8_ld(O) * 4),
              *dys = gt_poisoned((size_t)ob * N * 4), *dyts = gt_poisoned((size_t)nb * O * 4);
        gpu_bf16 *out = gt_poisoned((size_t)N * O * 2), *dx = gt_poisoned((size_t)N * I * 2);
        float *out32 = gt_poisoned((size_t)N * O * 4), *ddw = gt_up(dw0, (size_t)O * I * 4);
        REQUIRE(bx && bw && bdy && xq && xtq && wq && wtq && dyq && dytq && xs && xts && ws &&
                wts && dys && dyts && out && dx && out32 && ddw);
        int rc = gpu_fp8_quant_act(gt_ctx_, xq, xs, bx, N, I, &e) ||
                 gpu_fp8_quant_act_t(gt_ctx_, xtq, xts, bx, N, I, &e) ||
                 gpu_fp8_quant_weight_bf16(gt_ctx_, wq, ws, wtq, wts, bw, O, I, &e) ||
                 gpu_fp8_quant_act(gt_ctx_, dyq, dys, bdy, N, O, &e) ||
                 gpu_fp8_quant_act_t(gt_ctx_, dytq, dyts, bdy, N, O, &e);
        CHECKF(rc == 0, "quantise: %s", e.msg);
        if (rc) {
            gt_reset(mark);
            return;
        }
        int r0 = gpu_fp8_linear_fwd(gt_ctx_, out, xq, xs, wq, ws, N, I, O, 0, &e);
        CHECKF(r0 == 0, "fprop %dx%dx%d: %s", N, I, O, e.msg);
        int r1 = gpu_fp8_gemm(gt_ctx_, N, O, I, xq, xs, GPU_FP8_VEC128, wq, ws, GPU_FP8_BLK128,
                              0, out32, 1, 0, &e);
        CHECKF(r1 == 0, "fprop fp32 out %dx%dx%d: %s", N, I, O, e.msg);
        int r2 = gpu_fp8_linear_dgrad(gt_ctx_, dx, dyq, dys, wtq, wts, N, I, O, 0, &e);
        CHECKF(r2 == 0, "dgrad %dx%dx%d: %s", N, I, O, e.msg);
        int r3 = gpu_fp8_linear_wgrad(gt_ctx_, ddw, dytq, dyts, xtq, xts, N, I, O, 1, &e);
        CHECKF(r3 == 0, "wgrad %dx%dx%d: %s", N, I, O, e.msg);
        /* float64 references from the GPU's own codes and scales */
        uint8_t *h_xq = down(xq, (size_t)N * I), *h_wq = down(wq, (size_t)O * I),
                *h_wtq = down(wtq, (size_t)O * I), *h_dyq = down(dyq, (size_t)N * O),
                *h_dytq = down(dytq, (size_t)N * O), *h_xtq = down(xtq, (size_t)N * I);
        float *h_xs = down(xs, (size_t)ib * N * 4), *h_ws = down(ws, (size_t)ob * gpu_fp8_ld(I) * 4),
              *h_wts = down(wts, (size_t)ib * gpu_fp8_ld(O) * 4), *h_dys = down(dys, (size_t)ob * N * 4),
              *h_dyts = down(dyts, (size_t)nb * O * 4), *h_xts = down(xts, (size_t)nb * I * 4);
        double *dxd = deq_act(h_xq, h_xs, N, I), *dwd = deq_weight(h_wq, h_ws, O, I);
        double *dwtd = deq_weight(h_wtq, h_wts, I, O), *ddyd = deq_act(h_dyq, h_dys, N, O);
        double *ddytd = deq_act(h_dytq, h_dyts, O, N), *dxtd = deq_act(h_xtq, h_xts, I, N);
        double *ry = ref_tn(dxd, dwd, NULL, N, O, I), *rdx = ref_tn(ddyd, dwtd, NULL, N, I, O);
        double *rdw = ref_tn(ddytd, dxtd, dw0, O, I, N);
        double err[4] = {INFINITY, INFINITY, INFINITY, INFINITY};
        if (!r0) {
            float *o = gt_down_bf(out, (size_t)N * O);
            err[0] = relerr_d(o, ry, (size_t)N * O);
            free(o);
        }
        if (!r1) {
            float *o = gt_down_f(out32, (size_t)N * O);
            err[1] = relerr_d(o, ry, (size_t)N * O);
            free(o);
        }
        if (!r0) { /* beta 1 adds into the bf16 output: 2 y */
            double *r2y = malloc((size_t)N * O * sizeof *r2y);
            for (size_t i = 0; i < (size_t)N * O; i++)
                r2y[i] = 2 * ry[i];
            CHECKF(gpu_fp8_linear_fwd(gt_ctx_, out, xq, xs, wq, ws, N, I, O, 1, &e) == 0, "%s",
                   e.msg);
            float *o = gt_down_bf(out, (size_t)N * O);
            double eb = relerr_d(o, r2y, (size_t)N * O);
            worst_beta = eb > worst_beta ? eb : worst_beta;
            free(o), free(r2y);
        }
        if (!r2) {
            float *o = gt_down_bf(dx, (size_t)N * I);
            err[2] = relerr_d(o, rdx, (size_t)N * I);
            free(o);
        }
        if (!r3) {
            float *o = gt_down_f(ddw, (size_t)O * I);
            err[3] = relerr_d(o, rdw, (size_t)O * I);
            free(o);
        }
        printf("# fp8 gemm N=%d I=%d O=%d: fprop %.2e, fprop fp32 %.2e, dgrad %.2e, wgrad %.2e\n",
               N, I, O, err[0], err[1], err[2], err[3]);
        for (int i = 0; i < 4; i++)
            if (err[i] > worst[i])
                worst[i] = err[i];
        if (!r0 && err[0] > BF16_BOUND && !probed++)
            probe_layouts(N, I, O, xq, h_xs, wq, h_ws, ry);
        free(x), free(w), free(dy), free(dw0), free(h_xq), free(h_wq), free(h_wtq), free(h_dyq),
            free(h_dytq), free(h_xtq), free(h_xs), free(h_ws), free(h_wts), free(h_dys),
            free(h_dyts), free(h_xts), free(dxd), free(dwd), free(dwtd), free(ddyd), free(ddytd),
            free(dxtd), free(ry), free(rdx), free(rdw);
        gt_reset(mark);
    }
    gt_stat("fp8 gemm fprop (bf16 out)", worst[0], BF16_BOUND);
    gt_stat("fp8 gemm fprop beta=1 (bf16 out)", worst_beta, BF16_BOUND);
    gt_stat("fp8 gemm fprop (fp32 out)", worst[1], FP8_F32_BOUND);
    gt_stat("fp8 gemm dgrad (bf16 out)", worst[2], BF16_BOUND);
    gt_stat("fp8 gemm wgrad (fp32 out, +=)", worst[3], FP8_F32_BOUND);
}

static void gemm_refuses_misaligned(void)
{
    GT_NEED_GPU();
    dsv3_err e;
    uint8_t *q = gt_poisoned(64 * 64);
    float *s = gt_poisoned(64 * 4);
    gpu_bf16 *out = gt_poisoned(64 * 64 * 2);
    REQUIRE(q && s && out);
    e.msg[0] = 0;
    CHECK(gpu_fp8_linear_fwd(gt_ctx_, out, q, s, q, s, 8, 40, 16, 0, &e) != 0);
    CHECKF(strstr(e.msg, "multiples of 16") != NULL, "message: %s", e.msg);
}

/* ---- benchmark ------------------------------------------------------------------------- */

typedef struct bench_lin {
    int N, I, O;
    gpu_bf16 *x, *w, *dy, *out, *dx;
    float *dw;
    uint8_t *xq, *xtq, *wq, *wtq, *dyq, *dytq;
    float *xs, *xts, *ws, *wts, *dys, *dyts;
    int kind;  /* 0 fprop, 1 dgrad, 2 wgrad */
    int path;  /* 0 fp8 block, 1 bf16, 2 fp8 per-tensor, 3 activation quantisation */
} bench_lin;

static int bench_lin_run(void *arg, dsv3_err *e)
{
    bench_lin *b = arg;
    int N = b->N, I = b->I, O = b->O;
    switch (b->path * 3 + b->kind) {
    case 0: return gpu_fp8_linear_fwd(gt_ctx_, b->out, b->xq, b->xs, b->wq, b->ws, N, I, O, 0, e);
    case 1: return gpu_fp8_linear_dgrad(gt_ctx_, b->dx, b->dyq, b->dys, b->wtq, b->wts, N, I, O, 0, e);
    case 2: return gpu_fp8_linear_wgrad(gt_ctx_, b->dw, b->dytq, b->dyts, b->xtq, b->xts, N, I, O, 1, e);
    case 3: return gpu_linear_fwd(gt_ctx_, b->out, b->x, b->w, N, I, O, 0, e);
    case 4: return gpu_linear_dgrad(gt_ctx_, b->dx, b->dy, b->w, N, I, O, 0, e);
    case 5: return gpu_linear_wgrad(gt_ctx_, b->dw, b->dy, b->x, N, I, O, 1, e);
    case 6: return gpu_fp8_gemm(gt_ctx_, N, O, I, b->xq, NULL, 0, b->wq, NULL, 0, 0, b->out, 0, 0, e);
    case 7: return gpu_fp8_gemm(gt_ctx_, N, I, O, b->dyq, NULL, 0, b->wtq, NULL, 0, 0, b->dx, 0, 0, e);
    case 8: return gpu_fp8_gemm(gt_ctx_, O, I, N, b->dytq, NULL, 0, b->xtq, NULL, 0, 1, b->dw, 1, 0, e);
    /* the quantisations a layer's step needs: x for fprop and (transposed) wgrad in the
     * forward, dy for dgrad and wgrad in the backward, each one fused pass; weights once
     * per optimizer step, not counted */
    case 9: return gpu_fp8_quant_act_both(gt_ctx_, b->xq, b->xs, b->xtq, b->xts, b->x, N, I, e);
    case 10: return gpu_fp8_quant_act_both(gt_ctx_, b->dyq, b->dys, b->dytq, b->dyts, b->dy, N, O, e);
    default: return 0;
    }
}

static void *gmal(size_t bytes)
{
    dsv3_err e;
    return gpu_malloc(bytes + 256, &e);
}

static void bench_lin_free(bench_lin *b)
{
    void *p[] = {b->x, b->w, b->dy, b->out, b->dx, b->dw, b->xq, b->xtq, b->wq, b->wtq, b->dyq,
                 b->dytq, b->xs, b->xts, b->ws, b->wts, b->dys, b->dyts};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++)
        gpu_free(p[i]);
}

static int bench_lin_make(bench_lin *b, int N, int I, int O)
{
    dsv3_err e;
    memset(b, 0, sizeof *b);
    b->N = N, b->I = I, b->O = O;
    size_t ni = (size_t)N * I, oi = (size_t)O * I, no = (size_t)N * O;
    b->x = gb_random_bf(ni, 1), b->w = gb_random_bf(oi, 1), b->dy = gb_random_bf(no, 1);
    b->out = gmal(no * 2), b->dx = gmal(ni * 2), b->dw = gmal(oi * 4);
    b->xq = gmal(ni), b->xtq = gmal(ni), b->wq = gmal(oi), b->wtq = gmal(oi), b->dyq = gmal(no),
    b->dytq = gmal(no);
    b->xs = gmal(fp8_blocks(I) * N * 4), b->xts = gmal(fp8_blocks(N) * I * 4);
    b->ws = gmal(fp8_blocks(O) * gpu_fp8_ld(I) * 4), b->wts = gmal(fp8_blocks(I) * gpu_fp8_ld(O) * 4);
    b->dys = gmal(fp8_blocks(O) * N * 4), b->dyts = gmal(fp8_blocks(N) * O * 4);
    if (!(b->x && b->w && b->dy && b->out && b->dx && b->dw && b->xq && b->xtq && b->wq &&
          b->wtq && b->dyq && b->dytq && b->xs && b->xts && b->ws && b->wts && b->dys && b->dyts))
        return -1;
    if (gpu_memset(gt_ctx_, b->dw, 0, oi * 4, &e) ||
        gpu_fp8_quant_weight_bf16(gt_ctx_, b->wq, b->ws, b->wtq, b->wts, b->w, O, I, &e))
        return -1;
    for (int k = 0; k < 3; k++) {
        b->path = 3, b->kind = k;
        if (bench_lin_run(b, &e)) {
            fprintf(stderr, "    bench quantise: %s\n", e.msg);
            return -1;
        }
    }
    return 0;
}

static double tflops(double n, double i, double o, float ms)
{
    return 2.0 * n * i * o / (ms * 1e-3) / 1e12;
}

static void bench_quantisers(double copy_gbs)
{
    int N = 8192, C = 7168, R = 36864;
    bench_lin b;
    dsv3_err e;
    if (bench_lin_make(&b, N, C, 1024)) {
        CHECK(0);
        bench_lin_free(&b);
        return;
    }
    double act_bytes = (double)N * C * 3 + fp8_blocks(C) * (double)N * 4;
    float t[21], ms = 0;
    for (int i = -1; i < 21; i++) {
        gpu_timer tm;
        if (gpu_timer_start(gt_ctx_, &tm, &e) ||
            gpu_fp8_quant_act(gt_ctx_, b.xq, b.xs, b.x, N, C, &e) ||
            gpu_timer_stop(gt_ctx_, &tm, &ms, &e))
            break;
        if (i >= 0)
            t[i] = ms;
    }
    qsort(t, 21, sizeof *t, gb_cmpf);
    ms = t[10];
    printf("# bench %-40s %8.3f ms %7.0f GB/s %5.1f%% of copy\n", "fp8 quant act 8192x7168",
           ms, act_bytes / (ms * 1e-3) / 1e9, 100 * act_bytes / (ms * 1e-3) / 1e9 / copy_gbs);
    b.path = 3, b.kind = 0; /* both layouts in one pass */
    ms = gb_time(bench_lin_run, &b, 20);
    double both_bytes = (double)N * C * 4 + (fp8_blocks(C) * (double)N + fp8_blocks(N) * (double)C) * 4;
    printf("# bench %-40s %8.3f ms %7.0f GB/s %5.1f%% of copy\n", "fp8 quant act+act^T fused 8192x7168",
           ms, both_bytes / (ms * 1e-3) / 1e9, 100 * both_bytes / (ms * 1e-3) / 1e9 / copy_gbs);
    bench_lin_free(&b);
    /* the transposed quantiser on x [8192 x 7168] alone */
    gpu_bf16 *x = gb_random_bf((size_t)N * C, 1);
    uint8_t *qt = gmal((size_t)N * C);
    float *st = gmal(fp8_blocks(N) * C * 4);
    for (int i = -1; i < 21 && x && qt && st; i++) {
        gpu_timer tm;
        if (gpu_timer_start(gt_ctx_, &tm, &e) || gpu_fp8_quant_act_t(gt_ctx_, qt, st, x, N, C, &e) ||
            gpu_timer_stop(gt_ctx_, &tm, &ms, &e))
            break;
        if (i >= 0)
            t[i] = ms;
    }
    qsort(t, 21, sizeof *t, gb_cmpf);
    printf("# bench %-40s %8.3f ms %7.0f GB/s %5.1f%% of copy\n", "fp8 quant act^T 8192x7168",
           t[10], act_bytes / (t[10] * 1e-3) / 1e9,
           100 * act_bytes / (t[10] * 1e-3) / 1e9 / copy_gbs);
    gpu_free(x), gpu_free(qt), gpu_free(st);
    /* weights: fp32 master [36864 x 7168] -> codes and transposed codes */
    float *w = gmal((size_t)R * C * 4);
    uint8_t *q = gmal((size_t)R * C), *wqt = gmal((size_t)R * C);
    float *s = gmal(fp8_blocks(R) * gpu_fp8_ld(C) * 4), *wst = gmal(fp8_blocks(C) * gpu_fp8_ld(R) * 4);
    gpu_bf16 *wb = gb_random_bf((size_t)R * C, 1);
    if (w && q && wqt && s && wst && wb && gpu_bf16_to_f32(gt_ctx_, w, wb, (size_t)R * C, &e) == 0) {
        for (int i = -1; i < 21; i++) {
            gpu_timer tm;
            if (gpu_timer_start(gt_ctx_, &tm, &e) ||
                gpu_fp8_quant_weight(gt_ctx_, q, s, wqt, wst, w, R, C, &e) ||
                gpu_timer_stop(gt_ctx_, &tm, &ms, &e))
                break;
            if (i >= 0)
                t[i] = ms;
        }
        qsort(t, 21, sizeof *t, gb_cmpf);
        double wbytes = (double)R * C * 6;
        printf("# bench %-40s %8.3f ms %7.0f GB/s %5.1f%% of copy\n",
               "fp8 quant weight fp32 36864x7168 (+T)", t[10], wbytes / (t[10] * 1e-3) / 1e9,
               100 * wbytes / (t[10] * 1e-3) / 1e9 / copy_gbs);
    }
    gpu_free(w), gpu_free(q), gpu_free(wqt), gpu_free(s), gpu_free(wst), gpu_free(wb);
}

static void bench_fp8(void)
{
    GT_NEED_GPU();
    if (!gt_bench())
        SKIP("set DSV3_GPU_BENCH=1");
    dsv3_err e;
    double copy_gbs = 0;
    CHECKF(gpu_copy_bandwidth(0, (size_t)1 << 30, 10, &copy_gbs, &e) == 0, "%s", e.msg);
    printf("# bench %-40s %7.0f GB/s (read + write)\n", "copy 1 GiB", copy_gbs);
    bench_quantisers(copy_gbs);
    /* ceilings: 8192^3 in bf16, FP8 per-tensor (default and fast accumulation) */
    bench_lin b;
    if (bench_lin_make(&b, 8192, 8192, 8192) == 0) {
        b.kind = 0, b.path = 1;
        float bf = gb_time(bench_lin_run, &b, 10);
        b.path = 2;
        float f8 = gb_time(bench_lin_run, &b, 10);
        b.path = 0;
        float blk = gb_time(bench_lin_run, &b, 10);
        printf("# bench %-40s %8.3f ms %7.1f TFLOP/s\n", "ceiling 8192^3 bf16", bf,
               tflops(8192, 8192, 8192, bf));
        printf("# bench %-40s %8.3f ms %7.1f TFLOP/s\n", "ceiling 8192^3 fp8 per-tensor", f8,
               tflops(8192, 8192, 8192, f8));
        printf("# bench %-40s %8.3f ms %7.1f TFLOP/s\n", "8192^3 fp8 1x128 x 128x128", blk,
               tflops(8192, 8192, 8192, blk));
        float fa = -1;
        for (int i = -3; i < 10; i++) {
            gpu_timer tm;
            float t;
            if (gpu_timer_start(gt_ctx_, &tm, &e) ||
                gpu_fp8_gemm(gt_ctx_, 8192, 8192, 8192, b.xq, NULL, 0, b.wq, NULL, 0, 0, b.out,
                             0, GPU_FP8_FAST_ACCUM, &e) ||
                gpu_timer_stop(gt_ctx_, &tm, &t, &e))
                break;
            if (i >= 0 && (fa < 0 || t < fa))
                fa = t;
        }
        printf("# bench %-40s %8.3f ms %7.1f TFLOP/s (best of 10)\n",
               "ceiling 8192^3 fp8 per-tensor fast-acc", fa, tflops(8192, 8192, 8192, fa));
    } else {
        CHECK(0);
    }
    bench_lin_free(&b);
    static const struct { const char *name; int I, O; } sh[] = {
        {"1B q_a 1024->384", 1024, 384},        {"1B q_b 384->1536", 384, 1536},
        {"1B kv_a 1024->288", 1024, 288},       {"1B kv_b 256->2048", 256, 2048},
        {"1B o 1024->1024", 1024, 1024},        {"1B mlp up 1024->8192", 1024, 8192},
        {"1B mlp down 4096->1024", 4096, 1024}, {"1B expert up 1024->1024", 1024, 1024},
        {"1B expert down 512->1024", 512, 1024},
        {"V3 q_a 7168->1536", 7168, 1536},      {"V3 q_b 1536->24576", 1536, 24576},
        {"V3 kv_a 7168->576", 7168, 576},       {"V3 kv_b 512->32768", 512, 32768},
        {"V3 o 16384->7168", 16384, 7168},      {"V3 mlp up 7168->36864", 7168, 36864},
        {"V3 mlp down 18432->7168", 18432, 7168}, {"V3 expert up 7168->4096", 7168, 4096},
        {"V3 expert down 2048->7168", 2048, 7168},
    };
    static const char *kinds[] = {"fprop", "dgrad", "wgrad"};
    printf("# bench %-44s %8s %8s %8s  (TFLOP/s)\n", "product, layer, M tokens", "fp8blk", "bf16",
           "fp8tens");
    static const int Ms[] = {4096, 8192};
    for (int mi = 0; mi < 2; mi++)
        for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++) {
            int N = Ms[mi];
            if (bench_lin_make(&b, N, sh[s].I, sh[s].O)) {
                CHECKF(0, "bench buffers for %s", sh[s].name);
                bench_lin_free(&b);
                continue;
            }
            double sum[4] = {0, 0, 0, 0};
            for (int k = 0; k < 3; k++) {
                float t[4];
                b.kind = k;
                for (int p = 0; p < 4; p++) {
                    b.path = p;
                    t[p] = gb_time(bench_lin_run, &b, 10);
                    sum[p] += t[p];
                }
                CHECK(t[0] > 0 && t[1] > 0 && t[2] > 0 && t[3] >= 0);
                char name[96];
                snprintf(name, sizeof name, "%s %s M=%d", kinds[k], sh[s].name, N);
                printf("# bench %-44s %8.1f %8.1f %8.1f\n", name,
                       tflops(N, sh[s].I, sh[s].O, t[0]), tflops(N, sh[s].I, sh[s].O, t[1]),
                       tflops(N, sh[s].I, sh[s].O, t[2]));
            }
            /* the layer's three products: bf16 against FP8 with the activation
             * quantisations it needs (x and dy, each both layouts in one pass) */
            char name[96];
            snprintf(name, sizeof name, "layer %s M=%d", sh[s].name, N);
            printf("# bench %-44s bf16 %7.3f ms, fp8 %7.3f + quant %6.3f ms: %5.2fx (%5.2fx "
                   "without quant)\n", name, sum[1], sum[0], sum[3], sum[1] / (sum[0] + sum[3]),
                   sum[1] / sum[0]);
            bench_lin_free(&b);
        }
}

int main(void)
{
    test_seed();
    RUN(quant_act_matches_cpu);
    RUN(quant_weight_matches_cpu);
    RUN(gemms_match_float64);
    RUN(gemm_refuses_misaligned);
    RUN(bench_fp8);
    if (gt_ctx_)
        gpu_ctx_destroy(gt_ctx_);
    TEST_EXIT();
}
