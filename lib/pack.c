#include "pack.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "bpe.h"
#include "cli.h"
#include "fim.h"
#include "outdir.h"
#include "outfile.h"
#include "shard.h"

/* ---- randomness: splitmix64, the same generator everywhere so a seed means one thing ---- */

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

uint64_t pack_rand_below(uint64_t *state, uint64_t n)
{
    /* Rejection of the top partial block keeps every value equally likely. */
    uint64_t limit = UINT64_MAX - UINT64_MAX % n, x;
    do
        x = splitmix64(state);
    while (x >= limit);
    return x % n;
}

void pack_permutation(uint64_t *perm, uint64_t n, uint64_t seed)
{
    uint64_t s = seed;
    for (uint64_t i = 0; i < n; i++)
        perm[i] = i;
    for (uint64_t i = n; i > 1; i--) {
        uint64_t j = pack_rand_below(&s, i);
        uint64_t t = perm[i - 1];
        perm[i - 1] = perm[j];
        perm[j] = t;
    }
}

/* ---- exact dedup: an open-addressing set of XXH3-128 hashes ----
 * 16 bytes a slot, kept at most half full: 32-64 bytes per unique document. */

typedef struct hashset {
    XXH128_hash_t *slot;
    uint64_t cap, n;
    int zero_seen;  /* the all-zero hash marks an empty slot, so it is tracked apart */
} hashset;

static int hashset_grow(hashset *h)
{
    uint64_t ncap = h->cap ? 2 * h->cap : 1024;
    XXH128_hash_t *ns = calloc(ncap, sizeof *ns);
    if (!ns)
        return -1;
    for (uint64_t i = 0; i < h->cap; i++) {
        XXH128_hash_t v = h->slot[i];
        if (!v.low64 && !v.high64)
            continue;
        uint64_t j = v.low64 & (ncap - 1);
        while (ns[j].low64 || ns[j].high64)
            j = (j + 1) & (ncap - 1);
        ns[j] = v;
    }
    free(h->slot);
    h->slot = ns;
    h->cap = ncap;
    return 0;
}

/* 1: new, 0: seen before, -1: out of memory. */
static int hashset_insert(hashset *h, XXH128_hash_t v)
{
    if (!v.low64 && !v.high64) {
        int isnew = !h->zero_seen;
        h->zero_seen = 1;
        return isnew;
    }
    if (2 * (h->n + 1) > h->cap && hashset_grow(h))
        return -1;
    uint64_t j = v.low64 & (h->cap - 1);
    while (h->slot[j].low64 || h->slot[j].high64) {
        if (h->slot[j].low64 == v.low64 && h->slot[j].high64 == v.high64)
            return 0;
        j = (j + 1) & (h->cap - 1);
    }
    h->slot[j] = v;
    h->n++;
    return 1;
}

/* ---- the corpus ---- */

typedef struct removal {   /* one line of removed.tsv */
    uint64_t doc;           /* input index, counting from 0 over all inputs in order */
    uint64_t kept;          /* near: the input index of the document kept in its place */
    int near;               /* 0: exact repeat, 1: near duplicate */
} removal;

typedef struct piece {      /* best-fit: a whole document, or a slice of a long one */
    uint64_t off;           /* into tokens[] */
    uint32_t len;
    uint32_t doc_start;     /* 1 if off is the first token of its document */
} piece;

struct pack {
    pack_options o;
    pack_counts c;
    uint32_t *tok;          /* all kept documents, each followed by EOS */
    uint64_t n_tok, cap_tok;
    uint64_t *doc_off;      /* document i is tok[doc_off[i] .. doc_off[i+1]) */
    uint64_t n_docs, cap_docs;
    hashset seen;
    uint32_t vocab_size;
    uint64_t tokenizer_id;
    char **inputs;          /* names, for messages and the manifest */
    uint64_t fim_rng;       /* FIM draws, one per kept document in input order */
    uint32_t *fim_buf;
    uint64_t fim_cap;
    fim_text ft;            /* with a tokenizer: FIM at character boundaries */
    uint32_t *doc_flags;    /* --near-dedup: record flags of each document, for FIM later */
    uint64_t *src;          /* --log-removed: input index of each document */
    removal *rm;            /* --log-removed: what was removed, and why */
    uint64_t n_rm, cap_rm;
    int near_on;            /* near_dedup() has run */
    /* packing, made by pack_write */
    uint64_t n_seq;
    piece *pieces;          /* best-fit: pieces of bin b are pieces[bin_first[b]..[b+1]) */
    uint64_t *bin_first;
};

void pack_options_default(pack_options *o)
{
    memset(o, 0, sizeof *o);
    o->seq_len = 4096;
    o->shard_tokens = 256ull << 20;   /* 1 GiB of tokens before compression */
    o->level = 3;
    minhash_params_default(&o->near);
}

/* Empty per-document arrays: offsets, and flags and input indices where needed. */
static int doc_arrays_new(pack *p)
{
    p->n_docs = 0;
    p->cap_docs = 63;
    p->doc_off = malloc(64 * sizeof *p->doc_off);
    p->doc_flags = p->o.near_dedup ? malloc(64 * sizeof *p->doc_flags) : NULL;
    p->src = p->o.log_removed ? malloc(64 * sizeof *p->src) : NULL;
    if (!p->doc_off || (p->o.near_dedup && !p->doc_flags) || (p->o.log_removed && !p->src))
        return -1;
    p->doc_off[0] = 0;
    return 0;
}

void pack_free(pack *p);

