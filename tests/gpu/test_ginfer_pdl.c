/* GPU test of programmatic dependent launch in kernels/ginfer (DSV3_GINFER_PDL, read at each
 * launch; the decode graphs keep what held when the engine was made): an engine made with
 * DSV3_GINFER_PDL=0 (plain launches) and one made with it unset (the default: PDL on from
 * compute capability 9.0, each kernel prefetching its weights into L2 before its wait) give
 * bitwise the same results, on fresh random tiny models (q_lora_rank set or not, shared
 * expert or not, 1-4 experts a token), fp32 ("exact") and bf16, with the decode fusions
 * (DSV3_GINFER_FUSE) at their default, "0" and "1", for bf16 with the tensor-core prefill
 * taking the 20-token prompt (DSV3_GINFER_PREFILL=gemm:8), with PDL and a shared memory
 * carveout asked for every launch (DSV3_GINFER_CARVEOUT=100), and with the other PDL
 * schemes (the default triggers the next launch right after the wait but in the attention's
 * three launches, which trigger once their main loads are done; DSV3_GINFER_PDL=1: every
 * launch late, 2: every launch early, 3: wait and trigger at entry, no prefetch; and
 * DSV3_GINFER_PDL_LATE=gemv,up,route: those kinds late instead):
 * - a teacher-forced run: three slots prefilled with prompts of 5, 20 and 7 tokens (direct
 *   passes), then decode steps of 1, 2 and 3 rows in turn (graphs of 1, 2 and 4 rows): every
 *   row's logits equal (memcmp);
 * - greedy decoding of the three slots together on the device (infer_forward_greedy, 3 rows
 *   a step): the same tokens;
 * - with the MTP module (infer_new_gpu_mtp): drafts and steps in turn, every draft's and
 *   step's logits equal;
 * - the engine with PDL names it in its description ("; PDL") exactly when the device has
 *   compute capability 9.0 or more; the one with DSV3_GINFER_PDL=0 never; the carveout is
 *   named ("; carveout 100%") when asked for. */
#include <stdlib.h>

#include "../../lib/infer.h"
#include "../../lib/model.h"
#include "ginfer_test.h"
#include "gpu_test.h"

enum { NS = 3, STEPS = 12, GSTEPS = 16, MAXP = 20, MSTEPS = 8 };

/* Engine variants: DSV3_GINFER_FUSE, DSV3_GINFER_PREFILL (NULL: unset), and the
 * DSV3_GINFER_CARVEOUT, DSV3_GINFER_PDL and DSV3_GINFER_PDL_LATE of the engine with PDL
 * (NULL: unset; PDL "1" late trigger, "2" early trigger, "3" the entry scheme; the engine
 * without has PDL=0 and no carveout). */
static const char *const variants[][5] = {
    {NULL, NULL, NULL, NULL, NULL},     {"0", NULL, NULL, NULL, NULL},
    {"1", NULL, NULL, NULL, NULL},      {NULL, "gemm:8", NULL, NULL, NULL},
    {NULL, NULL, "100", NULL, NULL},    {NULL, NULL, NULL, "2", NULL},
    {"1", NULL, NULL, "2", NULL},       {NULL, NULL, NULL, "3", NULL},
    {NULL, NULL, NULL, "1", NULL},      {NULL, NULL, NULL, NULL, "gemv,up,route"}};
enum { NV = sizeof variants / sizeof *variants };

/* Rows of one run: the prefills' last rows, then 1, 2, 3, 1, 2, 3, ... rows a step. */
static int run_rows(void)
{
    int r = NS;
    for (int s = 0; s < STEPS; s++)
        r += 1 + s % NS;
    return r;
}

/* The teacher-forced run through f (logits into lg [run_rows() V]), then GSTEPS greedy steps
 * of the NS slots together (tokens into gt [GSTEPS][NS]). */
static int run(infer *f, const int32_t (*prompt)[MAXP], const int *plen,
               const int32_t (*toks)[STEPS], int V, float *lg, int32_t (*gt)[NS], dsv3_err *e)
{
    int row = 0, slot[NS] = {0, 1, 2};
    for (int k = 0; k < NS; k++) {
        infer_slot_clear(f, k);
        if (infer_prefill(f, k, prompt[k], plen[k], lg + (size_t)row++ * V, e))
            return -1;
    }
    for (int s = 0; s < STEPS; s++) {
        int n = 1 + s % NS;
        int32_t in[NS];
        for (int k = 0; k < n; k++)
            in[k] = toks[k][s];
        if (infer_forward(f, n, slot, in, NULL, lg + (size_t)row * V, e))
            return -1;
        row += n;
    }
    int32_t next[NS] = {toks[0][0], toks[1][0], toks[2][0]};
    for (int s = 0; s < GSTEPS; s++) {
        if (infer_forward_greedy(f, NS, slot, next, gt[s], e))
            return -1;
        memcpy(next, gt[s], sizeof next);
    }
    return 0;
}

