/* optim: AdamW with BF16 moments and global-norm clipping (see optim.h). */
#include "optim.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "safetensors.h"

void optim_params_default(optim_params *p)
{
    p->beta1 = 0.9;
    p->beta2 = 0.95;
    p->eps = 1e-8;
    p->weight_decay = 0.1;
}

int optim_init(optim *o, const dsv3_model *model, const optim_params *p, dsv3_err *e)
{
    return optim_init_range(o, model, p, 0, model->n_params, e);
}

int optim_init_range(optim *o, const dsv3_model *model, const optim_params *p, size_t lo,
                     size_t hi, dsv3_err *e)
{
    memset(o, 0, sizeof *o);
    if (lo > hi || hi > model->n_params)
        return err_set(e, "optim: range [%zu, %zu) outside the %zu parameters", lo, hi,
                       model->n_params);
    o->p = *p;
    o->lo = lo;
    o->n = hi - lo;
    /* calloc: bf16 zero is all-zero bits. */
    o->m = calloc(o->n ? o->n : 1, sizeof *o->m);
    o->v = calloc(o->n ? o->n : 1, sizeof *o->v);
    if (!o->m || !o->v) {
        size_t mib = o->n * 4 >> 20;
        optim_free(o);
        return err_set(e, "optim: cannot allocate %zu MiB for the Adam moments", mib);
    }
    return 0;
}

void optim_free(optim *o)
{
    free(o->m);
    free(o->v);
    memset(o, 0, sizeof *o);
}

int optim_decays(const model_tensor *t)
{
    return t->trainable && t->ndim == 2;
}

/* The part [*a, *b) of tensor t inside [lo, hi); 0 when empty. */
static int part(const model_tensor *t, size_t lo, size_t hi, size_t *a, size_t *b)
{
    size_t s = t->off > lo ? t->off : lo, end = t->off + (size_t)t->numel;
    if (end > hi)
        end = hi;
    if (s >= end)
        return 0;
    *a = s;
    *b = end;
    return 1;
}

double optim_grad_sumsq(const dsv3_model *m, const float *g, size_t lo, size_t hi)
{
    double s = 0;
    size_t a, b;
    for (int i = 0; i < m->n_t; i++) {
        if (!m->t[i].trainable || !part(&m->t[i], lo, hi, &a, &b))
            continue;
        for (size_t j = a; j < b; j++)
            s += (double)g[j - lo] * g[j - lo];
    }
    return s;
}

double optim_grad_norm(const dsv3_model *m)
{
    return sqrt(optim_grad_sumsq(m, m->grads, 0, m->n_params));
}

double optim_clip_range(const dsv3_model *m, float *g, size_t lo, size_t hi, double norm,
                        double max_norm)
{
    if (max_norm <= 0 || !(norm > max_norm))
        return 1.0;
    float f = (float)(max_norm / norm);
    size_t a, b;
    for (int i = 0; i < m->n_t; i++) {
        if (!m->t[i].trainable || !part(&m->t[i], lo, hi, &a, &b))
            continue;
        for (size_t j = a; j < b; j++)
            g[j - lo] *= f;
    }
    return f;
}

double optim_clip(dsv3_model *m, double norm, double max_norm)
{
    return optim_clip_range(m, m->grads, 0, m->n_params, norm, max_norm);
}