int pack_new(pack **pp, const pack_options *o, dsv3_err *e)
{
    if (o->seq_len < 1 || o->seq_len > (1u << 28) - 1)
        return err_set(e, "sequence length %u out of range 1..%u", o->seq_len, (1u << 28) - 1);
    if (!(o->fim_rate >= 0 && o->fim_spm_rate >= 0 && o->fim_rate + o->fim_spm_rate <= 1))
        return err_set(e, "FIM rates %g + %g not within [0, 1]", o->fim_rate, o->fim_spm_rate);
    if (!(o->val_fraction >= 0 && o->val_fraction < 1))
        return err_set(e, "validation fraction %g not in [0, 1)", o->val_fraction);
    if (o->near_dedup && minhash_params_check(&o->near, e))
        return -1;
    pack *p = calloc(1, sizeof *p);
    if (!p)
        return err_set(e, "out of memory");
    p->o = *o;
    if (o->tok && fim_text_new(&p->ft, o->tok, e)) {
        free(p);
        return -1;
    }
    if (p->o.shard_tokens == 0)
        p->o.shard_tokens = 1;
    if (doc_arrays_new(p)) {
        pack_free(p);
        return err_set(e, "out of memory");
    }
    p->fim_rng = o->seed ^ 0x66696d66696dULL;   /* "fimfim": its own stream of the seed */
    *pp = p;
    return 0;
}

void pack_free(pack *p)
{
    if (!p)
        return;
    free(p->tok);
    free(p->doc_off);
    free(p->seen.slot);
    for (uint64_t i = 0; i < p->c.inputs; i++)
        free(p->inputs[i]);
    free(p->inputs);
    free(p->pieces);
    free(p->bin_first);
    free(p->fim_buf);
    fim_text_free(&p->ft);
    free(p->doc_flags);
    free(p->src);
    free(p->rm);
    free(p);
}

const pack_counts *pack_get_counts(const pack *p) { return &p->c; }

static int add_removal(pack *p, uint64_t doc, uint64_t kept, int near)
{
    if (p->n_rm == p->cap_rm) {
        uint64_t nc = p->cap_rm ? 2 * p->cap_rm : 1024;
        removal *q = realloc(p->rm, nc * sizeof *q);
        if (!q)
            return -1;
        p->rm = q;
        p->cap_rm = nc;
    }
    p->rm[p->n_rm++] = (removal){doc, kept, near};
    return 0;
}

/* Appends a document and, where kept, its flags and input index (arrays grown with doc_off). */
static int add_doc(pack *p, const uint32_t *t, uint64_t n, uint32_t flags, uint64_t src)
{
    if (p->n_tok + n + 1 > p->cap_tok) {
        uint64_t nc = p->cap_tok ? p->cap_tok : 1 << 16;
        while (nc < p->n_tok + n + 1)
            nc *= 2;
        uint32_t *q = realloc(p->tok, nc * sizeof *q);
        if (!q)
            return -1;
        p->tok = q;
        p->cap_tok = nc;
    }
    if (p->n_docs == p->cap_docs) {
        uint64_t nc = 2 * (p->cap_docs + 1);
        uint64_t *q = realloc(p->doc_off, nc * sizeof *q);
        if (!q)
            return -1;
        p->doc_off = q;
        if (p->o.near_dedup) {
            uint32_t *f = realloc(p->doc_flags, nc * sizeof *f);
            if (!f)
                return -1;
            p->doc_flags = f;
        }
        if (p->o.log_removed) {
            uint64_t *s = realloc(p->src, nc * sizeof *s);
            if (!s)
                return -1;
            p->src = s;
        }
        p->cap_docs = nc - 1;
    }
    if (p->doc_flags)
        p->doc_flags[p->n_docs] = flags;
    if (p->src)
        p->src[p->n_docs] = src;
    if (n)
        memcpy(p->tok + p->n_tok, t, n * sizeof *t);
    p->tok[p->n_tok + n] = p->o.eos_id;
    p->n_tok += n + 1;
    p->doc_off[++p->n_docs] = p->n_tok;
    return 0;
}

void pack_fim(uint32_t *out, const uint32_t *t, uint64_t n, int spm, const uint32_t ids[3],
              uint64_t *rng)
{
    uint64_t a = pack_rand_below(rng, n + 1), b = pack_rand_below(rng, n + 1);
    if (a > b) {
        uint64_t x = a;
        a = b;
        b = x;
    }
    uint64_t k = 0;
    out[k++] = ids[0];
    if (!spm) {
        memcpy(out + k, t, a * sizeof *t), k += a;
        out[k++] = ids[1];
        memcpy(out + k, t + b, (n - b) * sizeof *t), k += n - b;
        out[k++] = ids[2];
    } else {
        out[k++] = ids[1];
        memcpy(out + k, t + b, (n - b) * sizeof *t), k += n - b;
        out[k++] = ids[2];
        memcpy(out + k, t, a * sizeof *t), k += a;
    }
    memcpy(out + k, t + a, (b - a) * sizeof *t);
}

/* Chooses FIM for one document (one draw whatever the outcome, so the choice of document i
 * depends only on the seed and i) and returns the tokens to keep; NULL on error (e set). */
