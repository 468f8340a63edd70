/* GPU test of the tensor-core prefill (kernels/ginfer_prefill.cuh; the default: an engine
 * made with DSV3_GINFER_PREFILL unset) against the GEMV path (DSV3_GINFER_PREFILL=gemv, which
 * tests/gpu/test_ginfer.c holds to the CPU), on fresh random tiny bf16 models with q_lora on and off, shared experts on and off:
 * - a 300-token prompt (slot 1 of 2) runs as one pass (ginfer_prefill_passes) and gives every
 *   row's logits: median row within 3e-2 of the GEMV path's, at most 20% of the rows past
 *   3e-2 (rows whose experts flipped at a router near tie, and rows after them whose
 *   attention reads the moved cache rows: 1-6% of the rows over 8 models on an H200 on
 *   2026-11-27, 1-17% over 12 on 2026-11-28, where 10% failed twice);
 * - every cache row of every layer: layer 0's rows (no routing upstream) each within 1e-2,
 *   every layer's median row within 1e-2, and at most 5% of a layer's rows past 3e-2;
 * - decoding 8 steps after the prompt, both engines fed the first engine's greedy tokens (the
 *   decode graphs reading the cache each prefill wrote; where the engines' own greedy tokens
 *   would part, a near tie, the gaps are reported): the median of the logits' rel err over
 *   the last prompt row and the 8 steps within 3e-2 (single rows may flip an expert: a
 *   0.2-0.6 error was seen on one row in eight models, once on the prompt's last row);
 * - calls the pass does not take keep the GEMV path: a prompt below the threshold, rows that
 *   continue a cache, the fp32 engine.
 * Bounds: both engines hold the same bf16 weights and a bf16 cache; the pass rounds the
 * activations entering its GEMMs (normed rows, q, k/v, attention probabilities and output,
 * SwiGLU, expert outputs) to bf16 where the GEMV path reads fp32, each a relative 2^-9, summed
 * in another order; 1e-2 is the project's bf16 bound (gpu_test.h BF16_BOUND) for a row one
 * rounding step away, 3e-2 test_ginfer's for logits after several layers of such steps
 * (an expert choice flipped at a router near tie moves single rows further, hence medians). */
#include <math.h>
#include <stdlib.h>

#include "../../kernels/ginfer.h"
#include "../../lib/model.h"
#include "ginfer_test.h"
#include "gpu_test.h"

enum { T = 300, STEPS = 8 };

/* test_ginfer's random tiny config (dimensions the GPU kernels take), q_lora and shared
 * experts as asked. */
static void random_config(dsv3_config *c, int q, int shared)
{
    ginfer_random_config(c, q);
    c->n_shared_experts = shared;
}

/* An engine made with DSV3_GINFER_PREFILL as given (NULL: unset); it is read at creation. */
static int make(ginfer **g, const dsv3_model *m, const char *pf, int ctx, int exact,
                dsv3_err *e)
{
    if (pf)
        setenv("DSV3_GINFER_PREFILL", pf, 1);
    else
        unsetenv("DSV3_GINFER_PREFILL");
    int rc = ginfer_create(g, m, ctx, 2, 0, exact, e);
    unsetenv("DSV3_GINFER_PREFILL");
    return rc;
}

/* Median of n values (sorts them). */
static double median(double *x, int n)
{
    qsort(x, (size_t)n, sizeof *x, cmp_double);
    return x[n / 2];
}

