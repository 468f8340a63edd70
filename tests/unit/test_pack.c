/* Tests of lib/pack and lib/loader on fresh random corpora: every document lands in exactly
 * one place or is counted as removed, tokens are preserved, the shuffle is a reproducible
 * permutation, the same seed gives the same bytes, bad input leaves no folder, and the
 * loader resumes exactly and gives ranks disjoint records. */
#include <dirent.h>
#include <inttypes.h>
#include <math.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "../../lib/loader.h"
#include "../../lib/pack.h"
#include "../../lib/shard.h"
#include "../test.h"

enum { VOCAB = 5000, EOS = 4999, PAD = 4998 };

static char tmpdir[256];

static void path(char *buf, size_t n, const char *name)
{
    snprintf(buf, n, "%s/%s", tmpdir, name);
}

/* A corpus: n documents of random lengths (empty, short, longer than a record), with
 * `dups` of them exact copies of earlier ones. Tokens below PAD so EOS/PAD stand out. */
typedef struct corpus {
    uint32_t **doc;
    uint64_t *len;
    uint64_t n, n_dups;
} corpus;

static void corpus_make(corpus *c, uint64_t n, uint64_t max_len, double dup_rate)
{
    c->doc = calloc(n, sizeof *c->doc);
    c->len = calloc(n, sizeof *c->len);
    c->n = n;
    c->n_dups = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (i > 0 && (double)(test_rand() % 1000) < dup_rate * 1000) {
            uint64_t j = test_rand() % i;
            c->len[i] = c->len[j];
            c->doc[i] = malloc((c->len[i] + 1) * sizeof(uint32_t));
            memcpy(c->doc[i], c->doc[j], c->len[i] * sizeof(uint32_t));
            continue;
        }
        uint64_t r = test_rand() % 10;
        c->len[i] = r == 0 ? 0 : r < 8 ? 1 + test_rand() % 40 : test_rand() % max_len;
        c->doc[i] = malloc((c->len[i] + 1) * sizeof(uint32_t));
        for (uint64_t k = 0; k < c->len[i]; k++)
            c->doc[i][k] = (uint32_t)(test_rand() % PAD);
    }
    /* Count true duplicates (a fresh random doc can equal an earlier one, e.g. two empties). */
    for (uint64_t i = 0; i < n; i++)
        for (uint64_t j = 0; j < i; j++)
            if (c->len[i] == c->len[j] &&
                !memcmp(c->doc[i], c->doc[j], c->len[i] * sizeof(uint32_t))) {
                c->n_dups++;
                break;
            }
}

static void corpus_free(corpus *c)
{
    for (uint64_t i = 0; i < c->n; i++)
        free(c->doc[i]);
    free(c->doc);
    free(c->len);
}

static int write_docs(const char *file, const corpus *c, uint64_t from, uint64_t to,
                      uint32_t vocab, uint64_t tok_id)
{
    shard_params p;
    shard_params_default(&p, SHARD_DOCS);
    p.vocab_size = vocab;
    p.tokenizer_id = tok_id;
    p.chunk_tokens = 997;
    shard_writer *w;
    dsv3_err e;
    if (shard_writer_open(&w, file, &p, &e))
        return -1;
    for (uint64_t i = from; i < to; i++)
        if (shard_write_record(w, c->doc[i], c->len[i], 0, &e))
            return -1;
    return shard_writer_close(w, &e);
}

static int exists(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0;
}

static void rm_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return;
    struct dirent *de;
    char f[512];
    while ((de = readdir(d)))
        if (de->d_name[0] != '.' || (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))) {
            snprintf(f, sizeof f, "%s/%s", dir, de->d_name);
            unlink(f);
        }
    closedir(d);
    rmdir(dir);
}

/* No stray temporary folder: nothing but what the test itself made. */
static int tmp_folders_left(void)
{
    DIR *d = opendir(tmpdir);
    int n = 0;
    struct dirent *de;
    while (d && (de = readdir(d)))
        n += strstr(de->d_name, ".tmp.") != NULL;
    if (d)
        closedir(d);
    return n;
}

static int run_pack(const pack_options *o, const char **inputs, int n_in, const char *out,
                    pack_counts *counts, dsv3_err *e)
{
    pack *p;
    if (pack_new(&p, o, e))
        return -1;
    int rc = 0;
    for (int i = 0; rc == 0 && i < n_in; i++)
        rc = pack_add_input(p, inputs[i], e);
    if (rc == 0)
        rc = pack_write(p, out, NULL, e);
    if (counts)
        *counts = *pack_get_counts(p);
    pack_free(p);
    return rc;
}

