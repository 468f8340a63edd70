/* Tests of lib/sample's text stream: UTF-8 characters held back until complete, text that
 * could begin a stop string held back until it cannot, a stop string across tokens cutting
 * the text before it. Tokens here are single bytes (a tokenizer of the 256 byte tokens). */
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

/* A one-layer model whose head is zero: every logit 0, so greedy takes the lowest id (the
 * end-of-sequence token); the run stops there at once, or goes to -n without an EOS id,
 * or to the full context. */
static void test_run_stops(void)
{
    bpe *b = eos_tokenizer();
    REQUIRE(b);
    dsv3_config c = {.vocab_size = 257, .hidden_size = 8, .intermediate_size = 8,
                     .moe_intermediate_size = 4, .num_hidden_layers = 1,
                     .num_attention_heads = 2, .kv_lora_rank = 4, .qk_nope_head_dim = 4,
                     .qk_rope_head_dim = 4, .v_head_dim = 4, .n_routed_experts = 2,
                     .num_experts_per_tok = 1, .n_group = 1, .topk_group = 1,
                     .routed_scaling_factor = 1, .first_k_dense_replace = 1,
                     .rms_norm_eps = 1e-6, .max_position_embeddings = 16,
                     .initializer_range = 0.02, .rope_theta = 10000, .rope_interleave = 1,
                     .bos_token_id = -1, .eos_token_id = -1};
    dsv3_model m;
    dsv3_err e;
    REQUIRE(model_init(&m, &c, &e) == 0);
    model_init_random(&m, test_rand(), 0.1);
    memset(m.w.lm_head, 0, sizeof(float) * 257 * 8);
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

int main(void)
{
    test_seed();
    RUN(test_utf8_held_back);
    RUN(test_stop_across_tokens);
    RUN(test_run_stops);
    TEST_EXIT();
}
