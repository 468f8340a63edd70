/* Tests of lib/optim: bf16 rounding of the moments on hand-worked bit patterns, AdamW steps
 * on a fresh random model against a double-precision reference, which tensors decay,
 * global-norm clipping, and the state's save/load round trip and refusals; ZeRO-1 shards:
 * updating each shard alone equals the whole update bit for bit, and the moments re-slice
 * exactly between files of different world sizes. */
#include <math.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../../lib/dp.h"
#include "../../lib/optim.h"
#include "../../lib/trainckpt.h"
#include "../../lib/safetensors.h"
#include "../test.h"

static char tmpdir[256];

static double urand(void)
{
    return (test_rand() >> 11) * 0x1p-53;
}

static float bits_f(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* A small model: one dense and one MoE layer, so every kind of tensor is present. */
static int small_model(dsv3_model *m, int hidden)
{
    dsv3_config c;
    memset(&c, 0, sizeof c);
    c.vocab_size = 17;
    c.hidden_size = hidden;
    c.intermediate_size = 12;
    c.moe_intermediate_size = 6;
    c.num_hidden_layers = 2;
    c.first_k_dense_replace = 1;
    c.num_attention_heads = 2;
    c.q_lora_rank = 6;
    c.kv_lora_rank = 6;
    c.qk_nope_head_dim = 4;
    c.qk_rope_head_dim = 4;
    c.v_head_dim = 4;
    c.n_shared_experts = 1;
    c.n_routed_experts = 4;
    c.n_group = 2;
    c.topk_group = 1;
    c.num_experts_per_tok = 2;
    c.routed_scaling_factor = 2.5;
    c.norm_topk_prob = 1;
    c.rms_norm_eps = 1e-6;
    c.max_position_embeddings = 64;
    c.initializer_range = 0.02;
    c.rope_theta = 10000;
    c.rope_interleave = 1;
    c.bos_token_id = c.eos_token_id = -1;
    dsv3_err e;
    if (model_init(m, &c, &e)) {
        fprintf(stderr, "    %s\n", e.msg);
        return -1;
    }
    return 0;
}

static void fill(float *x, size_t n, double scale)
{
    for (size_t i = 0; i < n; i++)
        x[i] = (float)((urand() * 2 - 1) * scale);
}

/* Hand-worked round-to-nearest-even cases: exact, below/at/above the halfway point, ties to
 * even both ways, carry into the exponent, overflow to infinity, NaN kept NaN. */
static void test_bf16_rounding(void)
{
    static const struct { uint32_t in; uint16_t out; } cases[] = {
        {0x3f800000u, 0x3f80}, /* 1.0 exact */
        {0x3f807fffu, 0x3f80}, /* just below half an ulp: down */
        {0x3f808000u, 0x3f80}, /* tie, even (0) below: down */
        {0x3f818000u, 0x3f82}, /* tie, odd (1) below: up to even */
        {0x3f808001u, 0x3f81}, /* just above half: up */
        {0xbf808001u, 0xbf81}, /* negative: magnitude rounds the same */
        {0x3fff8000u, 0x4000}, /* tie at odd mantissa 0x7f: carry into the exponent */
        {0x7f7fffffu, 0x7f80}, /* largest float rounds to +inf */
        {0x00000001u, 0x0000}, /* smallest subnormal: to zero */
        {0x7f800000u, 0x7f80}, /* inf stays inf */
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        uint16_t got = st_f32_to_bf16(bits_f(cases[i].in));
        CHECKF(got == cases[i].out, "0x%08x -> 0x%04x, expected 0x%04x", cases[i].in, got,
               cases[i].out);
    }
    uint16_t nan = st_f32_to_bf16(bits_f(0x7f800001u));
    CHECK((nan & 0x7f80) == 0x7f80 && (nan & 0x7f) != 0);
}

/* The double-precision reference of one element's update. Its moments round through float
 * to bf16, so they can differ from the float path by one bf16 ulp when the float and double
 * pre-rounding values straddle a rounding boundary. */
typedef struct ref_state {
    double *p, *m, *v;
} ref_state;

static double bf16_round(double x)
{
    return st_bf16_to_f32(st_f32_to_bf16((float)x));
}

static void test_adamw_against_reference(void)
{
    dsv3_model m;
    REQUIRE(small_model(&m, 8) == 0);
    size_t n = m.n_params;
    fill(m.params, n, 0.5);
    optim o;
    optim_params op;
    optim_params_default(&op);
    op.weight_decay = 0.1 + urand() * 0.2;
    dsv3_err e;
    REQUIRE(optim_init(&o, &m, &op, &e) == 0);
    ref_state r = {calloc(n, 8), calloc(n, 8), calloc(n, 8)};
    for (size_t i = 0; i < n; i++)
        r.p[i] = m.params[i];
    const model_tensor *bias = NULL;
    for (int i = 0; i < m.n_t; i++)
        if (!m.t[i].trainable)
            bias = &m.t[i];
    REQUIRE(bias != NULL);
    size_t moment_ulps = 0, moments = 0;
    for (int step = 1; step <= 5; step++) {
        fill(m.grads, n, step == 3 ? 1e-3 : 1.0);  /* small gradients once: eps matters */
        double lr = 1e-3 * step;
        optim_step(&o, &m, lr);
        double c1 = 1 - pow(0.9, step), c2 = 1 - pow(0.95, step);
        for (int ti = 0; ti < m.n_t; ti++) {
            const model_tensor *t = &m.t[ti];
            for (int64_t j = 0; j < t->numel; j++) {
                size_t k = t->off + (size_t)j;
                if (!t->trainable) {
                    CHECK(m.params[k] == (float)r.p[k]);  /* never touched */
                    continue;
                }
                double g = m.grads[k], terms = fabs(0.9 * r.m[k]) + fabs(0.1 * g);
                r.m[k] = bf16_round(0.9 * r.m[k] + 0.1 * g);
                r.v[k] = bf16_round(0.95 * r.v[k] + 0.05 * g * g);
                double wd = t->ndim == 2 ? op.weight_decay : 0;
                r.p[k] = r.p[k] - lr * (r.m[k] / c1) / (sqrt(r.v[k] / c2) + 1e-8) -
                         lr * wd * r.p[k];
                double gm = st_bf16_to_f32(o.m[k]), gv = st_bf16_to_f32(o.v[k]);
                moments += 2;
                moment_ulps += (gm != r.m[k]) + (gv != r.v[k]);
                /* One bf16 ulp, plus float rounding of the two terms where they cancel. */
                CHECKF(fabs(gm - r.m[k]) <= fabs(r.m[k]) * 0x1p-7 + terms * 0x1p-21, "%s m %g vs %g",
                       t->name, gm, r.m[k]);
                CHECKF(fabs(gv - r.v[k]) <= fabs(r.v[k]) * 0x1p-7 + 1e-30, "%s v %g vs %g",
                       t->name, gv, r.v[k]);
                /* Tolerance: float rounding of p, plus one bf16 ulp of the update where the
                 * moments straddled a boundary. */
                double d = fabs(m.params[k] - r.p[k]);
                CHECKF(d <= 1e-6 * fabs(r.p[k]) + lr * 0.01, "%s[%lld] step %d: %.9g vs %.9g",
                       t->name, (long long)j, step, m.params[k], r.p[k]);
                /* Follow the float path, so each step is checked from the same state and
                 * a one-ulp straddle does not compound through cancellation. */
                r.p[k] = m.params[k];
                r.m[k] = gm;
                r.v[k] = gv;
            }
        }
    }
    CHECK(o.t == 5);
    /* A straddle needs float and double to disagree at bf16 precision: rare. */
    CHECKF(moment_ulps * 100 < moments, "%zu of %zu moments off by an ulp", moment_ulps, moments);
    optim_free(&o);
    model_free(&m);
    free(r.p);
    free(r.m);
    free(r.v);
}

/* With zero gradients and zero moments the update is decay alone: 2-D weights shrink by
 * exactly (1 - lr*wd) (one float multiply-subtract), norms and the bias do not move. */
static void test_decay_by_tensor(void)
{
    dsv3_model m;
    REQUIRE(small_model(&m, 8) == 0);
    fill(m.params, m.n_params, 1.0);
    float *before = malloc(m.n_params * sizeof *before);
    memcpy(before, m.params, m.n_params * sizeof *before);
    optim o;
    optim_params op;
    optim_params_default(&op);
    dsv3_err e;
    REQUIRE(optim_init(&o, &m, &op, &e) == 0);
    optim_step(&o, &m, 0.5);
    int n2 = 0, n1 = 0;
    for (int ti = 0; ti < m.n_t; ti++) {
        const model_tensor *t = &m.t[ti];
        int decays = optim_decays(t);
        CHECK(decays == (t->ndim == 2 && t->trainable));
        if (t->ndim == 1)
            n1++;
        else
            n2++;
        for (int64_t j = 0; j < t->numel; j++) {
            size_t k = t->off + (size_t)j;
            float want = decays ? before[k] - (float)(0.5 * 0.1) * before[k] : before[k];
            CHECKF(m.params[k] == want, "%s: %g, expected %g", t->name, m.params[k], want);
        }
    }
    CHECK(n1 > 0 && n2 > 0);
    CHECK(model_find(&m, "model.norm.weight") && !optim_decays(model_find(&m, "model.norm.weight")));
    CHECK(optim_decays(model_find(&m, "model.embed_tokens.weight")));
    optim_free(&o);
    model_free(&m);
    free(before);
}

static void test_clipping(void)
{
    dsv3_model m;
    REQUIRE(small_model(&m, 8) == 0);
    fill(m.grads, m.n_params, 1.0);
    double ref = 0;
    for (int ti = 0; ti < m.n_t; ti++) {
        if (!m.t[ti].trainable)
            continue;
        for (int64_t j = 0; j < m.t[ti].numel; j++) {
            double g = m.grads[m.t[ti].off + (size_t)j];
            ref += g * g;
        }
    }
    ref = sqrt(ref);
    double norm = optim_grad_norm(&m);
    CHECKF(fabs(norm - ref) <= 1e-12 * ref, "norm %.17g vs %.17g", norm, ref);
    /* Gradients of the non-trainable bias do not count. */
    const model_tensor *bias = model_find(&m, "model.layers.1.mlp.gate.e_score_correction_bias");
    REQUIRE(bias != NULL);
    m.grads[bias->off] = 1e6f;
    CHECK(optim_grad_norm(&m) == norm);
    float *g0 = malloc(m.n_params * sizeof *g0);
    memcpy(g0, m.grads, m.n_params * sizeof *g0);
    /* Above the limit: scaled to norm 1; below: untouched, bit for bit. */
    double f = optim_clip(&m, norm, 1.0);
    CHECKF(fabs(f - 1.0 / norm) <= 1e-7 / norm, "factor %g vs %g", f, 1.0 / norm);
    CHECKF(fabs(optim_grad_norm(&m) - 1.0) < 1e-6, "clipped norm %.9g", optim_grad_norm(&m));
    CHECK(m.grads[bias->off] == 1e6f);
    memcpy(m.grads, g0, m.n_params * sizeof *g0);
    CHECK(optim_clip(&m, norm, norm * 2) == 1.0);
    CHECK(optim_clip(&m, norm, 0) == 1.0);
    CHECK(memcmp(m.grads, g0, m.n_params * sizeof *g0) == 0);
    m.grads[0] = NAN;
    CHECK(isnan(optim_grad_norm(&m)));
    m.grads[0] = INFINITY;
    CHECK(isinf(optim_grad_norm(&m)));
    free(g0);
    model_free(&m);
}

static void test_save_load(void)
{
    dsv3_model m, m2;
    REQUIRE(small_model(&m, 8) == 0);
    fill(m.params, m.n_params, 1.0);
    optim o, o2;
    optim_params op;
    optim_params_default(&op);
    dsv3_err e;
    REQUIRE(optim_init(&o, &m, &op, &e) == 0);
    for (int s = 0; s < 3; s++) {
        fill(m.grads, m.n_params, 1.0);
        optim_step(&o, &m, 1e-3);
    }
    char path[512];
    snprintf(path, sizeof path, "%s/optim.safetensors", tmpdir);
    REQUIRE(optim_save(&o, &m, path, &e) == 0);
    REQUIRE(optim_init(&o2, &m, &op, &e) == 0);
    CHECKF(optim_load(&o2, &m, path, &e) == 0, "%s", e.msg);
    CHECK(o2.t == 3);
    CHECK(memcmp(o.m, o2.m, o.n * 2) == 0 && memcmp(o.v, o2.v, o.n * 2) == 0);
    /* A model of another shape: refused, naming the file and the tensor. */
    REQUIRE(small_model(&m2, 12) == 0);
    optim o3;
    REQUIRE(optim_init(&o3, &m2, &op, &e) == 0);
    CHECK(optim_load(&o3, &m2, path, &e) == -1);
    CHECKF(strstr(e.msg, "optim.safetensors") && strstr(e.msg, "shape"), "%s", e.msg);
    optim_free(&o3);
    model_free(&m2);
    /* A truncated file: refused. */
    FILE *f = fopen(path, "r+");
    REQUIRE(f != NULL);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fclose(f);
    REQUIRE(truncate(path, size / 2) == 0);
    CHECK(optim_load(&o2, &m, path, &e) == -1);
    optim_free(&o);
    optim_free(&o2);
    model_free(&m);
}

/* W optimizers over the shards of dp_shard_range, each stepping its range from the same
 * gradients, give the whole optimizer's parameters and moments bit for bit; the clipped
 * norm from the shards' sums of squares is the whole norm within reassociation. */
static void test_shards_equal_whole(void)
{
    dsv3_model m;
    REQUIRE(small_model(&m, 8) == 0);
    size_t n = m.n_params;
    int W = 3 + (int)(test_rand() % 3);
    fill(m.params, n, 0.5);
    float *p0 = malloc(n * sizeof *p0), *g = malloc(n * sizeof *g), *gw = malloc(n * sizeof *gw);
    REQUIRE(p0 && g && gw);
    memcpy(p0, m.params, n * sizeof *p0);
    optim whole, sh[5];
    optim_params op;
    optim_params_default(&op);
    dsv3_err e;
    REQUIRE(optim_init(&whole, &m, &op, &e) == 0);
    for (int r = 0; r < W; r++) {
        size_t lo, hi;
        dp_shard_range(n, W, r, &lo, &hi);
        REQUIRE(optim_init_range(&sh[r], &m, &op, lo, hi, &e) == 0);
    }
    float *pw = malloc(n * sizeof *pw);
    REQUIRE(pw != NULL);
    for (int step = 0; step < 4; step++) {
        fill(g, n, step == 2 ? 10.0 : 1.0);   /* once above the clip limit */
        /* whole */
        memcpy(m.grads, g, n * sizeof *g);
        double norm = optim_grad_norm(&m);
        optim_clip(&m, norm, 5.0);
        optim_step(&whole, &m, 1e-2);
        memcpy(pw, m.params, n * sizeof *pw);
        /* shards, from the parameters before this step */
        memcpy(m.params, p0, n * sizeof *p0);
        memcpy(gw, g, n * sizeof *g);
        double sumsq = 0;
        for (int r = 0; r < W; r++)
            sumsq += optim_grad_sumsq(&m, gw + sh[r].lo, sh[r].lo, sh[r].lo + sh[r].n);
        CHECKF(fabs(sqrt(sumsq) - norm) <= 1e-12 * norm, "norm %.17g vs %.17g", sqrt(sumsq), norm);
        for (int r = 0; r < W; r++) {
            size_t lo = sh[r].lo, hi = lo + sh[r].n;
            optim_clip_range(&m, gw + lo, lo, hi, norm, 5.0);
            optim_step_grads(&sh[r], &m, gw + lo, 1e-2);
        }
        CHECKF(memcmp(m.params, pw, n * sizeof *pw) == 0, "step %d: sharded params differ", step);
        memcpy(p0, m.params, n * sizeof *p0);
    }
    for (int r = 0; r < W; r++) {
        CHECK(sh[r].t == whole.t);
        CHECK(memcmp(sh[r].m, whole.m + sh[r].lo, sh[r].n * 2) == 0);
        CHECK(memcmp(sh[r].v, whole.v + sh[r].lo, sh[r].n * 2) == 0);
        optim_free(&sh[r]);
    }
    optim_free(&whole);
    free(p0);
    free(g);
    free(gw);
    free(pw);
    model_free(&m);
}

/* Moments saved by 3 ranks load into 2 ranks' ranges and into one whole optimizer, and the
 * one-process file into 2 ranks', all equal to the original bits; a missing or foreign
 * shard is refused. */
static void test_reslice(void)
{
    dsv3_model m;
    REQUIRE(small_model(&m, 8) == 0);
    size_t n = m.n_params;
    fill(m.params, n, 0.5);
    optim_params op;
    optim_params_default(&op);
    dsv3_err e;
    optim whole, o;
    REQUIRE(optim_init(&whole, &m, &op, &e) == 0);
    for (int s = 0; s < 3; s++) {
        fill(m.grads, n, 1.0);
        optim_step(&whole, &m, 1e-3);
    }
    char dir[600], path[700], name[64];
    snprintf(dir, sizeof dir, "%s/reslice", tmpdir);
    mkdir(dir, 0777);
    snprintf(path, sizeof path, "%s/optim.safetensors", dir);
    REQUIRE(optim_save(&whole, &m, path, &e) == 0);
    for (int r = 0; r < 3; r++) {
        size_t lo, hi;
        dp_shard_range(n, 3, r, &lo, &hi);
        REQUIRE(optim_init_range(&o, &m, &op, lo, hi, &e) == 0);
        memcpy(o.m, whole.m + lo, (hi - lo) * 2);
        memcpy(o.v, whole.v + lo, (hi - lo) * 2);
        o.t = whole.t;
        trainckpt_shard_name(name, sizeof name, r, 3);
        snprintf(path, sizeof path, "%s/%s", dir, name);
        REQUIRE(optim_save_shard(&o, &m, r, 3, path, &e) == 0);
        optim_free(&o);
    }
    for (int from = 1; from <= 3; from += 2)
        for (int r = 0; r < 2; r++) {
            size_t lo, hi;
            dp_shard_range(n, 2, r, &lo, &hi);
            REQUIRE(optim_init_range(&o, &m, &op, lo, hi, &e) == 0);
            CHECKF(trainckpt_load_optim(dir, (uint32_t)from, &o, &m, &e) == 0, "%s", e.msg);
            CHECK(o.t == whole.t);
            CHECKF(memcmp(o.m, whole.m + lo, (hi - lo) * 2) == 0 &&
                   memcmp(o.v, whole.v + lo, (hi - lo) * 2) == 0,
                   "%d ranks -> rank %d of 2: moments differ", from, r);
            optim_free(&o);
        }
    REQUIRE(optim_init(&o, &m, &op, &e) == 0);
    CHECKF(trainckpt_load_optim(dir, 3, &o, &m, &e) == 0, "%s", e.msg);
    CHECK(memcmp(o.m, whole.m, n * 2) == 0 && memcmp(o.v, whole.v, n * 2) == 0);
    /* Shard 1 claims to be another rank's: refused, naming it. */
    char p1[700], p2[700];
    trainckpt_shard_name(name, sizeof name, 1, 3);
    snprintf(p1, sizeof p1, "%s/%s", dir, name);
    trainckpt_shard_name(name, sizeof name, 2, 3);
    snprintf(p2, sizeof p2, "%s/%s", dir, name);
    char tmp[720];
    snprintf(tmp, sizeof tmp, "%s.keep", p1);
    REQUIRE(rename(p1, tmp) == 0);
    CHECK(trainckpt_load_optim(dir, 3, &o, &m, &e) == -1);
    CHECKF(strstr(e.msg, "optim-rank00001-of-00003"), "%s", e.msg);
    REQUIRE(link(p2, p1) == 0);
    CHECK(trainckpt_load_optim(dir, 3, &o, &m, &e) == -1);
    CHECKF(strstr(e.msg, "shard 2 of 3") && strstr(e.msg, "expected shard 1 of 3"), "%s", e.msg);
    optim_free(&o);
    optim_free(&whole);
    model_free(&m);
}

int main(void)
{
    test_seed();
    snprintf(tmpdir, sizeof tmpdir, "/tmp/dsv3-test-optim-%d", (int)getpid());
    mkdir(tmpdir, 0777);
    RUN(test_bf16_rounding);
    RUN(test_adamw_against_reference);
    RUN(test_decay_by_tensor);
    RUN(test_clipping);
    RUN(test_save_load);
    RUN(test_shards_equal_whole);
    RUN(test_reslice);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd)) {
    }
    TEST_EXIT();
}
