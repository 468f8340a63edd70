/* GPU test of gmodel_set_fp8 on the routed experts: one training step (forward + backward)
 * of an all-MoE model with the routed experts' grouped GEMMs in FP8 (kernels/moe_fp8) against
 * the same step in bf16.
 *
 * The model (configs/tiny.json widened: hidden 256, 8 routed experts of width 128, every
 * token to all 8, so FP8's rounding cannot flip a top-k choice, which would change a token's
 * expert outputs by O(1); test_gmodel_fp8 says why that matters) runs 3 x 50 = 150 tokens:
 * not a multiple of 16, so the dense FP8 path (kernels/fp8lin, which needs one) stays bf16
 * and only the routed experts change precision; each expert gets 150 rows, two token tiles,
 * the second ragged. E4M3 rounds each operand by up to 2^-4 relative (a product carries ~5%),
 * so the checks are closeness as in test_gmodel_fp8: the loss within 1e-2 relative, all
 * gradients within 0.35 relative L2, and the routed experts' own weight gradients (the FP8
 * wgrad's output, fed by the FP8 dgrad's) each within 0.35; a misplaced scale or operand
 * gives errors of order one. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/gmodel.h"
#include "../../kernels/moe_fp8.h"
#include "../../lib/model.h"
#include "fp8_config.h"
#include "gpu_test.h"

static double rel_l2(const float *a, const float *ref, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(a[i]))
            return INFINITY;
        num += ((double)a[i] - ref[i]) * ((double)a[i] - ref[i]);
        den += (double)ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static void routed_fp8_step_close_to_bf16(void)
{
    GT_NEED_GPU();
    if (!gpu_moe_fp8_fits(gt_ctx_, 16, 16))
        SKIP("the FP8 grouped GEMM needs a Hopper GPU");
    dsv3_err e;
    dsv3_model m;
    REQUIRE(fp8_all_experts_model(&m, &e) == 0);
    int B = 3, T = 50, N = B * T, V = m.cfg.vocab_size;
    int32_t *ids = malloc((size_t)N * 4), *tg = malloc((size_t)N * 4);
    for (int i = 0; i < N; i++)
        ids[i] = (int32_t)(test_rand() % (uint64_t)V), tg[i] = (int32_t)(test_rand() % (uint64_t)V);
    float *g16 = malloc(m.n_params * 4), *g8 = malloc(m.n_params * 4);
    gmodel *g = NULL;
    CHECKF(gmodel_create(&g, &m, B, T, 0, &e) == 0, "%s", e.msg);
    float l16 = 0, l8 = 0;
    if (g)
        CHECKF(gmodel_zero_grad(g, &e) == 0 && gmodel_forward(g, ids, tg, 1, &l16, &e) == 0 &&
                   gmodel_backward(g, &e) == 0 && gmodel_get_grads(g, g16, &e) == 0 &&
                   gmodel_set_fp8(g, 1, &e) == 0 && gmodel_zero_grad(g, &e) == 0 &&
                   gmodel_forward(g, ids, tg, 1, &l8, &e) == 0 && gmodel_backward(g, &e) == 0 &&
                   gmodel_get_grads(g, g8, &e) == 0,
               "%s", e.msg);
    if (!test_failed_) {
        double dl = fabs(l8 - l16) / fabs(l16), dg = rel_l2(g8, g16, m.n_params), dexp = 0;
        int nexp = 0;
        for (int t = 0; t < m.n_t; t++) {
            const model_tensor *tt = &m.t[t];
            if (!tt->trainable || !strstr(tt->name, ".mlp.experts."))
                continue;
            double d = rel_l2(g8 + tt->off, g16 + tt->off, (size_t)tt->numel);
            dexp = fmax(dexp, d);
            nexp++;
        }
        printf("# routed fp8 step: loss bf16 %.6f fp8 %.6f (rel %.2e), gradients rel L2 %.3e, "
               "worst of %d routed-expert tensors %.3e\n",
               l16, l8, dl, dg, nexp, dexp);
        CHECK(nexp > 0);
        CHECKF(dl > 0 || dg > 0, "the FP8 step equals the bf16 one: FP8 did not run");
        gt_stat("routed fp8 vs bf16 loss", dl, 1e-2);
        gt_stat("routed fp8 vs bf16 gradients", dg, 0.35);
        gt_stat("routed fp8 vs bf16 expert grads", dexp, 0.35);
    }
    gmodel_destroy(g);
    model_free(&m);
    free(ids), free(tg), free(g16), free(g8);
}

/* gmodel keeps the expert weights' codes across steps and the forward's (and dgrad's)
 * token tiles for the wgrad (moe_fp8.h, keep); DSV3_MOE_FP8_KEEP=0 quantises every operand in
 * every call. Two steps each way with a weight change between (gmodel_set_params): the same
 * loss and gradients bit for bit, so the kept codes are the fresh ones and go stale never. */
