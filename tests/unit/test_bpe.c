/* Tests of lib/bpe, lib/bpetrain and lib/pretok: merges on tiny corpora worked by hand, the
 * encoder against a naive reference BPE on random words (short ones take the linear scan,
 * long ones the heap), round trips of random bytes (invalid UTF-8 included), special tokens,
 * empty input, the file format's checks against damage, and the pre-tokenizer's rules. */
#include <unistd.h>

#include "../../lib/bpe.h"
#include "../../lib/bpeio.h"
#include "../../lib/bpetrain.h"
#include "../test.h"

static bpe *train_text(const char *text, uint32_t merges, const char *pattern, int threads)
{
    const char *pats[1] = {pattern};
    const char *const *pp = pats;
    size_t np = 1;
    if (!pattern)
        np = pretok_builtin("deepseek-v3", &pp);
    static const char *const lead[] = {"<s>", "</s>"};
    static const char *const trail[] = {"<fim>"};
    bpetrain_opts o = {.n_merges = merges, .patterns = pp, .n_patterns = np, .lead = lead,
                       .n_lead = 2, .trail = trail, .n_trail = 1, .bos = 0, .eos = 1,
                       .pad = BPE_NONE, .min_frequency = 1, .threads = threads};
    bpetrain *t;
    bpe *b = NULL;
    dsv3_err e;
    if (bpetrain_new(&t, &o, &e))
        return NULL;
    const uint8_t *docs[1] = {(const uint8_t *)text};
    size_t lens[1] = {strlen(text)};
    if (bpetrain_count(t, docs, lens, 1, &e) || bpetrain_finish(t, &b, &e))
        fprintf(stderr, "    train: %s\n", e.msg);
    bpetrain_free(t);
    return b;
}

static int token_is(const bpe *b, uint32_t id, const char *s)
{
    size_t len;
    const uint8_t *t = bpe_token(b, id, &len);
    return t && len == strlen(s) && memcmp(t, s, len) == 0;
}

static void encode_str(bpe *b, const char *s, bpe_ids *ids, int allow)
{
    bpe_encoder *enc;
    dsv3_err e;
    bpe_encode_opts o = {.allow_special = allow};
    ids->n = 0;
    if (bpe_encoder_new(&enc, b, &e) == 0) {
        CHECK(bpe_encode(enc, (const uint8_t *)s, strlen(s), &o, ids, &e) == 0);
        bpe_encoder_free(enc);
    }
}

/* ab x3, abc x2, bcd x1: (a,b) 5 merges first; then (ab,c) 2; then (b,c) and (c,d) tie at 1
 * and the lower ids win: (b,c); then (bc,d). */
static void test_train_by_hand(void)
{
    bpe *b = train_text("ab ab ab abc abc bcd", 10, "[a-z]+", 1);
    REQUIRE(b != NULL);
    const bpe_merge *m = bpe_merges(b);
    REQUIRE(bpe_n_merges(b) >= 4);
    CHECK(token_is(b, m[0].result, "ab"));
    CHECK(token_is(b, m[1].result, "abc"));
    CHECK(token_is(b, m[2].result, "bc"));
    CHECK(token_is(b, m[3].result, "bcd"));
    CHECK(m[0].result == 2 + 256);   /* after the 2 lead specials and the bytes */
    CHECK(bpe_bos(b) == 0 && token_is(b, 0, "<s>") && token_is(b, 1, "</s>"));
    CHECK(token_is(b, bpe_vocab_size(b) - 1, "<fim>"));
    bpe_ids ids = {0};
    encode_str(b, "abcd", &ids, 0);   /* ab, abc; then abc+d has no merge */
    REQUIRE(ids.n == 2);
    CHECK(token_is(b, ids.v[0], "abc") && token_is(b, ids.v[1], "d"));
    bpe_ids_free(&ids);
    bpe_free(b);
}

/* "aaaa": (a,a) merges twice left to right, then (aa,aa). Overlapping pairs are where naive
 * incremental counting goes wrong. */
static void test_train_overlap(void)
{
    bpe *b = train_text("aaaa aaaa aaa", 5, "[a-z]+", 1);
    REQUIRE(b != NULL);
    const bpe_merge *m = bpe_merges(b);
    REQUIRE(bpe_n_merges(b) >= 2);
    CHECK(token_is(b, m[0].result, "aa"));
    /* after aa: words [aa,aa] x2 and [aa,a] x1: (aa,aa) has 2, (aa,a) 1 */
    CHECK(token_is(b, m[1].result, "aaaa"));
    bpe_free(b);
}

