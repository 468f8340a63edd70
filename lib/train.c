/* train: the training loop (see train.h). */
#include "train.h"

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "dp.h"
#include "ep.h"
#include "epckpt.h"
#include "epdev.h"
#include "metrics.h"
#include "progress.h"
#include "trainckpt.h"
#include "../kernels/gmodel.h"
#include "../kernels/gpu.h"

void train_opts_default(train_opts *o)
{
    memset(o, 0, sizeof *o);
    o->micro_batch = 4;
    o->ramp_unit = SCHED_TOKENS;
    o->lr = (sched_lr){SCHED_STEPS, 1e-3, 1e-4, 0, 0, 0, 0, 0};
    o->gamma = (sched_switch){SCHED_TOKENS, 0.001, 0.0, 0};
    o->mtp_weight = (sched_switch){SCHED_TOKENS, 0.3, 0.1, 0};
    o->alpha = 0.0001;
    optim_params_default(&o->adam);
    o->clip = 1.0;
    o->eval_batches = 4;
    o->keep = 3;
    o->fp8_min_dim = -1;
    o->sft_user_id = o->sft_assistant_id = -1;
}

/* ---- pieces with their own tests ---- */

/* As model_balance_update: mean load = total/E (total: routed slots), compared as load_i*E
 * vs total to stay in integers. */
static void bias_step(float *b, const int64_t *load, int E, int64_t total, float gamma)
{
    for (int i = 0; i < E; i++) {
        int64_t d = total - load[i] * E;
        b[i] += d > 0 ? gamma : d < 0 ? -gamma : 0.0f;
    }
}

void train_balance_update(dsv3_model *m, const int64_t *counts, int64_t tokens,
                          const int64_t *mtp_slots, float gamma)
{
    const dsv3_config *c = &m->cfg;
    int E = c->n_routed_experts, nl = c->num_hidden_layers;
    for (int l = 0; l < nl; l++)
        if (config_layer_is_moe(c, l))
            bias_step(m->w.layers[l].router_bias, counts + (size_t)l * E, E,
                      tokens * c->num_experts_per_tok, gamma);
    /* A module that routed nothing (the MTP loss off) has all loads 0 = the mean: no move. */
    for (int k = 0; mtp_slots && k < c->num_nextn_predict_layers; k++)
        if (config_layer_is_moe(c, nl + k))
            bias_step(m->w.mtp[k].block.router_bias, counts + (size_t)(nl + k) * E, E,
                      mtp_slots[k], gamma);
}

/* resp[j] (L + 1 entries): token j (j = L: the last target) is a response token. */
static void sft_response(const uint32_t *tokens, const uint32_t *targets,
                         const uint32_t *segment, uint32_t L, int64_t user_id,
                         int64_t assistant_id, uint8_t *resp)
{
    int in_resp = 0;
    for (uint32_t j = 0; j <= L; j++) {
        if (j < L && (j == 0 || segment[j] != segment[j - 1]))
            in_resp = 0;
        int64_t tok = j < L ? tokens[j] : targets[L - 1];
        if (tok == user_id) {
            in_resp = 0;
            resp[j] = 0;
        } else if (tok == assistant_id) {
            in_resp = 1;
            resp[j] = 0;
        } else
            resp[j] = (uint8_t)in_resp;
    }
}

int train_sft_row(const uint32_t *tokens, const uint32_t *targets, const uint8_t *mask,
                  const uint32_t *segment, uint32_t L, int64_t user_id, int64_t assistant_id,
                  int32_t *ids, int32_t *tgt, int32_t *seg, int32_t *pos)
{
    uint8_t *resp = malloc((size_t)L + 1);
    if (!resp)
        return -1;
    sft_response(tokens, targets, segment, L, user_id, assistant_id, resp);
    int counted = 0;
    for (uint32_t i = 0; i < L; i++) {
        int first = i == 0 || segment[i] != segment[i - 1];
        int same_doc = i + 1 == L || segment[i + 1] == segment[i];
        int use = mask[i] && same_doc && resp[i + 1];
        ids[i] = (int32_t)tokens[i];
        tgt[i] = use ? (int32_t)targets[i] : -1;
        seg[i] = (int32_t)segment[i];
        pos[i] = first ? 0 : pos[i - 1] + 1;
        counted += use;
    }
    free(resp);
    return counted;
}

void train_doc_positions(const uint32_t *segment, uint32_t L, int32_t *seg, int32_t *pos)
{
    for (uint32_t i = 0; i < L; i++) {
        seg[i] = (int32_t)segment[i];
        pos[i] = i == 0 || segment[i] != segment[i - 1] ? 0 : pos[i - 1] + 1;
    }
}

int train_sft_unpack(const uint32_t *tokens, const uint32_t *targets, const uint8_t *mask,
                     const uint32_t *segment, uint32_t L, int64_t user_id,
                     int64_t assistant_id, int32_t *ids, int32_t *tgt)
{
    uint8_t *resp = malloc((size_t)L + 1);
    if (!resp)
        return -1;
    sft_response(tokens, targets, segment, L, user_id, assistant_id, resp);
    int rows = 0;
    for (uint32_t a = 0; a < L;) {
        uint32_t end = a + 1;
        while (end < L && segment[end] == segment[a])
            end++;
        int32_t *ri = ids + (size_t)rows * L, *rt = tgt + (size_t)rows * L;
        int counted = 0;
        for (uint32_t i = a; i < end; i++) {
            int same_doc = i + 1 < end || end == L;
            int use = mask[i] && same_doc && resp[i + 1];
            ri[i - a] = (int32_t)tokens[i];
            rt[i - a] = use ? (int32_t)targets[i] : -1;
            counted += use;
        }
        for (uint32_t i = end - a; i < L; i++) {
            ri[i] = 0;
            rt[i] = -1;
        }
        rows += counted > 0;
        a = end;
    }
    free(resp);
    return rows;
}

/* ---- the trainer ---- */

/* Rows waiting to be run: B at a time go into a forward. */
typedef struct rowq {
    int32_t *ids, *tgt;
    int32_t *seg, *pos;  /* document numbers and positions (used with document masking) */
    size_t n, cap;  /* rows */
} rowq;

/* Sums of one update (or one evaluation) over its forwards. */
typedef struct accum {
    double loss_sum;   /* sum over forwards of mean loss * counted targets */
    int64_t n;         /* counted targets */
    int64_t routed;    /* tokens through the router (every position of every forward) */
    double mtp[8];     /* MTP module k's cross-entropy, each forward's share of the step's
                          mean (the model divides by the step's counts) */
} accum;

typedef struct trainer {
    const train_opts *o;
    dsv3_model m;
    int have_model;
    optim opt;
    loader *train, *val;
    model_acts *acts;
    metrics met;
    train_state st;
    uint32_t B, L;
    uint64_t seqs;        /* the global batch in sequences (after the ramp: its final value) */
    sched_ramp ramp;
    int32_t *ids, *tgt;   /* one forward: B x L */
    int32_t *seg, *pos;   /* its documents and positions, when doc_mask */
    int doc_mask;         /* attention masked by document (SFT, or --doc-mask) */
    rowq q;
    int64_t *counts, *tmp_counts;  /* [layers + MTP modules][E] */
    int64_t *mtp_slots;   /* [MTP modules]: routed slots of their blocks this step */
    int n_mtp;
    int n_saves;
    char tokenizer_id[17];
    uint64_t data_vocab, val_records;
    dp dp;                /* this rank's place in the job and the shard it updates */
    ep ep;                /* expert parallelism (ep.size 1: off) */
    optim eopt;           /* ep.size > 1: the moments of this replica's piece of the held
                             experts (ep_piece: the whole group with one replica) */
    size_t ep_lo, ep_hi;  /* that piece, relative to n_dense */
    int64_t *ep_rows;     /* [world][layers + MTP modules]: rows each rank's experts
                             received this step (ep.size > 1) */
    FILE *log;            /* o->log on rank 0, else NULL */
    FILE *out;            /* o->out on rank 0, else NULL */
    double flops_token;   /* training FLOPs per token (MFU); 0 when not on a GPU */
    double peak;          /* the GPU's BF16 peak FLOP/s for MFU; 0: no MFU shown */
    size_t nc;            /* entries of counts */
    int64_t *sync;        /* [2 + nc + n_mtp]: the integer sums of a step */
    int64_t *norms;       /* [2 + n_mtp]: the step's main targets, sequences, MTP targets */
    long ckpt_id;         /* rank 0's pid: names the checkpoint's temporary folder */
    gmodel *gm;           /* the GPU backend (o->cuda), else NULL */
    int gm_dirty;         /* the host parameters changed since the last upload */
    int gm_opt;           /* the optimizer runs on the GPU too (one process): the device
                             holds the weights and moments, synced to the host to save */
    /* Data parallelism on device buffers (--device cuda with several ranks, or one rank
     * with DSV3_DP_NCCL=1): gradients reduce-scattered per bucket over NCCL, AdamW on this
     * rank's shard on the device, master weights all-gathered (lib/dp's bucketed layout).
     * With --ep (one GPU a rank): lib/dp's layout over the replicated part, the held
     * experts' piece after it in the device shard (lib/epdev, xd below). */
    int gdp;
    int overlap;          /* buckets launched during the last backward (DSV3_DP_OVERLAP=0: at
                             its end, for measuring) */
    comm *dcomm;          /* the NCCL comm beside o->comm */
    int next_bk;          /* the next bucket to reduce-scatter this step */
    uint16_t *hbuf;       /* [n_params]: a moment in the flat layout, for checkpoints */
    /* Expert parallelism on the GPU (--ep with --device cuda, kernels/gep.h): the rows
     * over a NCCL comm of their own (NULL: through host buffers where ranks share GPUs);
     * the optimizer on the device (gdp, xd) with one GPU a rank, else on the host as for
     * the CPU backend. The exchanges' time from
     * the second step on, for the log's last line. */
    comm *ecomm;
    epdev xd;             /* --ep with gdp: the held experts in the device optimizer */
    int64_t ep_nx;
    double ep_ms, ep_bytes;
    uint64_t ep_steps;
} trainer;

static int rowq_reserve(rowq *q, size_t rows, uint32_t L)
{
    if (q->n + rows <= q->cap)
        return 0;
    size_t cap = q->cap ? q->cap : 16;
    while (cap < q->n + rows)
        cap *= 2;
    int32_t *a = realloc(q->ids, cap * L * sizeof *a);
    if (!a)
        return -1;
    q->ids = a;
    int32_t *b = realloc(q->tgt, cap * L * sizeof *b);
    if (!b)
        return -1;
    q->tgt = b;
    int32_t *c = realloc(q->seg, cap * L * sizeof *c);
    if (!c)
        return -1;
    q->seg = c;
    int32_t *d = realloc(q->pos, cap * L * sizeof *d);
    if (!d)
        return -1;
    q->pos = d;
    q->cap = cap;
    return 0;
}

/* One loader batch into the queue: as is (targets -1 where the mask is 0), or as SFT rows
 * (a record stays whole, its documents masked from each other; a record without a counted
 * target is left out). With document masking, each row's documents and positions too. */
