/* bench_train_kernels: where one forward + backward of the 1B-class MoE goes, kernel by
 * kernel. Builds configs/1b-moe.json (MTP off) with random weights, runs two warm-up
 * forward + backward passes of B x T tokens, then traces one more with CUPTI's activity API
 * (every kernel's start and end on the device, no replay, no serialisation: the same
 * launches as an untraced step) and prints
 *   1. one row per kernel name and phase: calls, time, share of the traced step;
 *   2. one row per group with its floor: FLOPs over the bf16 GEMM rate (an 8192^3 cuBLASLt
 *      product) or bytes over the device copy rate, both measured in this process, and the
 *      group's distance from that floor (floor / time).
 * Phases: "fwd" (the forward up to the head), "head" (the chunked output head and its
 * cross-entropy with their gradients, which gmodel_forward runs), "fwd-tail", "bwd"
 * (gmodel_backward). libcupti is opened at run time (DSV3_CUPTI_LIB, else the usual names),
 * so the library and the tests never link it.
 * DSV3_BENCH_FP8=1 traces the step with gmodel_set_fp8(GMODEL_FP8_ALL) (every linear layer in
 * FP8), =2 with GMODEL_FP8_PAYS (dsv3-train --fp8's policy); the quantisation kernels then
 * form a group of their own, and the FP8 grouped GEMMs join the MoE GEMM groups.
 * Usage: bench_train_kernels [B] [T]   (defaults 4 4096). Run by scripts/bench-train-kernels.sh. */

#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/gemm.h"
#include "../../kernels/gmodel.h"
#include "../../kernels/gpu.h"
#include "../../kernels/gpuctx.h"
#include "../../lib/model.h"

#if defined(__has_include)
#if __has_include(<cupti.h>)
#include <cupti.h>
#include "../../tools/cupti_util.h"
#define HAVE_CUPTI 1
#endif
#endif

#ifndef HAVE_CUPTI
int main(void)
{
    fprintf(stderr, "bench_train_kernels: built without cupti.h\n");
    return 1;
}
#else

typedef struct krec {
    uint64_t start, end;
    uint32_t corr; /* CUPTI's correlation id: the runtime call that queued it */
    char name[64];
} krec;

/* one runtime API call (a launch, a memset, an event record, ...) on the host's clock */
typedef struct arec {
    uint64_t start, end;
    uint32_t corr;
} arec;

typedef struct trace {
    krec *r;
    size_t n, cap;
    arec *a;
    size_t na, acap;
} trace;

/* CUPTI's buffer callbacks carry no user pointer: the one trace of this program. */
static trace tr_;

static struct {
    CUptiResult (*reg)(CUpti_BuffersCallbackRequestFunc, CUpti_BuffersCallbackCompleteFunc);
    CUptiResult (*enable)(CUpti_ActivityKind);
    CUptiResult (*disable)(CUpti_ActivityKind);
    CUptiResult (*flush)(uint32_t);
    CUptiResult (*next)(uint8_t *, size_t, CUpti_Activity **);
} cu_;