/* Naive reference: repeatedly merge the leftmost lowest-rank pair, searching all merges. */
static size_t ref_bpe(const bpe *b, const uint8_t *s, size_t n, uint32_t *out)
{
    for (size_t i = 0; i < n; i++)
        out[i] = bpe_byte_token(b, s[i]);
    const bpe_merge *m = bpe_merges(b);
    for (;;) {
        uint32_t best = UINT32_MAX, res = 0;
        size_t at = 0;
        for (size_t i = 0; i + 1 < n; i++)
            for (uint32_t k = 0; k < bpe_n_merges(b); k++)
                if (m[k].left == out[i] && m[k].right == out[i + 1] && m[k].rank < best) {
                    best = m[k].rank;
                    res = m[k].result;
                    at = i;
                }
        if (best == UINT32_MAX)
            return n;
        out[at] = res;
        memmove(out + at + 1, out + at + 2, (n - at - 2) * sizeof *out);
        n--;
    }
}

static void test_encode_vs_reference(void)
{
    /* a vocabulary over a small alphabet, so random words hit many merges */
    char corpus[20000];
    for (size_t i = 0; i < sizeof corpus - 1; i++)
        corpus[i] = "aabbbc d"[test_rand() % 8];
    corpus[sizeof corpus - 1] = '\0';
    bpe *b = train_text(corpus, 60, "[a-d]+", 2);
    REQUIRE(b != NULL);
    bpe_encoder *enc;
    dsv3_err e;
    REQUIRE(bpe_encoder_new(&enc, b, &e) == 0);
    uint8_t w[700];
    uint32_t want[700];
    bpe_ids ids = {0};
    int bad = 0;
    for (int t = 0; t < 300 && !bad; t++) {
        size_t n = t < 250 ? 1 + test_rand() % 40 : 100 + test_rand() % 600;
        for (size_t i = 0; i < n; i++)
            w[i] = (uint8_t)"abcdab"[test_rand() % 6];
        ids.n = 0;
        /* twice: the second is answered from the cache */
        for (int rep = 0; rep < 2; rep++) {
            ids.n = 0;
            CHECK(bpe_encode_piece(enc, w, n, &ids, &e) == 0);
            size_t k = ref_bpe(b, w, n, want);
            if (k != ids.n || memcmp(want, ids.v, k * sizeof *want) != 0) {
                bad = 1;
                fprintf(stderr, "    word of %zu bytes: %zu ids, reference %zu\n", n, ids.n, k);
            }
        }
    }
    CHECK(!bad);
    bpe_ids_free(&ids);
    bpe_encoder_free(enc);
    bpe_free(b);
}

static void test_roundtrip_random_bytes(void)
{
    bpe *b;
    dsv3_err e;
    if (bpeio_import_hf(&b, "tests/fixtures/tok/hf-deepseek.json", NULL, NULL, NULL, &e))
        SKIP("no fixtures (run from the source tree)");
    bpe_encoder *enc;
    REQUIRE(bpe_encoder_new(&enc, b, &e) == 0);
    static const char *const bits[] = {"é", "中文", "😀", "\xff", "\xc3", "\xe4\xb8", " ",
                                       "\n", "\r\n", "123", "ab", "!!", "\xed\xa0\x80",
                                       "\xf4\x90\x80\x80", "\xc0\xaf", "\0"};
    uint8_t buf[4096];
    bpe_ids ids = {0};
    bpe_bytes back = {0};
    for (int t = 0; t < 400; t++) {
        size_t n = 0, want = test_rand() % 3000;
        while (n < want) {
            if (test_rand() % 3 == 0) {
                buf[n++] = (uint8_t)test_rand();
            } else {
                const char *s = bits[test_rand() % (sizeof bits / sizeof bits[0])];
                size_t l = s[0] ? strlen(s) : 1;
                if (n + l > sizeof buf)
                    break;
                memcpy(buf + n, s, l);
                n += l;
            }
        }
        ids.n = back.n = 0;
        bpe_encode_opts o = {.split_combined = 0.5, .seed = test_rand()};
        REQUIRE(bpe_encode(enc, buf, n, t % 2 ? &o : NULL, &ids, &e) == 0);
        for (size_t i = 0; i < ids.n; i++)
            CHECK(bpe_token_kind(b, ids.v[i]) != BPE_SPECIAL);
        REQUIRE(bpe_decode(b, ids.v, ids.n, 0, &back, &e) == 0);
        CHECKF(back.n == n && memcmp(back.v, buf, n) == 0, "round trip of %zu bytes", n);
    }
    bpe_ids_free(&ids);
    bpe_bytes_free(&back);
    bpe_encoder_free(enc);
    bpe_free(b);
}

