/* GPU test of kernels/moe_fp8: the routed experts' FP8 grouped GEMMs and their quantisers.
 *
 * Quantisers against lib/fp8 byte for byte and scale for scale: activation rows (1x128 along
 * a row), expert weights (128x128, codes and transposed codes) and the token tiles of wgrad
 * (1x128 down a column within one expert's rows, transposed, zero codes past the expert).
 * GEMMs (fprop, dgrad, wgrad +=, from bf16 operands through gpu_moe_fp8_*) against a float64
 * product of lib/fp8's dequantised operands, on ragged expert sizes with empty experts, sizes
 * not multiples of 128, and a K of 7168 (56 promotions). Inputs are fresh random bf16 values
 * whose magnitude changes by powers of two per row and per 128-block, so a scale read for
 * the wrong row, column or block gives errors of order one. Outputs start poisoned (NaN):
 * an unwritten row shows; experts without rows must leave d_W bit for bit as it was. Every
 * kernel variant (DSV3_MOE_FP8_KERNEL 0-3) runs every case; variant 3 (warp-specialised,
 * TMA loads, persistent) also on 3 blocks (many tiles a block, the ring wrapping), and its
 * outputs must equal the default variant's bit for bit (the same products in the same order).
 *
 * Bounds: the reference uses the same dequantised operands, so what differs is only the
 * arithmetic: the tensor cores add each 128-long block with reduced precision before the
 * fp32 promotion (measured 1e-4 relative on cuBLASLt's FP8 GEMM, docs/KERNELS.md), then
 * fprop and dgrad round to bf16 (2^-9 relative, about 1.1e-3 RMS): bound 5e-3 relative L2
 * on bf16 outputs, 2e-3 on wgrad's fp32 increments.
 *
 * DSV3_GPU_BENCH=1 adds the benchmark (scripts/bench-moe-fp8.sh). */
#include <math.h>

#include "../../kernels/fp8gemm.h"
#include "../../kernels/gemm.h"
#include "../../kernels/moe_fp8.h"
#include "../../lib/fp8.h"
#include "bench.h"

#define BF16_OUT_BOUND 5e-3
#define F32_OUT_BOUND 2e-3

/* rows x cols bf16 values, uniform times 2^(-4..4) chosen per row and per 128-block. */
static float *rand_blocky(int64_t rows, int64_t cols)
{
    float *x = malloc(((size_t)(rows * cols) + 1) * sizeof *x);
    int sh = (int)(test_rand() % 9);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) {
            int ex = (int)((r / 128 * 5 + c / 128 * 3 + (r % 7) * 2 + sh) % 9) - 4;
            x[r * cols + c] = gpu_bf2f(gpu_f2bf(gt_uniform(1.0f) * ldexpf(1.0f, ex)));
        }
    return x;
}

static void *down(const void *d, size_t bytes)
{
    dsv3_err e;
    void *h = malloc(bytes ? bytes : 1);
    if (gpu_download(gt_ctx_, h, d, bytes, &e))
        fprintf(stderr, "    download: %s\n", e.msg);
    return h;
}

static double deq(uint8_t q, float s)
{
    return (double)fp8_e4m3_to_f32(q) * (double)s;
}

/* One test case: E experts with the given row counts, in features I, out features O. */
struct mcase {
    int E, I, O;
    const int *cnt;
};

/* lib/fp8 on one 1 x n vector: codes and scale, dequantised into out[i * stride]. */
static void cpu_tile(const float *v, int n, uint8_t *q, float *s, double *out, int64_t stride)
{
    int64_t bad;
    fp8_quant_act(v, 1, n, q, s, 1, &bad);
    for (int i = 0; i < n; i++)
        out[i * stride] = deq(q[i], *s);
}

/* x [rows x cols] quantised 1x128 along rows: lib/fp8's codes and scales, dequantised. */
static double *cpu_rows(const float *x, int64_t rows, int64_t cols, uint8_t *q, float *s)
{
    double *d = malloc(((size_t)(rows * cols) + 1) * sizeof *d);
    int64_t bad, nb = fp8_blocks(cols);
    fp8_quant_act(x, rows, cols, q, s, 1, &bad);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++)
            d[r * cols + c] = deq(q[r * cols + c], s[r * nb + c / 128]);
    return d;
}

/* x [nk x cols] quantised in token tiles (1x128 down a column, within each expert's rows),
 * dequantised in place of x's layout; expected codes qt [cols x ldk] and scales [T x cols]. */
static double *cpu_tokens(const float *x, const int *off, int E, int64_t cols, int64_t ldk,
                          uint8_t *qt, float *st)
{
    int64_t nk = off[E];
    double *d = malloc(((size_t)(nk * cols) + 1) * sizeof *d);
    float v[128];
    uint8_t q[128];
    int t = 0;
    for (int e = 0; e < E; e++)
        for (int r0 = off[e]; r0 < off[e + 1]; r0 += 128, t++) {
            int n = off[e + 1] - r0 < 128 ? off[e + 1] - r0 : 128;
            for (int64_t c = 0; c < cols; c++) {
                for (int i = 0; i < n; i++)
                    v[i] = x[(r0 + i) * cols + c];
                cpu_tile(v, n, q, &st[t * cols + c], &d[r0 * cols + c], cols);
                memset(qt + c * ldk + (int64_t)t * 128, 0, 128);
                memcpy(qt + c * ldk + (int64_t)t * 128, q, (size_t)n);
            }
        }
    return d;
}

