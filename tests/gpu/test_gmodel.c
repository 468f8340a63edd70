/* GPU test of kernels/gmodel: the whole model's loss and every parameter gradient on the
 * GPU against lib/model's CPU forward/backward, same weights (rounded to bf16 first, so
 * both sides start from the same numbers) and the same batch.
 *
 * Routing is held comparable, since a token whose top-k choice flips between the fp32 CPU
 * and the bf16 GPU would change its expert outputs by O(1): (a) configs where every token
 * takes every expert (num_experts_per_tok = n_routed_experts, all groups), so the router's
 * weights and gradients and the grouped GEMMs over full experts are compared with the
 * choice fixed; (b) the tiny config's sparse top-2 of 8 with correction biases that make
 * experts 0 and 5 win by a wide margin for every token (the bias steers selection only), so
 * the dispatch runs with six empty experts. The router's own top-k choice is compared
 * against lib/ops in test_moe (0 mismatches). Expert loads must agree exactly.
 *
 * Bounds: loss within 1e-2 relative; all gradients together within 2e-2 relative L2, and
 * each tensor within 5e-2. The GPU stores every activation and every activation gradient
 * in bf16 (2^-9 relative each) where the CPU keeps fp32, and a weight's gradient passes
 * through a dozen such roundings between the loss and itself: measured on an H200 (3 runs),
 * 0.9e-2 .. 1.2e-2 over all and 1.4e-2 .. 1.8e-2 for the worst tensor (a q_a_proj or
 * q_a_layernorm, at the end of the longest chain), while the losses agree to 1e-4.
 * Tensors with no gradient on the CPU (MTP modules when off, correction biases) must have
 * none on the GPU.
 *
 * The whole loss: cases with the MTP modules (lambda 0.3, depth 1 and 2), the sequence-wise
 * balance loss (alpha 0.1, large enough that its share of the router's gradient shows; it
 * is exercised by the sparse forced routing only: with K = E every f_i is 1 and its
 * gradient vanishes), ragged packed documents (gmodel_set_segments vs
 * model_acts_set_segments: attention masked by document, positions restarting, MTP
 * placeholders at each document's end), and step normalisers (norm_main, norm_mtp,
 * norm_seqs) other than the forward's own counts. Each part of the loss (main, MTP per
 * module, balance) is compared, and the MTP blocks' expert loads. A documents case runs
 * again under GMODEL_NONDET (the fused attention backward, its accumulator in the arena). */
#include <math.h>

#include "../../kernels/gemm.h"
#include "../../kernels/gmodel.h"
#include "../../lib/model.h"
#include "../../kernels/moe.h"
#include "bench.h"
#include "fp8_config.h"

#include <time.h>

typedef struct gm_case {
    const char *name;
    int B, T;
    int all_experts;      /* K = E, all groups */
    int forced;           /* sparse, biased towards experts 0 and 5 */
    int big;              /* wider model: head dims 96/64, 16 experts, vocab 1000 */
    float mtp;            /* MTP loss weight (0: off) */
    int depth;            /* MTP modules (0: the config's) */
    float alpha;          /* balance loss weight (0: off) */
    int docs;             /* ragged packed documents */
    int norms;            /* step normalisers larger than this forward's counts */
    unsigned flags;       /* gmodel_create_opt's */
} gm_case;

static int load_cfg(dsv3_config *c, const gm_case *k, dsv3_err *e)
{
    /* big: the FP8-sized config (multiples of 128), the one the FP8 tests use */
    if (k->big ? fp8_sized_config(c, e) : config_load(c, "configs/tiny.json", e))
        return -1;
    if (k->all_experts) {
        c->num_experts_per_tok = c->n_routed_experts;
        c->topk_group = c->n_group;
    }
    if (k->depth)
        c->num_nextn_predict_layers = k->depth;
    return 0;
}

