/* GPU test of batch-1 decode's q + kv_a + q_lat launch (kernels/ginfer_k.cu gemv_lat_k,
 * DSV3_GINFER_QLAT) and of the attention parts that then form the newest cache row
 * themselves (kernels/decode_attn.cu, gk_kv_new), on fresh random inputs and models:
 * - the kernel (ginfer_lat_run) against the launches it replaces, gk_gemv_two and the
 *   heads' q_lat GEMV: q, kv_a and q_lat bitwise equal (the same sums in the same order),
 *   and q_lat within 1e-5 of the host's product (double) of W_uk and the device's q_nope,
 *   at DeepSeek-V2-Lite's shape, rows of 1024 and fewer values, odd rope and kv_a widths;
 * - the engine: a random tiny bf16 model with V2-Lite's heads (nope 128, latent 512, no
 *   q_lora), two slots, teacher-forced decode steps of one row (the new launches) and of
 *   two (the old ones), every row's logits bitwise those of an engine made with
 *   DSV3_GINFER_QLAT=0, whose one-row steps write the cache row and rotate q in the q_lat
 *   GEMV's launch: the rows the parts form and write are read back by later steps of both
 *   kinds. The engine must name the new launch ("q_lat in the q GEMV") only when on. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/ginfer.h"
#include "../../lib/infer.h"
#include "../../lib/model.h"
#include "ginfer_test.h"
#include "gpu_test.h"

/* One kernel case; 1 when the two forms were bitwise equal. */
static int lat_case(int I, int nh, int qk, int nope, int W, int kv, double *worst)
{
    const int Q = nh * qk, O = Q + W;
    float *x = gt_rand_bf((size_t)I, 1.0f), *w = gt_rand_bf((size_t)O * I, 0.1f);
    float *u = gt_rand_bf((size_t)nh * kv * nope, 0.1f);
    float *q[2], *kva[2], *lat[2];
    int same = 0;
    for (int v = 0; v < 2; v++) {
        q[v] = malloc((size_t)Q * 4);
        kva[v] = malloc((size_t)W * 4 + 4);
        lat[v] = malloc((size_t)nh * kv * 4);
    }
    for (int v = 0; v < 2; v++) {
        dsv3_err e;
        int rc = ginfer_lat_run(x, w, u, I, nh, qk, nope, W, kv, v, q[v], kva[v], lat[v], &e);
        CHECKF(!rc, "I %d nh %d qk %d W %d, %s: %s", I, nh, qk, W, v ? "lat" : "two + gemv",
               rc ? e.msg : "");
        if (rc)
            goto out;
    }
    same = !memcmp(q[0], q[1], (size_t)Q * 4) && !memcmp(kva[0], kva[1], (size_t)W * 4) &&
           !memcmp(lat[0], lat[1], (size_t)nh * kv * 4);
    CHECKF(same, "I %d nh %d qk %d W %d: the one launch differs from the two", I, nh, qk, W);
    for (int h = 0; h < nh; h++)
        for (int o = 0; o < kv; o++) {
            double s = 0, m = 0;
            for (int i = 0; i < nope; i++) {
                double t = (double)u[((size_t)h * kv + o) * nope + i] * q[1][h * qk + i];
                s += t;
                m += fabs(t);
            }
            double d = fabs(lat[1][h * kv + o] - s) / (m > 1e-30 ? m : 1e-30);
            if (!(d <= *worst))
                *worst = d;
        }
out:
    for (int v = 0; v < 2; v++)
        free(q[v]), free(kva[v]), free(lat[v]);
    free(x), free(w), free(u);
    return same;
}

static void test_lat_kernel(void)
{
    GT_NEED_GPU();
    /* I, nh, qk, nope, W, kv: V2-Lite; rows of 1024 (the narrow form); few heads and odd
     * rope and kv_a widths (plain rows ending inside a block) */
    static const int cs[][6] = {{2048, 16, 192, 128, 576, 512}, {1024, 4, 160, 128, 544, 512},
                                {256, 2, 192, 128, 576, 512},   {1000, 3, 136, 128, 520, 512},
                                {2048, 1, 128, 128, 8, 512}};
    int n = 0, bitwise = 0;
    double worst = 0;
    for (size_t c = 0; c < sizeof cs / sizeof *cs; c++, n++)
        bitwise += lat_case(cs[c][0], cs[c][1], cs[c][2], cs[c][3], cs[c][4], cs[c][5], &worst);
    CHECKF(worst <= 1e-5, "q_lat's worst error %.3g over 1e-5", worst);
    printf("# stat gemv_lat: %d of %d cases bitwise the launches it replaces, q_lat's worst "
           "error %.3g (bound 1e-5)\n", bitwise, n, worst);
}

enum { NS = 2, STEPS = 40, MAXP = 40 };

/* Steps of one row (slot 0; the new launches) but every third, of both slots (the old). */
static int step_rows(int s)
{
    return s % 3 == 2 ? NS : 1;
}

