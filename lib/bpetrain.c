#include "bpetrain.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "pretok.h"

/* ---- distinct pre-tokens and their counts ---- */

typedef struct went {
    uint64_t h, count, off;
    uint32_t len;
} went;

typedef struct wmap {
    uint32_t *slot;   /* entry index + 1; 0 free */
    size_t mask;
    went *ent;
    size_t n, cap;
    uint8_t *arena;
    size_t alen, acap;
    uint64_t pruned;
} wmap;

static size_t wmap_bytes(const wmap *m)
{
    return (m->mask + 1) * sizeof *m->slot + m->cap * sizeof *m->ent + m->acap;
}

static void wmap_free(wmap *m)
{
    free(m->slot);
    free(m->ent);
    free(m->arena);
    memset(m, 0, sizeof *m);
}

static int wmap_rehash(wmap *m, size_t nslots)
{
    uint32_t *s = calloc(nslots, sizeof *s);
    if (!s)
        return -1;
    for (size_t i = 0; i < m->n; i++) {
        size_t j = m->ent[i].h & (nslots - 1);
        while (s[j])
            j = (j + 1) & (nslots - 1);
        s[j] = (uint32_t)i + 1;
    }
    free(m->slot);
    m->slot = s;
    m->mask = nslots - 1;
    return 0;
}

static int wmap_add(wmap *m, const uint8_t *s, size_t len, uint64_t h, uint64_t count)
{
    if (!m->slot && wmap_rehash(m, 1024))
        return -1;
    size_t j = h & m->mask;
    for (; m->slot[j]; j = (j + 1) & m->mask) {
        went *w = &m->ent[m->slot[j] - 1];
        if (w->h == h && w->len == len && memcmp(m->arena + w->off, s, len) == 0) {
            w->count += count;
            return 0;
        }
    }
    if (m->n == m->cap) {
        size_t nc = m->cap ? 2 * m->cap : 1024;
        went *q = realloc(m->ent, nc * sizeof *q);
        if (!q)
            return -1;
        m->ent = q;
        m->cap = nc;
    }
    if (m->acap - m->alen < len) {
        size_t nc = m->acap ? m->acap : 1 << 16;
        while (nc - m->alen < len)
            nc *= 2;
        uint8_t *q = realloc(m->arena, nc);
        if (!q)
            return -1;
        m->arena = q;
        m->acap = nc;
    }
    memcpy(m->arena + m->alen, s, len);
    m->ent[m->n] = (went){h, count, m->alen, (uint32_t)len};
    m->alen += len;
    m->slot[j] = (uint32_t)++m->n;
    if (2 * m->n > m->mask + 1)
        return wmap_rehash(m, 2 * (m->mask + 1));
    return 0;
}

/* Drops the rarest entries until at most target remain: everything seen once first, then
 * twice, and so on, so frequent pre-tokens survive whatever the order of the corpus. */
static int wmap_prune(wmap *m, size_t target)
{
    uint64_t t = 1;
    while (m->n > target) {
        size_t k = 0, alen = 0;
        for (size_t i = 0; i < m->n; i++) {
            went w = m->ent[i];
            if (w.count <= t) {
                m->pruned++;
                continue;
            }
            memmove(m->arena + alen, m->arena + w.off, w.len);
            w.off = alen;
            alen += w.len;
            m->ent[k++] = w;
        }
        m->n = k;
        m->alen = alen;
        t *= 2;
    }
    return wmap_rehash(m, m->mask + 1);
}

/* ---- the trainer ---- */

typedef struct worker {
    struct bpetrain *t;
    pretok_state *ps;
    wmap map;
    const uint8_t *const *docs;
    const size_t *lens;
    size_t from, to;
    int rc;
    dsv3_err err;
    uint64_t bytes;
} worker;

struct bpetrain {
    bpetrain_opts o;
    pretok *pt;
    worker *w;
    int nw;
    bpetrain_stats st;
    const uint8_t **seg;   /* the batch cut into segments for the workers */
    size_t *seglen;
    size_t nseg, cseg;
};

static uint64_t map_cap(const bpetrain *t)
{
    return t->o.max_words ? t->o.max_words : UINT64_MAX;
}