/* Everything in a packed folder's shards (both splits), read back in file order. */
typedef struct unpacked {
    uint64_t n_records, doc_starts, tokens_new, pad;
    uint64_t *hist;             /* histogram of new (non-overlap, non-pad) tokens */
    uint64_t whole_hash_sum;    /* sum of XXH3 of segments that are whole documents */
    uint64_t whole_docs;
    int bad;
} unpacked;

static void read_folder(const char *dir, uint32_t L, unpacked *u)
{
    memset(u, 0, sizeof *u);
    u->hist = calloc(VOCAB, sizeof *u->hist);
    const char *splits[2] = {"train", "val"};
    for (int s = 0; s < 2; s++) {
        for (int i = 0;; i++) {
            char f[600], b[600];
            snprintf(f, sizeof f, "%s/%s-%05d.shard", dir, splits[s], i);
            snprintf(b, sizeof b, "%s/%s-%05d.bounds.shard", dir, splits[s], i);
            if (!exists(f))
                break;
            shard_reader *r, *br;
            dsv3_err e;
            if (shard_open(&r, f, &e) || shard_open(&br, b, &e)) {
                u->bad = 1;
                return;
            }
            shard_record rec, bn;
            while (shard_next(r, &rec, &e) == 1) {
                if (shard_next(br, &bn, &e) != 1 || rec.n_tokens != L + 1 || bn.n_tokens < 1) {
                    u->bad = 1;
                    break;
                }
                u->n_records++;
                uint32_t nv = bn.tokens[0];
                uint32_t first = (rec.flags & PACK_SEQ_CONT) ? 1 : 0;
                for (uint32_t k = first; k < nv; k++)
                    u->hist[rec.tokens[k]]++, u->tokens_new++;
                for (uint32_t k = nv; k < L + 1; k++)
                    u->pad += rec.tokens[k] == PAD;
                for (uint64_t j = 1; j < bn.n_tokens; j++) {
                    uint32_t off = bn.tokens[j] & ~PACK_BOUND_CONT;
                    int cont = (bn.tokens[j] & PACK_BOUND_CONT) != 0;
                    if (!cont && !(off == 0 && first))
                        u->doc_starts++;
                    uint32_t end = j + 1 < bn.n_tokens ? (bn.tokens[j + 1] & ~PACK_BOUND_CONT) : nv;
                    /* a whole document: starts here and ends with EOS inside this record */
                    if (!cont && end > off && rec.tokens[end - 1] == EOS && !(off == 0 && first)) {
                        u->whole_hash_sum += XXH3_64bits(rec.tokens + off, (end - off) * 4);
                        u->whole_docs++;
                    }
                }
            }
            shard_close(r);
            shard_close(br);
        }
    }
}

