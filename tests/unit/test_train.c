/* Tests of lib/train's pieces: the step-wide expert-bias update against the model's own rule
 * (model_balance_update) on one forward of a fresh random model, and the bias moving load
 * toward balance on a planted imbalanced router; the SFT rows of hand-built records. */
#include <math.h>

#include "../../lib/train.h"
#include "../test.h"

static double urand(void)
{
    return (test_rand() >> 11) * 0x1p-53;
}

static int small_model_mtp(dsv3_model *m, int D)
{
    dsv3_config c;
    memset(&c, 0, sizeof c);
    c.vocab_size = 31;
    c.hidden_size = 16;
    c.intermediate_size = 12;
    c.moe_intermediate_size = 6;
    c.num_hidden_layers = 3;
    c.first_k_dense_replace = 1;
    c.num_attention_heads = 2;
    c.q_lora_rank = 0;
    c.kv_lora_rank = 6;
    c.qk_nope_head_dim = 4;
    c.qk_rope_head_dim = 4;
    c.v_head_dim = 4;
    c.n_shared_experts = 1;
    c.n_routed_experts = 8;
    c.n_group = 2;
    c.topk_group = 2;
    c.num_experts_per_tok = 2;
    c.routed_scaling_factor = 2.5;
    c.norm_topk_prob = 1;
    c.rms_norm_eps = 1e-6;
    c.max_position_embeddings = 64;
    c.initializer_range = 0.02;
    c.rope_theta = 10000;
    c.rope_interleave = 1;
    c.bos_token_id = c.eos_token_id = -1;
    c.num_nextn_predict_layers = D;
    dsv3_err e;
    if (model_init(m, &c, &e)) {
        fprintf(stderr, "    %s\n", e.msg);
        return -1;
    }
    model_init_random(m, test_rand(), 0.3);
    return 0;
}

static int small_model(dsv3_model *m)
{
    return small_model_mtp(m, 0);
}

/* One forward's counts through train_balance_update give the biases model_balance_update
 * gives, bit for bit: the main layers' and, with two MTP modules run (targets given,
 * lambda on; documents packed so some rows of their blocks are placeholders), the MTP
 * blocks' from model_mtp_expert_load's counts and slots. */