/* W [E, O, I] quantised 128x128 per expert: codes, transposed codes, scales, dequantised. */
static double *cpu_weights(const float *W, int E, int64_t O, int64_t I, uint8_t *q, uint8_t *qt,
                           float *s)
{
    double *d = malloc((size_t)E * O * I * sizeof *d);
    int64_t bad, nbo = fp8_blocks(O), nbi = fp8_blocks(I);
    for (int e = 0; e < E; e++) {
        const float *w = W + e * O * I;
        uint8_t *qe = q + e * O * I;
        float *se = s + e * nbo * nbi;
        fp8_quant_weight(w, O, I, qe, se, 1, &bad);
        for (int64_t o = 0; o < O; o++)
            for (int64_t i = 0; i < I; i++) {
                d[(e * O + o) * I + i] = deq(qe[o * I + i], se[(o / 128) * nbi + i / 128]);
                qt[(e * I + i) * O + o] = qe[o * I + i];
            }
    }
    return d;
}

static int64_t mismatches(const uint8_t *a, const uint8_t *b, size_t n)
{
    int64_t k = 0;
    for (size_t i = 0; i < n; i++)
        k += a[i] != b[i];
    return k;
}

static int64_t fmismatches(const float *a, const float *b, size_t n)
{
    int64_t k = 0;
    for (size_t i = 0; i < n; i++)
        k += memcmp(&a[i], &b[i], 4) != 0;
    return k;
}

/* fprop, dgrad and wgrad again with kernel variant `v` (from bf16 operands, into fresh
 * poisoned outputs; d_W from dW0): how many values differ in bits from out, dx, dw. */
static int64_t variant_bit_diffs(int v, gpu_moe_plan *p, const struct mcase *mc, gpu_bf16 *gx,
                                 gpu_bf16 *gdy, gpu_bf16 *gW, const float *dW0,
                                 const float *out, const float *dx, const float *dw)
{
    dsv3_err e;
    int E = mc->E, I = mc->I, O = mc->O, nk = p->N;
    const char *was = getenv("DSV3_MOE_FP8_KERNEL");
    char keep[16] = "", vs[2] = {(char)('0' + v), 0};
    if (was)
        snprintf(keep, sizeof keep, "%s", was);
    setenv("DSV3_MOE_FP8_KERNEL", vs, 1);
    gpu_bf16 *gout = gt_poisoned((size_t)nk * O * 2), *gdx = gt_poisoned((size_t)nk * I * 2);
    float *gdW = gt_up(dW0, (size_t)E * O * I * 4);
    gpu_moe_fp8 m = {0};
    int64_t n = -1;
    if (gout && gdx && gdW && gpu_moe_fp8_init(&m, nk, E, I > O ? I : O, &e) == 0 &&
        gpu_moe_fp8_fwd(gt_ctx_, &m, p, gout, gx, gW, I, O, &e) == 0 &&
        gpu_moe_fp8_dgrad(gt_ctx_, &m, p, gdx, gdy, gW, I, O, &e) == 0 &&
        gpu_moe_fp8_wgrad(gt_ctx_, &m, p, gdW, gdy, gx, I, O, &e) == 0 &&
        gpu_sync(gt_ctx_, &e) == 0) {
        float *o2 = gt_down_bf(gout, (size_t)nk * O), *x2 = gt_down_bf(gdx, (size_t)nk * I),
              *w2 = gt_down_f(gdW, (size_t)E * O * I);
        for (int64_t i = 0; i < (int64_t)E * O * I; i++)
            w2[i] -= dW0[i]; /* as the caller's dw: the increment */
        n = fmismatches(o2, out, (size_t)nk * O) + fmismatches(x2, dx, (size_t)nk * I) +
            fmismatches(w2, dw, (size_t)E * O * I);
        free(o2), free(x2), free(w2);
    }
    gpu_moe_fp8_free(&m);
    if (was)
        setenv("DSV3_MOE_FP8_KERNEL", keep, 1);
    else
        unsetenv("DSV3_MOE_FP8_KERNEL");
    return n;
}

/* The three products with gpu_moe_fp8's kept codes (keep, a pass with a backward) against
 * the uncached outputs, bit for bit; rounds: how many passes to run first (weights kept). */
