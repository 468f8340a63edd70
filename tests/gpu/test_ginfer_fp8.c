/* GPU test of the FP8 weight path of kernels/ginfer (DSV3_GINFER_FP8=1, kernels/ginfer_fp8.cuh)
 * on fresh random tiny models written as FP8 checkpoints by dsv3-quant's lib/quant (128x128
 * block scales), row lengths multiples of 128 so that every projection and expert slot stays
 * FP8 (q_lora_rank set or not; one shared expert stored with the routed ones, or two as a
 * slot of their own). Three engines on the same FP8 folder, fed the same ids (prefill of 20
 * rows, the FP8 GEMVs' 8-row tiles and a partial one, then 12 decode steps from graphs):
 *   A: the GPU engine with DSV3_GINFER_FP8=1 (weights f32(e4m3 * scale) in registers),
 *   B: the same engine without it (weights bf16(f32(e4m3 * scale)) at load),
 *   C: the CPU engine on the model loaded from the folder (weights f32(e4m3 * scale)).
 * A and C use bitwise the same weight values; what is left between them is the GPU's bf16
 * cache, its bf16 kv_b (kept bf16 under FP8), the bf16 embedding/head the folder holds anyway
 * (the same on both) and the order of the fp32 sums. B adds one bf16 rounding (relative
 * 2^-9) of every FP8 weight. Every expert is chosen for every token (num_experts_per_tok =
 * n_routed_experts), so no router near tie can flip a choice and the logits move smoothly
 * with these roundings: the bounds are the bf16 engine's (test_ginfer's check_engine: median
 * row within BF16_BOUND, every row within 3 BF16_BOUND; weights of std 0.1) against the CPU,
 * and twice that median between A and B (each that far from the CPU; 1.02e-2 was measured
 * once on an H200 for the model without q_lora and two shared experts), and greedy choices must agree wherever C's top-2 gap is over a
 * quarter of its row's rms (well over the rows' allowed deviation). Also checked: A says fp8 in its description (B does not), a second run of A gives
 * bitwise the same logits, and on a folder without FP8 tensors the option changes nothing. */
#include <math.h>
#include <stdlib.h>

#include "../../lib/infer.h"
#include "../../lib/model.h"
#include "../../lib/quant.h"
#include "ginfer_test.h"
#include "gpu_test.h"

enum { P = 20, STEPS = 12 };

static void fp8_config(dsv3_config *c, int q, int shared)
{
    memset(c, 0, sizeof *c);
    c->vocab_size = 256 + 8 * (int)(test_rand() % 32);
    c->hidden_size = 128;
    c->intermediate_size = 256;
    c->moe_intermediate_size = 128;
    c->num_hidden_layers = 3;
    c->first_k_dense_replace = 1;
    c->num_attention_heads = 4;
    c->q_lora_rank = q ? 128 : 0;
    c->kv_lora_rank = 64;
    c->qk_nope_head_dim = 32;
    c->qk_rope_head_dim = 16;
    c->v_head_dim = 32;  /* o_proj rows of 4 x 32 = 128 */
    c->n_shared_experts = shared;
    c->n_routed_experts = 4;
    c->num_experts_per_tok = 4;
    c->n_group = 1;
    c->topk_group = 1;
    c->routed_scaling_factor = 1.5;
    c->norm_topk_prob = 1;
    c->rms_norm_eps = 1e-6;
    c->max_position_embeddings = 512;
    c->initializer_range = 0.02;
    c->rope_theta = 10000;
    c->rope_interleave = (int)(test_rand() & 1);
    c->bos_token_id = c->eos_token_id = -1;
}

/* top-2 gap of a row over its rms */
static double gap_rms(const float *x, int V)
{
    double s = 0;
    for (int v = 0; v < V; v++)
        s += (double)x[v] * x[v];
    return top2_gap(x, V) / (sqrt(s / V) + 1e-30);
}

