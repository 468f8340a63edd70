/* GPU test of batch-1 decode's expert GEMVs (kernels/ginfer_k.cu, through ginfer_grouped_run):
 * one row routed to K of E experts (and the shared group E, or not), bucketed by
 * gk_moe_bucket, then the gate-up-SwiGLU and the down projection over the routed groups, by
 * the one-row kernel (grouped1_k) and by grouped_k, on fresh random bf16-valued inputs,
 * weights in bf16 and fp32, widths from 8 to past the one-row kernel's 1024 (where it leaves
 * the launch to grouped_k):
 * - the two kernels' outputs bitwise equal (the same sums in the same order; the decode
 *   engine takes either, so a bit of difference would change greedy text);
 * - both against the host in double precision: h = silu(gate) * up per group row in bucket
 *   order (routed experts ascending, the shared group last), y = w2_g . h (from the device's
 *   h, so the down projection's error is its own), within 1e-4 relative to the sum of the
 *   terms' magnitudes (fp32 sums of at most 2816 products).
 * E = K = 0 with the shared group: a dense MLP's one row (one group, no bucket list), which
 * the decode engine gives the same two kernels. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/ginfer.h"
#include "gpu_test.h"

/* The K distinct experts of the row, in a random order (the bucketing sorts them). */
static void draw_experts(int32_t *idx, int E, int K)
{
    for (int k = 0; k < K; k++) {
        int32_t v;
        int fresh;
        do {
            v = (int32_t)(test_rand() % (unsigned)E);
            fresh = 1;
            for (int j = 0; j < k; j++)
                fresh &= idx[j] != v;
        } while (!fresh);
        idx[k] = v;
    }
}

/* The groups in bucket order: routed ascending, then the shared group E. */
static int bucket_groups(const int32_t *idx, int E, int K, int sh, int *grp)
{
    int n = 0;
    for (int g = 0; g < E; g++)
        for (int k = 0; k < K; k++)
            if (idx[k] == g)
                grp[n++] = g;
    if (sh)
        grp[n++] = E;
    return n;
}

/* |a - b| over sum |terms|, worst over n outputs (ref, mag from the host). */
static double worst_err(const float *a, const double *ref, const double *mag, int n)
{
    double w = 0;
    for (int i = 0; i < n; i++) {
        double d = fabs((double)a[i] - ref[i]) / (mag[i] > 1e-30 ? mag[i] : 1e-30);
        if (!(d <= w))
            w = d;
    }
    return w;
}