static void CUPTIAPI buf_complete(CUcontext ctx, uint32_t stream, uint8_t *buf, size_t size,
                                  size_t valid)
{
    (void)ctx, (void)stream, (void)size;
    CUpti_Activity *rec = NULL;
    while (cu_.next(buf, valid, &rec) == CUPTI_SUCCESS) {
        uint64_t s, e;
        uint32_t corr;
        const char *name;
        if (rec->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) {
            CUpti_ActivityKernel10 *k = (CUpti_ActivityKernel10 *)rec;
            s = k->start, e = k->end, name = k->name, corr = k->correlationId;
        } else if (rec->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
            CUpti_ActivityMemset4 *k = (CUpti_ActivityMemset4 *)rec;
            s = k->start, e = k->end, name = "[memset]", corr = k->correlationId;
        } else if (rec->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
            CUpti_ActivityMemcpy6 *k = (CUpti_ActivityMemcpy6 *)rec;
            s = k->start, e = k->end, name = "[memcpy]", corr = k->correlationId;
        } else if (rec->kind == CUPTI_ACTIVITY_KIND_RUNTIME ||
                   rec->kind == CUPTI_ACTIVITY_KIND_DRIVER) {
            CUpti_ActivityAPI *k = (CUpti_ActivityAPI *)rec;
            if (tr_.na == tr_.acap) {
                tr_.acap = tr_.acap ? 2 * tr_.acap : 4096;
                tr_.a = realloc(tr_.a, tr_.acap * sizeof *tr_.a);
            }
            tr_.a[tr_.na++] = (arec){k->start, k->end, k->correlationId};
            continue;
        } else {
            continue;
        }
        if (tr_.n == tr_.cap) {
            tr_.cap = tr_.cap ? 2 * tr_.cap : 4096;
            tr_.r = realloc(tr_.r, tr_.cap * sizeof *tr_.r);
        }
        krec *r = &tr_.r[tr_.n++];
        r->start = s, r->end = e, r->corr = corr;
        cupti_short_name(r->name, sizeof r->name, name);
    }
    free(buf);
}

static int cupti_open(void)
{
    const char *env = getenv("DSV3_CUPTI_LIB");
    const char *names[] = {env, "libcupti.so.13", "libcupti.so",
                           "/usr/local/cuda/extras/CUPTI/lib64/libcupti.so.13",
                           "/usr/local/cuda/lib64/libcupti.so.13", "/usr/local/cuda/lib/libcupti.so.13"};
    void *h = NULL;
    for (size_t i = 0; i < sizeof names / sizeof *names && !h; i++)
        if (names[i])
            h = dlopen(names[i], RTLD_NOW);
    if (!h) {
        fprintf(stderr, "bench_train_kernels: cannot open libcupti (set DSV3_CUPTI_LIB)\n");
        return -1;
    }
    *(void **)&cu_.reg = dlsym(h, "cuptiActivityRegisterCallbacks");
    *(void **)&cu_.enable = dlsym(h, "cuptiActivityEnable");
    *(void **)&cu_.disable = dlsym(h, "cuptiActivityDisable");
    *(void **)&cu_.flush = dlsym(h, "cuptiActivityFlushAll");
    *(void **)&cu_.next = dlsym(h, "cuptiActivityGetNextRecord");
    if (!cu_.reg || !cu_.enable || !cu_.disable || !cu_.flush || !cu_.next ||
        cu_.reg(cupti_buf_request, buf_complete) != CUPTI_SUCCESS) {
        fprintf(stderr, "bench_train_kernels: libcupti lacks the activity API\n");
        return -1;
    }
    return 0;
}

static const CUpti_ActivityKind kinds_[] = {
    CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, CUPTI_ACTIVITY_KIND_MEMSET, CUPTI_ACTIVITY_KIND_MEMCPY,
    CUPTI_ACTIVITY_KIND_RUNTIME, CUPTI_ACTIVITY_KIND_DRIVER};

static void trace_on(int on)
{
    for (size_t i = 0; i < sizeof kinds_ / sizeof *kinds_; i++)
        on ? cu_.enable(kinds_[i]) : cu_.disable(kinds_[i]);
}

static void fill_random(dsv3_model *m, uint64_t seed)
{
    double a = m->cfg.initializer_range * sqrt(3.0);
    for (int t = 0; t < m->n_t; t++) {
        const model_tensor *tt = &m->t[t];
        size_t n = strlen(tt->name);
        int norm = n > 11 && !strcmp(tt->name + n - 11, "norm.weight");
        float *p = m->params + tt->off;
        for (int64_t i = 0; i < tt->numel; i++) {
            uint64_t z = seed + (tt->off + (uint64_t)i) * 0x9e3779b97f4a7c15ULL;
            z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
            z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
            z ^= z >> 31;
            p[i] = norm ? 1.0f : !tt->trainable ? 0.0f : (float)(((z >> 11) * 0x1p-53 * 2 - 1) * a);
        }
    }
}