int bpetrain_new(bpetrain **out, const bpetrain_opts *o, dsv3_err *e)
{
    *out = NULL;
    bpetrain *t = calloc(1, sizeof *t);
    if (!t)
        return err_set(e, "train: out of memory");
    t->o = *o;
    t->nw = o->threads < 1 ? 1 : o->threads > 256 ? 256 : o->threads;
    t->w = calloc((size_t)t->nw, sizeof *t->w);
    if (!t->w || pretok_create(&t->pt, o->patterns, o->n_patterns, e)) {
        if (!t->w)
            err_set(e, "train: out of memory");
        bpetrain_free(t);
        return -1;
    }
    for (int i = 0; i < t->nw; i++) {
        t->w[i].t = t;
        if (pretok_state_new(&t->w[i].ps, t->pt, e)) {
            bpetrain_free(t);
            return -1;
        }
    }
    *out = t;
    return 0;
}

void bpetrain_free(bpetrain *t)
{
    if (!t)
        return;
    for (int i = 0; t->w && i < t->nw; i++) {
        pretok_state_free(t->w[i].ps);
        wmap_free(&t->w[i].map);
    }
    free(t->w);
    free(t->seg);
    free(t->seglen);
    pretok_free(t->pt);
    free(t);
}

const bpetrain_stats *bpetrain_get_stats(const bpetrain *t)
{
    return &t->st;
}

static void *count_main(void *arg)
{
    worker *w = arg;
    uint64_t cap = map_cap(w->t);
    for (size_t d = w->from; d < w->to && w->rc == 0; d++) {
        const uint8_t *text = w->docs[d];
        const size_t *ends;
        long np = pretok_split(w->ps, text, w->lens[d], &ends, &w->err);
        if (np < 0) {
            w->rc = -1;
            break;
        }
        size_t start = 0;
        for (long i = 0; i < np; i++) {
            size_t len = ends[i] - start;
            if (wmap_add(&w->map, text + start, len, XXH3_64bits(text + start, len), 1)) {
                w->rc = err_set(&w->err, "train: out of memory counting pre-tokens");
                break;
            }
            start = ends[i];
        }
        w->bytes += w->lens[d];
        if (w->map.n > cap && wmap_prune(&w->map, (size_t)(cap / 2)))
            w->rc = err_set(&w->err, "train: out of memory");
    }
    return NULL;
}

/* A document longer than this is counted in pieces cut after a line break, so one big file
 * keeps every thread busy. A pre-token never spans a line break followed by a letter under
 * the built-in patterns, which is where the cut goes when it can. */
enum { SEGMENT_BYTES = 4 << 20 };

static int add_segment(bpetrain *t, const uint8_t *p, size_t n)
{
    if (t->nseg == t->cseg) {
        size_t nc = t->cseg ? 2 * t->cseg : 1024;
        const uint8_t **q = realloc(t->seg, nc * sizeof *q);
        if (q)
            t->seg = q;
        size_t *l = q ? realloc(t->seglen, nc * sizeof *l) : NULL;
        if (l)
            t->seglen = l;
        if (!q || !l)
            return -1;
        t->cseg = nc;
    }
    t->seg[t->nseg] = p;
    t->seglen[t->nseg++] = n;
    return 0;
}

