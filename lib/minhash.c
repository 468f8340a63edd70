#include "minhash.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <xxhash.h>

void minhash_params_default(minhash_params *p)
{
    p->ngram = 5;
    p->bands = 14;
    p->rows = 8;
    p->seed = 1;
    p->threads = 0;
}

int minhash_params_check(const minhash_params *p, dsv3_err *e)
{
    if (p->ngram < 1 || p->ngram > 1u << 20)
        return err_set(e, "n-gram size %u out of range 1..%u", p->ngram, 1u << 20);
    if (p->bands < 1 || p->rows < 1 || (uint64_t)p->bands * p->rows > MINHASH_MAX_HASHES)
        return err_set(e, "%u bands x %u rows: need at least 1 x 1 and at most %u hashes",
                       p->bands, p->rows, MINHASH_MAX_HASHES);
    return 0;
}

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void minhash_fns_init(minhash_fns *f, uint32_t n, uint64_t seed)
{
    uint64_t s = seed ^ 0x6d696e68617368ULL;   /* "minhash": its own stream of the seed */
    f->n = n;
    for (uint32_t i = 0; i < ((n + 7) & ~7u); i++) {   /* the padding lanes too */
        f->a[i] = splitmix64(&s) | 1;
        f->b[i] = splitmix64(&s);
    }
}

/* The inner loop runs bands*rows times per token: blocks of 8 lanes in GCC/clang vector
 * types (plain C elsewhere is the same arithmetic), and on x86-64 a clone for AVX-512
 * (64-bit multiplies in vector registers) and one for AVX2, chosen at load time. sig and
 * the tables are padded to whole blocks of 8. */