static int enqueue(trainer *t, const loader_batch *b, dsv3_err *e)
{
    uint32_t L = t->L;
    if (rowq_reserve(&t->q, b->rows, L))
        return err_set(e, "out of memory for batch rows");
    for (uint32_t r = 0; r < b->rows; r++) {
        size_t off = (size_t)r * L;
        int32_t *ids = t->q.ids + t->q.n * L, *tgt = t->q.tgt + t->q.n * L;
        int32_t *seg = t->q.seg + t->q.n * L, *pos = t->q.pos + t->q.n * L;
        if (t->o->sft) {
            int n = train_sft_row(b->tokens + off, b->targets + off, b->mask + off,
                                  b->segment + off, L, t->o->sft_user_id,
                                  t->o->sft_assistant_id, ids, tgt, seg, pos);
            if (n < 0)
                return err_set(e, "out of memory");
            t->q.n += n > 0;
            continue;
        }
        for (uint32_t i = 0; i < L; i++) {
            ids[i] = (int32_t)b->tokens[off + i];
            tgt[i] = b->mask[off + i] ? (int32_t)b->targets[off + i] : -1;
        }
        if (t->doc_mask) {
            train_doc_positions(b->segment + off, L, seg, pos);
            /* the last target of a document is the next one's first token */
            for (uint32_t i = 0; i + 1 < L; i++)
                if (seg[i + 1] != seg[i])
                    tgt[i] = -1;
        }
        t->q.n++;
    }
    return 0;
}

/* Takes up to B rows off the front of the queue into t->ids/t->tgt, padding with empty rows. */
static void dequeue(trainer *t)
{
    size_t L = t->L, take = t->q.n < t->B ? t->q.n : t->B;
    memcpy(t->ids, t->q.ids, take * L * sizeof *t->ids);
    memcpy(t->tgt, t->q.tgt, take * L * sizeof *t->tgt);
    memcpy(t->seg, t->q.seg, take * L * sizeof *t->seg);
    memcpy(t->pos, t->q.pos, take * L * sizeof *t->pos);
    for (size_t i = take * L; i < (size_t)t->B * L; i++) {
        t->ids[i] = 0;
        t->tgt[i] = -1;
        t->seg[i] = 0;
        t->pos[i] = (int32_t)(i % L);
    }
    memmove(t->q.ids, t->q.ids + take * L, (t->q.n - take) * L * sizeof *t->ids);
    memmove(t->q.tgt, t->q.tgt + take * L, (t->q.n - take) * L * sizeof *t->tgt);
    memmove(t->q.seg, t->q.seg + take * L, (t->q.n - take) * L * sizeof *t->seg);
    memmove(t->q.pos, t->q.pos + take * L, (t->q.n - take) * L * sizeof *t->pos);
    t->q.n -= take;
}

/* ---- backend: where forward and backward run ----
 * The CPU model (lib/model) or the GPU one (kernels/gmodel), behind the same calls, both
 * reading the step's normalisers (m.norm_*) and the documents of the rows. On the GPU the
 * gradients accumulate on the device over a step's forwards and are fetched into m.grads
 * once (be_fetch_grads) unless the optimizer runs there too; the parameters are uploaded
 * before the first forward after they change (gm_dirty). */

static int be_forward(trainer *t, int grad, float *loss, dsv3_err *e)
{
    const int32_t *seg = t->doc_mask ? t->seg : NULL, *pos = t->doc_mask ? t->pos : NULL;
    if (!t->gm) {
        if (model_acts_set_segments(t->acts, seg, pos))
            return err_set(e, "bad document numbers in a packed record");
        return model_forward(&t->m, t->acts, t->ids, t->tgt, loss, e);
    }
    if (t->gm_dirty && gmodel_set_params(t->gm, t->m.params, e))
        return -1;
    t->gm_dirty = 0;
    return gmodel_set_segments(t->gm, seg, pos, e) ||
                   gmodel_forward(t->gm, t->ids, t->tgt, grad, loss, e)
               ? -1
               : 0;
}

static void be_losses(trainer *t, model_losses *ls)
{
    if (t->gm)
        gmodel_losses(t->gm, ls);
    else
        model_acts_losses(t->acts, ls);
}

/* MTP module k's block's load: 0 done, 1 none (not run or dense), -1 error. */
static int be_mtp_expert_load(trainer *t, int k, int64_t *counts, int64_t *slots, dsv3_err *e)
{
    if (t->gm)
        return gmodel_mtp_expert_load(t->gm, k, counts, slots, e);
    return model_mtp_expert_load(&t->m, t->acts, k, counts, slots) ? 1 : 0;
}

static int be_backward(trainer *t, dsv3_err *e)
{
    return t->gm ? gmodel_backward(t->gm, e) : model_backward(&t->m, t->acts, t->ids, t->tgt, e);
}

static int be_expert_load(trainer *t, int l, int64_t *counts)
{
    return t->gm ? gmodel_expert_load(t->gm, l, counts)
                 : model_expert_load(&t->m, t->acts, l, counts);
}

/* On the GPU the host gradients are either unused (the optimizer on the device) or
 * overwritten whole by be_fetch_grads: clearing them (a host memset of 4.6 GB a step for
 * 1.1B parameters) is left out. */
static int be_zero_grad(trainer *t, dsv3_err *e)
{
    if (!t->gm)
        model_zero_grad(&t->m);
    return t->gm ? gmodel_zero_grad(t->gm, e) : 0;
}

static int be_fetch_grads(trainer *t, dsv3_err *e)
{
    return t->gm ? gmodel_get_grads(t->gm, t->m.grads, e) : 0;
}

/* ---- data parallelism on device buffers ---- */

/* Reduce-scatters, on the communication stream, every bucket not yet sent whose gradients
 * are final once the backward has passed ready point `point` (the model's gradient is
 * already that of the step's loss: no rescale), after the compute stream's work so far. */
static int gdp_launch(trainer *t, int point, dsv3_err *e)
{
    dp *d = &t->dp;
    int first = t->next_bk;
    while (t->next_bk < d->nbk && d->bk[t->next_bk].ready <= point)
        t->next_bk++;
    if (t->next_bk == first)
        return 0;
    if (gmodel_dp_fence(t->gm, e))
        return -1;
    for (int i = first; i < t->next_bk; i++)
        if (dp_dev_reduce_bucket(d, i, gmodel_dev_grads(t->gm), gmodel_dp_gshard(t->gm),
                                 gmodel_dp_stream(t->gm), e))
            return -1;
    return 0;
}

static int gdp_hook(void *ctx, int point, dsv3_err *e)
{
    return gdp_launch(ctx, point, e);
}

static size_t ep_rows_n(const trainer *t);

/* After the step's backwards: the buckets not sent yet (all of them without overlap, or
 * when the last forward had no target), then the compute stream waits for them all. */
static int gdp_finish(trainer *t, dsv3_err *e)
{
    if (gdp_launch(t, INT32_MAX, e) || gmodel_dp_join(t->gm, e))
        return -1;
    return t->ep.size > 1 && (epdev_reduce(&t->xd, e) ||
                              dp_sum_i64(&t->dp, t->ep_rows, ep_rows_n(t), e)) ? -1 : 0;
}

/* --ep: the device shard is lib/dp's buckets of the replicated part [0, n_dense), then
 * this replica's piece of the held experts (device layout, span ns); the device arrays
 * cover max(dn_pad, n_params). The moments, loaded whole in two parts (t->opt: the
 * replicated part, t->eopt: the held experts), joined into mv[0], mv[1] [n_params]. */
static int gdp_ep_layout(trainer *t, int *ns, size_t *dev, size_t *sh, size_t *len,
                         size_t *n_pad, size_t *shard, uint16_t **mv, dsv3_err *e)
{
    size_t nd = t->m.n_dense, np = t->m.n_params;
    dev[*ns] = nd + t->ep_lo, sh[*ns] = *shard, len[*ns] = t->ep_hi - t->ep_lo;
    *ns += len[*ns] > 0;
    *shard += t->ep_hi - t->ep_lo;
    *n_pad = *n_pad > np ? *n_pad : np;
    for (int w = 0; w < 2; w++) {
        if (!(mv[w] = malloc(np * sizeof *mv[w])))
            return err_set(e, "out of memory for the moments");
        memcpy(mv[w], w ? t->opt.v : t->opt.m, nd * sizeof *mv[w]);
        memcpy(mv[w] + nd, w ? t->eopt.v : t->eopt.m, (np - nd) * sizeof *mv[w]);
    }
    return 0;
}

/* Joins NCCL beside the job's CPU comm, cuts the device layout into buckets at the
 * backward's ready points and moves the optimizer to the device shard. The moments come
 * from t->opt, loaded for the whole array (setup_model); t->opt is then cut to the host
 * shard [lo, hi) that checkpoints hold. */
static int gdp_setup(trainer *t, dsv3_err *e)
{
    dp *d = &t->dp;
    int nl = t->m.cfg.num_hidden_layers, rc = -1;
    const char *s = getenv("DSV3_DP_BUCKET_MB");
    double mb = s && *s ? atof(s) : 64;
    const char *ov = getenv("DSV3_DP_OVERLAP");
    /* under --ep the buckets' overlap with the backward's row exchanges (two NCCL comms
     * at once) is asked for (DSV3_DP_OVERLAP=1) until measured */
    t->overlap = t->ep.size > 1 ? ov && !strcmp(ov, "1") : !(ov && !strcmp(ov, "0"));
    size_t *pts = calloc((size_t)nl + 3, sizeof *pts), *dev = calloc((size_t)nl + 3, sizeof *dev);
    size_t *sh = calloc((size_t)nl + 3, sizeof *sh), *len = calloc((size_t)nl + 3, sizeof *len);
    uint16_t *mv[2] = {NULL, NULL};
    if (!pts || !dev || !sh || !len) {
        err_set(e, "out of memory");
        goto out;
    }
    if (comm_open_device(&t->dcomm, t->o->comm, e))
        goto out;
    int np = gmodel_ready_points(t->gm, pts);
    if (dp_plan_buckets(d, t->dcomm, pts, np, (size_t)(mb > 0 ? mb * 262144.0 : 1), e))
        goto out;
    int ns = dp_shard_spans(d, dev, sh, len);
    size_t n_pad = d->dn_pad, shard = d->bshard;
    if (t->ep.size > 1 && gdp_ep_layout(t, &ns, dev, sh, len, &n_pad, &shard, mv, e))
        goto out;
    if (gmodel_dp_init(t->gm, n_pad, shard, ns, dev, sh, len, mv[0] ? mv[0] : t->opt.m,
                       mv[1] ? mv[1] : t->opt.v, e) ||
        (t->ep.size > 1 && epdev_open(&t->xd, &t->ep, t->dcomm, t->gm, t->m.n_dense,
                                      t->m.n_params, d->dn_pad, d->bshard, e)))
        goto out;
    uint64_t steps = t->opt.t;
    optim_free(&t->opt);
    if (optim_init_range(&t->opt, &t->m, &t->o->adam, d->lo, d->hi, e))
        goto out;
    t->opt.t = steps;
    if (t->ep.size > 1) {  /* the checkpoints' piece of the held experts (flat layout) */
        optim_free(&t->eopt);
        if (optim_init_range(&t->eopt, &t->m, &t->o->adam, t->m.n_dense + t->ep_lo,
                             t->m.n_dense + t->ep_hi, e))
            goto out;
        t->eopt.t = steps;
    }
    if (t->log)
        fprintf(t->log, "dsv3-train: data parallel on device buffers: %d rank%s over NCCL, %d "
                "gradient buckets, overlap %s, shard of %zu of %zu parameters\n", d->world,
                d->world > 1 ? "s" : "", d->nbk, t->overlap ? "on" : "off", d->bshard, d->n);
    rc = 0;
out:
    free(pts), free(dev), free(sh), free(len), free(mv[0]), free(mv[1]);
    return rc;
}

