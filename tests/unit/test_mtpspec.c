/* Tests of speculative decoding with the MTP module (lib/infer's MTP stream, sample_run's
 * opts.mtp): the stream's draft logits against lib/model's MTP forward (training path) at
 * every position of fresh random models, through prefills, single steps, accepted pairs and
 * rejected drafts cut off again; generation with drafts identical to generation without
 * them (greedy and sampled, -n and stop strings ending inside a pair, a full context,
 * batches, a chat) on models whose MTP module agrees with the main model always, often and
 * rarely; a model without MTP module refused. */
#include <math.h>
#include <stdio.h>

#include "../../lib/infer.h"
#include "../../lib/model.h"
#include "../../lib/sample.h"
#include "../eos_tokenizer.h"
#include "../test.h"

static double urand(void)
{
    return (test_rand() >> 11) * 0x1p-53;
}

/* A random tiny config with D MTP modules. */
static void random_config(dsv3_config *c, int V, int D)
{
    memset(c, 0, sizeof *c);
    c->vocab_size = V;
    c->hidden_size = 8 + 4 * (int)(test_rand() % 3);
    c->intermediate_size = 12;
    c->moe_intermediate_size = 6;
    c->num_hidden_layers = 1 + (int)(test_rand() % 2);
    c->first_k_dense_replace = 1;
    c->num_attention_heads = 1 + (int)(test_rand() % 3);
    c->q_lora_rank = (test_rand() & 1) ? 6 : 0;
    c->kv_lora_rank = 6 + (int)(test_rand() % 3);
    c->qk_nope_head_dim = 4;
    c->qk_rope_head_dim = 4;
    c->v_head_dim = 3 + (int)(test_rand() % 3);
    c->n_shared_experts = (int)(test_rand() % 2);
    c->n_group = 1;
    c->n_routed_experts = 2 + (int)(test_rand() % 3);
    c->topk_group = 1;
    c->num_experts_per_tok = 1 + (int)(test_rand() % 2);
    c->routed_scaling_factor = 1 + 2 * urand();
    c->norm_topk_prob = (int)(test_rand() & 1);
    c->rms_norm_eps = 1e-6;
    c->max_position_embeddings = 128;
    c->initializer_range = 0.02;
    c->rope_theta = 10000;
    c->rope_interleave = (int)(test_rand() & 1);
    c->bos_token_id = c->eos_token_id = -1;
    c->num_nextn_predict_layers = D;
}

static double row_err(const float *a, const float *b, int V)
{
    double d = 0, s = 0;
    for (int v = 0; v < V; v++) {
        if (fabs((double)a[v] - b[v]) > d)
            d = fabs((double)a[v] - b[v]);
        if (fabs((double)b[v]) > s)
            s = fabs((double)b[v]);
    }
    return s > 0 ? d / s : d;
}

/* The MTP stream's draft logits at every position t (from h_t and ids[t+1]) against MTP
 * module 1's logits row t of the training forward over the whole sequence. Tokens are fed
 * one at a time, in accepted pairs, or as a pair whose second (a wrong draft) is cut off. */
