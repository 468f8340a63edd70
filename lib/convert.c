/* convert: streaming checkpoint conversion. See convert.h. */
#include "convert.h"

#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "bpe.h"
#include "bpeio.h"
#include "fp8.h"
#include "outdir.h"
#include "outfile.h"
#include "progress.h"

static int is_float(st_dtype d)
{
    return d == ST_F32 || d == ST_BF16 || d == ST_F16 || d == ST_F64;
}

static void shape_sep(char *buf, size_t n, int ndim, const int64_t *shape, const char *sep)
{
    size_t l = (size_t)snprintf(buf, n, "[");
    for (int d = 0; d < ndim && l < n; d++)
        l += (size_t)snprintf(buf + l, n - l, "%s%lld", d ? sep : "", (long long)shape[d]);
    if (l < n)
        snprintf(buf + l, n - l, "]");
}

static void shape_str(char *buf, size_t n, int ndim, const int64_t *shape)
{
    shape_sep(buf, n, ndim, shape, ", ");
}

static const char *file_of(const hfdir *h, const char *name)
{
    int f;
    hfdir_find(h, name, &f);
    return f >= 0 ? h->files[f].path : h->dir;
}

/* ---- checking a folder against its config ---- */

/* The weight_scale_inv of FP8 tensor t: present, F32, one per 128x128 block. */
static int check_scale(const hfdir *h, const st_tensor *t, unsigned char *used, dsv3_err *e)
{
    char sn[160];
    snprintf(sn, sizeof sn, "%s_scale_inv", t->name);
    int i = hfdir_index(h, sn);
    if (i < 0)
        return err_set(e, "%s: FP8 tensor \"%s\" has no %s", file_of(h, t->name), t->name, sn);
    const st_tensor *s = h->ent[i].t;
    int64_t want[2] = {fp8_blocks(t->shape[0]), fp8_blocks(t->shape[1])};
    if (s->dtype != ST_F32 || s->ndim != 2 || s->shape[0] != want[0] ||
        s->shape[1] != want[1]) {
        char got[64], need[64];
        shape_str(got, sizeof got, s->ndim, s->shape);
        shape_str(need, sizeof need, 2, want);
        return err_set(e, "%s: \"%s\" is %s %s, the 128x128 blocks of \"%s\" need F32 %s",
                       file_of(h, sn), sn, st_dtype_name(s->dtype), got, t->name, need);
    }
    used[i] = 1;
    return 0;
}

static int check_one(const hfdir *h, const layout_tensor *lt, unsigned char *used,
                     conv_stats *st, dsv3_err *e)
{
    int i = hfdir_index(h, lt->name);
    if (i < 0) {
        if (lt->mtp_copy)  /* optional: the main embedding and head are the same tensors */
            return 0;
        return err_set(e, "%s: tensor \"%s\" is missing (the config's layout needs it)", h->dir,
                       lt->name);
    }
    const st_tensor *t = h->ent[i].t;
    used[i] = 1;
    int ok = t->ndim == lt->ndim && t->shape[0] == lt->shape[0] &&
             (lt->ndim == 1 || t->shape[1] == lt->shape[1]);
    if (!ok) {
        char got[64], need[64];
        shape_str(got, sizeof got, t->ndim, t->shape);
        shape_str(need, sizeof need, lt->ndim, lt->shape);
        return err_set(e, "%s: tensor \"%s\" has shape %s, the config needs %s",
                       file_of(h, t->name), t->name, got, need);
    }
    if (t->dtype == ST_F8_E4M3 && layout_is_fp8(t->name)) {
        if (st)
            st->fp8++;
        return check_scale(h, t, used, e);
    }
    if (!is_float(t->dtype))
        return err_set(e, "%s: tensor \"%s\" is %s, not a float type%s", file_of(h, t->name),
                       t->name, st_dtype_name(t->dtype),
                       t->dtype == ST_F8_E4M3 ? " (DeepSeek keeps this tensor in BF16)" : "");
    return 0;
}

int convert_check(const hfdir *h, int *mtp, conv_stats *st, dsv3_err *e)
{
    const dsv3_config *c = &h->cfg;
    int any_mtp = 0;
    for (int i = 0; i < h->n_ent; i++)
        any_mtp |= layout_layer_of(h->ent[i].name) >= c->num_hidden_layers;
    int D = any_mtp ? c->num_nextn_predict_layers : 0;
    layout L;
    if (layout_build(&L, c, D, e))
        return -1;
    unsigned char *used = calloc((size_t)(h->n_ent ? h->n_ent : 1), 1);
    int rc = used ? 0 : err_set(e, "%s: out of memory", h->dir);
    for (int i = 0; i < L.n && !rc; i++)
        rc = check_one(h, &L.t[i], used, st, e);
    for (int i = 0; i < h->n_ent && !rc; i++)
        if (!used[i])
            rc = err_set(e, "%s: tensor \"%s\" is not part of the config's layout%s",
                         h->files[h->ent[i].file].path, h->ent[i].name,
                         layout_layer_of(h->ent[i].name) >= c->num_hidden_layers
                             ? " (a layer beyond num_hidden_layers + num_nextn_predict_layers)"
                             : "");
    free(used);
    layout_free(&L);
    if (!rc && mtp)
        *mtp = D;
    if (!rc && st)
        st->mtp_layers = D;
    return rc;
}

