/* Tests of lib/config: both spellings of the rope settings, refusal of bad combinations
 * with the field named, unknown fields surviving a round trip, and the published parameter
 * counts of DeepSeek-V3 (671B total, 37B activated) and V2-Lite (15.7B, 2.4B). */
#include <jansson.h>
#include <math.h>
#include <unistd.h>

#include "../../lib/config.h"
#include "../test.h"

/* A small valid config in the 4.x spelling; a test adds or overrides fields with a JSON
 * fragment (", \"key\": value ...") merged over it. */
static const char *BASE =
    "{\"vocab_size\": 100, \"hidden_size\": 32, \"intermediate_size\": 64,"
    " \"moe_intermediate_size\": 16, \"num_hidden_layers\": 3, \"num_attention_heads\": 2,"
    " \"q_lora_rank\": null, \"kv_lora_rank\": 16, \"qk_nope_head_dim\": 8,"
    " \"qk_rope_head_dim\": 4, \"v_head_dim\": 8, \"n_shared_experts\": 1,"
    " \"n_routed_experts\": 8, \"num_experts_per_tok\": 2, \"n_group\": 4, \"topk_group\": 2,"
    " \"first_k_dense_replace\": 1, \"routed_scaling_factor\": 2.5,"
    " \"my_unknown_field\": {\"a\": [1, 2]}%s}";

static char *merged(const char *extra)
{
    char buf[4096];
    snprintf(buf, sizeof buf, BASE, "");
    json_t *o = json_loads(buf, 0, NULL);
    snprintf(buf, sizeof buf, "{\"_\": 0%s}", extra);
    json_t *x = json_loads(buf, 0, NULL);
    if (!o || !x)
        abort();
    json_object_del(x, "_");
    json_object_update(o, x);
    char *s = json_dumps(o, 0);
    json_decref(o);
    json_decref(x);
    return s;
}

static int parse_with(dsv3_config *c, const char *extra, dsv3_err *e)
{
    char *s = merged(extra);
    int rc = config_parse(c, s, "cfg.json", e);
    free(s);
    return rc;
}

static void test_minimal_defaults(void)
{
    dsv3_config c;
    dsv3_err e = {{0}};
    REQUIRE(parse_with(&c, "", &e) == 0);
    CHECK(c.q_lora_rank == 0);
    CHECK(c.rope_theta == 10000.0 && !c.rope_yarn && c.rope_interleave == 1);
    CHECK(c.norm_topk_prob == 1 && c.num_nextn_predict_layers == 0);
    CHECK(fabs(config_softmax_scale(&c) - 1 / sqrt(12.0)) < 1e-15);
    config_free(&c);
}

static void test_two_spellings_agree(void)
{
    dsv3_config a, b;
    dsv3_err e = {{0}};
    double factor = 2 + (double)(test_rand() % 60), ms = 0.5 + (test_rand() % 8) / 8.0;
    char x4[512], x5[512];
    snprintf(x4, sizeof x4,
             ", \"rope_theta\": 50000, \"max_position_embeddings\": 8192, \"rope_scaling\": "
             "{\"type\": \"yarn\", \"factor\": %g, \"original_max_position_embeddings\": 128,"
             " \"beta_fast\": 32, \"beta_slow\": 1, \"mscale\": %g, \"mscale_all_dim\": %g}",
             factor, ms, ms);
    snprintf(x5, sizeof x5,
             ", \"head_dim\": 4, \"qk_head_dim\": 12, \"rope_interleave\": true,"
             " \"max_position_embeddings\": 8192, \"rope_parameters\": {\"rope_type\": \"yarn\","
             " \"rope_theta\": 50000.0, \"factor\": %g, \"original_max_position_embeddings\": 128,"
             " \"beta_fast\": 32.0, \"beta_slow\": 1.0, \"mscale\": %g, \"mscale_all_dim\": %g}",
             factor, ms, ms);
    REQUIRE(parse_with(&a, x4, &e) == 0);
    REQUIRE(parse_with(&b, x5, &e) == 0);
    CHECK(a.rope_yarn && b.rope_yarn);
    CHECK(a.rope_theta == 50000 && b.rope_theta == 50000);
    CHECK(a.yarn_factor == factor && b.yarn_factor == factor);
    CHECK(config_softmax_scale(&a) == config_softmax_scale(&b));
    double m = 0.1 * ms * log(factor) + 1;
    CHECK(fabs(config_softmax_scale(&a) - m * m / sqrt(12.0)) < 1e-12);
    CHECK(config_rope_attention_factor(&a) == 1.0);  /* mscale == mscale_all_dim */
    double fa[2], fb[2];
    config_rope_inv_freq(&a, fa);
    config_rope_inv_freq(&b, fb);
    CHECK(fa[0] == fb[0] && fa[1] == fb[1]);
    config_free(&a);
    config_free(&b);
}

/* YaRN leaves the fast dimensions alone and divides the slow ones by the factor. */
static void test_yarn_frequencies(void)
{
    dsv3_config c;
    dsv3_err e = {{0}};
    REQUIRE(parse_with(&c, "", &e) == 0);
    c.qk_rope_head_dim = 64;
    c.rope_yarn = 1;
    c.yarn_factor = 40;
    c.yarn_original_max_position_embeddings = 4096;
    c.yarn_beta_fast = 32;
    c.yarn_beta_slow = 1;
    c.yarn_truncate = 1;
    double f[32];
    config_rope_inv_freq(&c, f);
    for (int i = 0; i < 32; i++) {
        double plain = pow(10000.0, -2.0 * i / 64);
        /* For V3's numbers the ramp runs from dim 10 to 23 (YaRN eq. 17). */
        if (i <= 10)
            CHECKF(fabs(f[i] / plain - 1) < 1e-6, "i=%d %g %g", i, f[i], plain);
        if (i >= 23)
            CHECKF(fabs(f[i] * 40 / plain - 1) < 1e-6, "i=%d %g %g", i, f[i], plain);
        if (i > 10 && i < 23)
            CHECK(f[i] < plain && f[i] > plain / 40);
    }
    config_free(&c);
}