static const uint32_t *maybe_fim(pack *p, const uint32_t *t, uint64_t *n, uint32_t flags,
                                 dsv3_err *e)
{
    const pack_options *o = &p->o;
    if (o->fim_rate <= 0 && o->fim_spm_rate <= 0)
        return t;
    double u = (double)(pack_rand_below(&p->fim_rng, 1ull << 53)) / 9007199254740992.0;
    if (o->fim_code_only && !(flags & SHARD_DOC_CODE))
        return t;
    int spm;
    if (u < o->fim_rate)
        spm = 0;
    else if (u < o->fim_rate + o->fim_spm_rate)
        spm = 1;
    else
        return t;
    if (spm)
        p->c.fim_spm++;
    else
        p->c.fim_psm++;
    if (o->tok) {
        int r = fim_text_apply(&p->ft, t, *n, spm, o->fim_ids, &p->fim_rng, e);
        if (r < 0)
            return NULL;
        if (r == 1) {
            *n = p->ft.out.n;
            return p->ft.out.v;
        }
        p->c.fim_token_cut++;   /* special tokens inside: cut between tokens instead */
    }
    if (*n + 3 > p->fim_cap) {
        uint32_t *q = realloc(p->fim_buf, (*n + 3) * sizeof *q);
        if (!q) {
            err_set(e, "out of memory");
            return NULL;
        }
        p->fim_buf = q;
        p->fim_cap = *n + 3;
    }
    pack_fim(p->fim_buf, t, *n, spm, o->fim_ids, &p->fim_rng);
    *n += 3;
    return p->fim_buf;
}

int pack_add_input(pack *p, const char *path, dsv3_err *e)
{
    const char *name = strcmp(path, "-") == 0 ? "<stdin>" : path;
    char **ni = realloc(p->inputs, (p->c.inputs + 1) * sizeof *ni);
    if (!ni)
        return err_set(e, "out of memory");
    p->inputs = ni;
    if (!(p->inputs[p->c.inputs] = strdup(name)))
        return err_set(e, "out of memory");
    p->c.inputs++;

    shard_reader *r;
    if (shard_open(&r, path, e))
        return -1;
    const shard_info *in = shard_get_info(r);
    int rc = 0;
    if (in->kind != SHARD_DOCS) {
        rc = err_set(e, "%s: a %s shard; dsv3-pack reads document streams", name,
                     shard_kind_name(in->kind));
    } else if (p->o.tok && in->vocab_size && in->vocab_size != bpe_vocab_size(p->o.tok)) {
        rc = err_set(e, "%s: vocabulary of %u tokens, but tokenizer %s has %u: the stream was "
                     "made by another tokenizer", name, in->vocab_size, p->o.tok_name,
                     bpe_vocab_size(p->o.tok));
    } else if (p->o.tok && in->tokenizer_id && in->tokenizer_id != bpe_id(p->o.tok)) {
        rc = err_set(e, "%s: made by tokenizer %016" PRIx64 ", not by %s (%016" PRIx64 ")",
                     name, in->tokenizer_id, p->o.tok_name, bpe_id(p->o.tok));
    } else if (p->c.inputs == 1) {
        p->vocab_size = in->vocab_size;
        p->tokenizer_id = in->tokenizer_id;
        if (p->vocab_size && p->o.eos_id >= p->vocab_size)
            rc = err_set(e, "%s: EOS id %u is not below the vocabulary size %u", name,
                         p->o.eos_id, p->vocab_size);
        else if (p->vocab_size && p->o.pad_id >= p->vocab_size)
            rc = err_set(e, "%s: padding id %u is not below the vocabulary size %u", name,
                         p->o.pad_id, p->vocab_size);
        for (int i = 0; rc == 0 && i < 3; i++)
            if ((p->o.fim_rate > 0 || p->o.fim_spm_rate > 0) && p->vocab_size &&
                p->o.fim_ids[i] >= p->vocab_size)
                rc = err_set(e, "%s: FIM token %u is not in the vocabulary (size %u)", name,
                             p->o.fim_ids[i], p->vocab_size);
    } else if (in->vocab_size != p->vocab_size || in->tokenizer_id != p->tokenizer_id) {
        rc = err_set(e, "%s: tokenizer %016" PRIx64 " with vocabulary %u differs from %s: "
                     "tokenizer %016" PRIx64 " with vocabulary %u", name, in->tokenizer_id,
                     in->vocab_size, p->inputs[0], p->tokenizer_id, p->vocab_size);
    }
    shard_record rec;
    while (rc == 0 && (rc = shard_next(r, &rec, e)) == 1) {
        rc = 0;
        p->c.input_docs++;
        p->c.input_tokens += rec.n_tokens;
        if (p->o.dedup) {
            /* The hash covers the tokens as stored (u32 little-endian), not the EOS. */
            int isnew = hashset_insert(&p->seen,
                                       XXH3_128bits(rec.tokens, rec.n_tokens * sizeof(uint32_t)));
            if (isnew < 0) {
                rc = err_set(e, "%s: out of memory for the dedup table (%" PRIu64 " documents)",
                             name, p->seen.n);
                break;
            }
            uint64_t bytes = p->seen.cap * sizeof(XXH128_hash_t);
            if (bytes > p->c.dedup_table_bytes)
                p->c.dedup_table_bytes = bytes;
            if (!isnew) {
                p->c.dup_docs++;
                p->c.dup_tokens += rec.n_tokens;
                if (p->o.log_removed && add_removal(p, p->c.input_docs - 1, 0, 0)) {
                    rc = err_set(e, "%s: out of memory", name);
                    break;
                }
                continue;
            }
        }
        uint64_t n = rec.n_tokens;
        /* Near-dedup needs every document first: FIM waits for near_dedup(). */
        dsv3_err fe;
        const uint32_t *t = p->o.near_dedup ? rec.tokens
                                            : maybe_fim(p, rec.tokens, &n, rec.flags, &fe);
        if (!t) {
            rc = err_set(e, "%s: document %" PRIu64 ": %s", name, p->c.input_docs - 1, fe.msg);
            break;
        }
        if (add_doc(p, t, n, rec.flags, p->c.input_docs - 1)) {
            rc = err_set(e, "%s: out of memory after %" PRIu64 " tokens", name, p->n_tok);
            break;
        }
        if (p->o.progress)
            progress_update(p->o.progress, p->c.input_tokens);
    }
    shard_close(r);
    p->c.docs = p->n_docs;
    p->c.tokens = p->n_tok;
    return rc < 0 ? -1 : 0;
}

