#include "docin.h"

#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct docin {
    char *const *files;
    size_t nfiles, cur;
    docin_mode mode, fmode;
    const char *field;
    int skip_bad;
    size_t piece;   /* text mode: deliver files in pieces of about this many bytes (0: whole) */
    int threads;    /* jsonl: records of a batch are parsed on this many threads */
    int text_done;
    FILE *f;
    const char *name;
    uint64_t line;
    char *lbuf;
    size_t lcap;
    const uint8_t *mem;   /* docin_open_mem: the one document */
    size_t mem_len;
    int mem_done;
    docin_batch *own;     /* docin_next's batch */
    uint64_t skipped, bytes;
};

struct docin_batch {
    uint8_t *arena;
    size_t alen, acap;
    size_t *off, *lens;
    const uint8_t **docs;
    size_t nd, cd;
    /* jsonl: the batch first holds raw records, parsed in place later */
    const char **rec_name;
    uint64_t *rec_line;
    uint8_t *rec_bad;   /* 0 ok, else why (enum rec_why) */
    size_t nrec;
};

/* What a batch entry is: a document (REC_OK), a raw JSONL record waiting to be parsed, or
 * why a parsed record is bad. */
enum rec_why { REC_OK, REC_BAD_JSON, REC_NOT_OBJECT, REC_NO_FIELD, REC_PENDING };

int docin_mode_parse(const char *s, docin_mode *m)
{
    static const char *const names[] = {"auto", "text", "lines", "jsonl"};
    for (int i = 0; i < 4; i++)
        if (strcmp(s, names[i]) == 0) {
            *m = (docin_mode)i;
            return 0;
        }
    return -1;
}

int docin_open(docin **out, char *const *files, size_t n, docin_mode mode, const char *field,
               int skip_bad, dsv3_err *e)
{
    static char *const stdin_only[] = {"-"};
    docin *d = calloc(1, sizeof *d);
    *out = NULL;
    if (!d)
        return err_set(e, "out of memory");
    d->files = n ? files : stdin_only;
    d->nfiles = n ? n : 1;
    d->mode = mode;
    d->field = field ? field : "text";
    d->skip_bad = skip_bad;
    if (!(d->own = docin_batch_new())) {
        free(d);
        return err_set(e, "out of memory");
    }
    *out = d;
    return 0;
}

int docin_open_mem(docin **out, const void *text, size_t n, dsv3_err *e)
{
    if (docin_open(out, NULL, 0, DOCIN_TEXT, NULL, 0, e))
        return -1;
    (*out)->mem = text;
    (*out)->mem_len = n;
    (*out)->cur = (*out)->nfiles;   /* no file to open after it */
    return 0;
}

docin_batch *docin_batch_new(void)
{
    return calloc(1, sizeof(docin_batch));
}

void docin_batch_free(docin_batch *b)
{
    if (!b)
        return;
    free(b->arena);
    free(b->off);
    free(b->lens);
    free(b->docs);
    free(b->rec_name);
    free(b->rec_line);
    free(b->rec_bad);
    free(b);
}

void docin_batch_trim(docin_batch *b, size_t keep)
{
    if (b->acap > keep) {
        free(b->arena);
        b->arena = NULL;
        b->acap = b->alen = 0;
    }
}

void docin_close(docin *d)
{
    if (!d)
        return;
    if (d->f && d->f != stdin)
        fclose(d->f);
    free(d->lbuf);
    docin_batch_free(d->own);
    free(d);
}

uint64_t docin_skipped(const docin *d) { return d->skipped; }
uint64_t docin_bytes(const docin *d) { return d->bytes; }

static int ends_with(const char *s, const char *suf)
{
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && strcmp(s + a - b, suf) == 0;
}

static int open_next(docin *d, dsv3_err *e)
{
    const char *path = d->files[d->cur++];
    int is_stdin = strcmp(path, "-") == 0;
    d->f = is_stdin ? stdin : fopen(path, "rb");
    d->name = is_stdin ? "<stdin>" : path;
    d->line = 0;
    d->text_done = 0;
    if (!d->f)
        return err_errno(e, "%s: cannot open", path);
    d->fmode = d->mode;
    if (d->fmode == DOCIN_AUTO) {
        if (ends_with(path, ".jsonl") || ends_with(path, ".ndjson")) {
            d->fmode = DOCIN_JSONL;
        } else {
            int c = getc(d->f);
            d->fmode = c == '{' ? DOCIN_JSONL : DOCIN_TEXT;
            if (c != EOF)
                ungetc(c, d->f);
        }
    }
    return 0;
}