static void run_case(const gm_case *k)
{
    dsv3_err e;
    dsv3_config c;
    REQUIRE(load_cfg(&c, k, &e) == 0);
    dsv3_model m;
    CHECKF(model_init(&m, &c, &e) == 0, "%s", e.msg);
    config_free(&c);
    if (test_failed_)
        return;
    model_init_random(&m, test_rand(), 0.05);
    for (size_t i = 0; i < m.n_params; i++)
        m.params[i] = gpu_bf2f(gpu_f2bf(m.params[i]));
    const dsv3_config *cf = &m.cfg;
    int D = cf->num_nextn_predict_layers;
    for (int l = 0; l < cf->num_hidden_layers + D; l++) {
        model_layer *L = l < cf->num_hidden_layers ? &m.w.layers[l]
                                                   : &m.w.mtp[l - cf->num_hidden_layers].block;
        if (!L->router)
            continue;
        if (k->forced) {
            L->router_bias[0] = 10.0f;
            L->router_bias[5] = 10.0f;
        } else {
            for (int x = 0; x < cf->n_routed_experts; x++)
                L->router_bias[x] = (float)(test_rand() % 100) * 1e-3f;
        }
    }
    int B = k->B, T = k->T, N = B * T, V = cf->vocab_size;
    int32_t *ids = malloc((size_t)N * 4), *tg = malloc((size_t)N * 4);
    int32_t *seg = malloc((size_t)N * 4), *pos = malloc((size_t)N * 4);
    for (int i = 0; i < N; i++) {
        ids[i] = (int32_t)(test_rand() % (uint64_t)V);
        tg[i] = test_rand() % 9 == 0 ? -1 : (int32_t)(test_rand() % (uint64_t)V);
    }
    /* ragged documents (1 to 30 tokens, some of one token), numbered on across rows;
     * a document's last target is the next one's first token: ignored, as lib/train does */
    int32_t doc = 3;
    for (int b = 0; b < B; b++)
        for (int t = 0, left = 0; t < T; t++) {
            if (!left) {
                doc++;
                left = test_rand() % 5 == 0 ? 1 : 1 + (int)(test_rand() % 30);
            }
            seg[b * T + t] = doc;
            pos[b * T + t] = t && seg[b * T + t - 1] == doc ? pos[b * T + t - 1] + 1 : 0;
            left--;
        }
    for (int i = 0; k->docs && i + 1 < N; i++)
        if ((i + 1) % T && seg[i + 1] != seg[i])
            tg[i] = -1;
    int64_t nmain, nmtp[8];
    model_count_targets(&m, tg, k->docs ? seg : NULL, B, T, &nmain, nmtp);
    if (k->norms) {
        m.norm_main = nmain + 17;
        for (int d = 0; d < D && d < 8; d++)
            nmtp[d] += 5 + d;
        m.norm_mtp = nmtp;
        m.norm_seqs = B + 2;
    }
    m.mtp_lambda = k->mtp;
    m.balance_alpha = k->alpha;
    /* CPU reference */
    model_acts *a = model_acts_new(&m, B, T, &e);
    float cl = 0, gl = 0;
    REQUIRE(a);
    CHECK(model_acts_set_segments(a, k->docs ? seg : NULL, k->docs ? pos : NULL) == 0);
    CHECKF(model_forward(&m, a, ids, tg, &cl, &e) == 0 && model_backward(&m, a, ids, tg, &e) == 0,
           "%s", e.msg);
    model_losses lc, lg;
    model_acts_losses(a, &lc);
    /* GPU */
    gmodel *g = NULL;
    float *gg = malloc(m.n_params * 4);
    CHECKF(gmodel_create_opt(&g, &m, B, T, 0, k->flags, &e) == 0, "%s", e.msg);
    if (g) {
        CHECKF(gmodel_set_segments(g, k->docs ? seg : NULL, k->docs ? pos : NULL, &e) == 0 &&
                   gmodel_forward(g, ids, tg, 1, &gl, &e) == 0 && gmodel_backward(g, &e) == 0 &&
                   gmodel_get_grads(g, gg, &e) == 0,
               "%s", e.msg);
        gmodel_losses(g, &lg);
    }
    if (!test_failed_) {
        double dl = fabs(gl - cl) / fabs(cl);
        printf("# %s: N %d, loss cpu %.6f gpu %.6f, rel %.2e, arena %.1f MiB\n", k->name, N, cl,
               gl, dl, gmodel_arena_peak(g) / 1048576.0);
        char nm[96];
        snprintf(nm, sizeof nm, "gmodel %s loss", k->name);
        gt_stat(nm, dl, 1e-2);
        CHECK(dl <= 1e-2);
        /* the parts of the loss */
        double parts[][2] = {{lc.main, lg.main}, {lc.mtp, lg.mtp}, {lc.balance, lg.balance},
                             {lc.total, lg.total}};
        const char *pn[] = {"main", "mtp", "balance", "total"};
        for (int i = 0; i < 4; i++) {
            double r = parts[i][0], d = parts[i][1];
            double rel = r != 0 ? fabs(d - r) / fabs(r) : fabs(d);
            printf("# %s: loss %s cpu %.6g gpu %.6g rel %.2e\n", k->name, pn[i], r, d, rel);
            CHECKF(rel <= 1e-2, "%s loss %s: cpu %g gpu %g", k->name, pn[i], r, d);
            if (i > 0 && i < 3 && r != 0) {
                snprintf(nm, sizeof nm, "gmodel %s loss %s", k->name, pn[i]);
                gt_stat(nm, rel, 1e-2);
            }
        }
        CHECKF((lc.mtp != 0) == (k->mtp > 0) && (lc.balance != 0) == (k->alpha > 0),
               "loss parts on/off: mtp %g balance %g", lc.mtp, lc.balance);
        for (int d = 0; d < D && d < 8; d++)
            CHECKF(fabs(lg.mtp_k[d] - lc.mtp_k[d]) <= 1e-2 * fabs(lc.mtp_k[d]),
                   "MTP module %d loss cpu %g gpu %g", d, lc.mtp_k[d], lg.mtp_k[d]);
        /* expert loads */
        int64_t *c1 = calloc((size_t)cf->n_routed_experts, 8);
        int64_t *c2 = calloc((size_t)cf->n_routed_experts, 8);
        int mism = 0;
        for (int l = 0; l < cf->num_hidden_layers; l++) {
            int r1 = model_expert_load(&m, a, l, c1), r2 = gmodel_expert_load(g, l, c2);
            CHECK(r1 == r2);
            for (int x = 0; r1 == 0 && r2 == 0 && x < cf->n_routed_experts; x++)
                mism += c1[x] != c2[x];
        }
        for (int d = 0; d < D; d++) {
            int64_t s1 = -1, s2 = -2;
            int r1 = model_mtp_expert_load(&m, a, d, c1, &s1);
            int r2 = gmodel_mtp_expert_load(g, d, c2, &s2, &e);
            CHECKF((r1 == 0) == (r2 == 0) && r2 >= 0, "MTP %d load: cpu %d gpu %d", d, r1, r2);
            if (r1 == 0 && r2 == 0) {
                mism += s1 != s2;
                for (int x = 0; x < cf->n_routed_experts; x++)
                    mism += c1[x] != c2[x];
            }
        }
        free(c1);
        free(c2);
        CHECKF(mism == 0, "%d expert loads differ", mism);
        /* gradients */
        double se = 0, sr = 0, worst = 0;
        const char *wn = "";
        for (int t = 0; t < m.n_t; t++) {
            const model_tensor *tt = &m.t[t];
            double te = 0, tr = 0, tgn = 0;
            for (int64_t i = 0; i < tt->numel; i++) {
                double r = m.grads[tt->off + i], d = gg[tt->off + i];
                te += (d - r) * (d - r);
                tr += r * r;
                tgn += d * d;
                if (!isfinite(d))
                    te = INFINITY;
            }
            se += te;
            sr += tr;
            if (tr == 0) {
                CHECKF(tgn == 0, "%s: CPU gradient 0, GPU norm %g", tt->name, sqrt(tgn));
                continue;
            }
            double rel = sqrt(te / tr);
            if (!(rel <= worst)) {
                worst = rel;
                wn = tt->name;
            }
            CHECKF(rel <= 5e-2, "%s: relative L2 %.3e", tt->name, rel);
        }
        double all = sqrt(se / sr);
        printf("# %s: gradients relative L2 %.2e over all, worst tensor %.2e (%s)\n", k->name,
               all, worst, wn);
        snprintf(nm, sizeof nm, "gmodel %s grads (all)", k->name);
        gt_stat(nm, all, 2e-2);
        snprintf(nm, sizeof nm, "gmodel %s grads (worst tensor)", k->name);
        gt_stat(nm, worst, 5e-2);
        CHECK(all <= 2e-2);
    }
    gmodel_destroy(g);
    model_acts_free(a);
    model_free(&m);
    free(gg);
    free(ids);
    free(tg);
    free(seg);
    free(pos);
}