/* Logits of the prompt's last row and of STEPS decode steps (slot 0) into lg. */
static int run_seq(infer *f, const int32_t *ids, float *lg, dsv3_err *e)
{
    int V = infer_vocab(f), z = 0;
    infer_slot_clear(f, 0);
    if (infer_prefill(f, 0, ids, P, lg, e))
        return -1;
    for (int t = P; t < P + STEPS; t++)
        if (infer_forward(f, 1, &z, &ids[t], NULL, lg + (size_t)(t - P + 1) * V, e))
            return -1;
    return 0;
}

static int make_gpu(infer **f, const char *dir, int fp8, dsv3_err *e)
{
    if (fp8)
        setenv("DSV3_GINFER_FP8", "1", 1);
    else
        unsetenv("DSV3_GINFER_FP8");
    int rc = infer_new_gpu_dir(f, dir, P + STEPS + 4, 1, 0, e);
    unsetenv("DSV3_GINFER_FP8");
    return rc;
}

static void check_model(int q, int shared)
{
    dsv3_config c;
    fp8_config(&c, q, shared);
    dsv3_model m, mc;
    dsv3_err e;
    if (ginfer_random_model(&m, &c, 0.1))
        return;
    char root[] = "/tmp/dsv3-ginfer-fp8-XXXXXX", a[64], qd[64], cmd[128];
    REQUIRE(mkdtemp(root) != NULL);
    snprintf(a, sizeof a, "%s/f32", root);
    snprintf(qd, sizeof qd, "%s/fp8", root);
    quant_opts qo = {.threads = 1, .progress = PROGRESS_OFF};
    quant_stats qs;
    int ok = model_save(&m, a, &e) == 0 && quant_folder(a, qd, &qo, &qs, &e) == 0 &&
             model_load_flags(&mc, qd, MODEL_LOAD_NO_MTP, &e) == 0;
    CHECKF(ok, "%s", e.msg);
    int V = c.vocab_size, n = STEPS + 1;
    int32_t ids[P + STEPS];
    for (int t = 0; t < P + STEPS; t++)
        ids[t] = (int32_t)(test_rand() % (uint64_t)V);
    size_t bytes = (size_t)n * V * 4;
    float *la = malloc(bytes), *la2 = malloc(bytes), *lb = malloc(bytes), *lc = malloc(bytes);
    infer *f[3] = {0};
    ok = ok && la && la2 && lb && lc && make_gpu(&f[0], qd, 1, &e) == 0 &&
         run_seq(f[0], ids, la, &e) == 0 && run_seq(f[0], ids, la2, &e) == 0 &&
         make_gpu(&f[1], qd, 0, &e) == 0 && run_seq(f[1], ids, lb, &e) == 0 &&
         infer_new(&f[2], &mc, P + STEPS + 4, 1, &e) == 0 && run_seq(f[2], ids, lc, &e) == 0;
    CHECKF(ok, "%s", e.msg);
    if (ok) {
        CHECKF(strstr(infer_device(f[0]), "fp8") != NULL, "FP8 engine: %s", infer_device(f[0]));
        CHECKF(strstr(infer_device(f[1]), "fp8") == NULL, "bf16 engine: %s", infer_device(f[1]));
        CHECK(memcmp(la, la2, bytes) == 0);
        double wac = 0, wab = 0, wbc = 0, rac[STEPS + 1], rab[STEPS + 1];
        int checked = 0;
        for (int s = 0; s < n; s++) {
            const float *ra = la + (size_t)s * V, *rb = lb + (size_t)s * V,
                        *rc = lc + (size_t)s * V;
            double ac = rel(ra, rc, V), ab = rel(ra, rb, V), bc = rel(rb, rc, V);
            wac = ac > wac ? ac : wac;
            wab = ab > wab ? ab : wab;
            wbc = bc > wbc ? bc : wbc;
            rac[s] = ac;
            rab[s] = ab;
            CHECKF(ac <= 3 * BF16_BOUND, "q %d shared %d row %d: FP8 engine vs CPU rel err %.3g",
                   q, shared, s, ac);
            CHECKF(ab <= 3 * BF16_BOUND, "q %d shared %d row %d: FP8 vs bf16 engine rel err %.3g",
                   q, shared, s, ab);
            if (gap_rms(rc, V) > 0.25) {
                checked++;
                CHECKF(argmax(ra, V) == argmax(rc, V), "row %d: FP8 greedy %d, CPU %d", s,
                       argmax(ra, V), argmax(rc, V));
                CHECKF(argmax(ra, V) == argmax(rb, V), "row %d: FP8 greedy %d, bf16 %d", s,
                       argmax(ra, V), argmax(rb, V));
            }
        }
        qsort(rac, n, sizeof *rac, cmp_double);
        qsort(rab, n, sizeof *rab, cmp_double);
        CHECKF(rac[n / 2] <= BF16_BOUND, "FP8 engine vs CPU: median rel err %.3g", rac[n / 2]);
        /* each engine within BF16_BOUND of the CPU: their distance within twice that */
        CHECKF(rab[n / 2] <= 2 * BF16_BOUND, "FP8 vs bf16 engine: median rel err %.3g",
               rab[n / 2]);
        printf("# ginfer fp8 (q %d, shared %d, %d weights FP8): worst row rel err FP8-CPU %.3g, "
               "FP8-bf16 %.3g, bf16-CPU %.3g; greedy checked on %d/%d rows\n", q, shared,
               qs.n_quant, wac, wab, wbc, checked, n);
    }
    for (int i = 0; i < 3; i++)
        infer_free(f[i]);
    free(la);
    free(la2);
    free(lb);
    free(lc);
    if (ok)
        model_free(&mc);
    model_free(&m);
    snprintf(cmd, sizeof cmd, "rm -rf %s", root);
    CHECK(system(cmd) == 0);
}