static void pack_roundtrip(int best_fit, int dedup)
{
    corpus c;
    uint32_t L = 8 + (uint32_t)(test_rand() % 200);
    corpus_make(&c, 300 + test_rand() % 500, 3 * L, dedup ? 0.2 : 0.0);
    char in1[512], in2[512], out[512];
    path(in1, sizeof in1, "a.shard");
    path(in2, sizeof in2, "b.shard");
    path(out, sizeof out, "out");
    uint64_t cut = c.n / 3;
    REQUIRE(write_docs(in1, &c, 0, cut, VOCAB, 42) == 0);
    REQUIRE(write_docs(in2, &c, cut, c.n, VOCAB, 42) == 0);
    pack_options o;
    pack_options_default(&o);
    o.seq_len = L;
    o.eos_id = EOS;
    o.pad_id = PAD;
    o.best_fit = best_fit;
    o.dedup = dedup;
    o.seed = test_rand();
    o.val_fraction = 0.1;
    o.shard_tokens = (L + 1) * (1 + test_rand() % 20);
    const char *ins[2] = {in1, in2};
    pack_counts k;
    dsv3_err e;
    REQUIRE(run_pack(&o, ins, 2, out, &k, &e) == 0);
    unpacked u;
    read_folder(out, L, &u);
    CHECK(!u.bad);
    CHECK(u.n_records == k.sequences);
    CHECK(k.train_sequences + k.val_sequences == k.sequences);
    CHECK(k.val_sequences >= 1);
    uint64_t want_docs = c.n - (dedup ? c.n_dups : 0);
    CHECKF(k.docs == want_docs, "%llu kept, %llu expected", (unsigned long long)k.docs,
           (unsigned long long)want_docs);
    CHECK(k.docs + k.dup_docs == c.n);
    CHECKF(u.doc_starts == want_docs, "%llu starts", (unsigned long long)u.doc_starts);
    CHECK(u.pad == k.pad_tokens);
    /* Token multiset: the kept documents' tokens plus one EOS each. */
    uint64_t *hist = calloc(VOCAB, sizeof *hist), whole_sum = 0, whole_n = 0;
    for (uint64_t i = 0; i < c.n; i++) {
        int dup = 0;
        for (uint64_t j = 0; dedup && j < i && !dup; j++)
            dup = c.len[i] == c.len[j] && !memcmp(c.doc[i], c.doc[j], c.len[i] * 4);
        if (dup)
            continue;
        for (uint64_t t = 0; t < c.len[i]; t++)
            hist[c.doc[i][t]]++;
        hist[EOS]++;
        if (best_fit && c.len[i] + 1 <= L + 1) {
            c.doc[i][c.len[i]] = EOS;
            whole_sum += XXH3_64bits(c.doc[i], (c.len[i] + 1) * 4);
            whole_n++;
        }
    }
    CHECK(memcmp(hist, u.hist, VOCAB * sizeof *hist) == 0);
    if (best_fit) {
        /* Best-fit never splits a document that fits a record: each appears whole. */
        CHECK(u.whole_docs == whole_n);
        CHECK(u.whole_hash_sum == whole_sum);
        uint64_t long_docs = 0;
        for (uint64_t i = 0; i < c.n; i++)
            long_docs += c.len[i] + 1 > L + 1;
        CHECK(k.split_docs <= long_docs);
    } else {
        CHECK(k.pad_tokens <= L);   /* greedy pads only the last record */
    }
    free(hist);
    free(u.hist);
    rm_dir(out);
    unlink(in1);
    unlink(in2);
    corpus_free(&c);
    CHECK(tmp_folders_left() == 0);
}

static void greedy_keeps_every_document_and_token(void) { pack_roundtrip(0, 0); }
static void best_fit_keeps_every_document_whole(void) { pack_roundtrip(1, 0); }
static void dedup_removes_exactly_the_repeats(void) { pack_roundtrip(0, 1); }
static void best_fit_with_dedup(void) { pack_roundtrip(1, 1); }

static void permutation_is_reproducible(void)
{
    uint64_t n = 1 + test_rand() % 5000, seed = test_rand();
    uint64_t *a = malloc(n * 8), *b = malloc(n * 8);
    char *seen = calloc(n, 1);
    pack_permutation(a, n, seed);
    pack_permutation(b, n, seed);
    CHECK(memcmp(a, b, n * 8) == 0);
    int ok = 1;
    uint64_t fixed = 0;
    for (uint64_t i = 0; i < n; i++) {
        ok &= a[i] < n && !seen[a[i]];
        if (a[i] < n)
            seen[a[i]] = 1;
        fixed += a[i] == i;
    }
    CHECK(ok);
    if (n > 100)
        CHECKF(fixed < 10, "%llu fixed points of %llu", (unsigned long long)fixed,
               (unsigned long long)n);   /* expected 1; 10 is p < 1e-7 */
    pack_permutation(b, n, seed + 1);
    if (n > 3)
        CHECK(memcmp(a, b, n * 8) != 0);
    free(a);
    free(b);
    free(seen);
}

static int same_file(const char *a, const char *b)
{
    uint64_t ha, hb, sa, sb;
    return pack_file_hash(a, &ha, &sa, NULL) == 0 && pack_file_hash(b, &hb, &sb, NULL) == 0 &&
           ha == hb && sa == sb;
}

