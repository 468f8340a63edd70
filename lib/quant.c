/* quant: FP8 quantization of checkpoint folders. See quant.h. */
#include "quant.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "convert.h"
#include "fp8.h"
#include "hfdir.h"
#include "layout.h"
#include "outdir.h"
#include "progress.h"
#include "ststream.h"

enum { OP_COPY, OP_FLOAT, OP_QUANT, OP_SCALE, OP_DEQUANT };

typedef struct q_out {
    char name[160];
    const st_tensor *src;
    st_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    int op;
} q_out;

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && !strcmp(s + n - m, suffix);
}

static void set_out(q_out *q, const char *name, const st_tensor *src, st_dtype dt, int op)
{
    snprintf(q->name, sizeof q->name, "%s", name);
    q->src = src;
    q->dtype = dt;
    q->ndim = src->ndim;
    memcpy(q->shape, src->shape, sizeof q->shape);
    q->op = op;
}

/* The output tensors of one input file, in its order; returns how many. */
static int plan_file(const st_file *f, int dequant, q_out *q)
{
    int n = 0;
    for (int i = 0; i < f->n; i++) {
        const st_tensor *t = &f->t[i];
        int scale = ends_with(t->name, "_scale_inv");
        if (dequant) {
            if (scale)
                continue;
            set_out(&q[n++], t->name, t, t->dtype == ST_F8_E4M3 ? ST_BF16 : t->dtype,
                    t->dtype == ST_F8_E4M3 ? OP_DEQUANT : OP_COPY);
        } else if (scale || t->dtype == ST_F8_E4M3) {
            set_out(&q[n++], t->name, t, t->dtype, OP_COPY);  /* already FP8: kept */
        } else if (layout_is_fp8(t->name) && t->ndim == 2) {
            set_out(&q[n++], t->name, t, ST_F8_E4M3, OP_QUANT);
            char sn[160];
            snprintf(sn, sizeof sn, "%s_scale_inv", t->name);
            set_out(&q[n], sn, t, ST_F32, OP_SCALE);
            q[n].shape[0] = fp8_blocks(t->shape[0]);
            q[n].shape[1] = fp8_blocks(t->shape[1]);
            n++;
        } else {
            set_out(&q[n++], t->name, t,
                    ends_with(t->name, "e_score_correction_bias") ? ST_F32 : ST_BF16, OP_FLOAT);
        }
    }
    return n;
}

typedef struct bufs {
    float *f;
    uint8_t *q;
    float *s;
} bufs;

static int put_one(const hfdir *h, ststream *s, const q_out *q, bufs *b, int threads,
                   dsv3_err *e)
{
    const st_tensor *t = q->src;
    int64_t cols = t->ndim == 2 ? t->shape[1] : 0;
    switch (q->op) {
    case OP_COPY:
        return sts_write(s, q->name, t->data, t->nbytes, e);
    case OP_SCALE:
        return sts_write(s, q->name, b->s, (uint64_t)(q->shape[0] * q->shape[1]) * 4, e);
    case OP_DEQUANT:  /* bf16(f32(q) * s), DeepSeek's formula */
        if (convert_read_f32(h, t, b->f, threads, e))
            return -1;
        return convert_put(s, q->name, ST_BF16, b->f, t->numel, threads, e);
    default:
        break;
    }
    if (convert_read_f32(h, t, b->f, threads, e) ||
        convert_finite(t->name, b->f, t->numel, cols, e))
        return -1;
    if (q->op == OP_FLOAT)
        return convert_put(s, q->name, q->dtype, b->f, t->numel, threads, e);
    int64_t bad;
    if (fp8_quant_weight(b->f, t->shape[0], t->shape[1], b->q, b->s, threads, &bad))
        return err_set(e, "tensor \"%s\": element [%lld, %lld] is not finite", t->name,
                       (long long)(bad / cols), (long long)(bad % cols));
    return sts_write(s, q->name, b->q, (uint64_t)t->numel, e);
}

static int write_file(const hfdir *h, const q_out *q, int n, const char *path, bufs *b,
                      const quant_opts *o, progress *pr, quant_stats *st, dsv3_err *e)
{
    ststream s = {0};
    for (int i = 0; i < n; i++)
        sts_declare(&s, q[i].name, q[i].dtype, q[i].ndim, q[i].shape);
    int rc = sts_begin(&s, path, e);
    for (int i = 0; i < n && !rc; i++) {
        rc = put_one(h, &s, &q[i], b, o->threads, e);
        if (rc) {
            err_prefix(e, "%s", path);
            break;
        }
        convert_release(q[i].src);
        if (q[i].op == OP_DEQUANT)
            convert_release_scale(h, q[i].src);
        if (q[i].op != OP_SCALE)
            st->in_bytes += q[i].src->nbytes;
        st->out_bytes += (uint64_t)q[i].shape[0] * (q[i].ndim == 2 ? (uint64_t)q[i].shape[1] : 1) *
                         st_dtype_size(q[i].dtype);
        st->n_quant += q[i].op == OP_QUANT || q[i].op == OP_DEQUANT;
        st->n_tensors++;
        progress_update(pr, st->in_bytes);
    }
    if (!rc)
        rc = sts_commit(&s, e);
    sts_free(&s);
    st->n_files += !rc;
    return rc;
}