static void test_special_tokens(void)
{
    bpe *b = train_text("hello world </s> hello", 20, NULL, 1);
    REQUIRE(b != NULL);
    bpe_ids ids = {0};
    encode_str(b, "hi</s>there<s>", &ids, 0);
    for (size_t i = 0; i < ids.n; i++)
        CHECK(bpe_token_kind(b, ids.v[i]) != BPE_SPECIAL);   /* never injected */
    encode_str(b, "hi</s>there<s>", &ids, 1);
    int n_eos = 0, n_bos = 0;
    for (size_t i = 0; i < ids.n; i++)
        n_eos += ids.v[i] == 1, n_bos += ids.v[i] == 0;
    CHECK(n_eos == 1 && n_bos == 1 && ids.v[ids.n - 1] == 0);
    encode_str(b, "", &ids, 1);
    CHECK(ids.n == 0);
    bpe_bytes out = {0};
    uint32_t bad_id = bpe_vocab_size(b);
    dsv3_err e;
    CHECK(bpe_decode(b, &bad_id, 1, 0, &out, &e) == -1 && strstr(e.msg, "not in the vocabulary"));
    uint32_t sp[2] = {0, 1};
    out.n = 0;
    CHECK(bpe_decode(b, sp, 2, 1, &out, &e) == 0 && out.n == 0);   /* skip_special */
    bpe_bytes_free(&out);
    bpe_ids_free(&ids);
    bpe_free(b);
}

/* The tokenizer file: a saved file loads back identical; any truncation, any flipped byte
 * and a bad magic are refused with a message, never a crash. */
static void test_file_damage(void)
{
    bpe *b = train_text("the cat sat on the mat, the end. 12345 数字", 30, NULL, 1), *c;
    REQUIRE(b != NULL);
    char path[] = "/tmp/dsv3-test-bpe-XXXXXX";
    int fd = mkstemp(path);
    REQUIRE(fd >= 0);
    close(fd);
    dsv3_err e;
    REQUIRE(bpe_save(b, path, &e) == 0);
    REQUIRE(bpe_load(&c, path, &e) == 0);
    CHECK(bpe_id(c) == bpe_id(b) && bpe_vocab_size(c) == bpe_vocab_size(b));
    bpe_free(c);
    FILE *f = fopen(path, "rb");
    uint8_t img[1 << 16];
    size_t n = fread(img, 1, sizeof img, f);
    fclose(f);
    REQUIRE(n > 64 && n < sizeof img);
    /* every byte flipped (by a random nonzero mask), and random truncations */
    static uint8_t copy[1 << 16];
    size_t bad = 0;
    for (size_t t = 0; t < n + 100; t++) {
        memcpy(copy, img, n);
        size_t len = n;
        if (t >= n)
            len = test_rand() % n;
        else
            copy[t] ^= (uint8_t)(1 + test_rand() % 255);
        e.msg[0] = 0;
        if (bpe_load_mem(&c, copy, len, "x.tok", &e) == 0) {
            bpe_free(c);
            if (bad++ < 3)
                fprintf(stderr, "    damage at %zu (length %zu) not detected\n", t, len);
        } else if (strncmp(e.msg, "x.tok: ", 7) != 0 && bad++ < 3) {
            fprintf(stderr, "    message without the file name: %s\n", e.msg);
        }
    }
    CHECK(bad == 0);
    img[0] = 'X';
    CHECK(bpe_load_mem(&c, img, n, "x.tok", &e) == -1 && strstr(e.msg, "bad magic"));
    CHECK(bpe_load(&c, "/nonexistent/x.tok", &e) == -1);
    unlink(path);
    bpe_free(b);
}

