/* Tests of lib/minhash and lib/fim: MinHash signatures estimate the n-gram Jaccard similarity
 * (brute-force sets as the reference), LSH finds the planted groups and keeps the first of
 * each, the result does not depend on the thread count, parameters are checked; FIM at
 * character boundaries through a freshly trained tokenizer puts the document's text back
 * exactly when the parts are rearranged, and cuts only between characters. */
#include <math.h>
#include <stdlib.h>
#include <unistd.h>
#include <xxhash.h>

#include "../../lib/bpe.h"
#include "../../lib/bpetrain.h"
#include "../../lib/fim.h"
#include "../../lib/minhash.h"
#include "../../lib/pack.h"
#include "../../lib/shard.h"
#include "../test.h"

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* The distinct n-gram hashes of t, sorted (64-bit: a collision is ~1e-15 here). */
static uint64_t gram_set(const uint32_t *t, uint64_t n, uint32_t ng, uint64_t *out)
{
    uint64_t k = 0;
    for (uint64_t s = 0; s + ng <= n; s++)
        out[k++] = XXH3_64bits(t + s, ng * 4);
    qsort(out, k, 8, cmp_u64);
    uint64_t m = 0;
    for (uint64_t i = 0; i < k; i++)
        if (m == 0 || out[m - 1] != out[i])
            out[m++] = out[i];
    return m;
}

static double true_jaccard(const uint32_t *a, uint64_t na, const uint32_t *b, uint64_t nb,
                           uint32_t ng)
{
    uint64_t *ga = malloc(na * 8 + 8), *gb = malloc(nb * 8 + 8);
    uint64_t ma = gram_set(a, na, ng, ga), mb = gram_set(b, nb, ng, gb), i = 0, j = 0, inter = 0;
    while (i < ma && j < mb) {
        if (ga[i] == gb[j])
            inter++, i++, j++;
        else if (ga[i] < gb[j])
            i++;
        else
            j++;
    }
    free(ga);
    free(gb);
    return (double)inter / (double)(ma + mb - inter);
}

/* A copy of t[0..n) with each token replaced with probability rate. */
static uint64_t mutate(const uint32_t *t, uint64_t n, double rate, uint32_t *out)
{
    for (uint64_t i = 0; i < n; i++)
        out[i] = (double)(test_rand() % 1000000) < rate * 1e6 ? (uint32_t)(test_rand() % 100000)
                                                              : t[i];
    return n;
}

static void signature_estimates_jaccard(void)
{
    static minhash_fns f;
    minhash_fns_init(&f, 1024, test_rand());
    static uint32_t a[2000], b[2000], sa[1024], sb[1024];
    double worst = 0;
    for (int it = 0; it < 20; it++) {
        uint64_t n = 500 + test_rand() % 1500;
        for (uint64_t i = 0; i < n; i++)
            a[i] = (uint32_t)(test_rand() % 100000);
        mutate(a, n, 0.01 + 0.1 * (double)(test_rand() % 100) / 100, b);
        double j = true_jaccard(a, n, b, n, 5);
        minhash_signature(&f, 5, a, n, sa);
        minhash_signature(&f, 5, b, n, sb);
        int agree = 0;
        for (int i = 0; i < 1024; i++)
            agree += sa[i] == sb[i];
        double est = agree / 1024.0, d = fabs(est - j);
        worst = d > worst ? d : worst;
        /* std of the estimate is sqrt(J(1-J)/1024) <= 0.016: 0.08 is 5 sigma */
        CHECKF(d < 0.08, "estimate %.3f, true Jaccard %.3f (n %llu)", est, j,
               (unsigned long long)n);
    }
    /* Unrelated documents agree nowhere (a 32-bit value collision per lane is ~n/2^32). */
    for (uint64_t i = 0; i < 1000; i++)
        b[i] = (uint32_t)(test_rand() % 100000) + 200000;
    minhash_signature(&f, 5, a, 1000, sa);
    minhash_signature(&f, 5, b, 1000, sb);
    int agree = 0;
    for (int i = 0; i < 1024; i++)
        agree += sa[i] == sb[i];
    CHECK(agree <= 2);
    /* Shorter than one n-gram: the whole document is the shingle; empty: all ones. */
    minhash_signature(&f, 5, a, 3, sa);
    memcpy(b, a, 12);
    minhash_signature(&f, 5, b, 3, sb);
    CHECK(memcmp(sa, sb, sizeof sa) == 0);
    minhash_signature(&f, 5, a, 0, sa);
    CHECK(sa[0] == UINT32_MAX && sa[1023] == UINT32_MAX);
}