/* ---- near-duplicate removal, then the deferred FIM ----
 * Documents removed are squeezed out of tok[] in place; with FIM on, the survivors are
 * rearranged into a new array instead (FIM changes lengths), which holds a second copy of
 * the corpus for a moment. */

static double cpu_seconds(void)   /* of the whole process: every thread */
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int near_dedup(pack *p, dsv3_err *e)
{
    uint64_t N = p->n_docs;
    uint64_t *keep_as = malloc((N ? N : 1) * sizeof *keep_as);
    if (!keep_as)
        return err_set(e, "out of memory for near-dedup of %" PRIu64 " documents", N);
    minhash_stats st;
    double t0 = progress_now(), c0 = cpu_seconds();
    if (minhash_dedup(&p->o.near, p->tok, p->doc_off, N, 1, keep_as, &st, e)) {
        free(keep_as);
        return -1;
    }
    p->c.near_seconds = progress_now() - t0;
    p->c.near_cpu_seconds = cpu_seconds() - c0;
    p->c.near_clusters = st.clusters;
    p->c.near_pairs = st.candidate_pairs;
    p->c.near_bytes = st.bytes;
    int fim = p->o.fim_rate > 0 || p->o.fim_spm_rate > 0;
    uint32_t *old_tok = p->tok;
    uint64_t *old_off = p->doc_off, *old_src = p->src;
    uint32_t *old_flags = p->doc_flags;
    uint64_t old_cap = p->cap_docs;
    if (fim) {   /* a fresh corpus: add_doc grows it */
        p->tok = NULL;
        p->n_tok = p->cap_tok = 0;
        if (doc_arrays_new(p)) {
            free(p->doc_off), free(p->doc_flags), free(p->src);
            p->tok = old_tok, p->doc_off = old_off, p->src = old_src, p->doc_flags = old_flags;
            p->n_docs = N, p->cap_docs = old_cap;
            free(keep_as);
            return err_set(e, "out of memory");
        }
    }
    int rc = 0;
    for (uint64_t d = 0; d < N && rc == 0; d++)   /* before old_src is squeezed below */
        if (keep_as[d] != d && p->o.log_removed &&
            add_removal(p, old_src[d], old_src[keep_as[d]], 1))
            rc = err_set(e, "out of memory");
    uint64_t w = 0, wd = 0;   /* in place: tokens and documents written so far */
    for (uint64_t d = 0; d < N && rc == 0; d++) {
        uint64_t a = old_off[d], n = old_off[d + 1] - a - 1;   /* without EOS */
        uint64_t src = old_src ? old_src[d] : d;
        if (keep_as[d] != d) {
            p->c.near_docs++;
            p->c.near_tokens += n;
            continue;
        }
        if (fim) {
            dsv3_err fe;
            const uint32_t *t = maybe_fim(p, old_tok + a, &n, old_flags[d], &fe);
            if (!t)
                rc = err_set(e, "document %" PRIu64 ": %s", src, fe.msg);
            else if (add_doc(p, t, n, old_flags[d], src))
                rc = err_set(e, "out of memory after %" PRIu64 " tokens", p->n_tok);
            continue;
        }
        memmove(old_tok + w, old_tok + a, (n + 1) * sizeof *old_tok);
        if (old_src)
            old_src[wd] = src;
        w += n + 1;
        old_off[++wd] = w;
    }
    if (fim) {
        free(old_tok);
        free(old_off);
        free(old_src);
        free(old_flags);
    } else {
        p->n_tok = w;
        p->n_docs = wd;
    }
    free(keep_as);
    p->c.docs = p->n_docs;
    p->c.tokens = p->n_tok;
    return rc;
}

/* ---- packing ----
 * Greedy: the corpus is one stream S of T tokens; record k is S[kL .. kL+L+1), so
 * consecutive records share one token (llm.c's and Megatron's layout: every token but the
 * first is a target exactly once). Only the last record is padded.
 * Best-fit: documents longer than L+1 are cut into L+1-token slices first; the remaining
 * pieces go, longest first, into the open record whose free space fits them most tightly
 * (Ding et al. 2024), and a record is padded only where no piece fitted. */

static uint64_t ceil_div(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }

static int plan_greedy(pack *p)
{
    uint64_t L = p->o.seq_len, T = p->n_tok;
    p->n_seq = T <= 1 ? 1 : ceil_div(T - 1, L);
    p->c.pad_tokens = p->n_seq * (L + 1) - (T + (p->n_seq - 1));
    /* The record that holds a token as new: position 0 in record 0, position i >= 1 in
     * record (i-1)/L. A document is split when its first and last tokens differ in that. */
    for (uint64_t d = 0; d < p->n_docs; d++) {
        uint64_t a = p->doc_off[d], b = p->doc_off[d + 1] - 1;
        uint64_t ra = a ? (a - 1) / L : 0, rb = b ? (b - 1) / L : 0;
        p->c.split_docs += ra != rb;
    }
    return 0;
}