static void tiny_all_experts(void)
{
    if (gpu_count() == 0)
        SKIP("no GPU%s", gpu_compiled() ? "" : " (CPU-only build)");
    gm_case k = {"tiny K=E", 2, 37, 1, 0, 0, 0, 0, 0, 0, 0, 0};
    run_case(&k);
}

static void tiny_sparse_forced(void)
{
    if (gpu_count() == 0)
        SKIP("no GPU%s", gpu_compiled() ? "" : " (CPU-only build)");
    gm_case k = {"tiny top-2 forced", 3, 20, 0, 1, 0, 0, 0, 0, 0, 0, 0};
    run_case(&k);
}

static void bigger_all_experts(void)
{
    if (gpu_count() == 0)
        SKIP("no GPU%s", gpu_compiled() ? "" : " (CPU-only build)");
    gm_case k = {"wide K=E", 3, 100, 1, 0, 1, 0, 0, 0, 0, 0, 0};
    run_case(&k);
}

/* The whole loss: MTP, balance loss, documents, step normalisers. */
static void tiny_forced_all_losses(void)
{
    if (gpu_count() == 0)
        SKIP("no GPU%s", gpu_compiled() ? "" : " (CPU-only build)");
    gm_case k = {"tiny forced MTP+bal+docs", 3, 40, 0, 1, 0, 0.3f, 0, 0.1f, 1, 1, 0};
    run_case(&k);
    gm_case k2 = {"tiny forced MTP D=2+bal", 2, 33, 0, 1, 0, 0.3f, 2, 0.1f, 0, 0, 0};
    run_case(&k2);
}

