#include "shard.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/stat.h>
#include <xxhash.h>
#include <zstd.h>

#include "outfile.h"

/* ---- the byte layout (docs/formats.md is the specification; keep the two in step) ---- */

static const char FILE_MAGIC[8] = {'D', 'S', 'V', '3', 'S', 'H', 'R', 'D'};
static const char FOOTER_MAGIC[8] = {'D', 'S', 'V', '3', 'E', 'N', 'D', '\n'};
#define CHUNK_MAGIC 0x43565344u /* "DSVC" little-endian */
#define INDEX_MAGIC 0x49565344u /* "DSVI" */

enum {
    HEADER_BYTES = 80,
    CHUNK_HEADER_BYTES = 64,
    INDEX_HEAD_BYTES = 32,
    INDEX_ENTRY_BYTES = 24,
    FOOTER_BYTES = 32,
};

enum { HEADER_COUNTS = 1u << 0 };       /* file header flags */
enum { CHUNK_SHUFFLED = 1u << 0 };      /* chunk header flags */

/* Bounds that keep a damaged or hostile header from asking for absurd allocations. */
#define MAX_CHUNK_TOKENS (1u << 28)
#define MAX_CHUNK_ENDS (1u << 28)

/* Checksums stop a fuzzer at the first hash; the fuzz build (tests/fuzz/run.sh) compares
 * none, so it can reach the parser behind them. Never defined in a real build. */
static int hash_ok(uint64_t stored, uint64_t computed)
{
#ifdef FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION
    (void)stored;
    (void)computed;
    return 1;
#else
    return stored == computed;
#endif
}