static void test_balance_matches_model(void)
{
    for (int D = 0; D <= 2; D += 2) {
        dsv3_model m;
        REQUIRE(small_model_mtp(&m, D) == 0);
        m.mtp_lambda = D ? 0.3f : 0.0f;
        const int B = 2, T = 12, L = m.cfg.num_hidden_layers, E = m.cfg.n_routed_experts;
        const int NL = L + D;
        dsv3_err e;
        model_acts *a = model_acts_new(&m, B, T, &e);
        REQUIRE(a != NULL);
        int32_t ids[24], tg[24], seg[24];
        for (int i = 0; i < B * T; i++) {
            ids[i] = (int32_t)(test_rand() % (uint64_t)m.cfg.vocab_size);
            tg[i] = (int32_t)(test_rand() % (uint64_t)m.cfg.vocab_size);
            seg[i] = i % T < 7 ? 0 : 1;
        }
        REQUIRE(model_acts_set_segments(a, seg, NULL) == 0);
        REQUIRE(model_forward(&m, a, ids, D ? tg : NULL, NULL, &e) == 0);
        int64_t *counts = calloc((size_t)NL * E, sizeof *counts), slots[2] = {0, 0};
        for (int l = 0; l < L; l++)
            model_expert_load(&m, a, l, counts + (size_t)l * E);
        for (int k = 0; k < D; k++)
            REQUIRE(model_mtp_expert_load(&m, a, k, counts + (size_t)(L + k) * E, &slots[k]) == 0);
        /* module k+1 skips the last k+1 rows of each document: 2 documents per sequence */
        for (int k = 0; k < D; k++)
            CHECK(slots[k] == (int64_t)(B * (T - 2 * (k + 1))) * m.cfg.num_experts_per_tok);
        float **bias = malloc((size_t)NL * sizeof *bias);
        for (int l = 0; l < NL; l++)
            bias[l] = l < L ? m.w.layers[l].router_bias : m.w.mtp[l - L].block.router_bias;
        float *bias0 = calloc((size_t)NL * E, sizeof *bias0);
        for (int l = 1; l < NL; l++)
            for (int i = 0; i < E; i++)
                bias0[l * E + i] = bias[l][i] = (float)(urand() * 0.01);
        float gamma = (float)(0.001 + urand() * 0.01);
        model_balance_update(&m, a, gamma);
        float *want = malloc((size_t)NL * E * sizeof *want);
        for (int l = 1; l < NL; l++) {
            memcpy(want + l * E, bias[l], (size_t)E * sizeof *want);
            memcpy(bias[l], bias0 + l * E, (size_t)E * sizeof *want);
        }
        train_balance_update(&m, counts, B * T, slots, gamma);
        int moved = 0, mtp_moved = 0;
        for (int l = 1; l < NL; l++)
            for (int i = 0; i < E; i++) {
                CHECK(bias[l][i] == want[l * E + i]);
                moved += bias[l][i] != bias0[l * E + i];
                mtp_moved += l >= L && bias[l][i] != bias0[l * E + i];
            }
        CHECK(moved > 0);
        CHECK(mtp_moved > 0 || D == 0);
        /* Without the MTP slots the MTP biases stay. */
        for (int l = 1; l < NL; l++)
            memcpy(bias[l], bias0 + l * E, (size_t)E * sizeof *want);
        train_balance_update(&m, counts, B * T, NULL, gamma);
        for (int l = L; l < NL; l++)
            CHECK(memcmp(bias[l], bias0 + l * E, (size_t)E * sizeof *want) == 0);
        free(counts);
        free(bias);
        free(bias0);
        free(want);
        model_acts_free(a);
        model_free(&m);
    }
}

/* A router planted to prefer experts 0 and 1 of every layer: repeated updates over accumulated
 * steps (two forwards each) bring the busiest expert's load toward the mean. */
static void test_balance_moves_toward_balance(void)
{
    dsv3_model m;
    REQUIRE(small_model(&m) == 0);
    const int B = 2, T = 16, L = m.cfg.num_hidden_layers, E = m.cfg.n_routed_experts;
    int K = m.cfg.num_experts_per_tok;
    /* Selection biases far above the spread of the sigmoid affinities: every token picks
     * experts 0 and 1 (max/mean load E/K = 4). */
    for (int l = 1; l < L; l++) {
        m.w.layers[l].router_bias[0] = 1.0f;
        m.w.layers[l].router_bias[1] = 1.0f;
    }
    dsv3_err e;
    model_acts *a = model_acts_new(&m, B, T, &e);
    REQUIRE(a != NULL);
    int64_t *counts = calloc((size_t)L * E, sizeof *counts), *tmp = calloc((size_t)E, 8);
    int32_t ids[32];
    double first = 0, last = 0;
    for (int step = 0; step < 100; step++) {
        memset(counts, 0, (size_t)L * E * sizeof *counts);
        for (int f = 0; f < 2; f++) {
            for (int i = 0; i < B * T; i++)
                ids[i] = (int32_t)(test_rand() % (uint64_t)m.cfg.vocab_size);
            REQUIRE(model_forward(&m, a, ids, NULL, NULL, &e) == 0);
            for (int l = 1; l < L; l++) {
                model_expert_load(&m, a, l, tmp);
                for (int i = 0; i < E; i++)
                    counts[l * E + i] += tmp[i];
            }
        }
        double worst = 0, mean = 2.0 * B * T * K / E;
        for (int l = 1; l < L; l++)
            for (int i = 0; i < E; i++)
                worst = fmax(worst, counts[l * E + i] / mean);
        if (step == 0)
            first = worst;
        if (step >= 80)
            last += worst / 20;  /* the mean of the last 20: the biases settle and dither */
        train_balance_update(&m, counts, 2 * B * T, NULL, 0.02f);
    }
    CHECKF(first > 3 && last < first * 0.6, "max/mean load %.2f -> %.2f", first, last);
    free(counts);
    free(tmp);
    model_acts_free(a);
    model_free(&m);
}

