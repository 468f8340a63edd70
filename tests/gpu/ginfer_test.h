/* ginfer_test.h: what the GPU inference tests (tests/gpu/test_ginfer*) share: the random
 * tiny model they build, and the row measures they compare logits with. The model: sizes the GPU kernels take (hidden 64, MLA heads of 16 + 8 / 16 with a 32-wide
 * latent, 16 routed experts in 4 groups of which 2 are searched, one dense layer then MoE),
 * and per model a draw of what changes the code paths: vocabulary, heads, a shared expert
 * or none, experts per token, routed scale, normalised top-k, interleaved RoPE. q_lora on
 * (48) or off as asked. Tests override fields after it (layers, shared experts, ...). */
#ifndef DSV3_GINFER_TEST_H
#define DSV3_GINFER_TEST_H

#include <math.h>
#include <string.h>

#include "../../lib/config.h"
#include "../../lib/infer.h"
#include "../../lib/model.h"
#include "../test.h"

static __attribute__((unused)) void ginfer_random_config(dsv3_config *c, int q)
{
    memset(c, 0, sizeof *c);
    c->vocab_size = 256 + 8 * (int)(test_rand() % 32);
    c->hidden_size = 64;
    c->intermediate_size = 96;
    c->moe_intermediate_size = 32;
    c->num_hidden_layers = 3;
    c->first_k_dense_replace = 1;
    c->num_attention_heads = 4 + 4 * (int)(test_rand() % 3);
    c->q_lora_rank = q ? 48 : 0;
    c->kv_lora_rank = 32;
    c->qk_nope_head_dim = 16;
    c->qk_rope_head_dim = 8;
    c->v_head_dim = 16;
    c->n_shared_experts = (int)(test_rand() % 2);
    c->n_group = 4;
    c->n_routed_experts = 16;
    c->topk_group = 2;
    c->num_experts_per_tok = 1 + (int)(test_rand() % 4);
    c->routed_scaling_factor = 1 + 2 * ((test_rand() >> 11) * 0x1p-53);
    c->norm_topk_prob = (int)(test_rand() & 1);
    c->rms_norm_eps = 1e-6;
    c->max_position_embeddings = 512;
    c->initializer_range = 0.02;
    c->rope_theta = 10000;
    c->rope_interleave = (int)(test_rand() & 1);
    c->bos_token_id = c->eos_token_id = -1;
}

/* model_init and random weights of standard deviation sd (seeded from test_rand) for config
 * c; 0, or -1 with the failure recorded (the caller leaves its case). */
static __attribute__((unused)) int ginfer_random_model(dsv3_model *m, dsv3_config *c, double sd)
{
    dsv3_err e;
    if (model_init(m, c, &e)) {
        CHECKF(0, "%s", e.msg);
        return -1;
    }
    model_init_random(m, test_rand(), sd);
    return 0;
}

/* n token ids drawn uniformly from [0, V). */
static __attribute__((unused)) void ginfer_random_ids(int32_t *ids, int n, int V)
{
    for (int t = 0; t < n; t++)
        ids[t] = (int32_t)(test_rand() % (uint64_t)V);
}

/* A teacher-forced run through engine f: slots 0..ns-1 cleared and prefilled with prompt k
 * (plen[k] tokens of row k of prompt [ns][maxp]), then `steps` decode steps, step s of the
 * first n_of(s) slots taking token s of their row of toks [ns][steps]; every row's logits in
 * order into lg (V a row), their count into *rows. */
static __attribute__((unused)) int ginfer_teacher_run(infer *f, int ns, const int32_t *prompt,
                                                      int maxp, const int *plen,
                                                      const int32_t *toks, int steps,
                                                      int (*n_of)(int s), int V, float *lg,
                                                      int *rows, dsv3_err *e)
{
    int row = 0, slot[64];
    int32_t in[64];
    for (int k = 0; k < ns; k++) {
        infer_slot_clear(f, k);
        if (infer_prefill(f, k, prompt + (size_t)k * maxp, plen[k], lg + (size_t)row++ * V, e))
            return -1;
    }
    for (int s = 0; s < steps; s++) {
        int n = n_of(s);
        if (n > ns || n > 64)
            return err_set(e, "ginfer_teacher_run: a step of %d rows over %d slots", n, ns);
        for (int k = 0; k < n; k++) {
            slot[k] = k;
            in[k] = toks[(size_t)k * steps + s];
        }
        if (infer_forward(f, n, slot, in, NULL, lg + (size_t)row * V, e))
            return -1;
        row += n;
    }
    *rows = row;
    return 0;
}

/* ||a - b|| / ||b|| over a row of n values (||a - b|| where b is zero). */
static __attribute__((unused)) double rel(const float *a, const float *b, int n)
{
    double d = 0, s = 0;
    for (int v = 0; v < n; v++) {
        d += ((double)a[v] - b[v]) * ((double)a[v] - b[v]);
        s += (double)b[v] * b[v];
    }
    return s > 0 ? sqrt(d / s) : sqrt(d);
}

/* The first index of a row's largest value. */
static __attribute__((unused)) int argmax(const float *x, int n)
{
    int b = 0;
    for (int v = 1; v < n; v++)
        if (x[v] > x[b])
            b = v;
    return b;
}

/* The gap between the two largest values of a row. */
static __attribute__((unused)) double top2_gap(const float *x, int n)
{
    float a = -INFINITY, b = -INFINITY;
    for (int v = 0; v < n; v++)
        if (x[v] > a) {
            b = a;
            a = x[v];
        } else if (x[v] > b) {
            b = x[v];
        }
    return (double)a - b;
}

static __attribute__((unused)) int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

#endif
