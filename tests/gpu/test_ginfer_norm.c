/* GPU test of the decode engine's add_norm (kernels/ginfer_k.cu add_norm_k, through
 * ginfer_add_norm_run): one row x += the pending MoE output (K routed rows weighted, at
 * shuffled positions, plus the shared row) + delta, then out = w * x * rstd(x), against the
 * host in double precision, on fresh random inputs, for row widths that take each of its
 * forms: a value a thread (D <= 1024), two a thread (1024 < D <= 2048, DeepSeek-V2-Lite's
 * 2048), and the loop over the row (D > 2048); K from 0 to past the 8 rows read ahead, with
 * and without the shared row and delta. x written back and out each within 1e-5 of the
 * host's, relative to the row's largest magnitude (fp32 sums of at most 10 terms and a sum
 * of squares over D). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/ginfer.h"
#include "gpu_test.h"

static const int widths[] = {8, 700, 1024, 1032, 1500, 2000, 2048, 3000, 4096};
static const int ks[] = {0, 1, 4, 6, 8, 9};

/* The host's x and out in double. */
static void host_add_norm(const float *x, const float *delta, const float *ye, const float *rw,
                          const int *spos, const float *ys, const float *w, int D, int K,
                          double eps, double *xo, double *out)
{
    double ss = 0;
    for (int i = 0; i < D; i++) {
        double v = x[i], acc = 0;
        for (int k = 0; k < K; k++)
            acc += (double)rw[k] * ye[(size_t)spos[k] * D + i];
        if (ys)
            acc += ys[i];
        v += acc + (delta ? delta[i] : 0.0);
        xo[i] = v;
        ss += v * v;
    }
    double r = 1.0 / sqrt(ss / D + eps);
    for (int i = 0; i < D; i++)
        out[i] = w[i] * xo[i] * r;
}

/* max |a - b| over max |b|, a from the device, b the host's. */
static double row_err(const float *a, const double *b, int D)
{
    double m = 0, d = 0;
    for (int i = 0; i < D; i++) {
        m = fmax(m, fabs(b[i]));
        d = fmax(d, fabs(a[i] - b[i]));
    }
    return d / (m > 0 ? m : 1);
}

static void test_add_norm_vs_host(void)
{
    GT_NEED_GPU();
    double worst = 0;
    int cases = 0;
    for (size_t wi = 0; wi < sizeof widths / sizeof *widths; wi++)
        for (size_t ki = 0; ki < sizeof ks / sizeof *ks; ki++)
            for (int v = 0; v < 4; v++) {
                int D = widths[wi], K = ks[ki], hasd = v & 1, hass = (v >> 1) & 1;
                float *x = malloc(D * 4), *d = malloc(D * 4), *ys = malloc(D * 4);
                float *w = malloc(D * 4), *out = malloc(D * 4), *x0 = malloc(D * 4);
                float *ye = malloc((size_t)D * (K ? K : 1) * 4), rw[16];
                double *hx = malloc(D * sizeof(double)), *ho = malloc(D * sizeof(double));
                int spos[16];
                for (int i = 0; i < D; i++) {
                    x0[i] = x[i] = gt_uniform(2.0f);
                    d[i] = gt_uniform(1.0f);
                    ys[i] = gt_uniform(0.5f);
                    w[i] = 1.0f + gt_uniform(0.5f);
                }
                for (size_t i = 0; i < (size_t)D * K; i++)
                    ye[i] = gt_uniform(1.0f);
                for (int k = 0; k < K; k++) {  /* positions: a shuffle of 0..K-1 */
                    spos[k] = k;
                    rw[k] = 0.1f + 0.5f * ((float)(test_rand() % 1000) / 1000.0f);
                }
                for (int k = K - 1; k > 0; k--) {
                    int j = (int)(test_rand() % (unsigned)(k + 1)), t = spos[k];
                    spos[k] = spos[j];
                    spos[j] = t;
                }
                dsv3_err e;
                int rc = ginfer_add_norm_run(x, hasd ? d : NULL, ye, rw, spos, hass ? ys : NULL,
                                             w, D, K, 1e-6f, out, &e);
                CHECKF(!rc, "D %d K %d: %s", D, K, rc ? e.msg : "");
                if (!rc) {
                    host_add_norm(x0, hasd ? d : NULL, ye, rw, spos, hass ? ys : NULL, w, D, K,
                                  1e-6, hx, ho);
                    double ex = row_err(x, hx, D), eo = row_err(out, ho, D);
                    CHECKF(ex <= 1e-5 && eo <= 1e-5, "D %d K %d delta %d shared %d: x err %.3g, "
                           "out err %.3g > 1e-5", D, K, hasd, hass, ex, eo);
                    worst = fmax(worst, fmax(ex, eo));
                    cases++;
                }
                free(x), free(d), free(ys), free(w), free(out), free(x0), free(ye), free(hx);
                free(ho);
            }
    printf("# stat ginfer_add_norm %.3g over %d cases bound 1e-05 %s\n", worst, cases,
           worst <= 1e-5 ? "ok" : "FAIL");
}

int main(void)
{
    test_seed();
    RUN(test_add_norm_vs_host);
    TEST_EXIT();
}
