/* gep: expert parallelism's row exchanges on device buffers (see gep.h). The layout and
 * the counts' exchange are lib/ep's; the order of rows on the holder is lib/model's
 * ep_forward's (arrival: sender by sender, expert by expert within; the experts' GEMMs run
 * expert-major: expert by expert, sender by sender within). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "../lib/comm.h"
#include "../lib/ep.h"
}
#include "cuda_util.cuh"
#include "gep.h"
#include "layers.h"
#include "moe.h"
#include "moe_fp8.h"

#define GEP_EVENTS 256
#define B16_(p) ((gpu_bf16 *)(p))

/* What one block's forward leaves for its backward. */
typedef struct gep_blk {
    int64_t *cnt_to;    /* [E] rows this rank sent per expert */
    int64_t *cnt;       /* [S * per] rows from block member g for held expert j (g * per + j) */
    int64_t R;          /* rows received */
    bf16 *xr, *egu, *eh;/* arena, expert-major: received rows, gate|up, SwiGLU output */
    long long *seg;     /* arena: [2 * S * per] expert-major segment starts, then arrival starts */
    int *loff;          /* arena: [per + 1] the held experts' row offsets (expert-major) */
    int ran;
} gep_blk;

struct gep {
    ep *p;
    comm *dev;
    gpu_ctx *c;
    int nb, H, mi, S, per, E;
    gep_blk *b;
    int *hoff;                   /* [E + 1] host copy of a plan's offsets */
    int64_t *to, *so, *from, *ro;/* [S] rows to/from each member and their row offsets */
    long long *hseg;             /* [2 * S * per] host staging of a block's segments */
    int *hloff;                  /* [per + 1] */
    size_t *sn, *son, *rn, *ron; /* [world] element counts and offsets for comm_alltoallv */
    char *hs, *hr;               /* host staging (rows through the host comm) */
    size_t hs_cap, hr_cap;
    cudaEvent_t ev[2][GEP_EVENTS];
    int n_ev;
    int64_t n_x;                 /* exchanges since gep_take_time */
    double ms, bytes;
    gpu_moe_fp8 *f8;             /* the held experts' GEMMs: FP8 when f8->on (gep_set_fp8) */
    gpu_moe_fp8 off;             /* f8 without gep_set_fp8: never on, bf16 GEMMs */
};

#define ST(q) ((cudaStream_t)gpu_ctx_stream((q)->c))

/* Rows between arrival order and expert-major order: row i (expert-major) lies in segment
 * k with sd[k] <= i < sd[k + 1] (the largest such k: empty segments share a start), which
 * arrived from ss[k] on. One block a row, 16 bytes a thread (H a multiple of 8). */
__global__ void k_ep_permute(bf16 *out, const bf16 *in, const long long *sd,
                             const long long *ss, int nseg, int H, int to_expert)
{
    long long i = blockIdx.x;
    int lo = 0, hi = nseg - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (sd[mid] <= i)
            lo = mid;
        else
            hi = mid - 1;
    }
    long long a = ss[lo] + (i - sd[lo]);
    const uint4 *s = (const uint4 *)(in + (to_expert ? a : i) * H);
    uint4 *d = (uint4 *)(out + (to_expert ? i : a) * H);
    for (int c = threadIdx.x; c < H / 8; c += blockDim.x)
        d[c] = s[c];
}

static int permute(gep *q, const gep_blk *B, bf16 *out, const bf16 *in, int to_expert,
                   dsv3_err *e)
{
    int nseg = q->S * q->per;
    if (!B->R)
        return 0;
    k_ep_permute<<<(unsigned)B->R, 64, 0, ST(q)>>>(out, in, B->seg, B->seg + nseg, nseg, q->H,
                                                   to_expert);
    LAUNCH_CHECK("k_ep_permute", e);
    return 0;
}

extern "C" void gep_destroy(gep *q)
{
    if (!q)
        return;
    for (int i = 0; q->b && i < q->nb; i++) {
        free(q->b[i].cnt_to);
        free(q->b[i].cnt);
    }
    free(q->b);
    free(q->hoff);
    free(q->to);
    free(q->hseg);
    free(q->hloff);
    free(q->sn);
    free(q->hs);
    free(q->hr);
    for (int w = 0; w < 2; w++)
        for (int i = 0; i < GEP_EVENTS; i++)
            if (q->ev[w][i])
                cudaEventDestroy(q->ev[w][i]);
    free(q);
}

