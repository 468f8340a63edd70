/* loader: batches for dsv3-train from a folder written by dsv3-pack (docs/pack-format.md).
 *
 * Owns reading the folder: the manifest and its checks (sizes, checksums, header fields of
 * every shard against the manifest), the order of records (a fresh seeded permutation of
 * the split every epoch), the split of that order between ranks, and the batches: inputs,
 * shifted targets, a loss mask that skips padding, and segment numbers for masking
 * attention between documents. The position (epoch, index) is all the state: saving it
 * and seeking to it later gives the identical next batch. */
#ifndef DSV3_LOADER_H
#define DSV3_LOADER_H

#include <stdint.h>

#include "err.h"

typedef struct loader_params {
    const char *split;   /* "train" (default when NULL) or "val" */
    uint32_t batch;      /* B: records per batch on this rank */
    uint64_t seed;       /* the order of every epoch derives from it */
    uint32_t rank, world;/* this rank reads records r, r+N, r+2N... of each epoch's order */
    int verify;          /* 1: xxh3 of every file against the manifest at open (reads all) */
} loader_params;

/* Where the next batch starts: record `index` of this rank's share of epoch `epoch`. */
typedef struct loader_pos {
    uint64_t epoch, index;
} loader_pos;

typedef struct loader_batch {
    uint32_t rows, cols;  /* B and L */
    uint32_t *tokens;     /* rows x cols inputs */
    uint32_t *targets;    /* rows x cols: the input shifted left by one */
    uint8_t *mask;        /* rows x cols: 1 where the target counts in the loss (not padding) */
    uint32_t *segment;    /* rows x cols: segment number within the row; attend only within one */
    uint64_t *record;     /* rows: the record's number in the split, in manifest order */
    loader_pos pos;       /* the position this batch started at */
} loader_batch;

typedef struct loader loader;

int loader_open(loader **l, const char *dir, const loader_params *p, dsv3_err *e);
void loader_close(loader *l);
/* Records in the split, and this rank's share of each epoch (the same on every rank: the
 * last records of an epoch's order, fewer than world, are left out of that epoch). */
uint64_t loader_records(const loader *l);
uint64_t loader_records_per_rank(const loader *l);
uint32_t loader_seq_len(const loader *l);
/* The next batch into buffers the loader owns (valid until the next call); wraps into the
 * next epoch mid-batch when an epoch ends. */
int loader_next(loader *l, const loader_batch **b, dsv3_err *e);
loader_pos loader_tell(const loader *l);
int loader_seek(loader *l, loader_pos pos, dsv3_err *e);

#endif
