/* GPU test of speculative decoding with the MTP module (kernels/ginfer_mtp behind lib/infer's
 * infer_new_gpu_mtp) against lib/infer's MTP stream on the CPU, on fresh random tiny models
 * with an MTP module (weights rounded to bf16, so the CPU, fp32 and bf16 engines hold the same
 * numbers):
 * - the stream's draft logits, teacher-forced through a 300-token prompt (two passes of the
 *   stream's first call), single steps, accepted pairs and drafts cut off again: the fp32
 *   engine within 1e-4 of the CPU at every position, the bf16 engine's median reported;
 * - generation of 64 tokens through sample_run, greedy and sampled at a fixed seed, on MTP
 *   modules that agree with the main model always, often and rarely: the GPU with drafts
 *   token for token equal to the GPU without them (fp32 and bf16 engines), and the fp32
 *   engine with drafts equal to the CPU with drafts; greedy: the same drafts checked and
 *   accepted as on the CPU (the same acceptance rate); -n from 1 to 4 (the end on both halves
 *   of a pair);
 * - a batch (3 slots, 5 requests, greedy and sampled) equal with and without drafts;
 * - an engine made without the module refuses the stream; a model without one is refused. */
#include <math.h>
#include <stdlib.h>

#include "../../lib/infer.h"
#include "../../lib/model.h"
#include "../../lib/sample.h"
#include "../eos_tokenizer.h"
#include "ginfer_test.h"
#include "gpu_test.h"

enum { STEPS = 64 };

/* Dimensions the GPU kernels take (multiples of 8); D MTP modules. */
static void random_config(dsv3_config *c, int V, int q, int D)
{
    ginfer_random_config(c, q);
    c->vocab_size = V;
    c->num_hidden_layers = 2 + (int)(test_rand() % 2);
    c->num_attention_heads = 4 + 4 * (int)(test_rand() % 2);
    c->num_nextn_predict_layers = D;
}

static void to_bf16(dsv3_model *m)
{
    for (size_t k = 0; k < m->n_params; k++)
        m->params[k] = gpu_bf2f(gpu_f2bf(m->params[k]));
}

static int random_model(dsv3_model *m, int V, int q, int D, double std)
{
    dsv3_config c;
    random_config(&c, V, q, D);
    dsv3_err e;
    if (model_init(m, &c, &e)) {
        CHECKF(0, "%s", e.msg);
        return -1;
    }
    model_init_random(m, test_rand(), std);
    to_bf16(m);
    return 0;
}

static void scale(float *w, size_t n, float s)
{
    for (size_t i = 0; i < n; i++)
        w[i] *= s;
}

/* As tests/unit/test_mtpspec.c's: blocks' outputs scaled by `main` (main model) and `mtp`
 * (the MTP block), the MTP projection passing the normed embedding through (plus `mix` of
 * the hidden state). With 0s both are the same bigram model (drafts nearly always right);
 * with 1s a random MTP module is rarely right. */
static int byte_model(dsv3_model *m, float main, float mtp, float mix)
{
    if (random_model(m, 264, (int)(test_rand() & 1), 1, 0.5))
        return -1;
    const dsv3_config *c = &m->cfg;
    int H = c->hidden_size, nh = c->num_attention_heads, dv = c->v_head_dim;
    int mi = c->moe_intermediate_size;
    for (int l = 0; l <= c->num_hidden_layers; l++) {
        model_layer *L = l < c->num_hidden_layers ? &m->w.layers[l] : &m->w.mtp[0].block;
        float s = l < c->num_hidden_layers ? main : mtp;
        scale(L->o_proj, (size_t)H * nh * dv, s);
        if (!config_layer_is_moe(c, l)) {
            scale(L->down_proj, (size_t)H * c->intermediate_size, s);
            continue;
        }
        for (int x = 0; x < c->n_routed_experts; x++)
            scale(L->e_down[x], (size_t)H * mi, s);
        if (c->n_shared_experts)
            scale(L->s_down, (size_t)H * mi * c->n_shared_experts, s);
    }
    float *ehp = m->w.mtp[0].eh_proj;  /* [H, 2H]: embedding half, hidden half */
    for (int o = 0; o < H; o++)
        for (int i = 0; i < 2 * H; i++)
            ehp[(size_t)o * 2 * H + i] =
                i == o ? 1 : i >= H ? mix * ehp[(size_t)o * 2 * H + i] : 0;
    to_bf16(m);
    return 0;
}