/* Every cache row of both engines (slot 1, rows 0 .. T-1). */
static void check_cache(ginfer *a, ginfer *b, int model)
{
    int V, L, W;
    ginfer_dims(a, &V, &L, &W);
    float *ca = malloc((size_t)T * W * 4), *cb = malloc((size_t)T * W * 4);
    double r[T];
    dsv3_err e;
    for (int l = 0; l < L; l++) {
        int ok = ginfer_read_cache(a, l, 1, 0, T, ca, &e) == 0 &&
                 ginfer_read_cache(b, l, 1, 0, T, cb, &e) == 0;
        CHECKF(ok, "%s", e.msg);
        if (!ok)
            break;
        int far = 0;
        double worst = 0;
        for (int t = 0; t < T; t++) {
            r[t] = rel(cb + (size_t)t * W, ca + (size_t)t * W, W);
            far += r[t] > 3e-2;
            worst = fmax(worst, r[t]);
            CHECKF(l > 0 || r[t] <= 1e-2, "model %d: layer 0 cache row %d rel err %.3g > 1e-2",
                   model, t, r[t]);
        }
        double med = median(r, T);
        CHECKF(med <= 1e-2, "model %d: layer %d cache median row rel err %.3g > 1e-2", model, l,
               med);
        CHECKF(far <= T / 20, "model %d: layer %d: %d cache rows past 3e-2", model, l, far);
        printf("# model %d layer %d: cache row rel err median %.3g, worst %.3g, %d rows past "
               "3e-2\n", model, l, med, worst, far);
        printf("# stat prefill_gemm_cache_m%d_l%d %.3g bound 1e-02 %s\n", model, l, med,
               med <= 1e-2 ? "ok" : "FAIL");
    }
    free(ca);
    free(cb);
}

/* Decoding after the prompt in both engines (slot 1), both fed engine a's greedy choices
 * (teacher forcing), so that every step's logits are compared even where a near tie parts
 * the engines' own greedy tokens (the first such step is reported). A median over only the
 * rows before the tokens part failed once on the prompt's last row alone: one of these
 * chaotic random models' rare rows past 3e-2 (an expert choice flipped by rounding). */
static void check_greedy(ginfer *a, ginfer *b, const float *la, const float *lb, int V,
                         int model)
{
    float *xa = malloc((size_t)V * 4), *xb = malloc((size_t)V * 4);
    memcpy(xa, la, (size_t)V * 4);
    memcpy(xb, lb, (size_t)V * 4);
    int one = 1, same = -1, n = 0;
    double r[STEPS + 1], worst = 0;
    dsv3_err e;
    for (int s = 0; s <= STEPS; s++) {
        r[n] = rel(xb, xa, V);
        worst = fmax(worst, r[n++]);
        int32_t ta = argmax(xa, V), tb = argmax(xb, V);
        if (ta != tb && same < 0) {
            same = s;
            printf("# model %d, step %d: greedy tokens part (%d, %d; logits rel err %.3g, "
                   "top-2 gaps %.3g, %.3g); both go on with the first\n", model, s, tb, ta,
                   r[n - 1], top2_gap(xa, V), top2_gap(xb, V));
        }
        int pos = T + s;
        if (s == STEPS)
            break;
        int ok = ginfer_forward(a, 1, &one, &pos, &ta, NULL, xa, &e) == 0 &&
                 ginfer_forward(b, 1, &one, &pos, &ta, NULL, xb, &e) == 0;
        CHECKF(ok, "%s", e.msg);
        if (!ok)
            break;
    }
    double med = median(r, n);
    CHECKF(med <= 3e-2, "model %d: median logits rel err over the last prompt row and the "
           "decode steps %.3g > 3e-2", model, med);
    printf("# model %d: greedy tokens equal for %d of %d steps; logits rel err of the %d rows "
           "median %.3g, worst %.3g\n", model, same < 0 ? STEPS + 1 : same, STEPS + 1, n, med,
           worst);
    free(xa);
    free(xb);
}

