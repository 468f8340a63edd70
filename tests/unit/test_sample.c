/* Tests of lib/sample's text stream: UTF-8 characters held back until complete, text that
 * could begin a stop string held back until it cannot, a stop string across tokens cutting
 * the text before it. Tokens here are single bytes (a tokenizer of the 256 byte tokens). */
#include "../../lib/sample.h"
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

int main(void)
{
    test_seed();
    (void)test_rand;
    RUN(test_utf8_held_back);
    RUN(test_stop_across_tokens);
    TEST_EXIT();
}