/* dev: 0 the CPU, 1 the fp32 GPU engine, 2 the bf16 one; with the stream on when mtp. */
static int engine(infer **f, const dsv3_model *m, int dev, int mtp, int ctx, int slots,
                  dsv3_err *e)
{
    *f = NULL;
    if (!dev)
        return infer_new(f, m, ctx, slots, e) || (mtp && infer_use_mtp(*f, e)) ? -1 : 0;
    if (!mtp)
        return infer_new_gpu(f, m, ctx, slots, 0, dev == 1, e);
    return infer_new_gpu_mtp(f, m, NULL, ctx, slots, 0, dev == 1, e) || infer_use_mtp(*f, e)
               ? -1
               : 0;
}

/* The draft logits of the three engines at every stream position, fed the same rows. */
static void test_draft_logits(void)
{
    GT_NEED_GPU();
    enum { P = 300, T = 360 };
    double worst = 0, errs[2 * T], worst_bf = 0;
    int nb = 0;
    for (int it = 0; it < 2; it++) {
        dsv3_model m;
        if (random_model(&m, 256 + 8 * (int)(test_rand() % 8), it, 1, 0.3))
            return;
        int V = m.cfg.vocab_size, slot[2] = {0, 0};
        int32_t ids[T];
        for (int t = 0; t < T; t++)
            ids[t] = (int32_t)(test_rand() % (uint64_t)V);
        infer *f[3] = {NULL, NULL, NULL};
        float *lg = malloc((size_t)P * V * 4), *dl[3];
        dsv3_err e;
        int ok = 1;
        for (int d = 0; d < 3; d++) {
            dl[d] = malloc((size_t)V * 4);
            ok = ok && engine(&f[d], &m, d, 1, T + 4, 1, &e) == 0 &&
                 infer_prefill(f[d], 0, ids, P, lg, &e) == 0;
        }
        CHECKF(ok, "%s", e.msg);
        int t = P - 1, pairs = 0, cuts = 0;  /* the stream's next position */
        while (ok && t + 2 < T) {
            /* the draft at position t (from h_t and ids[t+1]) predicts ids[t+2] */
            for (int d = 0; d < 3 && ok; d++)
                ok = infer_mtp_draft(f[d], 1, slot, ids + t + 1, dl[d], &e) == 0;
            CHECKF(ok, "%s", e.msg);
            double r = rel(dl[1], dl[0], V), rb = rel(dl[2], dl[0], V);
            CHECKF(!ok || r <= 1e-4, "it %d position %d: fp32 draft logits rel err %.3g", it, t,
                   r);
            worst = fmax(worst, r);
            worst_bf = fmax(worst_bf, rb);
            errs[nb++] = rb;
            int len = infer_slot_len(f[0], 0), mode = (int)(test_rand() % 3);
            int32_t two[2] = {ids[t + 1], mode == 2 ? (ids[t + 2] + 1) % V : ids[t + 2]};
            int rows = mode == 0 || t + 3 >= T ? 1 : 2;
            for (int d = 0; d < 3 && ok; d++) {
                ok = infer_forward(f[d], rows, slot, two, NULL, lg, &e) == 0;
                if (ok && rows == 2 && mode == 2)  /* a wrong draft: fed, then cut */
                    ok = infer_slot_truncate(f[d], 0, len + 1, &e) == 0;
            }
            t += rows == 2 && mode == 1 ? 2 : 1;
            pairs += rows == 2 && mode == 1;
            cuts += rows == 2 && mode == 2;
        }
        printf("# it %d: prompt %d, %d pairs, %d cut drafts\n", it, P, pairs, cuts);
        for (int d = 0; d < 3; d++) {
            infer_free(f[d]);
            free(dl[d]);
        }
        free(lg);
        model_free(&m);
        if (test_failed_)
            return;
    }
    qsort(errs, nb, sizeof *errs, cmp_double);
    printf("# stat ginfer_mtp_fp32_draft_logits %.3g bound 1e-04 %s\n", worst,
           worst <= 1e-4 ? "ok" : "FAIL");
    printf("# ginfer_mtp bf16 draft logits: median rel err %.3g, worst %.3g over %d positions\n",
           errs[nb / 2], worst_bf, nb);
}

typedef struct gen {
    int32_t ids[STEPS];
    int n;
    sample_stop why;
    sample_stats st;
} gen;

