#include "tokenc.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* A slot goes EMPTY -> READ (reader) -> BUSY -> DONE (an encoder) -> EMPTY (the sink).
 * Slot k of the input sits at ring position k % n_slot; the three cursors below move in
 * the same order, so the ring is the only hand-off and the sink sees slots in input order. */
enum { S_EMPTY, S_READ, S_BUSY, S_DONE };

typedef struct slot {
    int state;
    uint64_t seq;            /* position in the input, in slots */
    docin_batch *b;
    size_t n;                /* documents; 0 marks the end of the input (or a read error) */
    uint64_t first;          /* input index of its first record */
    int rc;                  /* a read or encode failure, reported by the sink in order */
    dsv3_err err;
    uint8_t *bad;            /* per document: a bad JSONL record */
    size_t *start, *count;   /* per document: its ids (or its line, with ids) */
    size_t cap;
    bpe_ids ids;
    bpe_bytes text;          /* with ids: the lines */
    /* with need_chain: documents written before this slot, known once every earlier slot
     * has counted its good records */
    size_t good;
    int counted;
    uint64_t base;
    uint64_t tokens;         /* in its good documents, BOS and EOS included */
} slot;

typedef struct tokenc {
    const bpe *bpe;
    docin *d;
    const tokenc_opts *o;
    int lines;               /* print ids (no shard) */
    int need_chain;          /* document numbers depend on bad records left out before */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    slot *s;
    size_t n_slot;
    uint64_t next_read, next_take, next_sink;
    uint64_t read_docs;
    uint64_t chain_next, chain_sum;
    int stop;
    double read, read_wait, encode, encode_wait;
} tokenc;

typedef struct worker {
    tokenc *t;
    bpe_encoder *enc;
    pthread_t tid;
    int started;
} worker;

static int grow_docs(slot *s, size_t n)
{
    if (n <= s->cap)
        return 0;
    size_t nc = s->cap ? s->cap : 256;
    while (nc < n)
        nc *= 2;
    size_t *a = realloc(s->start, nc * sizeof *a);
    if (a)
        s->start = a;
    size_t *c = a ? realloc(s->count, nc * sizeof *c) : NULL;
    if (c)
        s->count = c;
    uint8_t *bd = c ? realloc(s->bad, nc) : NULL;
    if (bd)
        s->bad = bd;
    if (!bd)
        return -1;
    s->cap = nc;
    return 0;
}

/* ---- the reader ---- */

static void *reader_main(void *arg)
{
    tokenc *t = arg;
    size_t max = t->o->batch_bytes ? t->o->batch_bytes : 256u << 10;
    pthread_mutex_lock(&t->mu);
    for (;;) {
        slot *s = &t->s[t->next_read % t->n_slot];
        double t0 = progress_now();
        while (!t->stop && s->state != S_EMPTY)
            pthread_cond_wait(&t->cv, &t->mu);
        double t1 = progress_now();
        t->read_wait += t1 - t0;
        if (t->stop)
            break;
        pthread_mutex_unlock(&t->mu);
        long n = docin_read(t->d, s->b, max, &s->err);
        s->rc = n < 0 ? -1 : 0;
        if (s->rc == 0 && n > 0 && grow_docs(s, (size_t)n))
            s->rc = err_set(&s->err, "encode: out of memory");
        s->n = n > 0 && s->rc == 0 ? (size_t)n : 0;
        s->first = t->read_docs;
        t->read_docs += s->n;
        pthread_mutex_lock(&t->mu);
        s->counted = 0;
        s->good = 0;
        t->read += progress_now() - t1;
        s->seq = t->next_read++;
        s->state = S_READ;
        pthread_cond_broadcast(&t->cv);
        if (s->n == 0)
            break;   /* the end, or an error the sink reports */
    }
    pthread_mutex_unlock(&t->mu);
    return NULL;
}

/* ---- the encoders ---- */

/* Decimal ids, a space between, a line break after: the --ids format. */
static int put_line(bpe_bytes *out, const uint32_t *bos, const uint32_t *ids, size_t n,
                    const uint32_t *eos)
{
    size_t need = (n + 2) * 11 + 1;
    if (out->cap - out->n < need) {
        size_t nc = out->cap ? out->cap : 1 << 16;
        while (nc - out->n < need)
            nc *= 2;
        uint8_t *q = realloc(out->v, nc);
        if (!q)
            return -1;
        out->v = q;
        out->cap = nc;
    }
    uint8_t *p = out->v + out->n, *p0 = p;
    for (size_t i = 0, k = n + (bos != NULL) + (eos != NULL); i < k; i++) {
        uint32_t v = bos && i == 0 ? *bos : eos && i == k - 1 ? *eos : ids[i - (bos != NULL)];
        char tmp[10];
        int m = 0;
        do
            tmp[m++] = (char)('0' + v % 10);
        while ((v /= 10) != 0);
        if (p != p0)
            *p++ = ' ';
        while (m > 0)
            *p++ = (uint8_t)tmp[--m];
    }
    *p++ = '\n';
    out->n += (size_t)(p - p0);
    return 0;
}