/* The device state to the host for a checkpoint: the master weights (whole on every rank)
 * and the moments, all-gathered from the bucketed shards, put in the flat layout and cut
 * to this rank's shard of lib/dp's flat layout, which the checkpoint files hold. */
static int gdp_sync_host(trainer *t, dsv3_err *e)
{
    dp *d = &t->dp;
    if (gmodel_sync_host(t->gm, t->m.params, NULL, NULL, e))
        return -1;
    size_t np = t->m.n_params, nd = t->m.n_dense;
    if (!t->hbuf && !(t->hbuf = malloc(np * sizeof *t->hbuf)))
        return err_set(e, "out of memory for the checkpoint's moments");
    void *full = gmodel_dev_alloc((d->dn_pad > np ? d->dn_pad : np) * 2, e);
    int rc = full ? 0 : -1;
    for (int w = 0; w < 2 && !rc; w++) {
        rc = (t->ep.size > 1 ? epdev_gather_moment(&t->xd, d, w, full, e)
                             : dp_dev_gather(d, gmodel_dp_moment(t->gm, w), full, COMM_BF16,
                                             gmodel_stream(t->gm), e)) ||
             gmodel_download_flat(t->gm, t->hbuf, full, 2, e);
        if (!rc)
            memcpy(w ? t->opt.v : t->opt.m, t->hbuf + d->lo, (d->hi - d->lo) * 2);
        if (!rc && t->ep.size > 1)  /* this replica's piece of the held experts */
            memcpy(w ? t->eopt.v : t->eopt.m, t->hbuf + nd + t->ep_lo,
                   (t->ep_hi - t->ep_lo) * 2);
    }
    gpu_free(full);
    return rc ? -1 : 0;
}

/* ---- expert parallelism ---- */

static int rank_has_own_gpu(const train_opts *o);

/* Expert parallelism on the GPU: the MoE blocks exchange rows over NCCL (one GPU a rank)
 * or through host buffers (ranks sharing GPUs); the optimizer runs on the device (gdp:
 * gdp_setup and lib/epdev) or, where ranks share GPUs, on the host. */
static int gpu_ep_setup(trainer *t, dsv3_err *e)
{
    const char *h = getenv("DSV3_EP_HOST");  /* 1: rows through host buffers (tests) */
    int nccl = rank_has_own_gpu(t->o) && !(h && !strcmp(h, "1"));
    if (nccl && comm_open_device(&t->ecomm, t->o->comm, e))
        return -1;
    if (gmodel_ep_attach(t->gm, &t->ep, t->ecomm, e))
        return -1;
    if (t->log)
        fprintf(t->log, "dsv3-train: expert parallel on the GPU: --ep %d on %d ranks, expert "
                "rows over %s, optimizer on the %s%s\n", t->ep.size, t->ep.world,
                nccl ? "NCCL" : "host buffers (ranks share GPUs)", t->gdp ? "device" : "host",
                gmodel_moe_fp8(t->gm) ? ", held experts' GEMMs in FP8" : "");
    return 0;
}

/* The row exchanges' time: the first step's (NCCL's connections) left out, the rest summed
 * for the last line of the log. */
static int gpu_ep_time(trainer *t, int last, dsv3_err *e)
{
    int64_t n;
    double ms, bytes;
    if (!t->gm || t->ep.size <= 1 || gmodel_ep_take_time(t->gm, &n, &ms, &bytes, e))
        return t->gm && t->ep.size > 1 ? -1 : 0;
    if (t->ep_steps++) {
        t->ep_nx += n, t->ep_ms += ms, t->ep_bytes += bytes;
    }
    if (last && t->log && t->ep_steps > 1) {
        double st = (double)(t->ep_steps - 1);
        fprintf(t->log, "dsv3-train: expert-parallel row exchanges (rank 0, steps 2-%llu): "
                "%.1f all-to-alls, %.2f ms, %.1f MB to other GPUs a step: %.1f GB/s\n",
                (unsigned long long)t->ep_steps, (double)t->ep_nx / st, t->ep_ms / st,
                t->ep_bytes / st / 1e6, t->ep_ms > 0 ? t->ep_bytes / t->ep_ms / 1e6 : 0.0);
    }
    return 0;
}

/* Entries of ep_rows. */
static size_t ep_rows_n(const trainer *t)
{
    return (size_t)t->ep.world * ((size_t)t->m.cfg.num_hidden_layers + (size_t)t->n_mtp);
}

/* Rows the held experts received in the last forward, per block, into this rank's row. */
static void ep_count_rows(trainer *t)
{
    if (t->ep.size <= 1)
        return;
    size_t nb = (size_t)t->m.cfg.num_hidden_layers + (size_t)t->n_mtp;
    for (size_t l = 0; l < nb; l++)
        t->ep_rows[(size_t)t->ep.rank * nb + l] +=
            t->gm ? gmodel_ep_rows(t->gm, (int)l) : model_ep_rows(t->acts, (int)l);
}

/* A forward (and backward) that serves the held experts without rows of this rank's own. */
static int ep_idle(trainer *t, int backward, dsv3_err *e)
{
    if (t->ep.size <= 1)
        return 0;
    if (t->gm ? gmodel_ep_idle(t->gm, t->m.mtp_lambda > 0, backward, e)
              : model_ep_idle(&t->m, t->acts, t->m.mtp_lambda > 0, backward, e))
        return -1;
    if (backward)
        ep_count_rows(t);
    return 0;
}

/* Before each forward under expert parallelism: whether any rank still has rows (*more:
 * this rank's) and none failed reading them (rc). Returns 1: a forward follows (an idle
 * one where *more is 0), 0: all done, -1: a rank failed. */
static int ep_agree_more(trainer *t, int *more, int rc, dsv3_err *e)
{
    int64_t v[2] = {*more, rc != 0};
    dsv3_err ce;
    if (ep_max(&t->ep, v, 2, &ce)) {
        if (!rc)
            *e = ce;
        return -1;
    }
    if (v[1])
        return rc ? -1 : err_set(e, "stopping: another rank failed (its message says why)");
    if (!v[0])
        return 0;
    return 1;
}

/* One forward (and backward) of the B rows in t->ids/t->tgt. The model (CPU or GPU)
 * divides each forward's loss sums by the step's counts (load_step), so the backwards
 * simply add up the gradient of the step's loss. A forward without a counted target is
 * skipped. */
static int forward(trainer *t, accum *a, int backward, dsv3_err *e)
{
    int64_t n = 0;
    for (size_t i = 0; i < (size_t)t->B * t->L; i++)
        n += t->tgt[i] >= 0;
    if (!n)  /* skipped; with experts held here, still served to the other ranks */
        return ep_idle(t, backward, e);
    float loss = 0;
    /* on the GPU the loss and the main layers' expert loads are summed on the device, and
     * run_records reads them once (gpu_stats) */
    if (be_forward(t, backward, t->gm ? NULL : &loss, e))
        return -1;
    if (backward && t->n_mtp > 0 && t->m.mtp_lambda > 0) {
        model_losses ls;
        be_losses(t, &ls);
        for (int k = 0; k < t->n_mtp && k < 8; k++)
            a->mtp[k] += ls.mtp_k[k];
    }
    if (!t->gm)
        a->loss_sum += (double)loss * (double)n;
    a->n += n;
    if (!backward)
        return 0;
    const dsv3_config *c = &t->m.cfg;
    int E = c->n_routed_experts;
    for (int l = 0; !t->gm && l < c->num_hidden_layers; l++)
        if (be_expert_load(t, l, t->tmp_counts) == 0)
            for (int i = 0; i < E; i++)
                t->counts[(size_t)l * E + i] += t->tmp_counts[i];
    for (int k = 0; k < t->n_mtp; k++) {
        int64_t slots;
        int rc = be_mtp_expert_load(t, k, t->tmp_counts, &slots, e);
        if (rc < 0)  /* the backward's exchanges still run, empty, on every rank */
            return t->ep.size > 1 && !t->gm ? model_ep_fail(&t->m, t->acts, t->m.mtp_lambda > 0, 1, e)
                                  : -1;
        if (rc == 0) {
            for (int i = 0; i < E; i++)
                t->counts[(size_t)(c->num_hidden_layers + k) * E + i] += t->tmp_counts[i];
            t->mtp_slots[k] += slots;
        }
    }
    a->routed += (int64_t)t->B * t->L;
    ep_count_rows(t);
    /* The step's last backward on device buffers: each bucket of gradients leaves for its
     * reduce-scatter as soon as it is final. */
    int hook = t->gm && t->gdp && t->overlap && t->q.n == 0;
    if (hook)
        gmodel_set_bwd_hook(t->gm, gdp_hook, t);
    int rc = be_backward(t, e);
    if (hook)
        gmodel_set_bwd_hook(t->gm, NULL, NULL);
    return rc;
}

/* The GPU's sums over the forwards just run (one read for them all): the loss, and with
 * backward the expert loads of the main layers. */
static int gpu_stats(trainer *t, accum *a, int backward, dsv3_err *e)
{
    const dsv3_config *c = &t->m.cfg;
    double sum = 0;
    int64_t *loads = backward && c->n_routed_experts ? t->tmp_counts : NULL;
    if (gmodel_take_stats(t->gm, &sum, loads, e))
        return -1;
    a->loss_sum += sum;
    for (size_t i = 0; loads && i < (size_t)c->num_hidden_layers * c->n_routed_experts; i++)
        t->counts[i] += loads[i];
    return 0;
}

/* Runs `records` records of loader l (a multiple of B) through forwards. */
static int run_records(trainer *t, loader *l, uint64_t records, accum *a, int backward,
                       dsv3_err *e)
{
    for (;;) {
        int more = records > 0 || t->q.n > 0, rc = 0;
        while (more && !rc && t->q.n < t->B && records > 0) {
            const loader_batch *b;
            rc = loader_next(l, &b, e) || enqueue(t, b, e) ? -1 : 0;
            records -= t->B;
        }
        if (more && !rc)
            dequeue(t);
        if (t->ep.size > 1) {  /* the forwards are collective: the ranks agree first */
            int agreed = ep_agree_more(t, &more, rc, e);
            if (agreed <= 0)
                return agreed < 0 ? -1 : t->gm ? gpu_stats(t, a, backward, e) : 0;
            if (!more) {
                if (ep_idle(t, backward, e))
                    return -1;
                continue;
            }
        } else if (rc || !more) {
            return rc ? rc : t->gm ? gpu_stats(t, a, backward, e) : 0;
        }
        if (forward(t, a, backward, e))
            return -1;
    }
}

/* Reads this rank's `records` of a step into the queue and sets the model's normalisers to
 * the step's counts over all ranks: main targets, sequences of the forwards that will run
 * (B each, as the balance loss averages over a forward's rows), and each MTP module's
 * targets. Each forward's losses are then its sums over the step's counts: the step's
 * gradient does not depend on how its sequences fall into micro-batches and ranks. */