/* Whether the device has compute capability 9.0 or more (PDL on by default). */
static int device_has_pdl(void)
{
    gpu_props p;
    dsv3_err e;
    return gpu_describe(0, &p, &e) == 0 && p.major >= 9;
}

/* Sets (v non-NULL) or unsets environment variable k. */
static void set_env(const char *k, const char *v)
{
    if (v)
        setenv(k, v, 1);
    else
        unsetenv(k);
}

/* A copy of environment variable k (NULL if unset), for restore_env. */
static char *save_env(const char *k)
{
    const char *v = getenv(k);
    return v ? strdup(v) : NULL;
}

static void restore_env(const char *k, char *saved)
{
    set_env(k, saved);
    free(saved);
}

/* Makes the engine of variant v with PDL off (pdl 0: DSV3_GINFER_PDL=0) or at its default
 * (pdl 1: unset), and checks that its description says which. */
static infer *make_engine(const dsv3_model *m, int ctx, int exact, int v, int pdl, int mtp,
                          dsv3_err *e)
{
    set_env("DSV3_GINFER_FUSE", variants[v][0]);
    set_env("DSV3_GINFER_PREFILL", variants[v][1]);
    set_env("DSV3_GINFER_PDL", pdl ? variants[v][3] : "0");
    set_env("DSV3_GINFER_CARVEOUT", pdl ? variants[v][2] : NULL);
    set_env("DSV3_GINFER_PDL_LATE", pdl ? variants[v][4] : NULL);
    infer *f = NULL;
    int rc = mtp ? infer_new_gpu_mtp(&f, m, NULL, ctx, NS, 0, exact, e) ||
                       infer_use_mtp(f, e)
                 : infer_new_gpu(&f, m, ctx, NS, 0, exact, e);
    if (rc) {
        infer_free(f);
        return NULL;
    }
    int named = strstr(infer_device(f), "; PDL") != NULL;
    CHECKF(named == (pdl && device_has_pdl()), "PDL %s: the engine describes itself as \"%s\"",
           pdl ? "default" : "off", infer_device(f));
    char want[32];
    snprintf(want, sizeof want, "; carveout %s%%", pdl && variants[v][2] ? variants[v][2] : "");
    CHECKF((strstr(infer_device(f), "carveout") != NULL) == (pdl && variants[v][2]) &&
               (!(pdl && variants[v][2]) || strstr(infer_device(f), want)),
           "carveout %s: the engine describes itself as \"%s\"",
           pdl && variants[v][2] ? variants[v][2] : "none", infer_device(f));
    return f;
}

/* The number of rows of R logit rows of V that are not bitwise equal. */
static int rows_differ(const float *a, const float *b, int R, int V)
{
    int d = 0;
    for (int r = 0; r < R; r++)
        d += memcmp(a + (size_t)r * V, b + (size_t)r * V, (size_t)V * 4) != 0;
    return d;
}

static void check_pdl(int exact)
{
    GT_NEED_GPU();
    char *keep[5] = {save_env("DSV3_GINFER_FUSE"), save_env("DSV3_GINFER_PREFILL"),
                     save_env("DSV3_GINFER_PDL"), save_env("DSV3_GINFER_CARVEOUT"),
                     save_env("DSV3_GINFER_PDL_LATE")};
    int models = 4, R = run_rows(), runs = 0;
    for (int i = 0; i < models && !test_failed_; i++) {
        dsv3_config c;
        ginfer_random_config(&c, i & 1);
        dsv3_model m;
        dsv3_err e;
        if (ginfer_random_model(&m, &c, exact ? 0.3 : 0.1))
            break;
        int V = c.vocab_size, plen[NS] = {5, 20, 7}, ctx = MAXP + STEPS + GSTEPS + 8;
        int32_t prompt[NS][MAXP], toks[NS][STEPS], gt[2][GSTEPS][NS];
        for (int k = 0; k < NS; k++) {
            ginfer_random_ids(prompt[k], MAXP, V);
            ginfer_random_ids(toks[k], STEPS, V);
        }
        float *lg[2] = {malloc((size_t)R * V * 4), malloc((size_t)R * V * 4)};
        CHECK(lg[0] && lg[1]);
        for (int v = 0; v < NV && lg[0] && lg[1] && !test_failed_; v++) {
            if (exact && variants[v][1])
                continue;  /* the tensor-core prefill is bf16 only */
            int ok = 1;
            for (int p = 0; p < 2 && ok; p++) {
                infer *f = make_engine(&m, ctx, exact, v, p, 0, &e);
                ok = f && run(f, (const int32_t(*)[MAXP])prompt, plen,
                              (const int32_t(*)[STEPS])toks, V, lg[p], gt[p], &e) == 0;
                CHECKF(ok, "variant %d (FUSE=%s PREFILL=%s CARVEOUT=%s) PDL %s: %s", v,
                       variants[v][0] ? variants[v][0] : "-", variants[v][1] ? variants[v][1] : "-",
                       variants[v][2] ? variants[v][2] : "-",
                       p ? variants[v][3] ? variants[v][3] : "default" : "off", e.msg);
                infer_free(f);
            }
            if (!ok)
                break;
            int d = rows_differ(lg[1], lg[0], R, V);
            CHECKF(d == 0, "model %d, variant %d: %d of %d rows differ with PDL", i, v, d, R);
            CHECKF(!memcmp(gt[0], gt[1], sizeof gt[0]),
                   "model %d, variant %d: greedy tokens differ with PDL", i, v);
            runs++;
        }
        free(lg[0]);
        free(lg[1]);
        model_free(&m);
    }
    restore_env("DSV3_GINFER_FUSE", keep[0]);
    restore_env("DSV3_GINFER_PREFILL", keep[1]);
    restore_env("DSV3_GINFER_PDL", keep[2]);
    restore_env("DSV3_GINFER_PDL_LATE", keep[4]);
    restore_env("DSV3_GINFER_CARVEOUT", keep[3]);
    printf("# ginfer pdl %s: %d runs of %d rows and %d greedy steps of %d rows, PDL %s, every "
           "one %s\n", exact ? "fp32" : "bf16", runs, R, GSTEPS, NS,
           device_has_pdl() ? "on by default" : "unavailable (compute capability < 9.0)",
           test_failed_ ? "checked (see failures)" : "bitwise equal to plain launches");
}

