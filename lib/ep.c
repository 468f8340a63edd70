/* ep: expert-parallel layout and exchanges (see ep.h). */
#include "ep.h"

#include <stdlib.h>
#include <string.h>

#include "../kernels/gepopt.h"

int ep_open(ep *p, comm *c, int size, int E, dsv3_err *e)
{
    memset(p, 0, sizeof *p);
    p->c = c;
    p->rank = c ? comm_rank(c) : 0;
    p->world = c ? comm_world(c) : 1;
    if (size < 1 || p->world % size)
        return err_set(e, "--ep %d does not divide the %d ranks of the job", size, p->world);
    if (E > 0 ? E % size : size > 1)
        return err_set(e, "--ep %d does not divide the model's %d routed experts", size, E);
    p->size = size;
    p->group = p->rank % size;
    p->base = p->rank - p->group;
    p->replicas = p->world / size;
    p->E = E;
    p->per = E > 0 ? E / size : 0;
    size_t w = (size_t)p->world;
    p->sn = calloc(4 * w, sizeof *p->sn);
    if (!p->sn)
        return err_set(e, "out of memory");
    p->so = p->sn + w;
    p->rn = p->so + w;
    p->ro = p->rn + w;
    return 0;
}

void ep_free(ep *p)
{
    free(p->sn);
    p->sn = p->so = p->rn = p->ro = NULL;
}

/* Counts and offsets for values to and from the members of the block (others 0). */
static void block_layout(ep *p, const int64_t *to, const int64_t *from, size_t width)
{
    memset(p->sn, 0, 4 * (size_t)p->world * sizeof *p->sn);
    size_t so = 0, ro = 0;
    for (int g = 0; g < p->size; g++) {
        int r = p->base + g;
        p->sn[r] = (size_t)to[g] * width;
        p->so[r] = so;
        so += p->sn[r];
        p->rn[r] = (size_t)from[g] * width;
        p->ro[r] = ro;
        ro += p->rn[r];
    }
}

int ep_exchange_counts(ep *p, const int64_t *cnt_to, int64_t *cnt_from, dsv3_err *e)
{
    int64_t ones[p->size];
    for (int g = 0; g < p->size; g++)
        ones[g] = 1;
    block_layout(p, ones, ones, (size_t)p->per);
    return comm_alltoallv(p->c, cnt_to, p->sn, p->so, cnt_from, p->rn, p->ro, COMM_I64, e);
}

int ep_exchange_rows(ep *p, const float *send, const int64_t *rows_to, float *recv,
                     const int64_t *rows_from, size_t width, dsv3_err *e)
{
    block_layout(p, rows_to, rows_from, width);
    return comm_alltoallv(p->c, send, p->sn, p->so, recv, p->rn, p->ro, COMM_F32, e);
}

void ep_piece(const ep *p, size_t n, int i, size_t *lo, size_t *hi)
{
    size_t R = (size_t)p->replicas, S = (n + R - 1) / R;
    *lo = (size_t)i * S < n ? (size_t)i * S : n;
    *hi = (size_t)(i + 1) * S < n ? (size_t)(i + 1) * S : n;
}

int ep_scatter_experts(ep *p, float *g, size_t n, dsv3_err *e)
{
    int R = p->replicas, me = p->rank / p->size;
    if (R <= 1 || !n)
        return 0;
    size_t lo, hi, a, b;
    ep_piece(p, n, me, &lo, &hi);
    size_t mine = hi - lo;
    float *tmp = malloc(((size_t)R * mine + 1) * sizeof *tmp);
    if (!tmp)
        return err_set(e, "out of memory for the expert gradients' sum");
    /* piece i of every replica to replica i */
    memset(p->sn, 0, 4 * (size_t)p->world * sizeof *p->sn);
    for (int i = 0; i < R; i++) {
        int r = p->group + i * p->size;
        ep_piece(p, n, i, &a, &b);
        p->sn[r] = b - a;
        p->so[r] = a;
        p->rn[r] = mine;
        p->ro[r] = (size_t)i * mine;
    }
    int rc = comm_alltoallv(p->c, g, p->sn, p->so, tmp, p->rn, p->ro, COMM_F32, e);
    for (size_t j = 0; !rc && j < mine; j++) {  /* summed in replica order: same bits */
        float s = tmp[j];
        for (int i = 1; i < R; i++)
            s += tmp[(size_t)i * mine + j];
        g[lo + j] = s;
    }
    free(tmp);
    return rc;
}