/* Room for n more bytes in the arena and one more document. */
static int reserve(docin_batch *b, size_t n)
{
    if (b->acap - b->alen < n) {
        size_t nc = b->acap ? b->acap : 1 << 20;
        while (nc - b->alen < n)
            nc *= 2;
        uint8_t *q = realloc(b->arena, nc);
        if (!q)
            return -1;
        b->arena = q;
        b->acap = nc;
    }
    if (b->nd == b->cd) {
        size_t nc = b->cd ? 2 * b->cd : 1024;
        size_t *o = realloc(b->off, nc * sizeof *o), *l = o ? realloc(b->lens, nc * sizeof *l) : NULL;
        if (o)
            b->off = o;
        if (l)
            b->lens = l;
        if (!o || !l)
            return -1;
        const char **rn = realloc(b->rec_name, nc * sizeof *rn);
        if (rn)
            b->rec_name = rn;
        uint64_t *rl = rn ? realloc(b->rec_line, nc * sizeof *rl) : NULL;
        if (rl)
            b->rec_line = rl;
        uint8_t *rb = rl ? realloc(b->rec_bad, nc) : NULL;
        if (rb)
            b->rec_bad = rb;
        if (!rb)
            return -1;
        b->cd = nc;
    }
    return 0;
}

static int add_doc(docin_batch *b, const void *s, size_t n)
{
    if (reserve(b, n))
        return -1;
    if (n)   /* an empty first document leaves the arena unallocated (NULL) */
        memcpy(b->arena + b->alen, s, n);
    b->rec_bad[b->nd] = REC_OK;
    b->off[b->nd] = b->alen;
    b->lens[b->nd++] = n;
    b->alen += n;
    return 0;
}

static int read_whole(docin *d, docin_batch *b, dsv3_err *e)
{
    if (reserve(b, 0))
        return err_set(e, "out of memory");
    size_t start = b->alen;
    for (;;) {
        if (reserve(b, 1 << 20))
            return err_set(e, "%s: out of memory", d->name);
        size_t got = fread(b->arena + b->alen, 1, b->acap - b->alen, d->f);
        b->alen += got;
        d->bytes += got;
        if (got == 0)
            break;
    }
    if (ferror(d->f))
        return err_errno(e, "%s: read failed", d->name);
    b->rec_bad[b->nd] = REC_OK;
    b->off[b->nd] = start;
    b->lens[b->nd++] = b->alen - start;
    return 1;
}

/* The next piece of a text file: about d->piece bytes, then on to the end of the line. */
static int read_piece(docin *d, docin_batch *b, dsv3_err *e)
{
    if (reserve(b, d->piece + 1))
        return err_set(e, "%s: out of memory", d->name);
    size_t start = b->alen;
    size_t got = fread(b->arena + b->alen, 1, d->piece, d->f);
    b->alen += got;
    int c = 0;
    if (got == d->piece) {
        /* end at a line break; failing that (a file of one long line) at a space, and
         * failing that before any byte that does not continue a UTF-8 character */
        for (size_t extra = 0; (c = getc(d->f)) != EOF; extra++) {
            if (extra >= (1u << 16) && (c & 0xc0) != 0x80 &&
                (extra >= (1u << 17) || c == ' ')) {
                ungetc(c, d->f);
                break;
            }
            if (reserve(b, 1))
                return err_set(e, "%s: out of memory", d->name);
            b->arena[b->alen++] = (uint8_t)c;
            if (c == '\n')
                break;
        }
    }
    if (ferror(d->f))
        return err_errno(e, "%s: read failed", d->name);
    if (got < d->piece || c == EOF)
        d->text_done = 1;
    d->bytes += b->alen - start;
    if (b->alen == start && d->line++ > 0)
        return 0;   /* an empty file is one empty document; the end of a file is not */
    d->line++;
    b->rec_bad[b->nd] = REC_OK;
    b->off[b->nd] = start;
    b->lens[b->nd++] = b->alen - start;
    return 1;
}

