/* optim: AdamW with BF16 moments and global-norm clipping (see optim.h). */
#include "optim.h"

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
    memset(o, 0, sizeof *o);
    o->p = *p;
    o->n = model->n_params;
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

double optim_grad_norm(const dsv3_model *m)
{
    double s = 0;
    for (int i = 0; i < m->n_t; i++) {
        if (!m->t[i].trainable)
            continue;
        const float *g = m->grads + m->t[i].off;
        for (int64_t j = 0; j < m->t[i].numel; j++)
            s += (double)g[j] * g[j];
    }
    return sqrt(s);
}

double optim_clip(dsv3_model *m, double norm, double max_norm)
{
    if (max_norm <= 0 || !(norm > max_norm))
        return 1.0;
    float f = (float)(max_norm / norm);
    for (int i = 0; i < m->n_t; i++) {
        if (!m->t[i].trainable)
            continue;
        float *g = m->grads + m->t[i].off;
        for (int64_t j = 0; j < m->t[i].numel; j++)
            g[j] *= f;
    }
    return f;
}

void optim_step(optim *o, dsv3_model *m, double lr)
{
    o->t++;
    const float b1 = (float)o->p.beta1, b2 = (float)o->p.beta2;
    /* Bias corrections in double, then the per-element work in float. */
    const float c1 = (float)(1.0 / (1.0 - pow(o->p.beta1, (double)o->t)));
    const float c2 = (float)(1.0 / (1.0 - pow(o->p.beta2, (double)o->t)));
    const float eps = (float)o->p.eps, flr = (float)lr;
    for (int i = 0; i < m->n_t; i++) {
        const model_tensor *t = &m->t[i];
        if (!t->trainable)
            continue;
        const float decay = optim_decays(t) ? (float)(lr * o->p.weight_decay) : 0.0f;
        float *p = m->params + t->off;
        const float *g = m->grads + t->off;
        uint16_t *mm = o->m + t->off, *vv = o->v + t->off;
        for (int64_t j = 0; j < t->numel; j++) {
            float mj = b1 * st_bf16_to_f32(mm[j]) + (1.0f - b1) * g[j];
            float vj = b2 * st_bf16_to_f32(vv[j]) + (1.0f - b2) * g[j] * g[j];
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

int optim_save(const optim *o, const dsv3_model *m, const char *path, dsv3_err *e)
{
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
                       uint16_t *dst, dsv3_err *e)
{
    char name[128];
    snprintf(name, sizeof name, "%s.%s", t->name, suffix);
    const st_tensor *s = st_find(f, name);
    if (!s)
        return err_set(e, "%s: tensor \"%s\" is missing", f->path, name);
    if (s->dtype != ST_BF16 || s->ndim != t->ndim || s->shape[0] != t->shape[0] ||
        (t->ndim == 2 && s->shape[1] != t->shape[1]))
        return err_set(e, "%s: tensor \"%s\" is not BF16 of the model's shape", f->path, name);
    memcpy(dst, s->data, (size_t)t->numel * sizeof *dst);
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
        rc = load_moment(&f, t, "exp_avg", o->m + t->off, e) ||
             load_moment(&f, t, "exp_avg_sq", o->v + t->off, e);
    }
    if (!rc && f.n != n_expected)
        rc = err_set(e, "%s: %d tensors where the model's layout has %d", path, f.n, n_expected);
    st_close(&f);
    return rc ? -1 : 0;
}
