#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "outfile.h"

static const struct {
    const char *name;
    size_t size;
} DTYPES[ST_NDTYPES] = {
    [ST_F32] = {"F32", 4},    [ST_F16] = {"F16", 2},          [ST_BF16] = {"BF16", 2},
    [ST_F64] = {"F64", 8},    [ST_I64] = {"I64", 8},          [ST_I32] = {"I32", 4},
    [ST_I16] = {"I16", 2},    [ST_I8] = {"I8", 1},            [ST_U8] = {"U8", 1},
    [ST_BOOL] = {"BOOL", 1},  [ST_F8_E4M3] = {"F8_E4M3", 1},  [ST_F8_E5M2] = {"F8_E5M2", 1},
};

const char *st_dtype_name(st_dtype d)
{
    return d < ST_NDTYPES ? DTYPES[d].name : "?";
}

size_t st_dtype_size(st_dtype d)
{
    return d < ST_NDTYPES ? DTYPES[d].size : 0;
}

/* A header longer than this is not a tensor index but damage (HF's reader caps it at
 * 100 MB too). */
#define ST_MAX_HEADER (100u << 20)

static void free_tensors(st_file *f)
{
    for (int i = 0; i < f->n; i++)
        free(f->t[i].name);
    free(f->t);
    f->t = NULL;
    f->n = 0;
}

static int cmp_begin(const void *a, const void *b)
{
    const st_tensor *x = a, *y = b;
    const char *px = x->data, *py = y->data;
    return px < py ? -1 : px > py;
}

static int parse_entry(st_tensor *t, const char *key, json_t *v, const unsigned char *data,
                       uint64_t data_len, const char *name, dsv3_err *e)
{
    if (!json_is_object(v))
        return err_set(e, "%s: header entry \"%s\" is not an object", name, key);
    json_t *dt = json_object_get(v, "dtype"), *sh = json_object_get(v, "shape"),
           *off = json_object_get(v, "data_offsets");
    if (!json_is_string(dt))
        return err_set(e, "%s: tensor \"%s\": missing dtype", name, key);
    int d = -1;
    for (int i = 0; i < ST_NDTYPES; i++)
        if (!strcmp(DTYPES[i].name, json_string_value(dt)))
            d = i;
    if (d < 0)
        return err_set(e, "%s: tensor \"%s\": unknown dtype \"%s\"", name, key,
                       json_string_value(dt));
    t->dtype = (st_dtype)d;
    if (!json_is_array(sh) || json_array_size(sh) > ST_MAX_DIMS)
        return err_set(e, "%s: tensor \"%s\": shape must be an array of at most %d sizes", name,
                       key, ST_MAX_DIMS);
    t->ndim = (int)json_array_size(sh);
    uint64_t numel = 1;
    for (int i = 0; i < t->ndim; i++) {
        json_t *s = json_array_get(sh, (size_t)i);
        if (!json_is_integer(s) || json_integer_value(s) < 0)
            return err_set(e, "%s: tensor \"%s\": shape[%d] is not a size", name, key, i);
        uint64_t n = (uint64_t)json_integer_value(s);
        if (n && numel > UINT64_MAX / 16 / n)
            return err_set(e, "%s: tensor \"%s\": shape overflows", name, key);
        numel *= n;
        t->shape[i] = (int64_t)n;
    }
    t->numel = (int64_t)numel;
    if (!json_is_array(off) || json_array_size(off) != 2 ||
        !json_is_integer(json_array_get(off, 0)) || !json_is_integer(json_array_get(off, 1)))
        return err_set(e, "%s: tensor \"%s\": data_offsets must be [begin, end]", name, key);
    json_int_t b = json_integer_value(json_array_get(off, 0));
    json_int_t en = json_integer_value(json_array_get(off, 1));
    if (b < 0 || en < b || (uint64_t)en > data_len)
        return err_set(e, "%s: tensor \"%s\": data_offsets [%lld, %lld] outside the %llu data "
                       "bytes", name, key, (long long)b, (long long)en,
                       (unsigned long long)data_len);
    t->nbytes = (uint64_t)(en - b);
    if (t->nbytes != numel * DTYPES[d].size)
        return err_set(e, "%s: tensor \"%s\": %llu bytes for shape of %llu %s elements", name,
                       key, (unsigned long long)t->nbytes, (unsigned long long)numel,
                       DTYPES[d].name);
    t->data = data + b;
    return 0;
}