/* The bf16 GEMM ceiling: median of 10 timed 8192^3 products after 3 warm-ups. */
static double gemm_ceiling(gpu_ctx *c, dsv3_err *e)
{
    size_t n = 8192, bytes = n * n * 2;
    gpu_bf16 *a = gpu_malloc(bytes, e), *b = a ? gpu_malloc(bytes, e) : NULL,
             *d = b ? gpu_malloc(bytes, e) : NULL;
    double best = -1;
    if (d) {
        gpu_bf16 *h = malloc(bytes);
        uint64_t z = 12345;
        for (size_t i = 0; i < n * n; i++) {
            z = z * 6364136223846793005ULL + 1442695040888963407ULL;
            h[i] = gpu_f2bf((float)((z >> 40) * 0x1p-24 * 2 - 1));
        }
        gpu_upload(c, a, h, bytes, e);
        gpu_upload(c, b, h, bytes, e);
        free(h);
        float ms[10];
        for (int i = -3; i < 10; i++) {
            gpu_timer t;
            float x = 0;
            if (gpu_timer_start(c, &t, e) ||
                gpu_gemm(c, 0, 1, (int)n, (int)n, (int)n, 1.0f, a, (int)n, b, (int)n, 0.0f, d, (int)n, 0, e) ||
                gpu_timer_stop(c, &t, &x, e))
                break;
            if (i >= 0)
                ms[i] = x;
        }
        for (int i = 0; i < 10; i++) /* insertion sort: ten values */
            for (int j = i; j > 0 && ms[j] < ms[j - 1]; j--) {
                float s = ms[j];
                ms[j] = ms[j - 1], ms[j - 1] = s;
            }
        best = 2.0 * n * n * n / (ms[5] * 1e-3);
    }
    gpu_free(a), gpu_free(b), gpu_free(d);
    return best;
}

typedef struct agg {
    char phase[12], name[64];
    int calls;
    double us;
} agg;

static int by_time(const void *a, const void *b)
{
    double x = ((const agg *)a)->us, y = ((const agg *)b)->us;
    return (x < y) - (x > y);
}

static int by_start(const void *a, const void *b)
{
    uint64_t x = ((const krec *)a)->start, y = ((const krec *)b)->start;
    return (x > y) - (x < y);
}

static int by_corr(const void *a, const void *b)
{
    uint32_t x = ((const arec *)a)->corr, y = ((const arec *)b)->corr;
    return x < y ? -1 : x > y;
}

/* When the host finished queueing the work with this correlation id (0: unknown). */
static uint64_t queued_at(uint32_t corr)
{
    arec key = {0, 0, corr};
    const arec *a = bsearch(&key, tr_.a, tr_.na, sizeof *tr_.a, by_corr);
    return a ? a->end : 0;
}

typedef struct gapagg {
    char pair[136];
    double us, host_us;
    int n;
} gapagg;

static int by_gap(const void *a, const void *b)
{
    double x = ((const gapagg *)a)->us, y = ((const gapagg *)b)->us;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* The device's idle time between kernels (records sorted by start), split by cause: "host"
 * where the next kernel's launch call returned after the device had gone idle (the host was
 * behind), the rest "device" (launch latency, dependencies). The gap at the sync that ends
 * the forward is printed apart. Rows: the largest gaps by (previous kernel -> next kernel). */