/* Two documents in a record of L = 12: "3 5 6 4 7 8 1" (user 3, prompt 5 6, assistant 4,
 * response 7 8, EOS 1) and "3 9 4 10 1" continuing past the record (token L is 2). */
static void test_sft_unpack(void)
{
    enum { L = 12 };
    uint32_t tok[L] = {3, 5, 6, 4, 7, 8, 1, 3, 9, 4, 10, 1};
    uint32_t tgt[L], seg[L] = {0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1};
    uint8_t mask[L];
    for (int i = 0; i < L; i++) {
        tgt[i] = i + 1 < L ? tok[i + 1] : 2;
        mask[i] = 1;
    }
    int32_t ids[L * L], out[L * L];
    int n = train_sft_unpack(tok, tgt, mask, seg, L, 3, 4, ids, out);
    REQUIRE(n == 2);
    const int32_t want_ids0[L] = {3, 5, 6, 4, 7, 8, 1, 0, 0, 0, 0, 0};
    /* Targets 7 8 1 (the response and its EOS); not the next document's first token. */
    const int32_t want_t0[L] = {-1, -1, -1, 7, 8, 1, -1, -1, -1, -1, -1, -1};
    const int32_t want_ids1[L] = {3, 9, 4, 10, 1, 0, 0, 0, 0, 0, 0, 0};
    /* The last target (token L = 2) is in the same document: counted. */
    const int32_t want_t1[L] = {-1, -1, 10, 1, 2, -1, -1, -1, -1, -1, -1, -1};
    CHECK(memcmp(ids, want_ids0, sizeof want_ids0) == 0);
    CHECK(memcmp(out, want_t0, sizeof want_t0) == 0);
    CHECK(memcmp(ids + L, want_ids1, sizeof want_ids1) == 0);
    CHECK(memcmp(out + L, want_t1, sizeof want_t1) == 0);
    /* The mask (padding) wins; without an assistant marker a document has no targets and
     * is left out; a second user turn ends the response. */
    mask[4] = 0;
    n = train_sft_unpack(tok, tgt, mask, seg, L, 3, 4, ids, out);
    REQUIRE(n == 2);
    CHECK(out[3] == 7 && out[4] == -1 && out[5] == 1);
    mask[4] = 1;
    tok[9] = 11;  /* document 2 loses its assistant marker */
    tgt[8] = 11;
    n = train_sft_unpack(tok, tgt, mask, seg, L, 3, 4, ids, out);
    CHECK(n == 1);
    uint32_t tok2[L] = {4, 7, 3, 8, 4, 9, 1, 1, 1, 1, 1, 1}, seg2[L] = {0};
    for (int i = 0; i < L; i++)
        tgt[i] = i + 1 < L ? tok2[i + 1] : 1;
    n = train_sft_unpack(tok2, tgt, mask, seg2, L, 3, 4, ids, out);
    REQUIRE(n == 1);
    const int32_t want_t2[L] = {7, -1, -1, -1, 9, 1, 1, 1, 1, 1, 1, 1};
    CHECK(memcmp(out, want_t2, sizeof want_t2) == 0);
}

/* Random SFT records: documents of 1 to 9 tokens, markers user 3 and assistant 4 placed at
 * random among ordinary tokens, padding at the end of some records (mask 0). */
static void random_sft_records(uint32_t *tok, uint32_t *tgt, uint8_t *mask, uint32_t *seg,
                               int R, int L, int V)
{
    for (int r = 0; r < R; r++) {
        uint32_t s = 0, left = 1 + (uint32_t)(test_rand() % 9);
        int pad_from = test_rand() % 2 ? L - (int)(test_rand() % 4) : L;
        for (int i = 0; i < L; i++) {
            size_t n = (size_t)r * L + i;
            if (!left) {
                s++;
                left = 1 + (uint32_t)(test_rand() % 9);
            }
            left--;
            uint64_t x = test_rand() % 10;
            tok[n] = x == 0 ? 3 : x < 3 ? 4 : 5 + (uint32_t)(test_rand() % (uint64_t)(V - 5));
            seg[n] = s;
            mask[n] = i < pad_from - 1;
        }
        for (int i = 0; i < L; i++) {
            size_t n = (size_t)r * L + i;
            tgt[n] = i + 1 < L ? tok[n + 1] : 5;
        }
    }
}

