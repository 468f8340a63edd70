/* Tests of lib/model and lib/safetensors: the whole model's gradient against finite
 * differences (routing held fixed) on fresh random tiny configs, parameter counts against
 * the layout, checkpoint round trips, and damaged or mismatched checkpoints refused with
 * the file and the tensor named. */
#include <math.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../../lib/model.h"
#include "../../lib/ops.h"
#include "../../lib/safetensors.h"
#include "../test.h"

static double urand(void)
{
    return (test_rand() >> 11) * 0x1p-53;
}

/* A random tiny config: q compression or not, YaRN or not, interleaved or not, grouped
 * routing, one or two dense layers. */
static void random_config(dsv3_config *c)
{
    memset(c, 0, sizeof *c);
    c->vocab_size = 20 + (int)(test_rand() % 20);
    c->hidden_size = 8 + 4 * (int)(test_rand() % 3);
    c->intermediate_size = 12;
    c->moe_intermediate_size = 6;
    c->num_hidden_layers = 2 + (int)(test_rand() % 2);
    c->first_k_dense_replace = 1 + (int)(test_rand() % 2);
    if (c->first_k_dense_replace >= c->num_hidden_layers)
        c->first_k_dense_replace = c->num_hidden_layers - 1;
    c->num_attention_heads = 1 + (int)(test_rand() % 3);
    c->q_lora_rank = test_rand() & 1 ? 6 : 0;
    c->kv_lora_rank = 6;
    c->qk_nope_head_dim = 4;
    c->qk_rope_head_dim = 4;
    c->v_head_dim = 3 + (int)(test_rand() % 3);
    c->n_shared_experts = (int)(test_rand() % 3);
    c->n_group = 1 << (test_rand() % 3);
    c->n_routed_experts = c->n_group * (2 + (int)(test_rand() % 2));
    c->topk_group = 1 + (int)(test_rand() % c->n_group);
    c->num_experts_per_tok = 1 + (int)(test_rand() % (c->topk_group * 2));
    c->routed_scaling_factor = 1 + 2 * urand();
    c->norm_topk_prob = (int)(test_rand() & 1);
    c->rms_norm_eps = 1e-6;
    c->max_position_embeddings = 64;
    c->initializer_range = 0.02;
    c->rope_theta = 10000;
    c->rope_interleave = (int)(test_rand() & 1);
    if (test_rand() & 1) {
        c->rope_yarn = 1;
        c->yarn_factor = 4;
        c->yarn_original_max_position_embeddings = 8;
        c->yarn_beta_fast = 32;
        c->yarn_beta_slow = 1;
        c->yarn_mscale = 0.9;
        c->yarn_mscale_all_dim = 0.7;
        c->yarn_attention_factor = -1;
        c->yarn_truncate = 1;
    }
}

static double loss_of(dsv3_model *m, model_acts *a, const int32_t *ids, const int32_t *tg,
                      int N)
{
    float l;
    model_forward(m, a, ids, tg, &l, NULL);
    /* The total in double (cross-entropies summed in double from the logits, the balance
     * loss in double), so the finite difference is not float noise. */
    model_losses ls;
    model_acts_losses(a, &ls);
    double sum;
    int count;
    crossentropy_forward(&sum, &count, NULL, model_acts_logits(a), tg, N, m->cfg.vocab_size);
    if (fabs(ls.main - sum / count) > 1e-12 || fabs(ls.main - l) > 1e-5 * fabs(l))
        fprintf(stderr, "    main loss %.9g, *loss %.9g, recomputed %.9g\n", ls.main, l,
                sum / count);
    return ls.total;
}

/* d(loss)/d(*p) by central differences at h and h/2 combined by Richardson extrapolation
 * (error O(h^4)): the network's curvature is too large for plain O(h^2). */