int bpetrain_count(bpetrain *t, const uint8_t *const *docs_in, const size_t *lens_in, size_t nd,
                   dsv3_err *e)
{
    t->nseg = 0;
    for (size_t i = 0; i < nd; i++) {
        const uint8_t *p = docs_in[i];
        size_t left = lens_in[i];
        while (left > SEGMENT_BYTES) {
            const uint8_t *nl = memchr(p + SEGMENT_BYTES, '\n', left - SEGMENT_BYTES);
            if (!nl)
                break;
            size_t cut = (size_t)(nl - p) + 1;
            while (cut < left && (p[cut] == '\n' || p[cut] == '\r'))
                cut++;
            size_t k = cut;   /* prefer a cut before a letter */
            while (k < left && k < cut + 4096 && !((p[k] | 32) >= 'a' && (p[k] | 32) <= 'z' &&
                                                    p[k - 1] == '\n'))
                k++;
            if (k < left && k < cut + 4096)
                cut = k;
            if (cut >= left)
                break;
            if (add_segment(t, p, cut))
                return err_set(e, "train: out of memory");
            p += cut;
            left -= cut;
        }
        if (add_segment(t, p, left))
            return err_set(e, "train: out of memory");
    }
    const uint8_t *const *docs = t->seg;
    const size_t *lens = t->seglen;
    size_t n = t->nseg;
    /* Contiguous slices balanced by bytes, so one long document does not idle the rest. */
    uint64_t total = 0, acc = 0;
    for (size_t i = 0; i < n; i++)
        total += lens[i];
    size_t d = 0;
    for (int k = 0; k < t->nw; k++) {
        worker *w = &t->w[k];
        w->docs = docs;
        w->lens = lens;
        w->from = d;
        uint64_t goal = total * (uint64_t)(k + 1) / (uint64_t)t->nw;
        while (d < n && (acc < goal || k == t->nw - 1))
            acc += lens[d++];
        w->to = d;
    }
    pthread_t tid[256];
    int live[256] = {0};
    for (int k = 1; k < t->nw && k < 256; k++)
        live[k] = t->w[k].from < t->w[k].to &&
                  pthread_create(&tid[k], NULL, count_main, &t->w[k]) == 0;
    for (int k = 1; k < t->nw && k < 256; k++)
        if (!live[k])
            count_main(&t->w[k]);   /* nothing to do, or no thread: run it here */
    count_main(&t->w[0]);
    for (int k = 1; k < t->nw && k < 256; k++)
        if (live[k])
            pthread_join(tid[k], NULL);
    size_t mem = 0;
    for (int k = 0; k < t->nw; k++) {
        if (t->w[k].rc) {
            if (e)
                *e = t->w[k].err;
            return -1;
        }
        mem += wmap_bytes(&t->w[k].map);
    }
    t->st.bytes = 0;
    for (int k = 0; k < t->nw; k++)
        t->st.bytes += t->w[k].bytes;
    if (mem > t->st.peak_bytes)
        t->st.peak_bytes = mem;
    return 0;
}

/* ---- merging ---- */

typedef struct pair {
    uint32_t l, r;
    int64_t count;
    uint32_t *where;   /* words holding the pair (may hold stale or repeated entries) */
    uint32_t nwhere, cwhere;
    uint32_t stamp;    /* last merge that touched it, to push it once */
} pair;

typedef struct word {
    uint64_t count;
    uint32_t off, len;   /* symbols sym[off .. off+len) */
} word;

struct hent;
typedef struct merger {
    pair *p;
    size_t np, cp;
    uint64_t *key;    /* pair map: (l << 32 | r) -> index in val */
    uint32_t *val;
    size_t mask;
    struct hent *heap;   /* max by (count, then lower l, then lower r) */
    size_t nh, ch;
    uint64_t where_total;
} merger;

/* Heap entries carry the count their pair had when pushed. Counts of pushed pairs only fall
 * (a merge creates pairs with the new token, which are pushed then, and removes others), so
 * the top is an upper bound: an entry whose count went stale is pushed again with its
 * current count, and an entry whose count is current is the best pair. */
typedef struct hent {
    int64_t count;
    uint32_t pi;
} hent;

static int ent_before(const merger *m, hent a, hent b)
{
    if (a.count != b.count)
        return a.count > b.count;
    const pair *x = &m->p[a.pi], *y = &m->p[b.pi];
    if (x->l != y->l)
        return x->l < y->l;
    return x->r < y->r;
}

static int heap_push(merger *m, uint32_t i)
{
    if (m->nh == m->ch) {
        size_t nc = m->ch ? 2 * m->ch : 4096;
        hent *q = realloc(m->heap, nc * sizeof *q);
        if (!q)
            return -1;
        m->heap = q;
        m->ch = nc;
    }
    hent x = {m->p[i].count, i};
    size_t k = m->nh++;
    while (k > 0) {
        size_t par = (k - 1) / 2;
        if (!ent_before(m, x, m->heap[par]))
            break;
        m->heap[k] = m->heap[par];
        k = par;
    }
    m->heap[k] = x;
    return 0;
}

