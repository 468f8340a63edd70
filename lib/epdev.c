/* epdev: the expert part of the device optimizer under --ep (see epdev.h). */
#include "epdev.h"

#include <string.h>

#include "../kernels/gepopt.h"
#include "../kernels/gmodel.h"
#include "../kernels/gpuctx.h"

int epdev_open(epdev *x, ep *p, comm *dc, struct gmodel *gm, size_t n_dense, size_t n_params,
               size_t dn_pad, size_t sh, dsv3_err *e)
{
    memset(x, 0, sizeof *x);
    x->p = p, x->dc = dc, x->gm = gm;
    x->n_dense = n_dense;
    x->nx = n_params - n_dense;
    x->sh = sh;
    x->tail_n = dn_pad > n_dense ? dn_pad - n_dense : 0;
    if (x->tail_n > x->nx)
        return err_set(e, "epdev: the padded replicated part runs past the experts");
    ep_piece(p, x->nx, p->rank / p->size, &x->lo, &x->hi);
    size_t mine = x->hi - x->lo, R = (size_t)p->replicas;
    if (x->tail_n && !(x->tail = gpu_malloc(x->tail_n * 4, e)))
        return -1;
    if (R > 1 && (!(x->tmp = gpu_malloc((R * mine + 1) * 4, e)) ||
                  !(x->piece = gpu_malloc((mine + 1) * 4, e))))
        return -1;
    return 0;
}

void epdev_free(epdev *x)
{
    gpu_free(x->tmp);
    gpu_free(x->piece);
    gpu_free(x->tail);
    x->tmp = x->piece = x->tail = NULL;
}

int epdev_reduce(epdev *x, dsv3_err *e)
{
    return ep_dev_scatter_experts(x->p, x->dc, gmodel_dev_grads(x->gm) + x->n_dense, x->nx,
                                  gmodel_dp_gshard(x->gm) + x->sh, x->tmp,
                                  gmodel_stream(x->gm), e);
}

int epdev_gather_master(epdev *x, dp *d, dsv3_err *e)
{
    float *w = gmodel_dev_master(x->gm) + x->n_dense;
    void *s = gmodel_stream(x->gm);
    size_t mine = x->hi - x->lo;
    int R = x->p->replicas;
    if (gepopt_copy(x->tail, w, x->tail_n * 4, s, e) ||
        (R > 1 && gepopt_copy(x->piece, w + x->lo, mine * 4, s, e)) ||
        dp_dev_gather(d, NULL, gmodel_dev_master(x->gm), COMM_F32, s, e) ||
        gepopt_copy(w, x->tail, x->tail_n * 4, s, e))
        return -1;
    return R > 1 ? ep_dev_gather_experts(x->p, x->dc, x->piece, w, x->nx, COMM_F32, s, e) : 0;
}

int epdev_gather_moment(epdev *x, dp *d, int which, void *full, dsv3_err *e)
{
    const char *mom = (const char *)gmodel_dp_moment(x->gm, which);
    void *s = gmodel_stream(x->gm);
    return dp_dev_gather(d, mom, full, COMM_BF16, s, e) ||
                   ep_dev_gather_experts(x->p, x->dc, mom + x->sh * 2,
                                         (char *)full + x->n_dense * 2, x->nx, COMM_BF16, s, e)
               ? -1
               : 0;
}
