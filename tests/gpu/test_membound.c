/* GPU benchmark of the memory-bound kernels (DSV3_GPU_BENCH=1; skipped otherwise): each
 * kernel's time on V3-like shapes against its floor, the fewest bytes it must move (inputs
 * read once, outputs written once) over the measured copy bandwidth. Correctness is checked
 * in test_layers, test_loss, test_optim and test_moe. */
#include "../../kernels/layers.h"
#include "../../kernels/loss.h"
#include "../../kernels/moe.h"
#include "../../kernels/optim.h"
#include "bench.h"

static double ceiling_gbs;

static void report(const char *name, float ms, double bytes)
{
    double gbs = bytes / (ms * 1e-3) / 1e9;
    printf("# bench %-36s %8.3f ms %7.0f GB/s %5.1f%% of copy (floor %.3f ms)\n", name, ms, gbs,
           100 * gbs / ceiling_gbs, bytes / (ceiling_gbs * 1e9) * 1e3);
}

struct job {
    int kind, N, D;
    gpu_bf16 *a, *b, *c, *d;
    float *f, *f2;
    int32_t *ids;
    gpu_tensor_list *list;
    gpu_moe_plan plan;
};

static int run(void *arg, dsv3_err *e)
{
    struct job *j = arg;
    gpu_adamw_hp hp = {1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f, 3};
    switch (j->kind) {
    case 0: return gpu_rmsnorm_fwd(gt_ctx_, j->c, j->f, j->a, j->b, j->N, j->D, 1e-6f, e);
    case 1: return gpu_rmsnorm_bwd(gt_ctx_, j->c, 1.0f, j->f2, j->d, j->a, j->b, j->f, j->N, j->D,
                                   1e-6f, e);
    case 2: return gpu_swiglu_fwd(gt_ctx_, j->c, j->a, j->a + j->D, j->N, j->D, 2 * j->D, e);
    case 3: return gpu_swiglu_bwd(gt_ctx_, j->b, j->b + j->D, j->c, j->a, j->a + j->D, j->N, j->D,
                                  2 * j->D, e);
    case 4: return gpu_crossentropy_rows(gt_ctx_, j->f2, j->c, j->f, j->ids, j->N, j->D, 1.0f, e);
    case 5: return gpu_grad_norm(gt_ctx_, j->list, j->f2, e) ||
                   gpu_adamw_step(gt_ctx_, j->list, &hp, j->f2, e);
    case 6: return gpu_embedding_bwd(gt_ctx_, j->f, j->a, j->ids, j->N, j->D, 129280, e);
    case 7: return gpu_moe_gather(gt_ctx_, &j->plan, j->b, j->a, j->D, e);
    default: return gpu_moe_combine(gt_ctx_, &j->plan, j->c, 0.0f, j->b, j->f, j->D, e);
    }
}

