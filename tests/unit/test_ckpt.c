/* Tests of lib/ckpt: sharded folders (every tensor in exactly one shard, none over the
 * limit unless alone, index names them all, loads back bitwise), BF16 output (loads back as
 * the rounded values), a save over an existing checkpoint replaces it whole and leaves no
 * temporary folder, a failed save leaves nothing, and a damaged index is refused. */
#include <dirent.h>
#include <jansson.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../../lib/ckpt.h"
#include "../test.h"

static char tmpdir[256];

static void tiny_config(dsv3_config *c)
{
    memset(c, 0, sizeof *c);
    c->vocab_size = 40;
    c->hidden_size = 16;
    c->intermediate_size = 24;
    c->moe_intermediate_size = 8;
    c->num_hidden_layers = 2;
    c->first_k_dense_replace = 1;
    c->num_attention_heads = 2;
    c->q_lora_rank = 8;
    c->kv_lora_rank = 8;
    c->qk_nope_head_dim = 4;
    c->qk_rope_head_dim = 4;
    c->v_head_dim = 4;
    c->n_shared_experts = 1;
    c->n_routed_experts = 4;
    c->num_experts_per_tok = 2;
    c->n_group = 1;
    c->topk_group = 1;
    c->routed_scaling_factor = 2.5;
    c->norm_topk_prob = 1;
    c->rms_norm_eps = 1e-6;
    c->max_position_embeddings = 64;
    c->initializer_range = 0.02;
    c->rope_theta = 10000;
    c->rope_interleave = 1;
    c->num_nextn_predict_layers = 1;
}

static int count_entries(const char *dir, const char *prefix)
{
    DIR *d = opendir(dir);
    int n = 0;
    struct dirent *de;
    while (d && (de = readdir(d)))
        n += !strncmp(de->d_name, prefix, strlen(prefix));
    if (d)
        closedir(d);
    return n;
}

static void test_sharded_roundtrip(void)
{
    dsv3_config c;
    tiny_config(&c);
    dsv3_model m, m2;
    dsv3_err e;
    REQUIRE(model_init(&m, &c, &e) == 0);
    model_init_random(&m, test_rand(), 0);
    char dir[512], path[600];
    snprintf(dir, sizeof dir, "%s/sharded", tmpdir);
    uint64_t max = 4096 + test_rand() % 8192;
    ckpt_opts o = {.max_shard_bytes = max};
    REQUIRE(ckpt_save(&m, dir, &o, &e) == 0);
    int shards = count_entries(dir, "model-");
    CHECKF(shards > 3, "%d shards for %zu bytes at max %llu", shards, m.n_params * 4,
           (unsigned long long)max);
    /* The index maps every saved tensor to a shard that holds it; shards respect the max. */
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    json_t *idx = json_load_file(path, 0, NULL);
    REQUIRE(idx);
    json_t *wm = json_object_get(idx, "weight_map");
    int64_t in_files = 0;
    for (int s = 1; s <= shards; s++) {
        char fn[64];
        snprintf(fn, sizeof fn, "model-%05d-of-%05d.safetensors", s, shards);
        snprintf(path, sizeof path, "%s/%s", dir, fn);
        st_file f;
        REQUIRE(st_open(&f, path, &e) == 0);
        uint64_t bytes = 0;
        for (int i = 0; i < f.n; i++) {
            bytes += f.t[i].nbytes;
            json_t *v = json_object_get(wm, f.t[i].name);
            CHECKF(v && !strcmp(json_string_value(v), fn), "%s not mapped to %s", f.t[i].name,
                   fn);
        }
        CHECKF(bytes <= max || f.n == 1, "shard %d holds %llu bytes", s,
               (unsigned long long)bytes);
        in_files += f.n;
        st_close(&f);
    }
    CHECK(in_files == (int64_t)json_object_size(wm));
    CHECK(in_files == m.n_t + 2);  /* + the MTP layer's embedding and head copies */
    json_decref(idx);
    REQUIRE(ckpt_load(&m2, dir, 0, &e) == 0);
    CHECK(m2.n_params == m.n_params && !memcmp(m.params, m2.params, m.n_params * 4));
    model_free(&m2);
    /* BF16: the same folder replaced, loads back as the rounded values. */
    o.dtype = ST_BF16;
    o.max_shard_bytes = 0;
    REQUIRE(ckpt_save(&m, dir, &o, &e) == 0);
    CHECK(count_entries(dir, "model-") == 0);
    CHECK(count_entries(dir, "model.safetensors.index") == 0);
    CHECK(count_entries(tmpdir, ".sharded") == 0);  /* no temporary folder left */
    REQUIRE(ckpt_load(&m2, dir, 0, &e) == 0);
    int bad = 0;
    for (size_t i = 0; i < m.n_params; i++)
        bad += m2.params[i] != st_bf16_to_f32(st_f32_to_bf16(m.params[i]));
    CHECKF(bad == 0, "%d values not the BF16 rounding", bad);
    model_free(&m2);
    model_free(&m);
}

static void test_failures(void)
{
    dsv3_config c;
    tiny_config(&c);
    dsv3_model m, m2;
    dsv3_err e;
    REQUIRE(model_init(&m, &c, &e) == 0);
    char dir[512], path[600];
    /* A folder whose parent does not exist: error, nothing created. */
    snprintf(dir, sizeof dir, "%s/no/such/ckpt", tmpdir);
    CHECK(ckpt_save(&m, dir, NULL, &e) == -1 && strstr(e.msg, dir));
    ckpt_opts o = {.dtype = ST_I8};
    snprintf(dir, sizeof dir, "%s/i8", tmpdir);
    CHECK(ckpt_save(&m, dir, &o, &e) == -1 && strstr(e.msg, "F32 or BF16"));
    CHECK(access(dir, F_OK) != 0);
    /* An index naming a shard that is not there, or a path outside the folder. */
    snprintf(dir, sizeof dir, "%s/idx", tmpdir);
    o = (ckpt_opts){.max_shard_bytes = 2048};
    REQUIRE(ckpt_save(&m, dir, &o, &e) == 0);
    snprintf(path, sizeof path, "%s/model-00002-of-%05d.safetensors", dir,
             count_entries(dir, "model-"));
    REQUIRE(unlink(path) == 0);
    CHECK(ckpt_load(&m2, dir, 0, &e) == -1 && strstr(e.msg, "model-00002"));
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    FILE *f = fopen(path, "w");
    fputs("{\"weight_map\": {\"model.norm.weight\": \"../x.safetensors\"}}", f);
    fclose(f);
    CHECK(ckpt_load(&m2, dir, 0, &e) == -1 && strstr(e.msg, "not a file name"));
    model_free(&m);
}

int main(void)
{
    test_seed();
    snprintf(tmpdir, sizeof tmpdir, "/tmp/dsv3-test-ckpt-%d", (int)getpid());
    mkdir(tmpdir, 0777);
    RUN(test_sharded_roundtrip);
    RUN(test_failures);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd)) {
    }
    TEST_EXIT();
}
