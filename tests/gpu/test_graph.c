/* GPU test of the context's CUDA graphs: a small layer (RMSNorm, gate-up GEMM, SwiGLU, down
 * GEMM, attention) captured once and replayed on new inputs written into the same buffers
 * gives bitwise the result of running the same calls directly; with DSV3_GPU_BENCH=1 the
 * replay's time against the direct launches. Also: the arena hands back 256-byte aligned
 * pieces, refuses to overflow, and a reset reuses the same memory. */
#include "../../kernels/attention.h"
#include "../../kernels/gemm.h"
#include "../../kernels/layers.h"
#include "bench.h"

enum { N = 64, H = 128, F = 256, NH = 2, DK = 32, DV = 32 };

struct bufs {
    gpu_bf16 *x, *w, *xn, *w1, *gu, *act, *w2, *y, *q, *k, *v, *o;
    float *rstd, *lse;
};

static int layer(void *arg, dsv3_err *e)
{
    struct bufs *b = arg;
    return gpu_rmsnorm_fwd(gt_ctx_, b->xn, b->rstd, b->x, b->w, N, H, 1e-6f, e) ||
           gpu_linear_fwd(gt_ctx_, b->gu, b->xn, b->w1, N, H, 2 * F, 0.0f, e) ||
           gpu_swiglu_fwd(gt_ctx_, b->act, b->gu, b->gu + F, N, F, 2 * F, e) ||
           gpu_linear_fwd(gt_ctx_, b->y, b->act, b->w2, N, F, H, 0.0f, e) ||
           gpu_attention_fwd(gt_ctx_, b->o, b->lse, b->q, b->k, b->v, 1, N, NH, DK, DV, 0.17f, e);
}

static void graph_replays_bitwise(void)
{
    GT_NEED_GPU();
    dsv3_err e;
    size_t mark = gpu_arena_mark(gt_ctx_);
    float *x = gt_rand_bf((size_t)N * H, 1), *w = gt_rand_bf(H, 1);
    float *w1 = gt_rand_bf((size_t)2 * F * H, 0.1f), *w2 = gt_rand_bf((size_t)H * F, 0.1f);
    float *qkv = gt_rand_bf((size_t)N * NH * DK, 1);
    struct bufs b = {gt_up_bf(x, (size_t)N * H), gt_up_bf(w, H), gt_poisoned((size_t)N * H * 2),
                     gt_up_bf(w1, (size_t)2 * F * H), gt_poisoned((size_t)N * 2 * F * 2),
                     gt_poisoned((size_t)N * F * 2), gt_up_bf(w2, (size_t)H * F),
                     gt_poisoned((size_t)N * H * 2), gt_up_bf(qkv, (size_t)N * NH * DK),
                     gt_up_bf(qkv, (size_t)N * NH * DK), gt_up_bf(qkv, (size_t)N * NH * DV),
                     gt_poisoned((size_t)N * NH * DV * 2), gt_poisoned((size_t)N * 4),
                     gt_poisoned((size_t)N * NH * 4)};
    REQUIRE(b.x && b.w && b.xn && b.w1 && b.gu && b.act && b.w2 && b.y && b.q && b.k && b.v &&
            b.o && b.rstd && b.lse);
    /* warm-up outside the capture: cuBLASLt's algorithm choice and kernel attributes */
    REQUIRE(layer(&b, &e) == 0);
    REQUIRE(gpu_sync(gt_ctx_, &e) == 0);
    gpu_graph *g;
    CHECKF(gpu_capture_begin(gt_ctx_, &e) == 0, "%s", e.msg);
    int rc = layer(&b, &e);
    CHECKF(gpu_capture_end(gt_ctx_, &g, &e) == 0 && rc == 0, "%s", e.msg);
    REQUIRE(g);
    /* new inputs into the same buffers, then the replay against the direct calls */
    float *x2 = gt_rand_bf((size_t)N * H, 1);
    gpu_bf16 *hx = malloc((size_t)N * H * 2);
    for (int i = 0; i < N * H; i++)
        hx[i] = gpu_f2bf(x2[i]);
    REQUIRE(gpu_upload(gt_ctx_, b.x, hx, (size_t)N * H * 2, &e) == 0);
    REQUIRE(gpu_graph_launch(gt_ctx_, g, &e) == 0 && gpu_sync(gt_ctx_, &e) == 0);
    float *y_graph = gt_down_bf(b.y, (size_t)N * H), *o_graph = gt_down_bf(b.o, (size_t)N * NH * DV);
    gpu_memset(gt_ctx_, b.y, 0xff, (size_t)N * H * 2, &e);
    REQUIRE(layer(&b, &e) == 0);
    float *y_direct = gt_down_bf(b.y, (size_t)N * H), *o_direct = gt_down_bf(b.o, (size_t)N * NH * DV);
    CHECK(memcmp(y_graph, y_direct, (size_t)N * H * 4) == 0);
    CHECK(memcmp(o_graph, o_direct, (size_t)N * NH * DV * 4) == 0);
    for (int i = 0; i < N * H; i++)
        CHECK(!isnan(y_graph[i]));
    if (gt_bench()) {
        float direct = gb_time(layer, &b, 50);
        gpu_timer t;
        float ms = 0;
        REQUIRE(gpu_timer_start(gt_ctx_, &t, &e) == 0);
        for (int i = 0; i < 100; i++)
            REQUIRE(gpu_graph_launch(gt_ctx_, g, &e) == 0);
        REQUIRE(gpu_timer_stop(gt_ctx_, &t, &ms, &e) == 0);
        printf("# bench %-36s %8.3f ms direct, %.3f ms as a graph replay\n",
               "small layer (5 ops, 64 tokens)", direct, ms / 100);
    }
    gpu_graph_destroy(g);
    free(x), free(w), free(w1), free(w2), free(qkv), free(x2), free(hx), free(y_graph),
        free(o_graph), free(y_direct), free(o_direct);
    gt_reset(mark);
}

static void arena_is_reused_and_bounded(void)
{
    GT_NEED_GPU();
    dsv3_err e;
    size_t mark = gpu_arena_mark(gt_ctx_);
    char *a = gpu_arena_alloc(gt_ctx_, 3, &e), *b = gpu_arena_alloc(gt_ctx_, 5, &e);
    REQUIRE(a && b);
    CHECK(((uintptr_t)a & 255) == 0 && ((uintptr_t)b & 255) == 0 && b > a);
    CHECK(gpu_arena_alloc(gt_ctx_, (size_t)1 << 40, &e) == NULL);
    CHECK(strstr(e.msg, "arena full") != NULL);
    gt_reset(mark);
    char *c = gpu_arena_alloc(gt_ctx_, 3, &e);
    CHECK(c == a);
    CHECK(gpu_arena_peak(gt_ctx_) >= (size_t)(b - a) + 5);
    gt_reset(mark);
}

int main(void)
{
    test_seed();
    RUN(graph_replays_bitwise);
    RUN(arena_is_reused_and_bounded);
    if (gt_ctx_)
        gpu_ctx_destroy(gt_ctx_);
    TEST_EXIT();
}