/* SFT: records kept whole with attention masked by document (train_sft_row and
 * model_acts_set_segments) give the loss and the gradients of the former method, one
 * padded row per document (train_sft_unpack), up to float rounding; MTP on (two modules),
 * the balance loss off (it is per sequence, and the sequences differ). */
static void test_sft_packed_matches_unpacked(void)
{
    enum { R = 3, L = 16 };
    for (int trial = 0; trial < 3; trial++) {
        dsv3_model m;
        REQUIRE(small_model_mtp(&m, 2) == 0);
        m.mtp_lambda = 0.3f;
        int V = m.cfg.vocab_size;
        uint32_t tok[R * L], tgt[R * L], seg[R * L];
        uint8_t mask[R * L];
        random_sft_records(tok, tgt, mask, seg, R, L, V);
        int32_t ids[R * L], t1[R * L], sg[R * L], ps[R * L];
        int32_t uid[R * L * L], ut[R * L * L];
        int rows = 0, prow = 0, counted = 0;
        for (int r = 0; r < R; r++) {
            int n = train_sft_row(tok + r * L, tgt + r * L, mask + r * L, seg + r * L, L, 3, 4,
                                  ids + prow * L, t1 + prow * L, sg + prow * L, ps + prow * L);
            REQUIRE(n >= 0);
            counted += n;
            prow += n > 0;
            int u = train_sft_unpack(tok + r * L, tgt + r * L, mask + r * L, seg + r * L, L, 3,
                                     4, uid + rows * L, ut + rows * L);
            REQUIRE(u >= 0);
            rows += u;
        }
        int ucount = 0;
        for (int i = 0; i < rows * L; i++)
            ucount += ut[i] >= 0;
        CHECKF(counted == ucount, "%d targets packed, %d unpacked", counted, ucount);
        if (!counted || !rows) {
            model_free(&m);
            continue;
        }
        dsv3_err e;
        model_acts *a = model_acts_new(&m, prow, L, &e), *u = model_acts_new(&m, rows, L, &e);
        REQUIRE(a && u);
        REQUIRE(model_acts_set_segments(a, sg, ps) == 0);
        float lp, lu;
        model_zero_grad(&m);
        REQUIRE(model_forward(&m, a, ids, t1, &lp, &e) == 0);
        REQUIRE(model_backward(&m, a, ids, t1, &e) == 0);
        float *g = malloc(m.n_params * sizeof *g);
        memcpy(g, m.grads, m.n_params * sizeof *g);
        model_zero_grad(&m);
        REQUIRE(model_forward(&m, u, uid, ut, &lu, &e) == 0);
        REQUIRE(model_backward(&m, u, uid, ut, &e) == 0);
        model_losses la, lb;
        model_acts_losses(a, &la);
        model_acts_losses(u, &lb);
        CHECKF(fabs(la.main - lb.main) <= 1e-6 * lb.main && fabs(la.mtp - lb.mtp) <= 1e-6 * lb.mtp,
               "loss %.9g/%.9g, mtp %.9g/%.9g", la.main, lb.main, la.mtp, lb.mtp);
        double mx = 0, worst = 0;
        for (size_t i = 0; i < m.n_params; i++) {
            mx = fmax(mx, fabs(m.grads[i]));
            worst = fmax(worst, fabs(g[i] - m.grads[i]));
        }
        CHECKF(mx > 0 && worst <= 1e-5 * mx, "gradients differ by %g (largest %g)", worst, mx);
        free(g);
        model_acts_free(a);
        model_acts_free(u);
        model_free(&m);
    }
}