void optim_step_grads(optim *o, dsv3_model *m, const float *g, double lr)
{
    o->t++;
    const float b1 = (float)o->p.beta1, b2 = (float)o->p.beta2;
    /* Bias corrections in double, then the per-element work in float. */
    const float c1 = (float)(1.0 / (1.0 - pow(o->p.beta1, (double)o->t)));
    const float c2 = (float)(1.0 / (1.0 - pow(o->p.beta2, (double)o->t)));
    const float eps = (float)o->p.eps, flr = (float)lr;
    size_t lo = o->lo, a, b;
    for (int i = 0; i < m->n_t; i++) {
        const model_tensor *t = &m->t[i];
        if (!t->trainable || !part(t, lo, lo + o->n, &a, &b))
            continue;
        const float decay = optim_decays(t) ? (float)(lr * o->p.weight_decay) : 0.0f;
        float *p = m->params + a;
        const float *gg = g + (a - lo);
        uint16_t *mm = o->m + (a - lo), *vv = o->v + (a - lo);
        for (size_t j = 0; j < b - a; j++) {
            float mj = b1 * st_bf16_to_f32(mm[j]) + (1.0f - b1) * gg[j];
            float vj = b2 * st_bf16_to_f32(vv[j]) + (1.0f - b2) * gg[j] * gg[j];
            mm[j] = st_f32_to_bf16(mj);
            vv[j] = st_f32_to_bf16(vj);
            mj = st_bf16_to_f32(mm[j]);
            vj = st_bf16_to_f32(vv[j]);
            float upd = (mj * c1) / (sqrtf(vj * c2) + eps);
            /* Decoupled decay (Loshchilov & Hutter) from the weight before this update. */
            p[j] = p[j] - flr * upd - decay * p[j];
        }
    }
}

void optim_step(optim *o, dsv3_model *m, double lr)
{
    optim_step_grads(o, m, m->grads + o->lo, lr);
}

int optim_save(const optim *o, const dsv3_model *m, const char *path, dsv3_err *e)
{
    if (o->lo != 0 || o->n != m->n_params)
        return err_set(e, "%s: a sharded optimizer is saved with optim_save_shard", path);
    st_writer w = {0};
    char name[128];
    int64_t one = 1, step = (int64_t)o->t;
    st_add(&w, "optim.step", ST_I64, 1, &one, &step);
    for (int i = 0; i < m->n_t; i++) {
        const model_tensor *t = &m->t[i];
        if (!t->trainable)
            continue;
        snprintf(name, sizeof name, "%s.exp_avg", t->name);
        st_add(&w, name, ST_BF16, t->ndim, t->shape, o->m + t->off);
        snprintf(name, sizeof name, "%s.exp_avg_sq", t->name);
        st_add(&w, name, ST_BF16, t->ndim, t->shape, o->v + t->off);
    }
    int rc = st_write(&w, path, e);
    st_writer_free(&w);
    return rc;
}

static int load_moment(const st_file *f, const model_tensor *t, const char *suffix,
                       const optim *o, uint16_t *dst, dsv3_err *e)
{
    char name[128];
    snprintf(name, sizeof name, "%s.%s", t->name, suffix);
    const st_tensor *s = st_find(f, name);
    if (!s)
        return err_set(e, "%s: tensor \"%s\" is missing", f->path, name);
    if (s->dtype != ST_BF16 || s->ndim != t->ndim || s->shape[0] != t->shape[0] ||
        (t->ndim == 2 && s->shape[1] != t->shape[1]))
        return err_set(e, "%s: tensor \"%s\" is not BF16 of the model's shape", f->path, name);
    size_t a, b;
    if (part(t, o->lo, o->lo + o->n, &a, &b))
        memcpy(dst + (a - o->lo), (const uint16_t *)s->data + (a - t->off),
               (b - a) * sizeof *dst);
    return 0;
}

int optim_load(optim *o, const dsv3_model *m, const char *path, dsv3_err *e)
{
    st_file f;
    if (st_open(&f, path, e))
        return -1;
    int rc = 0;
    const st_tensor *s = st_find(&f, "optim.step");
    if (!s || s->dtype != ST_I64 || s->numel != 1 || ((const int64_t *)s->data)[0] < 0)
        rc = err_set(e, "%s: no valid \"optim.step\"", path);
    else {
        int64_t t;
        memcpy(&t, s->data, sizeof t);
        o->t = (uint64_t)t;
    }
    int n_expected = 1;
    for (int i = 0; i < m->n_t && !rc; i++) {
        const model_tensor *t = &m->t[i];
        if (!t->trainable)
            continue;
        n_expected += 2;
        rc = load_moment(&f, t, "exp_avg", o, o->m, e) ||
             load_moment(&f, t, "exp_avg_sq", o, o->v, e);
    }
    if (!rc && f.n != n_expected)
        rc = err_set(e, "%s: %d tensors where the model's layout has %d", path, f.n, n_expected);
    st_close(&f);
    return rc ? -1 : 0;
}

