/* epckpt: expert-parallel checkpoint files (see epckpt.h). */
#include "epckpt.h"

#include <jansson.h>
#include <stdio.h>
#include <string.h>

#include "config.h"
#include "outfile.h"
#include "safetensors.h"

void epckpt_optim_name(char *buf, size_t n, int group, int groups)
{
    snprintf(buf, n, "optim-experts-%05d-of-%05d.safetensors", group, groups);
}

void epckpt_optim_piece_name(char *buf, size_t n, int group, int groups, int replica,
                             int replicas)
{
    if (replicas <= 1)
        epckpt_optim_name(buf, n, group, groups);
    else
        snprintf(buf, n, "optim-experts-%05d-of-%05d-part%05d-of-%05d.safetensors", group,
                 groups, replica, replicas);
}

static void shard_name(char *buf, size_t n, int group, int groups)
{
    snprintf(buf, n, "model-%05d-of-%05d.safetensors", group + 1, groups);
}

/* A routed expert's tensor name: its layer, expert and the rest ("gate_proj.weight"). */
static int expert_name(const char *name, int *l, int *x, const char **rest)
{
    int end = 0;
    if (sscanf(name, "model.layers.%d.mlp.experts.%d.%n", l, x, &end) != 2 || !end)
        return 0;
    *rest = name + end;
    return 1;
}

typedef struct collect {
    st_writer w;
    int all;           /* rank 0: every held tensor; else the routed experts only */
    json_t *map;       /* rank 0: the index's weight_map */
    int groups, per;
    uint64_t bytes;
} collect;

static int add_tensor(void *ctx, const char *name, int ndim, const int64_t *shape,
                      const float *data)
{
    collect *c = ctx;
    int l, x;
    const char *rest;
    int expert = expert_name(name, &l, &x, &rest);
    if (!expert && !c->all)
        return 0;
    st_add(&c->w, name, ST_F32, ndim, shape, data);
    if (!c->map)
        return 0;
    int64_t numel = ndim == 1 ? shape[0] : shape[0] * shape[1];
    char file[64], other[128];
    /* rank 0 holds group 0: expert x of group 0 stands for x + g * per of every group g */
    for (int g = 0; g < (expert ? c->groups : 1); g++) {
        shard_name(file, sizeof file, g, c->groups);
        if (expert)
            snprintf(other, sizeof other, "model.layers.%d.mlp.experts.%d.%s", l,
                     x + g * c->per, rest);
        json_object_set_new(c->map, expert ? other : name, json_string(file));
        c->bytes += (uint64_t)numel * 4;
    }
    return 0;
}

static int write_index(const char *dir, collect *c, dsv3_err *e)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    json_t *root = json_pack("{s:{s:I}, s:O}", "metadata", "total_size", (json_int_t)c->bytes,
                             "weight_map", c->map);
    outfile o;
    int rc = !root ? err_set(e, "%s: out of memory", path) : outfile_open(&o, path, e);
    if (!rc) {
        if (json_dumpf(root, o.f, JSON_INDENT(2)) || fputc('\n', o.f) == EOF) {
            outfile_abort(&o);
            rc = err_set(e, "%s: write failed", path);
        } else {
            rc = outfile_commit(&o, e);
        }
    }
    json_decref(root);
    return rc;
}

int epckpt_save_model(const dsv3_model *m, const ep *p, const char *dir, dsv3_err *e)
{
    if (p->rank >= p->size)
        return 0;
    char path[4200], file[64];
    int rc = 0;
    if (p->rank == 0) {
        snprintf(path, sizeof path, "%s/config.json", dir);
        rc = config_save(&m->cfg, path, e);
    }
    collect c = {.all = p->rank == 0, .groups = p->size, .per = p->per};
    if (!rc && p->rank == 0 && !(c.map = json_object()))
        rc = err_set(e, "out of memory");
    if (!rc) {
        model_each_saved(m, add_tensor, &c);
        shard_name(file, sizeof file, p->group, p->size);
        snprintf(path, sizeof path, "%s/%s", dir, file);
        rc = st_write(&c.w, path, e);
    }
    if (!rc && c.map)
        rc = write_index(dir, &c, e);
    st_writer_free(&c.w);
    json_decref(c.map);
    return rc;
}
