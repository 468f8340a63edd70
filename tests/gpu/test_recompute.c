/* GPU test of gmodel's recomputation (GMODEL_RECOMPUTE, dsv3-train --recompute): the same
 * model and batch through gmodel with every activation kept and with RMSNorm outputs and MLA
 * up-projections made again in backward, against each other and against lib/model's CPU
 * forward/backward.
 *
 * Recomputation runs the same kernels on the same inputs as the forward did, so the losses
 * and every gradient must be the same bits as without it (checked element by element; the
 * cuBLASLt and attention kernels are deterministic, layers.h / moe.h / attention.cu). Against
 * the CPU the bounds are test_gmodel's (loss 1e-2 relative, all gradients 2e-2 relative L2,
 * each tensor 5e-2). The activation memory (the arena's peak over a step) must shrink.
 * Cases cover what touches the recomputed buffers: sparse MoE (the expert-order copy of the
 * FFN input), dense layers, MTP blocks, ragged packed documents (masked attention, positions
 * restarting: RoPE recomputed with them), the balance loss, q without a LoRA (q_lora_rank
 * null: q from xn directly), and FP8 linear layers (the recomputed products quantise again).
 *
 * DSV3_GPU_BENCH=1: the 1B-class MoE (configs/1b-moe.json, MTP off) over B x T tokens
 * (DSV3_GMODEL_B, default 4; DSV3_GMODEL_T, default 4096) with and without recomputation in
 * the same process: forward + backward time (median of 3 after a warm-up) and arena peak. */
#include <math.h>
#include <time.h>

#include "../../kernels/gmodel.h"
#include "../../lib/model.h"
#include "fp8_config.h"
#include "gpu_test.h"

typedef struct rc_case {
    const char *name;
    int B, T;
    int big;          /* wider: head dims 96/64, 16 experts, vocab 1000 */
    int all_experts;  /* K = E, all groups */
    int forced;       /* sparse, biased towards experts 0 and 5 */
    int dense;        /* dense layers only */
    int no_qlora;     /* q_lora_rank null */
    float mtp, alpha;
    int docs;
    int fp8;          /* FP8 linear layers: compared keep vs recompute only */
} rc_case;

static int make_model(dsv3_model *m, const rc_case *k, dsv3_err *e)
{
    dsv3_config c;
    if ((k->big ? fp8_sized_config(&c, e) : config_load(&c, "configs/tiny.json", e)))
        return -1;
    if (k->all_experts) {
        c.num_experts_per_tok = c.n_routed_experts;
        c.topk_group = c.n_group;
    }
    if (k->dense)
        c.first_k_dense_replace = c.num_hidden_layers;
    if (k->no_qlora)
        c.q_lora_rank = 0;
    int rc = model_init(m, &c, e);
    config_free(&c);
    if (rc)
        return -1;
    model_init_random(m, test_rand(), 0.05);
    for (size_t i = 0; i < m->n_params; i++)
        m->params[i] = gpu_bf2f(gpu_f2bf(m->params[i]));
    const dsv3_config *cf = &m->cfg;
    int D = cf->num_nextn_predict_layers;
    for (int l = 0; l < cf->num_hidden_layers + D; l++) {
        model_layer *L = l < cf->num_hidden_layers ? &m->w.layers[l]
                                                   : &m->w.mtp[l - cf->num_hidden_layers].block;
        if (!L->router)
            continue;
        for (int x = 0; x < cf->n_routed_experts; x++)
            L->router_bias[x] = k->forced ? (x == 0 || x == 5 ? 10.0f : 0.0f)
                                          : (float)(test_rand() % 100) * 1e-3f;
    }
    return 0;
}

/* Ragged documents of 1 to 30 tokens, positions restarting; a document's last target is
 * ignored, as lib/train does. */
static void make_docs(int32_t *seg, int32_t *pos, int32_t *tg, int B, int T)
{
    int32_t doc = 0;
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
    for (int i = 0; i + 1 < B * T; i++)
        if ((i + 1) % T && seg[i + 1] != seg[i])
            tg[i] = -1;
}

/* One forward + backward on the GPU: loss, gradients (host, flat), arena peak. */
static int gpu_step(dsv3_model *m, const rc_case *k, unsigned flags, const int32_t *ids,
                    const int32_t *tg, const int32_t *seg, const int32_t *pos, float *loss,
                    float *eval_loss, float *grads, size_t *peak, dsv3_err *e)
{
    gmodel *g = NULL;
    int rc = gmodel_create_opt(&g, m, k->B, k->T, 0, flags, e) ||
             (k->fp8 && gmodel_set_fp8(g, 1, e)) || gmodel_set_segments(g, seg, pos, e) ||
             gmodel_forward(g, ids, tg, 0, eval_loss, e) ||
             gmodel_forward(g, ids, tg, 1, loss, e) || gmodel_backward(g, e) ||
             gmodel_get_grads(g, grads, e);
    if (!rc)
        *peak = gmodel_arena_peak(g);
    gmodel_destroy(g);
    return rc ? -1 : 0;
}