static double richardson_fd(dsv3_model *m, model_acts *a, const int32_t *ids,
                            const int32_t *tg, int N, float *p, float h0)
{
    float p0 = *p;
    double d[2];
    for (int k = 0; k < 2; k++) {
        float h = k ? h0 / 2 : h0;
        *p = p0 + h;
        double lp = loss_of(m, a, ids, tg, N);
        *p = p0 - h;
        double lm = loss_of(m, a, ids, tg, N);
        *p = p0;
        d[k] = (lp - lm) / ((double)(p0 + h) - (double)(p0 - h));
    }
    return (4 * d[1] - d[0]) / 3;
}

static void test_gradient_finite_differences(void)
{
    /* Trial 0: the plain model; 1 and 2: with 1 or 2 MTP modules and the balance loss,
     * weighted far above V3's values so their gradients are not lost in the main one's;
     * 3: as 2 with documents packed in each sequence (attention masked by document,
     * positions restarting at each). */
    for (int trial = 0; trial < 4; trial++) {
        dsv3_config c;
        random_config(&c);
        c.num_nextn_predict_layers = trial < 3 ? trial : 2;
        dsv3_model m;
        dsv3_err e;
        REQUIRE(model_init(&m, &c, &e) == 0);
        model_init_random(&m, test_rand(), 0.2);
        m.mtp_lambda = trial ? (float)(0.3 + urand()) : 0;
        m.balance_alpha = trial ? (float)(0.5 + urand()) : 0;
        /* Norm weights and correction biases away from their trivial values. */
        for (int i = 0; i < m.n_t; i++) {
            const model_tensor *t = &m.t[i];
            if (strstr(t->name, "norm.weight") || !t->trainable)
                for (int64_t j = 0; j < t->numel; j++)
                    m.params[t->off + j] += (float)(0.2 * (urand() - 0.5));
        }
        int B = 2, T = trial == 3 ? 8 + (int)(test_rand() % 5) : 3 + (int)(test_rand() % 4);
        int N = B * T;
        int32_t ids[64], tg[64], seg[64], pos[64];
        for (int n = 0; n < N; n++) {
            ids[n] = (int32_t)(test_rand() % c.vocab_size);
            tg[n] = n % 5 == 4 ? -100 : (int32_t)(test_rand() % c.vocab_size);
            /* documents of 1 to 5 tokens */
            int start = n % T == 0 || (pos[n - 1] >= 4 || test_rand() % 3 == 0);
            seg[n] = n % T == 0 ? 0 : seg[n - 1] + start;
            pos[n] = start && n % T ? 0 : n % T ? pos[n - 1] + 1 : 0;
        }
        model_acts *a = model_acts_new(&m, B, T, &e);
        REQUIRE(a);
        if (trial == 3)
            REQUIRE(model_acts_set_segments(a, seg, pos) == 0);
        loss_of(&m, a, ids, tg, N);
        model_acts_freeze_routing(a, 1);
        model_zero_grad(&m);
        REQUIRE(model_backward(&m, a, ids, tg, &e) == 0);
        int bad = 0, checked = 0;
        for (int i = 0; i < m.n_t; i++) {
            const model_tensor *t = &m.t[i];
            if (!t->trainable)
                continue;
            for (int r = 0; r < 3; r++) {
                int64_t j = (int64_t)(test_rand() % (uint64_t)t->numel);
                float *p = &m.params[t->off + j];
                double an = m.grads[t->off + j];
                double fd = richardson_fd(&m, a, ids, tg, N, p, 1e-2f);
                /* Where the curvature is large (a draw in a few thousand), h = 1e-2 is
                 * outside the O(h^4) regime: a ten times smaller h decides. */
                if (fabs(fd - an) > 3e-2 * fabs(an) + 2e-4)
                    fd = richardson_fd(&m, a, ids, tg, N, p, 1e-3f);
                checked++;
                if (fabs(fd - an) > 3e-2 * fabs(an) + 2e-4) {
                    if (bad++ < 8)
                        fprintf(stderr, "    %s[%lld]: analytic %.6g, fd %.6g\n", t->name,
                                (long long)j, an, fd);
                }
            }
        }
        CHECKF(bad == 0,
               "%d of %d gradient entries off (q_lora %d, yarn %d, interleave %d, trial %d)",
               bad, checked, c.q_lora_rank, c.rope_yarn, c.rope_interleave, trial);
        if (trial) {
            model_losses ls;
            model_acts_losses(a, &ls);
            CHECKF(ls.mtp > 0 && ls.balance > 0 && ls.total > ls.main, "mtp %g balance %g",
                   ls.mtp, ls.balance);
        }
        model_acts_free(a);
        model_free(&m);
    }
}