int optim_save_shard(const optim *o, const dsv3_model *m, int rank, int world,
                     const char *path, dsv3_err *e)
{
    st_writer w = {0};
    int64_t one = 1, five = 5, len = (int64_t)o->n, step = (int64_t)o->t;
    int64_t shard[5] = {rank, world, (int64_t)m->n_params, (int64_t)o->lo,
                        (int64_t)(o->lo + o->n)};
    st_add(&w, "optim.step", ST_I64, 1, &one, &step);
    st_add(&w, "optim.shard", ST_I64, 1, &five, shard);
    st_add(&w, "exp_avg", ST_BF16, 1, &len, o->m);
    st_add(&w, "exp_avg_sq", ST_BF16, 1, &len, o->v);
    int rc = st_write(&w, path, e);
    st_writer_free(&w);
    return rc;
}

int optim_load_shard(optim *o, const dsv3_model *m, const char *path, int rank, int world,
                     int64_t *step, size_t *covered, dsv3_err *e)
{
    st_file f;
    if (st_open(&f, path, e))
        return -1;
    const st_tensor *st = st_find(&f, "optim.step"), *sh = st_find(&f, "optim.shard");
    const st_tensor *mm = st_find(&f, "exp_avg"), *vv = st_find(&f, "exp_avg_sq");
    int64_t s = -1, d[5] = {0};
    if (st && st->dtype == ST_I64 && st->numel == 1)
        memcpy(&s, st->data, sizeof s);
    if (sh && sh->dtype == ST_I64 && sh->numel == 5)
        memcpy(d, sh->data, sizeof d);
    int rc = 0;
    if (s < 0 || !sh || !mm || !vv || f.n != 4)
        rc = err_set(e, "%s: not an optimizer shard (optim.step, optim.shard, exp_avg, "
                     "exp_avg_sq)", path);
    else if (d[0] != rank || d[1] != world || d[2] != (int64_t)m->n_params || d[3] < 0 ||
             d[4] < d[3] || d[4] > d[2])
        rc = err_set(e, "%s: shard %" PRId64 " of %" PRId64 " of %" PRId64 " parameters, "
                     "expected shard %d of %d of %zu", path, d[0], d[1], d[2], rank, world,
                     m->n_params);
    else if (mm->dtype != ST_BF16 || vv->dtype != ST_BF16 || mm->numel != d[4] - d[3] ||
             vv->numel != d[4] - d[3])
        rc = err_set(e, "%s: moments are not BF16 of the shard's %" PRId64 " elements", path,
                     d[4] - d[3]);
    else if (*step >= 0 && s != *step)
        rc = err_set(e, "%s: step %" PRId64 " where the other shards have %" PRId64, path, s,
                     *step);
    if (!rc) {
        size_t lo = (size_t)d[3], hi = (size_t)d[4];
        size_t a = lo > o->lo ? lo : o->lo, b = hi < o->lo + o->n ? hi : o->lo + o->n;
        *covered = a < b ? b - a : 0;
        if (a < b) {
            memcpy(o->m + (a - o->lo), (const uint16_t *)mm->data + (a - lo),
                   (b - a) * sizeof *o->m);
            memcpy(o->v + (a - o->lo), (const uint16_t *)vv->data + (a - lo),
                   (b - a) * sizeof *o->v);
        }
        *step = s;
        o->t = (uint64_t)s;
    }
    st_close(&f);
    return rc ? -1 : 0;
}
