/* dp: ZeRO-1 data parallelism over lib/comm (see dp.h). */
#include "dp.h"

#include <stdlib.h>
#include <string.h>

void dp_open(dp *d, comm *c)
{
    memset(d, 0, sizeof *d);
    d->c = c;
    d->rank = c ? comm_rank(c) : 0;
    d->world = c ? comm_world(c) : 1;
}

void dp_shard_range(size_t n, int world, int r, size_t *lo, size_t *hi)
{
    size_t shard = (n + (size_t)world - 1) / (size_t)world;
    *lo = shard * (size_t)r;
    *hi = *lo + shard;
    if (*lo > n)
        *lo = n;
    if (*hi > n)
        *hi = n;
}

int dp_layout(dp *d, size_t n, dsv3_err *e)
{
    size_t w = (size_t)d->world;
    d->n = n;
    d->shard = (n + w - 1) / w;
    d->n_pad = d->shard * w;
    dp_shard_range(n, d->world, d->rank, &d->lo, &d->hi);
    if (d->world == 1)
        return 0;
    d->gshard = malloc(d->shard * sizeof *d->gshard);
    d->pshard = malloc(d->shard * sizeof *d->pshard);
    if (d->n_pad > n)
        d->pad = calloc(d->n_pad, sizeof *d->pad);
    if (!d->gshard || !d->pshard || (d->n_pad > n && !d->pad))
        return err_set(e, "out of memory for the data-parallel buffers (%zu MiB)",
                       (2 * d->shard + (d->n_pad > n ? d->n_pad : 0)) * 4 >> 20);
    return 0;
}

void dp_free(dp *d)
{
    free(d->gshard);
    free(d->pshard);
    free(d->pad);
    free(d->bk);
    d->gshard = d->pshard = d->pad = NULL;
    d->bk = NULL;
    d->nbk = 0;
}

int dp_agree(dp *d, int local_rc, int *flag, dsv3_err *e)
{
    if (d->world == 1)
        return local_rc ? -1 : 0;
    int64_t v[2] = {local_rc ? d->rank + 1 : 0, flag && *flag};
    dsv3_err ce;
    if (comm_allreduce(d->c, v, 2, COMM_I64, COMM_MAX, &ce)) {
        if (!local_rc)
            *e = ce;
        return -1;
    }
    if (flag)
        *flag = v[1] != 0;
    if (local_rc)
        return -1;
    if (v[0])
        return err_set(e, "stopping: rank %d failed (its message says why)", (int)v[0] - 1);
    return 0;
}

int dp_sum_i64(dp *d, int64_t *v, size_t n, dsv3_err *e)
{
    return d->world == 1 ? 0 : comm_allreduce(d->c, v, n, COMM_I64, COMM_SUM, e);
}

int dp_sum_f64(dp *d, double *v, size_t n, dsv3_err *e)
{
    return d->world == 1 ? 0 : comm_allreduce(d->c, v, n, COMM_F64, COMM_SUM, e);
}

int dp_broadcast_bytes(dp *d, void *buf, size_t n, int root, dsv3_err *e)
{
    return d->world == 1 ? 0 : comm_broadcast(d->c, buf, n, COMM_U8, root, e);
}

/* The host path: one call per update after the backward. On GPUs the reduce-scatter goes
 * per bucket as the backward finishes them (dp_dev_reduce_bucket below). */
int dp_reduce_grads(dp *d, const float *grads, float **g, dsv3_err *e)
{
    if (d->world == 1) {
        *g = (float *)grads;
        return 0;
    }
    const float *send = grads;
    if (d->pad) {   /* the tail past n stays 0 */
        memcpy(d->pad, grads, d->n * sizeof *d->pad);
        memset(d->pad + d->n, 0, (d->n_pad - d->n) * sizeof *d->pad);
        send = d->pad;
    }
    *g = d->gshard;
    return comm_reduce_scatter(d->c, send, d->gshard, d->shard, COMM_F32, COMM_SUM, e);
}

