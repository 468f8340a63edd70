/* epckpt: expert-parallel checkpoint files (see epckpt.h). */
#include "epckpt.h"

#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "dp.h"
#include "outfile.h"
#include "safetensors.h"
#include "trainckpt.h"

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

/* ---- the optimizer state of any layout, for any other (epckpt_load_optim) ----
 *
 * The layouts (lib/model): the whole model is every tensor in checkpoint order, a MoE
 * block's E routed experts contiguous right after its router's correction bias, expert x
 * being its gate, up and down matrices of mi x H elements each. Under --ep N the array is
 * the replicated tensors in the same order (n_rep elements), then group g's experts of
 * every block in order. So a tensor's place in any layout follows from the held tensors
 * alone: the replicated ones are all held, and the experts not held are all alike. */

typedef struct geom {
    int E, blocks;          /* routed experts a block, MoE blocks (main and MTP) */
    size_t part, S;         /* one expert matrix's elements, one expert's (3 matrices) */
    size_t n_rep, n_full;   /* the replicated part, the whole model */
} geom;

/* A run of o's elements and where they are in the checkpoint: space -1 is the flat array
 * of the optim-rank shards (the whole model, or the replicated part under --ep), g >= 0
 * expert group g's files (in their own coordinates: n_rep + the group's expert offset). */
typedef struct seg {
    int space, tensor;
    size_t src, dst, len, in;   /* file offset, offset in o, elements, offset in the tensor */
} seg;

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && !strcmp(s + n - k, suffix);
}

static int expert_part(const char *name)
{
    return ends_with(name, ".gate_proj.weight") ? 0 : ends_with(name, ".up_proj.weight") ? 1
         : ends_with(name, ".down_proj.weight") ? 2 : -1;
}

static int is_router_bias(const char *name)
{
    return ends_with(name, ".mlp.gate.e_score_correction_bias");
}

static void make_geom(const dsv3_model *m, geom *g)
{
    memset(g, 0, sizeof *g);
    g->E = m->cfg.n_routed_experts;
    g->part = (size_t)m->cfg.moe_intermediate_size * (size_t)m->cfg.hidden_size;
    g->S = 3 * g->part;
    for (int i = 0; i < m->n_t; i++) {
        if (m->t[i].expert < 0)
            g->n_rep += (size_t)m->t[i].numel;
        g->blocks += is_router_bias(m->t[i].name);
    }
    g->n_full = g->n_rep + (size_t)g->blocks * (size_t)g->E * g->S;
}

/* The runs of o's trainable elements and their places in a checkpoint of --ep ep_old
 * (every tensor's place in m's own layout checked on the way: a layout this code does not
 * know is refused rather than misread). */
static int plan(const dsv3_model *m, const geom *g, int ep_old, const optim *o, seg **out,
                int *n_out, dsv3_err *e)
{
    seg *v = NULL;
    int n = 0, b = 0;
    size_t rep = 0, E = (size_t)g->E, per_old = E / (size_t)ep_old;
    size_t per_new = E / (size_t)(m->ep_size > 1 ? m->ep_size : 1);
    for (int i = 0; i < m->n_t; i++) {
        const model_tensor *t = &m->t[i];
        size_t full, own, src;
        int space = -1;
        if (t->expert < 0) {
            full = rep + (size_t)b * E * g->S;
            own = m->ep_size > 1 ? rep : full;
            src = ep_old > 1 ? rep : full;
            rep += (size_t)t->numel;
            b += is_router_bias(t->name);
        } else {
            int k = expert_part(t->name);
            size_t x = (size_t)t->expert, blk = (size_t)(b - 1);
            if (k < 0 || b < 1 || (size_t)t->numel != g->part) {
                free(v);
                return err_set(e, "optimizer reassembly: tensor %s is not an expert matrix "
                               "of the layout it knows", t->name);
            }
            full = rep + blk * E * g->S + x * g->S + (size_t)k * g->part;
            own = m->ep_size > 1 ? m->n_dense + blk * per_new * g->S +
                                       (x - (size_t)m->ep_group * per_new) * g->S +
                                       (size_t)k * g->part
                                 : full;
            if (ep_old > 1) {
                space = (int)(x / per_old);
                src = g->n_rep + blk * per_old * g->S + (x - (size_t)space * per_old) * g->S +
                      (size_t)k * g->part;
            } else {
                src = full;
            }
        }
        if (own != t->off) {
            free(v);
            return err_set(e, "optimizer reassembly: tensor %s sits at %zu, not %zu as the "
                           "layout it knows", t->name, t->off, own);
        }
        size_t a = t->off > o->lo ? t->off : o->lo;
        size_t z = t->off + (size_t)t->numel, lim = o->lo + o->n;
        if (z > lim)
            z = lim;
        if (!t->trainable || a >= z)
            continue;
        if (!(n & (n - 1))) {  /* grow at powers of two */
            seg *nv = realloc(v, (size_t)(n ? 2 * n : 1) * sizeof *v);
            if (!nv) {
                free(v);
                return err_set(e, "out of memory");
            }
            v = nv;
        }
        v[n++] = (seg){space, i, src + (a - t->off), a - o->lo, z - a, a - t->off};
    }
    *out = v;
    *n_out = n;
    return 0;
}