static int run1(const dsv3_model *m, const bpe *b, int dev, int mtp, const int32_t *prompt,
                int P, const sampler_params *sp, int n_predict, gen *g)
{
    dsv3_err e;
    infer *f;
    memset(g, 0, sizeof *g);
    if (engine(&f, m, dev, mtp, P + STEPS + 8, 1, &e)) {
        CHECKF(0, "%s", e.msg);
        return -1;
    }
    sample_request r = {.ids = (int32_t *)prompt, .n_ids = P, .sp = *sp,
                        .n_predict = n_predict};
    sample_run_opts o = {.eos = -1, .mtp = mtp};
    int rc = sample_run(f, b, &r, 1, &o, &g->st, &e);
    CHECKF(rc == 0, "%s", e.msg);
    g->n = r.n_gen < STEPS ? r.n_gen : STEPS;
    memcpy(g->ids, r.gen, (size_t)g->n * sizeof *g->ids);
    g->why = r.why;
    sample_request_free(&r);
    infer_free(f);
    return rc;
}

static int same(const gen *a, const gen *b)
{
    return a->n == b->n && a->why == b->why && !memcmp(a->ids, b->ids, (size_t)a->n * 4);
}

static void test_generation(void)
{
    GT_NEED_GPU();
    bpe *b = eos_tokenizer();
    REQUIRE(b);
    static const char *names[3] = {"agreeing", "near", "random"};
    float kinds[3][3] = {{0, 0, 0}, {0.05f, 0.05f, 0.05f}, {1, 1, 1}};
    for (int k = 0; k < 3 && !test_failed_; k++) {
        dsv3_model m;
        if (byte_model(&m, kinds[k][0], kinds[k][1], kinds[k][2]))
            break;
        int32_t prompt[6];
        for (int i = 0; i < 6; i++)
            prompt[i] = 1 + (int32_t)(test_rand() % 256);
        sampler_params sp;
        sampler_params_default(&sp);
        for (int temp = 0; temp < 2 && !test_failed_; temp++) {
            sp.temp = temp ? 0.9 : 0;
            sp.seed = test_rand();
            gen c1, x0, x1, b0, b1;
            run1(&m, b, 0, 1, prompt, 6, &sp, STEPS, &c1);
            run1(&m, b, 1, 0, prompt, 6, &sp, STEPS, &x0);
            run1(&m, b, 1, 1, prompt, 6, &sp, STEPS, &x1);
            run1(&m, b, 2, 0, prompt, 6, &sp, STEPS, &b0);
            run1(&m, b, 2, 1, prompt, 6, &sp, STEPS, &b1);
            CHECKF(x0.n == STEPS, "%d tokens", x0.n);
            CHECKF(same(&x0, &x1), "%s temp %d: fp32 GPU with drafts differs from without",
                   names[k], temp);
            CHECKF(same(&b0, &b1), "%s temp %d: bf16 GPU with drafts differs from without",
                   names[k], temp);
            CHECKF(same(&x1, &c1), "%s temp %d: fp32 GPU with drafts differs from the CPU's",
                   names[k], temp);
            CHECK(x1.st.drafts > 0 && b1.st.drafts > 0);
            CHECK(x1.st.main_steps + x1.st.accepted == x1.st.decode_tokens);
            CHECK(b1.st.main_steps + b1.st.accepted == b1.st.decode_tokens);
            if (!temp)
                CHECKF(x1.st.drafts == c1.st.drafts && x1.st.accepted == c1.st.accepted,
                       "%s greedy: GPU %llu of %llu drafts accepted, CPU %llu of %llu",
                       names[k], (unsigned long long)x1.st.accepted,
                       (unsigned long long)x1.st.drafts, (unsigned long long)c1.st.accepted,
                       (unsigned long long)c1.st.drafts);
            printf("# %s MTP module, %s: acceptance CPU %llu/%llu, GPU fp32 %llu/%llu, GPU "
                   "bf16 %llu/%llu\n", names[k], temp ? "sampled (temp 0.9)" : "greedy",
                   (unsigned long long)c1.st.accepted, (unsigned long long)c1.st.drafts,
                   (unsigned long long)x1.st.accepted, (unsigned long long)x1.st.drafts,
                   (unsigned long long)b1.st.accepted, (unsigned long long)b1.st.drafts);
            if (k == 0 && !temp)
                CHECKF(x1.st.accepted * 10 >= x1.st.drafts * 9, "bigram drafts: %llu of %llu",
                       (unsigned long long)x1.st.accepted, (unsigned long long)x1.st.drafts);
            for (int n = 1; n <= 4 && k == 1; n++) {
                run1(&m, b, 2, 0, prompt, 6, &sp, n, &b0);
                run1(&m, b, 2, 1, prompt, 6, &sp, n, &b1);
                CHECKF(same(&b0, &b1) && b0.n == n, "temp %d -n %d", temp, n);
            }
        }
        model_free(&m);
    }
    bpe_free(b);
}