static void test_counts_match_layout(void)
{
    for (int trial = 0; trial < 20; trial++) {
        dsv3_config c;
        random_config(&c);
        c.tie_word_embeddings = (int)(test_rand() & 1);
        c.num_nextn_predict_layers = (int)(test_rand() % 3);
        dsv3_model m;
        dsv3_err e;
        REQUIRE(model_init(&m, &c, &e) == 0);
        config_counts n;
        config_count_params(&c, &n);
        /* The MTP count includes each module's stored copies of embedding and head, which
         * share the main model's parameters here. */
        int64_t vh = (int64_t)c.vocab_size * c.hidden_size;
        int64_t want = n.total + n.mtp_total - 2 * vh * c.num_nextn_predict_layers;
        CHECKF((int64_t)m.n_params == want, "layout %zu, count %lld", m.n_params,
               (long long)want);
        model_free(&m);
    }
}

static char tmpdir[256];

static void test_save_load_roundtrip(void)
{
    dsv3_config c;
    random_config(&c);
    c.num_nextn_predict_layers = 1 + (int)(test_rand() % 2);
    dsv3_model m, m2;
    dsv3_err e;
    REQUIRE(model_init(&m, &c, &e) == 0);
    model_init_random(&m, test_rand(), 0);
    char dir[512], path[600];
    snprintf(dir, sizeof dir, "%s/ckpt", tmpdir);
    CHECKF(model_save(&m, dir, &e) == 0, "%s", e.msg);
    CHECKF(model_load(&m2, dir, &e) == 0, "%s", e.msg);
    if (m2.params) {
        CHECK(m2.n_params == m.n_params);
        CHECK(memcmp(m.params, m2.params, m.n_params * 4) == 0);
        CHECK(m2.cfg.rope_yarn == c.rope_yarn && m2.cfg.q_lora_rank == c.q_lora_rank);
        CHECK(m2.cfg.num_nextn_predict_layers == c.num_nextn_predict_layers);
        model_free(&m2);
    }
    /* DeepSeek's layout: the MTP layer stores copies of the embedding and the head. */
    st_file f;
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    REQUIRE(st_open(&f, path, &e) == 0);
    int L = c.num_hidden_layers;
    char name[96];
    snprintf(name, sizeof name, "model.layers.%d.embed_tokens.weight", L);
    const st_tensor *t = st_find(&f, name);
    CHECK(t && !memcmp(t->data, m.w.embed, (size_t)c.vocab_size * c.hidden_size * 4));
    snprintf(name, sizeof name, "model.layers.%d.shared_head.head.weight", L);
    t = st_find(&f, name);
    CHECK(t && !memcmp(t->data, m.w.lm_head, (size_t)c.vocab_size * c.hidden_size * 4));
    snprintf(name, sizeof name, "model.layers.%d.eh_proj.weight", L);
    t = st_find(&f, name);
    CHECK(t && t->shape[0] == c.hidden_size && t->shape[1] == 2 * c.hidden_size);
    st_close(&f);
    /* Dropping the MTP modules for inference: the main model is the same. */
    CHECKF(model_load_flags(&m2, dir, MODEL_LOAD_NO_MTP, &e) == 0, "%s", e.msg);
    if (m2.params) {
        CHECK(m2.cfg.num_nextn_predict_layers == 0 && m2.n_params < m.n_params);
        const model_tensor *a = model_find(&m, "model.norm.weight");
        const model_tensor *b = model_find(&m2, "model.norm.weight");
        CHECK(a && b && a->off == b->off);
        CHECK(memcmp(m.params, m2.params, m2.n_params * 4) == 0);
        model_free(&m2);
    }
    model_free(&m);
}