static void print_gaps(uint64_t t_fwd_end)
{
    qsort(tr_.a, tr_.na, sizeof *tr_.a, by_corr);
    gapagg *g = calloc(tr_.n, sizeof *g);
    size_t ng = 0;
    double tot = 0, host = 0, sync_gap = 0;
    int over10 = 0;
    uint64_t maxend = tr_.r[0].end;
    for (size_t i = 1; i < tr_.n; i++) {
        krec *r = &tr_.r[i];
        if (r->start > maxend) {
            double us = (r->start - maxend) * 1e-3;
            uint64_t q = queued_at(r->corr);
            double h = q > maxend ? (q - maxend) * 1e-3 : 0;
            if (h > us)
                h = us;
            if (maxend <= t_fwd_end && r->start > t_fwd_end) {
                sync_gap += us;
            } else {
                tot += us, host += h, over10 += us > 10;
                char pair[136];
                snprintf(pair, sizeof pair, "%s -> %s", tr_.r[i - 1].name, r->name);
                size_t j = 0;
                while (j < ng && strcmp(g[j].pair, pair))
                    j++;
                if (j == ng)
                    memcpy(g[ng++].pair, pair, sizeof pair);
                g[j].us += us, g[j].host_us += h, g[j].n++;
            }
        }
        if (r->end > maxend)
            maxend = r->end;
    }
    printf("# idle device between kernels: %.3f ms (host behind: %.3f ms, launch/dependency: "
           "%.3f ms; %d gaps over 10 us), plus %.3f ms at the sync after the forward; %zu "
           "runtime/driver calls traced\n",
           tot * 1e-3, host * 1e-3, (tot - host) * 1e-3, over10, sync_gap * 1e-3, tr_.na);
    qsort(g, ng, sizeof *g, by_gap);
    printf("## largest idle gaps by kernel pair (count, idle ms, of it host-behind ms)\n");
    for (size_t j = 0; j < ng && j < 25; j++)
        printf("gap %-100s %5d %8.3f %8.3f\n", g[j].pair, g[j].n, g[j].us * 1e-3,
               g[j].host_us * 1e-3);
    free(g);
}

static int has(const char *s, const char *sub) { return strstr(s, sub) != NULL; }

/* Kernel groups, each with a floor: FLOPs (matrix-bound) or bytes (memory-bound) of one
 * forward + backward of this config; 0 where no simple count is stated. */
enum { G_HEAD_GEMM, G_CE, G_ATT_F, G_ATT_B, G_MOE_F, G_MOE_D, G_MOE_W, G_DENSE, G_NORM,
       G_SWIGLU, G_MOE_MOVE, G_ROUTER, G_EMBED, G_ROPE, G_MLA, G_FP8_Q, G_OTHER, G_N };
static const char *gname_[G_N] = {
    "head GEMMs (logits, d_hidden, d_W; cuBLASLt)", "cross-entropy rows (head)",
    "attention fwd", "attention bwd (dot, dK/dV, dQ)", "MoE grouped GEMM fwd",
    "MoE grouped GEMM dgrad", "MoE grouped GEMM wgrad", "dense GEMMs (cuBLASLt, layers)",
    "RMSNorm fwd+bwd", "SwiGLU fwd+bwd", "MoE gather/combine (+bwd)",
    "router, plan, sort", "embedding fwd+bwd", "RoPE fwd+bwd",
    "MLA k/v assembly (+bwd), residual adds", "FP8 quantisation (acts, grads, weights)",
    "other (copies, memsets, axpy, ...)"};