/* ---- tensor data ---- */

/* Lets the kernel drop the pages of t from our mapping once it is read, so the resident
 * size stays that of one tensor (the pages stay in the page cache). */
void convert_release(const st_tensor *t)
{
    long pg = sysconf(_SC_PAGESIZE);
    uintptr_t a = ((uintptr_t)t->data + (uintptr_t)pg - 1) & ~((uintptr_t)pg - 1);
    uintptr_t b = ((uintptr_t)t->data + t->nbytes) & ~((uintptr_t)pg - 1);
    if (b > a)
        madvise((void *)a, b - a, MADV_DONTNEED);
}

void convert_release_scale(const hfdir *h, const st_tensor *t)
{
    char sn[160];
    snprintf(sn, sizeof sn, "%s_scale_inv", t->name);
    const st_tensor *s = hfdir_find(h, sn, NULL);
    if (s)
        convert_release(s);
}

/* ---- element loops on threads ----
 * Threads are started per call over contiguous ranges, as lib/fp8 does, rather than kept
 * in an OpenMP team: between regions OpenMP's idle threads spin, which on a shared
 * 2-core machine cost ten times the CPU time of the work itself. */

typedef int64_t (*range_fn)(void *ctx, int64_t a, int64_t b);  /* returns a min-reduced value */

typedef struct range_job {
    range_fn fn;
    void *ctx;
    int64_t a, b, result;
} range_job;

static void *range_run(void *p)
{
    range_job *j = p;
    j->result = j->fn(j->ctx, j->a, j->b);
    return NULL;
}

/* fn over [0, n) split across threads (one when work, in elements, is small); returns the
 * smallest of the parts' results. */
static int64_t par_for(int64_t n, int64_t work, int threads, range_fn fn, void *ctx)
{
    if (threads <= 0)
        threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (threads > 64)
        threads = 64;
    if (threads > n)
        threads = n > 0 ? (int)n : 1;
    if (work < ((int64_t)1 << 18))
        threads = 1;
    range_job job[64];
    pthread_t th[64];
    int started[64] = {0};
    for (int t = 0; t < threads; t++) {
        job[t] = (range_job){fn, ctx, n * t / threads, n * (t + 1) / threads, n};
        started[t] = t > 0 && pthread_create(&th[t], NULL, range_run, &job[t]) == 0;
    }
    for (int t = 0; t < threads; t++)
        if (!started[t])
            range_run(&job[t]);
    int64_t r = n;
    for (int t = 0; t < threads; t++) {
        if (started[t])
            pthread_join(th[t], NULL);
        r = job[t].result < r ? job[t].result : r;
    }
    return r;
}

typedef struct elems {
    const void *in;
    void *out;
    const float *lut, *scale;
    int64_t cols, nbc;
} elems;

static int64_t dequant_rows(void *ctx, int64_t a, int64_t b)
{
    const elems *x = ctx;
    for (int64_t r = a; r < b; r++) {
        const float *s = x->scale + (r / FP8_BLOCK) * x->nbc;
        const uint8_t *q = (const uint8_t *)x->in + r * x->cols;
        float *o = (float *)x->out + r * x->cols;
        for (int64_t c = 0; c < x->cols; c++)
            o[c] = x->lut[q[c]] * s[c / FP8_BLOCK];
    }
    return INT64_MAX;
}

void convert_dequant(const uint8_t *q, const float *scale, int64_t rows, int64_t cols,
                     float *out, int threads)
{
    float lut[256];
    for (int i = 0; i < 256; i++)
        lut[i] = fp8_e4m3_to_f32((uint8_t)i);
    elems x = {q, out, lut, scale, cols, fp8_blocks(cols)};
    par_for(rows, rows * cols, threads, dequant_rows, &x);
}

static int64_t bf16_to_f32(void *ctx, int64_t a, int64_t b)
{
    const elems *x = ctx;
    const unsigned char *p = x->in;
    float *o = x->out;
    for (int64_t i = a; i < b; i++) {
        uint16_t v;
        memcpy(&v, p + 2 * i, 2);  /* the mapping need not be aligned */
        o[i] = st_bf16_to_f32(v);
    }
    return INT64_MAX;
}

int convert_read_f32(const hfdir *h, const st_tensor *t, float *out, int threads,
                     dsv3_err *e)
{
    int64_t n = t->numel;
    if (t->dtype == ST_BF16) {
        elems x = {.in = t->data, .out = out};
        par_for(n, n, threads, bf16_to_f32, &x);
        return 0;
    }
    if (t->dtype != ST_F8_E4M3)
        return st_to_f32(t, out, n, e) ? err_prefix(e, "%s", file_of(h, t->name)) : 0;
    char sn[160];
    snprintf(sn, sizeof sn, "%s_scale_inv", t->name);
    const st_tensor *s = hfdir_find(h, sn, NULL);
    if (!s || s->dtype != ST_F32 || t->ndim != 2 ||
        s->numel != fp8_blocks(t->shape[0]) * fp8_blocks(t->shape[1]))
        return err_set(e, "%s: FP8 tensor \"%s\" has no usable %s", file_of(h, t->name),
                       t->name, sn);
    float *scale = malloc((size_t)s->numel * sizeof *scale);  /* the mapping may be unaligned */
    if (!scale)
        return err_set(e, "%s: out of memory", t->name);
    memcpy(scale, s->data, (size_t)s->numel * sizeof *scale);
    convert_dequant(t->data, scale, t->shape[0], t->shape[1], out, threads);
    free(scale);
    return 0;
}