static int64_t keep_bit_diffs(gpu_moe_plan *p, const struct mcase *mc, gpu_bf16 *gx,
                              gpu_bf16 *gdy, gpu_bf16 *gW, const float *dW0, const float *out,
                              const float *dx, const float *dw, int rounds)
{
    dsv3_err e;
    int E = mc->E, I = mc->I, O = mc->O, nk = p->N;
    gpu_bf16 *gout = gt_poisoned((size_t)nk * O * 2), *gdx = gt_poisoned((size_t)nk * I * 2);
    float *gdW = gt_poisoned((size_t)E * O * I * 4);
    gpu_moe_fp8 m = {0};
    m.keep = 1;
    int64_t n = -1;
    int ok = gout && gdx && gdW && gpu_moe_fp8_init(&m, nk, E, I > O ? I : O, &e) == 0;
    gpu_moe_fp8_weights_changed(&m);
    for (int r = 0; r <= rounds && ok; r++) {
        gpu_moe_fp8_new_pass(&m, 1);
        ok = gpu_upload(gt_ctx_, gdW, dW0, (size_t)E * O * I * 4, &e) == 0 &&
             gpu_moe_fp8_fwd(gt_ctx_, &m, p, gout, gx, gW, I, O, &e) == 0 &&
             gpu_moe_fp8_dgrad(gt_ctx_, &m, p, gdx, gdy, gW, I, O, &e) == 0 &&
             gpu_moe_fp8_wgrad(gt_ctx_, &m, p, gdW, gdy, gx, I, O, &e) == 0 &&
             gpu_sync(gt_ctx_, &e) == 0;
    }
    if (ok) {
        float *o2 = gt_down_bf(gout, (size_t)nk * O), *x2 = gt_down_bf(gdx, (size_t)nk * I),
              *w2 = gt_down_f(gdW, (size_t)E * O * I);
        for (int64_t i = 0; i < (int64_t)E * O * I; i++)
            w2[i] -= dW0[i];
        n = fmismatches(o2, out, (size_t)nk * O) + fmismatches(x2, dx, (size_t)nk * I) +
            fmismatches(w2, dw, (size_t)E * O * I);
        free(o2), free(x2), free(w2);
    }
    gpu_moe_fp8_free(&m);
    return n;
}