int ep_gather_experts(ep *p, float *x, size_t n, dsv3_err *e)
{
    int R = p->replicas, me = p->rank / p->size;
    if (R <= 1 || !n)
        return 0;
    size_t lo, hi, a, b;
    ep_piece(p, n, me, &lo, &hi);
    size_t mine = hi - lo;
    float *tmp = malloc((mine + 1) * sizeof *tmp);
    if (!tmp)
        return err_set(e, "out of memory for the expert pieces' gather");
    memcpy(tmp, x + lo, mine * sizeof *tmp);  /* send from a copy: recv overlaps it in x */
    memset(p->sn, 0, 4 * (size_t)p->world * sizeof *p->sn);
    for (int i = 0; i < R; i++) {
        int r = p->group + i * p->size;
        ep_piece(p, n, i, &a, &b);
        p->sn[r] = mine;
        p->so[r] = 0;
        p->rn[r] = b - a;
        p->ro[r] = a;
    }
    int rc = comm_alltoallv(p->c, tmp, p->sn, p->so, x, p->rn, p->ro, COMM_F32, e);
    free(tmp);
    return rc;
}

int ep_reduce_experts(ep *p, float *g, size_t n, dsv3_err *e)
{
    return ep_scatter_experts(p, g, n, e) || ep_gather_experts(p, g, n, e) ? -1 : 0;
}

int ep_max(ep *p, int64_t *v, size_t n, dsv3_err *e)
{
    return p->world == 1 ? 0 : comm_allreduce(p->c, v, n, COMM_I64, COMM_MAX, e);
}

/* ---- on device buffers ---- */

int ep_dev_scatter_experts(ep *p, comm *dc, const float *g, size_t n, float *out, float *tmp,
                           void *stream, dsv3_err *e)
{
    int R = p->replicas, me = p->rank / p->size;
    size_t lo, hi, a, b;
    ep_piece(p, n, me, &lo, &hi);
    size_t mine = hi - lo;
    if (R <= 1)
        return gepopt_copy(out, g + lo, mine * sizeof *g, stream, e);
    memset(p->sn, 0, 4 * (size_t)p->world * sizeof *p->sn);
    for (int i = 0; i < R; i++) {  /* piece i of every replica to replica i */
        int r = p->group + i * p->size;
        ep_piece(p, n, i, &a, &b);
        p->sn[r] = b - a;
        p->so[r] = a;
        p->rn[r] = mine;
        p->ro[r] = (size_t)i * mine;
    }
    comm_set_stream(dc, stream);
    if (comm_alltoallv(dc, g, p->sn, p->so, tmp, p->rn, p->ro, COMM_F32, e))
        return -1;
    return gepopt_sum_replicas(out, tmp, mine, R, stream, e);
}

int ep_dev_gather_experts(ep *p, comm *dc, const void *piece, void *x, size_t n, int type,
                          void *stream, dsv3_err *e)
{
    int R = p->replicas, me = p->rank / p->size;
    size_t lo, hi, a, b, es = comm_type_size(type);
    ep_piece(p, n, me, &lo, &hi);
    size_t mine = hi - lo;
    if (R <= 1)
        return gepopt_copy((char *)x + lo * es, piece, mine * es, stream, e);
    memset(p->sn, 0, 4 * (size_t)p->world * sizeof *p->sn);
    for (int i = 0; i < R; i++) {
        int r = p->group + i * p->size;
        ep_piece(p, n, i, &a, &b);
        p->sn[r] = mine;
        p->so[r] = 0;
        p->rn[r] = b - a;
        p->ro[r] = a;
    }
    comm_set_stream(dc, stream);
    return comm_alltoallv(dc, piece, p->sn, p->so, x, p->rn, p->ro, type, e);
}