static hent heap_pop(merger *m)
{
    hent top = m->heap[0], x = m->heap[--m->nh];
    size_t k = 0;
    for (;;) {
        size_t c = 2 * k + 1;
        if (c >= m->nh)
            break;
        if (c + 1 < m->nh && ent_before(m, m->heap[c + 1], m->heap[c]))
            c++;
        if (!ent_before(m, m->heap[c], x))
            break;
        m->heap[k] = m->heap[c];
        k = c;
    }
    m->heap[k] = x;
    return top;
}

static inline size_t mixk(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    return (size_t)k;
}

static int map_grow(merger *m)
{
    size_t ns = m->mask ? 2 * (m->mask + 1) : 1 << 16;
    uint64_t *k = malloc(ns * sizeof *k);
    uint32_t *v = malloc(ns * sizeof *v);
    if (!k || !v) {
        free(k);
        free(v);
        return -1;
    }
    memset(k, 0xff, ns * sizeof *k);
    for (size_t i = 0; i < m->np; i++) {
        uint64_t key = (uint64_t)m->p[i].l << 32 | m->p[i].r;
        size_t j = mixk(key) & (ns - 1);
        while (k[j] != UINT64_MAX)
            j = (j + 1) & (ns - 1);
        k[j] = key;
        v[j] = (uint32_t)i;
    }
    free(m->key);
    free(m->val);
    m->key = k;
    m->val = v;
    m->mask = ns - 1;
    return 0;
}

/* The index of pair (l, r), created with count 0 if new; UINT32_MAX when out of memory. */
static uint32_t pair_get(merger *m, uint32_t l, uint32_t r)
{
    if ((m->np + 1) * 2 > m->mask + 1 && map_grow(m))
        return UINT32_MAX;
    uint64_t key = (uint64_t)l << 32 | r;
    size_t j = mixk(key) & m->mask;
    for (; m->key[j] != UINT64_MAX; j = (j + 1) & m->mask)
        if (m->key[j] == key)
            return m->val[j];
    if (m->np == m->cp) {
        size_t nc = m->cp ? 2 * m->cp : 1 << 16;
        pair *q = realloc(m->p, nc * sizeof *q);
        if (!q)
            return UINT32_MAX;
        m->p = q;
        m->cp = nc;
    }
    m->p[m->np] = (pair){l, r, 0, NULL, 0, 0, 0};
    m->key[j] = key;
    m->val[j] = (uint32_t)m->np;
    return (uint32_t)m->np++;
}

static int pair_where(merger *m, uint32_t pi, uint32_t w)
{
    pair *p = &m->p[pi];
    if (p->nwhere && p->where[p->nwhere - 1] == w)
        return 0;
    if (p->nwhere == p->cwhere) {
        uint32_t nc = p->cwhere ? 2 * p->cwhere : 4;
        uint32_t *q = realloc(p->where, nc * sizeof *q);
        if (!q)
            return -1;
        p->where = q;
        m->where_total += nc - p->cwhere;
        p->cwhere = nc;
    }
    p->where[p->nwhere++] = w;
    return 0;
}

static void merger_free(merger *m)
{
    for (size_t i = 0; i < m->np; i++)
        free(m->p[i].where);
    free(m->p);
    free(m->key);
    free(m->val);
    free(m->heap);
}

static size_t merger_bytes(const merger *m)
{
    return m->cp * sizeof *m->p + (m->mask + 1) * 12 + m->ch * 16 + m->where_total * 4;
}