/* Writes a checkpoint from the fixture with one tensor changed by `how`, and expects the
 * load to fail with `needle` in the message. */
static void expect_bad_checkpoint(int how, const char *needle)
{
    dsv3_model m;
    dsv3_err e = {{0}};
    REQUIRE(model_load(&m, "tests/fixtures/hf/qlora_yarn", &e) == 0);
    char dir[512], path[600];
    snprintf(dir, sizeof dir, "%s/bad%d", tmpdir, how);
    mkdir(dir, 0777);
    snprintf(path, sizeof path, "%s/config.json", dir);
    REQUIRE(config_save(&m.cfg, path, &e) == 0);
    st_writer w = {0};
    for (int i = 0; i < m.n_t; i++) {
        const model_tensor *t = &m.t[i];
        int64_t shape[2] = {t->shape[0], t->shape[1]};
        if (how == 0 && i == 5)
            continue;  /* missing */
        if (how == 1 && i == 5)
            shape[0] = 1;  /* wrong shape (the data is longer than needed: still refused) */
        st_add(&w, t->name, ST_F32, t->ndim, shape, m.params + t->off);
    }
    if (how == 2)
        st_add(&w, "model.layers.0.mlp.surprise.weight", ST_F32, 1, (int64_t[]){4}, m.params);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    REQUIRE(st_write(&w, path, &e) == 0);
    st_writer_free(&w);
    dsv3_model m2;
    int rc = model_load(&m2, dir, &e);
    CHECK(rc == -1);
    if (rc == 0)
        model_free(&m2);
    else
        CHECKF(strstr(e.msg, needle) != NULL, "message '%s' lacks '%s'", e.msg, needle);
    model_free(&m);
}

static void test_bad_checkpoints(void)
{
    expect_bad_checkpoint(0, "is missing");
    expect_bad_checkpoint(1, "has shape [1");
    expect_bad_checkpoint(2, "surprise");
}

/* ---- safetensors damage ---- */

static int parse_bytes(const char *hdr, size_t data_len, dsv3_err *e)
{
    size_t hl = strlen(hdr), len = 8 + hl + data_len;
    unsigned char *buf = calloc(1, len);
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    memcpy(buf + 8, hdr, hl);
    st_file f;
    int rc = st_parse(&f, buf, len, "x.safetensors", e);
    if (rc == 0)
        st_close(&f);
    free(buf);
    return rc;
}

static void test_safetensors_damage(void)
{
    dsv3_err e;
    CHECK(parse_bytes("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8,
                      &e) == 0);
    struct {
        const char *hdr;
        size_t data;
        const char *needle;
    } bad[] = {
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,16]}}", 8, "outside"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8, "bytes for"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
         "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, "overlap"},
        {"{\"a\":{\"dtype\":\"Q9\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "unknown dtype"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, "shape"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8, "outside"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,8]}}",
         8, "overflow"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8, "data_offsets"},
        {"{\"a\":", 8, "JSON"},
        {"[1,2]", 0, "object"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        memset(&e, 0, sizeof e);
        int rc = parse_bytes(bad[i].hdr, bad[i].data, &e);
        CHECKF(rc == -1, "accepted: %s", bad[i].hdr);
        CHECKF(rc == 0 || (strstr(e.msg, bad[i].needle) && strstr(e.msg, "x.safetensors")),
               "'%s' lacks '%s'", e.msg, bad[i].needle);
    }
    /* A header length larger than the file, and a file shorter than 8 bytes. */
    unsigned char b[16] = {0xff, 0xff, 0, 0, 0, 0, 0, 0};
    st_file f;
    CHECK(st_parse(&f, b, sizeof b, "x", &e) == -1 && strstr(e.msg, "exceeds"));
    CHECK(st_parse(&f, b, 5, "x", &e) == -1 && strstr(e.msg, "too short"));
    /* Random single-byte damage to a real file never crashes (it may still parse). */
    st_file good;
    REQUIRE(st_open(&good, "tests/fixtures/hf/noq_plain/model.safetensors", &e) == 0);
    unsigned char *copy = malloc(good.size);
    for (int t = 0; t < 300; t++) {
        memcpy(copy, good.map, good.size);
        size_t hl = 8 + (size_t)(copy[0] | copy[1] << 8);
        copy[test_rand() % hl] = (unsigned char)test_rand();
        size_t len = t % 3 == 0 ? (size_t)(test_rand() % good.size) : good.size;
        if (st_parse(&f, copy, len, "fuzz", &e) == 0)
            st_close(&f);
    }
    free(copy);
    st_close(&good);
}

