/* Parity with the reference tokenizers: fixtures made by scripts/ref-tokenizers.py with HF
 * tokenizers and tiktoken (committed, so no Python is needed here). A vocabulary trained by
 * HF with DeepSeek-V3's pre-tokenizer, one with HF's ByteLevel regex, and a tiktoken rank
 * file under the cl100k, o200k and GPT-2 patterns must give the recorded ids for every
 * case: prose, code, CJK, emoji, combining marks, odd whitespace, random code points. */
#include <jansson.h>

#include "../../lib/bpe.h"
#include "../../lib/bpeio.h"
#include "../test.h"

#define FIX "tests/fixtures/tok/"

static json_t *cases;

static void load_cases(void)
{
    FILE *f = fopen(FIX "cases.jsonl", "r");
    cases = json_array();
    if (!f)
        return;
    char *line = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, f) > 0) {
        json_t *r = json_loads(line, JSON_ALLOW_NUL, NULL);
        if (r)
            json_array_append_new(cases, r);
    }
    free(line);
    fclose(f);
}

static void compare(bpe *b, const char *key)
{
    bpe_encoder *enc;
    dsv3_err e;
    REQUIRE(bpe_encoder_new(&enc, b, &e) == 0);
    size_t i, bad = 0;
    json_t *c;
    bpe_ids ids = {0};
    json_array_foreach(cases, i, c) {
        json_t *t = json_object_get(c, "text"), *want = json_object_get(c, key);
        ids.n = 0;
        CHECK(bpe_encode(enc, (const uint8_t *)json_string_value(t), json_string_length(t),
                         NULL, &ids, &e) == 0);
        int same = ids.n == json_array_size(want);
        for (size_t k = 0; same && k < ids.n; k++)
            same = ids.v[k] == (uint32_t)json_integer_value(json_array_get(want, k));
        if (!same && bad++ < 3) {
            fprintf(stderr, "    %s case %zu: %zu ids, want %zu; text: %.80s\n", key, i, ids.n,
                    json_array_size(want), json_string_value(t));
            for (size_t k = 0; k < ids.n && k < json_array_size(want); k++)
                if (ids.v[k] != (uint32_t)json_integer_value(json_array_get(want, k))) {
                    fprintf(stderr, "    first difference at %zu: %u, want %lld\n", k,
                            ids.v[k], json_integer_value(json_array_get(want, k)));
                    break;
                }
        }
        /* and back: every case decodes to its text */
        bpe_bytes back = {0};
        CHECK(bpe_decode(b, ids.v, ids.n, 0, &back, &e) == 0);
        /* an empty case decodes to nothing: no buffer to compare (memcmp with NULL is UB) */
        CHECK(back.n == json_string_length(t) &&
              (back.n == 0 || memcmp(back.v, json_string_value(t), back.n) == 0));
        bpe_bytes_free(&back);
    }
    CHECKF(bad == 0, "%zu of %zu cases differ from %s", bad, json_array_size(cases), key);
    bpe_ids_free(&ids);
    bpe_encoder_free(enc);
}

static void test_hf_deepseek(void)
{
    bpe *b;
    dsv3_err e;
    if (json_array_size(cases) == 0)
        SKIP("no fixtures (run from the source tree)");
    REQUIRE(bpeio_import_hf(&b, FIX "hf-deepseek.json", NULL, NULL, NULL, &e) == 0);
    CHECK(bpe_bos(b) == 0 && bpe_eos(b) == 1 && bpe_pad(b) == 2);
    compare(b, "hf-deepseek");
    bpe_free(b);
}

static void test_hf_gpt2_string_merges(void)
{
    bpe *b;
    dsv3_err e;
    if (json_array_size(cases) == 0)
        SKIP("no fixtures");
    REQUIRE(bpeio_import_hf(&b, FIX "hf-gpt2.json", NULL, NULL, NULL, &e) == 0);
    compare(b, "hf-gpt2");
    bpe_free(b);
}

static void tiktoken_case(const char *pattern, const char *key)
{
    bpe *b;
    dsv3_err e;
    const char *const *pats;
    size_t np = pretok_builtin(pattern, &pats);
    REQUIRE(np > 0);
    if (json_array_size(cases) == 0)
        SKIP("no fixtures");
    int rc = bpeio_import_tiktoken(&b, FIX "tt.tiktoken", pats, np, NULL, 0, NULL, NULL, NULL,
                                   &e);
    CHECKF(rc == 0, "%s", e.msg);
    if (rc)
        return;
    compare(b, key);
    bpe_free(b);
}

static void test_tiktoken_cl100k(void) { tiktoken_case("cl100k", "tt-cl100k"); }
static void test_tiktoken_o200k(void) { tiktoken_case("o200k", "tt-o200k"); }
static void test_tiktoken_gpt2(void) { tiktoken_case("gpt2", "tt-gpt2"); }

int main(void)
{
    test_seed();   /* unused here; keeps the harness quiet */
    (void)test_rand;
    load_cases();
    RUN(test_hf_deepseek);
    RUN(test_hf_gpt2_string_merges);
    RUN(test_tiktoken_cl100k);
    RUN(test_tiktoken_o200k);
    RUN(test_tiktoken_gpt2);
    json_decref(cases);
    TEST_EXIT();
}
