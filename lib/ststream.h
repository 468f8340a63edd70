/* ststream: a safetensors file written one tensor at a time.
 *
 * The safetensors header holds every tensor's offsets, so it must be known before the first
 * data byte: the caller declares all tensors (name, dtype, shape) first, sts_begin writes
 * the header (the same layout as lib/safetensors' st_write: __metadata__ {"format": "pt"},
 * tensors in declaration order, header padded with spaces to a multiple of 8), then the
 * data is appended in declaration order, whole tensors or in pieces, and sts_commit checks
 * that every declared byte came and commits through lib/outfile (temp file, fsync,
 * rename). Peak memory is the header plus whatever buffer the caller writes from, so a
 * converter holds one tensor at a time, not the file. */
#ifndef DSV3_STSTREAM_H
#define DSV3_STSTREAM_H

#include <stdint.h>

#include "err.h"
#include "outfile.h"
#include "safetensors.h"

typedef struct sts_entry {
    char *name;
    st_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    uint64_t nbytes;
} sts_entry;

typedef struct ststream {
    sts_entry *t;
    int n, cap;
    int failed;         /* a declaration failed (memory, rank); sts_begin reports it */
    outfile of;
    int open;           /* between sts_begin and sts_commit/sts_abort */
    int cur;            /* tensor being written */
    uint64_t cur_done;  /* its bytes written so far */
    uint64_t total;     /* data bytes of all declared tensors */
    uint64_t header;    /* 8 + padded header bytes, set by sts_begin */
} ststream;

/* Declares the next tensor of the file. Errors surface at sts_begin. */
void sts_declare(ststream *s, const char *name, st_dtype dtype, int ndim, const int64_t *shape);

/* Opens PATH and writes the header of the declared tensors. */
int sts_begin(ststream *s, const char *path, dsv3_err *e);

/* Appends n bytes of tensor data. Pieces go to the declared tensors in order; a piece may
 * not run past the end of the tensor it starts in. name, when not NULL, must be the name
 * of that tensor (a check that the caller's order is the declared one). */
int sts_write(ststream *s, const char *name, const void *data, uint64_t n, dsv3_err *e);

/* Checks every declared byte was written, then makes the file visible. */
int sts_commit(ststream *s, dsv3_err *e);

/* Drops the half-written file (nothing appears at PATH). Safe after a failed call. */
void sts_abort(ststream *s);

/* Frees the declarations (and aborts an open file). */
void sts_free(ststream *s);

/* Bytes the file will have: 8 + padded header + data. Valid after sts_begin. */
uint64_t sts_file_size(const ststream *s);

#endif