static void same_seed_same_bytes(void)
{
    corpus c;
    corpus_make(&c, 400, 100, 0.1);
    char in[512], o1[512], o2[512], o3[512];
    path(in, sizeof in, "d.shard");
    path(o1, sizeof o1, "o1");
    path(o2, sizeof o2, "o2");
    path(o3, sizeof o3, "o3");
    REQUIRE(write_docs(in, &c, 0, c.n, VOCAB, 7) == 0);
    pack_options o;
    pack_options_default(&o);
    o.seq_len = 32;
    o.eos_id = EOS;
    o.seed = test_rand() >> 2;
    o.val_fraction = 0.2;
    o.shard_tokens = 33 * 50;
    o.dedup = 1;
    const char *ins[1] = {in};
    dsv3_err e;
    REQUIRE(run_pack(&o, ins, 1, o1, NULL, &e) == 0);
    REQUIRE(run_pack(&o, ins, 1, o2, NULL, &e) == 0);
    o.seed++;
    REQUIRE(run_pack(&o, ins, 1, o3, NULL, &e) == 0);
    const char *files[] = {"manifest.json", "train-00000.shard", "train-00000.bounds.shard",
                           "val-00000.shard"};
    for (int i = 0; i < 4; i++) {
        char a[600], b[600];
        snprintf(a, sizeof a, "%s/%s", o1, files[i]);
        snprintf(b, sizeof b, "%s/%s", o2, files[i]);
        CHECKF(same_file(a, b), "%s differs", files[i]);
    }
    char a[600], b[600];
    snprintf(a, sizeof a, "%s/train-00000.shard", o1);
    snprintf(b, sizeof b, "%s/train-00000.shard", o3);
    CHECK(!same_file(a, b));
    rm_dir(o1);
    rm_dir(o2);
    rm_dir(o3);
    unlink(in);
    corpus_free(&c);
}

static void bad_input_leaves_no_folder(void)
{
    corpus c;
    corpus_make(&c, 50, 30, 0);
    char a[512], b[512], v[512], z[512], out[512], dmg[512];
    path(a, sizeof a, "a.shard");
    path(b, sizeof b, "b.shard");
    path(v, sizeof v, "v.shard");
    path(z, sizeof z, "z.shard");
    path(dmg, sizeof dmg, "dmg.shard");
    path(out, sizeof out, "out");
    REQUIRE(write_docs(a, &c, 0, c.n, VOCAB, 42) == 0);
    REQUIRE(write_docs(b, &c, 0, c.n, VOCAB, 43) == 0);
    REQUIRE(write_docs(v, &c, 0, c.n, VOCAB + 1, 42) == 0);
    REQUIRE(write_docs(z, &c, 0, 0, VOCAB, 42) == 0);
    pack_options o;
    pack_options_default(&o);
    o.seq_len = 16;
    o.eos_id = EOS;
    dsv3_err e;
    const char *tok_mismatch[2] = {a, b}, *vocab_mismatch[2] = {a, v}, *empty[1] = {z};
    CHECK(run_pack(&o, tok_mismatch, 2, out, NULL, &e) != 0);
    CHECKF(strstr(e.msg, "b.shard") && strstr(e.msg, "a.shard") && strstr(e.msg, "tokenizer"),
           "%s", e.msg);
    CHECK(!exists(out));
    CHECK(run_pack(&o, vocab_mismatch, 2, out, NULL, &e) != 0);
    CHECKF(strstr(e.msg, "vocabulary 5001"), "%s", e.msg);
    CHECK(!exists(out));
    CHECK(run_pack(&o, empty, 1, out, NULL, &e) != 0);
    CHECKF(strstr(e.msg, "no documents"), "%s", e.msg);
    CHECK(!exists(out));
    /* A damaged shard: a flipped byte in a chunk payload. */
    FILE *f = fopen(a, "rb"), *g = fopen(dmg, "wb");
    int ch, pos = 0;
    while ((ch = fgetc(f)) != EOF)
        fputc(pos++ == 200 ? ch ^ 0x40 : ch, g);
    fclose(f);
    fclose(g);
    const char *damaged[2] = {a, dmg};
    CHECK(run_pack(&o, damaged, 2, out, NULL, &e) != 0);
    CHECKF(strstr(e.msg, "dmg.shard"), "%s", e.msg);
    CHECK(!exists(out));
    o.eos_id = VOCAB;
    const char *one[1] = {a};
    CHECK(run_pack(&o, one, 1, out, NULL, &e) != 0);
    CHECK(!exists(out));
    CHECK(tmp_folders_left() == 0);
    unlink(a);
    unlink(b);
    unlink(v);
    unlink(z);
    unlink(dmg);
    corpus_free(&c);
}

/* FIM output rearranged back gives the document; the share of documents chosen is within
 * 5 standard deviations of the rate (a false alarm once in 3 million runs). */