static int save_config(const dsv3_config *c, int dequant, const char *path, dsv3_err *e)
{
    dsv3_config o = *c;
    if (!(o.json = json_deep_copy(c->json)))
        return err_set(e, "%s: out of memory", path);
    if (dequant) {
        json_object_del(o.json, "quantization_config");
    } else {
        json_t *q = json_object(), *bs = json_array();
        json_object_set_new(q, "activation_scheme", json_string("dynamic"));
        json_object_set_new(q, "fmt", json_string("e4m3"));
        json_object_set_new(q, "quant_method", json_string("fp8"));
        json_array_append_new(bs, json_integer(FP8_BLOCK));
        json_array_append_new(bs, json_integer(FP8_BLOCK));
        json_object_set_new(q, "weight_block_size", bs);
        json_object_set_new(o.json, "quantization_config", q);
    }
    int rc = config_save(&o, path, e);
    json_decref(o.json);
    return rc;
}

/* Writes every output file; names/files collect the index entries. */
static int write_all(const hfdir *h, const quant_opts *o, const char *tmp, quant_stats *st,
                     dsv3_err *e)
{
    int max_n = 0, total_n = 0;
    int64_t max_numel = 1;
    for (int f = 0; f < h->n_files; f++) {
        max_n = h->files[f].n > max_n ? h->files[f].n : max_n;
        total_n += 2 * h->files[f].n;
        for (int i = 0; i < h->files[f].n; i++)
            max_numel = h->files[f].t[i].numel > max_numel ? h->files[f].t[i].numel : max_numel;
    }
    q_out *q = calloc((size_t)(2 * max_n + 1), sizeof *q);
    char **names = calloc((size_t)total_n + 1, sizeof *names);
    char **files = calloc((size_t)total_n + 1, sizeof *files);
    bufs b = {malloc((size_t)max_numel * 4), malloc((size_t)max_numel),
              malloc((size_t)(fp8_blocks(max_numel) + 1) * 4)};
    int rc = q && names && files && b.f && b.q && b.s ? 0 : err_set(e, "%s: out of memory", h->dir);
    progress pr;
    progress_start(&pr, o->progress, o->dequant ? "dequant" : "quant", "B", h->data_bytes);
    int k = 0;
    uint64_t total = 0;
    char path[4400];
    for (int f = 0; f < h->n_files && !rc; f++) {
        int n = plan_file(&h->files[f], o->dequant, q);
        snprintf(path, sizeof path, "%s/%s", tmp, h->file_names[f]);
        uint64_t before = st->out_bytes;
        rc = write_file(h, q, n, path, &b, o, &pr, st, e);
        total += st->out_bytes - before;
        for (int i = 0; i < n && !rc; i++) {
            names[k] = strdup(q[i].name);
            files[k] = h->file_names[f];
            if (!names[k++])
                rc = err_set(e, "out of memory");
        }
    }
    progress_finish(&pr);
    if (!rc && h->indexed) {
        snprintf(path, sizeof path, "%s/model.safetensors.index.json", tmp);
        rc = convert_write_index(path, names, files, k, total, e);
    }
    for (int i = 0; i < k; i++)
        free(names[i]);
    free(names);
    free(files);
    free(q);
    free(b.f);
    free(b.q);
    free(b.s);
    return rc;
}

int quant_folder(const char *in, const char *out, const quant_opts *o, quant_stats *st,
                 dsv3_err *e)
{
    quant_stats dummy;
    st = st ? st : &dummy;
    memset(st, 0, sizeof *st);
    hfdir h;
    if (hfdir_open(&h, in, e))
        return -1;
    outdir d = {0};
    int rc = convert_check(&h, NULL, NULL, e);
    if (!rc)
        rc = outdir_open(&d, out, o->force, e);
    char path[4400];
    if (!rc) {
        snprintf(path, sizeof path, "%s/config.json", d.tmp);
        rc = save_config(&h.cfg, o->dequant, path, e);
    }
    if (!rc)
        rc = convert_copy_extras(in, d.tmp, 0, &h.cfg, e);
    if (!rc)
        rc = write_all(&h, o, d.tmp, st, e);
    if (!rc)
        rc = outdir_commit(&d, e);
    else if (d.tmp)
        outdir_abort(&d);
    hfdir_close(&h);
    return rc;
}
