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
    /* the batch */
    uint8_t *arena;
    size_t alen, acap;
    size_t *off, *lens;
    const uint8_t **docs;
    size_t nd, cd;
    /* jsonl: the batch first holds raw records, parsed in place at the end of docin_next */
    const char **rec_name;
    uint64_t *rec_line;
    uint8_t *rec_bad;   /* 0 ok, else why (enum rec_why) */
    size_t nrec;
    uint64_t skipped, bytes;
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
    *out = d;
    return 0;
}

void docin_close(docin *d)
{
    if (!d)
        return;
    if (d->f && d->f != stdin)
        fclose(d->f);
    free(d->lbuf);
    free(d->arena);
    free(d->off);
    free(d->lens);
    free(d->docs);
    free(d->rec_name);
    free(d->rec_line);
    free(d->rec_bad);
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
static int reserve(docin *d, size_t n)
{
    if (d->acap - d->alen < n) {
        size_t nc = d->acap ? d->acap : 1 << 20;
        while (nc - d->alen < n)
            nc *= 2;
        uint8_t *q = realloc(d->arena, nc);
        if (!q)
            return -1;
        d->arena = q;
        d->acap = nc;
    }
    if (d->nd == d->cd) {
        size_t nc = d->cd ? 2 * d->cd : 1024;
        size_t *o = realloc(d->off, nc * sizeof *o), *l = o ? realloc(d->lens, nc * sizeof *l) : NULL;
        if (o)
            d->off = o;
        if (l)
            d->lens = l;
        if (!o || !l)
            return -1;
        const char **rn = realloc(d->rec_name, nc * sizeof *rn);
        if (rn)
            d->rec_name = rn;
        uint64_t *rl = rn ? realloc(d->rec_line, nc * sizeof *rl) : NULL;
        if (rl)
            d->rec_line = rl;
        uint8_t *rb = rl ? realloc(d->rec_bad, nc) : NULL;
        if (rb)
            d->rec_bad = rb;
        if (!rb)
            return -1;
        d->cd = nc;
    }
    return 0;
}

static int add_doc(docin *d, const void *s, size_t n)
{
    if (reserve(d, n))
        return -1;
    if (n)   /* an empty first document leaves the arena unallocated (NULL) */
        memcpy(d->arena + d->alen, s, n);
    d->rec_bad[d->nd] = REC_OK;
    d->off[d->nd] = d->alen;
    d->lens[d->nd++] = n;
    d->alen += n;
    return 0;
}

static int read_whole(docin *d, dsv3_err *e)
{
    if (reserve(d, 0))
        return err_set(e, "out of memory");
    size_t start = d->alen;
    for (;;) {
        if (reserve(d, 1 << 20))
            return err_set(e, "%s: out of memory", d->name);
        size_t got = fread(d->arena + d->alen, 1, d->acap - d->alen, d->f);
        d->alen += got;
        d->bytes += got;
        if (got == 0)
            break;
    }
    if (ferror(d->f))
        return err_errno(e, "%s: read failed", d->name);
    d->rec_bad[d->nd] = REC_OK;
    d->off[d->nd] = start;
    d->lens[d->nd++] = d->alen - start;
    return 1;
}

/* The next piece of a text file: about d->piece bytes, then on to the end of the line. */
static int read_piece(docin *d, dsv3_err *e)
{
    if (reserve(d, d->piece + 1))
        return err_set(e, "%s: out of memory", d->name);
    size_t start = d->alen;
    size_t got = fread(d->arena + d->alen, 1, d->piece, d->f);
    d->alen += got;
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
            if (reserve(d, 1))
                return err_set(e, "%s: out of memory", d->name);
            d->arena[d->alen++] = (uint8_t)c;
            if (c == '\n')
                break;
        }
    }
    if (ferror(d->f))
        return err_errno(e, "%s: read failed", d->name);
    if (got < d->piece || c == EOF)
        d->text_done = 1;
    d->bytes += d->alen - start;
    if (d->alen == start && d->line++ > 0)
        return 0;   /* an empty file is one empty document; the end of a file is not */
    d->line++;
    d->rec_bad[d->nd] = REC_OK;
    d->off[d->nd] = start;
    d->lens[d->nd++] = d->alen - start;
    return 1;
}

void docin_set_pieces(docin *d, size_t bytes)
{
    d->piece = bytes;
}

/* One document from the current file: 1, 0 at its end, -1 on error. */
static int read_one(docin *d, dsv3_err *e)
{
    if (d->fmode == DOCIN_TEXT) {
        if (d->text_done)
            return 0;
        if (!d->piece) {
            d->text_done = 1;
            return read_whole(d, e);
        }
        return read_piece(d, e);
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
            return add_doc(d, d->lbuf, (size_t)len) ? err_set(e, "out of memory") : 1;
        }
        size_t i = 0;
        while (i < (size_t)len && (d->lbuf[i] == ' ' || d->lbuf[i] == '\t' ||
                                   d->lbuf[i] == '\r' || d->lbuf[i] == '\n'))
            i++;
        if (i == (size_t)len)
            continue;   /* blank lines between records are allowed */
        /* the raw record for now: docin_next parses the batch's records on d->threads */
        if (add_doc(d, d->lbuf, (size_t)len))
            return err_set(e, "out of memory");
        d->rec_name[d->nd - 1] = d->name;
        d->rec_line[d->nd - 1] = d->line;
        d->rec_bad[d->nd - 1] = REC_PENDING;
        d->nrec++;
        return 1;
    }
}

