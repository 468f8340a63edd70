/* Parity with HF transformers: the fixtures in tests/fixtures/hf were made by
 * scripts/ref-hf.py from transformers' DeepseekV3ForCausalLM (float32, CPU). Each holds the
 * checkpoint save_pretrained wrote and transformers' logits, loss and every parameter's
 * gradient for fixed input ids. We load the checkpoint, run our forward and backward, and
 * require, per tensor, max|ours - theirs| <= TOL * max|theirs| with TOL = 1e-4 for logits
 * and loss and 1e-3 for gradients (float32 sums in a different order; a wrong equation is
 * off by 1e-1 or more). mtp_bal adds two MTP modules and the sequence-wise balance loss,
 * which transformers does not compute: the script's PyTorch reference of the V3 report's
 * equations gives their logits, losses, and the gradients of the total. */
#include <math.h>

#include "../../lib/model.h"
#include "../../lib/safetensors.h"
#include "../test.h"

static double rel_err(const float *a, const float *ref, int64_t n, double *abs_out)
{
    double mx = 0, mref = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - ref[i]);
        if (d > mx || isnan(d))
            mx = isnan(d) ? INFINITY : d;
        if (fabs(ref[i]) > mref)
            mref = fabs(ref[i]);
    }
    if (abs_out)
        *abs_out = mx;
    return mref > 0 ? mx / mref : mx;
}

/* MTP logits and losses, the balance loss and the total against the script's PyTorch
 * reference (written from the V3 report's equations). */
static void check_aux(const char *dir, const dsv3_model *m, const model_acts *a,
                      const st_file *ref, int B, int T)
{
    int V = m->cfg.vocab_size, D = m->cfg.num_nextn_predict_layers;
    model_losses ls;
    model_acts_losses(a, &ls);
    const st_tensor *ml = st_find(ref, "mtp_loss"), *bal = st_find(ref, "balance");
    const st_tensor *tot = st_find(ref, "total");
    REQUIRE(ml && bal && tot && ml->numel == D && D > 0 && D <= 8);
    float rl[8], rb, rt;
    st_to_f32(ml, rl, D, NULL);
    st_to_f32(bal, &rb, 1, NULL);
    st_to_f32(tot, &rt, 1, NULL);
    for (int k = 0; k < D; k++) {
        char name[32];
        snprintf(name, sizeof name, "mtp_logits.%d", k + 1);
        const st_tensor *lt = st_find(ref, name);
        const float *ours = model_acts_mtp_logits(a, k);
        REQUIRE(lt && ours && lt->numel == (int64_t)B * (T - k - 1) * V);
        float *r = malloc((size_t)lt->numel * 4), *o = malloc((size_t)lt->numel * 4);
        st_to_f32(lt, r, lt->numel, NULL);
        /* Ours has T rows a sequence, of which the first T-k-1 are real tokens. */
        for (int b = 0; b < B; b++)
            memcpy(o + (int64_t)b * (T - k - 1) * V, ours + (int64_t)b * T * V,
                   (size_t)(T - k - 1) * V * 4);
        double abs_e, rel = rel_err(o, r, lt->numel, &abs_e);
        double rel_loss = fabs(ls.mtp_k[k] - rl[k]) / fabs(rl[k]);
        printf("# %s: MTP module %d logits max abs err %.3g, rel %.3g; loss %.7f vs %.7f "
               "(rel %.3g)\n", dir, k + 1, abs_e, rel, ls.mtp_k[k], rl[k], rel_loss);
        CHECKF(rel <= 1e-4, "%s: MTP %d logits rel err %g", dir, k + 1, rel);
        CHECKF(rel_loss <= 1e-4, "%s: MTP %d loss rel err %g", dir, k + 1, rel_loss);
        free(r);
        free(o);
    }
    double rel_b = fabs(ls.balance - rb) / fabs(rb), rel_t = fabs(ls.total - rt) / fabs(rt);
    printf("# %s: balance loss %.7g vs %.7g (rel %.3g); total %.7f vs %.7f (rel %.3g)\n", dir,
           ls.balance, rb, rel_b, ls.total, rt, rel_t);
    CHECKF(rel_b <= 1e-4, "%s: balance loss rel err %g", dir, rel_b);
    CHECKF(rel_t <= 1e-4, "%s: total loss rel err %g", dir, rel_t);
}