static void fim_rearranges_back_and_keeps_the_rate(void)
{
    const uint32_t ids[3] = {PAD + 1, PAD + 2, PAD + 3};   /* outside the documents' ids */
    uint64_t rng = test_rand();
    int ok = 1;
    for (int it = 0; it < 2000; it++) {
        uint64_t n = test_rand() % 50;
        uint32_t t[64], out[64], back[64];
        for (uint64_t i = 0; i < n; i++)
            t[i] = (uint32_t)(test_rand() % PAD);
        int spm = it & 1;
        pack_fim(out, t, n, spm, ids, &rng);
        uint64_t h = 0, en = 0;   /* positions of HOLE and END */
        for (uint64_t i = 0; i < n + 3; i++) {
            h = out[i] == ids[1] ? i : h;
            en = out[i] == ids[2] ? i : en;
        }
        ok &= out[0] == ids[0] && h > 0 && en > h;
        uint64_t k = 0;
        if (!spm) {   /* BEGIN prefix HOLE suffix END middle -> prefix middle suffix */
            memcpy(back, out + 1, (h - 1) * 4), k = h - 1;
            memcpy(back + k, out + en + 1, (n + 2 - en) * 4), k += n + 2 - en;
            memcpy(back + k, out + h + 1, (en - h - 1) * 4), k += en - h - 1;
        } else {      /* BEGIN HOLE suffix END prefix middle -> prefix middle suffix */
            ok &= h == 1;
            memcpy(back, out + en + 1, (n + 2 - en) * 4), k = n + 2 - en;
            memcpy(back + k, out + 2, (en - 2) * 4), k += en - 2;
        }
        ok &= k == n && memcmp(back, t, n * 4) == 0;
    }
    CHECK(ok);

    /* The rate through pack itself: documents of one token each, counted from the manifest
     * counts (PSM and SPM shares drawn together). */
    corpus c;
    uint64_t N = 20000;
    c.n = N;
    c.n_dups = 0;
    c.doc = calloc(N, sizeof *c.doc);
    c.len = calloc(N, sizeof *c.len);
    for (uint64_t i = 0; i < N; i++) {
        c.len[i] = 1 + test_rand() % 5;
        c.doc[i] = malloc(8 * 4);
        for (uint64_t k = 0; k < c.len[i]; k++)
            c.doc[i][k] = (uint32_t)(test_rand() % PAD);
    }
    char in[512], out[512];
    path(in, sizeof in, "fim.shard");
    path(out, sizeof out, "fim");
    REQUIRE(write_docs(in, &c, 0, N, VOCAB + 10, 1) == 0);
    pack_options o;
    pack_options_default(&o);
    o.seq_len = 64;
    o.eos_id = EOS;
    o.fim_rate = 0.05 + (double)(test_rand() % 40) / 100;
    o.fim_spm_rate = (double)(test_rand() % 40) / 100;
    memcpy(o.fim_ids, ids, sizeof ids);
    o.seed = test_rand();
    const char *ins[1] = {in};
    pack_counts k;
    dsv3_err e;
    REQUIRE(run_pack(&o, ins, 1, out, &k, &e) == 0);
    double rates[2] = {o.fim_rate, o.fim_spm_rate};
    uint64_t got[2] = {k.fim_psm, k.fim_spm};
    for (int i = 0; i < 2; i++) {
        double mean = rates[i] * (double)N, sd = sqrt((double)N * rates[i] * (1 - rates[i]));
        CHECKF(fabs((double)got[i] - mean) <= 5 * sd + 1e-9, "%llu FIM documents, expected %.0f",
               (unsigned long long)got[i], mean);
    }
    CHECK(k.tokens == k.input_tokens + k.docs + 3 * (k.fim_psm + k.fim_spm));
    rm_dir(out);
    unlink(in);
    corpus_free(&c);
}

/* ---- loader ---- */

static void make_folder(const char *out, uint32_t L, int best_fit, uint64_t seed)
{
    corpus c;
    corpus_make(&c, 600, 4 * L, 0);
    char in[512];
    path(in, sizeof in, "l.shard");
    if (write_docs(in, &c, 0, c.n, VOCAB, 9))
        return;
    pack_options o;
    pack_options_default(&o);
    o.seq_len = L;
    o.eos_id = EOS;
    o.pad_id = PAD;
    o.best_fit = best_fit;
    o.seed = seed;
    o.val_fraction = 0.05;
    o.shard_tokens = (L + 1) * 37;
    const char *ins[1] = {in};
    dsv3_err e;
    run_pack(&o, ins, 1, out, NULL, &e);
    unlink(in);
    corpus_free(&c);
}