static int64_t first_bad(void *ctx, int64_t a, int64_t b)
{
    const float *x = ((const elems *)ctx)->in;
    for (int64_t i = a; i < b; i++)
        if (!isfinite(x[i]))
            return i;
    return INT64_MAX;
}

int convert_finite(const char *name, const float *x, int64_t n, int64_t cols, dsv3_err *e)
{
    elems c = {.in = x};
    int64_t bad = par_for(n, n, 0, first_bad, &c);
    if (bad >= n)
        return 0;
    const char *what = isnan(x[bad]) ? "NaN" : "an infinity";
    if (cols > 0)
        return err_set(e, "tensor \"%s\": element [%lld, %lld] is %s", name,
                       (long long)(bad / cols), (long long)(bad % cols), what);
    return err_set(e, "tensor \"%s\": element %lld is %s", name, (long long)bad, what);
}

static int64_t f32_to_bf16(void *ctx, int64_t a, int64_t b)
{
    const elems *x = ctx;
    const float *in = x->in;
    uint16_t *o = x->out;
    for (int64_t i = a; i < b; i++)
        o[i] = st_f32_to_bf16(in[i]);
    return INT64_MAX;
}

#define PUT_CHUNK ((int64_t)1 << 22)

int convert_put(ststream *s, const char *name, st_dtype dtype, const float *x, int64_t n,
                int threads, dsv3_err *e)
{
    if (dtype == ST_F32)
        return sts_write(s, name, x, (uint64_t)n * 4, e);
    if (dtype != ST_BF16)
        return err_set(e, "tensor \"%s\": cannot write %s", name, st_dtype_name(dtype));
    uint16_t *buf = malloc((size_t)(n < PUT_CHUNK ? (n ? n : 1) : PUT_CHUNK) * 2);
    if (!buf)
        return err_set(e, "tensor \"%s\": out of memory", name);
    int rc = 0;
    for (int64_t at = 0; at < n && !rc; at += PUT_CHUNK) {
        int64_t m = n - at < PUT_CHUNK ? n - at : PUT_CHUNK;
        elems c = {.in = x + at, .out = buf};
        par_for(m, m, threads, f32_to_bf16, &c);
        rc = sts_write(s, at ? NULL : name, buf, (uint64_t)m * 2, e);
    }
    free(buf);
    return rc;
}

/* ---- small files ---- */

static int write_text(const char *path, const char *text, dsv3_err *e)
{
    outfile of;
    if (outfile_open(&of, path, e))
        return -1;
    if (fputs(text, of.f) == EOF || fputc('\n', of.f) == EOF) {
        outfile_abort(&of);
        return err_errno(e, "%s: write failed", path);
    }
    return outfile_commit(&of, e);
}

static int write_json(const char *path, json_t *j, dsv3_err *e)
{
    char *s = json_dumps(j, JSON_INDENT(2));
    if (!s)
        return err_set(e, "%s: out of memory", path);
    int rc = write_text(path, s, e);
    free(s);
    return rc;
}

int convert_write_index(const char *path, char *const *names, char *const *files, int n,
                        uint64_t total, dsv3_err *e)
{
    json_t *root = json_object(), *meta = json_object(), *wm = json_object();
    json_object_set_new(meta, "total_size", json_integer((json_int_t)total));
    json_object_set_new(root, "metadata", meta);
    for (int i = 0; i < n; i++)
        json_object_set_new(wm, names[i], json_string(files[i]));
    json_object_set_new(root, "weight_map", wm);
    char *s = json_dumps(root, JSON_INDENT(2) | JSON_SORT_KEYS);  /* HF sorts the map */
    json_decref(root);
    if (!s)
        return err_set(e, "%s: out of memory", path);
    int rc = write_text(path, s, e);
    free(s);
    return rc;
}

int convert_copy_extras(const char *in, const char *tmp, int want_generation,
                        const dsv3_config *c, dsv3_err *e)
{
    static const char *const names[] = {
        "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "chat_template.jinja", "tokenizer.model",
    };
    char src[4400], dst[4400];
    int have_gen = 0;
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        struct stat sb;
        snprintf(src, sizeof src, "%s/%s", in, names[i]);
        if (stat(src, &sb) || !S_ISREG(sb.st_mode))
            continue;
        if (outdir_copy(tmp, src, names[i], e))
            return -1;
        have_gen |= i == 0;
    }
    if (have_gen || !want_generation)
        return 0;
    /* A training checkpoint has none: the one transformers derives from the config. */
    json_t *g = json_object();
    json_object_set_new(g, "_from_model_config", json_true());
    if (c->bos_token_id >= 0)
        json_object_set_new(g, "bos_token_id", json_integer(c->bos_token_id));
    if (c->eos_token_id >= 0)
        json_object_set_new(g, "eos_token_id", json_integer(c->eos_token_id));
    snprintf(dst, sizeof dst, "%s/generation_config.json", tmp);
    int rc = write_json(dst, g, e);
    json_decref(g);
    return rc;
}