static void test_bf16_roundtrip(void)
{
    for (int i = 0; i < 1000; i++) {
        uint16_t h = (uint16_t)test_rand();
        float x = st_bf16_to_f32(h);
        if (isnan(x))
            CHECK(isnan(st_bf16_to_f32(st_f32_to_bf16(x))));
        else
            CHECK(st_f32_to_bf16(x) == h);
    }
    /* Round to nearest even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7; ties go to 1. */
    CHECK(st_f32_to_bf16(1.0f + 0x1p-8f) == 0x3f80);
    CHECK(st_f32_to_bf16(1.0f + 0x1p-8f + 0x1p-20f) == 0x3f81);
    CHECK(st_f16_to_f32(0x3c00) == 1.0f && st_f16_to_f32(0xc000) == -2.0f);
    CHECK(st_f16_to_f32(0x0001) == 0x1p-24f);
}

/* The bias rule: overloaded experts' biases go down by gamma, underloaded ones up, and a
 * bias raised enough pulls tokens to its expert. */
static void test_balance_update(void)
{
    dsv3_config c;
    random_config(&c);
    dsv3_model m;
    dsv3_err e;
    REQUIRE(model_init(&m, &c, &e) == 0);
    model_init_random(&m, test_rand(), 0.2);
    int B = 2, T = 8, N = B * T, L = c.num_hidden_layers - 1, E = c.n_routed_experts;
    int32_t ids[16];
    for (int n = 0; n < N; n++)
        ids[n] = (int32_t)(test_rand() % c.vocab_size);
    model_acts *a = model_acts_new(&m, B, T, &e);
    REQUIRE(a && model_forward(&m, a, ids, NULL, NULL, &e) == 0);
    int64_t load[64], total = 0;
    REQUIRE(model_expert_load(&m, a, L, load) == 0);
    CHECK(model_expert_load(&m, a, 0, load + 32) == -1);  /* layer 0 is dense */
    for (int i = 0; i < E; i++)
        total += load[i];
    CHECK(total == (int64_t)N * c.num_experts_per_tok);
    float before[64];
    memcpy(before, m.w.layers[L].router_bias, sizeof(float) * E);
    model_balance_update(&m, a, 0.001f);
    for (int i = 0; i < E; i++) {
        float d = m.w.layers[L].router_bias[i] - before[i];
        int64_t diff = total - load[i] * E;
        CHECK(diff > 0 ? d > 0 : diff < 0 ? d < 0 : d == 0);
    }
    /* A large bias on one expert wins it every token: selection uses the bias. */
    m.w.layers[L].router_bias[E - 1] = 10;
    REQUIRE(model_forward(&m, a, ids, NULL, NULL, &e) == 0);
    REQUIRE(model_expert_load(&m, a, L, load) == 0);
    CHECK(load[E - 1] == N);
    model_acts_free(a);
    model_free(&m);
}

/* A hand-worked balance loss: with zero router weights every affinity is 1/2, so
 * s'_i = 1/E and P_i = 1/E, and sum_i f_i P_i = sum_i count_i / (K T) = 1 whatever the
 * (bias-driven) choice: the loss is alpha times the number of MoE blocks, MTP blocks
 * included. Its gradient then pulls each router row toward the experts chosen more. */