/* same_as >= 0: the outputs must also equal kernel variant same_as's bit for bit. */
static void run_case(const struct mcase *mc, int same_as, double *worst)
{
    dsv3_err e;
    int E = mc->E, I = mc->I, O = mc->O;
    int *off = malloc((size_t)(E + 1) * sizeof *off);
    off[0] = 0;
    for (int x = 0; x < E; x++)
        off[x + 1] = off[x] + mc->cnt[x];
    int nk = off[E];
    int64_t T = gpu_moe_fp8_tiles(nk, E), ldk = 128 * T, nbi = fp8_blocks(I), nbo = fp8_blocks(O);
    size_t mark = gpu_arena_mark(gt_ctx_);
    float *x = rand_blocky(nk, I), *dy = rand_blocky(nk, O), *W = rand_blocky((int64_t)E * O, I);
    for (int c = 0; c < I && nk > 3; c++) /* a row of zeros: its tiles get scale 1 */
        x[3 * (int64_t)I + c] = 0.0f;
    float *dW0 = malloc((size_t)E * O * I * sizeof *dW0);
    for (int64_t i = 0; i < (int64_t)E * O * I; i++)
        dW0[i] = gt_uniform(1.0f);
    gpu_moe_plan p = {0};
    p.N = nk, p.k = 1, p.E = E;
    p.offsets = gt_up(off, (size_t)(E + 1) * sizeof *off);
    gpu_bf16 *gx = gt_up_bf(x, (size_t)nk * I), *gdy = gt_up_bf(dy, (size_t)nk * O),
             *gW = gt_up_bf(W, (size_t)E * O * I);
    gpu_bf16 *gout = gt_poisoned((size_t)nk * O * 2), *gdx = gt_poisoned((size_t)nk * I * 2);
    float *gdW = gt_up(dW0, (size_t)E * O * I * 4);
    uint8_t *q1 = gt_poisoned((size_t)nk * I), *q2 = gt_poisoned((size_t)E * O * I),
            *q3 = gt_poisoned((size_t)E * O * I), *q4 = gt_poisoned((size_t)I * ldk);
    float *s1 = gt_poisoned((size_t)nbi * nk * 4), *s2 = gt_poisoned((size_t)E * nbo * nbi * 4),
          *s4 = gt_poisoned((size_t)T * I * 4);
    int *ts = gt_poisoned((size_t)(E + 1) * 4);
    REQUIRE(p.offsets && gx && gdy && gW && gout && gdx && gdW && q1 && q2 && q3 && q4 && s1 &&
            s2 && s4 && ts);

    /* quantisers against lib/fp8 */
    uint8_t *hq1 = malloc((size_t)nk * I + 1), *hq2 = malloc((size_t)E * O * I),
            *hq3 = malloc((size_t)E * O * I), *hq4 = calloc((size_t)I * ldk, 1),
            *hqd = calloc((size_t)O * ldk + (size_t)nk * O + 1, 1);
    float *hs1 = malloc((size_t)(nbi * nk + 1) * 4), *hs1t = malloc((size_t)(nbi * nk + 1) * 4),
          *hs2 = malloc((size_t)E * nbo * nbi * 4), *hs4 = malloc((size_t)(T * I + 1) * 4),
          *hsd = malloc((size_t)(T * O + nbo * nk + 1) * 4);
    double *xd = cpu_rows(x, nk, I, hq1, hs1);
    for (int64_t r = 0; r < nk; r++) /* lib/fp8: [rows x blocks]; ours [blocks x rows] */
        for (int64_t b = 0; b < nbi; b++)
            hs1t[b * nk + r] = hs1[r * nbi + b];
    double *wd = cpu_weights(W, E, O, I, hq2, hq3, hs2);
    int *tsh = malloc((size_t)(E + 1) * sizeof *tsh);
    tsh[0] = 0;
    for (int q = 0; q < E; q++)
        tsh[q + 1] = tsh[q] + (mc->cnt[q] + 127) / 128;
    double *xtd = cpu_tokens(x, off, E, I, ldk, hq4, hs4);
    CHECKF(gpu_moe_fp8_quant_rows(gt_ctx_, q1, s1, gx, nk, I, &e) == 0 &&
               gpu_moe_fp8_quant_weights(gt_ctx_, q2, q3, s2, gW, E, O, I, &e) == 0 &&
               gpu_moe_fp8_tile_starts(gt_ctx_, &p, ts, &e) == 0 &&
               gpu_moe_fp8_quant_tokens_t(gt_ctx_, &p, ts, q4, s4, gx, I, &e) == 0,
           "%s", e.msg);
    uint8_t *dq1 = down(q1, (size_t)nk * I), *dq2 = down(q2, (size_t)E * O * I),
            *dq3 = down(q3, (size_t)E * O * I), *dq4 = down(q4, (size_t)I * ldk);
    float *ds1 = down(s1, (size_t)nbi * nk * 4), *ds2 = down(s2, (size_t)E * nbo * nbi * 4),
          *ds4 = down(s4, (size_t)T * I * 4);
    int *dts = down(ts, (size_t)(E + 1) * 4);
    CHECKF(memcmp(dts, tsh, (size_t)(E + 1) * 4) == 0, "tile starts differ (E %d)", E);
    int64_t bad_q = mismatches(dq1, hq1, (size_t)nk * I) + fmismatches(ds1, hs1t, (size_t)nbi * nk);
    int64_t bad_w = mismatches(dq2, hq2, (size_t)E * O * I) +
                    mismatches(dq3, hq3, (size_t)E * O * I) +
                    fmismatches(ds2, hs2, (size_t)E * nbo * nbi);
    int64_t bad_t = 0;
    for (int64_t c = 0; c < I; c++) /* only the tiles in use: tsh[E] of T */
        bad_t += mismatches(dq4 + c * ldk, hq4 + c * ldk, (size_t)tsh[E] * 128);
    bad_t += fmismatches(ds4, hs4, (size_t)tsh[E] * I);
    CHECKF(bad_q == 0, "row quantiser: %lld codes/scales differ from lib/fp8", (long long)bad_q);
    CHECKF(bad_w == 0, "weight quantiser: %lld codes/scales differ", (long long)bad_w);
    CHECKF(bad_t == 0, "token-tile quantiser: %lld codes/scales differ", (long long)bad_t);
    /* both from one read: the same codes as the two quantisers (lib/fp8's) */
    uint8_t *qb1 = gt_poisoned((size_t)nk * I + 16), *qb4 = gt_poisoned((size_t)I * ldk);
    float *sb1 = gt_poisoned((size_t)nbi * nk * 4 + 16), *sb4 = gt_poisoned((size_t)T * I * 4);
    REQUIRE(qb1 && qb4 && sb1 && sb4);
    CHECKF(gpu_moe_fp8_quant_both(gt_ctx_, &p, ts, qb1, sb1, qb4, sb4, gx, I, &e) == 0 &&
               gpu_sync(gt_ctx_, &e) == 0,
           "%s", e.msg);
    uint8_t *eq1 = down(qb1, (size_t)nk * I), *eq4 = down(qb4, (size_t)I * ldk);
    float *es1 = down(sb1, (size_t)nbi * nk * 4), *es4 = down(sb4, (size_t)T * I * 4);
    int64_t bad_b = mismatches(eq1, hq1, (size_t)nk * I) + fmismatches(es1, hs1t, (size_t)nbi * nk);
    for (int64_t c = 0; c < I; c++)
        bad_b += mismatches(eq4 + c * ldk, hq4 + c * ldk, (size_t)tsh[E] * 128);
    bad_b += fmismatches(es4, hs4, (size_t)tsh[E] * I);
    CHECKF(bad_b == 0, "rows + token-tile quantiser: %lld codes/scales differ from lib/fp8",
           (long long)bad_b);
    free(eq1), free(eq4), free(es1), free(es4);

    /* the products, float64 on lib/fp8's dequantised operands */
    gpu_moe_fp8 m = {0};
    int maxd = I > O ? I : O;
    CHECKF(gpu_moe_fp8_init(&m, nk, E, maxd, &e) == 0 &&
               gpu_moe_fp8_fwd(gt_ctx_, &m, &p, gout, gx, gW, I, O, &e) == 0 &&
               gpu_moe_fp8_dgrad(gt_ctx_, &m, &p, gdx, gdy, gW, I, O, &e) == 0 &&
               gpu_moe_fp8_wgrad(gt_ctx_, &m, &p, gdW, gdy, gx, I, O, &e) == 0 &&
               gpu_sync(gt_ctx_, &e) == 0,
           "%s", e.msg);
    double *dyd = cpu_rows(dy, nk, O, hqd, hsd);
    double *dytd = cpu_tokens(dy, off, E, O, ldk, hqd, hsd);
    float *rout = malloc((size_t)nk * O * 4 + 4), *rdx = malloc((size_t)nk * I * 4 + 4),
          *rdw = malloc((size_t)E * O * I * 4);
    for (int x0 = 0; x0 < E; x0++)
        for (int r = off[x0]; r < off[x0 + 1]; r++) {
            for (int o = 0; o < O; o++) {
                double a = 0;
                for (int i = 0; i < I; i++)
                    a += xd[(int64_t)r * I + i] * wd[((int64_t)x0 * O + o) * I + i];
                rout[(int64_t)r * O + o] = (float)a;
            }
            for (int i = 0; i < I; i++) {
                double a = 0;
                for (int o = 0; o < O; o++)
                    a += dyd[(int64_t)r * O + o] * wd[((int64_t)x0 * O + o) * I + i];
                rdx[(int64_t)r * I + i] = (float)a;
            }
        }
    for (int x0 = 0; x0 < E; x0++)
        for (int o = 0; o < O; o++)
            for (int i = 0; i < I; i++) {
                double a = 0;
                for (int r = off[x0]; r < off[x0 + 1]; r++)
                    a += dytd[(int64_t)r * O + o] * xtd[(int64_t)r * I + i];
                rdw[((int64_t)x0 * O + o) * I + i] = (float)a;
            }
    float *out = gt_down_bf(gout, (size_t)nk * O), *dx = gt_down_bf(gdx, (size_t)nk * I),
          *dw = gt_down_f(gdW, (size_t)E * O * I);
    int64_t empty_changed = 0;
    for (int x0 = 0; x0 < E; x0++)
        for (int64_t i = 0; i < (int64_t)O * I; i++) {
            int64_t at = (int64_t)x0 * O * I + i;
            if (mc->cnt[x0] == 0)
                empty_changed += memcmp(&dw[at], &dW0[at], 4) != 0;
            dw[at] -= dW0[at]; /* the increment */
        }
    CHECKF(empty_changed == 0, "wgrad changed %lld values of experts without rows",
           (long long)empty_changed);
    /* kept codes (gmodel's mode): weights once, the input's and d_out's token tiles from the
     * fused quantisations; twice (the second reads the kept weight codes): same bits */
    for (int round = 0; round < 2; round++) {
        int64_t nb = keep_bit_diffs(&p, mc, gx, gdy, gW, dW0, out, dx, dw, round);
        CHECKF(nb == 0, "kept codes, round %d: %lld outputs differ in bits (-1: it failed)",
               round, (long long)nb);
    }
    if (same_as >= 0) {
        int64_t nb = variant_bit_diffs(same_as, &p, mc, gx, gdy, gW, dW0, out, dx, dw);
        CHECKF(nb == 0, "%lld outputs differ in bits from kernel variant %d's (-1: it failed)",
               (long long)nb, same_as);
    }
    double ef = gt_relerr(out, rout, (size_t)nk * O), ed = gt_relerr(dx, rdx, (size_t)nk * I),
           ew = gt_relerr(dw, rdw, (size_t)E * O * I);
    printf("# moe fp8 E %d rows %d I %d O %d: fprop %.2e dgrad %.2e wgrad %.2e\n", E, nk, I, O,
           ef, ed, ew);
    worst[0] = fmax(worst[0], ef), worst[1] = fmax(worst[1], ed), worst[2] = fmax(worst[2], ew);
    gpu_moe_fp8_free(&m);
    free(off), free(x), free(dy), free(W), free(dW0), free(hq1), free(hq2), free(hq3), free(hq4);
    free(hqd), free(hs1), free(hs1t), free(hs2), free(hs4), free(hsd), free(xd), free(wd);
    free(tsh), free(xtd), free(dq1), free(dq2), free(dq3), free(dq4), free(ds1), free(ds2);
    free(ds4), free(dts), free(dyd), free(dytd), free(rout), free(rdx), free(rdw), free(out);
    free(dx), free(dw);
    gt_reset(mark);
}