static void kept_codes_same_bits(void)
{
    GT_NEED_GPU();
    if (!gpu_moe_fp8_fits(gt_ctx_, 16, 16))
        SKIP("the FP8 grouped GEMM needs a Hopper GPU");
    dsv3_err e;
    dsv3_model m;
    REQUIRE(fp8_all_experts_model(&m, &e) == 0);
    int B = 2, T = 64, N = B * T, V = m.cfg.vocab_size;
    int32_t *ids = malloc((size_t)N * 4), *tg = malloc((size_t)N * 4);
    for (int i = 0; i < N; i++)
        ids[i] = (int32_t)(test_rand() % (uint64_t)V), tg[i] = (int32_t)(test_rand() % (uint64_t)V);
    float *p2 = malloc(m.n_params * 4), *gk = malloc(m.n_params * 4), *gf = malloc(m.n_params * 4);
    for (size_t i = 0; i < m.n_params; i++)
        p2[i] = m.params[i] * 0.9f;
    float lk[2] = {0}, lf[2] = {0};
    for (int keep = 1; keep >= 0; keep--) {
        gmodel *g = NULL;
        setenv("DSV3_MOE_FP8_KEEP", keep ? "1" : "0", 1);
        float *l = keep ? lk : lf, *gr = keep ? gk : gf;
        CHECKF(gmodel_create(&g, &m, B, T, 0, &e) == 0 && gmodel_set_fp8(g, 1, &e) == 0 &&
                   gmodel_zero_grad(g, &e) == 0 && gmodel_forward(g, ids, tg, 1, &l[0], &e) == 0 &&
                   gmodel_backward(g, &e) == 0 && gmodel_set_params(g, p2, &e) == 0 &&
                   gmodel_zero_grad(g, &e) == 0 && gmodel_forward(g, ids, tg, 1, &l[1], &e) == 0 &&
                   gmodel_backward(g, &e) == 0 && gmodel_get_grads(g, gr, &e) == 0,
               "%s", e.msg);
        gmodel_destroy(g);
    }
    unsetenv("DSV3_MOE_FP8_KEEP");
    if (!test_failed_) {
        size_t bad = 0;
        for (size_t i = 0; i < m.n_params; i++)
            bad += memcmp(&gk[i], &gf[i], 4) != 0;
        printf("# kept vs fresh codes: losses %.6f %.6f / %.6f %.6f, %zu gradients differ\n",
               lk[0], lk[1], lf[0], lf[1], bad);
        CHECK(memcmp(lk, lf, sizeof lk) == 0);
        CHECK(lk[0] != lk[1]); /* the weights did change */
        CHECKF(bad == 0, "%zu of %zu gradients differ in bits", bad, m.n_params);
    }
    model_free(&m);
    free(ids), free(tg), free(p2), free(gk), free(gf);
}

int main(void)
{
    test_seed();
    RUN(routed_fp8_step_close_to_bf16);
    RUN(kept_codes_same_bits);
    if (gt_ctx_)
        gpu_ctx_destroy(gt_ctx_);
    TEST_EXIT();
}
