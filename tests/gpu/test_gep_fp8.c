/* GPU test of kernels/gep's FP8 path: the held experts' grouped GEMMs under --fp8 are the
 * single-GPU MoE block's (kernels/moe_fp8 through gmodel's gpu_moe_fp8).
 *
 * One process, expert parallelism of size 1 over the "self" comm (rows through host
 * buffers): the holder receives exactly the sender's rows, expert-major in the plan's
 * order, so FP8's quantisation groups them as one GPU does (rows in fprop and dgrad,
 * 128-row token tiles from each expert's first row in wgrad) and one training step through
 * gep gives the same bits as without it: loss and every gradient. The step in bf16 through
 * gep (gmodel_set_fp8 off) must differ, else FP8 did not run there. The model is
 * test_moe_fp8_model's (hidden 256, 8 routed experts of width 128, top-8). */
#include <math.h>
#include <string.h>

#include "../../kernels/gmodel.h"
#include "../../kernels/moe_fp8.h"
#include "../../lib/comm.h"
#include "../../lib/ep.h"
#include "../../lib/model.h"
#include "fp8_config.h"
#include "gpu_test.h"

static int step(gmodel *g, const int32_t *ids, const int32_t *tg, float *loss, float *grads,
                dsv3_err *e)
{
    return gmodel_zero_grad(g, e) || gmodel_forward(g, ids, tg, 1, loss, e) ||
           gmodel_backward(g, e) || gmodel_get_grads(g, grads, e);
}

static void gep_fp8_step_is_single_gpu_bits(void)
{
    GT_NEED_GPU();
    if (!gpu_moe_fp8_fits(gt_ctx_, 16, 16))
        SKIP("the FP8 grouped GEMM needs a Hopper GPU");
    unsetenv("DSV3_MOE_FP8");
    dsv3_err e;
    dsv3_model m;
    REQUIRE(fp8_all_experts_model(&m, &e) == 0);
    int B = 3, T = 50, N = B * T, V = m.cfg.vocab_size;
    int32_t *ids = malloc((size_t)N * 4), *tg = malloc((size_t)N * 4);
    for (int i = 0; i < N; i++)
        ids[i] = (int32_t)(test_rand() % (uint64_t)V), tg[i] = (int32_t)(test_rand() % (uint64_t)V);
    float *g1 = malloc(m.n_params * 4), *ge = malloc(m.n_params * 4), *gb = malloc(m.n_params * 4);
    gmodel *g = NULL;
    comm *c = NULL;
    ep p;
    memset(&p, 0, sizeof p);
    float l1 = 0, le = 0, lb = 0;
    CHECKF(gmodel_create_opt(&g, &m, B, T, 0, GMODEL_EP_ARENA, &e) == 0 && gmodel_set_fp8(g, 1, &e) == 0 &&
               gmodel_moe_fp8(g) && step(g, ids, tg, &l1, g1, &e) == 0 &&
               comm_open(&c, COMM_CPU, &e) == 0 && ep_open(&p, c, 1, m.cfg.n_routed_experts, &e) == 0 &&
               gmodel_ep_attach(g, &p, NULL, &e) == 0 && step(g, ids, tg, &le, ge, &e) == 0 &&
               gmodel_set_fp8(g, 0, &e) == 0 && step(g, ids, tg, &lb, gb, &e) == 0,
           "%s", e.msg);
    if (!test_failed_) {
        int64_t rows = gmodel_ep_rows(g, 0);
        printf("# loss one GPU fp8 %.7f, through gep fp8 %.7f, through gep bf16 %.7f; block 0 "
               "held %lld rows\n", l1, le, lb, (long long)rows);
        CHECK(rows == (int64_t)N * m.cfg.num_experts_per_tok);
        CHECKF(memcmp(&l1, &le, sizeof l1) == 0, "loss %.9g vs %.9g", l1, le);
        size_t diff = 0;
        for (size_t i = 0; i < m.n_params; i++)
            diff += memcmp(&g1[i], &ge[i], 4) != 0;
        CHECKF(diff == 0, "%zu of %zu gradients differ through gep", diff, (size_t)m.n_params);
        CHECKF(lb != le, "the bf16 step through gep equals the FP8 one: FP8 did not run");
    }
    gmodel_destroy(g);
    ep_free(&p);
    if (c)
        comm_close(c);
    model_free(&m);
    free(ids), free(tg), free(g1), free(ge), free(gb);
}

int main(void)
{
    test_seed();
    RUN(gep_fp8_step_is_single_gpu_bits);
    if (gt_ctx_)
        gpu_ctx_destroy(gt_ctx_);
    TEST_EXIT();
}