static int batch_equal(const loader_batch *a, const loader_batch *b)
{
    size_t n = (size_t)a->rows * a->cols;
    return a->rows == b->rows && !memcmp(a->tokens, b->tokens, n * 4) &&
           !memcmp(a->targets, b->targets, n * 4) && !memcmp(a->mask, b->mask, n) &&
           !memcmp(a->segment, b->segment, n * 4) && !memcmp(a->record, b->record, a->rows * 8);
}

static void loader_resume_gives_the_same_batch(void)
{
    char out[512];
    path(out, sizeof out, "lf");
    uint32_t L = 16 + (uint32_t)(test_rand() % 64);
    make_folder(out, L, (int)(test_rand() % 2), test_rand());
    loader_params p = {"train", 1 + (uint32_t)(test_rand() % 7), test_rand(), 0, 1, 1};
    loader *l, *m;
    dsv3_err e;
    REQUIRE(loader_open(&l, out, &p, &e) == 0);
    REQUIRE(loader_open(&m, out, &p, &e) == 0);
    /* Run past an epoch boundary, saving the position at a random step. */
    uint64_t steps = 2 * loader_records_per_rank(l) / p.batch + 3;
    uint64_t save_at = test_rand() % steps;
    loader_pos saved = {0, 0};
    const loader_batch *b, *b2;
    loader_batch want = {0};
    size_t n = (size_t)p.batch * L;
    want.tokens = malloc(n * 4);
    want.targets = malloc(n * 4);
    want.mask = malloc(n);
    want.segment = malloc(n * 4);
    want.record = malloc(p.batch * 8);
    int ok = 1;
    for (uint64_t s = 0; s < steps; s++) {
        if (s == save_at)
            saved = loader_tell(l);
        REQUIRE(loader_next(l, &b, &e) == 0);
        for (size_t i = 0; i + 1 < n; i++)   /* targets are the inputs shifted by one */
            if ((i + 1) % L != 0)
                ok &= b->targets[i] == b->tokens[i + 1];
        for (size_t i = 0; i < n; i++)
            ok &= b->mask[i] || b->targets[i] == PAD;
        if (s == save_at) {
            memcpy(want.tokens, b->tokens, n * 4);
            memcpy(want.targets, b->targets, n * 4);
            memcpy(want.mask, b->mask, n);
            memcpy(want.segment, b->segment, n * 4);
            memcpy(want.record, b->record, p.batch * 8);
            want.rows = b->rows;
            want.cols = b->cols;
        }
    }
    CHECK(ok);
    CHECK(loader_tell(l).epoch >= 2);
    REQUIRE(loader_seek(m, saved, &e) == 0);
    REQUIRE(loader_next(m, &b2, &e) == 0);
    CHECK(batch_equal(&want, b2));
    /* Records of one epoch: a permutation; the next epoch's order differs. */
    loader_pos zero = {0, 0}, one = {1, 0};
    uint64_t R = loader_records_per_rank(m);
    uint64_t *e0 = malloc(R * 8), *e1 = malloc(R * 8);
    loader_params p1 = p;
    p1.batch = 1;
    loader *k;
    REQUIRE(loader_open(&k, out, &p1, &e) == 0);
    loader_seek(k, zero, &e);
    for (uint64_t i = 0; i < R; i++)
        e0[i] = (loader_next(k, &b, &e), b->record[0]);
    loader_seek(k, one, &e);
    for (uint64_t i = 0; i < R; i++)
        e1[i] = (loader_next(k, &b, &e), b->record[0]);
    char *seen = calloc(R, 1);
    int perm_ok = 1;
    for (uint64_t i = 0; i < R; i++) {
        perm_ok &= e0[i] < R && !seen[e0[i]];
        if (e0[i] < R)
            seen[e0[i]] = 1;
    }
    CHECK(perm_ok);
    if (R > 3)
        CHECK(memcmp(e0, e1, R * 8) != 0);
    free(seen);
    free(e0);
    free(e1);
    loader_close(k);
    free(want.tokens);
    free(want.targets);
    free(want.mask);
    free(want.segment);
    free(want.record);
    loader_close(l);
    loader_close(m);
    rm_dir(out);
}

