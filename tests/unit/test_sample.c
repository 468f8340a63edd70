/* Tests of lib/sample's text stream: UTF-8 characters held back until complete, text that
 * could begin a stop string held back until it cannot, a stop string across tokens cutting
 * the text before it. Tokens here are single bytes (a tokenizer of the 256 byte tokens).
 * And of sample_run: how a run ends (EOS, -n, the context), and greedy steps queued one
 * ahead (the default) giving what steps that wait give. */
#include <math.h>

#include "../../lib/sample.h"
#include "../eos_tokenizer.h"
#include "../test.h"

static bpe *byte_tokenizer(void)
{
    static uint8_t bytes[256], kind[256];
    static const uint8_t *tok[256];
    static uint32_t len[256];
    for (int i = 0; i < 256; i++) {
        bytes[i] = (uint8_t)i;
        tok[i] = &bytes[i];
        len[i] = 1;
        kind[i] = BPE_BYTE;
    }
    const char *pat[] = {"[\\s\\S]"};
    bpe_spec s = {.vocab_size = 256, .kind = kind, .tok = tok, .len = len, .patterns = pat,
                  .n_patterns = 1, .bos = BPE_NONE, .eos = BPE_NONE, .pad = BPE_NONE};
    bpe *b = NULL;
    dsv3_err e;
    if (bpe_build(&b, &s, &e))
        fprintf(stderr, "    %s\n", e.msg);
    return b;
}

/* Pushes the bytes of s one token each; appends what is released to got. */
static int push(sample_text *t, const char *s, bpe_bytes *got)
{
    int stop = 0;
    for (const char *p = s; *p && !stop; p++) {
        const uint8_t *o;
        size_t n;
        stop = sample_text_push(t, (uint8_t)*p, &o, &n, NULL);
        bpe_bytes_append(got, o, n);
    }
    return stop;
}

static int is(const bpe_bytes *b, const char *s)
{
    return b->n == strlen(s) && !memcmp(b->v, s, b->n);
}

static void test_utf8_held_back(void)
{
    bpe *b = byte_tokenizer();
    REQUIRE(b);
    sample_text t;
    sample_text_init(&t, b, NULL, 0);
    bpe_bytes got = {0};
    push(&t, "a\xC3", &got);
    CHECK(is(&got, "a"));
    push(&t, "\xA9\xE2\x82", &got);  /* é complete, € begun */
    CHECK(is(&got, "a\xC3\xA9"));
    push(&t, "\xAC", &got);
    CHECK(is(&got, "a\xC3\xA9\xE2\x82\xAC"));
    push(&t, "\xF0\x9F", &got);
    const uint8_t *o;
    size_t n;
    sample_text_flush(&t, &o, &n);  /* the end: a cut character still comes out */
    CHECK(n == 2 && o[0] == 0xF0);
    bpe_bytes_free(&got);
    sample_text_free(&t);
    bpe_free(b);
}

static void test_stop_across_tokens(void)
{
    bpe *b = byte_tokenizer();
    REQUIRE(b);
    char *stops[] = {"abc", "zz"};
    sample_text t;
    sample_text_init(&t, b, stops, 2);
    bpe_bytes got = {0};
    CHECK(push(&t, "xab", &got) == 0);
    CHECK(is(&got, "x"));  /* "ab" could begin "abc" */
    CHECK(push(&t, "d", &got) == 0);
    CHECK(is(&got, "xabd"));
    CHECK(push(&t, "z", &got) == 0);
    CHECK(is(&got, "xabd"));
    CHECK(push(&t, "qaab", &got) == 0);
    CHECK(is(&got, "xabdzqa"));
    CHECK(push(&t, "cdef", &got) == 1);  /* "abc" done: nothing from it on */
    CHECK(is(&got, "xabdzqa"));
    CHECK(t.text.n == 7);
    const uint8_t *o;
    size_t n;
    CHECK(sample_text_push(&t, 'x', &o, &n, NULL) == 1 && n == 0);
    bpe_bytes_free(&got);
    sample_text_free(&t);
    bpe_free(b);
}

/* A random tiny model of the EOS tokenizer's 257 ids, weights of std sd. */
static int tiny_model(dsv3_model *m, double sd)
{
    dsv3_config c = {.vocab_size = 257, .hidden_size = 16, .intermediate_size = 16,
                     .moe_intermediate_size = 8, .num_hidden_layers = 2,
                     .num_attention_heads = 2, .kv_lora_rank = 8, .qk_nope_head_dim = 4,
                     .qk_rope_head_dim = 4, .v_head_dim = 4, .n_routed_experts = 4,
                     .num_experts_per_tok = 2, .n_group = 1, .topk_group = 1,
                     .routed_scaling_factor = 1, .first_k_dense_replace = 1,
                     .rms_norm_eps = 1e-6, .max_position_embeddings = 64,
                     .initializer_range = 0.02, .rope_theta = 10000, .rope_interleave = 1,
                     .bos_token_id = -1, .eos_token_id = -1};
    dsv3_err e;
    if (model_init(m, &c, &e)) {
        CHECKF(0, "%s", e.msg);
        return -1;
    }
    model_init_random(m, test_rand(), sd);
    return 0;
}