static void check_case(int E, int K, int sh, int H, int F, int wf32, int *bitwise, double *worst)
{
    int G = E + sh, R = K + sh;
    float *x = gt_rand_bf((size_t)H, 1.0f), *w1 = gt_rand_bf((size_t)G * 2 * F * H, 0.1f);
    float *w2 = gt_rand_bf((size_t)G * H * F, 0.1f);
    float *h[2], *y[2];
    int32_t idx[32];
    int grp[33];
    draw_experts(idx, E, K);
    int ng = bucket_groups(idx, E, K, sh, grp);
    for (int one = 0; one < 2; one++) {
        h[one] = malloc((size_t)R * F * 4);
        y[one] = malloc((size_t)R * H * 4);
        dsv3_err e;
        int rc = ginfer_grouped_run(x, w1, w2, idx, E, K, sh, H, F, wf32, 2 * one, h[one], y[one],
                                    &e);
        CHECKF(!rc, "E %d K %d sh %d H %d F %d: %s", E, K, sh, H, F, rc ? e.msg : "");
        if (rc)
            goto out;
    }
    int same = !memcmp(h[0], h[1], (size_t)R * F * 4) && !memcmp(y[0], y[1], (size_t)R * H * 4);
    CHECKF(same, "E %d K %d sh %d H %d F %d %s: the one-row kernels differ from grouped_k", E, K,
           sh, H, F, wf32 ? "fp32" : "bf16");
    *bitwise += same;
    double *hr = malloc((size_t)R * F * sizeof(double)), *hm = malloc((size_t)R * F * sizeof(double));
    double *yr = malloc((size_t)R * H * sizeof(double)), *ym = malloc((size_t)R * H * sizeof(double));
    CHECK(ng == R);
    for (int r = 0; r < ng; r++) {
        const float *wg = w1 + (size_t)grp[r] * 2 * F * H, *wd = w2 + (size_t)grp[r] * H * F;
        for (int o = 0; o < F; o++) {
            double gs = 0, us = 0, gm = 0, um = 0;
            for (int i = 0; i < H; i++) {
                gs += (double)wg[(size_t)o * H + i] * x[i];
                us += (double)wg[(size_t)(F + o) * H + i] * x[i];
                gm += fabs((double)wg[(size_t)o * H + i] * x[i]);
                um += fabs((double)wg[(size_t)(F + o) * H + i] * x[i]);
            }
            double sg = 1.0 / (1.0 + exp(-gs));
            hr[(size_t)r * F + o] = gs * sg * us;
            /* what the rounding of the two sums can move the product by (|d(g s(g))/dg|
             * <= 1.1) */
            hm[(size_t)r * F + o] = 1.1 * fabs(us) * gm + fabs(gs * sg) * um + 1e-30;
        }
        for (int o = 0; o < H; o++) {
            double s = 0, m = 0;
            for (int i = 0; i < F; i++) {
                double t = (double)wd[(size_t)o * F + i] * h[1][(size_t)r * F + i];
                s += t;
                m += fabs(t);
            }
            yr[(size_t)r * H + o] = s;
            ym[(size_t)r * H + o] = m;
        }
    }
    for (int one = 0; one < 2; one++) {
        double eh = worst_err(h[one], hr, hm, R * F), ey = worst_err(y[one], yr, ym, R * H);
        CHECKF(eh <= 1e-4 && ey <= 1e-4, "E %d K %d sh %d H %d F %d %s one %d: error h %.3g "
               "y %.3g over 1e-4", E, K, sh, H, F, wf32 ? "fp32" : "bf16", one, eh, ey);
        *worst = fmax(*worst, fmax(eh, ey));
    }
    free(hr), free(hm), free(yr), free(ym);
out:
    for (int one = 0; one < 2; one++)
        free(h[one]), free(y[one]);
    free(x), free(w1), free(w2);
}

static void test_grouped1_equals_grouped(void)
{
    GT_NEED_GPU();
    /* E, K, sh, H, F: 1b-moe's shape, small and odd widths, the one-row kernel's limits */
    static const int cs[][5] = {{32, 4, 1, 1024, 512}, {32, 4, 0, 1024, 512}, {8, 1, 1, 64, 64},
                                {8, 8, 0, 8, 16},      {64, 6, 1, 1000, 1016}, {16, 3, 1, 1032, 512},
                                {16, 2, 1, 256, 1032}, {4, 2, 1, 2048, 96},
                                /* a dense MLP (E = K = 0: one group without a bucket list):
                                 * DeepSeek-V2-Lite's shared experts, an odd width */
                                {0, 0, 1, 2048, 2816}, {0, 0, 1, 1000, 96}};
    int n = 0, bitwise = 0;
    double worst = 0;
    for (size_t c = 0; c < sizeof cs / sizeof *cs; c++)
        for (int wf32 = 0; wf32 < 2; wf32++) {
            check_case(cs[c][0], cs[c][1], cs[c][2], cs[c][3], cs[c][4], wf32, &bitwise, &worst);
            n++;
        }
    printf("# stat grouped1: %d of %d cases bitwise grouped_k's, worst error %.3g (bound 1e-4)\n",
           bitwise, n, worst);
}

int main(void)
{
    test_seed();
    RUN(test_grouped1_equals_grouped);
    TEST_EXIT();
}