static int load_step(trainer *t, uint64_t records, dsv3_err *e)
{
    int rc = 0;
    while (!rc && records > 0) {
        const loader_batch *b;
        rc = loader_next(t->train, &b, e) || enqueue(t, b, e) ? -1 : 0;
        records -= t->B;
    }
    int64_t *v = t->norms, *mtp = t->tmp_counts;  /* tmp_counts holds >= n_mtp entries */
    memset(v, 0, (2 + (size_t)t->n_mtp) * sizeof *v);
    size_t L = t->L;
    for (size_t r = 0; !rc && r < t->q.n; r += t->B) {  /* the forwards dequeue will make */
        size_t rows = t->q.n - r < t->B ? t->q.n - r : t->B;
        int64_t main;
        model_count_targets(&t->m, t->q.tgt + r * L, t->doc_mask ? t->q.seg + r * L : NULL,
                            (int)rows, (int)L, &main, mtp);
        if (!main)
            continue;
        v[0] += main;
        v[1] += t->B;
        for (int k = 0; k < t->n_mtp; k++)
            v[2 + k] += mtp[k];
    }
    if (dp_agree(&t->dp, rc, NULL, e) || dp_sum_i64(&t->dp, v, 2 + (size_t)t->n_mtp, e))
        return -1;
    t->m.norm_main = v[0];
    t->m.norm_seqs = v[1];
    t->m.norm_mtp = v + 2;
    return 0;
}

/* The MTP loss weight lambda (scheduled) and the sequence-wise balance loss weight alpha of
 * this step. The model adds both to the loss it differentiates (each normalised over the
 * whole step: load_step); the logged loss stays the main cross-entropy. */
static void set_loss_weights(dsv3_model *m, double mtp_weight, double alpha)
{
    m->mtp_lambda = m->cfg.num_nextn_predict_layers > 0 ? (float)mtp_weight : 0.0f;
    m->balance_alpha = (float)alpha;
}

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* ---- setup ---- */

/* What the step line's MFU divides by: training FLOPs per token (6 x activated parameters,
 * plus causal attention 3 x 2 x heads x (L+1)/2 x (qk + v head dims) per layer, as
 * scripts/bench-train.sh counts them) and the GPU's dense BF16 peak: --peak-tflops, or the
 * datasheet's 989.4 TFLOP/s for an H100 or H200 (SXM); another GPU shows no MFU. */
static void set_mfu_basis(trainer *t, int dev)
{
    const dsv3_config *c = &t->m.cfg;
    config_counts cn;
    config_count_params(c, &cn);
    double dqk = c->qk_nope_head_dim + c->qk_rope_head_dim, dv = c->v_head_dim;
    t->flops_token = 6.0 * (double)cn.active + 3.0 * c->num_attention_heads *
                     ((double)t->L + 1) * (dqk + dv) * c->num_hidden_layers;
    t->peak = t->o->peak_tflops > 0 ? t->o->peak_tflops * 1e12 : 0;
    gpu_props p;
    if (t->peak <= 0 && gpu_describe(dev, &p, NULL) == 0 &&
        (strstr(p.name, "H100") || strstr(p.name, "H200")))
        t->peak = 989.4e12;
}

static int read_manifest(trainer *t, dsv3_err *e)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/manifest.json", t->o->data);
    json_error_t je;
    json_t *j = json_load_file(path, 0, &je);
    if (!j) {
        struct stat sb;
        if (stat(t->o->data, &sb))
            return err_errno(e, "%s: cannot open the data folder", t->o->data);
        return err_set(e, "%s: %s (line %d)", path, je.text, je.line);
    }
    json_t *tid = json_object_get(j, "tokenizer_id"), *v = json_object_get(j, "vocab_size");
    json_t *counts = json_object_get(j, "counts");
    json_t *vs = counts ? json_object_get(counts, "val_sequences") : NULL;
    int rc = 0;
    if (!json_is_string(tid) || strlen(json_string_value(tid)) != 16 || !json_is_integer(v) ||
        json_integer_value(v) < 0)
        rc = err_set(e, "%s: no tokenizer_id or vocab_size", path);
    else {
        snprintf(t->tokenizer_id, sizeof t->tokenizer_id, "%s", json_string_value(tid));
        t->data_vocab = (uint64_t)json_integer_value(v);
        t->val_records = json_is_integer(vs) ? (uint64_t)json_integer_value(vs) : 0;
    }
    json_decref(j);
    return rc;
}

