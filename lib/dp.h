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
 * module. On GPUs (dsv3-train --device cuda) it also owns the bucketed device layout and
 * its collectives on device buffers over lib/comm's NCCL backend (the dp_dev_* calls). */
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
    /* The device layout (dp_plan_buckets): the padded array cut into buckets, each cut
     * into world equal pieces; this rank's shard is its piece of every bucket, in bucket
     * order. Set only for data parallelism on device buffers. */
    comm *dc;             /* the device comm (NCCL) the bucket collectives run on */
    struct dp_bucket *bk; /* [nbk], from the top of the array down */
    int nbk;
    size_t dn_pad;        /* n rounded up to a multiple of 4 x world: the device arrays */
    size_t bshard;        /* elements of this rank's bucketed shard: dn_pad / world */
} dp;

/* A bucket of the device layout: the elements [lo, hi) of the padded array (lo, hi
 * multiples of 4 x world, so every piece starts at a 16-byte boundary for vector loads), reduce-scattered as one call once the backward has passed ready
 * point `ready`; rank r owns [lo + r*piece, lo + (r+1)*piece), stored at shard_off of its
 * shard. */
typedef struct dp_bucket {
    size_t lo, hi, piece, shard_off;
    int ready;
} dp_bucket;

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

/* ---- data parallelism on device buffers (bucketed for overlap with the backward) ----
 *
 * ready[0..n_ready) are offsets, descending, ending at 0: once the backward has passed
 * point k, the gradients of [ready[k], n) are final. Buckets are cut at multiples of
 * 4 x world at or above a ready point, from the top (dn_pad) down, each closed when it holds at least
 * `target` elements or at point 0, so bucket b can be reduce-scattered as soon as point
 * bk[b].ready is passed. The padded tail [n, dn_pad) sits in the top bucket. Also sets d->dc. */
int dp_plan_buckets(dp *d, comm *dc, const size_t *ready, int n_ready, size_t target,
                    dsv3_err *e);
/* The pieces of this rank's bucketed shard inside the real parameters [0, n): span i is
 * device elements [dev[i], dev[i] + len[i]) held at shard offset sh[i]. Arrays of nbk
 * entries; returns the number of spans (empty ones left out). */
int dp_shard_spans(const dp *d, size_t *dev, size_t *sh, size_t *len);
/* Reduce-scatter (sum, F32) of bucket b of the device gradients grads ([n_pad]) into this
 * rank's shard gshard, queued on `stream`. Device arrays hold dn_pad elements. */
int dp_dev_reduce_bucket(dp *d, int b, const float *grads, float *gshard, void *stream,
                         dsv3_err *e);
/* All-gather of every bucket into full ([dn_pad] elements of `type`): from the shard
 * `shard` (bucketed, NULL: full itself holds each rank's pieces in place), on `stream`. */
int dp_dev_gather(dp *d, const void *shard, void *full, int type, void *stream, dsv3_err *e);

#endif