static void check_model(int model, int q, int shared)
{
    dsv3_config c;
    random_config(&c, q, shared);
    dsv3_model m;
    dsv3_err e;
    /* std 0.1 as test_ginfer's bf16 checks: less chaotic routing than 0.3 */
    if (ginfer_random_model(&m, &c, 0.1))
        return;
    int V = c.vocab_size, ctx = T + STEPS + 8;
    int32_t *ids = malloc(T * sizeof *ids);
    int *slot = malloc(T * sizeof *slot), *pos = malloc(T * sizeof *pos);
    for (int t = 0; t < T; t++) {
        ids[t] = (int32_t)(test_rand() % (uint64_t)V);
        slot[t] = 1;
        pos[t] = t;
    }
    float *la = malloc((size_t)T * V * 4), *lb = malloc((size_t)T * V * 4);
    ginfer *a = NULL, *b = NULL;
    int ok = make(&a, &m, "gemv", ctx, 0, &e) == 0 && make(&b, &m, NULL, ctx, 0, &e) == 0 &&
             ginfer_forward(a, T, slot, pos, ids, NULL, la, &e) == 0 &&
             ginfer_forward(b, T, slot, pos, ids, NULL, lb, &e) == 0;
    CHECKF(ok, "%s", e.msg);
    if (ok) {
        CHECKF(ginfer_prefill_passes(a) == 0 && ginfer_prefill_passes(b) == 1,
               "prefill passes %ld and %ld (0 and 1 expected)", ginfer_prefill_passes(a),
               ginfer_prefill_passes(b));
        double r[T];
        for (int t = 0; t < T; t++)
            r[t] = rel(lb + (size_t)t * V, la + (size_t)t * V, V);
        double last = r[T - 1], med = median(r, T);
        int far = 0;
        for (int t = 0; t < T; t++)
            far += r[t] > 3e-2;
        CHECKF(med <= 3e-2, "model %d: median row logits rel err %.3g > 3e-2", model, med);
        CHECKF(far <= T / 5, "model %d: %d rows' logits past 3e-2", model, far);
        printf("# model %d (q_lora %d, shared %d): row logits rel err median %.3g, last row "
               "%.3g, worst %.3g, %d rows past 3e-2\n", model, q, shared, med, last, r[T - 1],
               far);
        printf("# stat prefill_gemm_logits_m%d %.3g bound 3e-02 %s\n", model, med,
               med <= 3e-2 ? "ok" : "FAIL");
        check_cache(a, b, model);
        check_greedy(a, b, la + (size_t)(T - 1) * V, lb + (size_t)(T - 1) * V, V, model);
    }
    ginfer_destroy(a);
    ginfer_destroy(b);
    free(ids);
    free(slot);
    free(pos);
    free(la);
    free(lb);
    model_free(&m);
}

static void test_prefill_gemm_vs_gemv(void)
{
    GT_NEED_GPU();
    for (int i = 0; i < 4; i++)
        check_model(i, i & 1, (i >> 1) & 1);
}

/* Calls the pass leaves to the GEMV path. */
static void test_prefill_gemm_not_taken(void)
{
    GT_NEED_GPU();
    dsv3_config c;
    random_config(&c, 1, 1);
    dsv3_model m;
    dsv3_err e;
    if (ginfer_random_model(&m, &c, 0.1))
        return;
    int V = c.vocab_size, n = 100;
    int32_t *ids = calloc((size_t)2 * n, sizeof *ids);
    int *slot = calloc((size_t)2 * n, sizeof *slot), *pos = malloc(2 * n * sizeof *pos);
    for (int t = 0; t < 2 * n; t++)
        pos[t] = t;
    float *lg = malloc((size_t)V * 4);
    uint8_t *want = calloc((size_t)2 * n, 1);
    want[n - 1] = 1;
    ginfer *g = NULL, *x = NULL;
    /* 100 rows under a threshold of 128; then 100 rows continuing that cache; then the
     * fp32 engine's prompt */
    int ok = make(&g, &m, "gemm:128", 2 * n + 8, 0, &e) == 0 &&
             ginfer_forward(g, n, slot, pos, ids, want, lg, &e) == 0 &&
             ginfer_forward(g, n, slot, pos + n, ids, want, lg, &e) == 0 &&
             make(&x, &m, NULL, 2 * n + 8, 1, &e) == 0 &&
             ginfer_forward(x, n, slot, pos, ids, want, lg, &e) == 0;
    CHECKF(ok, "%s", e.msg);
    CHECK(!ok || (ginfer_prefill_passes(g) == 0 && ginfer_prefill_passes(x) == 0));
    /* and 2n rows at 0 on the other slot take it */
    for (int t = 0; t < 2 * n; t++)
        slot[t] = 1;
    want[n - 1] = 0;
    want[2 * n - 1] = 1;
    ok = ok && ginfer_forward(g, 2 * n, slot, pos, ids, want, lg, &e) == 0;
    CHECKF(ok, "%s", e.msg);
    CHECK(!ok || ginfer_prefill_passes(g) == 1);
    ginfer_destroy(g);
    ginfer_destroy(x);
    free(ids);
    free(slot);
    free(pos);
    free(lg);
    free(want);
    model_free(&m);
}

int main(void)
{
    test_seed();
    RUN(test_prefill_gemm_vs_gemv);
    RUN(test_prefill_gemm_not_taken);
    TEST_EXIT();
}