/* One optimizer file of the checkpoint: its name and the shard header it must carry. */
typedef struct src_file {
    char name[96];
    int rank, world;
    int64_t tag;            /* the writer's n_params */
    size_t lo, hi;
} src_file;

/* The files of one space (see seg) of a checkpoint by `world` ranks with --ep ep_old. */
static int space_files(const char *dir, const geom *g, int world, int ep_old, int space,
                       src_file **out, int *n_out, dsv3_err *e)
{
    int D = world / ep_old, whole = 0;
    size_t n_grp = (size_t)g->blocks * (size_t)(g->E / ep_old) * g->S;
    int64_t tag = (int64_t)(ep_old > 1 ? g->n_rep + n_grp : g->n_full);
    if (space >= 0 && D > 1) {  /* pieces, or (written before the sharding) the group whole */
        char path[4300], name[96];
        epckpt_optim_piece_name(name, sizeof name, space, ep_old, 0, D);
        snprintf(path, sizeof path, "%s/%s", dir, name);
        epckpt_optim_name(name, sizeof name, space, ep_old);
        char wpath[4300];
        snprintf(wpath, sizeof wpath, "%s/%s", dir, name);
        whole = access(path, F_OK) != 0 && access(wpath, F_OK) == 0;
    }
    int n = space < 0 ? world : D > 1 && !whole ? D : 1;
    src_file *f = calloc((size_t)n, sizeof *f);
    if (!f)
        return err_set(e, "out of memory");
    ep q = {.replicas = D};
    for (int i = 0; i < n; i++) {
        f[i].tag = tag;
        if (space < 0) {
            dp_shard_range(ep_old > 1 ? g->n_rep : g->n_full, world, i, &f[i].lo, &f[i].hi);
            trainckpt_shard_name(f[i].name, sizeof f[i].name, i, world);
            f[i].rank = i;
            f[i].world = world;
        } else if (n == 1) {
            f[i].lo = g->n_rep;
            f[i].hi = g->n_rep + n_grp;
            epckpt_optim_name(f[i].name, sizeof f[i].name, space, ep_old);
            f[i].rank = space;
            f[i].world = ep_old;
        } else {
            ep_piece(&q, n_grp, i, &f[i].lo, &f[i].hi);
            f[i].lo += g->n_rep;
            f[i].hi += g->n_rep;
            epckpt_optim_piece_name(f[i].name, sizeof f[i].name, space, ep_old, i, D);
            f[i].rank = space * D + i;
            f[i].world = ep_old * D;
        }
    }
    *out = f;
    *n_out = n;
    return 0;
}

static int check_step(const char *path, int64_t s, int64_t *step, dsv3_err *e)
{
    if (*step >= 0 && s != *step)
        return err_set(e, "%s: step %" PRId64 " where the other optimizer files have %" PRId64,
                       path, s, *step);
    *step = s;
    return 0;
}

/* Opens a shard file, checks its header against f, and copies the runs of `space` it holds
 * into o. */
static int read_shard(const char *dir, const src_file *f, const seg *s, int ns, int space,
                      optim *o, int64_t *step, size_t *covered, dsv3_err *e)
{
    char path[4300];
    snprintf(path, sizeof path, "%s/%s", dir, f->name);
    st_file sf;
    if (st_open(&sf, path, e))
        return -1;
    const st_tensor *st = st_find(&sf, "optim.step"), *sh = st_find(&sf, "optim.shard");
    const st_tensor *mm = st_find(&sf, "exp_avg"), *vv = st_find(&sf, "exp_avg_sq");
    int64_t st_step = -1, d[5] = {0};
    if (st && st->dtype == ST_I64 && st->numel == 1)
        memcpy(&st_step, st->data, sizeof st_step);
    if (sh && sh->dtype == ST_I64 && sh->numel == 5)
        memcpy(d, sh->data, sizeof d);
    int rc = 0;
    if (st_step < 0 || !sh || !mm || !vv || sf.n != 4)
        rc = err_set(e, "%s: not an optimizer shard (optim.step, optim.shard, exp_avg, "
                     "exp_avg_sq)", path);
    else if (d[0] != f->rank || d[1] != f->world || d[2] != f->tag || d[3] != (int64_t)f->lo ||
             d[4] != (int64_t)f->hi)
        rc = err_set(e, "%s: shard %" PRId64 " of %" PRId64 " of %" PRId64 " parameters "
                     "[%" PRId64 ", %" PRId64 "), expected shard %d of %d of %" PRId64
                     " [%zu, %zu) (another model or layout than state.json says?)", path, d[0],
                     d[1], d[2], d[3], d[4], f->rank, f->world, f->tag, f->lo, f->hi);
    else if (mm->dtype != ST_BF16 || vv->dtype != ST_BF16 ||
             mm->numel != (int64_t)(f->hi - f->lo) || vv->numel != (int64_t)(f->hi - f->lo))
        rc = err_set(e, "%s: moments are not BF16 of the shard's %zu elements", path,
                     f->hi - f->lo);
    else
        rc = check_step(path, st_step, step, e);
    for (int i = 0; i < ns && !rc; i++) {
        if (s[i].space != space)
            continue;
        size_t a = s[i].src > f->lo ? s[i].src : f->lo;
        size_t z = s[i].src + s[i].len < f->hi ? s[i].src + s[i].len : f->hi;
        if (a >= z)
            continue;
        size_t to = s[i].dst + (a - s[i].src);
        memcpy(o->m + to, (const uint16_t *)mm->data + (a - f->lo), (z - a) * sizeof *o->m);
        memcpy(o->v + to, (const uint16_t *)vv->data + (a - f->lo), (z - a) * sizeof *o->v);
        *covered += z - a;
    }
    st_close(&sf);
    return rc;
}