static void loader_ranks_are_disjoint_and_cover(void)
{
    char out[512];
    path(out, sizeof out, "lr");
    make_folder(out, 24, 0, test_rand());
    uint32_t world = 2 + (uint32_t)(test_rand() % 5);
    uint64_t seed = test_rand(), N = 0, per = 0;
    char *seen = NULL;
    int ok = 1;
    for (uint64_t epoch = 0; epoch < 2; epoch++) {
        for (uint32_t r = 0; r < world; r++) {
            loader_params p = {"train", 1, seed, r, world, 0};
            loader *l;
            dsv3_err e;
            REQUIRE(loader_open(&l, out, &p, &e) == 0);
            N = loader_records(l);
            per = loader_records_per_rank(l);
            if (!seen)
                seen = calloc(N, 1);
            loader_pos pos = {epoch, 0};
            loader_seek(l, pos, &e);
            for (uint64_t i = 0; i < per; i++) {
                const loader_batch *b;
                REQUIRE(loader_next(l, &b, &e) == 0);
                ok &= b->record[0] < N && seen[b->record[0]] == (char)epoch;
                seen[b->record[0]] = (char)(epoch + 1);
            }
            loader_close(l);
        }
        uint64_t covered = 0;
        for (uint64_t i = 0; i < N; i++)
            covered += seen[i] == (char)(epoch + 1);
        CHECKF(covered == per * world && N - covered < world, "%llu of %llu",
               (unsigned long long)covered, (unsigned long long)N);
        for (uint64_t i = 0; i < N; i++)   /* the left-out few rejoin the next epoch */
            seen[i] = (char)(epoch + 1);
    }
    CHECK(ok);
    free(seen);
    rm_dir(out);
}

static void loader_detects_damage(void)
{
    char out[512], f[600];
    path(out, sizeof out, "ld");
    make_folder(out, 20, 0, 1);
    snprintf(f, sizeof f, "%s/train-00000.shard", out);
    FILE *fp = fopen(f, "r+b");
    REQUIRE(fp);
    fseek(fp, 150, SEEK_SET);
    int ch = fgetc(fp);
    fseek(fp, 150, SEEK_SET);
    fputc(ch ^ 1, fp);
    fclose(fp);
    loader_params p = {"train", 2, 0, 0, 1, 1};
    loader *l;
    dsv3_err e;
    CHECK(loader_open(&l, out, &p, &e) != 0);
    CHECKF(strstr(e.msg, "train-00000.shard: xxh3"), "%s", e.msg);
    snprintf(f, sizeof f, "%s/val-00000.bounds.shard", out);
    CHECK(truncate(f, 100) == 0);
    p.split = "val";
    CHECK(loader_open(&l, out, &p, &e) != 0);
    CHECKF(strstr(e.msg, "val-00000.bounds.shard: 100 bytes"), "%s", e.msg);
    rm_dir(out);
}

/* Near-dedup through pack: originals of 200-400 random tokens, and copies of some with one
 * token changed (5-gram Jaccard >= 0.95: missed with probability < 1e-6 per pair) placed
 * later. Exactly the copies go, removed.tsv names each with its original, and the tokens
 * written are those of the rest. With FIM on, FIM draws only for the survivors. */