static void fp8_grouped_gemms_match_reference(void)
{
    GT_NEED_GPU();
    dsv3_err e;
    if (!gpu_moe_fp8_fits(gt_ctx_, 16, 16))
        SKIP("the FP8 grouped GEMM needs a Hopper GPU");
    static const int c1[] = {0, 1, 130, 255, 0, 384, 77, 129};
    static const int c2[] = {300, 0, 0, 17, 200};
    static const int c3[] = {128, 128, 256, 0};
    static const int c4[] = {0, 70, 81};
    static const int c5[] = {5, 0, 40};
    const struct mcase cases[] = {
        {8, 256, 384, c1}, /* ragged, empty experts */
        {5, 272, 208, c2}, /* dimensions not multiples of 128 */
        {4, 1024, 512, c3}, /* 1B-MoE's down width, tile-aligned experts */
        {3, 7168, 256, c4}, /* V3's hidden size as K: 56 promotions */
        {3, 96, 48, c5},    /* every dimension under one tile (TMA boxes past all edges) */
    };
    /* every kernel variant (DSV3_MOE_FP8_KERNEL: 0 two warpgroups, 1 the same with the
     * promotion overlapped, 2 one warpgroup, 3 warp-specialised with TMA loads; pass 4 is
     * variant 3 on 3 blocks, DSV3_MOE_WS_GRID) */
    const char *was = getenv("DSV3_MOE_FP8_KERNEL");
    char keep[16] = "";
    if (was)
        snprintf(keep, sizeof keep, "%s", was);
    for (int pass = 0; pass < 5 && !test_failed_; pass++) {
        int vn = pass < 4 ? pass : 3;
        char v[2] = {(char)('0' + vn), 0}, tag[16];
        setenv("DSV3_MOE_FP8_KERNEL", v, 1);
        if (pass == 4)
            setenv("DSV3_MOE_WS_GRID", "3", 1);
        snprintf(tag, sizeof tag, "v%d%s", vn, pass == 4 ? " 3 blocks" : "");
        double worst[3] = {0, 0, 0};
        printf("# kernel variant %s\n", tag);
        for (size_t i = 0; i < sizeof cases / sizeof cases[0] && !test_failed_; i++)
            run_case(&cases[i], vn == 3 ? 2 : -1, worst);
        unsetenv("DSV3_MOE_WS_GRID");
        char n[64];
        snprintf(n, sizeof n, "moe fp8 fprop (bf16 out) %s", tag);
        gt_stat(n, worst[0], BF16_OUT_BOUND);
        snprintf(n, sizeof n, "moe fp8 dgrad (bf16 out) %s", tag);
        gt_stat(n, worst[1], BF16_OUT_BOUND);
        snprintf(n, sizeof n, "moe fp8 wgrad (fp32 +=) %s", tag);
        gt_stat(n, worst[2], F32_OUT_BOUND);
    }
    if (was)
        setenv("DSV3_MOE_FP8_KERNEL", keep, 1);
    else
        unsetenv("DSV3_MOE_FP8_KERNEL");
    /* a shape the kernel does not take is refused by the GEMM itself */
    gpu_moe_plan p = {0};
    CHECK(gpu_moe_fp8_gemm_fwd(gt_ctx_, &p, NULL, NULL, NULL, NULL, NULL, 24, 64, &e) != 0);
}