static void bench_memory_bound(void)
{
    GT_NEED_GPU();
    if (!gt_bench())
        SKIP("set DSV3_GPU_BENCH=1");
    dsv3_err e;
    REQUIRE(gpu_copy_bandwidth(0, (size_t)1 << 30, 20, &ceiling_gbs, &e) == 0);
    printf("# bench %-36s %7.0f GB/s (the ceiling: 1 GiB device copy, read+write)\n",
           "copy bandwidth", ceiling_gbs);
    int N = 16384, D = 7168;
    size_t nd = (size_t)N * D;
    struct job j = {0};
    j.N = N, j.D = D;
    j.a = gb_random_bf(nd, 2), j.b = gb_random_bf((size_t)D, 1), j.c = gpu_malloc(nd * 2, &e);
    j.d = gb_random_bf(nd, 1), j.f = gpu_malloc((size_t)N * 4, &e);
    j.f2 = gpu_malloc((size_t)D * 4, &e);
    REQUIRE(j.a && j.b && j.c && j.d && j.f && j.f2);
    float ms = gb_time(run, &j, 20);
    report("rmsnorm fwd 16384x7168", ms, 2.0 * nd * 2);
    j.kind = 1;
    ms = gb_time(run, &j, 20);
    report("rmsnorm bwd 16384x7168 (+dw)", ms, 4.0 * nd * 2); /* x, dy, dx in, dx out */
    /* the 1B-class MoE's norms (hidden 1024, q_lora 384, kv_lora 256): the warp-a-row
     * kernels; the weight gradient's partials are a few MB and not counted */
    static const int small_d[] = {1024, 384, 256};
    for (int k = 0; k < 3; k++) {
        char name[64];
        size_t ns = (size_t)N * small_d[k];
        j.D = small_d[k], j.kind = 0;
        ms = gb_time(run, &j, 20);
        snprintf(name, sizeof name, "rmsnorm fwd 16384x%d", small_d[k]);
        report(name, ms, 2.0 * ns * 2);
        j.kind = 1;
        ms = gb_time(run, &j, 20);
        snprintf(name, sizeof name, "rmsnorm bwd 16384x%d (+dw)", small_d[k]);
        report(name, ms, 4.0 * ns * 2);
    }
    gpu_free(j.a), gpu_free(j.b), gpu_free(j.c), gpu_free(j.d), gpu_free(j.f), gpu_free(j.f2);

    /* SwiGLU of the V3 dense MLP: 16384 x 18432 */
    j = (struct job){.kind = 2, .N = N, .D = 18432};
    size_t nf = (size_t)N * 18432;
    j.a = gb_random_bf(2 * nf, 2), j.b = gpu_malloc(2 * nf * 2, &e), j.c = gb_random_bf(nf, 1);
    REQUIRE(j.a && j.b && j.c);
    ms = gb_time(run, &j, 20);
    report("swiglu fwd 16384x18432", ms, 3.0 * nf * 2);
    j.kind = 3;
    ms = gb_time(run, &j, 20);
    report("swiglu bwd 16384x18432", ms, 5.0 * nf * 2);
    gpu_free(j.a), gpu_free(j.b), gpu_free(j.c);

    /* cross-entropy over one 512-row chunk of the 129K vocabulary */
    j = (struct job){.kind = 4, .N = 512, .D = 129280};
    size_t nl = (size_t)512 * 129280;
    int32_t *t = malloc(512 * 4);
    for (int i = 0; i < 512; i++)
        t[i] = (int32_t)(test_rand() % 129280);
    float *hl = malloc(nl * 4);
    for (size_t i = 0; i < nl; i++)
        hl[i] = gt_uniform(8);
    j.f = gpu_malloc(nl * 4, &e), j.c = gpu_malloc(nl * 2, &e), j.f2 = gpu_malloc(512 * 4, &e);
    j.ids = gpu_malloc(512 * 4, &e);
    REQUIRE(j.f && j.c && j.f2 && j.ids);
    REQUIRE(gpu_upload(gt_ctx_, j.f, hl, nl * 4, &e) == 0 &&
            gpu_upload(gt_ctx_, j.ids, t, 512 * 4, &e) == 0);
    ms = gb_time(run, &j, 20);
    report("cross-entropy 512x129280 fp32->bf16", ms, nl * 6.0);
    gpu_free(j.f), gpu_free(j.c), gpu_free(j.f2), gpu_free(j.ids), free(hl), free(t);

    /* AdamW + grad norm over 256M parameters in 4 tensors */
    int64_t sizes[4] = {100000000, 100000000, 50000000, 6435456};
    float *p[4], *g[4];
    gpu_bf16 *m[4], *v[4], *pb[4];
    int64_t total = 0;
    for (int i = 0; i < 4; i++) {
        total += sizes[i];
        p[i] = gpu_malloc(sizes[i] * 4, &e), g[i] = gpu_malloc(sizes[i] * 4, &e);
        m[i] = gpu_malloc(sizes[i] * 2, &e), v[i] = gpu_malloc(sizes[i] * 2, &e);
        pb[i] = gpu_malloc(sizes[i] * 2, &e);
        REQUIRE(p[i] && g[i] && m[i] && v[i] && pb[i]);
        gpu_memset(gt_ctx_, p[i], 0x3c, sizes[i] * 4, &e);
        gpu_memset(gt_ctx_, g[i], 0x3a, sizes[i] * 4, &e);
        gpu_memset(gt_ctx_, m[i], 0x3a, sizes[i] * 2, &e);
        gpu_memset(gt_ctx_, v[i], 0x3a, sizes[i] * 2, &e);
    }
    j = (struct job){.kind = 5};
    j.f2 = gpu_malloc(4, &e);
    REQUIRE(j.f2 && gpu_tensor_list_create(gt_ctx_, &j.list, 4, p, g, m, v, pb, sizes, NULL, &e) == 0);
    ms = gb_time(run, &j, 10);
    /* norm: g read; step: p r/w, g read, m, v r/w (bf16), p_bf16 written */
    report("grad norm + adamw, 256M params", ms, (double)total * (4 + 8 + 4 + 8 + 2));
    gpu_tensor_list_destroy(j.list);
    gpu_free(j.f2);
    for (int i = 0; i < 4; i++)
        gpu_free(p[i]), gpu_free(g[i]), gpu_free(m[i]), gpu_free(v[i]), gpu_free(pb[i]);

    /* embedding gradient: 16384 tokens of width 7168 into a 129280-row fp32 table */
    j = (struct job){.kind = 6, .N = N, .D = D};
    int32_t *ids = malloc((size_t)N * 4);
    char *seen = calloc(129280, 1);
    int uniq = 0;
    for (int i = 0; i < N; i++) {
        ids[i] = (int32_t)(test_rand() % 129280);
        uniq += !seen[ids[i]];
        seen[ids[i]] = 1;
    }
    j.a = gb_random_bf(nd, 1), j.f = gpu_malloc((size_t)129280 * D * 4, &e);
    j.ids = gpu_malloc((size_t)N * 4, &e);
    REQUIRE(j.a && j.f && j.ids && gpu_upload(gt_ctx_, j.ids, ids, (size_t)N * 4, &e) == 0);
    ms = gb_time(run, &j, 10);
    report("embedding bwd 16384x7168", ms, nd * 2.0 + 2.0 * uniq * D * 4);
    gpu_free(j.a), gpu_free(j.f), gpu_free(j.ids), free(ids), free(seen);

    /* MoE gather and combine: 16384 tokens x 8 experts of width 7168 */
    int K = 8, E = 256;
    j = (struct job){.kind = 7, .N = N, .D = D};
    int32_t *idx = malloc((size_t)N * K * 4);
    for (int n = 0; n < N; n++)
        for (int r = 0; r < K; r++)
            idx[n * K + r] = (int32_t)((n * 37 + r * 32 + (int)(test_rand() % 32)) % E);
    int32_t *gidx = gpu_malloc((size_t)N * K * 4, &e);
    size_t mark = gpu_arena_mark(gt_ctx_);
    REQUIRE(gidx && gpu_upload(gt_ctx_, gidx, idx, (size_t)N * K * 4, &e) == 0);
    REQUIRE(gpu_moe_plan_make(gt_ctx_, &j.plan, gidx, N, K, E, &e) == 0);
    j.a = gb_random_bf(nd, 1), j.b = gpu_malloc(nd * K * 2, &e), j.c = gpu_malloc(nd * 2, &e);
    j.f = gpu_malloc((size_t)N * K * 4, &e);
    REQUIRE(j.a && j.b && j.c && j.f);
    gpu_memset(gt_ctx_, j.f, 0x3c, (size_t)N * K * 4, &e);
    ms = gb_time(run, &j, 10);
    report("moe gather 16384x7168, k=8", ms, nd * 2.0 * (1 + K));
    j.kind = 8;
    ms = gb_time(run, &j, 10);
    report("moe combine 16384x7168, k=8", ms, nd * 2.0 * (1 + K));
    gpu_moe_plan_free(&j.plan);
    gt_reset(mark);
    gpu_free(gidx), gpu_free(j.a), gpu_free(j.b), gpu_free(j.c), gpu_free(j.f), free(idx);
}

int main(void)
{
    test_seed();
    RUN(bench_memory_bound);
    if (gt_ctx_)
        gpu_ctx_destroy(gt_ctx_);
    TEST_EXIT();
}