extern "C" int gep_create(gep **out, ep *p, comm *dev, gpu_ctx *c, int n_blocks, int H, int mi,
                          dsv3_err *e)
{
    *out = NULL;
    if (H % 8)
        return err_set(e, "gep: hidden size %d is not a multiple of 8", H);
    gep *q = (gep *)calloc(1, sizeof *q);
    if (!q)
        return err_set(e, "gep: out of memory");
    q->p = p, q->dev = dev, q->c = c, q->nb = n_blocks, q->H = H, q->mi = mi;
    q->S = p->size, q->per = p->per, q->E = p->E;
    int S = q->S, per = q->per, E = q->E;
    size_t w = (size_t)p->world;
    q->b = (gep_blk *)calloc((size_t)n_blocks, sizeof *q->b);
    q->hoff = (int *)malloc(((size_t)E + 1) * sizeof *q->hoff);
    q->to = (int64_t *)malloc(4 * (size_t)S * sizeof *q->to);
    q->hseg = (long long *)malloc(2 * (size_t)S * per * sizeof *q->hseg);
    q->hloff = (int *)malloc(((size_t)per + 1) * sizeof *q->hloff);
    q->sn = (size_t *)calloc(4 * w, sizeof *q->sn);
    int ok = q->b && q->hoff && q->to && q->hseg && q->hloff && q->sn;
    for (int i = 0; ok && i < n_blocks; i++) {
        q->b[i].cnt_to = (int64_t *)calloc((size_t)E, sizeof(int64_t));
        q->b[i].cnt = (int64_t *)calloc((size_t)S * per, sizeof(int64_t));
        ok = q->b[i].cnt_to && q->b[i].cnt;
    }
    if (!ok) {
        gep_destroy(q);
        return err_set(e, "gep: out of memory");
    }
    q->so = q->to + S, q->from = q->so + S, q->ro = q->from + S;
    q->son = q->sn + w, q->rn = q->son + w, q->ron = q->rn + w;
    for (int wi = 0; wi < 2; wi++)
        for (int i = 0; i < GEP_EVENTS; i++)
            if (cudaEventCreate(&q->ev[wi][i]) != cudaSuccess) {
                gep_destroy(q);
                return err_set(e, "gep: cannot create CUDA events");
            }
    if (dev)
        comm_set_stream(dev, gpu_ctx_stream(c));
    q->f8 = &q->off;
    *out = q;
    return 0;
}

/* From B's counts: rows to and from each member with their row offsets (to: in the
 * sender's expert-sorted rows; from: in arrival order), the segments (expert-major starts,
 * then arrival starts, in expert-major order) and the held experts' offsets, and B->R. */
static void layout(gep *q, gep_blk *B)
{
    int S = q->S, per = q->per;
    int64_t o = 0, a = 0;
    for (int g = 0; g < S; g++) {
        q->so[g] = o;
        q->to[g] = 0;
        for (int j = 0; j < per; j++)
            q->to[g] += B->cnt_to[g * per + j];
        o += q->to[g];
        q->ro[g] = a;
        q->from[g] = 0;
        for (int j = 0; j < per; j++) {
            q->hseg[S * per + j * S + g] = a;  /* arrival start of (g, j) */
            a += B->cnt[g * per + j];
            q->from[g] += B->cnt[g * per + j];
        }
    }
    B->R = a;
    int64_t d = 0;
    for (int j = 0; j < per; j++) {
        q->hloff[j] = (int)d;
        for (int g = 0; g < S; g++) {
            q->hseg[j * S + g] = d;
            d += B->cnt[g * per + j];
        }
    }
    q->hloff[per] = (int)d;
}

/* An event pair around an exchange; a full pool is folded into q->ms first. */
static int fold_events(gep *q, dsv3_err *e)
{
    if (!q->n_ev)
        return 0;
    CUDA_TRY(cudaEventSynchronize(q->ev[1][q->n_ev - 1]), e);
    for (int i = 0; i < q->n_ev; i++) {
        float ms = 0;
        CUDA_TRY(cudaEventElapsedTime(&ms, q->ev[0][i], q->ev[1][i]), e);
        q->ms += ms;
    }
    q->n_ev = 0;
    return 0;
}

static int grow(char **p, size_t *cap, size_t n, dsv3_err *e)
{
    if (n <= *cap)
        return 0;
    char *b = (char *)realloc(*p, n);
    if (!b)
        return err_set(e, "gep: out of host memory for %zu bytes of rows", n);
    *p = b;
    *cap = n;
    return 0;
}

/* Rows of H bf16 values: to[g] rows from send + so[g] rows to member g, from[g] rows from
 * member g into recv + ro[g] rows. Over NCCL on the stream, else through host buffers on
 * the host comm (the send rows are [0, sum to), the received [0, sum from)). */