void docin_set_pieces(docin *d, size_t bytes)
{
    d->piece = bytes;
}

/* One document from the current file: 1, 0 at its end, -1 on error. */
static int read_one(docin *d, docin_batch *b, dsv3_err *e)
{
    if (d->fmode == DOCIN_TEXT) {
        if (d->text_done)
            return 0;
        if (!d->piece) {
            d->text_done = 1;
            return read_whole(d, b, e);
        }
        return read_piece(d, b, e);
    }
    for (;;) {
        ssize_t len = getline(&d->lbuf, &d->lcap, d->f);
        if (len < 0) {
            if (ferror(d->f))
                return err_errno(e, "%s: read failed", d->name);
            return 0;
        }
        d->line++;
        d->bytes += (uint64_t)len;
        if (d->fmode == DOCIN_LINES) {
            if (len > 0 && d->lbuf[len - 1] == '\n')
                len--;
            return add_doc(b, d->lbuf, (size_t)len) ? err_set(e, "out of memory") : 1;
        }
        size_t i = 0;
        while (i < (size_t)len && (d->lbuf[i] == ' ' || d->lbuf[i] == '\t' ||
                                   d->lbuf[i] == '\r' || d->lbuf[i] == '\n'))
            i++;
        if (i == (size_t)len)
            continue;   /* blank lines between records are allowed */
        /* the raw record for now: parsed later, on several threads */
        if (add_doc(b, d->lbuf, (size_t)len))
            return err_set(e, "out of memory");
        b->rec_name[b->nd - 1] = d->name;
        b->rec_line[b->nd - 1] = d->line;
        b->rec_bad[b->nd - 1] = REC_PENDING;
        b->nrec++;
        return 1;
    }
}

/* Parses record i in place: its string field's value is never longer than the record's
 * JSON text (every escape decodes to fewer bytes), so it overwrites the record. je may be
 * NULL. */
static enum rec_why parse_record(const char *field, docin_batch *b, size_t i, json_error_t *je)
{
    json_error_t tmp;
    json_t *rec = json_loadb((const char *)b->arena + b->off[i], b->lens[i], JSON_ALLOW_NUL,
                             je ? je : &tmp);
    json_t *v = json_is_object(rec) ? json_object_get(rec, field) : NULL;
    enum rec_why why = !rec ? REC_BAD_JSON : !json_is_object(rec) ? REC_NOT_OBJECT
                     : !json_is_string(v) ? REC_NO_FIELD : REC_OK;
    if (why == REC_OK) {
        b->lens[i] = json_string_length(v);
        memcpy(b->arena + b->off[i], json_string_value(v), b->lens[i]);
    }
    json_decref(rec);
    return why;
}

typedef struct {
    docin *d;
    docin_batch *b;
    size_t lo, hi;
} parse_job;

static void *parse_main(void *arg)
{
    parse_job *j = arg;
    for (size_t i = j->lo; i < j->hi; i++)
        if (j->b->rec_bad[i] == REC_PENDING)
            j->b->rec_bad[i] = (uint8_t)parse_record(j->d->field, j->b, i, NULL);
    return NULL;
}

/* The message for bad record i (it is parsed again: bad records were not overwritten). */
static int bad_record(docin *d, docin_batch *b, size_t i, dsv3_err *e)
{
    json_error_t je;
    char why[300];
    enum rec_why w = parse_record(d->field, b, i, &je);
    if (w == REC_BAD_JSON)
        snprintf(why, sizeof why, "bad JSON: %s", je.text);
    else if (w == REC_NOT_OBJECT)
        snprintf(why, sizeof why, "record is not an object");
    else
        snprintf(why, sizeof why, "no string field \"%s\"", d->field);
    return err_set(e, "%s (%s, line %llu)", why, b->rec_name[i],
                   (unsigned long long)b->rec_line[i]);
}

/* Parses the batch's raw records on up to d->threads threads (contiguous ranges of about
 * equal bytes), then drops the bad ones (skip_bad) or reports the first (by line). */