/* With need_chain: publishes the slot's count of good records, then waits for the number
 * of documents before it. Earlier slots were taken earlier and count before they wait, so
 * the wait always ends. */
static uint64_t chain_base(tokenc *t, slot *s)
{
    pthread_mutex_lock(&t->mu);
    s->counted = 1;
    for (;;) {
        slot *c = &t->s[t->chain_next % t->n_slot];
        if (c->seq != t->chain_next || !c->counted || c->state == S_EMPTY)
            break;
        c->base = t->chain_sum;
        t->chain_sum += c->good;
        t->chain_next++;
        pthread_cond_broadcast(&t->cv);
    }
    while (!t->stop && t->chain_next <= s->seq)
        pthread_cond_wait(&t->cv, &t->mu);
    uint64_t base = s->base;
    pthread_mutex_unlock(&t->mu);
    return base;
}

static int encode_slot(tokenc *t, bpe_encoder *enc, slot *s)
{
    const tokenc_opts *o = t->o;
    uint32_t bos = bpe_bos(t->bpe), eos = bpe_eos(t->bpe);
    const uint8_t *doc;
    size_t len;
    s->ids.n = 0;
    s->text.n = 0;
    s->tokens = 0;
    size_t good = 0;
    for (size_t i = 0; i < s->n; i++) {   /* JSONL records are parsed here */
        s->bad[i] = (uint8_t)docin_batch_doc(t->d, s->b, i, &doc, &len);
        good += !s->bad[i];
    }
    pthread_mutex_lock(&t->mu);   /* chain_base reads it under the lock */
    s->good = good;
    pthread_mutex_unlock(&t->mu);
    uint64_t index = t->need_chain ? chain_base(t, s) : s->first;
    for (size_t i = 0; i < s->n; i++) {
        s->count[i] = 0;
        s->start[i] = t->lines ? s->text.n : s->ids.n;
        if (s->bad[i])
            continue;
        docin_batch_doc(t->d, s->b, i, &doc, &len);
        bpe_encode_opts eo = o->enc;
        eo.seed = bpe_doc_seed(o->enc.seed, index++);
        if (t->lines)
            s->ids.n = 0;
        size_t before = s->ids.n;
        if (bpe_encode(enc, doc, len, &eo, &s->ids, &s->err))
            return -1;
        s->tokens += s->ids.n - before + (uint64_t)o->bos + (uint64_t)o->eos;
        if (t->lines) {
            if (put_line(&s->text, o->bos ? &bos : NULL, s->ids.v, s->ids.n,
                         o->eos ? &eos : NULL))
                return err_set(&s->err, "encode: out of memory");
            s->count[i] = s->text.n - s->start[i];
        } else {
            s->count[i] = s->ids.n - s->start[i];
        }
    }
    return 0;
}

static void *worker_main(void *arg)
{
    worker *wk = arg;
    tokenc *t = wk->t;
    pthread_mutex_lock(&t->mu);
    for (;;) {
        double t0 = progress_now();
        while (!t->stop && t->next_take == t->next_read)
            pthread_cond_wait(&t->cv, &t->mu);
        double t1 = progress_now();
        t->encode_wait += t1 - t0;
        if (t->stop)
            break;
        slot *s = &t->s[t->next_take++ % t->n_slot];
        s->state = S_BUSY;
        pthread_mutex_unlock(&t->mu);
        if (s->rc == 0 && s->n > 0 && encode_slot(t, wk->enc, s))
            s->rc = -1;
        if (s->n == 0 && t->need_chain)
            chain_base(t, s);   /* the end slot closes the chain */
        pthread_mutex_lock(&t->mu);
        t->encode += progress_now() - t1;
        s->state = S_DONE;
        pthread_cond_broadcast(&t->cv);
    }
    pthread_mutex_unlock(&t->mu);
    return NULL;
}

/* ---- the sink: the calling thread, in input order ---- */

static int sink_slot(tokenc *t, slot *s, shard_writer *w, FILE *ids, tokenc_stats *st,
                     dsv3_err *e)
{
    const tokenc_opts *o = t->o;
    uint32_t bos = bpe_bos(t->bpe), eos = bpe_eos(t->bpe);
    for (size_t i = 0; i < s->n; i++) {
        const uint8_t *doc;
        size_t len;
        if (docin_batch_doc(t->d, s->b, i, &doc, &len)) {
            if (docin_batch_bad(t->d, s->b, i, e))
                return -1;
            continue;
        }
        st->docs++;
        st->bytes += len;
        if (t->lines) {
            if (s->count[i] && fwrite(s->text.v + s->start[i], 1, s->count[i], ids) != s->count[i])
                return err_set(e, "<stdout>: write failed");
            continue;
        }
        if ((o->bos && shard_write(w, &bos, 1, e)) ||
            shard_write(w, s->ids.v + s->start[i], s->count[i], e) ||
            (o->eos && shard_write(w, &eos, 1, e)) || shard_end_record(w, 0, e))
            return -1;
    }
    st->tokens += s->tokens;
    return 0;
}