static int xchg(gep *q, const bf16 *send, const int64_t *to, const int64_t *so, bf16 *recv,
                const int64_t *from, const int64_t *ro, dsv3_err *e)
{
    ep *p = q->p;
    size_t H = (size_t)q->H, w = (size_t)p->world, es = q->dev ? 1 : 2;
    memset(q->sn, 0, 4 * w * sizeof *q->sn);
    int64_t ts = 0, tr = 0;
    for (int g = 0; g < q->S; g++) {
        int r = p->base + g;
        q->sn[r] = (size_t)to[g] * H * es, q->son[r] = (size_t)so[g] * H * es;
        q->rn[r] = (size_t)from[g] * H * es, q->ron[r] = (size_t)ro[g] * H * es;
        ts += to[g], tr += from[g];
        if (r != p->rank)
            q->bytes += (double)to[g] * H * 2;
    }
    if (q->n_ev == GEP_EVENTS && fold_events(q, e))
        return -1;
    int k = q->n_ev++;
    q->n_x++;
    CUDA_TRY(cudaEventRecord(q->ev[0][k], ST(q)), e);
    if (q->dev) {
        if (comm_alltoallv(q->dev, send, q->sn, q->son, recv, q->rn, q->ron, COMM_BF16, e))
            return -1;
    } else {
        size_t bs = (size_t)ts * H * 2, br = (size_t)tr * H * 2;
        if (grow(&q->hs, &q->hs_cap, bs + 1, e) || grow(&q->hr, &q->hr_cap, br + 1, e) ||
            (bs && gpu_download(q->c, q->hs, send, bs, e)) ||
            comm_alltoallv(p->c, q->hs, q->sn, q->son, q->hr, q->rn, q->ron, COMM_U8, e) ||
            (br && gpu_upload(q->c, recv, q->hr, br, e)))
            return -1;
    }
    CUDA_TRY(cudaEventRecord(q->ev[1][k], ST(q)), e);
    return 0;
}

/* The ranks agree that none failed to get its buffers (bad: this rank did, e says why). */
static int agree(gep *q, int bad, dsv3_err *e)
{
    int64_t v = bad;
    dsv3_err ce;
    if (ep_max(q->p, &v, 1, &ce)) {
        *e = ce;
        return -1;
    }
    if (!v)
        return 0;
    if (!bad)
        err_set(e, "another rank failed in an expert-parallel exchange");
    return -1;
}

extern "C" void gep_set_fp8(gep *q, gpu_moe_fp8 *m)
{
    q->f8 = m ? m : &q->off;
}

/* FP8 scratch for R received rows: the single-GPU size (its own rows) may be short of what
 * the other ranks send, and a short scratch would quietly take the bf16 GEMMs. Grown with a
 * quarter's headroom so that blocks' varying counts rarely reallocate. */
static int fp8_room(gep *q, int64_t R, dsv3_err *e)
{
    gpu_moe_fp8 *m = q->f8;
    if (!m->on || R <= m->max_rows)
        return 0;
    return gpu_moe_fp8_init(m, R + R / 4, m->E > q->per ? m->E : q->per, m->max_dim, e);
}

static gpu_moe_plan local_plan(const gep *q, const gep_blk *B)
{
    gpu_moe_plan lp;
    memset(&lp, 0, sizeof lp);
    lp.N = (int)B->R;
    lp.k = 1;
    lp.E = q->per;
    lp.offsets = B->loff;
    return lp;
}

#define TAKE(T, n) (T *)gpu_arena_alloc(c, (size_t)(n) * sizeof(T) + 16, &fe)

