/* dp: data parallelism with the optimizer state sharded over the ranks (ZeRO-1).
 *
 * Owns one rank's view of a data-parallel job on lib/comm: the layout of the flat parameter
 * array in shards (padded to a multiple of the world size and cut into equal contiguous
 * shards, rank r owning [lo, hi)), the collectives of an update (the summed gradient
 * reduce-scattered to the owners of each shard, the updated parameters all-gathered back),
 * the sums of a step's statistics, and the agreement of all ranks on failure and on
 * stopping, so that every rank takes the same branch before each collective.
 *
 * A single process (no comm, or a world of 1) owns the whole array: every call is then a
 * no-op that touches no buffer, so one process computes exactly what it did without this
 * module. The calls take plain pointers so that a device backend can pass device memory
 * through the same calls once the collectives run on it (lib/comm's NCCL backend). */
#ifndef DSV3_DP_H
#define DSV3_DP_H

#include <stddef.h>
#include <stdint.h>

#include "comm.h"
#include "err.h"

typedef struct dp {
    comm *c;          /* NULL: one process */
    int rank, world;
    size_t n;         /* parameters (floats) */
    size_t n_pad;     /* n rounded up to a multiple of world */
    size_t shard;     /* n_pad / world: elements per shard */
    size_t lo, hi;    /* this rank's shard of the real parameters: [lo, hi), hi <= n */
    float *gshard;    /* [shard]: the summed gradient of this shard (world > 1) */
    float *pshard;    /* [shard]: this shard's parameters, sent by the all-gather */
    float *pad;       /* [n_pad] when n_pad > n: padded copy for the collectives */
} dp;

/* This rank's place (c NULL: rank 0 of 1). No layout yet. */
void dp_open(dp *d, comm *c);
/* The shard layout of n parameters and the buffers of the collectives. */
int dp_layout(dp *d, size_t n, dsv3_err *e);
void dp_free(dp *d);

/* The shard [*lo, *hi) that rank r of `world` owns of n parameters (the layout above). */
void dp_shard_range(size_t n, int world, int r, size_t *lo, size_t *hi);

/* Agreement, collective: each rank gives its local status (0 or -1 with e set) and gets
 * -1 if any rank failed: with its own message when it failed itself, else a message
 * naming the failed rank (the highest one). *flag (may be NULL) is OR-ed over the ranks
 * in the same call: a stop request. */
int dp_agree(dp *d, int local_rc, int *flag, dsv3_err *e);

/* Sums over ranks, in place. */
int dp_sum_i64(dp *d, int64_t *v, size_t n, dsv3_err *e);
int dp_sum_f64(dp *d, double *v, size_t n, dsv3_err *e);
/* Rank root's n bytes to every rank. */
int dp_broadcast_bytes(dp *d, void *buf, size_t n, int root, dsv3_err *e);

/* Reduce-scatter: *g is set to this rank's shard of the sum over ranks of grads ([n]),
 * g[i] holding element lo + i (a single process: grads itself). */
int dp_reduce_grads(dp *d, const float *grads, float **g, dsv3_err *e);
/* All-gather: every rank's shard of params ([n]) to every rank. */
int dp_gather_params(dp *d, float *params, dsv3_err *e);

#endif