/* -t FILE: a tokenizer.json is copied; a dsv3-tok file is exported as tokenizer.json. */
static int put_tokenizer(const char *tok, const char *tmp, dsv3_err *e)
{
    char dst[4400];
    snprintf(dst, sizeof dst, "%s/tokenizer.json", tmp);
    size_t l = strlen(tok);
    if (l >= 5 && !strcmp(tok + l - 5, ".json"))
        return outdir_copy(tmp, tok, "tokenizer.json", e);
    bpe *b = NULL;
    if (bpe_load(&b, tok, e))
        return -1;
    int rc = bpeio_export_hf(b, dst, e);
    bpe_free(b);
    return rc;
}

/* ---- HF output ---- */

typedef struct out_tensor {
    const char *name;       /* output name */
    const st_tensor *src;   /* input tensor */
    int ndim;
    int64_t shape[2];
    st_dtype dtype;
    int shard;
} out_tensor;

/* The config written with the output: D and dtype updated, FP8 settings dropped. */
static int save_config(const dsv3_config *c, int mtp, const char *dtype_name, const char *path,
                       dsv3_err *e)
{
    dsv3_config o = *c;
    o.json = json_deep_copy(c->json);
    if (!o.json)
        return err_set(e, "%s: out of memory", path);
    o.num_nextn_predict_layers = mtp;
    json_object_del(o.json, "quantization_config");
    int any = 0;
    if (json_object_get(o.json, "torch_dtype"))
        any = !json_object_set_new(o.json, "torch_dtype", json_string(dtype_name));
    if (json_object_get(o.json, "dtype"))
        any |= !json_object_set_new(o.json, "dtype", json_string(dtype_name));
    if (!any)
        json_object_set_new(o.json, "torch_dtype", json_string(dtype_name));
    int rc = config_save(&o, path, e);
    json_decref(o.json);
    return rc;
}

static int write_shard(const hfdir *h, out_tensor *ot, int n, int shard, const char *path,
                       float *buf, const conv_opts *o, progress *pr, conv_stats *st,
                       dsv3_err *e)
{
    ststream s = {0};
    for (int i = 0; i < n; i++)
        if (ot[i].shard == shard)
            sts_declare(&s, ot[i].name, ot[i].dtype, ot[i].ndim, ot[i].shape);
    int rc = sts_begin(&s, path, e);
    for (int i = 0; i < n && !rc; i++) {
        if (ot[i].shard != shard)
            continue;
        const st_tensor *t = ot[i].src;
        rc = convert_read_f32(h, t, buf, o->threads, e);
        if (!rc)
            rc = convert_finite(t->name, buf, t->numel, t->ndim == 2 ? t->shape[1] : 0, e);
        if (!rc)
            rc = convert_put(&s, ot[i].name, ot[i].dtype, buf, t->numel, o->threads, e);
        if (rc)
            err_prefix(e, "%s", file_of(h, t->name));
        convert_release(t);
        if (t->dtype == ST_F8_E4M3)
            convert_release_scale(h, t);
        st->in_bytes += t->nbytes;
        st->out_bytes += (uint64_t)t->numel * st_dtype_size(ot[i].dtype);
        st->n_tensors++;
        progress_update(pr, st->in_bytes);
    }
    if (!rc)
        rc = sts_commit(&s, e);
    sts_free(&s);
    st->n_files += !rc;
    return rc;
}

/* Picks each output tensor's source and shard (greedy in layout order, as save_pretrained). */
static int plan_hf(const hfdir *h, const layout *L, const conv_opts *o, out_tensor *ot,
                   int *n_shards, int64_t *max_numel, dsv3_err *e)
{
    uint64_t in_shard = 0;
    int shards = 0;
    for (int i = 0; i < L->n; i++) {
        const layout_tensor *lt = &L->t[i];
        const st_tensor *src = hfdir_find(h, lt->name, NULL);
        if (!src && lt->mtp_copy) {
            int head = strstr(lt->name, "shared_head.head") != NULL;
            src = hfdir_find(h, head && !h->cfg.tie_word_embeddings ? "lm_head.weight"
                                                                   : "model.embed_tokens.weight",
                             NULL);
        }
        if (!src)
            return err_set(e, "%s: tensor \"%s\" is missing", h->dir, lt->name);
        /* the router's correction bias stays F32, as in DeepSeek's BF16 and FP8 releases */
        st_dtype dt = strstr(lt->name, "e_score_correction_bias") ? ST_F32 : o->dtype;
        uint64_t nb = (uint64_t)src->numel * st_dtype_size(dt);
        if (i == 0 || (o->max_shard_bytes && in_shard > 0 && in_shard + nb > o->max_shard_bytes)) {
            shards++;
            in_shard = 0;
        }
        in_shard += nb;
        ot[i] = (out_tensor){lt->name, src, lt->ndim, {lt->shape[0], lt->shape[1]}, dt,
                             shards - 1};
        if (src->numel > *max_numel)
            *max_numel = src->numel;
    }
    *n_shards = shards;
    return 0;
}