static int parse_batch(docin *d, docin_batch *b, dsv3_err *e)
{
    enum { MAXT = 256 };
    size_t nt = d->threads < 1 ? 1 : d->threads > MAXT ? MAXT : (size_t)d->threads;
    if (nt > b->nd)
        nt = b->nd;
    parse_job jobs[MAXT];
    pthread_t tid[MAXT];
    int started[MAXT] = {0};
    size_t i = 0;
    for (size_t t = 0; t < nt; t++) {
        size_t target = b->alen / nt * (t + 1);
        jobs[t] = (parse_job){d, b, i, i};
        while (jobs[t].hi < b->nd && (t == nt - 1 || b->off[jobs[t].hi] < target))
            jobs[t].hi++;
        i = jobs[t].hi;
        if (t > 0)
            started[t] = pthread_create(&tid[t], NULL, parse_main, &jobs[t]) == 0;
    }
    for (size_t t = 0; t < nt; t++)
        if (!started[t])
            parse_main(&jobs[t]);   /* the first range, and any whose thread did not start */
    for (size_t t = 1; t < nt; t++)
        if (started[t])
            pthread_join(tid[t], NULL);
    size_t k = 0;
    for (i = 0; i < b->nd; i++) {
        if (b->rec_bad[i] == REC_OK) {
            b->off[k] = b->off[i];
            b->lens[k++] = b->lens[i];
            continue;
        }
        if (!d->skip_bad)
            return bad_record(d, b, i, e);
        d->skipped++;
    }
    b->nd = k;
    b->nrec = 0;
    return 0;
}

void docin_set_threads(docin *d, int threads)
{
    d->threads = threads;
}

/* Fills b with the next documents (JSONL records left raw); the count, 0 at the end. */
static long fill(docin *d, docin_batch *b, size_t max_bytes, dsv3_err *e)
{
    b->alen = 0;
    b->nd = 0;
    b->nrec = 0;
    if (d->mem) {
        if (d->mem_done)
            return 0;
        d->mem_done = 1;
        d->bytes += d->mem_len;
        return add_doc(b, d->mem, d->mem_len) ? err_set(e, "out of memory") : 1;
    }
    while (b->nd == 0 || b->alen < max_bytes) {
        if (!d->f) {
            if (d->cur == d->nfiles)
                break;
            if (open_next(d, e))
                return -1;
        }
        int rc = read_one(d, b, e);
        if (rc < 0)
            return -1;
        if (rc == 0) {
            if (d->f != stdin)
                fclose(d->f);
            d->f = NULL;
        }
    }
    return (long)b->nd;
}

static int point_docs(docin_batch *b, dsv3_err *e)
{
    if (b->nd > 0) {
        const uint8_t **q = realloc(b->docs, b->nd * sizeof *q);
        if (!q)
            return err_set(e, "out of memory");
        b->docs = q;
        for (size_t i = 0; i < b->nd; i++)
            b->docs[i] = b->arena + b->off[i];
    }
    return 0;
}

long docin_next(docin *d, size_t max_bytes, const uint8_t *const **docs, const size_t **lens,
                dsv3_err *e)
{
    docin_batch *b = d->own;
    do {   /* again when every record of a batch was bad and skipped */
        if (fill(d, b, max_bytes, e) < 0)
            return -1;
        if (b->nrec > 0 && parse_batch(d, b, e))
            return -1;
    } while (b->nd == 0 && (d->f || d->cur < d->nfiles));
    if (point_docs(b, e))
        return -1;
    *docs = b->docs;
    *lens = b->lens;
    return (long)b->nd;
}

long docin_read(docin *d, docin_batch *b, size_t max_bytes, dsv3_err *e)
{
    return fill(d, b, max_bytes, e);
}

size_t docin_batch_count(const docin_batch *b)
{
    return b->nd;
}

int docin_batch_doc(const docin *d, docin_batch *b, size_t i, const uint8_t **doc, size_t *len)
{
    if (b->rec_bad[i] == REC_PENDING)
        b->rec_bad[i] = (uint8_t)parse_record(d->field, b, i, NULL);
    *doc = b->arena + b->off[i];
    *len = b->lens[i];
    return b->rec_bad[i] != REC_OK;
}

int docin_batch_bad(docin *d, docin_batch *b, size_t i, dsv3_err *e)
{
    if (!d->skip_bad)
        return bad_record(d, b, i, e);
    d->skipped++;
    return 0;
}