static void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get64(const uint8_t *p)
{
    return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

static int host_is_little_endian(void)
{
    const uint16_t one = 1;
    return *(const uint8_t *)&one == 1;
}

/* Tokens travel little-endian; on a little-endian host this is a copy. */
static void tokens_to_le(uint8_t *dst, const uint32_t *src, size_t n)
{
    if (host_is_little_endian()) {
        memcpy(dst, src, n * 4);
        return;
    }
    for (size_t i = 0; i < n; i++)
        put32(dst + 4 * i, src[i]);
}

static void tokens_from_le(uint32_t *dst, const uint8_t *src, size_t n)
{
    if (host_is_little_endian()) {
        memcpy(dst, src, n * 4);
        return;
    }
    for (size_t i = 0; i < n; i++)
        dst[i] = get32(src + 4 * i);
}

/* Byte-plane shuffle: all low bytes, then all second bytes, ... Token ids below 2^17 leave
 * the high planes nearly constant, which zstd then compresses better and faster. Both
 * directions work on values, so they are the same on any host byte order, and each is one
 * pass that the compiler vectorises. */
static void shuffle_tokens(uint8_t *dst, const uint32_t *t, size_t n)
{
    uint8_t *p0 = dst, *p1 = dst + n, *p2 = dst + 2 * n, *p3 = dst + 3 * n;
    for (size_t i = 0; i < n; i++) {
        uint32_t v = t[i];
        p0[i] = (uint8_t)v;
        p1[i] = (uint8_t)(v >> 8);
        p2[i] = (uint8_t)(v >> 16);
        p3[i] = (uint8_t)(v >> 24);
    }
}

static void unshuffle_tokens(uint32_t *t, const uint8_t *src, size_t n)
{
    const uint8_t *p0 = src, *p1 = src + n, *p2 = src + 2 * n, *p3 = src + 3 * n;
    for (size_t i = 0; i < n; i++)
        t[i] = (uint32_t)p0[i] | (uint32_t)p1[i] << 8 | (uint32_t)p2[i] << 16 |
               (uint32_t)p3[i] << 24;
}

static uint32_t max_token(const uint32_t *t, size_t n)
{
    uint32_t m = 0;
    for (size_t i = 0; i < n; i++)
        m = t[i] > m ? t[i] : m;
    return m;
}

const char *shard_kind_name(shard_kind k)
{
    switch (k) {
    case SHARD_DOCS:
        return "documents";
    case SHARD_PACKED:
        return "packed";
    }
    return "unknown";
}

void shard_params_default(shard_params *p, shard_kind kind)
{
    memset(p, 0, sizeof *p);
    p->kind = kind;
    p->chunk_tokens = 1u << 20;
    p->level = 3;
    /* Off: on real BPE output the unshuffled bytes compress better (3.72x against 3.47x at
     * level 3) and both directions run faster (docs/PERF.md); the plane shuffle only wins on
     * ids without repeated n-grams (Zipf-random: 25% smaller). */
    p->shuffle = 0;
}

/* ======================================================================== writer ==== */

/* With p->threads > 0 a full chunk goes to a ring of slots that compressor threads take in
 * order; each compresses its chunk alone, as the caller's thread would (a chunk is its own
 * zstd frame), and the chunks reach the file in order, so the bytes do not depend on the
 * thread count. Whichever thread finishes the chunk that is next to be written writes it,
 * and any finished ones after it. */
enum { SLOT_FREE, SLOT_QUEUED, SLOT_BUSY, SLOT_DONE };

typedef struct chunk_slot {
    int state;
    uint32_t *tok, *ends;      /* the chunk, handed over by the filling side */
    uint32_t n_tok, n_ends;
    size_t cap_ends;
    uint64_t first_record, first_token;
    uint8_t head[CHUNK_HEADER_BYTES];
    uint8_t *zbuf;             /* the compressed payload, until written */
    size_t zcap, z;
} chunk_slot;

typedef struct compressor {
    struct shard_writer *w;
    pthread_t tid;
    int started;
} compressor;

struct shard_writer {
    outfile out;
    shard_params p;
    uint64_t pos;              /* bytes written so far */
    uint64_t n_records, n_tokens;
    uint64_t record_tokens;    /* tokens of the record being written */
    /* the chunk being filled */
    uint32_t *tok;
    uint32_t n_tok;
    uint32_t *ends;            /* pairs (end offset in chunk, flags) */
    uint32_t n_ends;
    size_t cap_ends;
    uint64_t chunk_first_record, chunk_first_token;
    /* scratch (the caller's thread compresses when p.threads == 0) */
    uint8_t *raw, *zbuf;
    size_t raw_cap, zcap;
    ZSTD_CCtx *cctx;
    shard_chunk_entry *index;
    uint64_t n_index;
    size_t cap_index;
    int failed;
    /* p.threads > 0: the compressors and the ring of chunks between them and the file */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    compressor *comp;
    int n_comp;
    chunk_slot *slot;
    size_t n_slot;
    uint64_t next_queue, next_take, next_write;   /* chunk sequence numbers */
    int writing, quit, broken, sync_ready;
    dsv3_err async_err;        /* the first failure of a compressor (broken) */
    double compress_s;         /* thread-seconds spent compressing (under mu with threads) */
};

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int write_bytes(shard_writer *w, const void *p, size_t n, dsv3_err *e)
{
    if (n && fwrite(p, 1, n, w->out.f) != n)
        return err_errno(e, "%s: write failed at offset %" PRIu64, outfile_name(&w->out), w->pos);
    w->pos += n;
    return 0;
}

static void encode_header(uint8_t h[HEADER_BYTES], const shard_params *p, int counts,
                          uint64_t n_records, uint64_t n_tokens)
{
    memset(h, 0, HEADER_BYTES);
    memcpy(h, FILE_MAGIC, 8);
    put32(h + 8, SHARD_VERSION);
    put32(h + 12, (uint32_t)p->kind);
    put32(h + 16, 4);
    put32(h + 20, p->seq_len);
    put32(h + 24, p->vocab_size);
    put32(h + 28, p->chunk_tokens);
    put32(h + 32, counts ? HEADER_COUNTS : 0);
    put64(h + 40, p->tokenizer_id);
    put64(h + 48, counts ? n_records : 0);
    put64(h + 56, counts ? n_tokens : 0);
    put64(h + 72, XXH3_64bits(h, 72));
}

static int grow(void **buf, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return 0;
    size_t n = *cap ? *cap : 16;
    while (n < need)
        n *= 2;
    void *q = realloc(*buf, n * elem);
    if (!q)
        return -1;
    *buf = q;
    *cap = n;
    return 0;
}

static int check_params(const shard_params *p, const char *path, dsv3_err *e)
{
    if (p->kind != SHARD_DOCS && p->kind != SHARD_PACKED)
        return err_set(e, "%s: unknown shard kind %d", path, (int)p->kind);
    if (p->kind == SHARD_PACKED && p->seq_len == 0)
        return err_set(e, "%s: a packed shard needs a sequence length", path);
    if (p->kind == SHARD_DOCS && p->seq_len != 0)
        return err_set(e, "%s: a document shard has no sequence length", path);
    if (p->chunk_tokens == 0 || p->chunk_tokens > MAX_CHUNK_TOKENS)
        return err_set(e, "%s: chunk size %u tokens is out of range [1, %u]", path,
                       p->chunk_tokens, MAX_CHUNK_TOKENS);
    if (p->level < ZSTD_minCLevel() || p->level > ZSTD_maxCLevel())
        return err_set(e, "%s: zstd level %d is out of range [%d, %d]", path, p->level,
                       ZSTD_minCLevel(), ZSTD_maxCLevel());
    if (p->threads < 0 || p->threads > 256)
        return err_set(e, "%s: %d compression threads is out of range [0, 256]", path,
                       p->threads);
    return 0;
}

static ZSTD_CCtx *new_cctx(int level)
{
    ZSTD_CCtx *c = ZSTD_createCCtx();
    if (c) {
        ZSTD_CCtx_setParameter(c, ZSTD_c_compressionLevel, level);
        ZSTD_CCtx_setParameter(c, ZSTD_c_checksumFlag, 1);
    }
    return c;
}

/* Compresses one chunk: its header into head, its payload into *zbuf (*z bytes). Touches
 * nothing of the writer but the parameters, so any thread may run it. */
static int compress_chunk(const shard_params *p, ZSTD_CCtx *cctx, const uint32_t *tok,
                          uint32_t n_tok, const uint32_t *ends, uint32_t n_ends,
                          uint64_t first_record, uint64_t first_token, uint8_t **raw,
                          size_t *raw_cap, uint8_t **zbuf, size_t *zcap,
                          uint8_t head[CHUNK_HEADER_BYTES], size_t *z, const char *name,
                          dsv3_err *e)
{
    size_t tok_bytes = (size_t)n_tok * 4, raw_bytes = tok_bytes + (size_t)n_ends * 8;
    if (grow((void **)raw, raw_cap, raw_bytes, 1) ||
        grow((void **)zbuf, zcap, ZSTD_compressBound(raw_bytes), 1))
        return err_set(e, "%s: out of memory", name);
    if (p->shuffle)
        shuffle_tokens(*raw, tok, n_tok);
    else
        tokens_to_le(*raw, tok, n_tok);
    for (uint32_t i = 0; i < 2 * n_ends; i++)
        put32(*raw + tok_bytes + 4 * (size_t)i, ends[i]);
    *z = ZSTD_compress2(cctx, *zbuf, *zcap, *raw, raw_bytes);
    if (ZSTD_isError(*z))
        return err_set(e, "%s: zstd: %s", name, ZSTD_getErrorName(*z));
    memset(head, 0, CHUNK_HEADER_BYTES);
    put32(head, CHUNK_MAGIC);
    put32(head + 4, p->shuffle ? CHUNK_SHUFFLED : 0);
    put32(head + 8, n_tok);
    put32(head + 12, n_ends);
    put32(head + 16, (uint32_t)raw_bytes);
    put32(head + 20, (uint32_t)*z);
    put64(head + 24, first_record);
    put64(head + 32, first_token);
    put64(head + 40, XXH3_64bits(*zbuf, *z));
    put64(head + 56, XXH3_64bits(head, 56));
    return 0;
}

/* Appends a compressed chunk at the current offset and indexes it. One thread at a time. */
static int append_chunk(shard_writer *w, const uint8_t head[CHUNK_HEADER_BYTES],
                        const uint8_t *zbuf, size_t z, uint64_t first_record,
                        uint64_t first_token, dsv3_err *e)
{
    if (grow((void **)&w->index, &w->cap_index, w->n_index + 1, sizeof *w->index))
        return err_set(e, "%s: out of memory", outfile_name(&w->out));
    w->index[w->n_index++] = (shard_chunk_entry){w->pos, first_record, first_token};
    return write_bytes(w, head, CHUNK_HEADER_BYTES, e) || write_bytes(w, zbuf, z, e) ? -1 : 0;
}

/* ---- the compressor threads ---- */

static void fail_async(shard_writer *w, const dsv3_err *e)   /* with w->mu held */
{
    if (!w->broken)
        w->async_err = *e;
    w->broken = 1;
    pthread_cond_broadcast(&w->cv);
}

/* With w->mu held: writes the finished chunks that are next in order, unless another
 * thread is already doing so. The lock is dropped around the writes. */
static void write_ready(shard_writer *w)
{
    while (!w->writing && !w->broken && w->next_write < w->next_take) {
        chunk_slot *s = &w->slot[w->next_write % w->n_slot];
        if (s->state != SLOT_DONE)
            break;
        w->writing = 1;
        pthread_mutex_unlock(&w->mu);
        dsv3_err e;
        int rc = append_chunk(w, s->head, s->zbuf, s->z, s->first_record, s->first_token, &e);
        pthread_mutex_lock(&w->mu);
        w->writing = 0;
        if (rc) {
            fail_async(w, &e);
            break;
        }
        s->state = SLOT_FREE;
        w->next_write++;
        pthread_cond_broadcast(&w->cv);
    }
}

static void *compressor_main(void *arg)
{
    compressor *c = arg;
    shard_writer *w = c->w;
    ZSTD_CCtx *cctx = new_cctx(w->p.level);
    uint8_t *raw = NULL;
    size_t raw_cap = 0;
    pthread_mutex_lock(&w->mu);
    if (!cctx) {
        dsv3_err e;
        err_set(&e, "%s: out of memory", outfile_name(&w->out));
        fail_async(w, &e);
    }
    for (;;) {
        while (!w->quit && !w->broken && w->next_take == w->next_queue)
            pthread_cond_wait(&w->cv, &w->mu);
        if (w->quit || w->broken)
            break;
        chunk_slot *s = &w->slot[w->next_take++ % w->n_slot];
        s->state = SLOT_BUSY;
        pthread_mutex_unlock(&w->mu);
        dsv3_err e;
        double t0 = now_s();
        int rc = compress_chunk(&w->p, cctx, s->tok, s->n_tok, s->ends, s->n_ends,
                                s->first_record, s->first_token, &raw, &raw_cap, &s->zbuf,
                                &s->zcap, s->head, &s->z, outfile_name(&w->out), &e);
        double t1 = now_s();
        pthread_mutex_lock(&w->mu);
        w->compress_s += t1 - t0;
        if (rc) {
            fail_async(w, &e);
            break;
        }
        s->state = SLOT_DONE;
        write_ready(w);
    }
    pthread_mutex_unlock(&w->mu);
    ZSTD_freeCCtx(cctx);
    free(raw);
    return NULL;
}

/* Stops and joins the compressors (after close has drained them, or to abort). */
static void stop_compressors(shard_writer *w)
{
    if (!w->comp || !w->sync_ready)
        return;
    pthread_mutex_lock(&w->mu);
    w->quit = 1;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    for (int i = 0; i < w->n_comp; i++)
        if (w->comp[i].started)
            pthread_join(w->comp[i].tid, NULL);
    free(w->comp);
    w->comp = NULL;
}

static int start_compressors(shard_writer *w, const char *path, dsv3_err *e)
{
    w->n_comp = w->p.threads;
    w->n_slot = (size_t)w->n_comp + 2;   /* one per compressor, one done, one queued */
    w->slot = calloc(w->n_slot, sizeof *w->slot);
    w->comp = calloc((size_t)w->n_comp, sizeof *w->comp);
    if (!w->slot || !w->comp || pthread_mutex_init(&w->mu, NULL) != 0)
        return err_set(e, "%s: out of memory", path);
    if (pthread_cond_init(&w->cv, NULL) != 0) {
        pthread_mutex_destroy(&w->mu);
        return err_set(e, "%s: out of memory", path);
    }
    w->sync_ready = 1;
    for (int i = 0; i < w->n_comp; i++) {
        w->comp[i].w = w;
        if (pthread_create(&w->comp[i].tid, NULL, compressor_main, &w->comp[i]) != 0)
            return err_set(e, "%s: cannot start a compression thread", path);
        w->comp[i].started = 1;
    }
    return 0;
}

/* Hands the filled chunk to the compressors: it swaps buffers with a free slot. */
static int queue_chunk(shard_writer *w, dsv3_err *e)
{
    pthread_mutex_lock(&w->mu);
    chunk_slot *s = &w->slot[w->next_queue % w->n_slot];
    while (!w->broken && s->state != SLOT_FREE)
        pthread_cond_wait(&w->cv, &w->mu);
    if (w->broken) {
        *e = w->async_err;
        pthread_mutex_unlock(&w->mu);
        return -1;
    }
    pthread_mutex_unlock(&w->mu);
    if (!s->tok && !(s->tok = malloc((size_t)w->p.chunk_tokens * sizeof *s->tok)))
        return err_set(e, "%s: out of memory", outfile_name(&w->out));
    uint32_t *t = s->tok, *en = s->ends;
    size_t ce = s->cap_ends;
    s->tok = w->tok, s->n_tok = w->n_tok;
    s->ends = w->ends, s->n_ends = w->n_ends, s->cap_ends = w->cap_ends;
    s->first_record = w->chunk_first_record;
    s->first_token = w->chunk_first_token;
    w->tok = t, w->ends = en, w->cap_ends = ce;
    pthread_mutex_lock(&w->mu);
    s->state = SLOT_QUEUED;
    w->next_queue++;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    return 0;
}

/* Waits until every queued chunk is in the file. */
static int drain(shard_writer *w, dsv3_err *e)
{
    if (!w->comp)
        return 0;
    pthread_mutex_lock(&w->mu);
    while (!w->broken && w->next_write < w->next_queue)
        pthread_cond_wait(&w->cv, &w->mu);
    int rc = w->broken ? -1 : 0;
    if (rc)
        *e = w->async_err;
    pthread_mutex_unlock(&w->mu);
    return rc;
}

static void writer_free(shard_writer *w)
{
    stop_compressors(w);
    free(w->comp);
    for (size_t i = 0; w->slot && i < w->n_slot; i++) {
        free(w->slot[i].tok);
        free(w->slot[i].ends);
        free(w->slot[i].zbuf);
    }
    free(w->slot);
    if (w->sync_ready) {
        pthread_mutex_destroy(&w->mu);
        pthread_cond_destroy(&w->cv);
    }
    free(w->tok);
    free(w->ends);
    free(w->raw);
    free(w->zbuf);
    free(w->index);
    ZSTD_freeCCtx(w->cctx);
    free(w);
}

int shard_writer_open(shard_writer **wp, const char *path, const shard_params *p, dsv3_err *e)
{
    *wp = NULL;
    if (check_params(p, path, e))
        return -1;
    shard_writer *w = calloc(1, sizeof *w);
    if (!w)
        return err_set(e, "%s: out of memory", path);
    w->p = *p;
    w->tok = malloc((size_t)p->chunk_tokens * sizeof *w->tok);
    w->cctx = p->threads > 0 ? NULL : new_cctx(p->level);
    if (!w->tok || (p->threads == 0 && !w->cctx)) {
        writer_free(w);
        return err_set(e, "%s: out of memory for a chunk of %u tokens", path, p->chunk_tokens);
    }
    if (outfile_open(&w->out, path, e)) {
        writer_free(w);
        return -1;
    }
    setvbuf(w->out.f, NULL, _IOFBF, 1 << 20);
    uint8_t h[HEADER_BYTES];
    encode_header(h, p, 0, 0, 0);
    if (write_bytes(w, h, sizeof h, e) || (p->threads > 0 && start_compressors(w, path, e))) {
        shard_writer_abort(w);
        return -1;
    }
    *wp = w;
    return 0;
}

static int flush_chunk(shard_writer *w, dsv3_err *e)
{
    const char *name = outfile_name(&w->out);
    if (w->n_tok == 0 && w->n_ends == 0)
        return 0;
    if (w->comp) {
        if (queue_chunk(w, e))
            return -1;
    } else {
        uint8_t h[CHUNK_HEADER_BYTES];
        size_t z;
        double t0 = now_s();
        int rc = compress_chunk(&w->p, w->cctx, w->tok, w->n_tok, w->ends, w->n_ends,
                           w->chunk_first_record, w->chunk_first_token, &w->raw, &w->raw_cap,
                           &w->zbuf, &w->zcap, h, &z, name, e);
        w->compress_s += now_s() - t0;
        if (rc || append_chunk(w, h, w->zbuf, z, w->chunk_first_record, w->chunk_first_token, e))
            return -1;
    }
    w->chunk_first_record = w->n_records;
    w->chunk_first_token = w->n_tokens;
    w->n_tok = 0;
    w->n_ends = 0;
    return 0;
}

int shard_write(shard_writer *w, const uint32_t *tokens, size_t n, dsv3_err *e)
{
    if (w->failed)
        return err_set(e, "%s: writer already failed", outfile_name(&w->out));
    if (w->p.vocab_size)
        for (size_t i = 0; i < n; i++)
            if (tokens[i] >= w->p.vocab_size) {
                w->failed = 1;
                return err_set(e, "%s: record %" PRIu64 ", token %" PRIu64 ": id %u is not below "
                               "the vocabulary size %u", outfile_name(&w->out), w->n_records,
                               w->record_tokens + i, tokens[i], w->p.vocab_size);
            }
    while (n > 0) {
        if (w->n_tok == w->p.chunk_tokens && flush_chunk(w, e)) {
            w->failed = 1;
            return -1;
        }
        uint32_t room = w->p.chunk_tokens - w->n_tok;
        uint32_t take = n < room ? (uint32_t)n : room;
        memcpy(w->tok + w->n_tok, tokens, (size_t)take * 4);
        w->n_tok += take;
        w->n_tokens += take;
        w->record_tokens += take;
        tokens += take;
        n -= take;
    }
    return 0;
}

int shard_end_record(shard_writer *w, uint32_t flags, dsv3_err *e)
{
    const char *name = outfile_name(&w->out);
    if (w->failed)
        return err_set(e, "%s: writer already failed", name);
    if (w->p.kind == SHARD_PACKED && w->record_tokens != w->p.seq_len) {
        w->failed = 1;
        return err_set(e, "%s: packed record %" PRIu64 " has %" PRIu64 " tokens, not the "
                       "sequence length %u", name, w->n_records, w->record_tokens, w->p.seq_len);
    }
    if (w->n_ends == MAX_CHUNK_ENDS && flush_chunk(w, e)) {
        w->failed = 1;
        return -1;
    }
    if (grow((void **)&w->ends, &w->cap_ends, 2 * ((size_t)w->n_ends + 1), 4)) {
        w->failed = 1;
        return err_set(e, "%s: out of memory", name);
    }
    w->ends[2 * w->n_ends] = w->n_tok;
    w->ends[2 * w->n_ends + 1] = flags;
    w->n_ends++;
    w->n_records++;
    w->record_tokens = 0;
    return 0;
}

int shard_write_record(shard_writer *w, const uint32_t *tokens, size_t n, uint32_t flags,
                       dsv3_err *e)
{
    if (shard_write(w, tokens, n, e))
        return -1;
    return shard_end_record(w, flags, e);
}

static int write_index_and_footer(shard_writer *w, dsv3_err *e)
{
    size_t n = (size_t)w->n_index, bytes = INDEX_HEAD_BYTES + n * INDEX_ENTRY_BYTES + 8;
    uint8_t *b = calloc(1, bytes);
    if (!b)
        return err_set(e, "%s: out of memory", outfile_name(&w->out));
    put32(b, INDEX_MAGIC);
    put64(b + 8, w->n_index);
    put64(b + 16, w->n_records);
    put64(b + 24, w->n_tokens);
    for (size_t i = 0; i < n; i++) {
        uint8_t *q = b + INDEX_HEAD_BYTES + i * INDEX_ENTRY_BYTES;
        put64(q, w->index[i].offset);
        put64(q + 8, w->index[i].first_record);
        put64(q + 16, w->index[i].first_token);
    }
    put64(b + bytes - 8, XXH3_64bits(b, bytes - 8));
    uint64_t index_offset = w->pos;
    int rc = write_bytes(w, b, bytes, e);
    free(b);
    if (rc)
        return -1;
    uint8_t f[FOOTER_BYTES];
    put64(f, index_offset);
    put64(f + 8, bytes);
    put64(f + 16, XXH3_64bits(f, 16));
    memcpy(f + 24, FOOTER_MAGIC, 8);
    return write_bytes(w, f, sizeof f, e);
}

/* With a seekable output the header is rewritten with the final counts. */
static int patch_header(shard_writer *w, dsv3_err *e)
{
    uint8_t h[HEADER_BYTES];
    encode_header(h, &w->p, 1, w->n_records, w->n_tokens);
    FILE *f = w->out.f;
    if (fflush(f) != 0 || fseeko(f, 0, SEEK_SET) != 0 || fwrite(h, 1, sizeof h, f) != sizeof h ||
        fseeko(f, 0, SEEK_END) != 0)
        return err_errno(e, "%s: cannot rewrite the header", outfile_name(&w->out));
    return 0;
}

int shard_writer_close(shard_writer *w, dsv3_err *e)
{
    if (!w)
        return 0;
    const char *name = outfile_name(&w->out);
    int rc = 0;
    if (w->failed)
        rc = err_set(e, "%s: not written: an earlier error stopped the writer", name);
    else if (w->record_tokens != 0)
        rc = err_set(e, "%s: not written: the last record (%" PRIu64 " tokens) was never ended",
                     name, w->record_tokens);
    if (rc == 0)
        rc = flush_chunk(w, e);
    if (rc == 0)
        rc = drain(w, e);
    stop_compressors(w);
    if (rc == 0)
        rc = write_index_and_footer(w, e);
    if (rc == 0 && w->out.seekable)
        rc = patch_header(w, e);
    if (rc == 0)
        rc = outfile_commit(&w->out, e);
    else
        outfile_abort(&w->out);
    writer_free(w);
    return rc;
}

double shard_writer_compress_seconds(shard_writer *w)
{
    if (!w->sync_ready)
        return w->compress_s;
    pthread_mutex_lock(&w->mu);
    double s = w->compress_s;
    pthread_mutex_unlock(&w->mu);
    return s;
}

void shard_writer_abort(shard_writer *w)
{
    if (!w)
        return;
    stop_compressors(w);   /* before the file goes: a compressor may be writing to it */
    outfile_abort(&w->out);
    writer_free(w);
}

/* ======================================================================== reader ==== */

struct shard_reader {
    FILE *f;
    char *name;
    int own;
    int seekable;
    uint64_t file_size;
    shard_info info;
    shard_stats stats;
    uint64_t pos;                  /* byte offset of the next read */
    shard_chunk_entry *index;      /* from the file (random access) */
    shard_chunk_entry *seen;       /* chunks met while reading front to back */
    size_t n_seen, cap_seen;
    int whole_read;                /* read from the first chunk on, so `seen` is complete */
    /* the current chunk */
    uint64_t chunk_no;             /* number of the next chunk to load */
    uint64_t ended_before;         /* records ended before the next chunk */
    uint64_t tokens_before;        /* tokens before the next chunk */
    uint32_t *tok;                 /* decoded tokens */
    uint32_t n_tok, tok_i;
    uint32_t *ends;                /* decoded (end, flags) pairs */
    uint32_t n_ends, end_i;
    uint8_t *zbuf, *raw;
    size_t zcap, raw_cap, tok_cap, ends_cap;
    uint64_t index_offset;         /* where the index block starts (random access) */
    ZSTD_DCtx *dctx;
    /* a record assembled across chunks */
    uint32_t *rec;
    size_t rec_len, rec_cap;
    uint64_t next_record;
    int done;                      /* index and footer checked */
    int failed;
};

static int damaged(shard_reader *r, dsv3_err *e, uint64_t off, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int damaged(shard_reader *r, dsv3_err *e, uint64_t off, const char *fmt, ...)
{
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    r->failed = 1;
    return err_set(e, "%s: %s (offset %" PRIu64 ")", r->name, what, off);
}

/* Reads exactly n bytes at the current position; a short read is reported as truncation. */
static int read_exact(shard_reader *r, void *buf, size_t n, const char *what, dsv3_err *e)
{
    size_t got = n ? fread(buf, 1, n, r->f) : 0;
    if (got != n) {
        if (ferror(r->f)) {
            r->failed = 1;
            return err_errno(e, "%s: read failed at offset %" PRIu64, r->name, r->pos + got);
        }
        return damaged(r, e, r->pos + got, "file ends inside %s: %zu of %zu bytes", what, got, n);
    }
    r->pos += n;
    return 0;
}

static int seek_to(shard_reader *r, uint64_t off, dsv3_err *e)
{
    if (fseeko(r->f, (off_t)off, SEEK_SET) != 0) {
        r->failed = 1;
        return err_errno(e, "%s: cannot seek to offset %" PRIu64, r->name, off);
    }
    r->pos = off;
    return 0;
}

static int parse_header(shard_reader *r, const uint8_t h[HEADER_BYTES], dsv3_err *e)
{
    if (memcmp(h, FILE_MAGIC, 8) != 0)
        return damaged(r, e, 0, "not a dsv3 shard: bad magic");
    uint32_t version = get32(h + 8);
    if (version != SHARD_VERSION)
        return damaged(r, e, 8, "shard format version %u, this build reads version %u", version,
                       SHARD_VERSION);
    if (!hash_ok(get64(h + 72), XXH3_64bits(h, 72)))
        return damaged(r, e, 0, "header checksum mismatch");
    shard_info *in = &r->info;
    in->version = version;
    in->kind = (shard_kind)get32(h + 12);
    in->token_bytes = get32(h + 16);
    in->seq_len = get32(h + 20);
    in->vocab_size = get32(h + 24);
    in->chunk_tokens = get32(h + 28);
    uint32_t flags = get32(h + 32);
    in->tokenizer_id = get64(h + 40);
    in->counts_known = (flags & HEADER_COUNTS) != 0;
    in->n_records = get64(h + 48);
    in->n_tokens = get64(h + 56);
    if (in->kind != SHARD_DOCS && in->kind != SHARD_PACKED)
        return damaged(r, e, 12, "unknown shard kind %u", (unsigned)in->kind);
    if (in->token_bytes != 4)
        return damaged(r, e, 16, "token width %u bytes, expected 4", in->token_bytes);
    if ((in->kind == SHARD_PACKED) != (in->seq_len != 0))
        return damaged(r, e, 20, "sequence length %u does not fit shard kind %s", in->seq_len,
                       shard_kind_name(in->kind));
    if (flags & ~(uint32_t)HEADER_COUNTS)
        return damaged(r, e, 32, "unknown header flags 0x%x", flags);
    if (in->counts_known && in->kind == SHARD_PACKED &&
        in->n_tokens != in->n_records * (uint64_t)in->seq_len)
        return damaged(r, e, 48, "header counts disagree: %" PRIu64 " records of %u tokens "
                       "are not %" PRIu64 " tokens", in->n_records, in->seq_len, in->n_tokens);
    return 0;
}

/* Parses and checks an index block; `at` is its offset in the file, for messages. */
static int parse_index(shard_reader *r, const uint8_t *b, size_t bytes, uint64_t at,
                       shard_chunk_entry **out, uint64_t *n_out, uint64_t *records,
                       uint64_t *tokens, dsv3_err *e)
{
    if (bytes < INDEX_HEAD_BYTES + 8 || get32(b) != INDEX_MAGIC)
        return damaged(r, e, at, "bad index block");
    uint64_t n = get64(b + 8);
    if (n > (bytes - INDEX_HEAD_BYTES - 8) / INDEX_ENTRY_BYTES ||
        INDEX_HEAD_BYTES + n * INDEX_ENTRY_BYTES + 8 != bytes)
        return damaged(r, e, at + 8, "index claims %" PRIu64 " chunks in %zu bytes", n, bytes);
    if (!hash_ok(get64(b + bytes - 8), XXH3_64bits(b, bytes - 8)))
        return damaged(r, e, at, "index checksum mismatch");
    *records = get64(b + 16);
    *tokens = get64(b + 24);
    if (*records > n * (uint64_t)MAX_CHUNK_ENDS || *tokens > n * (uint64_t)MAX_CHUNK_TOKENS)
        return damaged(r, e, at + 16, "index totals (%" PRIu64 " records, %" PRIu64 " tokens) "
                       "cannot fit in %" PRIu64 " chunks", *records, *tokens, n);
    shard_chunk_entry *x = malloc((n ? n : 1) * sizeof *x);
    if (!x) {
        r->failed = 1;
        return err_set(e, "%s: out of memory for an index of %" PRIu64 " chunks", r->name, n);
    }
    for (uint64_t i = 0; i < n; i++) {
        const uint8_t *q = b + INDEX_HEAD_BYTES + i * INDEX_ENTRY_BYTES;
        x[i] = (shard_chunk_entry){get64(q), get64(q + 8), get64(q + 16)};
        int bad = i == 0 ? (x[i].offset != HEADER_BYTES || x[i].first_record != 0 ||
                            x[i].first_token != 0)
                         : (x[i].offset <= x[i - 1].offset ||
                            x[i].first_record < x[i - 1].first_record ||
                            x[i].first_token < x[i - 1].first_token);
        if (bad || x[i].offset >= at || x[i].first_record > *records ||
            x[i].first_token > *tokens) {
            free(x);
            return damaged(r, e, at + INDEX_HEAD_BYTES + i * INDEX_ENTRY_BYTES,
                           "index entry %" PRIu64 " is out of order", i);
        }
    }
    *out = x;
    *n_out = n;
    return 0;
}

static int check_footer(shard_reader *r, const uint8_t f[FOOTER_BYTES], uint64_t at,
                        uint64_t *index_offset, uint64_t *index_bytes, dsv3_err *e)
{
    if (memcmp(f + 24, FOOTER_MAGIC, 8) != 0)
        return damaged(r, e, at + 24, "footer missing: the shard is truncated or was not "
                       "finished");
    if (!hash_ok(get64(f + 16), XXH3_64bits(f, 16)))
        return damaged(r, e, at, "footer checksum mismatch");
    *index_offset = get64(f);
    *index_bytes = get64(f + 8);
    return 0;
}

static int check_totals(shard_reader *r, uint64_t records, uint64_t tokens, uint64_t at,
                        dsv3_err *e)
{
    const shard_info *in = &r->info;
    if (in->counts_known && (in->n_records != records || in->n_tokens != tokens))
        return damaged(r, e, at, "header says %" PRIu64 " records and %" PRIu64 " tokens, the "
                       "index %" PRIu64 " and %" PRIu64, in->n_records, in->n_tokens, records,
                       tokens);
    if (in->kind == SHARD_PACKED && tokens != records * (uint64_t)in->seq_len)
        return damaged(r, e, at, "index counts %" PRIu64 " tokens for %" PRIu64 " records of %u",
                       tokens, records, in->seq_len);
    return 0;
}

/* Random access: footer, then index, checked against each other and the header. */
static int load_index(shard_reader *r, dsv3_err *e)
{
    if (r->file_size < HEADER_BYTES + INDEX_HEAD_BYTES + 8 + FOOTER_BYTES)
        return damaged(r, e, r->file_size, "file of %" PRIu64 " bytes is too short for a shard",
                       r->file_size);
    uint64_t foot_at = r->file_size - FOOTER_BYTES, ioff, ibytes;
    uint8_t f[FOOTER_BYTES];
    if (seek_to(r, foot_at, e) || read_exact(r, f, sizeof f, "the footer", e) ||
        check_footer(r, f, foot_at, &ioff, &ibytes, e))
        return -1;
    if (ioff < HEADER_BYTES || ioff > foot_at || ibytes != foot_at - ioff)
        return damaged(r, e, foot_at, "footer points to an index at %" PRIu64 " of %" PRIu64
                       " bytes, which does not end at the footer", ioff, ibytes);
    uint8_t *b = malloc(ibytes);
    if (!b) {
        r->failed = 1;
        return err_set(e, "%s: out of memory for an index of %" PRIu64 " bytes", r->name, ibytes);
    }
    uint64_t records, tokens;
    int rc = seek_to(r, ioff, e) || read_exact(r, b, ibytes, "the index", e) ||
             parse_index(r, b, ibytes, ioff, &r->index, &r->info.n_chunks, &records, &tokens, e);
    free(b);
    if (rc || check_totals(r, records, tokens, ioff, e))
        return -1;
    r->info.index_known = 1;
    r->index_offset = ioff;
    r->info.n_records = records;
    r->info.n_tokens = tokens;
    return seek_to(r, HEADER_BYTES, e);
}

int shard_open_stream(shard_reader **rp, FILE *f, const char *name, int own, dsv3_err *e)
{
    *rp = NULL;
    shard_reader *r = calloc(1, sizeof *r);
    if (!r || !(r->name = strdup(name)) || !(r->dctx = ZSTD_createDCtx())) {
        if (r)
            free(r->name);
        free(r);
        if (own)
            fclose(f);
        return err_set(e, "%s: out of memory", name);
    }
    r->f = f;
    r->own = own;
    r->whole_read = 1;
    r->stats.min_record = UINT64_MAX;
    struct stat st;
    if (fstat(fileno(f), &st) == 0 && S_ISREG(st.st_mode) && fseeko(f, 0, SEEK_END) == 0) {
        r->seekable = 1;
        r->file_size = (uint64_t)ftello(f);
        fseeko(f, 0, SEEK_SET);
    }
    uint8_t h[HEADER_BYTES];
    int rc = read_exact(r, h, sizeof h, "the header", e) || parse_header(r, h, e);
    if (rc == 0 && r->seekable)
        rc = load_index(r, e);
    if (rc) {
        shard_close(r);
        return -1;
    }
    *rp = r;
    return 0;
}

int shard_open(shard_reader **r, const char *path, dsv3_err *e)
{
    *r = NULL;
    if (strcmp(path, "-") == 0)
        return shard_open_stream(r, stdin, "<stdin>", 0, e);
    FILE *f = fopen(path, "rb");
    if (!f)
        return err_errno(e, "%s: cannot open", path);
    setvbuf(f, NULL, _IOFBF, 1 << 20);
    return shard_open_stream(r, f, path, 1, e);
}

const shard_info *shard_get_info(const shard_reader *r)
{
    return &r->info;
}

const shard_stats *shard_get_stats(const shard_reader *r)
{
    return &r->stats;
}

void shard_close(shard_reader *r)
{
    if (!r)
        return;
    if (r->own && r->f)
        fclose(r->f);
    free(r->name);
    free(r->index);
    free(r->seen);
    free(r->tok);
    free(r->ends);
    free(r->zbuf);
    free(r->raw);
    free(r->rec);
    ZSTD_freeDCtx(r->dctx);
    free(r);
}

/* The index block met at the end of a front-to-back read: it must describe exactly the
 * chunks that were read, and the footer must follow it and end the file. */
static int finish_stream(shard_reader *r, const uint8_t first[4], dsv3_err *e)
{
    uint64_t at = r->pos - 4;
    uint8_t head[INDEX_HEAD_BYTES];
    memcpy(head, first, 4);
    if (read_exact(r, head + 4, sizeof head - 4, "the index", e))
        return -1;
    uint64_t n = get64(head + 8);
    if (n != r->chunk_no)
        return damaged(r, e, at + 8, "index lists %" PRIu64 " chunks, %" PRIu64 " were read", n,
                       r->chunk_no);
    if (n > (UINT64_MAX - INDEX_HEAD_BYTES - 8) / INDEX_ENTRY_BYTES)
        return damaged(r, e, at + 8, "index size overflows");
    size_t bytes = INDEX_HEAD_BYTES + n * INDEX_ENTRY_BYTES + 8;
    uint8_t *b = malloc(bytes);
    if (!b) {
        r->failed = 1;
        return err_set(e, "%s: out of memory", r->name);
    }
    memcpy(b, head, sizeof head);
    shard_chunk_entry *x = NULL;
    uint64_t nx, records, tokens;
    int rc = read_exact(r, b + sizeof head, bytes - sizeof head, "the index", e) ||
             parse_index(r, b, bytes, at, &x, &nx, &records, &tokens, e);
    free(b);
    if (rc)
        return -1;
    if (r->whole_read)
        for (uint64_t i = 0; i < n && rc == 0; i++)
            if (memcmp(&x[i], &r->seen[i], sizeof x[i]) != 0)
                rc = damaged(r, e, at + INDEX_HEAD_BYTES + i * INDEX_ENTRY_BYTES,
                             "index entry %" PRIu64 " does not match chunk %" PRIu64 " as read",
                             i, i);
    free(x);
    if (rc)
        return -1;
    if (records != r->ended_before || tokens != r->tokens_before)
        return damaged(r, e, at + 16, "index totals %" PRIu64 " records, %" PRIu64 " tokens; "
                       "the chunks hold %" PRIu64 " and %" PRIu64, records, tokens,
                       r->ended_before, r->tokens_before);
    if (check_totals(r, records, tokens, at, e))
        return -1;
    uint8_t f[FOOTER_BYTES];
    uint64_t foot_at = r->pos, ioff, ibytes;
    if (read_exact(r, f, sizeof f, "the footer", e) ||
        check_footer(r, f, foot_at, &ioff, &ibytes, e))
        return -1;
    if (ioff != at || ibytes != bytes)
        return damaged(r, e, foot_at, "footer points to an index at %" PRIu64 ", it is at %"
                       PRIu64, ioff, at);
    if (fgetc(r->f) != EOF)
        return damaged(r, e, r->pos, "data after the footer");
    r->info.n_records = records;
    r->info.n_tokens = tokens;
    r->info.n_chunks = n;
    r->stats.bytes_file = r->pos;
    r->done = 1;
    return 0;
}

static int load_chunk(shard_reader *r, int *at_end, dsv3_err *e)
{
    *at_end = 0;
    uint64_t at = r->pos;
    uint8_t h[CHUNK_HEADER_BYTES];
    size_t got = fread(h, 1, 4, r->f);
    if (got < 4) {
        if (ferror(r->f)) {
            r->failed = 1;
            return err_errno(e, "%s: read failed at offset %" PRIu64, r->name, at);
        }
        return damaged(r, e, at + got, "file ends after chunk %" PRIu64 " where the next chunk "
                       "or the index should be: the shard is truncated", r->chunk_no);
    }
    r->pos += 4;
    if (get32(h) == INDEX_MAGIC) {
        *at_end = 1;
        return finish_stream(r, h, e);
    }
    if (get32(h) != CHUNK_MAGIC)
        return damaged(r, e, at, "chunk %" PRIu64 ": bad chunk magic", r->chunk_no);
    if (read_exact(r, h + 4, sizeof h - 4, "a chunk header", e))
        return -1;
    if (!hash_ok(get64(h + 56), XXH3_64bits(h, 56)))
        return damaged(r, e, at, "chunk %" PRIu64 ": header checksum mismatch", r->chunk_no);
    uint32_t flags = get32(h + 4), n_tok = get32(h + 8), n_ends = get32(h + 12);
    uint32_t raw_bytes = get32(h + 16), zbytes = get32(h + 20);
    uint64_t first_record = get64(h + 24), first_token = get64(h + 32), zhash = get64(h + 40);
    if (flags & ~(uint32_t)CHUNK_SHUFFLED)
        return damaged(r, e, at + 4, "chunk %" PRIu64 ": unknown flags 0x%x", r->chunk_no, flags);
    if (n_tok > MAX_CHUNK_TOKENS || n_ends > MAX_CHUNK_ENDS || (n_tok == 0 && n_ends == 0) ||
        (uint64_t)raw_bytes != (uint64_t)n_tok * 4 + (uint64_t)n_ends * 8 ||
        zbytes > ZSTD_compressBound(raw_bytes))
        return damaged(r, e, at + 8, "chunk %" PRIu64 ": sizes do not add up (%u tokens, %u "
                       "ends, %u raw bytes, %u compressed)", r->chunk_no, n_tok, n_ends,
                       raw_bytes, zbytes);
    if (first_record != r->ended_before || first_token != r->tokens_before)
        return damaged(r, e, at + 24, "chunk %" PRIu64 " starts at record %" PRIu64 ", token %"
                       PRIu64 "; expected record %" PRIu64 ", token %" PRIu64, r->chunk_no,
                       first_record, first_token, r->ended_before, r->tokens_before);
    if (r->info.index_known) {
        if (r->chunk_no >= r->info.n_chunks || r->index[r->chunk_no].offset != at)
            return damaged(r, e, at, "chunk %" PRIu64 " is not where the index puts it",
                           r->chunk_no);
    }
    if (grow((void **)&r->zbuf, &r->zcap, zbytes ? zbytes : 1, 1) ||
        grow((void **)&r->raw, &r->raw_cap, raw_bytes ? raw_bytes : 1, 1) ||
        grow((void **)&r->tok, &r->tok_cap, (size_t)n_tok + 1, 4)) {
        r->failed = 1;
        return err_set(e, "%s: out of memory for chunk %" PRIu64, r->name, r->chunk_no);
    }
    if (read_exact(r, r->zbuf, zbytes, "a chunk", e))
        return -1;
    if (!hash_ok(zhash, XXH3_64bits(r->zbuf, zbytes)))
        return damaged(r, e, at + CHUNK_HEADER_BYTES, "chunk %" PRIu64 ": checksum mismatch",
                       r->chunk_no);
    size_t out = ZSTD_decompressDCtx(r->dctx, r->raw, raw_bytes, r->zbuf, zbytes);
    if (ZSTD_isError(out) || out != raw_bytes)
        return damaged(r, e, at + CHUNK_HEADER_BYTES, "chunk %" PRIu64 ": does not decompress "
                       "to %u bytes (%s)", r->chunk_no, raw_bytes,
                       ZSTD_isError(out) ? ZSTD_getErrorName(out) : "wrong size");
    if (flags & CHUNK_SHUFFLED) {
        unshuffle_tokens(r->tok, r->raw, n_tok);
    } else {
        tokens_from_le(r->tok, r->raw, n_tok);
    }
    if (grow((void **)&r->ends, &r->ends_cap, 2 * (size_t)n_ends + 1, 4)) {
        r->failed = 1;
        return err_set(e, "%s: out of memory for chunk %" PRIu64, r->name, r->chunk_no);
    }
    const uint8_t *ep = r->raw + (size_t)n_tok * 4;
    uint32_t prev = 0;
    for (uint32_t i = 0; i < n_ends; i++) {
        uint32_t end = get32(ep + 8 * (size_t)i);
        if (end < prev || end > n_tok)
            return damaged(r, e, at + CHUNK_HEADER_BYTES, "chunk %" PRIu64 ": record end %u "
                           "is out of order", r->chunk_no, end);
        r->ends[2 * i] = end;
        r->ends[2 * i + 1] = get32(ep + 8 * (size_t)i + 4);
        prev = end;
    }
    uint32_t top = max_token(r->tok, n_tok);
    if (r->info.vocab_size && n_tok && top >= r->info.vocab_size) {
        uint32_t i = 0;
        while (r->tok[i] < r->info.vocab_size)
            i++;
        return damaged(r, e, at + CHUNK_HEADER_BYTES, "chunk %" PRIu64 ", token %u: id %u is "
                       "not below the vocabulary size %u", r->chunk_no, i, r->tok[i],
                       r->info.vocab_size);
    }
    if (top > r->stats.max_token)
        r->stats.max_token = top;
    if (grow((void **)&r->seen, &r->cap_seen, r->n_seen + 1, sizeof *r->seen)) {
        r->failed = 1;
        return err_set(e, "%s: out of memory", r->name);
    }
    r->seen[r->n_seen++] = (shard_chunk_entry){at, first_record, first_token};
    r->n_tok = n_tok;
    r->n_ends = n_ends;
    r->tok_i = r->end_i = 0;
    r->chunk_no++;
    r->ended_before += n_ends;
    r->tokens_before += n_tok;
    r->stats.chunks++;
    r->stats.bytes_compressed += zbytes;
    r->stats.bytes_raw += raw_bytes;
    r->stats.bytes_file = r->pos;
    return 0;
}

static int append_to_record(shard_reader *r, const uint32_t *t, size_t n, dsv3_err *e)
{
    if (grow((void **)&r->rec, &r->rec_cap, r->rec_len + n + 1, 4)) {
        r->failed = 1;
        return err_set(e, "%s: out of memory for record %" PRIu64 " of at least %zu tokens",
                       r->name, r->next_record, r->rec_len + n);
    }
    memcpy(r->rec + r->rec_len, t, n * 4);
    r->rec_len += n;
    return 0;
}

static void count_record(shard_reader *r, uint64_t n)
{
    r->stats.records++;
    r->stats.tokens += n;
    if (n < r->stats.min_record)
        r->stats.min_record = n;
    if (n > r->stats.max_record)
        r->stats.max_record = n;
}

int shard_next(shard_reader *r, shard_record *rec, dsv3_err *e)
{
    if (r->failed)
        return err_set(e, "%s: reader stopped by an earlier error", r->name);
    if (r->done)
        return 0;
    int pieces = 0;   /* the record began in an earlier chunk and is assembled in r->rec */
    r->rec_len = 0;
    for (;;) {
        if (r->end_i == r->n_ends && r->tok_i == r->n_tok) {
            int at_end;
            uint64_t at = r->pos;
            if (load_chunk(r, &at_end, e))
                return -1;
            if (at_end && pieces)
                return damaged(r, e, at, "the last record (%zu tokens) has no end", r->rec_len);
            if (at_end)
                return 0;
            continue;
        }
        if (r->end_i == r->n_ends) {      /* the rest of the chunk continues in the next one */
            if (append_to_record(r, r->tok + r->tok_i, r->n_tok - r->tok_i, e))
                return -1;
            r->tok_i = r->n_tok;
            pieces = 1;
            continue;
        }
        uint32_t end = r->ends[2 * r->end_i], flags = r->ends[2 * r->end_i + 1];
        if (pieces) {
            if (append_to_record(r, r->tok + r->tok_i, end - r->tok_i, e))
                return -1;
            rec->tokens = r->rec;
            rec->n_tokens = r->rec_len;
        } else {
            rec->tokens = r->tok + r->tok_i;   /* whole record inside this chunk: no copy */
            rec->n_tokens = end - r->tok_i;
        }
        r->tok_i = end;
        r->end_i++;
        if (r->info.kind == SHARD_PACKED && rec->n_tokens != r->info.seq_len)
            return damaged(r, e, r->pos, "packed record %" PRIu64 " has %" PRIu64 " tokens, "
                           "not the sequence length %u", r->next_record, rec->n_tokens,
                           r->info.seq_len);
        rec->flags = flags;
        rec->index = r->next_record++;
        count_record(r, rec->n_tokens);
        return 1;
    }
}

/* The chunk in which record i-1 ends, so that record i starts right after it. */
static uint64_t chunk_before_record(const shard_reader *r, uint64_t i)
{
    uint64_t lo = 0, hi = r->info.n_chunks - 1;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        uint64_t ended_through = mid + 1 < r->info.n_chunks ? r->index[mid + 1].first_record
                                                            : r->info.n_records;
        if (ended_through >= i)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

static void reset_cursor(shard_reader *r, uint64_t chunk, uint64_t records, uint64_t tokens)
{
    r->chunk_no = chunk;
    r->ended_before = records;
    r->tokens_before = tokens;
    r->n_tok = r->tok_i = r->n_ends = r->end_i = 0;
    r->rec_len = 0;
    r->done = 0;
    r->n_seen = 0;
    r->whole_read = chunk == 0;
}

int shard_seek(shard_reader *r, uint64_t i, dsv3_err *e)
{
    if (r->failed)
        return err_set(e, "%s: reader stopped by an earlier error", r->name);
    if (!r->info.index_known)
        return err_set(e, "%s: cannot seek: not a regular file", r->name);
    if (i > r->info.n_records)
        return err_set(e, "%s: record %" PRIu64 " is past the end (%" PRIu64 " records)",
                       r->name, i, r->info.n_records);
    if (i == r->info.n_records || r->info.n_chunks == 0) {
        reset_cursor(r, r->info.n_chunks, r->info.n_records, r->info.n_tokens);
        r->whole_read = 0;
        r->next_record = i;
        return seek_to(r, r->index_offset, e);
    }
    uint64_t c = chunk_before_record(r, i);
    const shard_chunk_entry *x = &r->index[c];
    reset_cursor(r, c, x->first_record, x->first_token);
    int at_end;
    if (seek_to(r, x->offset, e) || load_chunk(r, &at_end, e))
        return -1;
    uint64_t skip = i - x->first_record;
    if (at_end || skip > r->n_ends)
        return damaged(r, e, x->offset, "chunk %" PRIu64 " does not hold the end of record %"
                       PRIu64 " as the index says", c, i - 1);
    if (skip > 0)
        r->tok_i = r->ends[2 * (skip - 1)];
    r->end_i = (uint32_t)skip;
    r->next_record = i;
    return 0;
}

int shard_chunk(const shard_reader *r, uint64_t c, shard_chunk_entry *out, dsv3_err *e)
{
    if (!r->info.index_known)
        return err_set(e, "%s: no index: not a regular file", r->name);
    if (c >= r->info.n_chunks)
        return err_set(e, "%s: chunk %" PRIu64 " is past the end (%" PRIu64 " chunks)", r->name,
                       c, r->info.n_chunks);
    *out = r->index[c];
    return 0;
}

int shard_verify(shard_reader *r, dsv3_err *e)
{
    shard_record rec;
    int rc;
    while ((rc = shard_next(r, &rec, e)) == 1)
        ;
    return rc;
}