/* ---- benchmark ---- */

struct mjob {
    int kind, path, I, O; /* kind 0 fprop, 1 dgrad, 2 wgrad; path 0 fp8 GEMM only, 1 fp8 with
                           * quantisation (from bf16), 2 bf16 grouped GEMM */
    gpu_moe_plan *p;
    gpu_moe_fp8 *m;
    gpu_bf16 *x, *W, *out, *dy, *dx;
    float *dW;
    uint8_t *xq, *wq, *wtq, *dyq, *xtq, *dytq;
    float *xs, *ws, *dys, *xts, *dyts;
    int *ts;
};

static int mjob_run(void *arg, dsv3_err *e)
{
    struct mjob *j = arg;
    gpu_ctx *c = gt_ctx_;
    if (j->path == 2)
        switch (j->kind) {
        case 0: return gpu_moe_linear_fwd(c, j->p, j->out, j->x, j->W, j->I, j->O, e);
        case 1: return gpu_moe_linear_dgrad(c, j->p, j->dx, j->dy, j->W, j->I, j->O, e);
        default: return gpu_moe_linear_wgrad(c, j->p, j->dW, j->dy, j->x, j->I, j->O, e);
        }
    if (j->path == 1)
        switch (j->kind) {
        case 0: return gpu_moe_fp8_fwd(c, j->m, j->p, j->out, j->x, j->W, j->I, j->O, e);
        case 1: return gpu_moe_fp8_dgrad(c, j->m, j->p, j->dx, j->dy, j->W, j->I, j->O, e);
        default: return gpu_moe_fp8_wgrad(c, j->m, j->p, j->dW, j->dy, j->x, j->I, j->O, e);
        }
    switch (j->kind) {
    case 0: return gpu_moe_fp8_gemm_fwd(c, j->p, j->out, j->xq, j->xs, j->wq, j->ws, j->I, j->O, e);
    case 1:
        return gpu_moe_fp8_gemm_dgrad(c, j->p, j->dx, j->dyq, j->dys, j->wtq, j->ws, j->I, j->O, e);
    default:
        return gpu_moe_fp8_gemm_wgrad(c, j->p, j->ts, j->dW, j->dytq, j->dyts, j->xtq, j->xts,
                                      j->I, j->O, e);
    }
}

struct ceil_job {
    int fp8;
    gpu_bf16 *a, *b, *c;
    uint8_t *qa, *qb;
    float *sa, *sb;
};

static int ceil_run(void *arg, dsv3_err *e)
{
    struct ceil_job *j = arg;
    if (!j->fp8)
        return gpu_linear_fwd(gt_ctx_, j->c, j->a, j->b, 8192, 8192, 8192, 0.0f, e);
    return gpu_fp8_gemm(gt_ctx_, 8192, 8192, 8192, j->qa, j->sa, GPU_FP8_VEC128, j->qb, j->sb,
                        GPU_FP8_BLK128, 0.0f, j->c, 0, 0, e);
}

static void *dev_alloc(size_t bytes)
{
    dsv3_err e;
    void *d = gpu_malloc(bytes, &e);
    if (d && gpu_memset(gt_ctx_, d, 0, bytes, &e)) {
        gpu_free(d);
        return NULL;
    }
    return d;
}