static void test_draft_vs_training(void)
{
    for (int it = 0; it < 6; it++) {
        dsv3_config c;
        random_config(&c, 20 + (int)(test_rand() % 20), 1 + (int)(test_rand() % 2));
        dsv3_model m;
        dsv3_err e;
        REQUIRE(model_init(&m, &c, &e) == 0);
        model_init_random(&m, test_rand(), 0.3);
        int T = 12 + (int)(test_rand() % 20), P = 1 + (int)(test_rand() % 6), V = c.vocab_size;
        int32_t ids[T], tg[T];
        for (int t = 0; t < T; t++)
            ids[t] = (int32_t)(test_rand() % (uint64_t)V);
        for (int t = 0; t < T; t++)
            tg[t] = t + 1 < T ? ids[t + 1] : -1;
        m.mtp_lambda = 0.3f;
        model_acts *a = model_acts_new(&m, 1, T, &e);
        REQUIRE(a);
        float loss;
        REQUIRE(model_forward(&m, a, ids, tg, &loss, &e) == 0);
        const float *ref = model_acts_mtp_logits(a, 0);
        REQUIRE(ref);
        infer *f;
        REQUIRE(infer_new(&f, &m, T, 1, &e) == 0);
        REQUIRE(infer_use_mtp(f, &e) == 0);
        float *lg = malloc((size_t)2 * T * V * sizeof *lg), *dl = malloc((size_t)V * 4);
        int slot[T];
        memset(slot, 0, sizeof slot);
        REQUIRE(infer_prefill(f, 0, ids, P, lg, &e) == 0);
        double worst = 0;
        int t = P - 1, cuts = 0, pairs = 0;  /* the stream's next position */
        while (t + 2 < T) {
            /* Draft at position t: h_t and ids[t+1]; it predicts ids[t+2]. */
            CHECKF(infer_mtp_draft(f, 1, slot, ids + t + 1, dl, &e) == 0, "%s", e.msg);
            double r = row_err(dl, ref + (size_t)t * V, V);
            CHECKF(r <= 1e-5, "it %d position %d: rel err %.3g", it, t, r);
            worst = r > worst ? r : worst;
            int len = infer_slot_len(f, 0), mode = (int)(test_rand() % 3);
            if (mode == 0 || t + 3 >= T) {
                REQUIRE(infer_forward(f, 1, slot, ids + t + 1, NULL, lg, &e) == 0);
                t += 1;
            } else if (mode == 1) {  /* the draft was right: both tokens stay */
                REQUIRE(infer_forward(f, 2, slot, ids + t + 1, NULL, lg, &e) == 0);
                t += 2;
                pairs++;
            } else {                 /* a wrong draft: fed, then cut */
                int32_t two[2] = {ids[t + 1], (ids[t + 2] + 1) % V};
                REQUIRE(infer_forward(f, 2, slot, two, NULL, lg, &e) == 0);
                REQUIRE(infer_slot_truncate(f, 0, len + 1, &e) == 0);
                t += 1;
                cuts++;
            }
        }
        /* The stream has passed position 0: cutting the slot to 1 token is refused. */
        CHECK(infer_slot_truncate(f, 0, 1, &e) != 0);
        printf("# it %d: T %d prefill %d, %d pairs, %d cut drafts, worst rel err %.3g\n", it,
               T, P, pairs, cuts, worst);
        free(lg);
        free(dl);
        infer_free(f);
        model_acts_free(a);
        model_free(&m);
        if (test_failed_)
            return;
    }
}

static void scale(float *w, size_t n, float s)
{
    for (size_t i = 0; i < n; i++)
        w[i] *= s;
}

/* A random model over the byte tokenizer whose blocks' outputs are scaled by `main` (main
 * model) and `mtp` (the MTP block); the MTP projection passes the normed embedding through
 * (plus `mix` of the hidden state). With main = mtp = mix = 0 both are the same bigram
 * model, so the drafts are (nearly) always right; with 1s, a random MTP module is rarely
 * right. */
static void byte_model(dsv3_model *m, float main, float mtp, float mix)
{
    dsv3_config c;
    random_config(&c, 257, 1);
    dsv3_err e;
    int rc = model_init(m, &c, &e);
    CHECKF(rc == 0, "%s", e.msg);
    model_init_random(m, test_rand(), 0.5);
    int H = c.hidden_size, nh = c.num_attention_heads, dv = c.v_head_dim;
    int mi = c.moe_intermediate_size;
    for (int l = 0; l <= c.num_hidden_layers; l++) {
        model_layer *L = l < c.num_hidden_layers ? &m->w.layers[l] : &m->w.mtp[0].block;
        float s = l < c.num_hidden_layers ? main : mtp;
        scale(L->o_proj, (size_t)H * nh * dv, s);
        if (!config_layer_is_moe(&c, l)) {
            scale(L->down_proj, (size_t)H * c.intermediate_size, s);
            continue;
        }
        for (int x = 0; x < c.n_routed_experts; x++)
            scale(L->e_down[x], (size_t)H * mi, s);
        if (c.n_shared_experts)
            scale(L->s_down, (size_t)H * mi * c.n_shared_experts, s);
    }
    float *ehp = m->w.mtp[0].eh_proj;  /* [H, 2H]: embedding half, hidden half */
    for (int o = 0; o < H; o++)
        for (int i = 0; i < 2 * H; i++)
            ehp[(size_t)o * 2 * H + i] = i == o ? 1 : i >= H ? mix * ehp[(size_t)o * 2 * H + i] : 0;
}

typedef struct gen {
    int32_t ids[400];
    int n;
    sample_stop why;
    char text[800];
    sample_stats st;
} gen;