static void tiny_all_experts_mtp_docs(void)
{
    if (gpu_count() == 0)
        SKIP("no GPU%s", gpu_compiled() ? "" : " (CPU-only build)");
    gm_case k = {"tiny K=E MTP D=2+docs", 2, 70, 1, 0, 0, 0.3f, 2, 0.0f, 1, 1, 0};
    run_case(&k);
}

static void wide_mtp_docs(void)
{
    if (gpu_count() == 0)
        SKIP("no GPU%s", gpu_compiled() ? "" : " (CPU-only build)");
    gm_case k = {"wide K=E MTP+docs", 2, 150, 1, 0, 1, 0.3f, 0, 0.0f, 1, 1, 0};
    run_case(&k);
    /* head dims 96/64: GMODEL_NONDET takes the fused attention backward (on Hopper) */
    gm_case k2 = {"wide K=E MTP+docs nondet", 2, 300, 1, 0, 1, 0.3f, 0, 0.0f, 1, 1,
                  GMODEL_NONDET};
    run_case(&k2);
}

/* Bad input: an id outside the vocabulary, bad documents; backward without a forward. */
static void refuses(void)
{
    if (gpu_count() == 0)
        SKIP("no GPU%s", gpu_compiled() ? "" : " (CPU-only build)");
    dsv3_err e;
    dsv3_config c;
    gm_case k = {"tiny", 1, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    REQUIRE(load_cfg(&c, &k, &e) == 0);
    dsv3_model m;
    REQUIRE(model_init(&m, &c, &e) == 0);
    config_free(&c);
    gmodel *g = NULL;
    int32_t ids[8] = {1, 2, 3, 4, 5, 6, 7, 8}, tg[8] = {2, 3, 4, 5, 6, 7, 8, 9};
    float loss;
    CHECKF(gmodel_create(&g, &m, 1, 8, 0, &e) == 0, "%s", e.msg);
    if (g) {
        ids[3] = m.cfg.vocab_size;
        CHECK(gmodel_forward(g, ids, tg, 1, &loss, &e) != 0 && strstr(e.msg, "vocabulary"));
        ids[3] = 4;
        int32_t seg[8] = {0, 0, 1, 1, 0, 2, 2, 2}, pos[8] = {0, 1, 0, 1, 0, 0, 1, 8};
        CHECK(gmodel_set_segments(g, seg, NULL, &e) != 0 && strstr(e.msg, "decrease"));
        CHECK(gmodel_set_segments(g, NULL, pos, &e) != 0 && strstr(e.msg, "position"));
        CHECK(gmodel_backward(g, &e) != 0);
        CHECKF(gmodel_forward(g, ids, tg, 1, &loss, &e) == 0, "%s", e.msg);
        CHECK(fabsf(loss - logf((float)m.cfg.vocab_size)) < 1e-3f);  /* zero weights */
    }
    gmodel_destroy(g);
    model_free(&m);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Uniform weights of the config's std (fast, parallel; routing then spreads over the
 * experts as trained weights do, unlike zeros), norms one, correction biases zero. */
static void fast_random(dsv3_model *m, uint64_t seed)
{
    double a = m->cfg.initializer_range * sqrt(3.0);
    for (int t = 0; t < m->n_t; t++) {
        const model_tensor *tt = &m->t[t];
        size_t n = strlen(tt->name);
        int norm = n > 11 && !strcmp(tt->name + n - 11, "norm.weight");
        float *p = m->params + tt->off;
#pragma omp parallel for
        for (int64_t i = 0; i < tt->numel; i++) {
            uint64_t z = seed + (tt->off + (uint64_t)i) * 0x9e3779b97f4a7c15ULL;
            z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
            z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
            z ^= z >> 31;
            p[i] = norm ? 1.0f : !tt->trainable ? 0.0f
                                              : (float)(((z >> 11) * 0x1p-53 * 2 - 1) * a);
        }
    }
}

typedef struct gemm_job {
    gpu_bf16 *a, *b, *c;
    int n;
} gemm_job;

static int gemm_run(void *arg, dsv3_err *e)
{
    gemm_job *j = arg;
    return gpu_gemm(gt_ctx_, 0, 1, j->n, j->n, j->n, 1.0f, j->a, j->n, j->b, j->n, 0.0f, j->c,
                    j->n, 0, e);
}

/* DSV3_GPU_BENCH=1: forward + backward of the 1B-class MoE (configs/1b-moe.json, MTP off)
 * over B x T tokens (DSV3_GMODEL_B, default 4; DSV3_GMODEL_T, default 4096) with random
 * weights; tokens/s and MFU against the bf16 GEMM rate of an 8192^3 product measured here.
 * FLOPs: 6 * activated parameters * tokens (config_count_params: the head included, one
 * embedding row) + causal attention 3 * 2 * B * nh * T(T+1)/2 * (dk + dv) in every layer
 * (before 2026-11-27 evening one layer's attention was counted: MFU figures read ~20% low). */
static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void bench_1b_moe(void)
{
    if (!gt_bench())
        SKIP("DSV3_GPU_BENCH not set");
    GT_NEED_GPU();
    dsv3_err e;
    const char *sb = getenv("DSV3_GMODEL_B"), *st = getenv("DSV3_GMODEL_T");
    int B = sb ? atoi(sb) : 4, T = st ? atoi(st) : 4096, N = B * T;
    gemm_job j = {gb_random_bf((size_t)8192 * 8192, 1), gb_random_bf((size_t)8192 * 8192, 1),
                  gb_random_bf((size_t)8192 * 8192, 1), 8192};
    REQUIRE(j.a && j.b && j.c);
    float gms = gb_time(gemm_run, &j, 10);
    double ceiling = 2.0 * 8192 * 8192 * 8192 / (gms * 1e-3);
    gpu_free(j.a), gpu_free(j.b), gpu_free(j.c);
    printf("# bench gemm 8192^3 bf16 %.3f ms %.1f TFLOP/s (the ceiling)\n", gms, ceiling / 1e12);
    dsv3_config c;
    REQUIRE(config_load(&c, "configs/1b-moe.json", &e) == 0);
    c.num_nextn_predict_layers = 0;
    dsv3_model m;
    CHECKF(model_init(&m, &c, &e) == 0, "%s", e.msg);
    config_free(&c);
    if (test_failed_)
        return;
    fast_random(&m, test_rand());
    int V = m.cfg.vocab_size;
    int32_t *ids = malloc((size_t)N * 4), *tg = malloc((size_t)N * 4);
    for (int i = 0; i < N; i++) {
        ids[i] = (int32_t)(test_rand() % (uint64_t)V);
        tg[i] = (int32_t)(test_rand() % (uint64_t)V);
    }
    gmodel *g = NULL;
    double t0 = now_s();
    CHECKF(gmodel_create(&g, &m, B, T, 0, &e) == 0, "%s", e.msg);
    double t_create = now_s() - t0;
    double ts[4] = {0}, t_get = 0;
    float loss = 0;
    /* variant 1 first: the earlier path (cuBLAS grouped GEMM with host-side sizes, the loss
     * read back each forward), then the default (our grouped GEMM, nothing waits for the
     * device until the step's sums are read); each iteration ends with a sync. host_ms: how
     * long the host took to queue the default's forward + backward. */
    for (int variant = 1; variant >= 0 && g && !test_failed_; variant--) {
        gpu_moe_set_gemm(gmodel_ctx(g), variant ? GPU_MOE_GEMM_CUBLAS : GPU_MOE_GEMM_DEFAULT);
        double tq[4] = {0};
        for (int it = 0; it < 4 && !test_failed_; it++) {
            double sum = 0;
            t0 = now_s();
            CHECKF(gmodel_forward(g, ids, tg, 1, variant ? &loss : NULL, &e) == 0 &&
                       gmodel_backward(g, &e) == 0,
                   "%s", e.msg);
            tq[it] = now_s() - t0;
            CHECKF((variant || gmodel_take_stats(g, &sum, NULL, &e) == 0) &&
                       gpu_sync(gmodel_ctx(g), &e) == 0,
                   "%s", e.msg);
            ts[it] = now_s() - t0;
            if (!variant)
                loss = (float)(sum / N);
        }
        qsort(ts + 1, 3, sizeof *ts, cmp_d);
        qsort(tq + 1, 3, sizeof *tq, cmp_d);
        if (variant && !test_failed_)
            printf("# bench gmodel 1B-MoE B=%d T=%d before (cuBLAS grouped, host syncs): fwd+bwd "
                   "%.1f ms (median of 3), %.0f tokens/s\n", B, T, ts[2] * 1e3, N / ts[2]);
        else if (!test_failed_)
            printf("# bench gmodel 1B-MoE host queueing of fwd+bwd %.1f ms of %.1f ms\n",
                   tq[2] * 1e3, ts[2] * 1e3);
    }
    if (g && !test_failed_) {
        t0 = now_s();
        CHECKF(gmodel_get_grads(g, m.grads, &e) == 0, "%s", e.msg);
        t_get = now_s() - t0;
        t0 = now_s();
        CHECKF(gmodel_set_params(g, m.params, &e) == 0, "%s", e.msg);
        t_create = now_s() - t0;
    }
    if (!test_failed_) {
        double med = ts[2]; /* ts[1..3] sorted above */
        config_counts cn;
        config_count_params(&m.cfg, &cn);
        const dsv3_config *cf = &m.cfg;
        double attn = 3.0 * 2 * B * cf->num_attention_heads * (double)T * (T + 1) / 2 *
                      (config_qk_head_dim(cf) + cf->v_head_dim) * cf->num_hidden_layers;
        double flops = 6.0 * (double)cn.active * N + attn;
        printf("# bench gmodel 1B-MoE B=%d T=%d: fwd+bwd %.1f ms (median of 3), %.0f tokens/s, "
               "%.1f TFLOP/s, MFU %.1f%% (activated %.1fM params, %.3g FLOP/token, attention "
               "%.1f%%), loss %.3f, arena peak %.1f GiB\n",
               B, T, med * 1e3, N / med, flops / med / 1e12, 100 * flops / med / ceiling,
               cn.active / 1e6, flops / N, 100 * attn / flops, loss,
               gmodel_arena_peak(g) / 1073741824.0);
        printf("# bench gmodel 1B-MoE host transfers: grads to host %.0f ms, params to device "
               "%.0f ms (%.2fB params)\n",
               t_get * 1e3, t_create * 1e3, m.n_params / 1e9);
        printf("# bench flops_per_token %.6g ceiling_tflops %.2f\n", flops / N, ceiling / 1e12);
    }
    gmodel_destroy(g);
    model_free(&m);
    free(ids);
    free(tg);
}

int main(void)
{
    test_seed();
    RUN(tiny_all_experts);
    RUN(tiny_sparse_forced);
    RUN(bigger_all_experts);
    RUN(tiny_forced_all_losses);
    RUN(tiny_all_experts_mtp_docs);
    RUN(wide_mtp_docs);
    RUN(refuses);
    RUN(bench_1b_moe);
    if (gt_ctx_)
        gpu_ctx_destroy(gt_ctx_);
    TEST_EXIT();
}