#if defined(__GNUC__)
typedef uint64_t u64x8 __attribute__((vector_size(64)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
#if defined(__x86_64__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
static void fold_shingle(const uint64_t *restrict a, const uint64_t *restrict b, uint32_t n8,
                         uint64_t x, uint32_t *restrict sig)
{
    for (size_t i = 0; i < n8; i += 8) {
        u64x8 av, bv;
        u32x8 sv;
        memcpy(&av, a + i, sizeof av);
        memcpy(&bv, b + i, sizeof bv);
        memcpy(&sv, sig + i, sizeof sv);
        u32x8 v = __builtin_convertvector((av * x + bv) >> 32, u32x8);
        u32x8 lt = (u32x8)(v < sv);
        sv = (v & lt) | (sv & ~lt);
        memcpy(sig + i, &sv, sizeof sv);
    }
}
#else
static void fold_shingle(const uint64_t *restrict a, const uint64_t *restrict b, uint32_t n8,
                         uint64_t x, uint32_t *restrict sig)
{
    for (size_t i = 0; i < n8; i++) {
        uint32_t v = (uint32_t)((x * a[i] + b[i]) >> 32);
        sig[i] = v < sig[i] ? v : sig[i];
    }
}
#endif

void minhash_signature(const minhash_fns *f, uint32_t ngram, const uint32_t *t, uint64_t n,
                       uint32_t *sig)
{
    uint32_t n8 = (f->n + 7) & ~7u, pad[MINHASH_MAX_HASHES];
    for (uint32_t i = 0; i < n8; i++)
        pad[i] = UINT32_MAX;
    if (n > 0 && n < ngram)
        fold_shingle(f->a, f->b, n8, XXH3_64bits(t, n * sizeof *t), pad);
    for (uint64_t s = 0; n >= ngram && s + ngram <= n; s++)
        fold_shingle(f->a, f->b, n8, XXH3_64bits(t + s, ngram * sizeof *t), pad);
    memcpy(sig, pad, f->n * sizeof *sig);
}

/* ---- signatures on threads: band keys of every document ---- */

typedef struct sig_job {
    const minhash_params *p;
    const minhash_fns *f;
    const uint32_t *tok;
    const uint64_t *off;
    uint64_t n_docs;
    uint32_t trailing;
    uint64_t *keys;             /* [n_docs * bands] */
    atomic_uint_fast64_t next;  /* first document of the next unclaimed block */
} sig_job;

enum { SIG_BLOCK = 64 };

static void *sig_worker(void *arg)
{
    sig_job *j = arg;
    uint32_t sig[MINHASH_MAX_HASHES];
    uint32_t B = j->p->bands, R = j->p->rows;
    for (;;) {
        uint64_t first = atomic_fetch_add(&j->next, SIG_BLOCK);
        if (first >= j->n_docs)
            break;
        uint64_t last = first + SIG_BLOCK < j->n_docs ? first + SIG_BLOCK : j->n_docs;
        for (uint64_t d = first; d < last; d++) {
            uint64_t a = j->off[d], n = j->off[d + 1] - a;
            n = n >= j->trailing ? n - j->trailing : 0;
            minhash_signature(j->f, j->p->ngram, j->tok + a, n, sig);
            /* The band index seeds the key, so equal minima in different bands never meet. */
            for (uint32_t b = 0; b < B; b++)
                j->keys[d * B + b] = XXH3_64bits_withSeed(sig + b * R, R * sizeof *sig, b);
        }
    }
    return NULL;
}

static int online_cpus(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > 256 ? 256 : (int)n;
}

/* ---- union-find: the root of every set is its lowest index ---- */

static uint64_t uf_find(uint64_t *parent, uint64_t x)
{
    while (parent[x] != x) {
        parent[x] = parent[parent[x]];   /* path halving */
        x = parent[x];
    }
    return x;
}

static void uf_union(uint64_t *parent, uint64_t x, uint64_t y)
{
    x = uf_find(parent, x);
    y = uf_find(parent, y);
    if (x < y)
        parent[y] = x;
    else if (y < x)
        parent[x] = y;
}

typedef struct keyed {
    uint64_t key, doc;
} keyed;

static int keyed_cmp(const void *a, const void *b)
{
    const keyed *x = a, *y = b;
    if (x->key != y->key)
        return x->key < y->key ? -1 : 1;
    return x->doc < y->doc ? -1 : x->doc > y->doc;
}

int minhash_dedup(const minhash_params *p, const uint32_t *tok, const uint64_t *off,
                  uint64_t n_docs, uint32_t trailing, uint64_t *keep_as, minhash_stats *st,
                  dsv3_err *e)
{
    memset(st, 0, sizeof *st);
    if (minhash_params_check(p, e))
        return -1;
    uint32_t B = p->bands;
    minhash_fns *f = malloc(sizeof *f);
    uint64_t *keys = malloc((n_docs ? n_docs : 1) * B * sizeof *keys);
    keyed *kd = malloc((n_docs ? n_docs : 1) * sizeof *kd);
    int rc = -1;
    if (!f || !keys || !kd) {
        err_set(e, "out of memory for near-dedup of %llu documents (%u bands)",
                (unsigned long long)n_docs, B);
        goto out;
    }
    st->bytes = n_docs * (B * sizeof *keys + sizeof *kd + sizeof *keep_as);
    minhash_fns_init(f, B * p->rows, p->seed);

    sig_job job = {p, f, tok, off, n_docs, trailing, keys, 0};
    int nt = p->threads > 0 ? p->threads : online_cpus();
    if ((uint64_t)nt > n_docs / SIG_BLOCK + 1)
        nt = (int)(n_docs / SIG_BLOCK + 1);
    pthread_t th[256];
    int started = 0;
    for (; started < nt - 1 && started < 255; started++)
        if (pthread_create(&th[started], NULL, sig_worker, &job) != 0)
            break;   /* fewer threads: the work is still done, by those that exist */
    sig_worker(&job);
    for (int i = 0; i < started; i++)
        pthread_join(th[i], NULL);

    for (uint64_t d = 0; d < n_docs; d++)
        keep_as[d] = d;
    for (uint32_t b = 0; b < B; b++) {
        for (uint64_t d = 0; d < n_docs; d++)
            kd[d] = (keyed){keys[d * B + b], d};
        qsort(kd, n_docs, sizeof *kd, keyed_cmp);
        for (uint64_t i = 1; i < n_docs; i++)
            if (kd[i].key == kd[i - 1].key) {
                st->candidate_pairs++;
                uf_union(keep_as, kd[i - 1].doc, kd[i].doc);
            }
    }
    /* Flatten: every document points at its root; a root with members is a cluster
     * (kd[root].key, free now, marks a root already counted). */
    for (uint64_t d = 0; d < n_docs; d++)
        kd[d].key = 0;
    for (uint64_t d = 0; d < n_docs; d++) {
        keep_as[d] = uf_find(keep_as, d);
        if (keep_as[d] != d) {
            st->removed++;
            if (!kd[keep_as[d]].key) {
                kd[keep_as[d]].key = 1;
                st->clusters++;
            }
        }
    }
    rc = 0;
out:
    free(f);
    free(keys);
    free(kd);
    return rc;
}