static void near_dedup_removes_the_planted_copies(void)
{
    uint64_t n_orig = 100 + test_rand() % 100, n_copy = 20 + test_rand() % 30;
    corpus c;
    c.n = n_orig + n_copy;
    c.n_dups = 0;
    c.doc = calloc(c.n, sizeof *c.doc);
    c.len = calloc(c.n, sizeof *c.len);
    uint64_t *orig_of = calloc(c.n, sizeof *orig_of);
    for (uint64_t i = 0; i < c.n; i++) {
        orig_of[i] = i;
        if (i >= n_orig) {   /* a copy of an earlier original, one token changed */
            uint64_t j = test_rand() % n_orig;
            orig_of[i] = j;
            c.len[i] = c.len[j];
            c.doc[i] = malloc(c.len[i] * 4 + 4);
            memcpy(c.doc[i], c.doc[j], c.len[i] * 4);
            c.doc[i][test_rand() % c.len[i]] = (uint32_t)(test_rand() % PAD);
            continue;
        }
        c.len[i] = 200 + test_rand() % 200;
        c.doc[i] = malloc(c.len[i] * 4 + 4);
        for (uint64_t k = 0; k < c.len[i]; k++)
            c.doc[i][k] = (uint32_t)(test_rand() % PAD);
    }
    /* Copies of copies chain to the first document of their family in input order. */
    char in[512], out[512], tsv[600];
    path(in, sizeof in, "near.shard");
    path(out, sizeof out, "near");
    snprintf(tsv, sizeof tsv, "%s/removed.tsv", out);
    REQUIRE(write_docs(in, &c, 0, c.n, VOCAB + 10, 3) == 0);
    for (int fim = 0; fim < 2; fim++) {
        pack_options o;
        pack_options_default(&o);
        o.seq_len = 64;
        o.eos_id = EOS;
        o.pad_id = PAD;
        o.near_dedup = 1;
        o.near.threads = 1 + (int)(test_rand() % 3);
        o.log_removed = 1;
        o.seed = test_rand();
        if (fim) {
            o.fim_rate = 0.5;
            o.fim_ids[0] = PAD + 1, o.fim_ids[1] = PAD + 2, o.fim_ids[2] = PAD + 3;
        }
        const char *ins[1] = {in};
        pack_counts k;
        dsv3_err e;
        int rc = run_pack(&o, ins, 1, out, &k, &e);
        CHECKF(rc == 0, "%s", e.msg);
        if (rc)
            break;
        CHECKF(k.near_docs == n_copy, "%llu removed, %llu planted",
               (unsigned long long)k.near_docs, (unsigned long long)n_copy);
        CHECK(k.docs == n_orig);
        CHECK(k.near_clusters >= 1 && k.near_clusters <= n_copy);
        CHECK(k.fim_psm + k.fim_spm <= k.docs);
        uint64_t tokens = 0, removed_tokens = 0;
        for (uint64_t i = 0; i < c.n; i++)
            *(i < n_orig ? &tokens : &removed_tokens) += c.len[i];
        CHECK(k.near_tokens == removed_tokens);
        CHECK(k.tokens == tokens + n_orig + 3 * (k.fim_psm + k.fim_spm));
        if (!fim) {   /* the token multiset: the originals' tokens plus one EOS each */
            unpacked u;
            read_folder(out, 64, &u);
            uint64_t *hist = calloc(VOCAB, sizeof *hist);
            for (uint64_t i = 0; i < n_orig; i++) {
                for (uint64_t t = 0; t < c.len[i]; t++)
                    hist[c.doc[i][t]]++;
                hist[EOS]++;
            }
            CHECK(!u.bad && memcmp(hist, u.hist, VOCAB * sizeof *hist) == 0);
            free(hist);
            free(u.hist);
        }
        FILE *f = fopen(tsv, "r");
        REQUIRE(f);
        char line[128];
        uint64_t lines = 0, good = 0, d, kept;
        CHECK(fgets(line, sizeof line, f) && strncmp(line, "document\treason\tkept", 20) == 0);
        while (fgets(line, sizeof line, f)) {
            lines++;
            good += sscanf(line, "%" SCNu64 "\tnear\t%" SCNu64, &d, &kept) == 2 && d >= n_orig &&
                    d < c.n && kept == orig_of[d];
        }
        fclose(f);
        CHECK(lines == n_copy && good == n_copy);
        rm_dir(out);
    }
    unlink(in);
    free(orig_of);
    corpus_free(&c);
}

int main(void)
{
    test_seed();
    snprintf(tmpdir, sizeof tmpdir, "/tmp/dsv3-pack-test-XXXXXX");
    if (!mkdtemp(tmpdir))
        return 1;
    RUN(greedy_keeps_every_document_and_token);
    RUN(best_fit_keeps_every_document_whole);
    RUN(dedup_removes_exactly_the_repeats);
    RUN(best_fit_with_dedup);
    RUN(permutation_is_reproducible);
    RUN(same_seed_same_bytes);
    RUN(bad_input_leaves_no_folder);
    RUN(fim_rearranges_back_and_keeps_the_rate);
    RUN(near_dedup_removes_the_planted_copies);
    RUN(loader_resume_gives_the_same_batch);
    RUN(loader_ranks_are_disjoint_and_cover);
    RUN(loader_detects_damage);
    rm_dir(tmpdir);
    TEST_EXIT();
}