static void expect_refused(const char *extra, const char *field)
{
    dsv3_config c;
    dsv3_err e = {{0}};
    int rc = parse_with(&c, extra, &e);
    CHECKF(rc == -1, "accepted: %s", extra);
    if (rc == 0) {
        config_free(&c);
        return;
    }
    CHECKF(strstr(e.msg, field) && strstr(e.msg, "cfg.json"), "message '%s' lacks '%s'", e.msg,
           field);
}

static void test_refusals(void)
{
    expect_refused(", \"n_group\": 3", "n_group");
    expect_refused(", \"head_dim\": 8", "head_dim");
    expect_refused(", \"qk_head_dim\": 13", "qk_head_dim");
    expect_refused(", \"num_key_value_heads\": 1", "num_key_value_heads");
    expect_refused(", \"topk_group\": 5", "topk_group");
    expect_refused(", \"num_experts_per_tok\": 5", "num_experts_per_tok");
    expect_refused(", \"hidden_act\": \"gelu\"", "hidden_act");
    expect_refused(", \"scoring_func\": \"softmax\"", "scoring_func");
    expect_refused(", \"first_k_dense_replace\": 4", "first_k_dense_replace");
    expect_refused(", \"qk_rope_head_dim\": 5", "qk_rope_head_dim");
    expect_refused(", \"rope_theta\": 100, \"rope_parameters\": {\"rope_type\": \"default\","
                   " \"rope_theta\": 200}", "rope_theta");
    expect_refused(", \"rope_scaling\": {\"type\": \"linear\", \"factor\": 2}", "linear");
    expect_refused(", \"rope_scaling\": {\"type\": \"yarn\", \"factor\": 2}",
                   "original_max_position_embeddings");
    expect_refused(", \"vocab_size\": \"many\"", "vocab_size");
    expect_refused(", \"rms_norm_eps\": -1", "rms_norm_eps");
    /* A missing structural field, and q_lora_rank left unsaid. */
    dsv3_config c;
    dsv3_err e = {{0}};
    CHECK(config_parse(&c, "{\"vocab_size\": 10}", "x.json", &e) == -1);
    CHECK(strstr(e.msg, "hidden_size") != NULL);
    CHECK(config_parse(&c, "{\"vocab_size\": 10,", "x.json", &e) == -1);
    CHECK(strstr(e.msg, "x.json") != NULL);
}

static void test_roundtrip_keeps_unknown(void)
{
    dsv3_config a, b;
    dsv3_err e = {{0}};
    REQUIRE(parse_with(&a, ", \"rope_scaling\": {\"type\": \"yarn\", \"factor\": 4,"
                           " \"original_max_position_embeddings\": 64, \"mscale_all_dim\": 1}",
                       &e) == 0);
    a.hidden_size = 48;  /* a changed field is written, not the document's old value */
    char path[] = "/tmp/dsv3-test-config-XXXXXX";
    int fd = mkstemp(path);
    REQUIRE(fd >= 0);
    close(fd);
    CHECKF(config_save(&a, path, &e) == 0, "%s", e.msg);
    CHECKF(config_load(&b, path, &e) == 0, "%s", e.msg);
    unlink(path);
    CHECK(b.hidden_size == 48 && b.rope_yarn && b.yarn_factor == 4);
    CHECK(config_softmax_scale(&a) == config_softmax_scale(&b));
    json_t *u = json_object_get(b.json, "my_unknown_field");
    CHECK(u && json_array_size(json_object_get(u, "a")) == 2);
    CHECK(json_object_get(b.json, "rope_parameters") != NULL);
    config_free(&a);
    config_free(&b);
}

static void test_published_counts(void)
{
    dsv3_config c;
    dsv3_err e = {{0}};
    config_counts n;
    int rc = config_load(&c, "configs/v3-671b.json", &e);
    CHECKF(rc == 0, "%s (tests run from the repository root)", e.msg);
    if (rc)
        return;
    config_count_params(&c, &n);
    /* The V3 report: 671B total, 37B activated; the HF card's 685B adds the MTP module. */
    CHECKF(llabs(n.total - 671000000000LL) < 500000000LL, "total %lld", (long long)n.total);
    CHECKF(n.active > 36500000000LL && n.active < 37500000000LL, "active %lld",
           (long long)n.active);
    CHECKF(llabs(n.total + n.mtp_total - 685000000000LL) < 1000000000LL, "with MTP %lld",
           (long long)(n.total + n.mtp_total));
    config_free(&c);
    REQUIRE(config_load(&c, "configs/v2-lite-16b.json", &e) == 0);
    config_count_params(&c, &n);
    CHECKF(llabs(n.total - 15700000000LL) < 100000000LL, "total %lld", (long long)n.total);
    CHECKF(llabs(n.active - 2400000000LL) < 100000000LL, "active %lld", (long long)n.active);
    config_free(&c);
}

int main(void)
{
    test_seed();
    RUN(test_minimal_defaults);
    RUN(test_two_spellings_agree);
    RUN(test_yarn_frequencies);
    RUN(test_refusals);
    RUN(test_roundtrip_keeps_unknown);
    RUN(test_published_counts);
    TEST_EXIT();
}