/* Parses record i in place: its string field's value is never longer than the record's
 * JSON text (every escape decodes to fewer bytes), so it overwrites the record. je may be
 * NULL. */
static enum rec_why parse_record(docin *d, size_t i, json_error_t *je)
{
    json_error_t tmp;
    json_t *rec = json_loadb((const char *)d->arena + d->off[i], d->lens[i], JSON_ALLOW_NUL,
                             je ? je : &tmp);
    json_t *v = json_is_object(rec) ? json_object_get(rec, d->field) : NULL;
    enum rec_why why = !rec ? REC_BAD_JSON : !json_is_object(rec) ? REC_NOT_OBJECT
                     : !json_is_string(v) ? REC_NO_FIELD : REC_OK;
    if (why == REC_OK) {
        d->lens[i] = json_string_length(v);
        memcpy(d->arena + d->off[i], json_string_value(v), d->lens[i]);
    }
    json_decref(rec);
    return why;
}

typedef struct {
    docin *d;
    size_t lo, hi;
} parse_job;

static void *parse_main(void *arg)
{
    parse_job *j = arg;
    for (size_t i = j->lo; i < j->hi; i++)
        if (j->d->rec_bad[i] == REC_PENDING)
            j->d->rec_bad[i] = (uint8_t)parse_record(j->d, i, NULL);
    return NULL;
}

/* Parses the batch's raw records on up to d->threads threads (contiguous ranges of about
 * equal bytes), then drops the bad ones (skip_bad) or reports the first (by line). */
static int parse_batch(docin *d, dsv3_err *e)
{
    enum { MAXT = 256 };
    size_t nt = d->threads < 1 ? 1 : d->threads > MAXT ? MAXT : (size_t)d->threads;
    if (nt > d->nd)
        nt = d->nd;
    parse_job jobs[MAXT];
    pthread_t tid[MAXT];
    int started[MAXT] = {0};
    size_t i = 0;
    for (size_t t = 0; t < nt; t++) {
        size_t target = d->alen / nt * (t + 1);
        jobs[t] = (parse_job){d, i, i};
        while (jobs[t].hi < d->nd && (t == nt - 1 || d->off[jobs[t].hi] < target))
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
    for (i = 0; i < d->nd; i++) {
        if (d->rec_bad[i] == REC_OK) {
            d->off[k] = d->off[i];
            d->lens[k++] = d->lens[i];
            continue;
        }
        if (d->skip_bad) {
            d->skipped++;
            continue;
        }
        json_error_t je;
        char why[300];
        enum rec_why w = parse_record(d, i, &je);   /* again, for the message: bad records
                                                       were not overwritten */
        if (w == REC_BAD_JSON)
            snprintf(why, sizeof why, "bad JSON: %s", je.text);
        else if (w == REC_NOT_OBJECT)
            snprintf(why, sizeof why, "record is not an object");
        else
            snprintf(why, sizeof why, "no string field \"%s\"", d->field);
        return err_set(e, "%s (%s, line %llu)", why, d->rec_name[i],
                       (unsigned long long)d->rec_line[i]);
    }
    d->nd = k;
    d->nrec = 0;
    return 0;
}

void docin_set_threads(docin *d, int threads)
{
    d->threads = threads;
}

long docin_next(docin *d, size_t max_bytes, const uint8_t *const **docs, const size_t **lens,
                dsv3_err *e)
{
    do {   /* again when every record of a batch was bad and skipped */
        d->alen = 0;
        d->nd = 0;
        d->nrec = 0;
        while (d->nd == 0 || d->alen < max_bytes) {
            if (!d->f) {
                if (d->cur == d->nfiles)
                    break;
                if (open_next(d, e))
                    return -1;
            }
            int rc = read_one(d, e);
            if (rc < 0)
                return -1;
            if (rc == 0) {
                if (d->f != stdin)
                    fclose(d->f);
                d->f = NULL;
            }
        }
        if (d->nrec > 0 && parse_batch(d, e))
            return -1;
    } while (d->nd == 0 && (d->f || d->cur < d->nfiles));
    if (d->nd > 0) {
        const uint8_t **q = realloc(d->docs, d->nd * sizeof *q);
        if (!q)
            return err_set(e, "out of memory");
        d->docs = q;
        for (size_t i = 0; i < d->nd; i++)
            d->docs[i] = d->arena + d->off[i];
    }
    *docs = d->docs;
    *lens = d->lens;
    return (long)d->nd;
}