int st_parse(st_file *f, const void *buf, size_t len, const char *name, dsv3_err *e)
{
    memset(f, 0, sizeof *f);
    const unsigned char *p = buf;
    if (len < 8)
        return err_set(e, "%s: %zu bytes, too short for a safetensors header", name, len);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--)
        hl = hl << 8 | p[i];
    if (hl > ST_MAX_HEADER || hl > len - 8)
        return err_set(e, "%s: header length %llu exceeds the file (%zu bytes)", name,
                       (unsigned long long)hl, len);
    json_error_t je;
    json_t *root = json_loadb((const char *)p + 8, (size_t)hl, JSON_REJECT_DUPLICATES, &je);
    if (!root)
        return err_set(e, "%s: header is not JSON (at byte %d: %s)", name, je.position + 8,
                       je.text);
    if (!json_is_object(root)) {
        json_decref(root);
        return err_set(e, "%s: header is not a JSON object", name);
    }
    const unsigned char *data = p + 8 + hl;
    uint64_t data_len = len - 8 - hl;
    size_t cap = json_object_size(root);
    f->t = calloc(cap ? cap : 1, sizeof *f->t);
    if (!f->t) {
        json_decref(root);
        return err_set(e, "%s: out of memory", name);
    }
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (!strcmp(key, "__metadata__")) {
            if (!json_is_object(v)) {
                json_decref(root);
                free_tensors(f);
                return err_set(e, "%s: __metadata__ is not an object", name);
            }
            continue;
        }
        st_tensor *t = &f->t[f->n];
        if (parse_entry(t, key, v, data, data_len, name, e) || !(t->name = strdup(key))) {
            json_decref(root);
            free_tensors(f);
            return -1;
        }
        f->n++;
    }
    json_decref(root);
    /* Overlap check on a copy sorted by start, so the caller keeps the file's order. */
    st_tensor *s = malloc((size_t)(f->n ? f->n : 1) * sizeof *s);
    if (!s) {
        free_tensors(f);
        return err_set(e, "%s: out of memory", name);
    }
    memcpy(s, f->t, (size_t)f->n * sizeof *s);
    qsort(s, (size_t)f->n, sizeof *s, cmp_begin);
    for (int i = 1; i < f->n; i++) {
        const unsigned char *prev_end = (const unsigned char *)s[i - 1].data + s[i - 1].nbytes;
        if ((const unsigned char *)s[i].data < prev_end) {
            err_set(e, "%s: tensors \"%s\" and \"%s\" overlap", name, s[i - 1].name, s[i].name);
            free(s);
            free_tensors(f);
            return -1;
        }
    }
    free(s);
    return 0;
}

int st_open(st_file *f, const char *path, dsv3_err *e)
{
    memset(f, 0, sizeof *f);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return err_errno(e, "%s", path);
    struct stat sb;
    if (fstat(fd, &sb)) {
        close(fd);
        return err_errno(e, "%s", path);
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return err_set(e, "%s: not a regular file", path);
    }
    size_t size = (size_t)sb.st_size;
    void *map = NULL;
    if (size) {
        map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            close(fd);
            return err_errno(e, "%s: mmap", path);
        }
    }
    close(fd);
    if (st_parse(f, map ? map : "", size, path, e)) {
        if (map)
            munmap(map, size);
        return -1;
    }
    f->map = map;
    f->size = size;
    f->path = strdup(path);
    return 0;
}

void st_close(st_file *f)
{
    free_tensors(f);
    if (f->map)
        munmap(f->map, f->size);
    free(f->path);
    memset(f, 0, sizeof *f);
}

const st_tensor *st_find(const st_file *f, const char *name)
{
    for (int i = 0; i < f->n; i++)
        if (!strcmp(f->t[i].name, name))
            return &f->t[i];
    return NULL;
}

float st_bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

uint16_t st_f32_to_bf16(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

float st_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h >> 15) << 31, ex = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (ex == 0) {
        if (!man) {
            u = sign;
        } else {  /* subnormal: normalise */
            ex = 127 - 15 + 1;
            while (!(man & 0x400)) {
                man <<= 1;
                ex--;
            }
            u = sign | ex << 23 | (man & 0x3ff) << 13;
        }
    } else if (ex == 31) {
        u = sign | 0x7f800000u | man << 13;
    } else {
        u = sign | (ex + 127 - 15) << 23 | man << 13;
    }
    float x;
    memcpy(&x, &u, 4);
    return x;
}

