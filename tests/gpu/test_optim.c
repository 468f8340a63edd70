/* GPU test of kernels/optim: the gradient norm and one AdamW step over several tensors of
 * ragged sizes (one spanning many chunks) against a CPU AdamW written here (torch's update,
 * moments rounded to bf16 after each step), with and without clipping, for three steps. */
#include "../../kernels/optim.h"
#include "gpu_test.h"

#define NT 4
static const int64_t sizes[NT] = {1, 1000, 16385 * 3 + 7, 64};
static const int decays[NT] = {1, 0, 1, 1};

static float round_bf(float x)
{
    return gpu_bf2f(gpu_f2bf(x));
}

static void cpu_adamw(float *p, const float *g, float *m, float *v, int64_t n, int decay,
                      const gpu_adamw_hp *hp, float gscale)
{
    float bc1 = (float)(1.0 - pow(hp->beta1, hp->step));
    float bc2s = (float)sqrt(1.0 - pow(hp->beta2, hp->step));
    for (int64_t i = 0; i < n; i++) {
        float gi = g[i] * gscale;
        float mi = hp->beta1 * m[i] + (1 - hp->beta1) * gi;
        float vi = hp->beta2 * v[i] + (1 - hp->beta2) * gi * gi;
        float pi = decay ? p[i] * (1 - hp->lr * hp->weight_decay) : p[i];
        p[i] = pi - hp->lr / bc1 * mi / (sqrtf(vi) / bc2s + hp->eps);
        m[i] = round_bf(mi);
        v[i] = round_bf(vi);
    }
}

static void adamw_and_norm_match_cpu(void)
{
    GT_NEED_GPU();
    dsv3_err e;
    double wn = 0, wp = 0, wm = 0;
    for (int clip = 0; clip <= 1; clip++) {
        size_t mark = gpu_arena_mark(gt_ctx_);
        float *p[NT], *g[NT], *m[NT], *v[NT], *gp[NT], *gg[NT];
        gpu_bf16 *gm[NT], *gv[NT], *gpb[NT];
        for (int t = 0; t < NT; t++) {
            int64_t n = sizes[t];
            p[t] = gt_rand_bf((size_t)n, 1);
            m[t] = gt_zeros((size_t)n);
            v[t] = gt_zeros((size_t)n);
            gp[t] = gt_up(p[t], (size_t)n * 4);
            gg[t] = gt_poisoned((size_t)n * 4);
            gm[t] = gt_up_bf(m[t], (size_t)n);
            gv[t] = gt_up_bf(v[t], (size_t)n);
            gpb[t] = gt_poisoned((size_t)n * 2);
            g[t] = NULL;
            REQUIRE(gp[t] && gg[t] && gm[t] && gv[t] && gpb[t]);
        }
        gpu_tensor_list *l;
        REQUIRE(gpu_tensor_list_create(gt_ctx_, &l, NT, gp, gg, gm, gv, gpb, sizes, decays, &e) ==
                0);
        float *gnorm = gt_poisoned(4);
        gpu_adamw_hp hp = {1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, clip ? 1.0f : 0.0f, 0};
        for (int step = 1; step <= 3; step++) {
            hp.step = step;
            double ss = 0;
            for (int t = 0; t < NT; t++) {
                free(g[t]);
                g[t] = gt_rand_bf((size_t)sizes[t], step == 2 ? 3.0f : 0.1f);
                for (int64_t i = 0; i < sizes[t]; i++)
                    ss += (double)g[t][i] * g[t][i];
                REQUIRE(gpu_upload(gt_ctx_, gg[t], g[t], (size_t)sizes[t] * 4, &e) == 0);
            }
            CHECKF(gpu_grad_norm(gt_ctx_, l, gnorm, &e) == 0, "%s", e.msg);
            CHECKF(gpu_adamw_step(gt_ctx_, l, &hp, clip ? gnorm : NULL, &e) == 0, "%s", e.msg);
            float norm;
            REQUIRE(gpu_download(gt_ctx_, &norm, gnorm, 4, &e) == 0);
            double rn = sqrt(ss), en = fabs(norm - rn) / rn;
            wn = en > wn ? en : wn;
            float gscale = clip && hp.clip / (float)(rn + 1e-6) < 1 ? hp.clip / (float)(rn + 1e-6)
                                                                   : 1.0f;
            for (int t = 0; t < NT; t++)
                cpu_adamw(p[t], g[t], m[t], v[t], sizes[t], decays[t], &hp, gscale);
        }
        for (int t = 0; t < NT; t++) {
            size_t n = (size_t)sizes[t];
            float *op = gt_down_f(gp[t], n), *om = gt_down_bf(gm[t], n);
            float *ov = gt_down_bf(gv[t], n), *opb = gt_down_bf(gpb[t], n);
            float *rpb = malloc(n * 4);
            for (size_t i = 0; i < n; i++)
                rpb[i] = round_bf(p[t][i]);
            double a = gt_relerr(op, p[t], n), b = gt_relerr(om, m[t], n);
            double c = gt_relerr(ov, v[t], n), d = gt_relerr(opb, rpb, n);
            wp = a > wp ? a : wp;
            double mv = b > c ? b : c;
            wm = mv > wm ? mv : wm;
            CHECKF(a <= F32_BOUND && b <= BF16_BOUND && c <= BF16_BOUND && d <= BF16_BOUND,
                   "clip=%d tensor %d (n=%zu): p %.2e m %.2e v %.2e p_bf16 %.2e", clip, t, n, a, b,
                   c, d);
            free(op), free(om), free(ov), free(opb), free(rpb);
        }
        gpu_tensor_list_destroy(l);
        for (int t = 0; t < NT; t++)
            free(p[t]), free(g[t]), free(m[t]), free(v[t]);
        gt_reset(mark);
    }
    gt_stat("grad norm (4 tensors)", wn, F32_BOUND);
    gt_stat("adamw fp32 master, 3 steps", wp, F32_BOUND);
    gt_stat("adamw bf16 moments", wm, BF16_BOUND);
}

int main(void)
{
    test_seed();
    RUN(adamw_and_norm_match_cpu);
    if (gt_ctx_)
        gpu_ctx_destroy(gt_ctx_);
    TEST_EXIT();
}