static void test_balance_loss_hand_worked(void)
{
    dsv3_config c;
    random_config(&c);
    c.num_nextn_predict_layers = 1 + (int)(test_rand() % 2);
    dsv3_model m;
    dsv3_err e;
    REQUIRE(model_init(&m, &c, &e) == 0);
    model_init_random(&m, test_rand(), 0.2);
    int blocks = 0;
    for (int i = 0; i < m.n_t; i++) {
        const model_tensor *t = &m.t[i];
        size_t n = strlen(t->name);
        int router = n > 16 && !strcmp(t->name + n - 16, ".mlp.gate.weight");
        int bias = !t->trainable;
        blocks += router;
        for (int64_t j = 0; router && j < t->numel; j++)
            m.params[t->off + j] = 0;
        for (int64_t j = 0; bias && j < t->numel; j++)
            m.params[t->off + j] = (float)urand();
    }
    CHECK(blocks == c.num_hidden_layers - c.first_k_dense_replace + c.num_nextn_predict_layers);
    m.balance_alpha = (float)(0.1 + urand());
    m.mtp_lambda = 0.5f;
    int B = 2, T = 6, N = B * T;
    int32_t ids[12], tg[12];
    for (int n = 0; n < N; n++) {
        ids[n] = (int32_t)(test_rand() % c.vocab_size);
        tg[n] = (int32_t)(test_rand() % c.vocab_size);
    }
    model_acts *a = model_acts_new(&m, B, T, &e);
    REQUIRE(a);
    float loss;
    REQUIRE(model_forward(&m, a, ids, tg, &loss, &e) == 0);
    model_losses ls;
    model_acts_losses(a, &ls);
    double want = (double)m.balance_alpha * blocks;
    CHECKF(fabs(ls.balance - want) < 1e-6 * want, "balance %.9g, want %.9g", ls.balance, want);
    model_acts_free(a);
    model_free(&m);
}

/* Which tokens MTP module k reads: changing t_j changes module k's logits first at row
 * j - k (where it embeds t_{i+k}) and leaves the rows before it bitwise unchanged (causal);
 * the main logits first change at row j. */
static void test_mtp_reads_shifted_tokens(void)
{
    dsv3_config c;
    random_config(&c);
    c.num_nextn_predict_layers = 2;
    dsv3_model m;
    dsv3_err e;
    REQUIRE(model_init(&m, &c, &e) == 0);
    model_init_random(&m, test_rand(), 0.2);
    m.mtp_lambda = 0.3f;
    int T = 8, V = c.vocab_size, j = 4 + (int)(test_rand() % 3);
    int32_t ids[8], tg[8];
    for (int n = 0; n < T; n++)
        ids[n] = (int32_t)(test_rand() % V);
    for (int n = 0; n < T; n++)
        tg[n] = n + 1 < T ? ids[n + 1] : -100;
    model_acts *a = model_acts_new(&m, 1, T, &e);
    REQUIRE(a);
    float loss, *before = malloc((size_t)3 * T * V * 4);
    REQUIRE(model_forward(&m, a, ids, tg, &loss, &e) == 0);
    memcpy(before, model_acts_logits(a), (size_t)T * V * 4);
    for (int k = 0; k < 2; k++)
        memcpy(before + (size_t)(k + 1) * T * V, model_acts_mtp_logits(a, k), (size_t)T * V * 4);
    ids[j] = (ids[j] + 1) % V;
    REQUIRE(model_forward(&m, a, ids, tg, &loss, &e) == 0);
    for (int k = 0; k <= 2; k++) {
        const float *now = k ? model_acts_mtp_logits(a, k - 1) : model_acts_logits(a);
        const float *was = before + (size_t)k * T * V;
        int first = j - k;  /* module k (1-based) embeds t_{i+k} at row i */
        CHECKF(!memcmp(now, was, (size_t)first * V * 4), "depth %d: rows before %d changed", k,
               first);
        CHECKF(memcmp(now + (size_t)first * V, was + (size_t)first * V, (size_t)V * 4),
               "depth %d: row %d did not change", k, first);
    }
    free(before);
    model_acts_free(a);
    model_free(&m);
}

/* Documents packed in a sequence with model_acts_set_segments against the same documents
 * each run as a sequence of their own (padded to T with id 0, target -1: the SFT trainer's
 * old method), with two MTP modules on: every main and MTP logit of a document's rows is
 * bit for bit the same, the losses agree, and so do the gradients up to float rounding
 * (rows are summed in another order). A target that crosses into the next document is
 * ignored in both. Bad segments and positions are refused. */