/* One request alone in a one-slot cache of ctx tokens. */
static int run1(dsv3_model *m, const bpe *b, int mtp, int ctx, const int32_t *prompt, int P,
                const sampler_params *sp, int n_predict, char **stops, int n_stops, gen *g)
{
    dsv3_err e;
    infer *f;
    memset(g, 0, sizeof *g);
    if (infer_new(&f, m, ctx, 1, &e) || (mtp && infer_use_mtp(f, &e))) {
        CHECKF(0, "%s", e.msg);
        return -1;
    }
    sample_request r = {.ids = (int32_t *)prompt, .n_ids = P, .sp = *sp,
                        .n_predict = n_predict, .stops = stops, .n_stops = n_stops};
    sample_run_opts o = {.eos = 0, .mtp = mtp};
    int rc = sample_run(f, b, &r, 1, &o, &g->st, &e);
    CHECKF(rc == 0, "%s", e.msg);
    g->n = r.n_gen < 400 ? r.n_gen : 400;
    memcpy(g->ids, r.gen, (size_t)g->n * sizeof *g->ids);
    g->why = r.why;
    snprintf(g->text, sizeof g->text, "%.*s", (int)r.text.n, (const char *)r.text.v);
    sample_request_free(&r);
    infer_free(f);
    return rc;
}

static int same(const gen *a, const gen *b)
{
    return a->n == b->n && a->why == b->why && !memcmp(a->ids, b->ids, (size_t)a->n * 4) &&
           !strcmp(a->text, b->text);
}

/* Generation with drafts equals generation without, for -n, stop strings, a full context,
 * greedy and sampled; on three kinds of MTP module. */
static void test_same_output(void)
{
    bpe *b = eos_tokenizer();
    REQUIRE(b);
    float kinds[3][3] = {{0, 0, 0}, {0.05f, 0.05f, 0.05f}, {1, 1, 1}};
    for (int k = 0; k < 3; k++) {
        dsv3_model m;
        byte_model(&m, kinds[k][0], kinds[k][1], kinds[k][2]);
        REQUIRE(!test_failed_);
        int32_t prompt[6];
        for (int i = 0; i < 6; i++)
            prompt[i] = 1 + (int32_t)(test_rand() % 256);
        sampler_params sp;
        sampler_params_default(&sp);
        for (int temp = 0; temp < 2; temp++) {
            sp.temp = temp ? 0.9 : 0;
            sp.seed = test_rand();
            gen a, d;
            /* 80 tokens (or fewer: EOS, id 0, may end it). */
            run1(&m, b, 0, 120, prompt, 6, &sp, 80, NULL, 0, &a);
            run1(&m, b, 1, 120, prompt, 6, &sp, 80, NULL, 0, &d);
            CHECKF(same(&a, &d), "kind %d temp %d: %d vs %d tokens", k, temp, a.n, d.n);
            double acc = d.st.drafts ? (double)d.st.accepted / d.st.drafts : 0;
            printf("# kind %d temp %d: %d tokens (%s), %llu drafts, acceptance %.3f, %.3f "
                   "tokens a main forward\n", k, temp, d.n, sample_stop_name(d.why),
                   (unsigned long long)d.st.drafts, acc,
                   (double)d.st.decode_tokens / (d.st.main_steps ? d.st.main_steps : 1));
            CHECK(d.st.drafts > 0 || d.n < 3);
            CHECK(d.st.main_steps + d.st.accepted == d.st.decode_tokens);
            if (k == 0 && temp == 0 && d.n >= 64)
                CHECKF(acc >= 0.9, "bigram drafts accepted %.3f", acc);
            /* -n: every count from 1 to 20, so the end falls on both halves of a pair. */
            for (int n = 1; n <= 20; n++) {
                run1(&m, b, 0, 120, prompt, 6, &sp, n, NULL, 0, &a);
                run1(&m, b, 1, 120, prompt, 6, &sp, n, NULL, 0, &d);
                CHECKF(same(&a, &d), "kind %d temp %d -n %d", k, temp, n);
            }
            /* A full context: 6 + 14 = 20 tokens. */
            run1(&m, b, 0, 20, prompt, 6, &sp, -1, NULL, 0, &a);
            run1(&m, b, 1, 20, prompt, 6, &sp, -1, NULL, 0, &d);
            CHECKF(same(&a, &d), "kind %d temp %d: full context", k, temp);
            /* Stop strings: two bytes of the run without drafts, at several places. */
            run1(&m, b, 0, 120, prompt, 6, &sp, 64, NULL, 0, &a);
            for (int at = 0; at + 2 <= a.n && at < 12; at++) {
                if (a.ids[at] == 0 || a.ids[at + 1] == 0)
                    continue;
                char stop[3] = {(char)(a.ids[at] - 1), (char)(a.ids[at + 1] - 1), 0};
                if (!stop[0] || !stop[1])
                    continue;
                char *stops[1] = {stop};
                gen s1, s2;
                run1(&m, b, 0, 120, prompt, 6, &sp, 64, stops, 1, &s1);
                run1(&m, b, 1, 120, prompt, 6, &sp, 64, stops, 1, &s2);
                CHECKF(same(&s1, &s2) && s1.why == SAMPLE_STOP_STRING,
                       "kind %d temp %d: stop at %d", k, temp, at);
            }
            if (test_failed_)
                break;
        }
        model_free(&m);
        if (test_failed_)
            break;
    }
    bpe_free(b);
}

