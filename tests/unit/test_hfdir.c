/* Tests of lib/hfdir: a sharded folder (written by lib/ckpt) opens with every tensor found
 * in the shard the index names and bytes equal to the model's; a single-file folder opens;
 * a shard named in the index but missing, an index entry its shard lacks, a shard tensor
 * the index does not list or puts elsewhere, a truncated shard, a missing config and an
 * index naming a file outside the folder are refused with the name of what is wrong. */
#include <jansson.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../../lib/ckpt.h"
#include "../../lib/hfdir.h"
#include "../test.h"

static char tmpdir[256];

static int make_model(dsv3_model *m, dsv3_err *e)
{
    dsv3_config c;
    if (config_load(&c, "configs/tiny.json", e))
        return -1;
    int rc = model_init(m, &c, e);
    config_free(&c);
    if (!rc)
        model_init_random(m, test_rand(), 0);
    return rc;
}

/* A fresh sharded F32 checkpoint at tmpdir/NAME. */
static int save_sharded(const dsv3_model *m, const char *name, char *dir, size_t n)
{
    snprintf(dir, n, "%s/%s", tmpdir, name);
    ckpt_opts o = {.max_shard_bytes = 60000};
    dsv3_err e;
    return ckpt_save(m, dir, &o, &e);
}

static void test_open_sharded(void)
{
    dsv3_model m;
    dsv3_err e;
    REQUIRE(make_model(&m, &e) == 0);
    char dir[400];
    REQUIRE(save_sharded(&m, "ok", dir, sizeof dir) == 0);
    hfdir h;
    REQUIRE(hfdir_open(&h, dir, &e) == 0);
    CHECK(h.indexed && h.n_files > 2);
    for (int f = 1; f < h.n_files; f++)
        CHECK(strcmp(h.file_names[f - 1], h.file_names[f]) < 0);
    int n_copies = 2 * m.cfg.num_nextn_predict_layers;
    CHECKF(h.n_ent == m.n_t + n_copies, "%d tensors, model %d", h.n_ent, m.n_t);
    for (int i = 0; i < m.n_t; i++) {
        int f;
        const st_tensor *t = hfdir_find(&h, m.t[i].name, &f);
        CHECKF(t && f >= 0 && t->numel == m.t[i].numel &&
               !memcmp(t->data, m.params + m.t[i].off, (size_t)t->numel * 4) &&
               st_find(&h.files[f], m.t[i].name) == t, "%s", m.t[i].name);
    }
    CHECK(hfdir_find(&h, "model.nothing.weight", NULL) == NULL);
    hfdir_close(&h);
    /* one file, no index */
    snprintf(dir, sizeof dir, "%s/single", tmpdir);
    REQUIRE(ckpt_save(&m, dir, NULL, &e) == 0);
    REQUIRE(hfdir_open(&h, dir, &e) == 0);
    CHECK(!h.indexed && h.n_files == 1 && h.n_ent == m.n_t + n_copies);
    hfdir_close(&h);
    model_free(&m);
}

/* Rewrites DIR's index through fn. */
static void edit_index(const char *dir, void (*fn)(json_t *wm))
{
    char p[500];
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", dir);
    json_t *root = json_load_file(p, 0, NULL);
    fn(json_object_get(root, "weight_map"));
    json_dump_file(root, p, 0);
    json_decref(root);
}

static void move_embed(json_t *wm)
{
    /* claims the embedding lives in the last shard (it is in the first) */
    const char *last = NULL, *k;
    json_t *v;
    json_object_foreach(wm, k, v) if (!last || strcmp(json_string_value(v), last) > 0)
        last = json_string_value(v);
    json_object_set_new(wm, "model.embed_tokens.weight", json_string(last));
}

static void drop_norm(json_t *wm) { json_object_del(wm, "model.norm.weight"); }
static void add_ghost(json_t *wm)
{
    json_object_set_new(wm, "model.ghost.weight", json_string("model-00001-of-00009.safetensors"));
}
static void escape(json_t *wm)
{
    json_object_set_new(wm, "model.norm.weight", json_string("../model.safetensors"));
}

static void test_bad_folders(void)
{
    dsv3_model m;
    dsv3_err e;
    REQUIRE(make_model(&m, &e) == 0);
    char dir[400], p[500];
    hfdir h;
    struct {
        const char *name;
        void (*edit)(json_t *);
        const char *want;
    } cases[] = {
        {"moved", move_embed, "does not hold it"},
        {"unlisted", drop_norm, "not in the index"},
        {"ghost", add_ghost, "model-00001-of-00009.safetensors"},
        {"escape", escape, "not a file name in the folder"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        REQUIRE(save_sharded(&m, cases[i].name, dir, sizeof dir) == 0);
        edit_index(dir, cases[i].edit);
        CHECKF(hfdir_open(&h, dir, &e) == -1 && strstr(e.msg, cases[i].want), "%s: %s",
               cases[i].name, e.msg);
    }
    /* a shard named in the index is missing */
    REQUIRE(save_sharded(&m, "missing", dir, sizeof dir) == 0);
    {
        hfdir ok;
        REQUIRE(hfdir_open(&ok, dir, &e) == 0);
        snprintf(p, sizeof p, "%s/%s", dir, ok.file_names[1]);
        hfdir_close(&ok);
    }
    REQUIRE(unlink(p) == 0);
    CHECKF(hfdir_open(&h, dir, &e) == -1 && strstr(e.msg, strrchr(p, '/') + 1) &&
           strstr(e.msg, "named in"), "%s", e.msg);
    /* a truncated shard */
    REQUIRE(save_sharded(&m, "truncated", dir, sizeof dir) == 0);
    {
        hfdir ok;
        REQUIRE(hfdir_open(&ok, dir, &e) == 0);
        snprintf(p, sizeof p, "%s/%s", dir, ok.file_names[0]);
        hfdir_close(&ok);
    }
    struct stat sb;
    REQUIRE(stat(p, &sb) == 0);
    REQUIRE(truncate(p, sb.st_size - 1 - (off_t)(test_rand() % 1000)) == 0);
    CHECKF(hfdir_open(&h, dir, &e) == -1 && strstr(e.msg, strrchr(p, '/') + 1), "%s", e.msg);
    /* no config.json */
    REQUIRE(save_sharded(&m, "noconfig", dir, sizeof dir) == 0);
    snprintf(p, sizeof p, "%s/config.json", dir);
    REQUIRE(unlink(p) == 0);
    CHECKF(hfdir_open(&h, dir, &e) == -1 && strstr(e.msg, "config.json"), "%s", e.msg);
    model_free(&m);
}

int main(void)
{
    test_seed();
    snprintf(tmpdir, sizeof tmpdir, "/tmp/dsv3-test-hfdir-%d", (int)getpid());
    mkdir(tmpdir, 0777);
    RUN(test_open_sharded);
    RUN(test_bad_folders);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd)) {
    }
    TEST_EXIT();
}