/* A single process's optim.safetensors: the runs by tensor name. */
static int read_named(const char *dir, const dsv3_model *m, const seg *s, int ns, optim *o,
                      int64_t *step, size_t *covered, dsv3_err *e)
{
    char path[4300], name[128];
    snprintf(path, sizeof path, "%s/optim.safetensors", dir);
    st_file sf;
    if (st_open(&sf, path, e))
        return -1;
    const st_tensor *st = st_find(&sf, "optim.step");
    int64_t st_step = -1;
    if (st && st->dtype == ST_I64 && st->numel == 1)
        memcpy(&st_step, st->data, sizeof st_step);
    int rc = st_step < 0 ? err_set(e, "%s: no valid \"optim.step\"", path)
                         : check_step(path, st_step, step, e);
    for (int i = 0; i < ns && !rc; i++) {
        const model_tensor *t = &m->t[s[i].tensor];
        uint16_t *dst[2] = {o->m, o->v};
        for (int k = 0; k < 2 && !rc; k++) {
            snprintf(name, sizeof name, "%s.%s", t->name, k ? "exp_avg_sq" : "exp_avg");
            const st_tensor *x = st_find(&sf, name);
            if (!x)
                rc = err_set(e, "%s: tensor \"%s\" is missing", path, name);
            else if (x->dtype != ST_BF16 || x->numel != t->numel)
                rc = err_set(e, "%s: tensor \"%s\" is not BF16 of the model's shape", path,
                             name);
            else
                memcpy(dst[k] + s[i].dst, (const uint16_t *)x->data + s[i].in,
                       s[i].len * sizeof *o->m);
        }
        if (!rc)
            *covered += s[i].len;
    }
    st_close(&sf);
    return rc;
}

int epckpt_load_optim(const char *dir, uint32_t world, uint32_t ep, optim *o,
                      const dsv3_model *m, dsv3_err *e)
{
    geom g;
    make_geom(m, &g);
    if (ep < 1 || world < 1 || world % ep || (ep > 1 && g.E % (int)ep))
        return err_set(e, "%s: --ep %u on %u ranks does not split the model's %d routed "
                       "experts", dir, ep, world, g.E);
    if (m->ep_size > 1 && m->n_dense != g.n_rep)
        return err_set(e, "optimizer reassembly: the model's replicated part is %zu elements, "
                       "not %zu", m->n_dense, g.n_rep);
    seg *s = NULL;
    int ns = 0;
    if (plan(m, &g, (int)ep, o, &s, &ns, e))
        return -1;
    int64_t step = -1;
    size_t want = 0, covered = 0;
    for (int i = 0; i < ns; i++)
        want += s[i].len;
    int rc = 0;
    if (world == 1) {
        rc = read_named(dir, m, s, ns, o, &step, &covered, e);
    } else {
        /* each space's files, those holding a run read (the flat space's first always when
         * nothing else is: the step count comes with every file) */
        int opened = 0;
        for (int space = -1; space < (ep > 1 ? (int)ep : 0) && !rc; space++) {
            size_t lo = SIZE_MAX, hi = 0;
            for (int i = 0; i < ns; i++)
                if (s[i].space == space) {
                    lo = s[i].src < lo ? s[i].src : lo;
                    hi = s[i].src + s[i].len > hi ? s[i].src + s[i].len : hi;
                }
            if (lo >= hi && !(space == -1 && ns == 0))
                continue;
            src_file *f;
            int nf;
            if (space_files(dir, &g, (int)world, (int)ep, space, &f, &nf, e)) {
                rc = -1;
                break;
            }
            for (int k = 0; k < nf && !rc; k++)
                if ((f[k].lo < hi && f[k].hi > lo) || (ns == 0 && k == 0)) {
                    rc = read_shard(dir, &f[k], s, ns, space, o, &step, &covered, e);
                    opened++;
                }
            free(f);
        }
        if (!rc && !opened)
            rc = err_set(e, "%s: no optimizer file read", dir);
    }
    free(s);
    if (rc)
        return -1;
    if (covered != want)
        return err_set(e, "%s: the optimizer files cover %zu of the %zu trainable elements "
                       "of this rank's range", dir, covered, want);
    o->t = (uint64_t)step;
    return 0;
}