static int plan_best_fit(pack *p)
{
    uint32_t C = p->o.seq_len + 1;  /* record capacity */
    uint64_t n_full = 0, n_rest = 0;
    for (uint64_t d = 0; d < p->n_docs; d++) {
        uint64_t n = p->doc_off[d + 1] - p->doc_off[d];
        n_full += n / C;
        n_rest += n % C != 0;
        p->c.split_docs += n > C;
    }
    uint64_t n_pieces = n_full + n_rest;
    piece *pc = malloc((n_pieces ? n_pieces : 1) * sizeof *pc);
    uint64_t *bin_of = malloc((n_pieces ? n_pieces : 1) * sizeof *bin_of);
    uint64_t *cnt = calloc((uint64_t)C + 2, sizeof *cnt);
    uint64_t *head = malloc(((uint64_t)C + 1) * sizeof *head);
    uint64_t *bitset = calloc((uint64_t)C / 64 + 2, sizeof *bitset);
    uint64_t *next = malloc((n_pieces ? n_pieces : 1) * sizeof *next);
    uint32_t *fill = malloc((n_pieces ? n_pieces : 1) * sizeof *fill);
    piece *sorted = malloc((n_pieces ? n_pieces : 1) * sizeof *sorted);
    int rc = -1;
    if (!pc || !bin_of || !cnt || !head || !bitset || !next || !fill || !sorted)
        goto out;

    /* Full slices first (each fills a record alone), then the rest by length, longest
     * first; the counting sort is stable, so ties keep corpus order and the plan is
     * deterministic. */
    uint64_t k = 0;
    for (uint64_t d = 0; d < p->n_docs; d++) {
        uint64_t a = p->doc_off[d], n = p->doc_off[d + 1] - a;
        for (uint64_t s = 0; s < n; s += C) {
            uint32_t len = (uint32_t)(n - s < C ? n - s : C);
            pc[k++] = (piece){a + s, len, s == 0};
            cnt[len]++;
        }
    }
    uint64_t pos = 0;
    for (uint64_t len = C; len >= 1; len--) {
        uint64_t c = cnt[len];
        cnt[len] = pos;
        pos += c;
    }
    for (uint64_t i = 0; i < n_pieces; i++)
        sorted[cnt[pc[i].len]++] = pc[i];

    /* Open records with free space r are a list through next[], headed by head[r]; bit r of
     * bitset says the list is not empty, so the tightest fit is the first set bit >= len. */
    uint64_t n_bins = 0;
    for (uint32_t r = 0; r <= C; r++)
        head[r] = UINT64_MAX;
    for (uint64_t i = 0; i < n_pieces; i++) {
        uint32_t len = sorted[i].len, r = UINT32_MAX;
        for (uint64_t w = len / 64; w <= (uint64_t)C / 64; w++) {
            uint64_t bits = bitset[w];
            if (w == len / 64)
                bits &= ~0ull << (len % 64);
            if (bits) {
                r = (uint32_t)(w * 64 + (uint64_t)__builtin_ctzll(bits));
                break;
            }
        }
        uint64_t b;
        if (r == UINT32_MAX || r > C) {
            b = n_bins++;
            fill[b] = 0;
        } else {
            b = head[r];
            head[r] = next[b];
            if (head[r] == UINT64_MAX)
                bitset[r / 64] &= ~(1ull << (r % 64));
        }
        fill[b] += len;
        bin_of[i] = b;
        uint32_t nr = C - fill[b];
        if (nr > 0) {
            next[b] = head[nr];
            head[nr] = b;
            bitset[nr / 64] |= 1ull << (nr % 64);
        }
    }
    if (n_bins == 0) {   /* no documents: unreachable, pack_write refuses an empty corpus */
        rc = 0;
        goto out;
    }

    /* Group pieces by record, in placement order. */
    p->bin_first = calloc(n_bins + 1, sizeof *p->bin_first);
    p->pieces = malloc(n_pieces * sizeof *p->pieces);
    if (!p->bin_first || !p->pieces)
        goto out;
    for (uint64_t i = 0; i < n_pieces; i++)
        p->bin_first[bin_of[i] + 1]++;
    for (uint64_t b = 0; b < n_bins; b++)
        p->bin_first[b + 1] += p->bin_first[b];
    uint64_t *at = next;   /* reuse: write cursor per record */
    for (uint64_t b = 0; b < n_bins; b++)
        at[b] = p->bin_first[b];
    for (uint64_t i = 0; i < n_pieces; i++)
        p->pieces[at[bin_of[i]]++] = sorted[i];
    p->n_seq = n_bins;
    for (uint64_t b = 0; b < n_bins; b++)
        p->c.pad_tokens += C - fill[b];
    rc = 0;
out:
    free(pc);
    free(bin_of);
    free(cnt);
    free(head);
    free(bitset);
    free(next);
    free(fill);
    free(sorted);
    return rc;
}

/* Record k of the plan into out[0..L+1); its boundary record (n_valid, then the offset of
 * every segment in it, PACK_BOUND_CONT on a segment that continues a document begun in an
 * earlier record) into bnd; returns the record flags. */