/* Batches of requests (fewer slots than requests) and a chat of three turns give the same
 * with drafts as without. */
static void test_batch_and_chat(void)
{
    bpe *b = eos_tokenizer();
    REQUIRE(b);
    dsv3_model m;
    byte_model(&m, 0.2f, 0.2f, 0.2f);
    REQUIRE(!test_failed_);
    enum { N = 5 };
    int32_t prompts[N][4];
    sample_request r[2][N];
    sample_stats st[2];
    memset(r, 0, sizeof r);
    memset(st, 0, sizeof st);
    for (int mtp = 0; mtp < 2; mtp++) {
        for (int i = 0; i < N; i++) {
            for (int j = 0; j < 4; j++)
                prompts[i][j] = 1 + (int32_t)((i * 37 + j * 11) % 256);
            r[mtp][i].ids = prompts[i];
            r[mtp][i].n_ids = 1 + i % 4;
            sampler_params_default(&r[mtp][i].sp);
            r[mtp][i].sp.temp = i % 2 ? 0.7 : 0;
            r[mtp][i].sp.seed = 100 + (uint64_t)i;
            r[mtp][i].n_predict = 9 + 7 * i;
        }
        dsv3_err e;
        infer *f;
        REQUIRE(infer_new(&f, &m, 64, 3, &e) == 0);
        if (mtp)
            REQUIRE(infer_use_mtp(f, &e) == 0);
        sample_run_opts o = {.eos = 0, .mtp = mtp};
        CHECKF(sample_run(f, b, r[mtp], N, &o, &st[mtp], &e) == 0, "%s", e.msg);
        infer_free(f);
    }
    for (int i = 0; i < N; i++)
        CHECKF(r[0][i].n_gen == r[1][i].n_gen && r[0][i].why == r[1][i].why &&
                   !memcmp(r[0][i].gen, r[1][i].gen, (size_t)r[0][i].n_gen * 4),
               "batch request %d", i);
    CHECK(st[1].drafts > 0);
    for (int i = 0; i < N; i++) {
        sample_request_free(&r[0][i]);
        sample_request_free(&r[1][i]);
    }
    /* A chat: the conversation stays in the cache between turns. */
    char *out[2] = {NULL, NULL};
    for (int mtp = 0; mtp < 2; mtp++) {
        static char turns[] = "hello there\nand again\nthird turn\n";
        FILE *in = fmemopen(turns, strlen(turns), "r");
        size_t n;
        FILE *o = open_memstream(&out[mtp], &n);
        REQUIRE(in && o);
        sample_defaults d = {.n_predict = 12, .mtp = mtp};
        sampler_params_default(&d.sp);
        d.sp.temp = 0;
        dsv3_err e;
        infer *f;
        sample_stats cs = {0};
        REQUIRE(infer_new(&f, &m, 300, 1, &e) == 0);
        if (mtp)
            REQUIRE(infer_use_mtp(f, &e) == 0);
        CHECKF(sample_chat(f, b, in, o, NULL, NULL, &d, -1, &cs, &e) == 0, "%s", e.msg);
        fclose(in);
        fclose(o);
        infer_free(f);
    }
    CHECKF(out[0] && out[1] && !strcmp(out[0], out[1]), "chat: '%s' vs '%s'", out[0], out[1]);
    free(out[0]);
    free(out[1]);
    model_free(&m);
    bpe_free(b);
}

/* A model without MTP modules: the stream is refused with a message; without it, drafts
 * are refused by sample_run. */
static void test_no_mtp_module(void)
{
    dsv3_config c;
    random_config(&c, 30, 0);
    dsv3_model m;
    dsv3_err e;
    REQUIRE(model_init(&m, &c, &e) == 0);
    infer *f;
    REQUIRE(infer_new(&f, &m, 16, 1, &e) == 0);
    CHECK(infer_use_mtp(f, &e) != 0);
    CHECK(strstr(e.msg, "no MTP module") != NULL);
    CHECK(!infer_mtp_on(f));
    int32_t nx = 1;
    int sl = 0;
    float lg[30];
    CHECK(infer_mtp_draft(f, 1, &sl, &nx, lg, &e) != 0);
    infer_free(f);
    model_free(&m);
}

int main(void)
{
    test_seed();
    RUN(test_draft_vs_training);
    RUN(test_same_output);
    RUN(test_batch_and_chat);
    RUN(test_no_mtp_module);
    TEST_EXIT();
}