static void test_segments_match_separate_rows(void)
{
    dsv3_config c;
    random_config(&c);
    c.num_nextn_predict_layers = 2;
    dsv3_model m;
    dsv3_err e;
    REQUIRE(model_init(&m, &c, &e) == 0);
    model_init_random(&m, test_rand(), 0.2);
    m.mtp_lambda = 0.5f;
    int B = 2, T = 12, N = B * T, V = c.vocab_size;
    int32_t ids[24], tg[24], seg[24], pos[24];
    int rows = 0;
    for (int n = 0; n < N; n++) {
        int start = n % T == 0 || test_rand() % 4 == 0;
        if (start)
            rows++;
        seg[n] = n % T == 0 ? 0 : seg[n - 1] + start;
        pos[n] = start ? 0 : pos[n - 1] + 1;
        ids[n] = (int32_t)(test_rand() % V);
        tg[n] = (int32_t)(test_rand() % V);
    }
    for (int n = 0; n < N; n++)   /* never across documents (nor at a row's end) */
        if (n % T == T - 1 || seg[n + 1] != seg[n] || test_rand() % 7 == 0)
            tg[n] = -1;
    /* the unpacked rows: document d at row d, positions 0.. */
    int32_t *uid = calloc((size_t)rows * T, 4), *utg = malloc((size_t)rows * T * 4);
    int *row_of = malloc((size_t)N * sizeof *row_of);
    for (int i = 0; i < rows * T; i++)
        utg[i] = -1;
    for (int n = 0, r = -1; n < N; n++) {
        r += pos[n] == 0;
        row_of[n] = r * T + pos[n];
        uid[row_of[n]] = ids[n];
        utg[row_of[n]] = tg[n];
    }
    model_acts *a = model_acts_new(&m, B, T, &e), *u = model_acts_new(&m, rows, T, &e);
    REQUIRE(a && u);
    REQUIRE(model_acts_set_segments(a, seg, pos) == 0);
    float lp, lu;
    model_zero_grad(&m);
    REQUIRE(model_forward(&m, a, ids, tg, &lp, &e) == 0);
    REQUIRE(model_backward(&m, a, ids, tg, &e) == 0);
    float *gp = malloc(m.n_params * 4);
    memcpy(gp, m.grads, m.n_params * 4);
    model_zero_grad(&m);
    REQUIRE(model_forward(&m, u, uid, utg, &lu, &e) == 0);
    REQUIRE(model_backward(&m, u, uid, utg, &e) == 0);
    int diff = 0;
    for (int k = 0; k <= 2; k++) {
        const float *P = k ? model_acts_mtp_logits(a, k - 1) : model_acts_logits(a);
        const float *U = k ? model_acts_mtp_logits(u, k - 1) : model_acts_logits(u);
        for (int n = 0; n < N; n++)
            diff += memcmp(P + (size_t)n * V, U + (size_t)row_of[n] * V, (size_t)V * 4) != 0;
    }
    CHECKF(diff == 0, "%d logit rows differ", diff);
    model_losses la, lb;
    model_acts_losses(a, &la);
    model_acts_losses(u, &lb);
    CHECKF(fabs(la.total - lb.total) <= 1e-6 * fabs(lb.total) && la.mtp > 0,
           "total loss %.9g packed, %.9g unpacked", la.total, lb.total);
    double mx = 0, worst = 0;
    for (size_t i = 0; i < m.n_params; i++)
        mx = fmax(mx, fabs(m.grads[i]));
    for (size_t i = 0; i < m.n_params; i++)
        worst = fmax(worst, fabs(gp[i] - m.grads[i]));
    CHECKF(mx > 0 && worst <= 1e-5 * mx, "gradients differ by %g (largest %g)", worst, mx);
    /* refused: a position past T, a segment number going down */
    int32_t bad[24];
    memcpy(bad, pos, sizeof bad);
    bad[3] = T;
    CHECK(model_acts_set_segments(a, seg, bad) == -1);
    memcpy(bad, seg, sizeof bad);
    bad[T + 1] = bad[T] + 1;
    bad[T + 2] = bad[T];
    CHECK(model_acts_set_segments(a, bad, NULL) == -1);
    CHECK(model_acts_set_segments(a, NULL, NULL) == 0);
    free(gp), free(uid), free(utg), free(row_of);
    model_acts_free(a);
    model_acts_free(u);
    model_free(&m);
}