static int write_hf(const hfdir *h, const layout *L, const conv_opts *o, const char *tmp,
                    conv_stats *st, dsv3_err *e)
{
    out_tensor *ot = calloc((size_t)L->n, sizeof *ot);
    char **files = calloc((size_t)L->n, sizeof *files);
    char **names = calloc((size_t)L->n, sizeof *names);
    int n_shards = 0;
    int64_t max_numel = 1;
    float *buf = NULL;
    int rc = ot && files && names ? 0 : err_set(e, "%s: out of memory", h->dir);
    if (!rc)
        rc = plan_hf(h, L, o, ot, &n_shards, &max_numel, e);
    if (!rc && !(buf = malloc((size_t)max_numel * sizeof *buf)))
        rc = err_set(e, "%s: cannot allocate %lld MB for the largest tensor", h->dir,
                     (long long)(max_numel * 4 >> 20));
    progress pr;
    progress_start(&pr, o->progress, "convert", "B", h->data_bytes);
    char fn[64], path[4400];
    uint64_t total = 0;
    for (int s = 0; s < n_shards && !rc; s++) {
        if (n_shards == 1)
            snprintf(fn, sizeof fn, "model.safetensors");
        else
            snprintf(fn, sizeof fn, "model-%05d-of-%05d.safetensors", s + 1, n_shards);
        snprintf(path, sizeof path, "%s/%s", tmp, fn);
        rc = write_shard(h, ot, L->n, s, path, buf, o, &pr, st, e);
        for (int i = 0; i < L->n && !rc; i++)
            if (ot[i].shard == s && !(files[i] = strdup(fn)))
                rc = err_set(e, "out of memory");
    }
    progress_finish(&pr);
    for (int i = 0; i < L->n && !rc; i++) {
        names[i] = (char *)ot[i].name;
        total += (uint64_t)ot[i].src->numel * st_dtype_size(ot[i].dtype);
    }
    if (!rc && n_shards > 1) {
        snprintf(path, sizeof path, "%s/model.safetensors.index.json", tmp);
        rc = convert_write_index(path, names, files, L->n, total, e);
    }
    if (files)
        for (int i = 0; i < L->n; i++)
            free(files[i]);
    free(files);
    free(names);
    free(ot);
    free(buf);
    return rc;
}

int convert_hf(const char *in, const char *out, const conv_opts *o, conv_stats *st,
               dsv3_err *e)
{
    conv_stats dummy;
    st = st ? st : &dummy;
    memset(st, 0, sizeof *st);
    if (o->dtype != ST_BF16 && o->dtype != ST_F32)
        return err_set(e, "%s: HF output is BF16 or F32, not %s", out, st_dtype_name(o->dtype));
    hfdir h;
    if (hfdir_open(&h, in, e))
        return -1;
    int mtp = 0;
    layout L = {0};
    outdir d = {0};
    int rc = convert_check(&h, &mtp, st, e);
    if (!rc && o->no_mtp)
        mtp = 0;
    if (!rc)
        rc = layout_build(&L, &h.cfg, mtp, e);
    if (!rc)
        rc = outdir_open(&d, out, o->force, e);
    char path[4400];
    if (!rc) {
        snprintf(path, sizeof path, "%s/config.json", d.tmp);
        /* no MTP tensors in, none out: keep the config's D as transformers does */
        int d_out = o->no_mtp ? 0 : mtp ? mtp : h.cfg.num_nextn_predict_layers;
        rc = save_config(&h.cfg, d_out, o->dtype == ST_F32 ? "float32" : "bfloat16", path, e);
    }
    if (!rc)
        rc = convert_copy_extras(in, d.tmp, 1, &h.cfg, e);
    if (!rc && o->tokenizer)
        rc = put_tokenizer(o->tokenizer, d.tmp, e);
    if (!rc)
        rc = write_hf(&h, &L, o, d.tmp, st, e);
    if (!rc)
        rc = outdir_commit(&d, e);
    else if (d.tmp)
        outdir_abort(&d);
    layout_free(&L);
    hfdir_close(&h);
    return rc;
}

/* ---- DeepSeek's reference inference layout ---- */

/* The HF module names convert.py maps, their names there and the dimension split across
 * model-parallel ranks (-1: every rank gets the whole tensor). */
static const struct {
    const char *hf, *ds;
    int dim;
} DS_MAP[] = {
    {"embed_tokens", "embed", 0},   {"input_layernorm", "attn_norm", -1},
    {"post_attention_layernorm", "ffn_norm", -1},
    {"q_proj", "wq", 0},            {"q_a_proj", "wq_a", -1},
    {"q_a_layernorm", "q_norm", -1}, {"q_b_proj", "wq_b", 0},
    {"kv_a_proj_with_mqa", "wkv_a", -1}, {"kv_a_layernorm", "kv_norm", -1},
    {"kv_b_proj", "wkv_b", 0},      {"o_proj", "wo", 1},
    {"gate", "gate", -1},           {"gate_proj", "w1", 0},
    {"down_proj", "w2", 1},         {"up_proj", "w3", 0},
    {"norm", "norm", -1},           {"lm_head", "head", 0},
};