int dp_gather_params(dp *d, float *params, dsv3_err *e)
{
    if (d->world == 1)
        return 0;
    size_t own = d->hi - d->lo;
    memcpy(d->pshard, params + d->lo, own * sizeof *d->pshard);
    memset(d->pshard + own, 0, (d->shard - own) * sizeof *d->pshard);
    float *recv = d->pad ? d->pad : params;
    if (comm_allgather(d->c, d->pshard, recv, d->shard, COMM_F32, e))
        return -1;
    if (d->pad)
        memcpy(params, d->pad, d->n * sizeof *params);
    return 0;
}

/* ---- device layout ---- */

int dp_plan_buckets(dp *d, comm *dc, const size_t *ready, int n_ready, size_t target,
                    dsv3_err *e)
{
    size_t w = (size_t)d->world, u = 4 * w;
    if (n_ready < 1 || ready[n_ready - 1] != 0)
        return err_set(e, "dp_plan_buckets: the last ready point must be 0");
    for (int k = 1; k < n_ready; k++)
        if (ready[k] > ready[k - 1] || ready[k - 1] > d->n)
            return err_set(e, "dp_plan_buckets: ready points must descend within [0, n]");
    free(d->bk);
    d->bk = calloc((size_t)n_ready, sizeof *d->bk);
    if (!d->bk)
        return err_set(e, "out of memory");
    d->dc = dc;
    d->nbk = 0;
    d->dn_pad = (d->n + u - 1) / u * u;
    size_t hi = d->dn_pad;
    for (int k = 0; k < n_ready && hi > 0; k++) {
        size_t lo = (ready[k] + u - 1) / u * u;   /* at or above the point: all final */
        if (lo >= hi || (hi - lo < target && k < n_ready - 1))
            continue;
        dp_bucket *b = &d->bk[d->nbk++];
        b->lo = lo, b->hi = hi, b->piece = (hi - lo) / w, b->ready = k;
        hi = lo;
    }
    /* shard offsets: the buckets in array order (the lowest bucket first) */
    size_t at = 0;
    for (int i = d->nbk - 1; i >= 0; i--) {
        d->bk[i].shard_off = at;
        at += d->bk[i].piece;
    }
    d->bshard = at;
    return 0;
}

int dp_shard_spans(const dp *d, size_t *dev, size_t *sh, size_t *len)
{
    int k = 0;
    for (int i = d->nbk - 1; i >= 0; i--) {
        const dp_bucket *b = &d->bk[i];
        size_t lo = b->lo + (size_t)d->rank * b->piece, hi = lo + b->piece;
        if (hi > d->n)
            hi = d->n;
        if (lo >= hi)
            continue;
        dev[k] = lo, sh[k] = b->shard_off, len[k] = hi - lo;
        k++;
    }
    return k;
}

int dp_dev_reduce_bucket(dp *d, int b, const float *grads, float *gshard, void *stream,
                         dsv3_err *e)
{
    const dp_bucket *k = &d->bk[b];
    comm_set_stream(d->dc, stream);
    return comm_reduce_scatter(d->dc, grads + k->lo, gshard + k->shard_off, k->piece, COMM_F32,
                               COMM_SUM, e);
}

int dp_dev_gather(dp *d, const void *shard, void *full, int type, void *stream, dsv3_err *e)
{
    size_t es = comm_type_size(type);
    comm_set_stream(d->dc, stream);
    for (int i = d->nbk - 1; i >= 0; i--) {
        const dp_bucket *k = &d->bk[i];
        const char *send = shard ? (const char *)shard + k->shard_off * es
                                 : (const char *)full + (k->lo + (size_t)d->rank * k->piece) * es;
        if (comm_allgather(d->dc, send, (char *)full + k->lo * es, k->piece, type, e))
            return -1;
    }
    return 0;
}
