/* hfdir: HF checkpoint folders, every shard mapped. See hfdir.h. */
#include "hfdir.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int cmp_ent(const void *a, const void *b)
{
    return strcmp(((const hfdir_entry *)a)->name, ((const hfdir_entry *)b)->name);
}

/* Reads the index: the sorted, distinct shard names into h->file_names; the weight map
 * stays in *wm (a reference the caller drops). */
static int read_index(hfdir *h, const char *path, json_t **root_out, dsv3_err *e)
{
    json_error_t je;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!root)
        return err_set(e, "%s: %s (line %d)", path, je.text, je.line);
    json_t *wm = json_object_get(root, "weight_map");
    if (!json_is_object(wm)) {
        json_decref(root);
        return err_set(e, "%s: no \"weight_map\" object", path);
    }
    size_t n = json_object_size(wm);
    h->file_names = calloc(n ? n : 1, sizeof *h->file_names);
    if (!h->file_names) {
        json_decref(root);
        return err_set(e, "%s: out of memory", path);
    }
    const char *key;
    json_t *v;
    json_object_foreach(wm, key, v) {
        const char *fn = json_is_string(v) ? json_string_value(v) : NULL;
        if (!fn || !*fn || strchr(fn, '/') || !strcmp(fn, ".") || !strcmp(fn, "..")) {
            err_set(e, "%s: weight_map[\"%s\"] is not a file name in the folder", path, key);
            json_decref(root);  /* after the message: key lives in root */
            return -1;
        }
        int seen = 0;
        for (int i = 0; i < h->n_files && !seen; i++)
            seen = !strcmp(h->file_names[i], fn);
        if (!seen && !(h->file_names[h->n_files++] = strdup(fn))) {
            json_decref(root);
            return err_set(e, "%s: out of memory", path);
        }
    }
    qsort(h->file_names, (size_t)h->n_files, sizeof *h->file_names, cmp_str);
    *root_out = root;
    return 0;
}

/* Each index entry is in the shard it names; each shard's tensor is listed for it. */
static int check_index(const hfdir *h, const char *ipath, json_t *wm, dsv3_err *e)
{
    const char *key;
    json_t *v;
    json_object_foreach(wm, key, v) {
        const char *fn = json_string_value(v);
        int f = 0;
        while (strcmp(h->file_names[f], fn))
            f++;
        if (!st_find(&h->files[f], key))
            return err_set(e, "%s: the index puts tensor \"%s\" in %s, which does not hold it",
                           ipath, key, fn);
    }
    for (int f = 0; f < h->n_files; f++)
        for (int i = 0; i < h->files[f].n; i++) {
            const char *name = h->files[f].t[i].name;
            json_t *fv = json_object_get(wm, name);
            if (!fv)
                return err_set(e, "%s: tensor \"%s\" is not in the index %s",
                               h->files[f].path, name, ipath);
            if (strcmp(json_string_value(fv), h->file_names[f]))
                return err_set(e, "%s: tensor \"%s\" is also here, but the index puts it in %s",
                               h->files[f].path, name, json_string_value(fv));
        }
    return 0;
}

static int open_files(hfdir *h, dsv3_err *e)
{
    char path[4400];
    h->files = calloc((size_t)(h->n_files ? h->n_files : 1), sizeof *h->files);
    if (!h->files)
        return err_set(e, "%s: out of memory", h->dir);
    for (int f = 0; f < h->n_files; f++) {
        snprintf(path, sizeof path, "%s/%s", h->dir, h->file_names[f]);
        struct stat sb;
        if (h->indexed && stat(path, &sb) != 0)
            return err_errno(e, "%s: shard named in model.safetensors.index.json", path);
        if (st_open(&h->files[f], path, e))
            return -1;
    }
    return 0;
}

static int build_lookup(hfdir *h, dsv3_err *e)
{
    int n = 0;
    for (int f = 0; f < h->n_files; f++)
        n += h->files[f].n;
    h->ent = calloc((size_t)(n ? n : 1), sizeof *h->ent);
    if (!h->ent)
        return err_set(e, "%s: out of memory", h->dir);
    for (int f = 0; f < h->n_files; f++)
        for (int i = 0; i < h->files[f].n; i++) {
            const st_tensor *t = &h->files[f].t[i];
            h->ent[h->n_ent++] = (hfdir_entry){t->name, f, t};
            h->data_bytes += t->nbytes;
        }
    qsort(h->ent, (size_t)h->n_ent, sizeof *h->ent, cmp_ent);
    for (int i = 1; i < h->n_ent; i++)
        if (!strcmp(h->ent[i].name, h->ent[i - 1].name))
            return err_set(e, "%s: tensor \"%s\" is in both %s and %s", h->dir, h->ent[i].name,
                           h->file_names[h->ent[i - 1].file], h->file_names[h->ent[i].file]);
    return 0;
}

int hfdir_open(hfdir *h, const char *dir, dsv3_err *e)
{
    memset(h, 0, sizeof *h);
    char path[4400];
    struct stat sb;
    if (stat(dir, &sb) != 0)
        return err_errno(e, "%s", dir);
    if (!S_ISDIR(sb.st_mode))
        return err_set(e, "%s: not a folder", dir);
    if (!(h->dir = strdup(dir)))
        return err_set(e, "%s: out of memory", dir);
    snprintf(path, sizeof path, "%s/config.json", dir);
    int rc = config_load(&h->cfg, path, e);
    json_t *root = NULL;
    if (!rc) {
        snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
        if (stat(path, &sb) == 0) {
            h->indexed = 1;
            rc = read_index(h, path, &root, e);
        } else {
            h->file_names = calloc(1, sizeof *h->file_names);
            if (!h->file_names || !(h->file_names[0] = strdup("model.safetensors")))
                rc = err_set(e, "%s: out of memory", dir);
            else
                h->n_files = 1;
        }
    }
    if (!rc)
        rc = open_files(h, e);
    if (!rc && root)
        rc = check_index(h, path, json_object_get(root, "weight_map"), e);
    if (!rc)
        rc = build_lookup(h, e);
    json_decref(root);
    if (rc)
        hfdir_close(h);
    return rc;
}

void hfdir_close(hfdir *h)
{
    if (h->files)
        for (int f = 0; f < h->n_files; f++)
            st_close(&h->files[f]);
    if (h->file_names)
        for (int f = 0; f < h->n_files; f++)
            free(h->file_names[f]);
    free(h->files);
    free(h->file_names);
    free(h->ent);
    free(h->dir);
    if (h->cfg.json)
        config_free(&h->cfg);
    memset(h, 0, sizeof *h);
}

int hfdir_index(const hfdir *h, const char *name)
{
    hfdir_entry key = {.name = name};
    const hfdir_entry *x = bsearch(&key, h->ent, (size_t)h->n_ent, sizeof *h->ent, cmp_ent);
    return x ? (int)(x - h->ent) : -1;
}

const st_tensor *hfdir_find(const hfdir *h, const char *name, int *file)
{
    int i = hfdir_index(h, name);
    if (file)
        *file = i < 0 ? -1 : h->ent[i].file;
    return i < 0 ? NULL : h->ent[i].t;
}