/* Drafts and steps of the MTP stream on slot 0: MSTEPS times the draft after toks[s] (its
 * logits) then the step feeding toks[s] (its logits): 2 * MSTEPS + 1 rows into lg. */
static int run_mtp(infer *f, const int32_t *prompt, int P, const int32_t *toks, int V,
                   float *lg, dsv3_err *e)
{
    int z = 0, row = 0;
    if (infer_prefill(f, 0, prompt, P, lg + (size_t)row++ * V, e))
        return -1;
    for (int s = 0; s < MSTEPS; s++)
        if (infer_mtp_draft(f, 1, &z, &toks[s], lg + (size_t)row++ * V, e) ||
            infer_forward(f, 1, &z, &toks[s], NULL, lg + (size_t)row++ * V, e))
            return -1;
    return 0;
}

static void check_pdl_mtp(int exact)
{
    GT_NEED_GPU();
    char *keep[5] = {save_env("DSV3_GINFER_FUSE"), save_env("DSV3_GINFER_PREFILL"),
                     save_env("DSV3_GINFER_PDL"), save_env("DSV3_GINFER_CARVEOUT"),
                     save_env("DSV3_GINFER_PDL_LATE")};
    int models = 2, R = 2 * MSTEPS + 1;
    for (int i = 0; i < models && !test_failed_; i++) {
        dsv3_config c;
        ginfer_random_config(&c, i & 1);
        c.num_nextn_predict_layers = 1;
        dsv3_model m;
        dsv3_err e;
        if (ginfer_random_model(&m, &c, exact ? 0.3 : 0.1))
            break;
        int V = c.vocab_size, ctx = MAXP + MSTEPS + 8;
        int32_t prompt[MAXP], toks[MSTEPS];
        ginfer_random_ids(prompt, MAXP, V);
        ginfer_random_ids(toks, MSTEPS, V);
        float *lg[2] = {malloc((size_t)R * V * 4), malloc((size_t)R * V * 4)};
        int ok = lg[0] && lg[1];
        CHECK(ok);
        for (int p = 0; p < 2 && ok; p++) {
            infer *f = make_engine(&m, ctx, exact, 0, p, 1, &e);
            ok = f && run_mtp(f, prompt, 11, toks, V, lg[p], &e) == 0;
            CHECKF(ok, "MTP, PDL %s: %s", p ? "default" : "off", e.msg);
            infer_free(f);
        }
        if (ok) {
            int d = rows_differ(lg[1], lg[0], R, V);
            CHECKF(d == 0, "model %d, MTP: %d of %d rows (drafts and steps) differ with PDL", i,
                   d, R);
        }
        printf("# ginfer pdl mtp %s model %d: %d rows of drafts and steps %s\n",
               exact ? "fp32" : "bf16", i, R, ok ? "compared" : "not run");
        free(lg[0]);
        free(lg[1]);
        model_free(&m);
    }
    restore_env("DSV3_GINFER_FUSE", keep[0]);
    restore_env("DSV3_GINFER_PREFILL", keep[1]);
    restore_env("DSV3_GINFER_PDL", keep[2]);
    restore_env("DSV3_GINFER_PDL_LATE", keep[4]);
    restore_env("DSV3_GINFER_CARVEOUT", keep[3]);
}

static void test_pdl_fp32(void) { check_pdl(1); }
static void test_pdl_bf16(void) { check_pdl(0); }
static void test_pdl_mtp_fp32(void) { check_pdl_mtp(1); }
static void test_pdl_mtp_bf16(void) { check_pdl_mtp(0); }

int main(void)
{
    test_seed();
    RUN(test_pdl_fp32);
    RUN(test_pdl_bf16);
    RUN(test_pdl_mtp_fp32);
    RUN(test_pdl_mtp_bf16);
    TEST_EXIT();
}