extern "C" int gep_forward(gep *q, int blk, const gpu_moe_plan *plan, const gpu_bf16 *xp,
                           gpu_bf16 *yp, const gpu_bf16 *W1, const gpu_bf16 *W2, dsv3_err *e)
{
    gpu_ctx *c = q->c;
    gep_blk *B = &q->b[blk];
    int S = q->S, per = q->per, H = q->H, mi = q->mi, E = q->E;
    B->ran = 0;
    if (gpu_moe_plan_offsets(c, plan, q->hoff, e))  /* synchronising: the one host wait */
        return -1;
    for (int x = 0; x < E; x++)
        B->cnt_to[x] = q->hoff[x + 1] - q->hoff[x];
    if (ep_exchange_counts(q->p, B->cnt_to, B->cnt, e))
        return -1;
    layout(q, B);
    int64_t R = B->R;
    dsv3_err fe;
    B->xr = TAKE(bf16, R * H);
    B->egu = B->xr ? TAKE(bf16, R * 2 * mi) : NULL;
    B->eh = B->egu ? TAKE(bf16, R * mi) : NULL;
    B->seg = B->eh ? TAKE(long long, 2 * S * per) : NULL;
    B->loff = B->seg ? TAKE(int, per + 1) : NULL;
    size_t mark = gpu_arena_mark(c);
    bf16 *io = B->loff ? TAKE(bf16, R * H) : NULL;
    bf16 *y = io ? TAKE(bf16, R * H) : NULL;
    int bad = !y;
    if (bad)
        err_set(e, "expert-parallel forward: no GPU memory for %lld received rows (%s)",
                (long long)R, fe.msg);
    else
        bad = fp8_room(q, R, e) != 0;
    if (agree(q, bad, e))
        return -1;
    CUDA_TRY(cudaMemcpyAsync(B->seg, q->hseg, 2 * (size_t)S * per * sizeof(long long),
                             cudaMemcpyHostToDevice, ST(q)),
             e);
    CUDA_TRY(cudaMemcpyAsync(B->loff, q->hloff, ((size_t)per + 1) * sizeof(int),
                             cudaMemcpyHostToDevice, ST(q)),
             e);
    gpu_moe_plan lp = local_plan(q, B);
    int rc = xchg(q, (const bf16 *)xp, q->to, q->so, io, q->from, q->ro, e) ||
             permute(q, B, B->xr, io, 1, e) ||
             (R && (gpu_moe_fp8_fwd(c, q->f8, &lp, B16_(B->egu), B16_(B->xr), W1, H, 2 * mi,
                                    e) ||
                    gpu_swiglu_fwd(c, B16_(B->eh), B16_(B->egu), B16_(B->egu + mi), (int)R, mi,
                                   2 * mi, e) ||
                    gpu_moe_fp8_fwd(c, q->f8, &lp, B16_(y), B16_(B->eh), W2, mi, H, e))) ||
             permute(q, B, io, y, 0, e) ||
             xchg(q, io, q->from, q->ro, (bf16 *)yp, q->to, q->so, e);
    gpu_arena_reset(c, mark);
    B->ran = !rc;
    return rc ? -1 : 0;
}

extern "C" int gep_backward(gep *q, int blk, const gpu_bf16 *dyp, gpu_bf16 *dxp,
                            const gpu_bf16 *W1, const gpu_bf16 *W2, float *dW1, float *dW2,
                            dsv3_err *e)
{
    gpu_ctx *c = q->c;
    gep_blk *B = &q->b[blk];
    int H = q->H, mi = q->mi;
    if (!B->ran)
        return err_set(e, "expert-parallel backward of block %d without its forward", blk);
    layout(q, B);
    int64_t R = B->R;
    dsv3_err fe;
    size_t mark = gpu_arena_mark(c);
    bf16 *io = TAKE(bf16, R * H);
    bf16 *dy = io ? TAKE(bf16, R * H) : NULL;
    bf16 *dh = dy ? TAKE(bf16, R * mi) : NULL;
    bf16 *dgu = dh ? TAKE(bf16, R * 2 * mi) : NULL;
    int bad = !dgu;
    if (bad)
        err_set(e, "expert-parallel backward: no GPU memory for %lld received rows (%s)",
                (long long)R, fe.msg);
    else
        bad = fp8_room(q, R, e) != 0;
    if (agree(q, bad, e)) {
        gpu_arena_reset(c, mark);
        return -1;
    }
    gpu_moe_plan lp = local_plan(q, B);
    /* dy's rows are free after the first GEMM pair: the input gradients go there */
    int rc = xchg(q, (const bf16 *)dyp, q->to, q->so, io, q->from, q->ro, e) ||
             permute(q, B, dy, io, 1, e) ||
             (R && (gpu_moe_fp8_dgrad(c, q->f8, &lp, B16_(dh), B16_(dy), W2, mi, H, e) ||
                    gpu_moe_fp8_wgrad(c, q->f8, &lp, dW2, B16_(dy), B16_(B->eh), mi, H, e) ||
                    gpu_swiglu_bwd(c, B16_(dgu), B16_(dgu + mi), B16_(dh), B16_(B->egu),
                                   B16_(B->egu + mi), (int)R, mi, 2 * mi, e) ||
                    gpu_moe_fp8_dgrad(c, q->f8, &lp, B16_(dy), B16_(dgu), W1, H, 2 * mi, e) ||
                    gpu_moe_fp8_wgrad(c, q->f8, &lp, dW1, B16_(dgu), B16_(B->xr), H, 2 * mi,
                                      e))) ||
             permute(q, B, io, dy, 0, e) ||
             xchg(q, io, q->from, q->ro, (bf16 *)dxp, q->to, q->so, e);
    gpu_arena_reset(c, mark);
    return rc ? -1 : 0;
}

extern "C" int64_t gep_rows(const gep *q, int blk)
{
    return blk >= 0 && blk < q->nb && q->b[blk].ran ? q->b[blk].R : 0;
}

extern "C" int gep_take_time(gep *q, int64_t *n, double *ms, double *bytes, dsv3_err *e)
{
    if (fold_events(q, e))
        return -1;
    *n = q->n_x;
    *ms = q->ms;
    *bytes = q->bytes;
    q->n_x = 0;
    q->ms = q->bytes = 0;
    return 0;
}
