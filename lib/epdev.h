/* epdev: the held experts' part of the device optimizer under --ep (dsv3-train --ep N
 * --device cuda, one GPU a rank; lib/train).
 *
 * Owns the collectives of the expert part [n_dense, n_params) of the device arrays (the
 * GPU's layout: experts regrouped per MoE block, kernels/gmodel.h): its gradient summed over
 * the group's replicas onto each replica's piece (ep_piece of that layout, lib/ep's
 * ep_dev_scatter_experts) into the device shard after lib/dp's buckets of the replicated
 * part, and after AdamW the pieces of the master weights (or, for a checkpoint, the
 * moments) gathered on every replica. The replicated part's bucketed all-gather covers
 * the padded [0, dn_pad), whose tail [n_dense, dn_pad) lies in the expert part: it is
 * saved before and put back after, so every rank keeps its own group's experts. */
#ifndef DSV3_EPDEV_H
#define DSV3_EPDEV_H

#include <stddef.h>

#include "comm.h"
#include "dp.h"
#include "ep.h"
#include "err.h"

struct gmodel;

typedef struct epdev {
    ep *p;
    comm *dc;             /* NCCL comm of the job */
    struct gmodel *gm;
    size_t n_dense, nx;   /* the replicated part's elements; the held experts' */
    size_t lo, hi;        /* this replica's piece of the experts (ep_piece of nx) */
    size_t sh;            /* where the piece sits in the device shard */
    size_t tail_n;        /* dn_pad - n_dense (0 when dn_pad <= n_dense) */
    float *tmp;           /* [replicas x piece]: the pieces received (replicas > 1) */
    float *piece;         /* [piece]: the piece sent by a gather (replicas > 1) */
    float *tail;          /* [tail_n] */
} epdev;

/* Device buffers for the layout: n_dense and n_params as lib/model's, dn_pad lib/dp's
 * padded replicated part, sh the piece's offset in the shard. */
int epdev_open(epdev *x, ep *p, comm *dc, struct gmodel *gm, size_t n_dense, size_t n_params,
               size_t dn_pad, size_t sh, dsv3_err *e);
void epdev_free(epdev *x);

/* The held experts' gradients (device) summed over the replicas into the shard's piece, on
 * the compute stream. */
int epdev_reduce(epdev *x, dsv3_err *e);
/* After AdamW: the replicated part's buckets (lib/dp) and the experts' pieces of the
 * master weights all-gathered in place, on the compute stream. */
int epdev_gather_master(epdev *x, dp *d, dsv3_err *e);
/* A checkpoint's moment (which 0: m, 1: v) whole in the device layout into full (bf16,
 * at least max(dn_pad, n_params) elements): the buckets, then the experts' pieces. */
int epdev_gather_moment(epdev *x, dp *d, int which, void *full, dsv3_err *e);

#endif