/* Codes and scales of real data: random bf16 quantised by our own kernels. */
static int bench_operands(struct mjob *j, int nk, int E, dsv3_err *e)
{
    int I = j->I, O = j->O;
    return gpu_moe_fp8_quant_rows(gt_ctx_, j->xq, j->xs, j->x, nk, I, e) ||
           gpu_moe_fp8_quant_rows(gt_ctx_, j->dyq, j->dys, j->dy, nk, O, e) ||
           gpu_moe_fp8_quant_weights(gt_ctx_, j->wq, j->wtq, j->ws, j->W, E, O, I, e) ||
           gpu_moe_fp8_tile_starts(gt_ctx_, j->p, j->ts, e) ||
           gpu_moe_fp8_quant_tokens_t(gt_ctx_, j->p, j->ts, j->xtq, j->xts, j->x, I, e) ||
           gpu_moe_fp8_quant_tokens_t(gt_ctx_, j->p, j->ts, j->dytq, j->dyts, j->dy, O, e);
}

static void bench_shape(const char *name, int N, int K, int E, int I, int O, int random,
                        double c8, double c16)
{
    dsv3_err e;
    int nk = N * K;
    int64_t T = gpu_moe_fp8_tiles(nk, E), nbi = fp8_blocks(I), nbo = fp8_blocks(O);
    int32_t *idx = malloc((size_t)nk * 4);
    for (int n = 0; n < N; n++) /* balanced: distinct experts, N*K/E rows each; or random */
        for (int r = 0; r < K; r++) {
            int x, dup;
            do {
                x = random ? (int)(test_rand() % (uint64_t)E) : (n % (E / K)) + (E / K) * r;
                dup = 0;
                for (int q = 0; q < r; q++)
                    dup |= idx[n * K + q] == x;
            } while (dup);
            idx[n * K + r] = x;
        }
    int32_t *gidx = dev_alloc((size_t)nk * 4);
    struct mjob j = {0};
    gpu_moe_plan p;
    gpu_moe_fp8 m = {0};
    j.I = I, j.O = O, j.p = &p, j.m = &m;
    j.x = gb_random_bf((size_t)nk * I, 1), j.dy = gb_random_bf((size_t)nk * O, 1);
    j.W = gb_random_bf((size_t)E * O * I, 0.1f);
    j.out = dev_alloc((size_t)nk * O * 2), j.dx = dev_alloc((size_t)nk * I * 2);
    j.dW = dev_alloc((size_t)E * O * I * 4);
    j.xq = dev_alloc((size_t)nk * I), j.xs = dev_alloc((size_t)nbi * nk * 4);
    j.dyq = dev_alloc((size_t)nk * O), j.dys = dev_alloc((size_t)nbo * nk * 4);
    j.wq = dev_alloc((size_t)E * O * I), j.wtq = dev_alloc((size_t)E * O * I);
    j.ws = dev_alloc((size_t)E * nbo * nbi * 4);
    j.xtq = dev_alloc((size_t)I * T * 128), j.xts = dev_alloc((size_t)T * I * 4);
    j.dytq = dev_alloc((size_t)O * T * 128), j.dyts = dev_alloc((size_t)T * O * 4);
    j.ts = dev_alloc((size_t)(E + 1) * 4);
    REQUIRE(gidx && j.x && j.dy && j.W && j.out && j.dx && j.dW && j.xq && j.xs && j.dyq &&
            j.dys && j.wq && j.wtq && j.ws && j.xtq && j.xts && j.dytq && j.dyts && j.ts);
    REQUIRE(gpu_upload(gt_ctx_, gidx, idx, (size_t)nk * 4, &e) == 0);
    REQUIRE(gpu_moe_plan_make(gt_ctx_, &p, gidx, N, K, E, &e) == 0);
    REQUIRE(gpu_moe_fp8_init(&m, nk, E, I > O ? I : O, &e) == 0);
    REQUIRE(bench_operands(&j, nk, E, &e) == 0);
    static const char *kinds[] = {"fprop", "dgrad", "wgrad"};
    double fl = 2.0 * nk * I * O;
    for (int k = 0; k < 3; k++) {
        float ms[3], alt[4];
        j.kind = k;
        for (int path = 0; path < 3; path++) {
            j.path = path;
            ms[path] = gb_time(mjob_run, &j, 10);
            CHECK(ms[path] > 0);
        }
        /* every kernel variant, FP8 GEMM alone (DSV3_MOE_FP8_KERNEL) */
        const char *was = getenv("DSV3_MOE_FP8_KERNEL");
        char keep[16] = "";
        if (was)
            snprintf(keep, sizeof keep, "%s", was);
        j.path = 0;
        for (int v = 0; v < 4; v++) {
            char vs[2] = {(char)('0' + v), 0};
            setenv("DSV3_MOE_FP8_KERNEL", vs, 1);
            alt[v] = gb_time(mjob_run, &j, 10);
        }
        if (was)
            setenv("DSV3_MOE_FP8_KERNEL", keep, 1);
        else
            unsetenv("DSV3_MOE_FP8_KERNEL");
#define TF(x) (fl / ((x) * 1e-3) / 1e12)
        printf("# bench moe fp8 %-6s %-34s %7.3f ms %6.1f TFLOP/s %5.1f%% of fp8 ceiling | with "
               "quant %6.1f | bf16 grouped %6.1f (%4.1f%% of bf16 ceiling) | fp8/bf16 %.2fx, "
               "with quant %.2fx | kernels 0/1/2/3 %6.1f %6.1f %6.1f %6.1f\n",
               kinds[k], name, ms[0], TF(ms[0]), 100.0 * TF(ms[0]) / c8, TF(ms[1]), TF(ms[2]),
               100.0 * TF(ms[2]) / c16, ms[2] / ms[0], ms[2] / ms[1], TF(alt[0]), TF(alt[1]),
               TF(alt[2]), TF(alt[3]));
#undef TF
    }
    gpu_moe_plan_free(&p);
    gpu_moe_fp8_free(&m);
    void *bufs[] = {gidx,  j.x,   j.dy,  j.W,   j.out,  j.dx,   j.dW,  j.xq, j.xs, j.dyq,
                    j.dys, j.wq,  j.wtq, j.ws,  j.xtq,  j.xts,  j.dytq, j.dyts, j.ts};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        gpu_free(bufs[i]);
    free(idx);
}