/* The step's normalisers (model_count_targets summed, the sequences): R rows run as R
 * forwards of one row add up to the gradient and losses of one forward over all R, with
 * the MTP loss (two modules, documents packed) and the balance loss on; without them the
 * sum of per-forward means would not. */
static void test_step_normalisers(void)
{
    enum { R = 4, L = 12 };
    dsv3_model m;
    REQUIRE(small_model_mtp(&m, 2) == 0);
    m.mtp_lambda = 0.3f;
    m.balance_alpha = 0.05f;
    int V = m.cfg.vocab_size;
    int32_t ids[R * L], tg[R * L], seg[R * L];
    for (int i = 0; i < R * L; i++) {
        ids[i] = (int32_t)(test_rand() % (uint64_t)V);
        tg[i] = test_rand() % 4 == 0 ? -1 : (int32_t)(test_rand() % (uint64_t)V);
        seg[i] = i % L < 2 + i / L ? 0 : 1;  /* rows of different splits */
    }
    tg[L + 3] = tg[L + 4] = tg[L + 5] = -1;
    dsv3_err e;
    model_acts *all = model_acts_new(&m, R, L, &e), *one = model_acts_new(&m, 1, L, &e);
    REQUIRE(all && one);
    REQUIRE(model_acts_set_segments(all, seg, NULL) == 0);
    model_zero_grad(&m);
    REQUIRE(model_forward(&m, all, ids, tg, NULL, &e) == 0);
    REQUIRE(model_backward(&m, all, ids, tg, &e) == 0);
    model_losses want;
    model_acts_losses(all, &want);
    float *g = malloc(m.n_params * sizeof *g);
    memcpy(g, m.grads, m.n_params * sizeof *g);
    int64_t main = 0, mtp[2] = {0, 0}, rm, rmtp[2];
    for (int r = 0; r < R; r++) {
        model_count_targets(&m, tg + r * L, seg + r * L, 1, L, &rm, rmtp);
        main += rm;
        mtp[0] += rmtp[0];
        mtp[1] += rmtp[1];
    }
    m.norm_main = main;
    m.norm_mtp = mtp;
    m.norm_seqs = R;
    model_zero_grad(&m);
    double total = 0, parts[2] = {0, 0};
    for (int r = 0; r < R; r++) {
        REQUIRE(model_acts_set_segments(one, seg + r * L, NULL) == 0);
        REQUIRE(model_forward(&m, one, ids + r * L, tg + r * L, NULL, &e) == 0);
        REQUIRE(model_backward(&m, one, ids + r * L, tg + r * L, &e) == 0);
        model_losses l;
        model_acts_losses(one, &l);
        total += l.total;
        parts[0] += l.mtp;
        parts[1] += l.balance;
    }
    CHECKF(fabs(total - want.total) <= 1e-6 * want.total && want.mtp > 0 && want.balance > 0 &&
           fabs(parts[0] - want.mtp) <= 1e-6 * want.mtp &&
           fabs(parts[1] - want.balance) <= 1e-6 * want.balance,
           "total %.9g vs %.9g, mtp %.9g vs %.9g, balance %.9g vs %.9g", total, want.total,
           parts[0], want.mtp, parts[1], want.balance);
    double mx = 0, worst = 0;
    for (size_t i = 0; i < m.n_params; i++) {
        mx = fmax(mx, fabs(g[i]));
        worst = fmax(worst, fabs(g[i] - m.grads[i]));
    }
    CHECKF(mx > 0 && worst <= 1e-5 * mx, "gradients differ by %g (largest %g)", worst, mx);
    free(g);
    model_acts_free(all);
    model_acts_free(one);
    model_free(&m);
}

int main(void)
{
    test_seed();
    RUN(test_balance_matches_model);
    RUN(test_balance_moves_toward_balance);
    RUN(test_sft_unpack);
    RUN(test_sft_packed_matches_unpacked);
    RUN(test_step_normalisers);
    TEST_EXIT();
}
