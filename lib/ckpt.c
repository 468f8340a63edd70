#include "ckpt.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

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

static int fsync_path(const char *path, int dir)
{
    int fd = open(path, dir ? O_RDONLY | O_DIRECTORY : O_RDONLY);
    if (fd < 0)
        return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

/* Deletes a folder we wrote (plain files only, one level). */
static void remove_tree(const char *dir)
{
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *de;
        char p[4096];
        while ((de = readdir(d)))
            if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..")) {
                snprintf(p, sizeof p, "%s/%s", dir, de->d_name);
                unlink(p);
            }
        closedir(d);
    }
    rmdir(dir);
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

/* Puts the finished folder tmp at dir, swapping out any folder already there. */
static int commit_dir(const char *tmp, const char *dir, dsv3_err *e)
{
    if (fsync_path(tmp, 1))
        return err_errno(e, "%s: cannot sync", tmp);
    struct stat sb;
    if (stat(dir, &sb) != 0) {
        if (rename(tmp, dir))
            return err_errno(e, "%s: cannot rename %s into place", dir, tmp);
        return 0;
    }
    if (!S_ISDIR(sb.st_mode))
        return err_set(e, "%s: exists and is not a folder", dir);
    if (renameat2(AT_FDCWD, tmp, AT_FDCWD, dir, RENAME_EXCHANGE) == 0) {
        remove_tree(tmp);  /* now the old checkpoint */
        return 0;
    }
    /* No atomic exchange here: move the old folder aside first. */
    char old[4200];
    snprintf(old, sizeof old, "%s.old.%ld", tmp, (long)getpid());
    if (rename(dir, old))
        return err_errno(e, "%s: cannot move the old checkpoint aside", dir);
    if (rename(tmp, dir)) {
        int saved = errno;
        rename(old, dir);
        errno = saved;
        return err_errno(e, "%s: cannot rename %s into place", dir, tmp);
    }
    remove_tree(old);
    return 0;
}

int ckpt_save(const dsv3_model *m, const char *dir, const ckpt_opts *opts, dsv3_err *e)
{
    ckpt_opts o = opts ? *opts : (ckpt_opts){0};
    if (o.dtype != ST_F32 && o.dtype != ST_BF16)
        return err_set(e, "%s: checkpoints are written in F32 or BF16, not %s", dir,
                       st_dtype_name(o.dtype));
    char *c1 = strdup(dir), *c2 = strdup(dir);
    char tmp[4096];
    int oom = !c1 || !c2;
    if (!oom) {
        /* strip trailing slashes so basename names the folder */
        size_t l = strlen(c2);
        while (l > 1 && c2[l - 1] == '/')
            c2[--l] = 0;
        snprintf(tmp, sizeof tmp, "%s/.%s.tmp.%ld", dirname(c1), basename(c2), (long)getpid());
    }
    free(c1);
    free(c2);
    if (oom)
        return err_set(e, "%s: out of memory", dir);
    remove_tree(tmp);  /* a leftover of an earlier crash with our pid */
    if (mkdir(tmp, 0777))
        return err_errno(e, "%s: cannot create %s", dir, tmp);
    collect c = {.dtype = o.dtype};
    model_each_saved(m, collect_one, &c);
    int rc = c.failed ? err_set(e, "%s: out of memory", dir) : 0;
    char path[4200];
    snprintf(path, sizeof path, "%s/config.json", tmp);
    if (!rc)
        rc = config_save(&m->cfg, path, e);
    if (!rc)
        rc = write_tensors(&c, tmp, o.max_shard_bytes, e);
    collect_free(&c);
    if (!rc)
        rc = commit_dir(tmp, dir, e);
    if (rc) {
        remove_tree(tmp);
        return -1;
    }
    /* The rename itself is durable once the parent folder is synced. */
    char *c3 = strdup(dir);
    if (c3) {
        fsync_path(dirname(c3), 1);
        free(c3);
    }
    return 0;
}

int ckpt_load(dsv3_model *m, const char *dir, int flags, dsv3_err *e)
{
    return model_load_flags(m, dir, flags, e);
}