static uint32_t make_seq(const pack *p, uint64_t k, uint32_t *out, uint32_t *bnd,
                         uint64_t *n_bnd)
{
    uint64_t C = (uint64_t)p->o.seq_len + 1, n = 0, nb = 1;
    uint32_t flags = 0;
    if (!p->o.best_fit) {
        uint64_t start = k * p->o.seq_len;
        n = p->n_tok - start < C ? p->n_tok - start : C;
        memcpy(out, p->tok + start, n * sizeof *out);
        /* First document starting at or after `start`: binary search over doc_off. */
        uint64_t lo = 0, hi = p->n_docs;
        while (lo < hi) {
            uint64_t mid = lo + (hi - lo) / 2;
            if (p->doc_off[mid] < start)
                lo = mid + 1;
            else
                hi = mid;
        }
        if (lo >= p->n_docs || p->doc_off[lo] != start)
            bnd[nb++] = 0 | PACK_BOUND_CONT;   /* the record opens inside a document */
        for (uint64_t d = lo; d < p->n_docs && p->doc_off[d] < start + n; d++)
            bnd[nb++] = (uint32_t)(p->doc_off[d] - start);
        if (k > 0)
            flags |= PACK_SEQ_CONT;
    } else {
        for (uint64_t i = p->bin_first[k]; i < p->bin_first[k + 1]; i++) {
            const piece *q = &p->pieces[i];
            bnd[nb++] = (uint32_t)n | (q->doc_start ? 0 : PACK_BOUND_CONT);
            memcpy(out + n, p->tok + q->off, q->len * sizeof *out);
            n += q->len;
        }
    }
    for (uint64_t i = n; i < C; i++)
        out[i] = p->o.pad_id;
    bnd[0] = (uint32_t)n;
    *n_bnd = nb;
    return flags;
}

/* ---- the output folder ---- */

int pack_file_hash(const char *path, uint64_t *hash, uint64_t *size, dsv3_err *e)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return err_errno(e, "%s: cannot open", path);
    XXH3_state_t *st = XXH3_createState();
    static const size_t BUF = 1 << 20;
    char *buf = malloc(BUF);
    if (!st || !buf) {
        fclose(f);
        XXH3_freeState(st);
        free(buf);
        return err_set(e, "%s: out of memory", path);
    }
    XXH3_64bits_reset(st);
    uint64_t total = 0;
    size_t got;
    while ((got = fread(buf, 1, BUF, f)) > 0) {
        XXH3_64bits_update(st, buf, got);
        total += got;
    }
    int rc = ferror(f) ? err_errno(e, "%s: read failed", path) : 0;
    fclose(f);
    *hash = XXH3_64bits_digest(st);
    *size = total;
    XXH3_freeState(st);
    free(buf);
    return rc;
}

static char *path_join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *s = malloc(n);
    if (s)
        snprintf(s, n, "%s/%s", dir, name);
    return s;
}

/* Removes the temporary folder we made (and everything in it: only our files). */
static void remove_tmp_dir(const char *dir)
{
    outdir_remove_tree(dir);
}