static void test_fp8_q_lora_one_shared(void)
{
    GT_NEED_GPU();
    check_model(1, 1);
}

static void test_fp8_no_q_lora_two_shared(void)
{
    GT_NEED_GPU();
    check_model(0, 2);
}

/* A folder without FP8 tensors: DSV3_GINFER_FP8=1 leaves the engine as it is (bitwise). */
static void test_bf16_folder_inert(void)
{
    GT_NEED_GPU();
    dsv3_config c;
    fp8_config(&c, 1, 1);
    dsv3_model m;
    dsv3_err e;
    if (ginfer_random_model(&m, &c, 0.1))
        return;
    char root[] = "/tmp/dsv3-ginfer-fp8-XXXXXX", cmd[128];
    REQUIRE(mkdtemp(root) != NULL);
    int V = c.vocab_size;
    int32_t ids[P + STEPS];
    for (int t = 0; t < P + STEPS; t++)
        ids[t] = (int32_t)(test_rand() % (uint64_t)V);
    size_t bytes = (size_t)(STEPS + 1) * V * 4;
    float *la = malloc(bytes), *lb = malloc(bytes);
    infer *f[2] = {0};
    int ok = la && lb && model_save(&m, root, &e) == 0 && make_gpu(&f[0], root, 1, &e) == 0 &&
             run_seq(f[0], ids, la, &e) == 0 && make_gpu(&f[1], root, 0, &e) == 0 &&
             run_seq(f[1], ids, lb, &e) == 0;
    CHECKF(ok, "%s", e.msg);
    CHECK(ok && strstr(infer_device(f[0]), "fp8") == NULL);
    CHECK(ok && memcmp(la, lb, bytes) == 0);
    for (int i = 0; i < 2; i++)
        infer_free(f[i]);
    free(la);
    free(lb);
    model_free(&m);
    snprintf(cmd, sizeof cmd, "rm -rf %s", root);
    CHECK(system(cmd) == 0);
}

int main(void)
{
    test_seed();
    RUN(test_fp8_q_lora_one_shared);
    RUN(test_fp8_no_q_lora_two_shared);
    RUN(test_bf16_folder_inert);
    TEST_EXIT();
}