/* Five requests through three slots, greedy and sampled mixed: the same with drafts. */
static void test_batch(void)
{
    GT_NEED_GPU();
    bpe *b = eos_tokenizer();
    REQUIRE(b);
    dsv3_model m;
    if (byte_model(&m, 0.05f, 0.05f, 0.05f)) {
        bpe_free(b);
        return;
    }
    enum { N = 5 };
    int32_t prompts[N][4];
    sample_request r[4][N];
    sample_stats st[4];
    memset(r, 0, sizeof r);
    memset(st, 0, sizeof st);
    /* run 0: bf16 without drafts, 1: bf16 with, 2: fp32 with, 3: the CPU with */
    for (int run = 0; run < 4; run++) {
        for (int i = 0; i < N; i++) {
            for (int j = 0; j < 4; j++)
                prompts[i][j] = 1 + (int32_t)((i * 37 + j * 11) % 256);
            r[run][i].ids = prompts[i];
            r[run][i].n_ids = 1 + i % 4;
            sampler_params_default(&r[run][i].sp);
            r[run][i].sp.temp = i % 2 ? 0.7 : 0;
            r[run][i].sp.seed = 100 + (uint64_t)i;
            r[run][i].n_predict = 9 + 7 * i;
        }
        dsv3_err e;
        infer *f;
        int mtp = run > 0, dev = run < 2 ? 2 : run == 2 ? 1 : 0;
        int ok = engine(&f, &m, dev, mtp, 64, 3, &e) == 0;
        sample_run_opts o = {.eos = -1, .mtp = mtp};
        CHECKF(ok && sample_run(f, b, r[run], N, &o, &st[run], &e) == 0, "%s", e.msg);
        infer_free(f);
    }
    for (int i = 0; i < N; i++) {
        CHECKF(r[0][i].n_gen == r[1][i].n_gen && r[0][i].why == r[1][i].why &&
                   !memcmp(r[0][i].gen, r[1][i].gen, (size_t)r[0][i].n_gen * 4),
               "batch request %d: bf16 with drafts differs from without", i);
        CHECKF(r[2][i].n_gen == r[3][i].n_gen && r[2][i].why == r[3][i].why &&
                   !memcmp(r[2][i].gen, r[3][i].gen, (size_t)r[2][i].n_gen * 4),
               "batch request %d: fp32 GPU with drafts differs from the CPU", i);
    }
    CHECK(st[1].drafts > 0 && st[2].drafts == st[3].drafts);
    printf("# batch of 5 in 3 slots: %llu of %llu drafts accepted (bf16)\n",
           (unsigned long long)st[1].accepted, (unsigned long long)st[1].drafts);
    for (int run = 0; run < 4; run++)
        for (int i = 0; i < N; i++)
            sample_request_free(&r[run][i]);
    model_free(&m);
    bpe_free(b);
}

static void test_refusals(void)
{
    GT_NEED_GPU();
    dsv3_model m;
    if (random_model(&m, 256, 1, 1, 0.3))
        return;
    dsv3_err e;
    infer *f = NULL;
    REQUIRE(infer_new_gpu(&f, &m, 32, 1, 0, 0, &e) == 0);
    CHECK(infer_use_mtp(f, &e) != 0 && strstr(e.msg, "without the MTP module"));
    CHECK(!infer_mtp_on(f));
    infer_free(f);
    model_free(&m);
    if (random_model(&m, 256, 1, 0, 0.3))
        return;
    f = NULL;
    CHECK(infer_new_gpu_mtp(&f, &m, NULL, 32, 1, 0, 0, &e) != 0 && !f);
    CHECK(strstr(e.msg, "no MTP module") != NULL);
    model_free(&m);
}

int main(void)
{
    test_seed();
    RUN(test_draft_logits);
    RUN(test_generation);
    RUN(test_batch);
    RUN(test_refusals);
    TEST_EXIT();
}