static int group_of(const char *phase, const char *n)
{
    if (has(n, "ce_rows") || has(n, "ce_cluster"))
        return G_CE;
    /* the head's last wgrad can start after the head's index window: fwd-tail */
    if ((!strcmp(phase, "head") || !strcmp(phase, "fwd-tail")) && !has(n, "memset") &&
        !has(n, "k_"))
        return G_HEAD_GEMM;
    if (has(n, "quant") || has(n, "mf_tile_starts"))
        return G_FP8_Q;
    if (has(n, "fwd_kernel") || has(n, "fwd_pipe"))
        return G_ATT_F;
    /* f3_bwd_* (wgmma), ws_dkdv / ws_dq (warp-specialised, attention_wsb.cuh) */
    if (has(n, "bwd_dkdv") || has(n, "bwd_dq") || has(n, "ws_dkdv") || has(n, "ws_dq") ||
        has(n, "attn_bwd_dot"))
        return G_ATT_B;
    if (has(n, "moe_fp8")) /* FORM 0: fprop, and dgrad in the backward; 1: wgrad */
        return has(n, "<1>") ? G_MOE_W : !strcmp(phase, "bwd") ? G_MOE_D : G_MOE_F;
    if (has(n, "moe_wgmma_kernel") || has(n, "moe_gemm_kernel") || has(n, "moe_ws_kernel") ||
        has(n, "moe_wstma_kernel"))
        return has(n, "<0>") ? G_MOE_F : has(n, "<1>") ? G_MOE_D : G_MOE_W;
    if (has(n, "rmsnorm") || has(n, "sum_parts"))
        return G_NORM;
    if (has(n, "swiglu"))
        return G_SWIGLU;
    if (has(n, "gather") || has(n, "combine"))
        return G_MOE_MOVE;
    if (has(n, "router") || has(n, "plan_kernel") || has(n, "iota") || has(n, "Radix") ||
        has(n, "cub") || has(n, "Scan"))
        return G_ROUTER;
    if (has(n, "embedding"))
        return G_EMBED;
    if (has(n, "rope"))
        return G_ROPE;
    if (has(n, "mla_assemble") || has(n, "add_bf16") || !strcmp(n, "k_add"))
        return G_MLA;
    if (has(n, "nvjet") || has(n, "gemm") || has(n, "sm90") || has(n, "cutlass") ||
        has(n, "xmma") || has(n, "splitKreduce"))
        return G_DENSE;
    return G_OTHER;
}

