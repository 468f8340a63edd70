/* GPU test of batch-1 decode's GEMV (kernels/ginfer_k.cu, through ginfer_gemv_run) on fresh
 * random bf16-valued weights and inputs: the form that holds its weight rows in registers
 * before the wait (gemv_held_k, DSV3_GINFER_HELD=two,one: where its grid fits two blocks an
 * SM) against gemv_k (DSV3_GINFER_HELD=0), at DeepSeek-V2-Lite's q + kv_a (two outputs, one launch) and o
 * shapes, the 1B-class MoE's widths, odd widths and a batch of products:
 * - the two forms bitwise equal (the same sums in the same order: the engine takes either,
 *   so a bit of difference would change greedy text);
 * - both against the host in double precision within 1e-5 relative to the sum of the terms'
 *   magnitudes (fp32 sums of at most 2048 products). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/ginfer.h"
#include "gpu_test.h"

/* y for both forms (held 0: DSV3_GINFER_HELD=0), worst error against the host into *worst;
 * 1 where they are bitwise equal. */
static int check_case(int I, int O, int batch, int O1, double *worst)
{
    float *x = gt_rand_bf((size_t)batch * I, 1.0f), *w = gt_rand_bf((size_t)batch * O * I, 0.1f);
    float *y[2] = {malloc((size_t)batch * O * 4), malloc((size_t)batch * O * 4)};
    int same = 0;
    for (int held = 0; held < 2; held++) {
        if (held)
            setenv("DSV3_GINFER_HELD", "two,one", 1);
        else
            setenv("DSV3_GINFER_HELD", "0", 1);
        dsv3_err e;
        int rc = ginfer_gemv_run(x, w, I, O, batch, O1, y[held], &e);
        CHECKF(!rc, "I %d O %d batch %d O1 %d: %s", I, O, batch, O1, rc ? e.msg : "");
        if (rc)
            goto out;
    }
    same = !memcmp(y[0], y[1], (size_t)batch * O * 4);
    CHECKF(same, "I %d O %d batch %d O1 %d: the held form differs from gemv_k", I, O, batch, O1);
    for (int b = 0; b < batch; b++)
        for (int o = 0; o < O; o++) {
            double s = 0, m = 0;
            for (int i = 0; i < I; i++) {
                double t = (double)w[((size_t)b * O + o) * I + i] * x[(size_t)b * I + i];
                s += t;
                m += fabs(t);
            }
            for (int held = 0; held < 2; held++) {
                double d = fabs(y[held][(size_t)b * O + o] - s) / (m > 1e-30 ? m : 1e-30);
                if (!(d <= *worst))
                    *worst = d;
            }
        }
out:
    free(x), free(w), free(y[0]), free(y[1]);
    unsetenv("DSV3_GINFER_HELD");
    return same;
}

static void test_held_equals_gemv(void)
{
    GT_NEED_GPU();
    /* I, O, batch, O1: V2-Lite's q + kv_a and o, 1b-moe-like widths, odd widths, a batch of
     * products, one past the held form's 2048 values (gemv_k both times) */
    static const int cs[][4] = {{2048, 3648, 1, 3072}, {2048, 2048, 1, 0}, {1024, 1536, 1, 0},
                                {1024, 576, 1, 0},     {1000, 72, 3, 0},   {2040, 40, 1, 0},
                                {8, 8, 1, 0},          {264, 17, 2, 0},    {2056, 64, 1, 0}};
    int n = 0, bitwise = 0;
    double worst = 0;
    for (size_t c = 0; c < sizeof cs / sizeof *cs; c++, n++)
        bitwise += check_case(cs[c][0], cs[c][1], cs[c][2], cs[c][3], &worst);
    CHECKF(worst <= 1e-5, "worst error %.3g over 1e-5", worst);
    printf("# stat gemv_held: %d of %d cases bitwise gemv_k's, worst error %.3g (bound 1e-5)\n",
           bitwise, n, worst);
}

int main(void)
{
    test_seed();
    RUN(test_held_equals_gemv);
    TEST_EXIT();
}