/* groups of near copies (1% of tokens changed) among unrelated documents, in a shuffled
 * order; each document followed by one trailing token (EOS) that minhash_dedup ignores. */
static void dedup_finds_groups_keeps_first(void)
{
    uint64_t n_groups = 30, per = 4, n_free = 300, N = n_groups * per + n_free;
    uint32_t **doc = calloc(N, sizeof *doc);
    uint64_t *len = calloc(N, 8), *group = calloc(N, 8), *order = malloc(N * 8);
    for (uint64_t g = 0, i = 0; g < n_groups; g++)
        for (uint64_t k = 0; k < per; k++, i++) {
            len[i] = k == 0 ? 300 + test_rand() % 300 : len[i - k];
            doc[i] = malloc(len[i] * 4);
            if (k == 0)
                for (uint64_t t = 0; t < len[i]; t++)
                    doc[i][t] = (uint32_t)(test_rand() % 100000);
            else {   /* two tokens changed: Jaccard >= 0.93, missed with p < 1e-9 */
                memcpy(doc[i], doc[i - k], len[i] * 4);
                doc[i][test_rand() % len[i]] = (uint32_t)(test_rand() % 100000);
                doc[i][test_rand() % len[i]] = (uint32_t)(test_rand() % 100000);
            }
            group[i] = g;
        }
    for (uint64_t i = n_groups * per; i < N; i++) {
        len[i] = test_rand() % 400;   /* empty ones too: they are each other's copies */
        doc[i] = malloc(len[i] * 4 + 4);
        for (uint64_t t = 0; t < len[i]; t++)
            doc[i][t] = (uint32_t)(test_rand() % 100000);
        group[i] = len[i] == 0 ? n_groups : UINT64_MAX;
    }
    pack_permutation(order, N, test_rand());
    uint64_t *off = malloc((N + 1) * 8), total = 0;
    for (uint64_t i = 0; i < N; i++)
        total += len[order[i]] + 1;
    uint32_t *tok = malloc(total * 4);
    off[0] = 0;
    for (uint64_t i = 0; i < N; i++) {
        uint64_t d = order[i];
        memcpy(tok + off[i], doc[d], len[d] * 4);
        tok[off[i] + len[d]] = 7;
        off[i + 1] = off[i] + len[d] + 1;
    }
    minhash_params p;
    minhash_params_default(&p);
    uint64_t *keep1 = malloc(N * 8), *keep3 = malloc(N * 8);
    minhash_stats s1, s3;
    dsv3_err e;
    p.threads = 1;
    REQUIRE(minhash_dedup(&p, tok, off, N, 1, keep1, &s1, &e) == 0);
    p.threads = 3;
    REQUIRE(minhash_dedup(&p, tok, off, N, 1, keep3, &s3, &e) == 0);
    CHECK(memcmp(keep1, keep3, N * 8) == 0);
    CHECK(s1.removed == s3.removed && s1.clusters == s3.clusters);
    /* Expected: every group's first document (in the shuffled order) kept, the rest pointing
     * at it; unrelated documents kept. */
    uint64_t first[64], n_empty = 0;
    for (uint64_t g = 0; g <= n_groups; g++)
        first[g] = UINT64_MAX;
    int ok = 1;
    for (uint64_t i = 0; i < N; i++) {
        uint64_t g = group[order[i]];
        n_empty += g == n_groups;
        if (g == UINT64_MAX) {
            ok &= keep1[i] == i;
            continue;
        }
        if (first[g] == UINT64_MAX)
            first[g] = i;
        ok &= keep1[i] == first[g];
    }
    CHECK(ok);
    uint64_t want_removed = n_groups * (per - 1) + (n_empty ? n_empty - 1 : 0);
    CHECKF(s1.removed == want_removed, "%llu removed, %llu expected",
           (unsigned long long)s1.removed, (unsigned long long)want_removed);
    CHECK(s1.clusters == n_groups + (n_empty > 1));
    CHECK(s1.bytes == N * (8 * 14 + 16 + 8));
    for (uint64_t i = 0; i < N; i++)
        free(doc[i]);
    free(doc), free(len), free(group), free(order), free(off), free(tok), free(keep1),
        free(keep3);
}