/* The routed-expert GEMMs of configs/1b-moe (16384 tokens x top-4 of 32 experts: gate-up
 * 1024 -> 1024, down 512 -> 1024) and of a V3 expert (7168 -> 2*2048, 2048 -> 7168; 8 experts
 * of 4096 rows, one GPU's share under expert parallelism), FP8 against our bf16 grouped GEMM,
 * and the 8192^3 ceilings (cuBLASLt bf16; cuBLASLt FP8 with V3's 1x128 x 128x128 scaling)
 * measured in the same process. */
static void bench_moe_fp8(void)
{
    GT_NEED_GPU();
    if (!gt_bench())
        SKIP("set DSV3_GPU_BENCH=1");
    if (!gpu_moe_fp8_fits(gt_ctx_, 16, 16))
        SKIP("the FP8 grouped GEMM needs a Hopper GPU");
    dsv3_err e;
    size_t n8 = (size_t)8192 * 8192;
    struct ceil_job cj = {0};
    cj.a = gb_random_bf(n8, 1), cj.b = gb_random_bf(n8, 1), cj.c = dev_alloc(n8 * 2);
    cj.qa = dev_alloc(n8), cj.qb = dev_alloc(n8);
    cj.sa = dev_alloc((size_t)64 * 8192 * 4), cj.sb = dev_alloc((size_t)64 * 64 * 4);
    REQUIRE(cj.a && cj.b && cj.c && cj.qa && cj.qb && cj.sa && cj.sb);
    /* the ceiling's operands: real codes from our quantisers (VEC128 scales [K/128 x rows]
     * are ours; BLK128 wants [rows/128 x ld], ld = 64 here: the same as [E=1][64][64]) */
    REQUIRE(gpu_moe_fp8_quant_rows(gt_ctx_, cj.qa, cj.sa, cj.a, 8192, 8192, &e) == 0 &&
            gpu_moe_fp8_quant_weights(gt_ctx_, cj.qb, NULL, cj.sb, cj.b, 1, 8192, 8192, &e) == 0);
    float ms16 = gb_time(ceil_run, &cj, 10);
    cj.fp8 = 1;
    float ms8 = gb_time(ceil_run, &cj, 10);
    double fl8 = 2.0 * n8 * 8192, c16 = fl8 / (ms16 * 1e-3) / 1e12, c8 = fl8 / (ms8 * 1e-3) / 1e12;
    printf("# bench %-44s %8.3f ms %7.1f TFLOP/s (bf16 ceiling)\n", "gemm 8192^3 bf16 cuBLASLt",
           ms16, c16);
    printf("# bench %-44s %8.3f ms %7.1f TFLOP/s (fp8 ceiling)\n",
           "gemm 8192^3 fp8 1x128 x 128x128 cuBLASLt", ms8, c8);
    void *cb[] = {cj.a, cj.b, cj.c, cj.qa, cj.qb, cj.sa, cj.sb};
    for (size_t i = 0; i < sizeof cb / sizeof cb[0]; i++)
        gpu_free(cb[i]);
    bench_shape("1b gate-up 65536x1024->1024 balanced", 16384, 4, 32, 1024, 1024, 0, c8, c16);
    bench_shape("1b down 65536x512->1024 balanced", 16384, 4, 32, 512, 1024, 0, c8, c16);
    bench_shape("1b gate-up 65536x1024->1024 random", 16384, 4, 32, 1024, 1024, 1, c8, c16);
    bench_shape("v3 gate-up 32768x7168->4096, 8 experts", 32768, 1, 8, 7168, 4096, 0, c8, c16);
    bench_shape("v3 down 32768x2048->7168, 8 experts", 32768, 1, 8, 2048, 7168, 0, c8, c16);
}

int main(void)
{
    test_seed();
    RUN(fp8_grouped_gemms_match_reference);
    RUN(bench_moe_fp8);
    if (gt_ctx_)
        gpu_ctx_destroy(gt_ctx_);
    TEST_EXIT();
}