/* In s (of capacity n), replaces every `from` by `to`. */
static void replace_all(char *s, size_t n, const char *from, const char *to)
{
    char tmp[256];
    size_t fl = strlen(from), o = 0;
    for (const char *p = s; *p && o + 1 < sizeof tmp;) {
        if (!strncmp(p, from, fl)) {
            o += (size_t)snprintf(tmp + o, sizeof tmp - o, "%s", to);
            p += fl;
        } else {
            tmp[o++] = *p++;
        }
    }
    tmp[o < sizeof tmp ? o : sizeof tmp - 1] = 0;
    snprintf(s, n, "%s", tmp);
}

/* DeepSeek's name for HF tensor hf and the split dimension; -1 if convert.py has none. */
int convert_ds_name(const char *hf, char *out, size_t n, int *dim)
{
    char s[256];
    snprintf(s, sizeof s, "%s", !strncmp(hf, "model.", 6) ? hf + 6 : hf);
    replace_all(s, sizeof s, "self_attn", "attn");
    replace_all(s, sizeof s, "mlp", "ffn");
    replace_all(s, sizeof s, "weight_scale_inv", "scale");
    replace_all(s, sizeof s, "e_score_correction_bias", "bias");
    char *last = strrchr(s, '.');
    if (!last)
        return -1;
    *last = 0;
    char *key = strrchr(s, '.');
    key = key ? key + 1 : s;
    for (size_t i = 0; i < sizeof DS_MAP / sizeof *DS_MAP; i++)
        if (!strcmp(key, DS_MAP[i].hf)) {
            *key = 0;
            snprintf(out, n, "%s%s.%s", s, DS_MAP[i].ds, last + 1);
            *dim = DS_MAP[i].dim;
            return 0;
        }
    return -1;
}

typedef struct ds_tensor {
    char name[128];
    const st_tensor *src;
    int dim;          /* split dimension, -1 whole */
    int expert;       /* routed expert index, -1 */
    st_dtype dtype;   /* written as */
} ds_tensor;

/* Copies part i of mp of a [r, c] tensor of es-byte elements split on dim. */
static void narrow(const unsigned char *src, size_t es, int64_t r, int64_t c, int dim, int i,
                   int mp, unsigned char *dst)
{
    if (dim == 0) {
        int64_t pr = r / mp;
        memcpy(dst, src + (size_t)(i * pr * c) * es, (size_t)(pr * c) * es);
        return;
    }
    int64_t pc = c / mp;
    for (int64_t row = 0; row < r; row++)
        memcpy(dst + (size_t)(row * pc) * es, src + (size_t)(row * c + i * pc) * es,
               (size_t)pc * es);
}

static void part_shape(const st_tensor *t, int dim, int mp, int64_t *shape)
{
    for (int d = 0; d < t->ndim; d++)
        shape[d] = t->shape[d] / (d == dim ? mp : 1);
}

static int plan_ds(const hfdir *h, const layout *L, const conv_opts *o, ds_tensor *dt, int *n,
                   dsv3_err *e)
{
    int k = 0;
    for (int i = 0; i < L->n; i++) {
        const st_tensor *t = hfdir_find(h, L->t[i].name, NULL);
        for (int part = 0; part < 2; part++) {
            const st_tensor *src = t;
            if (part == 1) {  /* an FP8 weight's scale, kept */
                if (!o->keep_dtype || t->dtype != ST_F8_E4M3)
                    break;
                char sn[160];
                snprintf(sn, sizeof sn, "%s_scale_inv", t->name);
                src = hfdir_find(h, sn, NULL);
            }
            ds_tensor *d = &dt[k];
            if (convert_ds_name(src->name, d->name, sizeof d->name, &d->dim))
                return err_set(e, "%s: no DeepSeek name for tensor \"%s\"", h->dir, src->name);
            d->src = src;
            d->expert = -1;
            const char *x = strstr(src->name, ".experts.");
            if (x && !strstr(src->name, "shared_experts"))
                d->expert = atoi(x + 9);
            if (d->expert < 0 && d->dim >= 0 && src->shape[d->dim] % o->mp)
                return err_set(e, "%s: tensor \"%s\" dimension %d (%lld) does not split into %d "
                               "model-parallel parts", h->dir, src->name, d->dim,
                               (long long)src->shape[d->dim], o->mp);
            d->dtype = o->keep_dtype ? src->dtype : o->dtype;
            k++;
        }
    }
    *n = k;
    return 0;
}