int bpetrain_finish(bpetrain *t, bpe **out, dsv3_err *e)
{
    *out = NULL;
    const bpetrain_opts *o = &t->o;
    int rc = -1;
    /* sum the workers' tables into the first */
    wmap *all = &t->w[0].map;
    uint64_t pruned = 0;
    for (int k = 1; k < t->nw; k++) {
        wmap *m = &t->w[k].map;
        pruned += m->pruned;
        for (size_t i = 0; i < m->n; i++)
            if (wmap_add(all, m->arena + m->ent[i].off, m->ent[i].len, m->ent[i].h,
                          m->ent[i].count))
                return err_set(e, "train: out of memory summing pre-token counts");
        wmap_free(m);
        if (all->n > map_cap(t) && wmap_prune(all, (size_t)map_cap(t)))
            return err_set(e, "train: out of memory");
    }
    if (all->n > map_cap(t) && wmap_prune(all, (size_t)map_cap(t)))
        return err_set(e, "train: out of memory");
    t->st.pruned = pruned + all->pruned;
    t->st.words = all->n;

    /* ids: lead specials, the 256 bytes in byte-level alphabet order (as HF's trainer and
     * DeepSeek-V3's vocabulary), the merges, the trail specials */
    uint32_t L = (uint32_t)o->n_lead, base = L + 256;
    uint32_t byte_id[256];
    {
        uint32_t next = L;
        for (uint32_t cp = 0; cp < 0x200; cp++) {
            int b = bpe_char_to_byte(cp);
            if (b >= 0)
                byte_id[b] = next++;
        }
    }
    uint32_t nmax = o->n_merges;
    uint32_t vocab = base + nmax + (uint32_t)o->n_trail;
    uint8_t *kind = calloc(vocab, 1);
    uint8_t **tok = calloc(vocab, sizeof *tok);
    uint32_t *len = calloc(vocab, sizeof *len);
    bpe_merge *merges = malloc(((size_t)nmax + 1) * sizeof *merges);
    word *words = malloc((all->n + 1) * sizeof *words);
    uint32_t *sym = malloc((all->alen + 1) * sizeof *sym);
    uint32_t *stamp_w = calloc(all->n + 1, sizeof *stamp_w);
    uint32_t *touched = NULL;
    size_t ntouched = 0, ctouched = 0;
    merger m = {0};
    if (!kind || !tok || !len || !merges || !words || !sym || !stamp_w)
        goto oom;
    for (int b = 0; b < 256; b++) {
        kind[byte_id[b]] = BPE_BYTE;
        len[byte_id[b]] = 1;
        if (!(tok[byte_id[b]] = malloc(1)))
            goto oom;
        tok[byte_id[b]][0] = (uint8_t)b;
    }
    uint32_t at = 0;
    for (size_t i = 0; i < all->n; i++) {
        words[i] = (word){all->ent[i].count, at, all->ent[i].len};
        for (uint32_t k = 0; k < all->ent[i].len; k++)
            sym[at++] = byte_id[all->arena[all->ent[i].off + k]];
    }
    wmap_free(all);   /* the words hold everything now */
    for (size_t w = 0; w < t->st.words; w++)
        for (uint32_t k = 0; k + 1 < words[w].len; k++) {
            uint32_t pi = pair_get(&m, sym[words[w].off + k], sym[words[w].off + k + 1]);
            if (pi == UINT32_MAX || pair_where(&m, pi, (uint32_t)w))
                goto oom;
            m.p[pi].count += (int64_t)words[w].count;
        }
    for (size_t i = 0; i < m.np; i++)
        if (heap_push(&m, (uint32_t)i))
            goto oom;
    {
        size_t mem = merger_bytes(&m) + (size_t)at * 4 + t->st.words * sizeof(word);
        if (mem > t->st.peak_bytes)
            t->st.peak_bytes = mem;
    }
    uint32_t done = 0;
    while (done < nmax && m.nh > 0) {
        hent top = heap_pop(&m);
        uint32_t pi = top.pi;
        pair *p = &m.p[pi];
        if (p->count != top.count) {
            if (p->count > 0 && heap_push(&m, pi))
                goto oom;
            continue;
        }
        if ((uint64_t)p->count < o->min_frequency)
            break;
        uint32_t z = base + done, l = p->l, r = p->r;
        kind[z] = BPE_MERGED;
        len[z] = len[l] + len[r];
        if (!(tok[z] = malloc(len[z])))
            goto oom;
        memcpy(tok[z], tok[l], len[l]);
        memcpy(tok[z] + len[l], tok[r], len[r]);
        merges[done] = (bpe_merge){l, r, z, done};
        done++;
        ntouched = 0;
        /* where may grow while we walk it (a word can hold (z, z)); index, don't cache */
        for (uint32_t k = 0; k < m.p[pi].nwhere; k++) {
            uint32_t w = m.p[pi].where[k];
            if (stamp_w[w] == done)
                continue;
            stamp_w[w] = done;
            word *wd = &words[w];
            uint32_t *s = sym + wd->off;
            int has = 0;
            for (uint32_t i = 0; i + 1 < wd->len; i++)
                if (s[i] == l && s[i + 1] == r) {
                    has = 1;
                    break;
                }
            if (!has)
                continue;
            int64_t c = (int64_t)wd->count;
            for (uint32_t i = 0; i + 1 < wd->len; i++) {
                uint32_t q = pair_get(&m, s[i], s[i + 1]);
                if (q == UINT32_MAX)
                    goto oom;
                m.p[q].count -= c;
            }
            uint32_t n2 = 0;
            for (uint32_t i = 0; i < wd->len; i++) {
                if (i + 1 < wd->len && s[i] == l && s[i + 1] == r) {
                    s[n2++] = z;
                    i++;
                } else {
                    s[n2++] = s[i];
                }
            }
            wd->len = n2;
            for (uint32_t i = 0; i + 1 < n2; i++) {
                uint32_t q = pair_get(&m, s[i], s[i + 1]);
                if (q == UINT32_MAX)
                    goto oom;
                m.p[q].count += c;
                if (s[i] == z || s[i + 1] == z) {
                    if (pair_where(&m, q, w))
                        goto oom;
                    if (m.p[q].stamp != done) {
                        m.p[q].stamp = done;
                        if (ntouched == ctouched) {
                            size_t nc = ctouched ? 2 * ctouched : 1024;
                            uint32_t *nt = realloc(touched, nc * sizeof *nt);
                            if (!nt)
                                goto oom;
                            touched = nt;
                            ctouched = nc;
                        }
                        touched[ntouched++] = q;
                    }
                }
            }
        }
        /* the merged pair is gone from every word: free its list */
        free(m.p[pi].where);
        m.where_total -= m.p[pi].cwhere;
        m.p[pi].where = NULL;
        m.p[pi].nwhere = m.p[pi].cwhere = 0;
        for (size_t i = 0; i < ntouched; i++)
            if (m.p[touched[i]].count > 0 && heap_push(&m, touched[i]))
                goto oom;
        if (o->on_merge && (done % 256 == 0 || done == nmax))
            o->on_merge(o->ctx, done);
        size_t mem = merger_bytes(&m) + (size_t)at * 4 + t->st.words * sizeof(word);
        if (mem > t->st.peak_bytes)
            t->st.peak_bytes = mem;
    }
    if (o->on_merge)
        o->on_merge(o->ctx, done);
    t->st.merges = done;
    t->st.pairs = m.np;
    /* learned fewer than asked (a small corpus): the trail specials move down */
    uint32_t nv = base + done + (uint32_t)o->n_trail;
    for (size_t i = 0; i < o->n_lead + o->n_trail; i++) {
        uint32_t id = i < o->n_lead ? (uint32_t)i : base + done + (uint32_t)(i - o->n_lead);
        const char *s = i < o->n_lead ? o->lead[i] : o->trail[i - o->n_lead];
        kind[id] = BPE_SPECIAL;
        len[id] = (uint32_t)strlen(s);
        if (!(tok[id] = malloc(len[id] + 1)))
            goto oom;
        memcpy(tok[id], s, len[id]);
    }
    bpe_spec spec = {
        .vocab_size = nv, .kind = kind, .tok = (const uint8_t *const *)tok, .len = len,
        .merges = merges, .n_merges = done, .patterns = o->patterns,
        .n_patterns = o->n_patterns, .flags = 0,
        .bos = o->bos < o->n_lead ? o->bos : BPE_NONE,
        .eos = o->eos < o->n_lead ? o->eos : BPE_NONE,
        .pad = o->pad < o->n_lead ? o->pad : BPE_NONE,
    };
    rc = bpe_build(out, &spec, e);
    goto out;
oom:
    err_set(e, "train: out of memory");
out:
    merger_free(&m);
    if (tok)
        for (uint32_t i = 0; i < vocab; i++)
            free(tok[i]);
    free(tok);
    free(kind);
    free(len);
    free(merges);
    free(words);
    free(sym);
    free(stamp_w);
    free(touched);
    return rc;
}
