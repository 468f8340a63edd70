/* ststream: streaming safetensors writer. See ststream.h. */
#include "ststream.h"

#include <stdlib.h>
#include <string.h>

void sts_declare(ststream *s, const char *name, st_dtype dtype, int ndim, const int64_t *shape)
{
    if (s->failed)
        return;
    if (ndim < 0 || ndim > ST_MAX_DIMS || dtype >= ST_NDTYPES) {
        s->failed = 1;
        return;
    }
    if (s->n == s->cap) {
        int cap = s->cap ? 2 * s->cap : 64;
        sts_entry *t = realloc(s->t, (size_t)cap * sizeof *t);
        if (!t) {
            s->failed = 1;
            return;
        }
        s->t = t;
        s->cap = cap;
    }
    sts_entry *t = &s->t[s->n];
    memset(t, 0, sizeof *t);
    if (!(t->name = strdup(name))) {
        s->failed = 1;
        return;
    }
    t->dtype = dtype;
    t->ndim = ndim;
    uint64_t numel = 1;
    for (int i = 0; i < ndim; i++) {
        t->shape[i] = shape[i];
        numel *= (uint64_t)shape[i];
    }
    t->nbytes = numel * st_dtype_size(dtype);
    s->total += t->nbytes;
    s->n++;
}

/* The header JSON (malloc'd): st_write's, built from the declarations. */
static char *header_json(const ststream *s)
{
    st_tensor *t = calloc((size_t)(s->n > 0 ? s->n : 1), sizeof *t);
    if (!t)
        return NULL;
    for (int i = 0; i < s->n; i++) {
        t[i].name = s->t[i].name;
        t[i].dtype = s->t[i].dtype;
        t[i].ndim = s->t[i].ndim;
        memcpy(t[i].shape, s->t[i].shape, sizeof t[i].shape);
        t[i].nbytes = s->t[i].nbytes;
    }
    int bad;
    char *text = st_header_json(t, s->n, &bad);
    free(t);
    return text;
}

int sts_begin(ststream *s, const char *path, dsv3_err *e)
{
    if (s->failed)
        return err_set(e, "%s: out of memory or a bad shape while declaring tensors", path);
    if (s->open)
        return err_set(e, "%s: stream already begun", path);
    for (int i = 1; i < s->n; i++)  /* duplicates: a clear message before any output */
        for (int j = 0; j < i; j++)
            if (!strcmp(s->t[i].name, s->t[j].name))
                return err_set(e, "%s: tensor \"%s\" declared twice", path, s->t[i].name);
    char *h = header_json(s);
    if (!h)
        return err_set(e, "%s: out of memory for the header", path);
    size_t hl = strlen(h), padded = (hl + 7) / 8 * 8;
    if (outfile_open(&s->of, path, e)) {
        free(h);
        return -1;
    }
    unsigned char len8[8];
    for (int i = 0; i < 8; i++)
        len8[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    int bad = fwrite(len8, 1, 8, s->of.f) != 8 || fwrite(h, 1, hl, s->of.f) != hl;
    for (size_t i = hl; i < padded && !bad; i++)
        bad = fputc(' ', s->of.f) == EOF;
    free(h);
    if (bad) {
        err_errno(e, "%s: write failed", path);
        outfile_abort(&s->of);
        return -1;
    }
    s->header = 8 + padded;
    s->open = 1;
    s->cur = 0;
    s->cur_done = 0;
    /* zero-byte tensors at the front need no data */
    while (s->cur < s->n && s->t[s->cur].nbytes == 0)
        s->cur++;
    return 0;
}

int sts_write(ststream *s, const char *name, const void *data, uint64_t n, dsv3_err *e)
{
    if (!s->open)
        return err_set(e, "stream not begun");
    const char *path = outfile_name(&s->of);
    if (n == 0)
        return 0;
    /* (each message is made before sts_abort frees the path it names) */
    if (s->cur >= s->n) {
        err_set(e, "%s: data past the last declared tensor", path);
        sts_abort(s);
        return -1;
    }
    sts_entry *t = &s->t[s->cur];
    if (name && strcmp(name, t->name)) {
        err_set(e, "%s: tensor \"%s\" written where \"%s\" was declared", path, name, t->name);
        sts_abort(s);
        return -1;
    }
    if (n > t->nbytes - s->cur_done) {
        err_set(e, "%s: %llu bytes written for tensor \"%s\", which has %llu left", path,
                (unsigned long long)n, t->name, (unsigned long long)(t->nbytes - s->cur_done));
        sts_abort(s);
        return -1;
    }
    if (fwrite(data, 1, (size_t)n, s->of.f) != n) {
        err_errno(e, "%s: write failed", path);
        sts_abort(s);
        return -1;
    }
    s->cur_done += n;
    if (s->cur_done == t->nbytes) {
        s->cur++;
        s->cur_done = 0;
        while (s->cur < s->n && s->t[s->cur].nbytes == 0)
            s->cur++;
    }
    return 0;
}

int sts_commit(ststream *s, dsv3_err *e)
{
    if (!s->open)
        return err_set(e, "stream not begun");
    if (s->cur < s->n) {
        err_set(e, "%s: tensor \"%s\" and %d more not written", outfile_name(&s->of),
                s->t[s->cur].name, s->n - s->cur - 1);
        sts_abort(s);
        return -1;
    }
    s->open = 0;
    return outfile_commit(&s->of, e);
}

void sts_abort(ststream *s)
{
    if (s->open)
        outfile_abort(&s->of);
    s->open = 0;
}

void sts_free(ststream *s)
{
    sts_abort(s);
    for (int i = 0; i < s->n; i++)
        free(s->t[i].name);
    free(s->t);
    memset(s, 0, sizeof *s);
}

uint64_t sts_file_size(const ststream *s)
{
    return s->header + s->total;
}