/* Malformed tokenizer.json files give messages, not crashes. */
static void test_hf_loader_bad_input(void)
{
    static const char *const docs[] = {
        "", "{", "[]", "{\"model\":{}}", "{\"model\":{\"type\":\"WordPiece\",\"vocab\":{}}}",
        "{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]}}",
        "{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":-1},\"merges\":[]},\"pre_tokenizer\":"
        "{\"type\":\"ByteLevel\"}}",
        "{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[\"a\"]},\"pre_tokenizer\":"
        "{\"type\":\"ByteLevel\"}}",
        "{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[[1,2]]},\"pre_tokenizer\":"
        "{\"type\":\"ByteLevel\"}}",
        "{\"model\":{\"type\":\"BPE\",\"vocab\":{},\"merges\":[]},\"pre_tokenizer\":{\"type\":"
        "\"Split\",\"pattern\":{\"Regex\":\"(\"},\"behavior\":\"Isolated\"}}",
        "{\"model\":{\"type\":\"BPE\",\"vocab\":{},\"merges\":[]},\"normalizer\":{\"type\":\"NFC\"}}",
    };
    char path[] = "/tmp/dsv3-test-json-XXXXXX";
    int fd = mkstemp(path);
    REQUIRE(fd >= 0);
    close(fd);
    for (size_t i = 0; i < sizeof docs / sizeof docs[0]; i++) {
        FILE *f = fopen(path, "w");
        fputs(docs[i], f);
        fclose(f);
        bpe *b;
        dsv3_err e = {{0}};
        CHECKF(bpeio_import_hf(&b, path, NULL, NULL, NULL, &e) == -1 && e.msg[0], "doc %zu", i);
    }
    unlink(path);
}

static size_t split_str(const char *set, const char *text, char out[][64], size_t max)
{
    const char *const *pats;
    size_t np = pretok_builtin(set, &pats);
    pretok *p;
    pretok_state *s;
    dsv3_err e;
    if (pretok_create(&p, pats, np, &e) || pretok_state_new(&s, p, &e))
        return 0;
    const size_t *ends;
    long n = pretok_split(s, (const uint8_t *)text, strlen(text), &ends, &e);
    size_t start = 0;
    for (long i = 0; i < n && (size_t)i < max; i++) {
        snprintf(out[i], 64, "%.*s", (int)(ends[i] - start), text + start);
        start = ends[i];
    }
    pretok_state_free(s);
    pretok_free(p);
    return n < 0 ? 0 : (size_t)n;
}

static void expect_split(const char *set, const char *text, const char *const *want, size_t n)
{
    char got[32][64];
    size_t k = split_str(set, text, got, 32);
    int same = k == n;
    for (size_t i = 0; same && i < n; i++)
        same = strcmp(got[i], want[i]) == 0;
    if (!same) {
        fprintf(stderr, "    %s '%s':", set, text);
        for (size_t i = 0; i < k && i < 32; i++)
            fprintf(stderr, " [%s]", got[i]);
        fputc('\n', stderr);
    }
    CHECK(same);
}

#define SPLIT(set, text, ...)                                                              \
    do {                                                                                   \
        static const char *const w_[] = {__VA_ARGS__};                                     \
        expect_split(set, text, w_, sizeof w_ / sizeof w_[0]);                             \
    } while (0)

static void test_pretok_rules(void)
{
    SPLIT("deepseek-v3", "1234567", "123", "456", "7");
    SPLIT("deepseek-v3", "abc中文def", "abc", "中文", "def");
    SPLIT("deepseek-v3", "x = y;\n\nz", "x", " =", " y", ";\n\n", "z");
    SPLIT("deepseek-v3", ".Hello world", ".Hello", " world");
    SPLIT("deepseek-v3", "a  b\n", "a", " ", " b", "\n");
    SPLIT("deepseek-v3", "a\xc2\x85" "b", "a", "\xc2\x85" "b");   /* NEL is White_Space */
    SPLIT("deepseek-v3", "a\xff\xfe" "b", "a", "\xff\xfe", "b");  /* invalid bytes: a gap */
    SPLIT("cl100k", "I'm 12345 ok!!\n", "I", "'m", " ", "123", "45", " ok", "!!\n");
    SPLIT("gpt2", "Hello  world", "Hello", " ", " world");
    SPLIT("o200k", "HelloWorld's", "Hello", "World's");
}

int main(void)
{
    test_seed();
    RUN(test_train_by_hand);
    RUN(test_train_overlap);
    RUN(test_encode_vs_reference);
    RUN(test_roundtrip_random_bytes);
    RUN(test_special_tokens);
    RUN(test_file_damage);
    RUN(test_hf_loader_bad_input);
    RUN(test_pretok_rules);
    TEST_EXIT();
}
