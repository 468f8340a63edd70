/* safetensors: HF's tensor file format, read memory-mapped and written atomically.
 *
 * The format: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor
 * name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the byte
 * after the header) plus an optional "__metadata__" object of strings, then the data. The
 * reader checks every header field before any pointer is formed: the length against the
 * file, each dtype, each shape (non-negative, product without overflow), each offset pair
 * against the data size and the shape, and that no two tensors overlap. It owns the
 * mapping; tensors point into it. The writer lays tensors out in the order given, pads the
 * header with spaces to a multiple of 8 (so every tensor is 8-byte aligned, as HF's writer
 * does), and commits through lib/outfile. */
#ifndef DSV3_SAFETENSORS_H
#define DSV3_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

typedef enum st_dtype {
    ST_F32, ST_F16, ST_BF16, ST_F64, ST_I64, ST_I32, ST_I16, ST_I8, ST_U8, ST_BOOL,
    ST_F8_E4M3, ST_F8_E5M2, ST_NDTYPES
} st_dtype;

#define ST_MAX_DIMS 8

typedef struct st_tensor {
    char *name;
    st_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    int64_t numel;
    const void *data;  /* into the mapping (reader) or the caller's buffer (writer) */
    uint64_t nbytes;
} st_tensor;

typedef struct st_file {
    char *path;
    void *map;
    size_t size;
    st_tensor *t;
    int n;
} st_file;

/* The dtype's name in the format ("F32", "BF16", ...) and its element size in bytes. */
const char *st_dtype_name(st_dtype d);
size_t st_dtype_size(st_dtype d);

int st_open(st_file *f, const char *path, dsv3_err *e);

/* Parses a file image already in memory (the fuzz target's entry). buf must outlive f;
 * st_close does not free it. */
int st_parse(st_file *f, const void *buf, size_t len, const char *name, dsv3_err *e);

void st_close(st_file *f);

/* The tensor of that name, or NULL. */
const st_tensor *st_find(const st_file *f, const char *name);

/* Copies t into out as float32, converting F32/F16/BF16/F64. n must equal t->numel. */
int st_to_f32(const st_tensor *t, float *out, int64_t n, dsv3_err *e);

/* ---- writing ---- */

typedef struct st_writer {
    st_tensor *t;
    int n, cap;
    int failed;  /* an allocation failed in st_add; st_write reports it */
} st_writer;

/* Adds a tensor (data is not copied: it must live until st_write). */
void st_add(st_writer *w, const char *name, st_dtype dtype, int ndim, const int64_t *shape,
            const void *data);

/* The header JSON of tensors t[0..n) laid out in that order (malloc'd; the caller frees),
 * with __metadata__ {"format": "pt"}: what st_write writes, and lib/ststream too. NULL when
 * out of memory, or with *bad = i when tensor i's name repeats an earlier one. */
char *st_header_json(const st_tensor *t, int n, int *bad);

/* Writes all added tensors to path ("-" for stdout), with __metadata__ {"format": "pt"}. */
int st_write(const st_writer *w, const char *path, dsv3_err *e);

void st_writer_free(st_writer *w);

/* float32 <-> bfloat16 with round-to-nearest-even, as torch converts. */
uint16_t st_f32_to_bf16(float x);
float st_bf16_to_f32(uint16_t h);
float st_f16_to_f32(uint16_t h);

#endif