int st_to_f32(const st_tensor *t, float *out, int64_t n, dsv3_err *e)
{
    if (n != t->numel)
        return err_set(e, "tensor \"%s\": %lld elements, expected %lld", t->name,
                       (long long)t->numel, (long long)n);
    const unsigned char *p = t->data;
    switch (t->dtype) {
    case ST_F32:
        memcpy(out, p, (size_t)n * 4);
        return 0;
    case ST_BF16:
    case ST_F16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            out[i] = t->dtype == ST_BF16 ? st_bf16_to_f32(h) : st_f16_to_f32(h);
        }
        return 0;
    case ST_F64:
        for (int64_t i = 0; i < n; i++) {
            double d;
            memcpy(&d, p + 8 * i, 8);
            out[i] = (float)d;
        }
        return 0;
    default:
        return err_set(e, "tensor \"%s\": dtype %s is not a float type dsv3 reads", t->name,
                       st_dtype_name(t->dtype));
    }
}

/* ---- writing ---- */

void st_add(st_writer *w, const char *name, st_dtype dtype, int ndim, const int64_t *shape,
            const void *data)
{
    if (w->n == w->cap) {
        int cap = w->cap ? 2 * w->cap : 64;
        st_tensor *t = realloc(w->t, (size_t)cap * sizeof *t);
        if (!t) {
            w->failed = 1;
            return;
        }
        w->t = t;
        w->cap = cap;
    }
    st_tensor *t = &w->t[w->n];
    memset(t, 0, sizeof *t);
    t->name = strdup(name);
    if (!t->name || ndim > ST_MAX_DIMS) {
        free(t->name);
        w->failed = 1;
        return;
    }
    t->dtype = dtype;
    t->ndim = ndim;
    t->numel = 1;
    for (int i = 0; i < ndim; i++) {
        t->shape[i] = shape[i];
        t->numel *= shape[i];
    }
    t->nbytes = (uint64_t)t->numel * st_dtype_size(dtype);
    t->data = data;
    w->n++;
}

char *st_header_json(const st_tensor *t, int n, int *bad)
{
    json_t *h = json_object();
    json_t *meta = json_object();
    json_object_set_new(meta, "format", json_string("pt"));
    json_object_set_new(h, "__metadata__", meta);
    uint64_t off = 0;
    *bad = -1;
    for (int i = 0; i < n; i++) {
        json_t *o = json_object(), *sh = json_array(), *of = json_array();
        json_object_set_new(o, "dtype", json_string(st_dtype_name(t[i].dtype)));
        for (int d = 0; d < t[i].ndim; d++)
            json_array_append_new(sh, json_integer(t[i].shape[d]));
        json_object_set_new(o, "shape", sh);
        json_array_append_new(of, json_integer((json_int_t)off));
        json_array_append_new(of, json_integer((json_int_t)(off + t[i].nbytes)));
        json_object_set_new(o, "data_offsets", of);
        if (json_object_get(h, t[i].name) || json_object_set_new(h, t[i].name, o)) {
            json_decref(h);
            *bad = i;
            return NULL;
        }
        off += t[i].nbytes;
    }
    char *s = json_dumps(h, JSON_COMPACT);
    json_decref(h);
    return s;
}

int st_write(const st_writer *w, const char *path, dsv3_err *e)
{
    if (w->failed)
        return err_set(e, "%s: out of memory while collecting tensors", path);
    int bad_i;
    char *s = st_header_json(w->t, w->n, &bad_i);
    if (!s && bad_i >= 0)
        return err_set(e, "%s: cannot add tensor \"%s\" to the header (a second one of that "
                       "name?)", path, w->t[bad_i].name);
    if (!s)
        return err_set(e, "%s: out of memory", path);
    size_t sl = strlen(s), padded = (sl + 7) / 8 * 8;
    outfile of;
    if (outfile_open(&of, path, e)) {
        free(s);
        return -1;
    }
    unsigned char len8[8];
    for (int i = 0; i < 8; i++)
        len8[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    int bad = fwrite(len8, 1, 8, of.f) != 8 || fwrite(s, 1, sl, of.f) != sl;
    for (size_t i = sl; i < padded && !bad; i++)
        bad = fputc(' ', of.f) == EOF;
    free(s);
    for (int i = 0; i < w->n && !bad; i++)
        bad = w->t[i].nbytes && fwrite(w->t[i].data, 1, w->t[i].nbytes, of.f) != w->t[i].nbytes;
    if (bad) {
        err_errno(e, "%s: write failed", outfile_name(&of));
        outfile_abort(&of);
        return -1;
    }
    return outfile_commit(&of, e);
}

void st_writer_free(st_writer *w)
{
    for (int i = 0; i < w->n; i++)
        free(w->t[i].name);
    free(w->t);
    memset(w, 0, sizeof *w);
}