static void params_are_checked(void)
{
    minhash_params p;
    minhash_params_default(&p);
    CHECK(p.ngram == 5 && p.bands == 14 && p.rows == 8);
    dsv3_err e;
    CHECK(minhash_params_check(&p, &e) == 0);
    p.rows = 100;
    p.bands = 11;
    CHECK(minhash_params_check(&p, &e) == -1 && strstr(e.msg, "hashes"));
    minhash_params_default(&p);
    p.ngram = 0;
    CHECK(minhash_params_check(&p, &e) == -1 && strstr(e.msg, "n-gram"));
}

/* ---- FIM at character boundaries ---- */

static bpe *train_tok(void)
{
    static const char text[] =
        "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # fünf\n"
        "Grüße aus Köln: 東京 と 大阪 は 遠い。 Ça va? ½ ⅓ ¼ — “quotes” 🙂🙃\n"
        "for i in range(10):\n    if i % 2 == 0:\n        print(i, 'even')\n";
    const char *const *pp;
    size_t np = pretok_builtin("deepseek-v3", &pp);
    static const char *const lead[] = {"<s>", "</s>"};
    bpetrain_opts o = {.n_merges = 200, .patterns = pp, .n_patterns = np, .lead = lead,
                       .n_lead = 2, .trail = FIM_TOKEN_NAMES, .n_trail = 3, .bos = 0,
                       .eos = 1, .pad = BPE_NONE, .min_frequency = 1, .threads = 1};
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

/* Random text from pieces of 1-4 byte UTF-8 characters, and now and then a stray
 * continuation byte (invalid UTF-8 must survive too). */
static size_t random_text(uint8_t *s, size_t max)
{
    static const char *const pieces[] = {"a", "b", " ", "\n", "    ", "def", "ü", "ß", "東",
                                         "京", "🙂", "—", "½", "(", ")", "print", "0", "é"};
    size_t n = 0, want = test_rand() % max;
    while (n + 8 < want) {
        if (test_rand() % 50 == 0) {
            s[n++] = (uint8_t)(0x80 + test_rand() % 64);
            continue;
        }
        const char *p = pieces[test_rand() % (sizeof pieces / sizeof *pieces)];
        memcpy(s + n, p, strlen(p));
        n += strlen(p);
    }
    return n;
}

static void fim_text_puts_the_text_back(void)
{
    bpe *b = train_tok();
    REQUIRE(b);
    uint32_t ids[3];
    fim_token_ids(b, ids);
    REQUIRE(ids[0] != BPE_NONE && ids[1] != BPE_NONE && ids[2] != BPE_NONE);
    bpe_encoder *enc;
    dsv3_err e;
    REQUIRE(bpe_encoder_new(&enc, b, &e) == 0);
    fim_text f;
    REQUIRE(fim_text_new(&f, b, &e) == 0);
    uint64_t rng = test_rand();
    static uint8_t text[4096];
    bpe_ids doc = {0};
    bpe_bytes parts[3] = {{0}}, whole = {0};
    int ok = 1, cut_inside = 0;
    for (int it = 0; it < 500; it++) {
        size_t n = random_text(text, sizeof text);
        doc.n = 0;
        bpe_encode_opts eo = {0, 0, 0};
        REQUIRE(bpe_encode(enc, text, n, &eo, &doc, &e) == 0);
        int spm = it & 1;
        REQUIRE(fim_text_apply(&f, doc.v, doc.n, spm, ids, &rng, &e) == 1);
        /* Split the output at its three FIM tokens. */
        const uint32_t *o = f.out.v;
        size_t m = f.out.n, h = 0, en = 0, k;
        for (k = 0; k < m; k++) {
            h = o[k] == ids[1] ? k : h;
            en = o[k] == ids[2] ? k : en;
        }
        ok &= o[0] == ids[0] && h >= 1 && en > h;
        if (!ok)
            break;
        /* PSM: prefix o[1..h), suffix o[h+1..en), middle o[en+1..m);
         * SPM: suffix o[2..en), then prefix and middle together after END. */
        for (int i = 0; i < 3; i++)
            parts[i].n = 0;
        if (!spm) {
            bpe_decode(b, o + 1, h - 1, 0, &parts[0], &e);
            bpe_decode(b, o + en + 1, m - en - 1, 0, &parts[1], &e);
            bpe_decode(b, o + h + 1, en - h - 1, 0, &parts[2], &e);
        } else {
            ok &= h == 1;
            bpe_decode(b, o + en + 1, m - en - 1, 0, &parts[0], &e);   /* prefix+middle */
            bpe_decode(b, o + 2, en - 2, 0, &parts[2], &e);
        }
        whole.n = 0;
        for (int i = 0; i < 3; i++)
            bpe_bytes_append(&whole, parts[i].v, parts[i].n);
        ok &= whole.n == n && memcmp(whole.v, text, n) == 0;
        /* The cuts fall between characters: after the prefix (PSM) and before the suffix,
         * the next byte is not a UTF-8 continuation byte. */
        size_t cuts[2] = {spm ? 0 : parts[0].n, n - parts[2].n};
        for (int c = 0; c < 2; c++)
            ok &= cuts[c] == 0 || cuts[c] == n || (text[cuts[c]] & 0xc0) != 0x80;
        cut_inside += !spm && parts[0].n > 0 && parts[0].n < n;
        if (!ok) {
            fprintf(stderr, "    iteration %d (spm %d, %zu bytes) failed: h %zu en %zu m %zu, "
                    "parts %zu %zu %zu; same %d; cut bytes %02x %02x\n", it, spm, n, h, en, m,
                    parts[0].n, parts[1].n, parts[2].n,
                    whole.n == n && memcmp(whole.v, text, n) == 0, text[cuts[0]], text[cuts[1]]);
            break;
        }
    }
    CHECK(ok);
    CHECK(cut_inside > 100);
    /* A document with a special token is left to the caller (token boundaries). */
    uint32_t with_special[3] = {doc.v[0], ids[1], doc.v[0]};
    CHECK(fim_text_apply(&f, with_special, 3, 0, ids, &rng, &e) == 0);
    /* An id outside the vocabulary is an error. */
    uint32_t bad[2] = {doc.v[0], bpe_vocab_size(b) + 5};
    CHECK(fim_text_apply(&f, bad, 2, 0, ids, &rng, &e) == -1);
    for (int i = 0; i < 3; i++)
        bpe_bytes_free(&parts[i]);
    bpe_bytes_free(&whole);
    bpe_ids_free(&doc);
    fim_text_free(&f);
    bpe_encoder_free(enc);
    bpe_free(b);
}

/* Through dsv3-pack's library with a tokenizer: every document FIM-rearranged (PSM or SPM),
 * best-fit packed whole; each packed segment, rearranged back and decoded, is one of the
 * original texts, and together they are all of them. */
static void pack_fim_with_tokenizer_decodes_back(void)
{
    bpe *b = train_tok();
    REQUIRE(b);
    char dir[] = "/tmp/dsv3-fim-test-XXXXXX";
    REQUIRE(mkdtemp(dir));
    char in[128], out[128], shard[160], bounds[160];
    snprintf(in, sizeof in, "%s/in.shard", dir);
    snprintf(out, sizeof out, "%s/out", dir);
    snprintf(shard, sizeof shard, "%s/train-00000.shard", out);
    snprintf(bounds, sizeof bounds, "%s/train-00000.bounds.shard", out);
    bpe_encoder *enc;
    dsv3_err e;
    REQUIRE(bpe_encoder_new(&enc, b, &e) == 0);
    shard_params sp;
    shard_params_default(&sp, SHARD_DOCS);
    sp.vocab_size = bpe_vocab_size(b);
    sp.tokenizer_id = bpe_id(b);
    shard_writer *w;
    REQUIRE(shard_writer_open(&w, in, &sp, &e) == 0);
    static uint8_t text[2048];
    uint64_t n_docs = 60, want_sum = 0;
    bpe_ids ids = {0};
    for (uint64_t d = 0; d < n_docs; d++) {
        size_t n = random_text(text, sizeof text);
        ids.n = 0;
        bpe_encode_opts eo = {0, 0, 0};
        REQUIRE(bpe_encode(enc, text, n, &eo, &ids, &e) == 0);
        REQUIRE(shard_write_record(w, ids.v, ids.n, 0, &e) == 0);
        want_sum += XXH3_64bits(text, n);
    }
    REQUIRE(shard_writer_close(w, &e) == 0);
    pack_options o;
    pack_options_default(&o);
    o.seq_len = 4096;
    o.best_fit = 1;
    o.eos_id = o.pad_id = bpe_eos(b);
    o.fim_rate = o.fim_spm_rate = 0.5;
    fim_token_ids(b, o.fim_ids);
    o.tok = b;
    o.tok_name = "test";
    pack *p;
    REQUIRE(pack_new(&p, &o, &e) == 0);
    int rc = pack_add_input(p, in, &e);
    if (rc == 0)
        rc = pack_write(p, out, NULL, &e);
    CHECKF(rc == 0, "%s", e.msg);
    CHECK(pack_get_counts(p)->fim_psm + pack_get_counts(p)->fim_spm == n_docs);
    pack_free(p);
    shard_reader *r, *br;
    REQUIRE(shard_open(&r, shard, &e) == 0 && shard_open(&br, bounds, &e) == 0);
    shard_record rec, bn;
    uint64_t got = 0, got_sum = 0;
    bpe_bytes dec = {0};
    uint32_t *back = malloc(8192 * 4);
    int ok = 1;
    while (shard_next(r, &rec, &e) == 1 && shard_next(br, &bn, &e) == 1) {
        for (uint64_t j = 1; j < bn.n_tokens; j++) {
            uint32_t a = bn.tokens[j], z = j + 1 < bn.n_tokens ? bn.tokens[j + 1] : bn.tokens[0];
            const uint32_t *t = rec.tokens + a;
            uint64_t n = z - a - 1, h = 0, en = 0, k = 0;   /* without EOS */
            ok &= t[n] == o.eos_id && t[0] == o.fim_ids[0];
            for (uint64_t i = 0; i < n; i++) {
                h = t[i] == o.fim_ids[1] && !h ? i : h;
                en = t[i] == o.fim_ids[2] && !en ? i : en;
            }
            if (h == 1) {   /* SPM: BEGIN HOLE suffix END prefix middle */
                memcpy(back, t + en + 1, (n - en - 1) * 4), k = n - en - 1;
                memcpy(back + k, t + 2, (en - 2) * 4), k += en - 2;
            } else {        /* PSM: BEGIN prefix HOLE suffix END middle */
                memcpy(back, t + 1, (h - 1) * 4), k = h - 1;
                memcpy(back + k, t + en + 1, (n - en - 1) * 4), k += n - en - 1;
                memcpy(back + k, t + h + 1, (en - h - 1) * 4), k += en - h - 1;
            }
            dec.n = 0;
            ok &= bpe_decode(b, back, k, 0, &dec, &e) == 0;
            got_sum += XXH3_64bits(dec.v, dec.n);
            got++;
        }
    }
    CHECK(ok);
    CHECKF(got == n_docs, "%llu segments", (unsigned long long)got);
    CHECK(got_sum == want_sum);
    shard_close(r);
    shard_close(br);
    free(back);
    bpe_bytes_free(&dec);
    bpe_ids_free(&ids);
    bpe_encoder_free(enc);
    bpe_free(b);
    unlink(in);
    unlink(shard);
    unlink(bounds);
    char m[160];
    snprintf(m, sizeof m, "%s/manifest.json", out);
    unlink(m);
    rmdir(out);
    rmdir(dir);
}

int main(void)
{
    test_seed();
    RUN(signature_estimates_jaccard);
    RUN(dedup_finds_groups_keeps_first);
    RUN(params_are_checked);
    RUN(fim_text_puts_the_text_back);
    RUN(pack_fim_with_tokenizer_decodes_back);
    TEST_EXIT();
}