/* A model whose head is zero: every logit 0, so greedy takes the lowest id (the
 * end-of-sequence token); the run stops there at once, or goes to -n without an EOS id,
 * or to the full context. */
static void test_run_stops(void)
{
    bpe *b = eos_tokenizer();
    REQUIRE(b);
    dsv3_model m;
    dsv3_err e;
    REQUIRE(tiny_model(&m, 0.1) == 0);
    memset(m.w.lm_head, 0, sizeof(float) * 257 * (size_t)m.cfg.hidden_size);
    infer *f;
    REQUIRE(infer_new(&f, &m, 8, 1, &e) == 0);
    int32_t ids[3] = {5, 6, 7};
    sample_request r = {.ids = ids, .n_ids = 3, .n_predict = 4};
    sampler_params_default(&r.sp);
    r.sp.temp = 0;
    sample_stats st = {0};
    sample_run_opts o = {.eos = 0};
    CHECK(sample_run(f, b, &r, 1, &o, &st, &e) == 0);
    CHECK(r.why == SAMPLE_STOP_EOS && r.n_gen == 0 && r.text.n == 0);
    sample_request_free(&r);
    o.eos = -1;  /* EOS ignored: the special token is generated, printed as nothing */
    CHECK(sample_run(f, b, &r, 1, &o, &st, &e) == 0);
    CHECK(r.why == SAMPLE_STOP_LENGTH && r.n_gen == 4 && r.text.n == 0);
    sample_request_free(&r);
    r.n_predict = -1;  /* 3 prompt tokens and 5 generated fill the 8 of the context; the
                        * logits at the last position give a sixth, which is not fed */
    CHECK(sample_run(f, b, &r, 1, &o, &st, &e) == 0);
    CHECK(r.why == SAMPLE_STOP_CTX && r.n_gen == 6);
    sample_request_free(&r);
    int32_t big[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    sample_request r2 = {.ids = big, .n_ids = 8, .n_predict = 1, .sp = r.sp};
    CHECK(sample_run(f, b, &r2, 1, &o, &st, &e) == -1);
    CHECK(strstr(e.msg, "more than the context") != NULL);
    infer_free(f);
    model_free(&m);
    bpe_free(b);
}

enum { NREQ = 7, SLOTS = 3, CTX = 24 };

/* The run tests' requests: prompt lengths and -n (-1: to EOS or the context). */
static const int NP[NREQ] = {3, 12, 5, 2, 8, 10, 4}, NPRED[NREQ] = {-1, 6, 9, 1, -1, 14, 5};

/* The EOS tokenizer, a random tiny model (std 0.5) and NREQ random prompts of lengths NP. */
static int run_fixture(bpe **b, dsv3_model *m, int32_t p[][12])
{
    *b = eos_tokenizer();
    CHECK(*b != NULL);
    if (!*b)
        return -1;
    if (tiny_model(m, 0.5)) {
        bpe_free(*b);
        return -1;
    }
    for (int i = 0; i < NREQ; i++)
        for (int t = 0; t < NP[i]; t++)
            p[i][t] = 1 + (int32_t)(test_rand() % 256);
    return 0;
}

/* Runs the NREQ requests (prompts p, lengths np, -n as given) on a fresh engine of SLOTS
 * slots, greedily (sp NULL) or with sp (request i seeded seed + i); out[i] each request's
 * results. */
static int run_sp(const dsv3_model *m, const bpe *b, int32_t p[][12], const int *np,
                  const int *npred, char **stops, int n_stops, int32_t eos, int no_ahead,
                  int full, const sampler_params *sp, sample_request *out, sample_stats *st)
{
    infer *f;
    dsv3_err e;
    if (infer_new(&f, m, CTX, SLOTS, &e)) {
        CHECKF(0, "%s", e.msg);
        return -1;
    }
    for (int i = 0; i < NREQ; i++) {
        out[i] = (sample_request){.ids = p[i], .n_ids = np[i], .n_predict = npred[i],
                                  .stops = stops, .n_stops = n_stops};
        sampler_params_default(&out[i].sp);
        out[i].sp.temp = 0;
        if (sp) {
            out[i].sp = *sp;
            out[i].sp.seed = sp->seed + (uint64_t)i;
            if (sp->temp < 0)  /* mixed: every other request greedy */
                out[i].sp.temp = i % 2 ? 0 : 0.8;
        }
    }
    sample_run_opts o = {.eos = eos, .no_ahead = no_ahead, .full_logits = full};
    memset(st, 0, sizeof *st);
    int rc = sample_run(f, b, out, NREQ, &o, st, &e);
    CHECKF(rc == 0, "%s", e.msg);
    infer_free(f);
    return rc;
}

static int run_all(const dsv3_model *m, const bpe *b, int32_t p[][12], const int *np,
                   const int *npred, char **stops, int n_stops, int32_t eos, int no_ahead,
                   sample_request *out, sample_stats *st)
{
    return run_sp(m, b, p, np, npred, stops, n_stops, eos, no_ahead, 0, NULL, out, st);
}

static int same_result(const sample_request *a, const sample_request *b)
{
    return a->why == b->why && a->n_gen == b->n_gen &&
           !memcmp(a->gen, b->gen, (size_t)a->n_gen * sizeof *a->gen) && a->text.n == b->text.n &&
           !memcmp(a->text.v, b->text.v, a->text.n);
}

/* Seven requests through three slots (continuous batching), greedy: queued one ahead and
 * waiting, the same tokens, text, reasons and statistics, with runs ended by -n, the context,
 * an EOS id and a stop string (both taken from what a first run generated, so that they
 * occur). On the CPU engine a queued step runs at once, so the step after a sequence's end
 * is computed and its slot cut back, as on the GPU. Then chat turns (the slot kept): the
 * same slot lengths after each turn. */
static void test_run_ahead_same(void)
{
    bpe *b;
    dsv3_model m;
    int32_t p[NREQ][12];
    if (run_fixture(&b, &m, p))
        return;
    sample_request a[NREQ], w[NREQ];
    sample_stats sa, sw;
    if (run_all(&m, b, p, NP, NPRED, NULL, 0, -1, 1, w, &sw))
        goto out;
    /* an EOS id request 4 generates at its third token, a stop string request 0's
     * tokens 5 and 6 make */
    int32_t eos = w[4].n_gen > 2 ? w[4].gen[2] : 1;
    char stop[3] = {0};
    if (w[0].n_gen > 6) {
        stop[0] = (char)(w[0].gen[5] - 1);
        stop[1] = (char)(w[0].gen[6] - 1);
    }
    char *stops[1] = {stop};
    int ns = stop[0] && stop[1] ? 1 : 0;
    int same = 0, why[5] = {0};
    for (int pass = 0; pass < 2; pass++) {  /* ended by -n and the context; then EOS, stop */
        for (int i = 0; i < NREQ; i++)
            sample_request_free(&w[i]);
        if (run_all(&m, b, p, NP, NPRED, stops, pass ? ns : 0, pass ? eos : -1, 1, w, &sw) ||
            run_all(&m, b, p, NP, NPRED, stops, pass ? ns : 0, pass ? eos : -1, 0, a, &sa))
            goto out;
        for (int i = 0; i < NREQ; i++) {
            same += same_result(&a[i], &w[i]);
            why[w[i].why]++;
            CHECKF(same_result(&a[i], &w[i]), "pass %d, request %d: %d tokens (stop %d) ahead, "
                   "%d (stop %d) waiting", pass, i, a[i].n_gen, a[i].why, w[i].n_gen, w[i].why);
            sample_request_free(&a[i]);
        }
        CHECKF(sa.decode_tokens == sw.decode_tokens && sa.gen_tokens == sw.gen_tokens,
               "statistics: %llu/%llu decode tokens", (unsigned long long)sa.decode_tokens,
               (unsigned long long)sw.decode_tokens);
    }
    for (int i = 0; i < NREQ; i++)
        sample_request_free(&w[i]);
    CHECKF(why[SAMPLE_STOP_LENGTH] && why[SAMPLE_STOP_CTX] && why[SAMPLE_STOP_EOS],
           "the runs do not end by -n, the context and EOS (eos %d, stop \"%s\")", eos, stop);
    printf("# %d of %d requests the same ahead and waiting (ended by eos %d, stop %d, -n %d, "
           "ctx %d)\n", same, 2 * NREQ, why[SAMPLE_STOP_EOS], why[SAMPLE_STOP_STRING],
           why[SAMPLE_STOP_LENGTH], why[SAMPLE_STOP_CTX]);
    /* chat: turns in slot 0 ended by an EOS id: the turn's third token, as a third engine
     * (cut back to the others' length after each turn) makes it without an EOS id */
    infer *f[3];
    dsv3_err e;
    int ok = 1, eos_ends = 0;
    for (int k = 0; k < 3; k++)
        ok = ok && infer_new(&f[k], &m, 64, 1, &e) == 0;
    REQUIRE(ok);
    for (int turn = 0; turn < 3 && ok; turn++) {
        int len[3];
        int32_t ceos = -1;
        sample_request r[3];
        for (int k = 2; k >= 0; k--) {
            r[k] = (sample_request){.ids = p[1] + 3 * turn, .n_ids = 3, .n_predict = 8};
            sampler_params_default(&r[k].sp);
            r[k].sp.temp = 0;
            sample_run_opts o = {.eos = ceos, .keep_slot = 1, .no_ahead = k > 0};
            sample_stats st = {0};
            ok = ok && sample_run(f[k], b, &r[k], 1, &o, &st, &e) == 0;
            len[k] = infer_slot_len(f[k], 0);
            if (k == 2)
                ceos = r[2].n_gen > 2 ? r[2].gen[2] : 1;
        }
        CHECKF(ok, "%s", e.msg);
        CHECKF(!ok || (same_result(&r[0], &r[1]) && len[0] == len[1]),
               "chat turn %d: slot lengths %d ahead, %d waiting", turn, len[0], len[1]);
        ok = ok && infer_slot_truncate(f[2], 0, len[1], &e) == 0;
        eos_ends += r[0].why == SAMPLE_STOP_EOS;
        for (int k = 0; k < 3; k++)
            sample_request_free(&r[k]);
    }
    CHECKF(eos_ends == 3, "%d of 3 chat turns ended by EOS", eos_ends);
    infer_free(f[2]);
    infer_free(f[0]);
    infer_free(f[1]);
out:
    model_free(&m);
    bpe_free(b);
}

/* Sampled requests (llama.cpp's defaults; with a penalty above 1; with one below 1, which
 * needs every logit; top-k off; top-k 5 with top-p 0.5 and min-p 0.3; greedy and sampled
 * requests in one batch) drawn from each row's largest logits only, by steps queued ahead
 * (infer_draw_submit, the default where no request has a penalty) and by waiting steps
 * (infer_forward_top), and from every logit (full_logits): the same tokens and text, on
 * the CPU engine. */
static void test_run_top_same(void)
{
    bpe *b;
    dsv3_model m;
    int32_t p[NREQ][12];
    if (run_fixture(&b, &m, p))
        return;
    enum { NP_ = 6 };
    sampler_params sp[NP_];
    for (int k = 0; k < NP_; k++) {
        sampler_params_default(&sp[k]);
        sp[k].seed = test_rand();
    }
    sp[1].repeat_penalty = 1.3;
    sp[1].temp = 1.2;
    sp[2].repeat_penalty = 0.8;
    sp[3].top_k = 0;
    sp[4].top_k = 5;
    sp[4].top_p = 0.5;
    sp[4].min_p = 0.3;
    sp[5].temp = -1;  /* mixed */
    int same = 0, all = 0;
    for (int k = 0; k < NP_; k++) {
        sample_request a[NREQ], w[NREQ], n[NREQ];
        sample_stats sa, sw, sn;
        if (run_sp(&m, b, p, NP, NPRED, NULL, 0, 0, 0, 1, &sp[k], w, &sw) ||
            run_sp(&m, b, p, NP, NPRED, NULL, 0, 0, 0, 0, &sp[k], a, &sa) ||
            run_sp(&m, b, p, NP, NPRED, NULL, 0, 0, 1, 0, &sp[k], n, &sn))
            break;
        for (int i = 0; i < NREQ; i++) {
            int ok = same_result(&a[i], &w[i]) && same_result(&n[i], &w[i]);
            same += ok;
            all++;
            CHECKF(ok, "params %d, request %d: %d tokens (stop %d) from the largest ahead, %d "
                   "(stop %d) waiting, %d (stop %d) from all", k, i, a[i].n_gen, a[i].why,
                   n[i].n_gen, n[i].why, w[i].n_gen, w[i].why);
            sample_request_free(&a[i]);
            sample_request_free(&w[i]);
            sample_request_free(&n[i]);
        }
    }
    printf("# %d of %d sampled requests the same from the largest logits (ahead and waiting) "
           "and from all\n", same, all);
    model_free(&m);
    bpe_free(b);
}

int main(void)
{
    test_seed();
    RUN(test_utf8_held_back);
    RUN(test_stop_across_tokens);
    RUN(test_run_stops);
    RUN(test_run_ahead_same);
    RUN(test_run_top_same);
    TEST_EXIT();
}