/* After a huge document a slot gives its memory back, so the ring stays small. */
static void trim_slot(slot *s, size_t keep)
{
    docin_batch_trim(s->b, keep);
    if (s->ids.cap * sizeof *s->ids.v > keep)
        bpe_ids_free(&s->ids);
    if (s->text.cap > 4 * keep)
        bpe_bytes_free(&s->text);
}

static void free_slots(tokenc *t)
{
    for (size_t i = 0; i < t->n_slot; i++) {
        docin_batch_free(t->s[i].b);
        free(t->s[i].bad);
        free(t->s[i].start);
        free(t->s[i].count);
        bpe_ids_free(&t->s[i].ids);
        bpe_bytes_free(&t->s[i].text);
    }
    free(t->s);
}

int tokenc_run(const bpe *b, docin *d, const tokenc_opts *o, shard_writer *w, FILE *ids,
               progress *pr, tokenc_stats *st, dsv3_err *e)
{
    tokenc t = {.bpe = b, .d = d, .o = o, .lines = w == NULL};
    t.need_chain = o->skip_bad && o->enc.split_combined > 0;
    int nw = o->threads < 1 ? 1 : o->threads > 256 ? 256 : o->threads;
    size_t keep = 4 * (o->batch_bytes ? o->batch_bytes : 256u << 10);
    memset(st, 0, sizeof *st);
    double t0 = progress_now();
    t.n_slot = 2 * (size_t)nw + 2;
    t.s = calloc(t.n_slot, sizeof *t.s);
    worker *wk = calloc((size_t)nw, sizeof *wk);
    int rc = !t.s || !wk ? err_set(e, "encode: out of memory") : 0;
    for (size_t i = 0; rc == 0 && i < t.n_slot; i++)
        if (!(t.s[i].b = docin_batch_new()))
            rc = err_set(e, "encode: out of memory");
    for (int i = 0; rc == 0 && i < nw; i++) {
        wk[i].t = &t;
        rc = bpe_encoder_new(&wk[i].enc, b, e);
    }
    if (rc) {
        if (wk)
            for (int i = 0; i < nw; i++)
                bpe_encoder_free(wk[i].enc);
        free(wk);
        if (t.s)
            free_slots(&t);
        return -1;
    }
    pthread_mutex_init(&t.mu, NULL);
    pthread_cond_init(&t.cv, NULL);
    pthread_t rt;
    int reader = pthread_create(&rt, NULL, reader_main, &t) == 0;
    if (!reader)
        rc = err_set(e, "encode: cannot start the reader thread");
    for (int i = 0; rc == 0 && i < nw; i++)
        wk[i].started = pthread_create(&wk[i].tid, NULL, worker_main, &wk[i]) == 0;
    if (rc == 0 && !wk[0].started)
        rc = err_set(e, "encode: cannot start an encoder thread");
    while (rc == 0) {
        slot *s = &t.s[t.next_sink % t.n_slot];
        double t1 = progress_now();
        pthread_mutex_lock(&t.mu);
        while (s->state != S_DONE || s->seq != t.next_sink)
            pthread_cond_wait(&t.cv, &t.mu);
        pthread_mutex_unlock(&t.mu);
        double t2 = progress_now();
        st->sink_wait += t2 - t1;
        if (s->rc) {
            *e = s->err;
            rc = -1;
            break;
        }
        if (s->n == 0)
            break;
        rc = sink_slot(&t, s, w, ids, st, e);
        trim_slot(s, keep);
        st->sink += progress_now() - t2;
        pthread_mutex_lock(&t.mu);
        s->state = S_EMPTY;
        t.next_sink++;
        pthread_cond_broadcast(&t.cv);
        pthread_mutex_unlock(&t.mu);
        if (pr)
            progress_update(pr, st->bytes);
    }
    pthread_mutex_lock(&t.mu);
    t.stop = 1;
    pthread_cond_broadcast(&t.cv);
    pthread_mutex_unlock(&t.mu);
    if (reader)
        pthread_join(rt, NULL);
    for (int i = 0; i < nw; i++) {
        if (wk[i].started)
            pthread_join(wk[i].tid, NULL);
        bpe_encoder_free(wk[i].enc);
    }
    free(wk);
    free_slots(&t);
    pthread_mutex_destroy(&t.mu);
    pthread_cond_destroy(&t.cv);
    st->read = t.read;
    st->read_wait = t.read_wait;
    st->encode = t.encode;
    st->encode_wait = t.encode_wait;
    st->wall = progress_now() - t0;
    return rc;
}