int main(int argc, char **argv)
{
    int B = argc > 1 ? atoi(argv[1]) : 4, T = argc > 2 ? atoi(argv[2]) : 4096, N = B * T;
    dsv3_err e;
    dsv3_config c;
    if (B <= 0 || T <= 0) {
        fprintf(stderr, "usage: bench_train_kernels [B] [T]\n");
        return 2;
    }
    if (gpu_count() == 0) {
        fprintf(stderr, "bench_train_kernels: no GPU\n");
        return 1;
    }
    if (cupti_open())
        return 1;
    if (config_load(&c, "configs/1b-moe.json", &e)) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    c.num_nextn_predict_layers = 0;
    dsv3_model m;
    if (model_init(&m, &c, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    config_free(&c);
    fill_random(&m, 7);
    const dsv3_config *cf = &m.cfg;
    int V = cf->vocab_size;
    int32_t *ids = malloc((size_t)N * 4), *tg = malloc((size_t)N * 4);
    uint64_t z = 99;
    for (int i = 0; i < 2 * N; i++) {
        z = z * 6364136223846793005ULL + 1442695040888963407ULL;
        (i < N ? ids : tg)[i % N] = (int32_t)((z >> 33) % (uint64_t)V);
    }
    gmodel *g = NULL;
    double copy_gbs = 0;
    const char *f8 = getenv("DSV3_BENCH_FP8");
    int fp8 = f8 && *f8 ? atoi(f8) : 0;
    if (gmodel_create(&g, &m, B, T, 0, &e) || (fp8 && gmodel_set_fp8(g, fp8, &e)) ||
        gpu_copy_bandwidth(0, (size_t)1 << 30, 20, &copy_gbs, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    gpu_ctx *x = gmodel_ctx(g);
    double ceil = gemm_ceiling(x, &e);
    if (ceil <= 0) {
        fprintf(stderr, "gemm ceiling: %s\n", e.msg);
        return 1;
    }
    /* phase boundaries: the host's CUPTI timestamps are on the device's clock domain only
     * after a sync, so each phase ends with one (the traced step is otherwise the same) */
    uint64_t t_fwd_end = 0;
    float step_ms = 0;
    for (int it = 0; it < 3; it++) {
        double sum;
        gpu_timer tm;
        if (it == 2)
            trace_on(1);
        if (gpu_timer_start(x, &tm, &e) || gmodel_forward(g, ids, tg, 1, NULL, &e) ||
            gpu_sync(x, &e)) {
            fprintf(stderr, "%s\n", e.msg);
            return 1;
        }
        if (it == 2) {
            cu_.flush(1);
            t_fwd_end = tr_.n ? tr_.r[tr_.n - 1].end : 0;
        }
        if (gmodel_backward(g, &e) || gmodel_take_stats(g, &sum, NULL, &e) ||
            gpu_timer_stop(x, &tm, &step_ms, &e)) {
            fprintf(stderr, "%s\n", e.msg);
            return 1;
        }
    }
    trace_on(0);
    cu_.flush(1);
    size_t n = tr_.n;
    qsort(tr_.r, n, sizeof *tr_.r, by_start);
    if (!n) {
        fprintf(stderr, "bench_train_kernels: no kernel records\n");
        return 1;
    }
    /* the head: from the GEMM before the first cross-entropy to the wgrad after the last */
    size_t first_ce = n, last_ce = 0;
    for (size_t i = 0; i < n; i++)
        if (tr_.r[i].end <= t_fwd_end && group_of("", tr_.r[i].name) == G_CE) {
            if (first_ce == n)
                first_ce = i;
            last_ce = i;
        }
    uint64_t t0 = tr_.r[0].start, t1 = 0;
    double busy = 0;
    agg *a = calloc(n, sizeof *a);
    size_t na = 0;
    double gus[G_N] = {0};
    int gcalls[G_N] = {0};
    for (size_t i = 0; i < n; i++) {
        krec *r = &tr_.r[i];
        const char *ph = r->end > t_fwd_end ? "bwd"
                         : first_ce < n && i + 1 >= first_ce && i <= last_ce + 2 ? "head"
                         : first_ce < n && i > last_ce + 2 ? "fwd-tail" : "fwd";
        double us = (r->end - r->start) * 1e-3;
        busy += us;
        if (r->end > t1)
            t1 = r->end;
        int gi = group_of(ph, r->name);
        gus[gi] += us;
        gcalls[gi]++;
        size_t j = 0;
        while (j < na && !(strcmp(a[j].phase, ph) == 0 && strcmp(a[j].name, r->name) == 0))
            j++;
        if (j == na) {
            snprintf(a[j].phase, sizeof a[j].phase, "%s", ph);
            memcpy(a[j].name, r->name, sizeof a[j].name);
            na++;
        }
        a[j].calls++;
        a[j].us += us;
    }
    double span = (t1 - t0) * 1e-3;
    qsort(a, na, sizeof *a, by_time);
    printf("# kernels 1B-MoE B=%d T=%d %s: traced fwd+bwd %.2f ms (event-timed %.2f ms, with a "
           "sync after the forward), kernels busy %.2f ms, %zu kernels; ceilings in this "
           "process: bf16 GEMM 8192^3 %.1f TFLOP/s, copy %.0f GB/s\n",
           B, T, fp8 == 1 ? "fp8-all" : fp8 == 2 ? "fp8-pays" : "bf16", span * 1e-3, step_ms,
           busy * 1e-3, n, ceil / 1e12, copy_gbs);
    print_gaps(t_fwd_end);
    printf("## per kernel (phase, name, calls, ms, share of kernel time)\n");
    for (size_t j = 0; j < na; j++)
        printf("k %-8s %-44s %5d %9.3f %6.2f%%\n", a[j].phase, a[j].name, a[j].calls,
               a[j].us * 1e-3, 100 * a[j].us / busy);

    /* floors (one forward + backward of N tokens) */
    double H = cf->hidden_size, Vd = V, K = cf->num_experts_per_tok, mi = cf->moe_intermediate_size;
    int nl = cf->num_hidden_layers, nd = cf->first_k_dense_replace, nm = nl - nd;
    double nh = cf->num_attention_heads, dq = config_qk_head_dim(cf), dv = cf->v_head_dim;
    double ql = cf->q_lora_rank, kv = cf->kv_lora_rank, I = cf->intermediate_size;
    double si = mi * cf->n_shared_experts;
    config_counts cn;
    config_count_params(cf, &cn);
    double fl[G_N] = {0}, by[G_N] = {0};
    fl[G_HEAD_GEMM] = 3 * 2.0 * N * H * Vd;
    by[G_CE] = (double)N * Vd * (4 + 2); /* fp32 logits read once, bf16 gradient written */
    /* causal attention of every layer (fwd 2 B nh T(T+1)/2 (dq + dv), bwd 2.5x) */
    double att = 2.0 * B * nh * (double)T * (T + 1) / 2 * (dq + dv) * nl;
    fl[G_ATT_F] = att, fl[G_ATT_B] = 2.5 * att;
    double moe = 2.0 * N * K * 3 * mi * H * nm; /* gate-up + down, one pass */
    fl[G_MOE_F] = fl[G_MOE_D] = fl[G_MOE_W] = moe;
    fl[G_DENSE] = 6.0 * cn.active * N - fl[G_HEAD_GEMM] - 3 * moe - 6.0 * N * H;
    /* RMSNorm per layer: attention and FFN norms (H), q_a (ql), kv_a (kv); the final norm.
     * fwd: x read, y written (bf16); bwd: x, dy read, dx written */
    double normdims = nl * (2 * H + ql + kv) + H;
    by[G_NORM] = (double)N * normdims * 2 * (2 + 3);
    /* SwiGLU: fwd reads g,u writes h; bwd reads g,u,dh writes dg,du: 8 values a unit */
    by[G_SWIGLU] = (double)N * 2 * 8 * (nd * I + nm * (K * mi + si));
    /* gather fwd (x read once, K rows written) + combine fwd (K rows read, y written) and the
     * backwards the same again: (1 + K) + (K + 1) rows of H each way */
    by[G_MOE_MOVE] = (double)N * H * 2 * 2 * 2 * (1 + K) * nm;
    /* embedding fwd: rows written and read; bwd: d rows read, fp32 rows read and written */
    by[G_EMBED] = (double)N * H * (2 + 2 + 2 + 8);
    /* MLA assembly: kvb (nope + dv a head) and the rope key read, k (qk) and v (dv) written;
     * the transpose the other way; each residual add reads two N x H rows, writes one */
    double rope = cf->qk_rope_head_dim, nope = cf->qk_nope_head_dim;
    int adds = 0;
    for (size_t i = 0; i < n; i++)
        adds += has(tr_.r[i].name, "add_bf16") || !strcmp(tr_.r[i].name, "k_add");
    by[G_MLA] = nl * 2.0 * 2 * N * (nh * (nope + dv + dq + dv) + rope) + adds * 6.0 * N * H;
    printf("## per group (calls, ms, share of kernel time, floor: FLOPs or bytes, floor ms, "
           "floor/time)\n");
    for (int gi = 0; gi < G_N; gi++) {
        double ms = gus[gi] * 1e-3, fms = fl[gi] ? fl[gi] / ceil * 1e3 : by[gi] ? by[gi] / (copy_gbs * 1e9) * 1e3 : 0;
        char fb[48] = "-";
        if (fl[gi])
            snprintf(fb, sizeof fb, "%.2f TFLOP", fl[gi] / 1e12);
        else if (by[gi])
            snprintf(fb, sizeof fb, "%.2f GB", by[gi] / 1e9);
        printf("g %-50s|%5d|%9.3f|%6.2f%%|%14s|%8.3f|%6.1f%%\n", gname_[gi], gcalls[gi], ms,
               100 * gus[gi] / busy, fb, fms, ms > 0 && fms > 0 ? 100 * fms / ms : 0.0);
    }
    /* the FLOP count of test_gmodel's bench and bench-train.sh (every layer's attention) */
    double tot = 6.0 * cn.active * N + 3 * att;
    printf("# model FLOPs of the step %.2f TFLOP (6 x %.1fM activated x N + 3 x attention of "
           "%d layers): %.1f%% MFU over the traced span\n",
           tot / 1e12, cn.active / 1e6, nl, 100 * tot / (span * 1e-6) / ceil);
    gmodel_destroy(g);
    model_free(&m);
    free(ids), free(tg), free(a), free(tr_.r), free(tr_.a);
    return 0;
}
#endif