/* Threads: forward and backward of a model big enough that every parallel loop splits
 * (hidden 64, 4 heads, T 32, experts on threads) give bitwise the same logits, losses and
 * gradients on 1, 2 and 3 threads (3: uneven splits). */
static void test_threads_bitwise(void)
{
    dsv3_config c;
    random_config(&c);
    c.vocab_size = 300;
    c.hidden_size = 64;
    c.intermediate_size = 96;
    c.moe_intermediate_size = 64;
    c.num_experts_per_tok = 2;  /* with T 32: enough work that experts run on threads */
    c.num_attention_heads = 4;
    c.kv_lora_rank = 32;
    c.qk_nope_head_dim = 16;
    c.qk_rope_head_dim = 8;
    c.v_head_dim = 16;
    c.num_nextn_predict_layers = 1;
    dsv3_model m;
    dsv3_err e;
    REQUIRE(model_init(&m, &c, &e) == 0);
    model_init_random(&m, test_rand(), 0.05);
    m.mtp_lambda = 0.3f;
    m.balance_alpha = 0.01f;
    int B = 2, T = 32, N = B * T;
    int32_t ids[64], tg[64];
    for (int n = 0; n < N; n++) {
        ids[n] = (int32_t)(test_rand() % c.vocab_size);
        tg[n] = (int32_t)(test_rand() % c.vocab_size);
    }
    model_acts *a = model_acts_new(&m, B, T, &e);
    REQUIRE(a);
    float *ref_logits = malloc((size_t)N * c.vocab_size * 4);
    float *ref_grads = malloc(m.n_params * 4);
    model_losses ref_l = {0};
    int saved = ops_threads();
    for (int th = 1; th <= 3; th++) {
        ops_set_threads(th);
        float loss;
        REQUIRE(model_forward(&m, a, ids, tg, &loss, &e) == 0);
        model_zero_grad(&m);
        REQUIRE(model_backward(&m, a, ids, tg, &e) == 0);
        model_losses l;
        model_acts_losses(a, &l);
        if (th == 1) {
            memcpy(ref_logits, model_acts_logits(a), (size_t)N * c.vocab_size * 4);
            memcpy(ref_grads, m.grads, m.n_params * 4);
            ref_l = l;
            continue;
        }
        CHECKF(!memcmp(ref_logits, model_acts_logits(a), (size_t)N * c.vocab_size * 4),
               "logits differ on %d threads", th);
        CHECKF(!memcmp(ref_grads, m.grads, m.n_params * 4), "gradients differ on %d threads",
               th);
        CHECKF(l.total == ref_l.total && l.mtp == ref_l.mtp && l.balance == ref_l.balance,
               "losses differ on %d threads", th);
    }
    ops_set_threads(saved);
    free(ref_logits);
    free(ref_grads);
    model_acts_free(a);
    model_free(&m);
}

int main(void)
{
    test_seed();
    snprintf(tmpdir, sizeof tmpdir, "/tmp/dsv3-test-model-%d", (int)getpid());
    mkdir(tmpdir, 0777);
    RUN(test_gradient_finite_differences);
    RUN(test_counts_match_layout);
    RUN(test_save_load_roundtrip);
    RUN(test_balance_update);
    RUN(test_balance_loss_hand_worked);
    RUN(test_mtp_reads_shifted_tokens);
    RUN(test_segments_match_separate_rows);
    RUN(test_threads_bitwise);
    RUN(test_bad_checkpoints);
    RUN(test_safetensors_damage);
    RUN(test_bf16_roundtrip);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd)) {
    }
    TEST_EXIT();
}