static int write_ds_rank(const hfdir *h, ds_tensor *dt, int n, int rank, const conv_opts *o,
                         const char *path, void *full, void *partbuf, conv_stats *st,
                         dsv3_err *e)
{
    int n_local = h->cfg.n_routed_experts / o->mp;
    ststream s = {0};
    int64_t shape[ST_MAX_DIMS];
    for (int i = 0; i < n; i++) {
        ds_tensor *d = &dt[i];
        if (d->expert >= 0 && d->expert / n_local != rank)
            continue;
        part_shape(d->src, d->expert >= 0 ? -1 : d->dim, o->mp, shape);
        sts_declare(&s, d->name, d->dtype, d->src->ndim, shape);
    }
    int rc = sts_begin(&s, path, e);
    for (int i = 0; i < n && !rc; i++) {
        ds_tensor *d = &dt[i];
        const st_tensor *t = d->src;
        if (d->expert >= 0 && d->expert / n_local != rank)
            continue;
        int dim = d->expert >= 0 ? -1 : d->dim;
        int64_t r = t->shape[0], c = t->ndim == 2 ? t->shape[1] : 1, numel = t->numel;
        if (o->keep_dtype) {
            const void *p = t->data;
            if (dim >= 0) {
                narrow(t->data, st_dtype_size(t->dtype), r, c, dim, rank, o->mp, partbuf);
                p = partbuf;
            }
            rc = sts_write(&s, d->name, p, t->nbytes / (dim >= 0 ? (uint64_t)o->mp : 1), e);
        } else {
            rc = convert_read_f32(h, t, full, o->threads, e);
            if (!rc)
                rc = convert_finite(t->name, full, numel, t->ndim == 2 ? c : 0, e);
            const float *p = full;
            if (!rc && dim >= 0) {
                narrow(full, 4, r, c, dim, rank, o->mp, partbuf);
                p = partbuf;
                numel /= o->mp;
            }
            if (!rc)
                rc = convert_put(&s, d->name, d->dtype, p, numel, o->threads, e);
        }
        convert_release(t);
        st->in_bytes += t->nbytes;
        st->out_bytes += (uint64_t)numel * st_dtype_size(d->dtype) /
                         (o->keep_dtype && dim >= 0 ? (uint64_t)o->mp : 1);
        st->n_tensors++;
    }
    if (!rc)
        rc = sts_commit(&s, e);
    sts_free(&s);
    st->n_files += !rc;
    return rc;
}

/* The ModelArgs of DeepSeek's inference/model.py, for generate.py --config. */
static int write_model_args(const dsv3_config *c, int fp8, const char *path, dsv3_err *e)
{
    json_t *j = json_object();
    json_object_set_new(j, "vocab_size", json_integer(c->vocab_size));
    json_object_set_new(j, "dim", json_integer(c->hidden_size));
    json_object_set_new(j, "inter_dim", json_integer(c->intermediate_size));
    json_object_set_new(j, "moe_inter_dim", json_integer(c->moe_intermediate_size));
    json_object_set_new(j, "n_layers", json_integer(c->num_hidden_layers));
    json_object_set_new(j, "n_dense_layers", json_integer(c->first_k_dense_replace));
    json_object_set_new(j, "n_heads", json_integer(c->num_attention_heads));
    json_object_set_new(j, "n_routed_experts", json_integer(c->n_routed_experts));
    json_object_set_new(j, "n_shared_experts", json_integer(c->n_shared_experts));
    json_object_set_new(j, "n_activated_experts", json_integer(c->num_experts_per_tok));
    json_object_set_new(j, "n_expert_groups", json_integer(c->n_group));
    json_object_set_new(j, "n_limited_groups", json_integer(c->topk_group));
    json_object_set_new(j, "route_scale", json_real(c->routed_scaling_factor));
    json_object_set_new(j, "score_func", json_string("sigmoid"));
    json_object_set_new(j, "q_lora_rank", json_integer(c->q_lora_rank));
    json_object_set_new(j, "kv_lora_rank", json_integer(c->kv_lora_rank));
    json_object_set_new(j, "qk_nope_head_dim", json_integer(c->qk_nope_head_dim));
    json_object_set_new(j, "qk_rope_head_dim", json_integer(c->qk_rope_head_dim));
    json_object_set_new(j, "v_head_dim", json_integer(c->v_head_dim));
    json_object_set_new(j, "rope_theta", json_real(c->rope_theta));
    if (c->rope_yarn) {
        json_object_set_new(j, "original_seq_len",
                            json_integer(c->yarn_original_max_position_embeddings));
        json_object_set_new(j, "rope_factor", json_real(c->yarn_factor));
        json_object_set_new(j, "beta_fast", json_real(c->yarn_beta_fast));
        json_object_set_new(j, "beta_slow", json_real(c->yarn_beta_slow));
        json_object_set_new(j, "mscale", json_real(c->yarn_mscale));
    } else {  /* YaRN applies only past original_seq_len: never */
        json_object_set_new(j, "original_seq_len", json_integer(c->max_position_embeddings));
        json_object_set_new(j, "rope_factor", json_real(1.0));
    }
    json_object_set_new(j, "dtype", json_string(fp8 ? "fp8" : "bf16"));
    int rc = write_json(path, j, e);
    json_decref(j);
    return rc;
}

