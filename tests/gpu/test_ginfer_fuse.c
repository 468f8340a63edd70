/* GPU test of kernels/ginfer's fused decode launches (DSV3_GINFER_FUSE, read when an engine is
 * made): engines with every fusion, with none ("0", the kernels of before) and with each one
 * alone ("norm": the input and q_a norms inside the GEMVs that read them; "attn": the
 * attention combine in the split kernel's last block; "router": router GEMV + top-k +
 * bucketing in one launch; "kvw": the cache write and q_pe rotation as one more row of blocks
 * of the q_lat GEMV; "post": the post-attention norm inside the router's launch; "uvc": the
 * attention combine inside the uv GEMV's blocks; "msum": the MoE down-projection adding its
 * weighted rows to x itself; "norm,msum"; "qa": the q_a norm alone inside q_b's GEMV, at one
 * row formed by each warp), on fresh random tiny models (q_lora_rank
 * set or not, shared expert or not, 1-4 experts a token), fp32 ("exact") and bf16:
 * - the same teacher-forced run through each: three slots prefilled with prompts of 5, 20
 *   and 7 tokens (direct passes: 20 rows take the unfused norms, 5 and 7 the fused ones),
 *   then decode steps of one row (graph of 1) and of three rows (graph of 4, a padding row;
 *   the prefills of 5 and 7 rows take "post" with 8-row tiles, the steps "uvc" as well):
 *   every row's logits within the bound of the unfused engine's (bf16 1e-2, fp32 1e-4); the
 *   fusions compute the same sums in the same order, so the rows are expected bitwise equal
 *   and how many are is reported;
 * - greedy decoding on the device (infer_forward_greedy, 32 steps): the same tokens as the
 *   unfused engine's wherever all logits above were bitwise equal;
 * - the fused fp32 engine against the CPU engine (lib/infer) on the same run, within 1e-4
 *   (test_ginfer checks the default engine: router, kvw and uvc fused). */
#include <math.h>
#include <stdlib.h>

#include "../../lib/infer.h"
#include "../../lib/model.h"
#include "ginfer_test.h"
#include "gpu_test.h"

enum { NS = 3, STEPS = 24, GSTEPS = 32, MAXP = 20 };

static const char *variants[] = {"0",   "1",    "norm", "attn",      "router", "kvw",
                                 "post", "uvc", "msum", "norm,msum", "qa"};
enum { NV = sizeof variants / sizeof *variants };

/* Whether an engine's description d names the fusions of DSV3_GINFER_FUSE=v: none for "0",
 * all eight for "1", else those v lists. */
static int fusions_named(const char *d, const char *v)
{
    static const char *all[] = {"norm", "attn", "router", "kvw", "post", "uvc", "msum", "qa"};
    const char *f = strstr(d, "fused decode: ");
    if (!strcmp(v, "0"))
        return f == NULL;
    if (!f)
        return 0;
    for (int i = 0; i < 8; i++)
        if ((strstr(f, all[i]) != NULL) != (!strcmp(v, "1") || strstr(v, all[i]) != NULL))
            return 0;
    return 1;
}

/* The run's rows: NS prefills' last rows, then per step slot 0 (and slots 1, 2 on odd
 * steps). */
static int run_rows(void)
{
    int r = NS;
    for (int s = 0; s < STEPS; s++)
        r += s & 1 ? NS : 1;
    return r;
}

static int step_rows(int s)
{
    return s & 1 ? NS : 1;
}

/* The teacher-forced run through engine f: every row's logits into lg [run_rows() V]. */
static int run(infer *f, const int32_t (*prompt)[MAXP], const int *plen,
               const int32_t (*toks)[STEPS], int V, float *lg, dsv3_err *e)
{
    int rows;
    return ginfer_teacher_run(f, NS, prompt[0], MAXP, plen, toks[0], STEPS, step_rows, V, lg,
                              &rows, e);
}

/* Greedy tokens of slot 0 after prompt 0, chosen on the device. */
static int run_greedy(infer *f, const int32_t *prompt, int P, int32_t *out, float *lg,
                      dsv3_err *e)
{
    int z = 0;
    infer_slot_clear(f, 0);
    if (infer_prefill(f, 0, prompt, P - 1, lg, e))
        return -1;
    int32_t next = prompt[P - 1];
    for (int s = 0; s < GSTEPS; s++) {
        if (infer_forward_greedy(f, 1, &z, &next, &out[s], e))
            return -1;
        next = out[s];
    }
    return 0;
}

