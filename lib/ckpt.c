#include "ckpt.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "outdir.h"
#include "outfile.h"

/* The tensors to write, in order, with their converted data. */
typedef struct item {
    const char *name;
    int ndim;
    int64_t shape[2];
    const void *data;
    uint64_t nbytes;
} item;

typedef struct collect {
    item *it;
    int n, cap;
    st_dtype dtype;
    void **owned;  /* converted buffers */
    int n_owned;
    char **names;
    int failed;
} collect;

static int collect_one(void *ctx, const char *name, int ndim, const int64_t *shape,
                       const float *data)
{
    collect *c = ctx;
    if (c->n == c->cap) {
        int cap = c->cap ? 2 * c->cap : 256;
        item *it = realloc(c->it, (size_t)cap * sizeof *it);
        void **ow = realloc(c->owned, (size_t)cap * sizeof *ow);
        char **nm = realloc(c->names, (size_t)cap * sizeof *nm);
        if (it)
            c->it = it;
        if (ow)
            c->owned = ow;
        if (nm)
            c->names = nm;
        if (!it || !ow || !nm)
            return c->failed = 1;
        c->cap = cap;
    }
    int64_t numel = ndim == 1 ? shape[0] : shape[0] * shape[1];
    item *t = &c->it[c->n];
    c->names[c->n] = strdup(name);
    if (!c->names[c->n])
        return c->failed = 1;
    t->name = c->names[c->n];
    t->ndim = ndim;
    t->shape[0] = shape[0];
    t->shape[1] = ndim == 2 ? shape[1] : 0;
    t->data = data;
    t->nbytes = (uint64_t)numel * st_dtype_size(c->dtype);
    c->n++;
    if (c->dtype == ST_BF16) {
        uint16_t *b = malloc((size_t)(numel ? numel : 1) * 2);
        if (!b)
            return c->failed = 1;
#pragma omp parallel for schedule(static) if (numel > (1 << 20))
        for (int64_t i = 0; i < numel; i++)
            b[i] = st_f32_to_bf16(data[i]);
        c->owned[c->n_owned++] = b;
        t->data = b;
    }
    return 0;
}

static void collect_free(collect *c)
{
    for (int i = 0; i < c->n_owned; i++)
        free(c->owned[i]);
    for (int i = 0; i < c->n; i++)
        free(c->names[i]);
    free(c->owned);
    free(c->names);
    free(c->it);
}

static int write_index(const collect *c, const int *shard_of, int n_shards, const char *tmp,
                       dsv3_err *e)
{
    json_t *root = json_object(), *meta = json_object(), *wm = json_object();
    uint64_t total = 0;
    char fn[64];
    for (int i = 0; i < c->n; i++) {
        total += c->it[i].nbytes;
        snprintf(fn, sizeof fn, "model-%05d-of-%05d.safetensors", shard_of[i] + 1, n_shards);
        json_object_set_new(wm, c->it[i].name, json_string(fn));
    }
    json_object_set_new(meta, "total_size", json_integer((json_int_t)total));
    json_object_set_new(root, "metadata", meta);
    json_object_set_new(root, "weight_map", wm);
    char *s = json_dumps(root, JSON_INDENT(2));
    json_decref(root);
    char path[4200];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", tmp);
    if (!s)
        return err_set(e, "%s: out of memory", path);
    outfile of;
    int rc = outfile_open(&of, path, e);
    if (!rc) {
        if (fputs(s, of.f) == EOF || fputc('\n', of.f) == EOF) {
            outfile_abort(&of);
            rc = err_errno(e, "%s", path);
        } else {
            rc = outfile_commit(&of, e);
        }
    }
    free(s);
    return rc;
}

static int write_tensors(const collect *c, const char *tmp, uint64_t max, dsv3_err *e)
{
    int *shard_of = malloc((size_t)(c->n ? c->n : 1) * sizeof *shard_of);
    if (!shard_of)
        return err_set(e, "%s: out of memory", tmp);
    int n_shards = 0;
    uint64_t in_shard = 0;
    for (int i = 0; i < c->n; i++) {
        if (i == 0 || (max && in_shard > 0 && in_shard + c->it[i].nbytes > max)) {
            n_shards++;
            in_shard = 0;
        }
        shard_of[i] = n_shards - 1;
        in_shard += c->it[i].nbytes;
    }
    int rc = 0;
    char path[4200];
    for (int s = 0; s < n_shards && !rc; s++) {
        st_writer w = {0};
        for (int i = 0; i < c->n; i++)
            if (shard_of[i] == s)
                st_add(&w, c->it[i].name, c->dtype, c->it[i].ndim, c->it[i].shape,
                       c->it[i].data);
        if (n_shards == 1)
            snprintf(path, sizeof path, "%s/model.safetensors", tmp);
        else
            snprintf(path, sizeof path, "%s/model-%05d-of-%05d.safetensors", tmp, s + 1,
                     n_shards);
        rc = st_write(&w, path, e);
        st_writer_free(&w);
    }
    if (!rc && n_shards > 1)
        rc = write_index(c, shard_of, n_shards, tmp, e);
    free(shard_of);
    return rc;
}

int ckpt_save(const dsv3_model *m, const char *dir, const ckpt_opts *opts, dsv3_err *e)
{
    ckpt_opts o = opts ? *opts : (ckpt_opts){0};
    if (o.dtype != ST_F32 && o.dtype != ST_BF16)
        return err_set(e, "%s: checkpoints are written in F32 or BF16, not %s", dir,
                       st_dtype_name(o.dtype));
    outdir d;
    if (outdir_open(&d, dir, 1, e))  /* an existing checkpoint folder is replaced whole */
        return -1;
    collect c = {.dtype = o.dtype};
    model_each_saved(m, collect_one, &c);
    int rc = c.failed ? err_set(e, "%s: out of memory", dir) : 0;
    char path[4200];
    snprintf(path, sizeof path, "%s/config.json", d.tmp);
    if (!rc)
        rc = config_save(&m->cfg, path, e);
    if (!rc)
        rc = write_tensors(&c, d.tmp, o.max_shard_bytes, e);
    collect_free(&c);
    if (rc) {
        outdir_abort(&d);
        return -1;
    }
    return outdir_commit(&d, e);
}

int ckpt_load(dsv3_model *m, const char *dir, int flags, dsv3_err *e)
{
    return model_load_flags(m, dir, flags, e);
}