/* The fields that shape the model or its function; names as in config.json. */
static int config_differs(const dsv3_config *a, const dsv3_config *b, char *what, size_t n)
{
#define INT_FIELD(f)                                                                       \
    if (a->f != b->f)                                                                      \
        return snprintf(what, n, #f " %d vs %d", a->f, b->f), 1;
#define DBL_FIELD(f)                                                                       \
    if (a->f != b->f)                                                                      \
        return snprintf(what, n, #f " %g vs %g", a->f, b->f), 1;
    INT_FIELD(vocab_size) INT_FIELD(hidden_size) INT_FIELD(intermediate_size)
    INT_FIELD(moe_intermediate_size) INT_FIELD(num_hidden_layers) INT_FIELD(num_attention_heads)
    INT_FIELD(q_lora_rank) INT_FIELD(kv_lora_rank) INT_FIELD(qk_nope_head_dim)
    INT_FIELD(qk_rope_head_dim) INT_FIELD(v_head_dim) INT_FIELD(n_shared_experts)
    INT_FIELD(n_routed_experts) INT_FIELD(num_experts_per_tok) INT_FIELD(n_group)
    INT_FIELD(topk_group) DBL_FIELD(routed_scaling_factor) INT_FIELD(norm_topk_prob)
    INT_FIELD(first_k_dense_replace) DBL_FIELD(rms_norm_eps) INT_FIELD(num_nextn_predict_layers)
    INT_FIELD(tie_word_embeddings) DBL_FIELD(rope_theta) INT_FIELD(rope_interleave)
    INT_FIELD(rope_yarn) DBL_FIELD(yarn_factor) INT_FIELD(yarn_original_max_position_embeddings)
    DBL_FIELD(yarn_beta_fast) DBL_FIELD(yarn_beta_slow) DBL_FIELD(yarn_mscale)
    DBL_FIELD(yarn_mscale_all_dim) DBL_FIELD(yarn_attention_factor) INT_FIELD(yarn_truncate)
#undef INT_FIELD
#undef DBL_FIELD
    return 0;
}

/* RUN must be new, or empty, unless --force (which removes what a run writes there). */
static int prepare_fresh_dir(const train_opts *o, dsv3_err *e)
{
    DIR *d = opendir(o->run);
    if (!d)
        return errno == ENOENT ? 0 : err_errno(e, "%s: cannot open", o->run);
    struct dirent *de;
    int used = 0;
    while ((de = readdir(d)))
        if (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
            used = 1;
    closedir(d);
    if (!used || o->resume)   /* --resume without a checkpoint yet: start in place */
        return 0;
    if (!o->force)
        return err_set(e, "%s: the folder holds another run; --resume continues it, --force "
                       "starts over (removing its checkpoints and metrics)", o->run);
    char path[4200], name[64];
    int64_t found;
    trainckpt_clean(o->run);
    while ((found = trainckpt_find(o->run, name, sizeof name, e)) == 1) {
        snprintf(path, sizeof path, "%s/%s", o->run, name);
        if (trainckpt_remove_dir(path, e))
            return -1;
    }
    if (found < 0)
        return -1;
    static const char *files[] = {"latest", "metrics.jsonl", "command.txt", "config.json"};
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        snprintf(path, sizeof path, "%s/%s", o->run, files[i]);
        if (unlink(path) && errno != ENOENT)
            return err_errno(e, "%s: cannot remove", path);
    }
    return 0;
}

static int check_config_arg(trainer *t, const char *source, dsv3_err *e)
{
    if (!t->o->config)
        return 0;
    dsv3_config c;
    if (config_load(&c, t->o->config, e))
        return -1;
    char what[200];
    int differs = config_differs(&c, &t->m.cfg, what, sizeof what);
    config_free(&c);
    if (differs)
        return err_set(e, "%s contradicts %s: %s", t->o->config, source, what);
    return 0;
}

static void note(const trainer *t, const char *fmt, const char *arg)
{
    if (t->log) {
        fprintf(t->log, fmt, arg);
        fputc('\n', t->log);
    }
}

/* Rank 0: the checkpoint a --resume continues (name, *found), or a run folder ready for a
 * fresh run. */
static int find_start(trainer *t, char *name, size_t n, int *found, dsv3_err *e)
{
    const train_opts *o = t->o;
    *found = 0;
    if (o->resume) {
        trainckpt_clean(o->run);
        if ((*found = trainckpt_find(o->run, name, n, e)) < 0)
            return -1;
        if (!*found)
            note(t, "dsv3-train: no checkpoint in %s yet: starting from step 0", o->run);
    }
    if (!*found && prepare_fresh_dir(o, e))
        return -1;
    return 0;
}

/* The data position of a checkpoint written by `world` ranks, for this job: the records of
 * an epoch consumed so far, index * world, shared out anew (a job of another size then
 * reads the rest of the epoch in another order). */
static loader_pos rescale_pos(loader_pos p, uint32_t world, int now, uint64_t per_rank)
{
    if (world == (uint32_t)now)
        return p;
    p.index = p.index * world / (uint64_t)now;
    if (p.index >= per_rank) {  /* the new share of the epoch is used up: the next one */
        p.epoch++;
        p.index = 0;
    }
    return p;
}

/* --ep as given (1 when off). */
static int ep_size(const trainer *t)
{
    return t->o->ep > 1 ? t->o->ep : 1;
}

/* Node-limited routing (--route-nodes M): the experts cut into nodes (--route-groups, or
 * the EP layout: a node holds the groups of its ranks, as many as the launcher's ranks per
 * node, at most the EP size), a token's experts within its M best nodes. */
/* A resume (dir) routes as its checkpoint recorded: the saved --route-nodes and node count
 * where the options are not given; options that differ are refused, since the run would
 * silently change its routing (and its balance biases' meaning) mid-way. A state without
 * the record (written before it existed) takes the options as given. */
static int resume_routing(trainer *t, const char *dir, int *M, int *G, dsv3_err *e)
{
    const train_state *s = &t->st;
    if (!dir || !s->route_known)
        return 0;
    if (!s->route_nodes && *M)
        return err_set(e, "%s was trained without node-limited routing; resuming it with "
                       "--route-nodes %d would route its tokens differently (leave the option "
                       "out, or --init-from the checkpoint's model to start a new run)", dir, *M);
    if (s->route_nodes && ((*M && (uint32_t)*M != s->route_nodes) ||
                           (*G && (uint32_t)*G != s->route_groups)))
        return err_set(e, "%s was trained with --route-nodes %u --route-groups %u; this job "
                       "gives --route-nodes %d --route-groups %d (0: not given) and would route "
                       "differently: give the checkpoint's values or leave the options out",
                       dir, s->route_nodes, s->route_groups, *M, *G);
    *M = (int)s->route_nodes;
    *G = (int)s->route_groups;
    return 0;
}

static int setup_routing(trainer *t, const char *dir, dsv3_err *e)
{
    const train_opts *o = t->o;
    const dsv3_config *c = &t->m.cfg;
    int M = o->route_nodes, nodes = o->route_groups;
    if (resume_routing(t, dir, &M, &nodes, e))
        return -1;
    int saved = M != o->route_nodes || nodes != o->route_groups;
    int E = c->n_routed_experts;
    t->st.route_known = 1;
    t->st.route_nodes = t->st.route_groups = 0;
    if (!M)
        return 0;
    if (E <= 0)
        return err_set(e, "--route-nodes: the model has no routed experts");
    if (c->n_group > 1)
        return err_set(e, "--route-nodes: the config already limits routing to topk_group %d of "
                       "n_group %d expert groups (DeepSeek-V3's own node limit); set n_group 1 "
                       "to route by nodes instead", c->topk_group, c->n_group);
    if (!nodes) {
        const comm_launch *l = t->o->comm ? comm_launch_info(t->o->comm) : NULL;
        int per_node = l && l->local_world > 0 ? l->local_world : t->dp.world;
        int held = per_node < t->ep.size ? per_node : t->ep.size;
        if (t->ep.size % held)
            return err_set(e, "--route-nodes: %d ranks a node do not split --ep %d evenly; give "
                           "--route-groups", per_node, t->ep.size);
        nodes = t->ep.size / held;
    }
    if (nodes < 1 || E % nodes)
        return err_set(e, "--route-groups %d does not divide the %d routed experts", nodes, E);
    t->m.route_nodes = nodes;
    t->m.route_limit = M < nodes ? M : nodes;
    t->st.route_nodes = (uint32_t)M;
    t->st.route_groups = (uint32_t)nodes;
    if (t->log)
        fprintf(t->log, "dsv3-train: node-limited routing (--route-nodes %d --route-groups %d%s): "
                "%d experts in %d nodes of %d, a token's %d experts on at most %d nodes (a node "
                "scored by its top %d)\n", M, nodes,
                saved ? ", from the checkpoint" : "", E, nodes, E / nodes,
                c->num_experts_per_tok, t->m.route_limit,
                c->num_experts_per_tok / t->m.route_limit > 0
                    ? c->num_experts_per_tok / t->m.route_limit : 1);
    return 0;
}

/* Expert parallelism once the model is there: the layout and the routing option. A resume
 * may change --ep and the world size: the optimizer state is then reassembled (load_optim). */
static int setup_ep(trainer *t, const char *dir, dsv3_err *e)
{
    if (ep_open(&t->ep, t->o->comm, ep_size(t), t->m.cfg.n_routed_experts, e))
        return -1;
    t->m.ep = t->ep.size > 1 ? &t->ep : NULL;
    t->ep.fail_rank = t->o->ep_fail_rank;
    t->ep.fail_at = t->o->ep_fail_at;
    return setup_routing(t, dir, e);
}

/* The optimizer of an expert-parallel checkpoint (same world and --ep): this rank's
 * ZeRO-1 shard of the replicated part and its replica's piece of its group's expert
 * moments; on device buffers (gdp) every rank's shard and every replica's piece: the
 * moments are read whole and cut to the device shard (gdp_setup). */
static int load_optim_ep(trainer *t, const char *dir, dsv3_err *e)
{
    char path[4300], name[64];
    int64_t step = -1;
    size_t a = 0, b = 0, c;
    int W = t->dp.world, D = t->ep.replicas, me = t->ep.rank / t->ep.size;
    for (int q = t->gdp ? 0 : t->dp.rank; q < (t->gdp ? W : t->dp.rank + 1); q++) {
        trainckpt_shard_name(name, sizeof name, q, W);
        snprintf(path, sizeof path, "%s/%s", dir, name);
        if (optim_load_shard(&t->opt, &t->m, path, q, W, &step, &c, e))
            return -1;
        a += c;
    }
    /* a checkpoint from before the moments were sharded holds the group's whole moments,
     * re-sliced here */
    epckpt_optim_piece_name(name, sizeof name, t->ep.group, t->ep.size, me, D);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int whole = D > 1 && access(path, F_OK) != 0, all = t->gdp && !whole;
    for (int i = all ? 0 : me; i < (all ? D : me + 1); i++) {
        if (whole)
            epckpt_optim_name(name, sizeof name, t->ep.group, t->ep.size);
        else
            epckpt_optim_piece_name(name, sizeof name, t->ep.group, t->ep.size, i, D);
        snprintf(path, sizeof path, "%s/%s", dir, name);
        int r = D > 1 && !whole ? t->ep.group * D + i : t->ep.group;
        int w = D > 1 && !whole ? t->ep.size * D : t->ep.size;
        if (optim_load_shard(&t->eopt, &t->m, path, r, w, &step, &c, e))
            return -1;
        b += c;
    }
    if (a != t->opt.n || b != t->eopt.n)
        return err_set(e, "%s: the optimizer files do not cover this rank's parameters", dir);
    return 0;
}

/* The optimizer state of checkpoint DIR for this job's layout: as written when the layout
 * is the same (data parallelism re-slices its flat shards for any world size); when --ep
 * or, under --ep, the world size differs, every tensor's moments reassembled from the
 * writing job's files (lib/epckpt), bits unchanged. */
static int load_optim(trainer *t, const char *dir, dsv3_err *e)
{
    uint32_t W = t->st.world, N = t->st.ep;
    if (N == (uint32_t)t->ep.size && (N == 1 || W == (uint32_t)t->dp.world))
        return N > 1 ? load_optim_ep(t, dir, e)
                     : trainckpt_load_optim(dir, W, &t->opt, &t->m, e);
    if (t->log)
        fprintf(t->log, "dsv3-train: the checkpoint was written with --ep %u on %u ranks, this "
                "job has --ep %d on %d: optimizer moments reassembled for its layout\n", N, W,
                t->ep.size, t->dp.world);
    return epckpt_load_optim(dir, W, N, &t->opt, &t->m, e) ||
           (t->ep.size > 1 && epckpt_load_optim(dir, W, N, &t->eopt, &t->m, e)) ? -1 : 0;
}

/* The model, optimizer and state: from checkpoint `name` when found, else fresh
 * (--init-from or a random initialisation of -c). */
static int setup_model(trainer *t, const char *name, int found, train_result *r, dsv3_err *e)
{
    const train_opts *o = t->o;
    char dir[4200];
    if (found) {
        snprintf(dir, sizeof dir, "%s/%s", o->run, name);
        if (model_load_ep(&t->m, dir, 0, ep_size(t), t->dp.rank % ep_size(t), e))
            return -1;
        t->have_model = 1;
        if (check_config_arg(t, dir, e) || trainckpt_read_state(dir, &t->st, e))
            return -1;
        if (strcmp(t->st.tokenizer_id, t->tokenizer_id) || t->st.seq_len != t->L)
            return err_set(e, "%s: the data (tokenizer %s, seq_len %u) is not the checkpoint's "
                           "%s (tokenizer %s, seq_len %u)", o->data, t->tokenizer_id, t->L, dir,
                           t->st.tokenizer_id, t->st.seq_len);
        /* The data order derives from the seed: another seed would not continue the run. */
        if (t->st.seed != o->seed)
            return err_set(e, "--seed %" PRIu64 " is not the seed %" PRIu64 " of the run in %s",
                           o->seed, t->st.seed, dir);
        snprintf(r->checkpoint, sizeof r->checkpoint, "%s", name);
        note(t, "dsv3-train: resuming from %s", dir);
        if (t->st.world != (uint32_t)t->dp.world && t->log)
            fprintf(t->log, "dsv3-train: the checkpoint was written by %u ranks, this job has "
                    "%d: optimizer shards re-sliced; the rest of the data comes in another "
                    "order\n", t->st.world, t->dp.world);
    } else if (o->init_from) {
        if (model_load_ep(&t->m, o->init_from, 0, ep_size(t), t->dp.rank % ep_size(t), e))
            return -1;
        t->have_model = 1;
        if (check_config_arg(t, o->init_from, e))
            return -1;
    } else {
        dsv3_config c;
        if (!o->config)
            return err_set(e, "no model: give -c CONFIG, --init-from DIR or --resume");
        if (config_load(&c, o->config, e))
            return -1;
        int rc = model_init_ep(&t->m, &c, ep_size(t), t->dp.rank % ep_size(t), e);
        config_free(&c);
        if (rc)
            return -1;
        t->have_model = 1;
        model_init_random(&t->m, o->seed, o->init_std);
    }
    if (!found) {
        memset(&t->st, 0, sizeof t->st);
        t->st.seed = t->st.rng = o->seed;
        snprintf(t->st.tokenizer_id, sizeof t->st.tokenizer_id, "%s", t->tokenizer_id);
        t->st.seq_len = t->L;
    }
    if (t->data_vocab > (uint64_t)t->m.cfg.vocab_size)
        return err_set(e, "%s: the data's vocabulary (%" PRIu64 " tokens) does not fit the "
                       "model's vocab_size %d (%s)", o->data, t->data_vocab,
                       t->m.cfg.vocab_size, o->config ? o->config : "the model's config.json");
    /* on device buffers the moments are read whole and cut to the device shard (gdp_setup) */
    if (setup_ep(t, found ? dir : NULL, e) || dp_layout(&t->dp, t->m.n_dense, e) ||
        optim_init_range(&t->opt, &t->m, &o->adam, t->gdp ? 0 : t->dp.lo,
                         t->gdp ? t->m.n_dense : t->dp.hi, e))
        return -1;
    if (t->ep.size > 1) {
        ep_piece(&t->ep, t->m.n_params - t->m.n_dense, t->ep.rank / t->ep.size, &t->ep_lo,
                 &t->ep_hi);
        if (optim_init_range(&t->eopt, &t->m, &o->adam,
                             t->m.n_dense + (t->gdp ? 0 : t->ep_lo),
                             t->gdp ? t->m.n_params : t->m.n_dense + t->ep_hi, e))
            return -1;
    }
    if (found) {
        if (load_optim(t, dir, e))
            return -1;
        if (loader_seek(t->train, rescale_pos(t->st.data, t->st.world, t->dp.world,
                                                  loader_records_per_rank(t->train)), e))
            return err_prefix(e, "%s/%s: data position", o->run, name);
    }
    t->st.world = (uint32_t)t->dp.world;
    t->st.ep = (uint32_t)t->ep.size;
    return 0;
}

/* RUN/config.json and a line of RUN/command.txt: what this run ran with. */
static int record_run(trainer *t, dsv3_err *e)
{
    const train_opts *o = t->o;
    if (mkdir(o->run, 0777) && errno != EEXIST)
        return err_errno(e, "%s: cannot create", o->run);
    char path[4200];
    snprintf(path, sizeof path, "%s/config.json", o->run);
    if (config_save(&t->m.cfg, path, e))
        return -1;
    snprintf(path, sizeof path, "%s/command.txt", o->run);
    FILE *f = fopen(path, "a");
    if (!f)
        return err_errno(e, "%s: cannot open", path);
    fprintf(f, "%s\n", o->command ? o->command : "");
    if (fclose(f))
        return err_errno(e, "%s: write failed", path);
    return 0;
}

/* The data and the batch: the manifest, the train loader (this rank's share), the global
 * batch in sequences, a multiple of B x world. */
static int setup_data(trainer *t, dsv3_err *e)
{
    const train_opts *o = t->o;
    uint64_t W = (uint64_t)t->dp.world, unit = (uint64_t)t->B * W;
    if (o->global_batch && o->global_batch % unit)
        return err_set(e, "--global-batch %" PRIu64 " is not a multiple of --batch %u x %"
                       PRIu64 " ranks (%" PRIu64 "): every rank runs whole micro-batches of "
                       "an equal share", o->global_batch, t->B, W, unit);
    if (read_manifest(t, e))
        return -1;
    if (o->eval_every && !t->val_records)
        return err_set(e, "%s has no val split: --eval-every needs data packed with "
                       "dsv3-pack --val", o->data);
    loader_params lp = {"train", t->B, o->seed, (uint32_t)t->dp.rank, (uint32_t)W, 0};
    if (loader_open(&t->train, o->data, &lp, e))
        return -1;
    t->L = loader_seq_len(t->train);
    uint64_t seqs = o->global_batch ? o->global_batch
                                    : o->global_tokens ? o->global_tokens / t->L : unit;
    seqs -= seqs % unit;
    t->seqs = seqs < unit ? unit : seqs;
    t->ramp = (sched_ramp){o->ramp_unit, o->ramp_first ? o->ramp_first : t->seqs, t->seqs,
                           o->ramp_first ? o->ramp_span : 0, unit};
    return 0;
}

/* The rest, once the model is there: the run folder's files (rank 0), the val loader, the
 * activations and buffers. */
static int setup_rest(trainer *t, dsv3_err *e)
{
    const train_opts *o = t->o;
    if (t->dp.rank == 0 && (record_run(t, e) ||
                            metrics_open(&t->met, o->run, t->st.step == 0, t->st.step, e)))
        return -1;
    if (o->eval_every) {
        loader_params vp = {"val", t->B, o->seed, (uint32_t)t->dp.rank,
                            (uint32_t)t->dp.world, 0};
        if (loader_open(&t->val, o->data, &vp, e))
            return -1;
    }
    if (o->fp8 && !o->cuda)
        return err_set(e, "--fp8 needs --device cuda");
    if (o->recompute && !o->cuda)
        return err_set(e, "--recompute needs --device cuda (the CPU backend keeps every "
                       "activation)");
    if (o->cuda) {
        int ngpu = gpu_count();
        if (ngpu <= 0)
            return err_set(e, "--device cuda: no GPU found%s",
                           gpu_compiled() ? "" : " (this dsv3 was built without CUDA)");
        /* one GPU per rank of a node: the local rank picks it */
        const comm_launch *cl = o->comm ? comm_launch_info(o->comm) : NULL;
        int dev = (cl && cl->local_world > 0 ? cl->local_rank : t->dp.rank) % ngpu;
        /* GMODEL_NONDET only matters for masked documents (its arena share too) */
        const int nondet = o->nondet && (o->sft || o->doc_mask);
        if (gmodel_create_opt(&t->gm, &t->m, (int)t->B, (int)t->L, dev,
                              (o->recompute ? GMODEL_RECOMPUTE : 0) |
                                  (nondet ? GMODEL_NONDET : 0),
                              e) ||
            (o->fp8 && gmodel_set_fp8(t->gm, GMODEL_FP8_PAYS, e)))
            return -1;
        if (o->fp8 && o->fp8_min_dim >= 0)
            gmodel_set_fp8_min_dim(t->gm, o->fp8_min_dim);
        if (o->fp8) {
            char f8[24];
            snprintf(f8, sizeof f8, "%d", gmodel_fp8_min_dim(t->gm));
            note(t, "dsv3-train: --fp8: linear layers with min(in, out) >= %s in FP8, the rest "
                 "bf16 (--fp8-min-dim 0: every one)", f8);
        }
        if (nondet)
            note(t, "dsv3-train: %s", "--nondeterministic: the fused attention backward for "
                 "documents where it applies; the run's bits do not repeat");
        char act[64];
        snprintf(act, sizeof act, "%.1f MiB%s", (double)gmodel_arena_peak(t->gm) / 1048576.0,
                 o->recompute ? " (--recompute)" : "");
        note(t, "dsv3-train: activations kept for backward %s", act);
        /* AdamW on the device: the whole array for one process, this rank's shard with
         * several (gradients reduce-scattered over NCCL). Ranks sharing a GPU (NCCL takes
         * one rank a GPU) keep ZeRO on the host: gradients fetched, AdamW on the shards. */
        if (t->gdp ? gdp_setup(t, e)
                   : t->dp.world == 1 && gmodel_optim_init(t->gm, t->opt.m, t->opt.v, e))
            return -1;
        t->gm_opt = t->gdp || t->dp.world == 1;
        if (t->ep.size > 1 && gpu_ep_setup(t, e))
            return -1;
        else if (!t->gm_opt && t->ep.size <= 1)
            note(t, "dsv3-train: %s", "ranks share GPUs: gradients reduced through host buffers");
        set_mfu_basis(t, dev);
        gpu_props p;
        char what[300];
        snprintf(what, sizeof what, "cuda (GPU %d: %s)", dev,
                 gpu_describe(dev, &p, NULL) == 0 ? p.name : "?");
        note(t, "dsv3-train: device %s", what);
    } else {
        if (!(t->acts = model_acts_new(&t->m, (int)t->B, (int)t->L, e)))
            return -1;
        note(t, "dsv3-train: device %s", "cpu");
    }
    const dsv3_config *c = &t->m.cfg;
    t->n_mtp = c->num_nextn_predict_layers;
    t->nc = (size_t)(c->num_hidden_layers + t->n_mtp) *
            (c->n_routed_experts > 0 ? c->n_routed_experts : 1);
    t->ids = malloc((size_t)t->B * t->L * sizeof *t->ids);
    t->tgt = malloc((size_t)t->B * t->L * sizeof *t->tgt);
    t->seg = malloc((size_t)t->B * t->L * sizeof *t->seg);
    t->pos = malloc((size_t)t->B * t->L * sizeof *t->pos);
    t->doc_mask = o->sft || o->doc_mask;
    t->counts = calloc(t->nc, sizeof *t->counts);
    t->tmp_counts = calloc(t->nc, sizeof *t->tmp_counts);
    t->sync = calloc(t->nc + 2 + (size_t)t->n_mtp, sizeof *t->sync);
    t->norms = calloc(2 + (size_t)t->n_mtp, sizeof *t->norms);
    t->mtp_slots = calloc((size_t)t->n_mtp + 1, sizeof *t->mtp_slots);
    if (t->ep.size > 1 && !(t->ep_rows = calloc(ep_rows_n(t), sizeof *t->ep_rows)))
        return err_set(e, "out of memory");
    if (!t->ids || !t->tgt || !t->seg || !t->pos || !t->counts || !t->tmp_counts || !t->sync ||
        !t->mtp_slots || !t->norms)
        return err_set(e, "out of memory");
    return 0;
}

/* Every phase ends with the ranks agreeing, so none enters a collective that another,
 * having failed, never reaches. */
static int setup(trainer *t, train_result *r, dsv3_err *e)
{
    t->B = t->o->micro_batch;
    if (dp_agree(&t->dp, setup_data(t, e), NULL, e))
        return -1;
    char name[64] = "";
    int found = 0, rc = t->dp.rank == 0 ? find_start(t, name, sizeof name, &found, e) : 0;
    int64_t id = (int64_t)getpid();
    if (dp_agree(&t->dp, rc, NULL, e) || dp_broadcast_bytes(&t->dp, name, sizeof name, 0, e) ||
        dp_broadcast_bytes(&t->dp, &id, sizeof id, 0, e))
        return -1;
    found = name[0] != 0;
    t->ckpt_id = (long)id;
    /* Agreed before rank 0 writes into RUN: a rank that cannot load leaves it untouched. */
    if (dp_agree(&t->dp, setup_model(t, name, found, r, e), NULL, e))
        return -1;
    return dp_agree(&t->dp, setup_rest(t, e), NULL, e);
}

static void teardown(trainer *t)
{
    metrics_close(&t->met);
    model_acts_free(t->acts);
    epdev_free(&t->xd);
    gmodel_destroy(t->gm);
    comm_close(t->ecomm);
    comm_close(t->dcomm);
    free(t->hbuf);
    if (t->train)
        loader_close(t->train);
    if (t->val)
        loader_close(t->val);
    optim_free(&t->opt);
    optim_free(&t->eopt);
    ep_free(&t->ep);
    free(t->ep_rows);
    if (t->have_model)
        model_free(&t->m);
    free(t->ids);
    free(t->tgt);
    free(t->counts);
    free(t->tmp_counts);
    free(t->sync);
    free(t->mtp_slots);
    free(t->norms);
    dp_free(&t->dp);
    free(t->q.ids);
    free(t->q.tgt);
    free(t->q.seg);
    free(t->q.pos);
    free(t->seg);
    free(t->pos);
}

/* ---- one update, evaluation, logging ---- */

typedef struct step_out {
    double loss, lr, norm, seconds, gamma, mtp_weight;
    double mtp_loss;        /* mean over the MTP modules of their cross-entropy; < 0: none */
    uint64_t seqs;
    int64_t targets;
    int skipped;
} step_out;

/* Sums over the ranks of a step's loss, counted targets, routed tokens and expert loads
 * (the MTP blocks' with their routed slots). */
static int sum_stats(trainer *t, accum *a, dsv3_err *e)
{
    size_t n = t->nc + 2 + (size_t)t->n_mtp;
    t->sync[0] = a->n;
    t->sync[1] = a->routed;
    memcpy(t->sync + 2, t->counts, t->nc * sizeof *t->counts);
    memcpy(t->sync + 2 + t->nc, t->mtp_slots, (size_t)t->n_mtp * sizeof *t->mtp_slots);
    if (dp_sum_i64(&t->dp, t->sync, n, e) || dp_sum_f64(&t->dp, &a->loss_sum, 1, e) ||
        dp_sum_f64(&t->dp, a->mtp, 8, e))
        return -1;
    a->n = t->sync[0];
    a->routed = t->sync[1];
    memcpy(t->counts, t->sync + 2, t->nc * sizeof *t->counts);
    memcpy(t->mtp_slots, t->sync + 2 + t->nc, (size_t)t->n_mtp * sizeof *t->mtp_slots);
    return 0;
}

/* The step's bookkeeping after its update (or skip). */
static void end_step(trainer *t, step_out *so, double t0)
{
    t->st.step++;
    t->st.tokens += so->seqs * t->L;
    splitmix(&t->st.rng);
    t->st.data = loader_tell(t->train);
    so->seconds = progress_now() - t0;
}

/* The step line's MTP loss: the mean over the modules of their cross-entropy. */
static void mtp_mean(const trainer *t, step_out *so, const accum *a)
{
    if (t->n_mtp > 0 && t->m.mtp_lambda > 0) {
        double sum = 0;
        int D = t->n_mtp < 8 ? t->n_mtp : 8;
        for (int k = 0; k < D; k++)
            sum += a->mtp[k];
        so->mtp_loss = sum / D;
    }
}

/* A step whose loss or gradient norm is not finite: an error that stops the run (nothing
 * saved), or with --skip-nonfinite a skipped step (1). 0: the step is finite. */
static int nonfinite_step(trainer *t, step_out *so, dsv3_err *e)
{
    if (isfinite(so->loss) && isfinite(so->norm))
        return 0;
    if (!t->o->skip_nonfinite)
        return err_set(e, "step %" PRIu64 ": the loss is %g and the gradient norm %g; "
                       "stopping without saving (the last checkpoint is untouched; "
                       "--skip-nonfinite skips such batches)", t->st.step + 1, so->loss, so->norm);
    so->skipped = 1;
    t->st.skipped++;
    return 1;
}

/* do_step's update with the optimizer on the GPU (one process, t->gm_opt): the same rules
 * as the host path below (norm, non-finite stop or skip, clipping, AdamW with lib/optim's
 * step count, the bias update on the host's biases of the main and MTP blocks, then
 * uploaded). */
static int gpu_update(trainer *t, step_out *so, const accum *a, double t0, dsv3_err *e)
{
    const train_opts *o = t->o;
    so->targets = a->n;
    mtp_mean(t, so, a);
    so->loss = a->n ? a->loss_sum / (double)a->n : 0;
    float norm = 0;
    if (gmodel_grad_norm(t->gm, &norm, e))
        return -1;
    so->norm = norm;
    if (t->gdp) {  /* the shards' squared sums over the ranks: the global norm, for clipping */
        double sq = (double)norm * norm;
        if (dp_sum_f64(&t->dp, &sq, 1, e) || gmodel_set_grad_norm(t->gm, (float)sqrt(sq), e))
            return -1;
        so->norm = sqrt(sq);
    }
    int bad = nonfinite_step(t, so, e);
    if (bad < 0)
        return -1;
    if (!bad && a->n) {
        t->opt.t++;
        const optim_params *p = &t->opt.p;
        if (gmodel_adamw(t->gm, (float)so->lr, (float)p->beta1, (float)p->beta2, (float)p->eps,
                         (float)p->weight_decay, o->clip > 0 ? (float)o->clip : 0.0f,
                         (int)t->opt.t, e))
            return -1;
        t->eopt.t = t->opt.t;
        if (t->gdp && ((t->ep.size > 1 ? epdev_gather_master(&t->xd, &t->dp, e)
                                       : dp_dev_gather(&t->dp, NULL, gmodel_dev_master(t->gm),
                                                       COMM_F32, gmodel_stream(t->gm), e)) ||
                       gmodel_refresh_bf16(t->gm, e)))
            return -1;
        train_balance_update(&t->m, t->counts, a->routed, t->mtp_slots, (float)so->gamma);
        const dsv3_config *c = &t->m.cfg;
        for (int l = 0; l < c->num_hidden_layers + t->n_mtp; l++) {
            const float *b = l < c->num_hidden_layers
                                 ? t->m.w.layers[l].router_bias
                                 : t->m.w.mtp[l - c->num_hidden_layers].block.router_bias;
            if (b && gmodel_set_range(t->gm, t->m.params, (size_t)(b - t->m.params),
                                      (size_t)c->n_routed_experts, e))
                return -1;
        }
    }
    end_step(t, so, t0);
    return 0;
}

/* Expert parallelism in the update: the held experts' part of the parameter array,
 * [n_dense, n_params), is not sharded. Its gradient is summed over the group's replicas
 * (and the rows received on each rank summed for the metrics); its squares count once in
 * the global norm (on the first replica); each replica clips and updates it whole, with
 * the same result. */
static int ep_reduce(trainer *t, dsv3_err *e)
{
    if (t->ep.size <= 1)
        return 0;
    return ep_scatter_experts(&t->ep, t->m.grads + t->m.n_dense, t->m.n_params - t->m.n_dense,
                              e) || dp_sum_i64(&t->dp, t->ep_rows, ep_rows_n(t), e) ? -1 : 0;
}

static double ep_sumsq(const trainer *t)
{
    if (t->ep.size <= 1)
        return 0;
    size_t lo = t->m.n_dense + t->ep_lo, hi = t->m.n_dense + t->ep_hi;
    return optim_grad_sumsq(&t->m, t->m.grads + lo, lo, hi);
}

/* The held experts: each replica clips and steps its piece (its moments' range), then the
 * pieces of the parameters are gathered on every replica (ZeRO-1 over the replicas). */
static int ep_update(trainer *t, double norm, double lr, dsv3_err *e)
{
    if (t->ep.size <= 1)
        return 0;
    size_t lo = t->m.n_dense + t->ep_lo, hi = t->m.n_dense + t->ep_hi;
    float *g = t->m.grads + lo;
    optim_clip_range(&t->m, g, lo, hi, norm, t->o->clip);
    optim_step_grads(&t->eopt, &t->m, g, lr);
    return ep_gather_experts(&t->ep, t->m.params + t->m.n_dense, t->m.n_params - t->m.n_dense,
                             e);
}

/* One update. Each rank's accumulated gradient is its part of the gradient of the whole
 * global batch's loss (the model normalises by the step's counts over all ranks), so the
 * sum over the ranks is that gradient, as one process would compute it. */
static int do_step(trainer *t, step_out *so, dsv3_err *e)
{
    const train_opts *o = t->o;
    sched_pos p = {t->st.step, t->st.tokens};
    memset(so, 0, sizeof *so);
    so->mtp_loss = -1;
    so->seqs = sched_batch_at(&t->ramp, p);
    so->lr = sched_lr_at(&o->lr, p, so->seqs * t->L);
    so->gamma = sched_switch_at(&o->gamma, p);
    so->mtp_weight = sched_switch_at(&o->mtp_weight, p);
    set_loss_weights(&t->m, so->mtp_weight, o->alpha);
    memset(t->counts, 0, t->nc * sizeof *t->counts);
    memset(t->mtp_slots, 0, (size_t)t->n_mtp * sizeof *t->mtp_slots);
    if (t->ep_rows)
        memset(t->ep_rows, 0, ep_rows_n(t) * sizeof *t->ep_rows);
    double t0 = progress_now();
    accum a = {0};
    if (load_step(t, so->seqs / (uint64_t)t->dp.world, e))
        return -1;
    int rc = be_zero_grad(t, e);
    t->next_bk = 0;
    if (!rc)
        rc = run_records(t, t->train, 0, &a, 1, e);
    t->m.norm_main = t->m.norm_seqs = 0;  /* evaluation: each forward its own */
    t->m.norm_mtp = NULL;
    if (!rc && !t->gm_opt)
        rc = be_fetch_grads(t, e);
    if (dp_agree(&t->dp, rc, NULL, e) || (t->gdp && gdp_finish(t, e)) || sum_stats(t, &a, e))
        return -1;
    if (t->gm_opt)
        return gpu_update(t, so, &a, t0, e);
    float *g;
    if (dp_reduce_grads(&t->dp, t->m.grads, &g, e) || ep_reduce(t, e))
        return -1;
    so->targets = a.n;
    mtp_mean(t, so, &a);
    so->loss = a.n ? a.loss_sum / (double)a.n : 0;
    double sumsq = optim_grad_sumsq(&t->m, g, t->dp.lo, t->dp.hi) + ep_sumsq(t);
    if (dp_sum_f64(&t->dp, &sumsq, 1, e))
        return -1;
    so->norm = sqrt(sumsq);
    int bad = nonfinite_step(t, so, e);
    if (bad < 0)
        return -1;
    if (!bad && a.n) {
        optim_clip_range(&t->m, g, t->dp.lo, t->dp.hi, so->norm, o->clip);
        optim_step_grads(&t->opt, &t->m, g, so->lr);
        if (ep_update(t, so->norm, so->lr, e) || dp_gather_params(&t->dp, t->m.params, e))
            return -1;
        /* The summed counts are the same on every rank, and so is the bias each computes
         * from them: nothing to communicate. */
        train_balance_update(&t->m, t->counts, a.routed, t->mtp_slots, (float)so->gamma);
        t->gm_dirty = 1;
    }
    end_step(t, so, t0);
    return 0;
}

/* The val loss over eval_batches micro-batches, shared out over the ranks (rounded up to a
 * whole number per rank). */
static int evaluate(trainer *t, double *loss, int64_t *n, dsv3_err *e)
{
    accum a = {0};
    loader_pos start = {0, 0};
    uint64_t W = (uint64_t)t->dp.world, per = (t->o->eval_batches + W - 1) / W;
    int rc = loader_seek(t->val, start, e);
    if (!rc)
        rc = run_records(t, t->val, per * t->B, &a, 0, e);
    int64_t nn = 0;
    if (dp_agree(&t->dp, rc, NULL, e))
        return -1;
    nn = a.n;
    if (dp_sum_i64(&t->dp, &nn, 1, e) || dp_sum_f64(&t->dp, &a.loss_sum, 1, e))
        return -1;
    *loss = nn ? a.loss_sum / (double)nn : 0;
    *n = nn;
    return 0;
}

/* Per MoE layer: max and min load over the mean (1 = perfectly balanced). */
static json_t *load_stats(const trainer *t, double *worst)
{
    const dsv3_config *c = &t->m.cfg;
    int E = c->n_routed_experts;
    json_t *layers = json_array(), *mx = json_array(), *mn = json_array(), *raw = json_array();
    *worst = 0;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        if (!config_layer_is_moe(c, l) || E <= 0)
            continue;
        const int64_t *k = t->counts + (size_t)l * E;
        int64_t sum = 0, hi = k[0], lo = k[0];
        json_t *row = json_array();
        for (int i = 0; i < E; i++) {
            sum += k[i];
            hi = k[i] > hi ? k[i] : hi;
            lo = k[i] < lo ? k[i] : lo;
            json_array_append_new(row, json_integer(k[i]));
        }
        double mean = (double)sum / E;
        double rmax = mean > 0 ? (double)hi / mean : 0, rmin = mean > 0 ? (double)lo / mean : 0;
        *worst = rmax > *worst ? rmax : *worst;
        json_array_append_new(layers, json_integer(l));
        json_array_append_new(mx, json_real(rmax));
        json_array_append_new(mn, json_real(rmin));
        json_array_append_new(raw, row);
    }
    json_t *o = json_object();
    json_object_set_new(o, "layers", layers);
    json_object_set_new(o, "max_over_mean", mx);
    json_object_set_new(o, "min_over_mean", mn);
    /* Raw counts only while they stay small: 58 layers x 256 experts would be 15K numbers
     * a line. */
    if ((size_t)json_array_size(layers) * (size_t)E <= 4096)
        json_object_set_new(o, "counts", raw);
    else
        json_decref(raw);
    return o;
}

/* Expert parallelism: rows each rank's experts received this step, per MoE block (main
 * layers, then MTP blocks at num_hidden_layers + k), and per block the most loaded rank
 * over the mean; *worst: the largest of those. */
static json_t *ep_load_stats(const trainer *t, double *worst)
{
    const dsv3_config *c = &t->m.cfg;
    size_t nb = (size_t)c->num_hidden_layers + (size_t)t->n_mtp;
    int W = t->ep.world;
    json_t *layers = json_array(), *rows = json_array(), *mx = json_array();
    *worst = 0;
    for (size_t l = 0; l < nb; l++) {
        if (!config_layer_is_moe(c, (int)l))
            continue;
        int64_t sum = 0, hi = 0;
        json_t *row = json_array();
        for (int r = 0; r < W; r++) {
            int64_t v = t->ep_rows[(size_t)r * nb + l];
            sum += v;
            hi = v > hi ? v : hi;
            json_array_append_new(row, json_integer(v));
        }
        if (!sum) {  /* an MTP block that did not run */
            json_decref(row);
            continue;
        }
        double ratio = (double)hi * W / (double)sum;
        *worst = ratio > *worst ? ratio : *worst;
        json_array_append_new(layers, json_integer((json_int_t)l));
        json_array_append_new(rows, row);
        json_array_append_new(mx, json_real(ratio));
    }
    json_t *o = json_object();
    json_object_set_new(o, "layers", layers);
    json_object_set_new(o, "rows_per_rank", rows);
    json_object_set_new(o, "max_over_mean", mx);
    return o;
}

/* JSON has no NaN or infinity: a skipped update's loss is written as null. */
static json_t *real_or_null(double x)
{
    return isfinite(x) ? json_real(x) : json_null();
}

/* Peak resident memory of the process so far, in MiB (Linux reports ru_maxrss in KiB). */
static double peak_rss_mib(void)
{
    struct rusage ru;
    return getrusage(RUSAGE_SELF, &ru) ? 0 : (double)ru.ru_maxrss / 1024.0;
}

static int report_step(trainer *t, const step_out *so, dsv3_err *e)
{
    const train_opts *o = t->o;
    if (t->dp.rank != 0)
        return 0;
    double tps = so->seconds > 0 ? (double)(so->seqs * t->L) / so->seconds : 0, worst;
    double rss = peak_rss_mib();
    json_t *load = load_stats(t, &worst);
    double ep_worst = 0;
    json_t *ep_load = t->ep.size > 1 ? ep_load_stats(t, &ep_worst) : NULL;
    /* tokens/s is the whole job's: MFU is per GPU, one GPU a rank */
    double mfu = t->peak > 0 ? tps * t->flops_token / (t->peak * t->dp.world) : -1;
    if (t->out) {
        char rate[32], total[48] = "", mtp[32] = "", mfus[32] = "", eps[40] = "";
        progress_human(rate, sizeof rate, tps);
        if (o->max_steps)
            snprintf(total, sizeof total, "/%" PRIu64, o->max_steps);
        if (so->mtp_loss >= 0)
            snprintf(mtp, sizeof mtp, "  mtp %.4f", so->mtp_loss);
        if (mfu >= 0)
            snprintf(mfus, sizeof mfus, "  MFU %.1f%%", 100 * mfu);
        if (ep_load)
            snprintf(eps, sizeof eps, "  ep rows max/mean %.2f", ep_worst);
        fprintf(t->out, "step %" PRIu64 "%s  loss %.6f%s  lr %.3e  gnorm %.4f  tok/s %s%s  "
                "load max/mean %.2f%s  mem %.0f MiB%s%s\n", t->st.step, total, so->loss, mtp,
                so->lr, so->norm, rate, mfus, worst, eps, rss, o->fp8 ? "  fp8" : "",
                so->skipped ? "  SKIPPED (non-finite)" : "");
        fflush(t->out);
    }
    json_t *j = json_object();
    json_object_set_new(j, "step", json_integer((json_int_t)t->st.step));
    json_object_set_new(j, "tokens", json_integer((json_int_t)t->st.tokens));
    json_object_set_new(j, "loss", real_or_null(so->loss));
    if (so->mtp_loss >= 0)
        json_object_set_new(j, "mtp_loss", real_or_null(so->mtp_loss));
    if (mfu >= 0)
        json_object_set_new(j, "mfu", json_real(mfu));
    json_object_set_new(j, "lr", json_real(so->lr));
    json_object_set_new(j, "grad_norm", real_or_null(so->norm));
    json_object_set_new(j, "tokens_per_s", json_real(tps));
    json_object_set_new(j, "seconds", json_real(so->seconds));
    json_object_set_new(j, "batch_sequences", json_integer((json_int_t)so->seqs));
    json_object_set_new(j, "loss_tokens", json_integer((json_int_t)so->targets));
    json_object_set_new(j, "gamma", json_real(so->gamma));
    json_object_set_new(j, "mtp_weight", json_real(so->mtp_weight));
    json_object_set_new(j, "alpha", json_real(o->alpha));
    json_object_set_new(j, "skipped", json_boolean(so->skipped));
    json_object_set_new(j, "max_rss_mib", json_real(rss));
    json_object_set_new(j, "expert_load", load);
    if (ep_load)
        json_object_set_new(j, "ep_load", ep_load);
    if (t->st.route_nodes)  /* node-limited routing: what the step routed under */
        json_object_set_new(j, "route", json_pack("{s:i, s:i}", "nodes",
                                                  (int)t->st.route_nodes, "groups",
                                                  (int)t->st.route_groups));
    return metrics_write(&t->met, j, e);
}

/* A checkpoint of several ranks: rank 0 creates the temporary folder, every rank writes
 * its optimizer shard (rank 0 the model too), rank 0 commits; the ranks agree after each
 * phase, so a failure anywhere leaves no checkpoint and stops them all. */
static int save_dp(trainer *t, dsv3_err *e)
{
    dp *d = &t->dp;
    char tmp[4096] = "", path[4200], name[64];
    int rc = d->rank == 0 ? trainckpt_begin(t->o->run, t->st.step, t->ckpt_id, tmp, sizeof tmp,
                                            e) : 0;
    if (dp_agree(d, rc, NULL, e) || dp_broadcast_bytes(d, tmp, sizeof tmp, 0, e))
        return -1;
    if (t->ep.size > 1)
        rc = epckpt_save_model(&t->m, &t->ep, tmp, e);
    else
        rc = d->rank == 0 ? model_save(&t->m, tmp, e) : 0;
    if (!rc) {
        trainckpt_shard_name(name, sizeof name, d->rank, d->world);
        snprintf(path, sizeof path, "%s/%s", tmp, name);
        rc = optim_save_shard(&t->opt, &t->m, d->rank, d->world, path, e);
    }
    if (!rc && t->ep.size > 1) {  /* every replica its piece of its group's moments */
        int D = t->ep.replicas, me = t->ep.rank / t->ep.size;
        epckpt_optim_piece_name(name, sizeof name, t->ep.group, t->ep.size, me, D);
        snprintf(path, sizeof path, "%s/%s", tmp, name);
        rc = optim_save_shard(&t->eopt, &t->m, D > 1 ? t->ep.group * D + me : t->ep.group,
                              D > 1 ? t->ep.size * D : t->ep.size, path, e);
    }
    if (!rc && t->o->crash_in_save && t->n_saves == t->o->crash_in_save && d->rank == 0)
        raise(SIGKILL);
    rc = dp_agree(d, rc, NULL, e);
    if (rc) {
        if (d->rank == 0)
            trainckpt_remove_dir(tmp, NULL);
        return -1;
    }
    rc = d->rank == 0 ? trainckpt_commit(t->o->run, tmp, &t->st, t->o->keep, e) : 0;
    return dp_agree(d, rc, NULL, e);
}

static int save(trainer *t, train_result *r, dsv3_err *e)
{
    int crash = t->o->crash_in_save && ++t->n_saves == t->o->crash_in_save;
    if (t->gdp ? gdp_sync_host(t, e)
               : t->gm_opt && gmodel_sync_host(t->gm, t->m.params, t->opt.m, t->opt.v, e))
        return -1;
    if (t->dp.world > 1 ? save_dp(t, e)
                        : trainckpt_save(t->o->run, &t->m, &t->opt, &t->st, t->o->keep, crash, e))
        return -1;
    snprintf(r->checkpoint, sizeof r->checkpoint, "step-%06" PRIu64, t->st.step);
    return 0;
}

/* After each update: its line and metrics, the evaluation when due; then the ranks agree on
 * failure and on stopping (a signal on any rank stops them all after this step). */
static int after_step(trainer *t, const step_out *so, int *stop, dsv3_err *e)
{
    const train_opts *o = t->o;
    int rc = report_step(t, so, e);
    if (dp_agree(&t->dp, rc, NULL, e))
        return -1;
    if (o->eval_every && t->st.step % o->eval_every == 0) {
        double vl;
        int64_t vn;
        if (evaluate(t, &vl, &vn, e))
            return -1;
        if (t->out) {
            fprintf(t->out, "eval step %" PRIu64 "  val_loss %.6f  (%" PRId64 " tokens)\n",
                    t->st.step, vl, vn);
            fflush(t->out);
        }
        if (t->dp.rank == 0) {
            json_t *j = json_pack("{s:I, s:I, s:f, s:I}", "step", (json_int_t)t->st.step,
                                  "tokens", (json_int_t)t->st.tokens, "val_loss", vl,
                                  "val_tokens", (json_int_t)vn);
            rc = metrics_write(&t->met, j, e);
        }
    }
    *stop = o->stop && *o->stop;
    return dp_agree(&t->dp, rc, stop, e);
}

static int loop(trainer *t, train_result *r, dsv3_err *e)
{
    const train_opts *o = t->o;
    for (;;) {
        int done = (o->max_steps && t->st.step >= o->max_steps) ||
                   (o->max_tokens && t->st.tokens >= o->max_tokens);
        if (done)
            break;
        step_out so;
        int stop;
        if (do_step(t, &so, e) || after_step(t, &so, &stop, e))
            return -1;
        r->loss = so.loss;
        int last = (o->max_steps && t->st.step >= o->max_steps) ||
                   (o->max_tokens && t->st.tokens >= o->max_tokens);
        if (gpu_ep_time(t, last || stop, e))
            return -1;
        if ((o->save_every && t->st.step % o->save_every == 0) || stop || last)
            if (save(t, r, e))
                return -1;
        if (stop) {
            r->stopped = 1;
            break;
        }
    }
    return 0;
}
/* Whether each rank of this node has a GPU of its own (NCCL's data parallelism needs
 * that; ranks sharing GPUs take the host path). Every rank of a node sees the same. */
static int rank_has_own_gpu(const train_opts *o)
{
    const comm_launch *cl = o->comm ? comm_launch_info(o->comm) : NULL;
    int local = cl && cl->local_world > 0 ? cl->local_world : o->comm ? comm_world(o->comm) : 1;
    return gpu_count() >= local;
}

/* --ep on GPUs: the optimizer on the device (lib/epdev) where each rank has a GPU of its own
 * and the rows go over NCCL; DSV3_EP_OPT=host keeps it on the host (for comparison). */
static int ep_opt_on_device(const train_opts *o)
{
    const char *h = getenv("DSV3_EP_HOST"), *opt = getenv("DSV3_EP_OPT");
    return rank_has_own_gpu(o) && !(h && !strcmp(h, "1")) && !(opt && !strcmp(opt, "host"));
}

int train_run(const train_opts *o, train_result *r, dsv3_err *e)
{
    trainer *t = calloc(1, sizeof *t);
    if (!t)
        return err_set(e, "out of memory");
    memset(r, 0, sizeof *r);
    t->o = o;
    dp_open(&t->dp, o->comm);
    const char *nccl = getenv("DSV3_DP_NCCL");
    t->gdp = o->cuda && (o->ep > 1 ? ep_opt_on_device(o)
                                   : (t->dp.world > 1 && rank_has_own_gpu(o)) ||
                                         (nccl && !strcmp(nccl, "1")));
    t->log = t->dp.rank == 0 ? o->log : NULL;
    t->out = t->dp.rank == 0 ? o->out : NULL;
    int rc = setup(t, r, e);
    if (!rc)
        rc = loop(t, r, e);
    r->step = t->st.step;
    r->tokens = t->st.tokens;
    teardown(t);
    free(t);
    return rc;
}