static void check_fused(int exact)
{
    GT_NEED_GPU();
    double bound = exact ? F32_BOUND : BF16_BOUND, worst[NV] = {0}, worst_cpu = 0;
    long same[NV] = {0}, rows_all = 0;
    int models = 4, gsame = 0, gchecked = 0;
    const char *keep = getenv("DSV3_GINFER_FUSE");
    char *saved = keep ? strdup(keep) : NULL;
    for (int i = 0; i < models && !test_failed_; i++) {
        dsv3_config c;
        ginfer_random_config(&c, i & 1);
        dsv3_model m;
        dsv3_err e;
        if (ginfer_random_model(&m, &c, exact ? 0.3 : 0.1))
            break;
        int V = c.vocab_size, plen[NS] = {5, 20, 7}, R = run_rows();
        int ctx = MAXP + STEPS + GSTEPS + 8;
        int32_t prompt[NS][MAXP], toks[NS][STEPS], gt[NV][GSTEPS];
        for (int k = 0; k < NS; k++) {
            ginfer_random_ids(prompt[k], MAXP, V);
            ginfer_random_ids(toks[k], STEPS, V);
        }
        float *lg[NV], *scratch = malloc((size_t)V * 4);
        int ok = scratch != NULL;
        for (int v = 0; v < NV; v++)
            ok &= (lg[v] = malloc((size_t)R * V * 4)) != NULL;
        CHECK(ok);
        for (int v = 0; v < NV && ok; v++) {
            setenv("DSV3_GINFER_FUSE", variants[v], 1);
            infer *f = NULL;
            ok = infer_new_gpu(&f, &m, ctx, NS, 0, exact, &e) == 0 &&
                 run(f, (const int32_t(*)[MAXP])prompt, plen, (const int32_t(*)[STEPS])toks, V,
                     lg[v], &e) == 0 &&
                 run_greedy(f, prompt[0], plen[0], gt[v], scratch, &e) == 0;
            CHECKF(ok, "DSV3_GINFER_FUSE=%s: %s", variants[v], e.msg);
            if (ok)  /* the engine names the fusions it runs (a stale library names none) */
                CHECKF(fusions_named(infer_device(f), variants[v]),
                       "DSV3_GINFER_FUSE=%s: the engine describes itself as \"%s\"",
                       variants[v], infer_device(f));
            infer_free(f);
        }
        int bitwise = 1;
        for (int v = 1; v < NV && ok; v++) {
            int all = 1;
            for (int r = 0; r < R; r++) {
                const float *a = lg[v] + (size_t)r * V, *b = lg[0] + (size_t)r * V;
                double d = rel(a, b, V);
                CHECKF(d <= bound, "model %d, DSV3_GINFER_FUSE=%s, row %d: rel err %.3g > %.0e",
                       i, variants[v], r, d, bound);
                worst[v] = d > worst[v] ? d : worst[v];
                int eq = memcmp(a, b, (size_t)V * 4) == 0;
                same[v] += eq;
                all &= eq;
            }
            bitwise &= all;
            int g = 0;
            while (g < GSTEPS && gt[v][g] == gt[0][g])
                g++;
            if (all) {  /* the same logits must choose the same tokens */
                CHECKF(g == GSTEPS, "model %d, DSV3_GINFER_FUSE=%s: bitwise logits but greedy "
                       "tokens part at step %d", i, variants[v], g);
                gchecked++;
                gsame += g == GSTEPS;
            } else if (g < GSTEPS) {
                printf("# model %d, DSV3_GINFER_FUSE=%s: greedy tokens part from the unfused "
                       "engine's at step %d of %d (logits not bitwise equal)\n", i, variants[v],
                       g, GSTEPS);
            }
        }
        rows_all += R;
        if (ok && exact) {  /* the fused engine against the CPU */
            infer *cpu = NULL;
            float *lc = malloc((size_t)R * V * 4);
            ok = lc && infer_new(&cpu, &m, ctx, NS, &e) == 0 &&
                 run(cpu, (const int32_t(*)[MAXP])prompt, plen, (const int32_t(*)[STEPS])toks,
                     V, lc, &e) == 0;
            CHECKF(ok, "cpu: %s", e.msg);
            for (int r = 0; ok && r < R; r++) {
                double d = rel(lg[1] + (size_t)r * V, lc + (size_t)r * V, V);
                CHECKF(d <= F32_BOUND, "model %d, fused fp32 engine against the CPU, row %d: "
                       "rel err %.3g > %.0e", i, r, d, F32_BOUND);
                worst_cpu = d > worst_cpu ? d : worst_cpu;
            }
            infer_free(cpu);
            free(lc);
        }
        printf("# ginfer fuse %s model %d (q_lora %d, %d shared, k %d): %d rows, %s\n",
               exact ? "fp32" : "bf16", i, c.q_lora_rank, c.n_shared_experts,
               c.num_experts_per_tok, R, bitwise ? "every variant bitwise equal to unfused"
                                                 : "some rows not bitwise equal");
        for (int v = 0; v < NV; v++)
            free(lg[v]);
        free(scratch);
        model_free(&m);
    }
    if (saved) {
        setenv("DSV3_GINFER_FUSE", saved, 1);
        free(saved);
    } else {
        unsetenv("DSV3_GINFER_FUSE");
    }
    for (int v = 1; v < NV; v++)
        printf("# stat ginfer_fuse_%s_%s %.3g (%ld of %ld rows bitwise equal to unfused) bound "
               "%.0e %s\n", exact ? "fp32" : "bf16", variants[v], worst[v], same[v], rows_all,
               bound, worst[v] <= bound ? "ok" : "FAIL");
    printf("# ginfer fuse %s: greedy tokens equal to unfused in %d of %d bitwise-equal runs\n",
           exact ? "fp32" : "bf16", gsame, gchecked);
    if (exact)
        printf("# stat ginfer_fuse_fp32_vs_cpu %.3g bound 1e-04 %s\n", worst_cpu,
               worst_cpu <= F32_BOUND ? "ok" : "FAIL");
}

static void test_fused_fp32(void) { check_fused(1); }
static void test_fused_bf16(void) { check_fused(0); }

int main(void)
{
    test_seed();
    RUN(test_fused_fp32);
    RUN(test_fused_bf16);
    TEST_EXIT();
}