static int fsync_path(const char *path)
{
    int fd = open(path, O_RDONLY | O_DIRECTORY);
    if (fd < 0)
        return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

static char *hex64(char buf[17], uint64_t v)
{
    snprintf(buf, 17, "%016" PRIx64, v);
    return buf;
}

/* Writes one shard of records perm[from..to) and its boundary shard; appends its entry. */
static int write_shard(const pack *p, const char *tmp, const char *split, uint64_t idx,
                       const uint64_t *perm, uint64_t from, uint64_t to, uint32_t *seq,
                       uint32_t *bnd, json_t *list, dsv3_err *e)
{
    char name[64], bname[64];
    snprintf(name, sizeof name, "%s-%05" PRIu64 ".shard", split, idx);
    snprintf(bname, sizeof bname, "%s-%05" PRIu64 ".bounds.shard", split, idx);
    char *path = path_join(tmp, name), *bpath = path_join(tmp, bname);
    uint64_t C = (uint64_t)p->o.seq_len + 1;
    int rc = -1;
    shard_writer *w = NULL, *bw = NULL;
    if (!path || !bpath) {
        err_set(e, "out of memory");
        goto out;
    }
    shard_params sp, bp;
    shard_params_default(&sp, SHARD_PACKED);
    sp.seq_len = (uint32_t)C;
    sp.vocab_size = p->vocab_size;
    sp.tokenizer_id = p->tokenizer_id;
    sp.level = p->o.level;
    /* Chunks of whole records, at least 8Ki tokens: the loader reads records in random order
     * and decompresses a whole chunk for each, so chunks stay near one record long. */
    sp.chunk_tokens = (uint32_t)(C * ceil_div(8192, C));
    if (sp.chunk_tokens > (1u << 28))
        sp.chunk_tokens = (uint32_t)C;
    shard_params_default(&bp, SHARD_DOCS);
    bp.tokenizer_id = p->tokenizer_id;
    bp.chunk_tokens = 16384;
    bp.level = p->o.level;
    if (shard_writer_open(&w, path, &sp, e) || shard_writer_open(&bw, bpath, &bp, e))
        goto out;
    for (uint64_t i = from; i < to; i++) {
        uint64_t nb;
        uint32_t flags = make_seq(p, perm[i], seq, bnd, &nb);
        if (shard_write_record(w, seq, C, flags, e) || shard_write_record(bw, bnd, nb, 0, e))
            goto out;
    }
    rc = shard_writer_close(w, e);
    w = NULL;
    if (rc == 0)
        rc = shard_writer_close(bw, e);
    bw = NULL;
    if (rc)
        goto out;
    uint64_t h, sz, bh, bsz;
    if (pack_file_hash(path, &h, &sz, e) || pack_file_hash(bpath, &bh, &bsz, e)) {
        rc = -1;
        goto out;
    }
    char hx[17], bhx[17];
    json_t *o = json_pack("{s:s, s:I, s:I, s:s, s:s, s:I, s:s}", "file", name, "sequences",
                          (json_int_t)(to - from), "bytes", (json_int_t)sz, "xxh3",
                          hex64(hx, h), "bounds", bname, "bounds_bytes", (json_int_t)bsz,
                          "bounds_xxh3", hex64(bhx, bh));
    if (!o || json_array_append_new(list, o)) {
        rc = err_set(e, "out of memory");
        goto out;
    }
out:
    if (w)
        shard_writer_abort(w);
    if (bw)
        shard_writer_abort(bw);
    free(path);
    free(bpath);
    return rc;
}

static int removal_cmp(const void *a, const void *b)
{
    const removal *x = a, *y = b;
    return x->doc < y->doc ? -1 : x->doc > y->doc;
}

/* removed.tsv: a header line, then one line per removed document in input order:
 * its input index, "exact" or "near", and for near the input index of the one kept. */
static int write_removed(pack *p, const char *tmp, dsv3_err *e)
{
    qsort(p->rm, p->n_rm, sizeof *p->rm, removal_cmp);
    char *path = path_join(tmp, "removed.tsv");
    outfile of;
    if (!path || outfile_open(&of, path, e)) {
        free(path);
        return path ? -1 : err_set(e, "out of memory");
    }
    free(path);
    fputs("document\treason\tkept\n", of.f);
    for (uint64_t i = 0; i < p->n_rm; i++) {
        if (p->rm[i].near)
            fprintf(of.f, "%" PRIu64 "\tnear\t%" PRIu64 "\n", p->rm[i].doc, p->rm[i].kept);
        else
            fprintf(of.f, "%" PRIu64 "\texact\t-\n", p->rm[i].doc);
    }
    if (ferror(of.f)) {
        outfile_abort(&of);
        return err_errno(e, "%s: cannot write removed.tsv", tmp);
    }
    return outfile_commit(&of, e);
}

static json_t *manifest_new(const pack *p, const char *argv_line)
{
    char hx[17];
    const pack_counts *c = &p->c;
    json_t *inputs = json_array();
    for (uint64_t i = 0; inputs && i < c->inputs; i++)
        json_array_append_new(inputs, json_string(p->inputs[i]));
    json_t *options = json_pack(
        "{s:s, s:I, s:I, s:I, s:b, s:I, s:f, s:I, s:s?}", "packing",
        p->o.best_fit ? "best-fit" : "greedy", "eos_id", (json_int_t)p->o.eos_id, "pad_id",
        (json_int_t)p->o.pad_id, "seed", (json_int_t)p->o.seed, "dedup", p->o.dedup,
        "shard_tokens", (json_int_t)p->o.shard_tokens, "val_fraction", p->o.val_fraction,
        "level", (json_int_t)p->o.level, "command", argv_line);
    json_t *counts = json_pack(
        "{s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I}", "input_documents",
        (json_int_t)c->input_docs, "input_tokens", (json_int_t)c->input_tokens,
        "duplicate_documents", (json_int_t)c->dup_docs, "duplicate_tokens",
        (json_int_t)c->dup_tokens, "documents", (json_int_t)c->docs, "tokens",
        (json_int_t)c->tokens, "sequences", (json_int_t)c->sequences, "train_sequences",
        (json_int_t)c->train_sequences, "val_sequences", (json_int_t)c->val_sequences,
        "pad_tokens", (json_int_t)c->pad_tokens, "split_documents", (json_int_t)c->split_docs,
        "dedup_table_bytes", (json_int_t)c->dedup_table_bytes);
    json_object_set_new(counts, "fim_psm_documents", json_integer((json_int_t)c->fim_psm));
    json_object_set_new(counts, "fim_spm_documents", json_integer((json_int_t)c->fim_spm));
    json_object_set_new(options, "fim_rate", json_real(p->o.fim_rate));
    json_object_set_new(options, "fim_spm_rate", json_real(p->o.fim_spm_rate));
    json_object_set_new(options, "fim_ids", json_pack("[I,I,I]", (json_int_t)p->o.fim_ids[0],
                        (json_int_t)p->o.fim_ids[1], (json_int_t)p->o.fim_ids[2]));
    json_object_set_new(options, "fim_code_only", json_boolean(p->o.fim_code_only));
    json_object_set_new(options, "fim_cuts", json_string(p->o.tok ? "characters" : "tokens"));
    json_object_set_new(options, "near_dedup",
                        p->near_on ? json_pack("{s:I, s:I, s:I, s:I}", "ngram",
                                               (json_int_t)p->o.near.ngram, "bands",
                                               (json_int_t)p->o.near.bands, "rows",
                                               (json_int_t)p->o.near.rows, "hash_seed",
                                               (json_int_t)p->o.near.seed)
                                   : json_false());
    const struct { const char *key; uint64_t v; } more[] = {
        {"fim_token_cut_documents", c->fim_token_cut}, {"near_duplicate_documents", c->near_docs},
        {"near_duplicate_tokens", c->near_tokens}, {"near_duplicate_clusters", c->near_clusters},
        {"near_candidate_pairs", c->near_pairs}, {"near_dedup_bytes", c->near_bytes}};
    for (size_t i = 0; i < sizeof more / sizeof *more; i++)
        json_object_set_new(counts, more[i].key, json_integer((json_int_t)more[i].v));
    if (p->o.log_removed)
        json_object_set_new(options, "removed_list", json_string("removed.tsv"));
    return json_pack("{s:s, s:i, s:s, s:s, s:I, s:I, s:I, s:b, s:o, s:o, s:o, s:[], s:[]}",
                     "format", "dsv3-pack", "version", 1, "dsv3", cli_version(),
                     "tokenizer_id", hex64(hx, p->tokenizer_id), "vocab_size",
                     (json_int_t)p->vocab_size, "seq_len", (json_int_t)p->o.seq_len,
                     "record_tokens", (json_int_t)p->o.seq_len + 1, "overlap", !p->o.best_fit,
                     "inputs", inputs, "options", options, "counts", counts, "train", "val");
}

int pack_write(pack *p, const char *outdir, const char *argv_line, dsv3_err *e)
{
    struct stat st;
    if (stat(outdir, &st) == 0)
        return err_set(e, "%s: already exists; dsv3-pack writes a new folder", outdir);
    if (p->o.near_dedup && !p->near_on && p->n_docs && near_dedup(p, e))
        return -1;
    p->near_on = p->o.near_dedup;   /* done: a second pack_write must not run it again */
    if (p->n_docs == 0)
        return err_set(e, "no documents in the input%s", p->c.input_docs ? " after dedup" : "");
    if ((p->o.best_fit ? plan_best_fit(p) : plan_greedy(p)) < 0)
        return err_set(e, "out of memory while packing %" PRIu64 " documents", p->n_docs);

    uint64_t N = p->n_seq, C = (uint64_t)p->o.seq_len + 1;
    uint64_t n_val = (uint64_t)(p->o.val_fraction * (double)N + 0.5);
    if (p->o.val_fraction > 0 && n_val == 0 && N >= 2)
        n_val = 1;   /* asked for a validation split: give it at least one record */
    if (n_val >= N && p->o.val_fraction > 0)
        n_val = N - 1;
    p->c.sequences = N;
    p->c.val_sequences = n_val;
    p->c.train_sequences = N - n_val;
    uint64_t per_shard = p->o.shard_tokens / C ? p->o.shard_tokens / C : 1;

    char *copy1 = strdup(outdir), *copy2 = strdup(outdir);
    uint64_t *perm = malloc(N * sizeof *perm);
    uint32_t *seq = malloc(C * sizeof *seq), *bnd = malloc((C + 1) * sizeof *bnd);
    char *tmp = NULL;
    json_t *man = NULL;
    int rc = -1, made_tmp = 0;
    if (!copy1 || !copy2 || !perm || !seq || !bnd) {
        err_set(e, "out of memory");
        goto out;
    }
    const char *parent = dirname(copy1), *base = basename(copy2);
    size_t tn = strlen(parent) + strlen(base) + 48;
    if (!(tmp = malloc(tn))) {
        err_set(e, "out of memory");
        goto out;
    }
    snprintf(tmp, tn, "%s/.%s.tmp.%ld", parent, base, (long)getpid());
    if (mkdir(tmp, 0777) != 0) {
        err_errno(e, "%s: cannot create temporary folder %s", outdir, tmp);
        goto out;
    }
    made_tmp = 1;
    pack_permutation(perm, N, p->o.seed);

    /* Shards are written first, so the manifest's counts below are final. */
    json_t *lists[2] = {json_array(), json_array()};
    const char *names[2] = {"train", "val"};
    uint64_t bounds[3] = {0, N - n_val, N};
    uint64_t *nshards[2] = {&p->c.train_shards, &p->c.val_shards};
    for (int s = 0; s < 2; s++) {
        for (uint64_t from = bounds[s], i = 0; from < bounds[s + 1]; from += per_shard, i++) {
            uint64_t to = from + per_shard < bounds[s + 1] ? from + per_shard : bounds[s + 1];
            if (write_shard(p, tmp, names[s], i, perm, from, to, seq, bnd, lists[s], e)) {
                json_decref(lists[0]);
                json_decref(lists[1]);
                goto out;
            }
            ++*nshards[s];
        }
    }
    if (p->o.log_removed && write_removed(p, tmp, e))
        goto out;
    man = manifest_new(p, argv_line);
    if (!man || json_object_set_new(man, "train", lists[0]) ||
        json_object_set_new(man, "val", lists[1])) {
        err_set(e, "out of memory");
        goto out;
    }
    char *mpath = path_join(tmp, "manifest.json");
    outfile of;
    if (!mpath || outfile_open(&of, mpath, e)) {
        free(mpath);
        goto out;
    }
    free(mpath);
    if (json_dumpf(man, of.f, JSON_INDENT(2) | JSON_PRESERVE_ORDER) != 0 || fputc('\n', of.f) == EOF) {
        err_errno(e, "%s: cannot write manifest.json", outdir);
        outfile_abort(&of);
        goto out;
    }
    if (outfile_commit(&of, e))
        goto out;
    if (fsync_path(tmp) != 0) {
        err_errno(e, "%s: cannot sync", tmp);
        goto out;
    }
    if (rename(tmp, outdir) != 0) {
        err_errno(e, "%s: cannot rename %s to it", outdir, tmp);
        goto out;
    }
    made_tmp = 0;
    fsync_path(parent);
    rc = 0;
out:
    if (made_tmp)
        remove_tmp_dir(tmp);
    json_decref(man);
    free(tmp);
    free(copy1);
    free(copy2);
    free(perm);
    free(seq);
    free(bnd);
    return rc;
}