static void run_case(const rc_case *k)
{
    if (gpu_count() == 0)
        SKIP("no GPU%s", gpu_compiled() ? "" : " (CPU-only build)");
    dsv3_err e;
    dsv3_model m;
    REQUIRE(make_model(&m, k, &e) == 0);
    int B = k->B, T = k->T, N = B * T, V = m.cfg.vocab_size;
    int32_t *ids = malloc((size_t)N * 4), *tg = malloc((size_t)N * 4);
    int32_t *seg = malloc((size_t)N * 4), *pos = malloc((size_t)N * 4);
    for (int i = 0; i < N; i++) {
        ids[i] = (int32_t)(test_rand() % (uint64_t)V);
        tg[i] = test_rand() % 9 == 0 ? -1 : (int32_t)(test_rand() % (uint64_t)V);
    }
    if (k->docs)
        make_docs(seg, pos, tg, B, T);
    m.mtp_lambda = k->mtp;
    m.balance_alpha = k->alpha;
    float *g0 = malloc(m.n_params * 4), *g1 = malloc(m.n_params * 4);
    float l0 = 0, l1 = 0, ev0 = 0, ev1 = 0;
    size_t p0 = 0, p1 = 0;
    const int32_t *sg = k->docs ? seg : NULL, *ps = k->docs ? pos : NULL;
    CHECKF(gpu_step(&m, k, 0, ids, tg, sg, ps, &l0, &ev0, g0, &p0, &e) == 0, "keep: %s", e.msg);
    CHECKF(gpu_step(&m, k, GMODEL_RECOMPUTE, ids, tg, sg, ps, &l1, &ev1, g1, &p1, &e) == 0,
           "recompute: %s", e.msg);
    if (!test_failed_) {
        size_t diff = 0;
        double num = 0, den = 0;
        for (size_t i = 0; i < m.n_params; i++) {
            diff += memcmp(&g0[i], &g1[i], 4) != 0;
            num += ((double)g1[i] - g0[i]) * ((double)g1[i] - g0[i]);
            den += (double)g0[i] * g0[i];
        }
        printf("# %s: loss keep %.6f recompute %.6f; gradients differing in %zu of %zu "
               "(rel L2 %.2e); arena peak keep %.2f MiB recompute %.2f MiB (%.0f%% less)\n",
               k->name, l0, l1, diff, m.n_params, den > 0 ? sqrt(num / den) : sqrt(num),
               p0 / 1048576.0, p1 / 1048576.0, 100.0 * (1.0 - (double)p1 / (double)p0));
        CHECKF(memcmp(&l0, &l1, 4) == 0 && memcmp(&ev0, &ev1, 4) == 0,
               "%s: losses differ: keep %.9g/%.9g recompute %.9g/%.9g", k->name, l0, ev0, l1, ev1);
        CHECKF(diff == 0, "%s: %zu gradients differ from the run that keeps everything",
               k->name, diff);
        CHECKF(p1 < p0, "%s: arena peak with recompute %zu not below %zu", k->name, p1, p0);
    }
    if (!test_failed_ && !k->fp8) {  /* the CPU reference */
        model_acts *a = model_acts_new(&m, B, T, &e);
        float cl = 0;
        REQUIRE(a);
        CHECK(model_acts_set_segments(a, sg, ps) == 0);
        CHECKF(model_forward(&m, a, ids, tg, &cl, &e) == 0 &&
                   model_backward(&m, a, ids, tg, &e) == 0,
               "%s", e.msg);
        if (!test_failed_) {
            char nm[96];
            double dl = fabs(l1 - cl) / fabs(cl);
            double dg = gt_relerr(g1, m.grads, m.n_params), worst = 0;
            const char *wn = "";
            for (int t = 0; t < m.n_t; t++) {
                const model_tensor *tt = &m.t[t];
                double d = gt_relerr(g1 + tt->off, m.grads + tt->off, (size_t)tt->numel);
                int zero = 1;
                for (int64_t i = 0; i < tt->numel && zero; i++)
                    zero = m.grads[tt->off + i] == 0;
                if (zero) {  /* no gradient on the CPU: none on the GPU */
                    for (int64_t i = 0; i < tt->numel; i++)
                        if (g1[tt->off + i] != 0) {
                            CHECKF(0, "%s: %s has a gradient on the GPU only", k->name, tt->name);
                            break;
                        }
                } else if (d > worst) {
                    worst = d, wn = tt->name;
                }
            }
            printf("# %s vs CPU: loss %.6f / %.6f (rel %.2e), gradients rel L2 %.2e, worst "
                   "tensor %.2e (%s)\n", k->name, l1, cl, dl, dg, worst, wn);
            snprintf(nm, sizeof nm, "recompute %s loss", k->name);
            gt_stat(nm, dl, 1e-2);
            snprintf(nm, sizeof nm, "recompute %s grads", k->name);
            gt_stat(nm, dg, 2e-2);
            snprintf(nm, sizeof nm, "recompute %s worst tensor", k->name);
            gt_stat(nm, worst, 5e-2);
        }
        model_acts_free(a);
    }
    model_free(&m);
    free(ids), free(tg), free(seg), free(pos), free(g0), free(g1);
}

