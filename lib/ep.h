/* ep: expert parallelism on lib/comm: which rank holds which routed experts, and the
 * exchanges of rows between the ranks that route tokens and those that hold the experts.
 *
 * Owns the layout: with --ep N, every MoE layer's E routed experts are cut into N contiguous
 * groups of E/N; rank r holds group r mod N only. The ranks [b, b + N) with b = r - r mod N
 * form r's EP block: a token routed on rank r goes to the rank of that block holding its
 * expert. A world of W = D x N ranks holds D replicas of every group (ranks g, g + N, ...):
 * data parallelism over them, ZeRO-1 style: ep_scatter_experts sums each replica's piece
 * of the expert gradients onto it, ep_gather_experts spreads the updated pieces.
 *
 * Every call here is collective over the whole world (lib/comm has no sub-communicators):
 * alltoallv with no values to ranks outside the block or the replica set, which every
 * backend (MPI, TCP, NCCL) carries as empty messages. A single process (no comm, or N 1)
 * never calls them. */
#ifndef DSV3_EP_H
#define DSV3_EP_H

#include <stddef.h>
#include <stdint.h>

#include "comm.h"
#include "err.h"

typedef struct ep {
    comm *c;          /* NULL: one process */
    int rank, world;
    int size;         /* N: the ranks an MoE layer's experts are spread over (1: off) */
    int group;        /* rank mod N: the expert group this rank holds */
    int base;         /* rank - group: the first rank of this rank's EP block */
    int replicas;     /* world / N: copies of each group */
    int E, per;       /* routed experts, experts per group (E / N) */
    size_t *sn, *so, *rn, *ro;  /* [world]: alltoallv counts and offsets (scratch) */
    int fail_rank, fail_at;     /* test aid: rank fail_rank's fail_at-th buffer for received
                                   expert rows (forward and backward blocks alike) fails as
                                   if out of memory (0: never; lib/model) */
    int n_allocs;               /* ... those buffers counted so far */
} ep;

/* This rank's place with N = size (1 <= size, size divides the world and E); messages
 * say which does not. c NULL: a single process (size must be 1). */
int ep_open(ep *p, comm *c, int size, int E, dsv3_err *e);
void ep_free(ep *p);

/* The rank holding expert x in this rank's block. */
static inline int ep_owner(const ep *p, int x)
{
    return p->base + x / p->per;
}

/* Counts: cnt_to[x] (x < E) rows this rank sends for expert x; cnt_from[g * per + j] gets
 * the rows block member g sends for this rank's j-th expert. */
int ep_exchange_counts(ep *p, const int64_t *cnt_to, int64_t *cnt_from, dsv3_err *e);

/* Rows of `width` floats: rows_to[g] rows for block member g, packed in send in member
 * order; rows_from[g] rows from member g land in recv in member order. */
int ep_exchange_rows(ep *p, const float *send, const int64_t *rows_to, float *recv,
                     const int64_t *rows_from, size_t width, dsv3_err *e);

/* Replica i's piece [lo, hi) of an array of n elements of the group (n cut into replicas
 * pieces of ceil(n / replicas)). */
void ep_piece(const ep *p, size_t n, int i, size_t *lo, size_t *hi);

/* The expert gradients of this rank's group, g[n], summed over the group's replicas on
 * this replica's piece (ep_piece of replica rank / size; one alltoallv, a reduce-scatter:
 * each piece summed in replica order). The rest of g is left as it was. No-op with one
 * replica. */
int ep_scatter_experts(ep *p, float *g, size_t n, dsv3_err *e);

/* Every replica's piece of x[n] from its holder into x (an all-gather, one alltoallv). */
int ep_gather_experts(ep *p, float *x, size_t n, dsv3_err *e);

/* ep_scatter_experts then ep_gather_experts on g: the whole sum on every replica, the same
 * bits everywhere. */
int ep_reduce_experts(ep *p, float *g, size_t n, dsv3_err *e);

/* ---- the same pieces on device buffers (the device optimizer under --ep, lib/train) ----
 * Over dc, a NCCL comm of the same job (lib/comm has no sub-communicators: one alltoallv,
 * grouped ncclSend/ncclRecv, with no values to ranks outside the replica set), queued on
 * `stream`. The pieces are ep_piece's, of whatever layout the caller's array has. */

/* out[mine] (device) = this replica's piece of the sum over the group's replicas of g[n]
 * (device), summed in replica order as ep_scatter_experts; tmp: device scratch of
 * replicas x mine floats (unused with one replica: out = the piece, copied). */
int ep_dev_scatter_experts(ep *p, comm *dc, const float *g, size_t n, float *out, float *tmp,
                           void *stream, dsv3_err *e);

/* Every replica's piece into x[n] (device, elements of `type`), this replica's sent from
 * piece (device, its mine elements, not inside x). */
int ep_dev_gather_experts(ep *p, comm *dc, const void *piece, void *x, size_t n, int type,
                          void *stream, dsv3_err *e);

/* Any rank's flag: an all-reduce MAX over the world of v (one process: v itself). */
int ep_max(ep *p, int64_t *v, size_t n, dsv3_err *e);

#endif