static int write_ds(const hfdir *h, const conv_opts *o, const char *tmp, conv_stats *st,
                    dsv3_err *e)
{
    layout L;
    if (layout_build(&L, &h->cfg, 0, e))
        return -1;
    ds_tensor *dt = calloc((size_t)(2 * L.n), sizeof *dt);
    int n = 0, rc = dt ? plan_ds(h, &L, o, dt, &n, e) : err_set(e, "out of memory");
    uint64_t max_bytes = 4;
    int fp8 = 0;
    for (int i = 0; i < n; i++) {
        uint64_t b = (uint64_t)dt[i].src->numel * 4;
        max_bytes = b > max_bytes ? b : max_bytes;
        fp8 |= dt[i].dtype == ST_F8_E4M3;
    }
    void *full = rc ? NULL : malloc(max_bytes), *part = rc ? NULL : malloc(max_bytes);
    if (!rc && (!full || !part))
        rc = err_set(e, "%s: out of memory for the largest tensor", h->dir);
    progress pr;
    progress_start(&pr, o->progress, "export", "rank", (uint64_t)o->mp);
    char path[4400];
    for (int r = 0; r < o->mp && !rc; r++) {
        snprintf(path, sizeof path, "%s/model%d-mp%d.safetensors", tmp, r, o->mp);
        rc = write_ds_rank(h, dt, n, r, o, path, full, part, st, e);
        progress_update(&pr, (uint64_t)r + 1);
    }
    progress_finish(&pr);
    if (!rc) {
        snprintf(path, sizeof path, "%s/inference-config.json", tmp);
        rc = write_model_args(&h->cfg, fp8, path, e);
    }
    free(full);
    free(part);
    free(dt);
    layout_free(&L);
    return rc;
}

int convert_deepseek(const char *in, const char *out, const conv_opts *o, conv_stats *st,
                     dsv3_err *e)
{
    conv_stats dummy;
    st = st ? st : &dummy;
    memset(st, 0, sizeof *st);
    if (o->mp < 1)
        return err_set(e, "%s: --mp must be at least 1", out);
    if (!o->keep_dtype && o->dtype != ST_BF16 && o->dtype != ST_F32)
        return err_set(e, "%s: output is BF16, F32 or as stored", out);
    hfdir h;
    if (hfdir_open(&h, in, e))
        return -1;
    outdir d = {0};
    int rc = convert_check(&h, NULL, st, e);
    if (!rc && h.cfg.n_routed_experts % o->mp)
        rc = err_set(e, "%s: %d routed experts do not split over %d ranks", in,
                     h.cfg.n_routed_experts, o->mp);
    if (!rc)
        rc = outdir_open(&d, out, o->force, e);
    if (!rc)
        rc = convert_copy_extras(in, d.tmp, 0, &h.cfg, e);
    if (!rc && o->tokenizer)
        rc = put_tokenizer(o->tokenizer, d.tmp, e);
    if (!rc)
        rc = write_ds(&h, o, d.tmp, st, e);
    if (!rc)
        rc = outdir_commit(&d, e);
    else if (d.tmp)
        outdir_abort(&d);
    hfdir_close(&h);
    return rc;
}

/* ---- verify ---- */

int convert_verify(const char *dir, FILE *sums, int threads, conv_stats *st, dsv3_err *e)
{
    conv_stats dummy;
    st = st ? st : &dummy;
    memset(st, 0, sizeof *st);
    hfdir h;
    if (hfdir_open(&h, dir, e))
        return -1;
    int rc = convert_check(&h, NULL, st, e);
    /* transformers reads FP8 weights only under a quantization_config, and expects them there */
    json_t *qc = json_object_get(h.cfg.json, "quantization_config");
    if (!rc && st->fp8 && !qc)
        rc = err_set(e, "%s/config.json: %d FP8 weights but no quantization_config", dir, st->fp8);
    if (!rc && !st->fp8 && qc)
        rc = err_set(e, "%s/config.json: a quantization_config but no FP8 weights", dir);
    st->n_files = h.n_files;
    st->n_tensors = h.n_ent;
    st->in_bytes = h.data_bytes;
    int64_t max_numel = 1;
    for (int i = 0; i < h.n_ent; i++)
        max_numel = h.ent[i].t->numel > max_numel ? h.ent[i].t->numel : max_numel;
    float *buf = !rc && sums ? malloc((size_t)max_numel * sizeof *buf) : NULL;
    if (!rc && sums && !buf)
        rc = err_set(e, "%s: out of memory", dir);
    for (int i = 0; i < h.n_ent && !rc && sums; i++) {
        const st_tensor *t = h.ent[i].t;
        rc = convert_read_f32(&h, t, buf, threads, e);
        if (!rc)
            rc = convert_finite(t->name, buf, t->numel, t->ndim == 2 ? t->shape[1] : 0, e);
        if (rc) {
            err_prefix(e, "%s", h.files[h.ent[i].file].path);
            break;
        }
        char sh[64];
        shape_sep(sh, sizeof sh, t->ndim, t->shape, ",");
        fprintf(sums, "%016llx  %s  %s  %s\n",
                (unsigned long long)XXH3_64bits(t->data, (size_t)t->nbytes),
                st_dtype_name(t->dtype), sh, t->name);
        convert_release(t);
    }
    free(buf);
    hfdir_close(&h);
    return rc;
}