static void tiny_forced_mtp_balance_docs(void)
{
    rc_case k = {"tiny-forced-mtp-bal-docs", 3, 40, 0, 0, 1, 0, 0, 0.3f, 0.1f, 1, 0};
    run_case(&k);
}

static void big_all_experts_docs(void)
{
    rc_case k = {"big-all-experts-docs", 2, 72, 1, 1, 0, 0, 0, 0.3f, 0.0f, 1, 0};
    run_case(&k);
}

static void tiny_no_qlora(void)
{
    rc_case k = {"tiny-no-qlora", 2, 33, 0, 1, 0, 0, 1, 0.0f, 0.0f, 0, 0};
    run_case(&k);
}

static void big_dense_fp8(void)
{
    rc_case k = {"big-dense-fp8", 4, 64, 1, 0, 0, 1, 0, 0.0f, 0.0f, 0, 1};
    run_case(&k);
}

static void refuses_on_cpu_build(void)
{
    if (gpu_compiled())
        SKIP("CUDA build");
    dsv3_err e;
    dsv3_model m;
    rc_case k = {"x", 1, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    REQUIRE(make_model(&m, &k, &e) == 0);
    gmodel *g = NULL;
    CHECK(gmodel_create_opt(&g, &m, 1, 8, 0, GMODEL_RECOMPUTE, &e) != 0 && g == NULL);
    model_free(&m);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Random weights fast (uniform, std initializer_range; norms 1, biases 0). */
static void fast_random(dsv3_model *m, uint64_t seed)
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
            p[i] = norm ? 1.0f : !tt->trainable ? 0.0f
                                              : (float)(((z >> 11) * 0x1p-53 * 2 - 1) * a);
        }
    }
}

static void bench_1b_moe(void)
{
    if (!gt_bench())
        SKIP("DSV3_GPU_BENCH not set");
    if (gpu_count() == 0)
        SKIP("no GPU");
    dsv3_err e;
    const char *sb = getenv("DSV3_GMODEL_B"), *st = getenv("DSV3_GMODEL_T");
    int B = sb ? atoi(sb) : 4, T = st ? atoi(st) : 4096, N = B * T;
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
    double med[2] = {0, 0};
    size_t peak[2] = {0, 0};
    for (int r = 0; r < 2 && !test_failed_; r++) {
        gmodel *g = NULL;
        CHECKF(gmodel_create_opt(&g, &m, B, T, 0, r ? GMODEL_RECOMPUTE : 0, &e) == 0, "%s",
               e.msg);
        double ts[4] = {0};
        for (int it = 0; it < 4 && g && !test_failed_; it++) {
            double sum = 0, t0 = now_s();
            CHECKF(gmodel_forward(g, ids, tg, 1, NULL, &e) == 0 && gmodel_backward(g, &e) == 0 &&
                       gmodel_take_stats(g, &sum, NULL, &e) == 0 &&
                       gpu_sync(gmodel_ctx(g), &e) == 0,
                   "%s", e.msg);
            ts[it] = now_s() - t0;
        }
        qsort(ts + 1, 3, sizeof *ts, cmp_d);
        med[r] = ts[2];
        if (g)
            peak[r] = gmodel_arena_peak(g);
        gmodel_destroy(g);
    }
    if (!test_failed_) {
        for (int r = 0; r < 2; r++)
            printf("# bench recompute 1B-MoE B=%d T=%d %-9s fwd+bwd %.1f ms (median of 3), "
                   "%.0f tokens/s, arena peak %.2f GiB\n", B, T, r ? "recompute" : "keep",
                   med[r] * 1e3, N / med[r], peak[r] / 1073741824.0);
        printf("# bench recompute 1B-MoE: time +%.1f%%, arena peak -%.2f GiB (-%.0f%%)\n",
               100 * (med[1] / med[0] - 1), (peak[0] - (double)peak[1]) / 1073741824.0,
               100 * (1 - (double)peak[1] / peak[0]));
    }
    model_free(&m);
    free(ids), free(tg);
}

int main(void)
{
    test_seed();
    RUN(tiny_forced_mtp_balance_docs);
    RUN(big_all_experts_docs);
    RUN(tiny_no_qlora);
    RUN(big_dense_fp8);
    RUN(refuses_on_cpu_build);
    RUN(bench_1b_moe);
    TEST_EXIT();
}