static void check_fixture(const char *dir)
{
    dsv3_model m;
    dsv3_err e = {{0}};
    int rc = model_load(&m, dir, &e);
    CHECKF(rc == 0, "%s", e.msg);
    if (rc)
        return;
    char path[512];
    snprintf(path, sizeof path, "%s/ref.safetensors", dir);
    st_file ref;
    rc = st_open(&ref, path, &e);
    CHECKF(rc == 0, "%s", e.msg);
    if (rc) {
        model_free(&m);
        return;
    }
    const st_tensor *ids_t = st_find(&ref, "input_ids"), *lab_t = st_find(&ref, "labels");
    const st_tensor *log_t = st_find(&ref, "logits"), *loss_t = st_find(&ref, "loss");
    REQUIRE(ids_t && lab_t && log_t && loss_t && ids_t->dtype == ST_I64 && ids_t->ndim == 2);
    int B = (int)ids_t->shape[0], T = (int)ids_t->shape[1], N = B * T, V = m.cfg.vocab_size;
    int32_t *ids = malloc((size_t)N * 4), *tg = malloc((size_t)N * 4);
    const int64_t *iv = ids_t->data, *lv = lab_t->data;
    /* transformers shifts inside its loss: position t predicts label t+1. */
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            ids[b * T + t] = (int32_t)iv[b * T + t];
            tg[b * T + t] = t + 1 < T ? (int32_t)lv[b * T + t + 1] : -100;
        }
    /* The MTP and balance fixture: its options, and its reference losses. */
    const st_tensor *lam_t = st_find(&ref, "mtp_lambda"), *alpha_t = st_find(&ref, "balance_alpha");
    if (lam_t && alpha_t) {
        st_to_f32(lam_t, &m.mtp_lambda, 1, NULL);
        st_to_f32(alpha_t, &m.balance_alpha, 1, NULL);
    }
    model_acts *a = model_acts_new(&m, B, T, &e);
    REQUIRE(a);
    float loss = 0;
    rc = model_forward(&m, a, ids, tg, &loss, &e);
    CHECKF(rc == 0, "%s", e.msg);
    if (lam_t && alpha_t)
        check_aux(dir, &m, a, &ref, B, T);
    float *reflog = malloc((size_t)N * V * 4), refloss;
    st_to_f32(log_t, reflog, (int64_t)N * V, NULL);
    st_to_f32(loss_t, &refloss, 1, NULL);
    double abs_l, rel_l = rel_err(model_acts_logits(a), reflog, (int64_t)N * V, &abs_l);
    double rel_loss = fabs(loss - refloss) / fabs(refloss);
    printf("# %s: logits max abs err %.3g, rel %.3g; loss %.7f vs %.7f (rel %.3g)\n", dir,
           abs_l, rel_l, loss, refloss, rel_loss);
    CHECKF(rel_l <= 1e-4, "%s: logits rel err %g", dir, rel_l);
    CHECKF(rel_loss <= 1e-4, "%s: loss rel err %g", dir, rel_loss);

    model_zero_grad(&m);
    rc = model_backward(&m, a, ids, tg, &e);
    CHECKF(rc == 0, "%s", e.msg);
    double worst = 0;
    const char *worst_name = "";
    int compared = 0;
    for (int i = 0; i < m.n_t; i++) {
        const model_tensor *t = &m.t[i];
        if (!t->trainable)
            continue;
        char gname[128];
        snprintf(gname, sizeof gname, "grad.%s", t->name);
        const st_tensor *g = st_find(&ref, gname);
        CHECKF(g != NULL, "%s: no reference gradient for %s", dir, t->name);
        if (!g)
            continue;
        float *rg = malloc((size_t)t->numel * 4);
        st_to_f32(g, rg, t->numel, NULL);
        double r = rel_err(m.grads + t->off, rg, t->numel, NULL);
        CHECKF(r <= 1e-3, "%s: gradient of %s rel err %g", dir, t->name, r);
        if (r > worst) {
            worst = r;
            worst_name = m.t[i].name;
        }
        compared++;
        free(rg);
    }
    printf("# %s: %d parameter gradients, worst rel err %.3g (%s)\n", dir, compared, worst,
           worst_name);
    free(reflog);
    free(ids);
    free(tg);
    model_acts_free(a);
    st_close(&ref);
    model_free(&m);
}

static void test_qlora_yarn(void)
{
    check_fixture("tests/fixtures/hf/qlora_yarn");
}

static void test_noq_plain(void)
{
    check_fixture("tests/fixtures/hf/noq_plain");
}

/* Two MTP modules and the balance loss, against the script's PyTorch reference. */
static void test_mtp_bal(void)
{
    check_fixture("tests/fixtures/hf/mtp_bal");
}

int main(void)
{
    test_seed();
    (void)test_rand;  /* inputs are the fixtures' own */
    RUN(test_qlora_yarn);
    RUN(test_noq_plain);
    RUN(test_mtp_bal);
    TEST_EXIT();
}