static void test_lat_engine(void)
{
    GT_NEED_GPU();
    const char *keep = getenv("DSV3_GINFER_QLAT");
    char *saved = keep ? strdup(keep) : NULL;
    long rows_all = 0, same_all = 0;
    double worst = 0;
    for (int i = 0; i < 3 && !test_failed_; i++) {
        dsv3_config c;
        ginfer_random_config(&c, 0);
        c.hidden_size = 256;
        c.num_attention_heads = 1 + i;
        c.qk_nope_head_dim = 128;
        c.qk_rope_head_dim = i == 1 ? 32 : 64;
        c.kv_lora_rank = 512;
        c.v_head_dim = 64;
        dsv3_model m;
        if (ginfer_random_model(&m, &c, 0.1))
            break;
        /* prompts of 1 to 40 tokens; ctx 96: 3 parts, each step's newest row in the last */
        int V = c.vocab_size, plen[NS] = {1 + 20 * i, 7 + 16 * i}, ctx = 96, R = 0;
        int32_t prompt[NS][MAXP], toks[NS][STEPS];
        for (int k = 0; k < NS; k++) {
            ginfer_random_ids(prompt[k], MAXP, V);
            ginfer_random_ids(toks[k], STEPS, V);
        }
        size_t cap = (size_t)(NS + STEPS * NS) * V;
        float *lg[2] = {malloc(cap * 4), malloc(cap * 4)};
        int ok = lg[0] && lg[1];
        CHECK(ok);
        for (int v = 0; v < 2 && ok; v++) {
            dsv3_err e;
            setenv("DSV3_GINFER_QLAT", v ? "1" : "0", 1);
            infer *f = NULL;
            ok = infer_new_gpu(&f, &m, ctx, NS, 0, 0, &e) == 0 &&
                 ginfer_teacher_run(f, NS, prompt[0], MAXP, plen, toks[0], STEPS, step_rows, V,
                                    lg[v], &R, &e) == 0;
            CHECKF(ok, "model %d, DSV3_GINFER_QLAT=%d: %s", i, v, e.msg);
            if (ok)
                CHECKF((strstr(infer_device(f), "q_lat in the q GEMV") != NULL) == v,
                       "model %d, DSV3_GINFER_QLAT=%d: the engine describes itself as \"%s\"", i,
                       v, infer_device(f));
            infer_free(f);
        }
        long same = 0;
        for (int r = 0; ok && r < R; r++) {
            const float *a = lg[1] + (size_t)r * V, *b = lg[0] + (size_t)r * V;
            double d = rel(a, b, V);
            worst = d > worst ? d : worst;
            same += memcmp(a, b, (size_t)V * 4) == 0;
        }
        CHECKF(!ok || same == R, "model %d (%d heads, rope %d): %ld of %d rows bitwise equal, "
               "worst rel err %.3g", i, c.num_attention_heads, c.qk_rope_head_dim, same, R, worst);
        rows_all += R;
        same_all += same;
        free(lg[0]), free(lg[1]);
        model_free(&m);
    }
    if (saved) {
        setenv("DSV3_GINFER_QLAT", saved, 1);
        free(saved);
    } else {
        unsetenv("DSV3_GINFER_QLAT");
    }
    printf("# stat ginfer_qlat_engine: %ld of %ld rows bitwise DSV3_GINFER_QLAT=0's (worst rel "
           "err %.3g)\n", same_all, rows_all, worst);
}

/* The engine takes the new launches only where every attention part is one chunk of at
 * most 32 rows (the parts' default count is ctx / 32, at most 64): at -c 2048, not at 2080
 * (64 parts of 33) nor at 200 (6 of 34). */
static void test_lat_context(void)
{
    GT_NEED_GPU();
    dsv3_config c;
    ginfer_random_config(&c, 0);
    c.hidden_size = 256;
    c.qk_nope_head_dim = 128;
    c.kv_lora_rank = 512;
    dsv3_model m;
    if (ginfer_random_model(&m, &c, 0.1))
        return;
    static const int ctx[] = {2048, 2080, 200, 96};
    static const int takes[] = {1, 0, 0, 1};
    unsetenv("DSV3_GINFER_QLAT");
    for (int i = 0; i < 4; i++) {
        dsv3_err e;
        infer *f = NULL;
        int ok = infer_new_gpu(&f, &m, ctx[i], 1, 0, 0, &e) == 0;
        CHECKF(ok, "ctx %d: %s", ctx[i], e.msg);
        if (ok)
            CHECKF((strstr(infer_device(f), "q_lat in the q GEMV") != NULL) == takes[i],
                   "ctx %d: the engine describes itself as \"%s\"", ctx[i], infer_device(f));
        infer_free(f);
    }
    model_free(&m);
}

int main(void)
{
    test_seed();
    RUN(test_lat_kernel);
    RUN(test_lat_engine);
    RUN(test_lat_context);
    TEST_EXIT();
}
