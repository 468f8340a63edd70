/* GPU test of gmodel_set_fp8: the dense linear layers in FP8 (kernels/fp8lin) against the same
 * model in bf16, on a model whose dimensions all suit the FP8 GEMM (configs/tiny.json widened:
 * hidden 256, head dims 96/64, q_lora 96, kv_lora 128, MLP 512; dense layers only).
 *
 * FP8 changes the numbers on purpose: E4M3 keeps 3 mantissa bits, so each operand element is
 * rounded by up to 2^-4 relative (about 3.6% RMS) and a product of two quantised operands
 * carries about 5% relative error; the backward of a layer chains half a dozen such
 * products, and the weight gradients of this 3-layer model at its random start differ from
 * bf16's by 0.19-0.20 relative L2 (two seeds, H200, 2026-11-27), about uniformly over
 * the tensors (the bf16 head's too, through the hidden state), while the losses agree to
 * ~1e-3; a misapplied scale or transposed operand would give errors of order one. So the
 * checks are closeness: one forward's loss
 * within 1e-2 relative, all gradients within 0.35 relative L2, and a short training run from
 * the same start on the same batches (40 AdamW steps on a learnable token pattern, which the
 * model learns by heart: 7.2 -> ~0.05 nats) whose loss falls by a fifth or more in both and
 * whose mean loss over the 40 steps is within 8% of bf16's (the end loss is no measure: tiny
 * numbers apart by a ratio; measured: mean losses 1.0-1.9% apart, 3 seeds, H200,
 * 2026-11-27). DeepSeek-V3's bound, 0.25% after a long run, belongs to the 1000-step
 * comparison, not to this test. */
#include <math.h>

#include "../../kernels/gmodel.h"
#include "../../lib/model.h"
#include "fp8_config.h"
#include "gpu_test.h"

static int make_model(dsv3_model *m, dsv3_err *e)
{
    dsv3_config c;
    if (fp8_sized_config(&c, e))
        return -1;
    /* dense layers only: a routed token whose top-k choice flips under FP8's rounding (near
     * ties abound at a random start) changes its expert outputs and their gradients by O(1),
     * which would swamp the comparison (measured: loss 7.5e-4 apart, gradients 0.45 with
     * 16 experts top-2); the MoE path's dense parts are the same products */
    c.first_k_dense_replace = c.num_hidden_layers;
    int rc = model_init(m, &c, e);
    config_free(&c);
    if (rc)
        return -1;
    model_init_random(m, test_rand(), 0.05);
    return 0;
}

/* A learnable batch: each sequence counts up by its own stride from its own start. */
static void make_batch(int32_t *ids, int32_t *tg, int B, int T, int V)
{
    for (int b = 0; b < B; b++) {
        int start = (int)(test_rand() % (uint64_t)V), stride = 1 + (int)(test_rand() % 7);
        for (int t = 0; t < T; t++) {
            ids[b * T + t] = (start + stride * t) % V;
            tg[b * T + t] = (start + stride * (t + 1)) % V;
        }
    }
}

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

#define STEPS 40

/* Trains STEPS steps from params (moments zero) on the batches, losses into loss[]. */
static int train(gmodel *g, const float *params, size_t n, const int32_t *ids,
                 const int32_t *tg, int nb, int N, float *loss, dsv3_err *e)
{
    uint16_t *mom = calloc(n, 2);
    int rc = !mom || gmodel_set_params(g, params, e) || gmodel_optim_init(g, mom, mom, e);
    for (int s = 1; s <= STEPS && !rc; s++) {
        const int32_t *bi = ids + (size_t)((s - 1) % nb) * N, *bt = tg + (size_t)((s - 1) % nb) * N;
        float norm;
        rc = gmodel_zero_grad(g, e) || gmodel_forward(g, bi, bt, 1, &loss[s - 1], e) ||
             gmodel_backward(g, e) || gmodel_grad_norm(g, &norm, e) ||
             gmodel_adamw(g, 3e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f, s, e);
    }
    free(mom);
    return rc ? -1 : 0;
}

static void fp8_close_to_bf16(void)
{
    if (gpu_count() == 0)
        SKIP("no GPU%s", gpu_compiled() ? "" : " (CPU-only build)");
    dsv3_err e;
    dsv3_model m;
    REQUIRE(make_model(&m, &e) == 0);
    int B = 4, T = 64, N = B * T, V = m.cfg.vocab_size, nb = 4;
    int32_t *ids = malloc((size_t)nb * N * 4), *tg = malloc((size_t)nb * N * 4);
    for (int k = 0; k < nb; k++)
        make_batch(ids + (size_t)k * N, tg + (size_t)k * N, B, T, V);
    float *init = malloc(m.n_params * 4), *g16 = malloc(m.n_params * 4),
          *g8 = malloc(m.n_params * 4);
    memcpy(init, m.params, m.n_params * 4);
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
        double dl = fabs(l8 - l16) / fabs(l16), dg = rel_l2(g8, g16, m.n_params);
        printf("# gmodel fp8: loss bf16 %.6f fp8 %.6f (rel %.2e), gradients rel L2 %.3e\n", l16,
               l8, dl, dg);
        for (int t = 0; t < m.n_t; t++) {
            const model_tensor *tt = &m.t[t];
            double d = rel_l2(g8 + tt->off, g16 + tt->off, (size_t)tt->numel);
            if (tt->trainable && d > 0.25)
                printf("#   %-48s rel L2 %.3e\n", tt->name, d);
        }
        gt_stat("gmodel fp8 vs bf16 loss", dl, 1e-2);
        gt_stat("gmodel fp8 vs bf16 gradients", dg, 0.35);
    }
    float c16[STEPS], c8[STEPS];
    if (!test_failed_) {
        CHECKF(gmodel_set_fp8(g, 0, &e) == 0 && train(g, init, m.n_params, ids, tg, nb, N, c16, &e) == 0,
               "bf16 run: %s", e.msg);
        CHECKF(gmodel_set_fp8(g, 1, &e) == 0 && train(g, init, m.n_params, ids, tg, nb, N, c8, &e) == 0,
               "fp8 run: %s", e.msg);
    }
    if (!test_failed_) {
        printf("# step   bf16 loss   fp8 loss\n");
        for (int s = 0; s < STEPS; s += 5)
            printf("# %4d  %9.5f  %9.5f\n", s + 1, c16[s], c8[s]);
        printf("# %4d  %9.5f  %9.5f\n", STEPS, c16[STEPS - 1], c8[STEPS - 1]);
        double m16 = 0, m8 = 0;
        for (int s = 0; s < STEPS; s++)
            m16 += c16[s] / STEPS, m8 += c8[s] / STEPS;
        printf("# mean loss over %d steps: bf16 %.5f fp8 %.5f\n", STEPS, m16, m8);
        gt_stat("gmodel fp8 vs bf16 mean loss, 40 steps", fabs(m8 - m16) / m16, 8e-2);
        CHECKF(c16[STEPS - 1] < 0.8 * c16[0] && c8[STEPS - 1] < 0.8 * c8[0],
               "the loss did not fall by a fifth: bf16 %.4f -> %.4f, fp8 %.4f -> %.4f", c16[0],
               c16[STEPS - 1], c8[0], c8[STEPS - 1]);
    }
    gmodel_destroy(g);
    model_free(&m);
    free(ids), free(tg), free(init), free(g16), free(g8);
}

int main(void)
{
    test_seed();
    RUN(fp8_close_to_bf16);
    TEST_EXIT();
}
