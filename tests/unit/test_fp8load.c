/* Tests of model_load on FP8 folders (DeepSeek's release format, as dsv3-quant writes it):
 * a random model whose dimensions cut 128x128 blocks at the edges, saved in shards and
 * quantized, loads with every FP8 weight equal bit for bit to lib/fp8's dequantization of
 * its codes and scales (wherever the shard of the scale) and every other tensor to its
 * stored value; the scale tensors are not unknown tensors. A missing scale, a scale of the
 * wrong shape or dtype, a 1-D FP8 tensor and a scale without an FP8 weight are errors
 * naming the file and the tensor. */
#include <math.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../../lib/ckpt.h"
#include "../../lib/convert.h"
#include "../../lib/fp8.h"
#include "../../lib/hfdir.h"
#include "../../lib/quant.h"
#include "../test.h"

static char tmpdir[256];

/* tiny.json with dimensions that are not multiples of 128. */
static int make_model(dsv3_model *m)
{
    dsv3_config c;
    dsv3_err e;
    if (config_load(&c, "configs/tiny.json", &e))
        return -1;
    c.hidden_size = 136 + (int)(test_rand() % 8) * 8;
    c.intermediate_size = 260;
    c.moe_intermediate_size = 40;
    c.vocab_size = 300;
    int rc = model_init(m, &c, &e);
    config_free(&c);
    if (!rc)
        model_init_random(m, test_rand(), 0.05);
    return rc;
}

/* The FP8 folder q of random model m, saved in shards first. */
static void make_fp8(dsv3_model *m, char *q, size_t n, const char *name)
{
    dsv3_err e;
    char src[400];
    REQUIRE(make_model(m) == 0);
    snprintf(src, sizeof src, "%s/src-%s", tmpdir, name);
    snprintf(q, n, "%s/%s", tmpdir, name);
    ckpt_opts co = {.dtype = test_rand() % 2 ? ST_BF16 : ST_F32,
                    .max_shard_bytes = 60000 + test_rand() % 60000};
    REQUIRE(ckpt_save(m, src, &co, &e) == 0);
    quant_opts o = {.threads = 1 + (int)(test_rand() % 3), .progress = PROGRESS_OFF};
    quant_stats st;
    REQUIRE(quant_folder(src, q, &o, &st, &e) == 0);
}

static void test_load_exact(void)
{
    dsv3_model src, m;
    dsv3_err e;
    char q[400];
    make_fp8(&src, q, sizeof q, "q1");
    int rc = model_load(&m, q, &e);
    REQUIRE(rc == 0 || (fprintf(stderr, "%s\n", e.msg), 0));
    CHECK(m.cfg.num_nextn_predict_layers == src.cfg.num_nextn_predict_layers);
    hfdir h;
    REQUIRE(hfdir_open(&h, q, &e) == 0);
    int n8 = 0, ragged = 0, bad = 0;
    for (int i = 0; i < m.n_t; i++) {
        const model_tensor *t = &m.t[i];
        
        const st_tensor *s = hfdir_find(&h, t->name, NULL);
        REQUIRE(s != NULL);
        float *want = malloc((size_t)t->numel * sizeof *want);
        REQUIRE(want != NULL);
        if (s->dtype == ST_F8_E4M3) {
            char sn[200];
            snprintf(sn, sizeof sn, "%s_scale_inv", t->name);
            const st_tensor *sc = hfdir_find(&h, sn, NULL);
            REQUIRE(sc != NULL && sc->dtype == ST_F32);
            float *scale = malloc((size_t)sc->numel * sizeof *scale);
            REQUIRE(scale != NULL);
            memcpy(scale, sc->data, (size_t)sc->numel * sizeof *scale);
            fp8_dequant_weight(s->data, scale, s->shape[0], s->shape[1], want, 1);
            free(scale);
            n8++;
            ragged += s->shape[0] % 128 != 0 && s->shape[0] > 128 && s->shape[1] % 128 != 0 &&
                      s->shape[1] > 128;
        } else {
            REQUIRE(st_to_f32(s, want, t->numel, &e) == 0);
        }
        int same = !memcmp(want, m.params + t->off, (size_t)t->numel * sizeof *want);
        CHECKF(same, "%s", t->name);
        bad |= !same;
        free(want);
    }
    CHECK(!bad);
    CHECK(n8 > 10);   /* every attention and MLP projection, the MTP block's included */
    CHECK(ragged > 0);
    if (getenv("DSV3_TEST_VERBOSE"))
        fprintf(stderr, "%d FP8 weights, %d ragged both ways\n", n8, ragged);
    /* the FP8 folder is not the source bit for bit, but within FP8's error */
    double worst = 0, amax = 0;
    for (size_t k = 0; k < m.n_params; k++) {
        worst = fmax(worst, fabs((double)m.params[k] - src.params[k]));
        amax = fmax(amax, fabs((double)src.params[k]));
    }
    CHECKF(worst > 0 && worst <= amax / 16 * 1.01, "worst %g, amax %g", worst, amax);
    hfdir_close(&h);
    model_free(&m);
    model_free(&src);
}

/* Writes folder DIR: q's config and one model.safetensors of q's tensors, with tensor
 * `drop` left out and (when add is not NULL) tensor add added. */
static void rewrite(const hfdir *h, const char *dir, const char *drop, const st_tensor *add)
{
    dsv3_err e;
    char cmd[4400], path[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s' && cp '%s/config.json' '%s/'", dir,
             dir, h->dir, dir);
    REQUIRE(system(cmd) == 0);
    st_writer w = {0};
    for (int i = 0; i < h->n_ent; i++) {
        const st_tensor *t = h->ent[i].t;
        if (drop && !strcmp(t->name, drop))
            continue;
        st_add(&w, t->name, t->dtype, t->ndim, t->shape, t->data);
    }
    if (add)
        st_add(&w, add->name, add->dtype, add->ndim, add->shape, add->data);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    REQUIRE(st_write(&w, path, &e) == 0);
    st_writer_free(&w);
}

/* Writes folder DIR: h's config, h's tensors other than the scales in one shard and the
 * scales in a second, with the index that maps them. */
static void split_scales(const hfdir *h, const char *dir)
{
    dsv3_err e;
    char cmd[4400], path[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s' && cp '%s/config.json' '%s/'", dir,
             dir, h->dir, dir);
    REQUIRE(system(cmd) == 0);
    static char f1[] = "model-00001-of-00002.safetensors", f2[] = "model-00002-of-00002.safetensors";
    char **names = calloc((size_t)h->n_ent, sizeof *names);
    char **files = calloc((size_t)h->n_ent, sizeof *files);
    REQUIRE(names && files);
    uint64_t total = 0;
    for (int part = 0; part < 2; part++) {
        st_writer w = {0};
        for (int i = 0; i < h->n_ent; i++) {
            const st_tensor *t = h->ent[i].t;
            if ((strstr(t->name, "_scale_inv") != NULL) != part)
                continue;
            st_add(&w, t->name, t->dtype, t->ndim, t->shape, t->data);
            names[i] = t->name;
            files[i] = part ? f2 : f1;
            total += t->nbytes;
        }
        snprintf(path, sizeof path, "%s/%s", dir, part ? f2 : f1);
        REQUIRE(st_write(&w, path, &e) == 0);
        st_writer_free(&w);
    }
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    REQUIRE(convert_write_index(path, names, files, h->n_ent, total, &e) == 0);
    free(names);
    free(files);
}

/* model_load of dir fails with a message holding both strings. */
static int fails_with(const char *dir, const char *a, const char *b)
{
    dsv3_model m;
    dsv3_err e;
    if (model_load(&m, dir, &e) == 0) {
        model_free(&m);
        return 0;
    }
    int ok = strstr(e.msg, a) && strstr(e.msg, b);
    if (!ok)
        fprintf(stderr, "    got: %s\n", e.msg);
    return ok;
}

static void test_bad_scales(void)
{
    dsv3_model src;
    dsv3_err e;
    char q[400], bad[400];
    make_fp8(&src, q, sizeof q, "q2");
    model_free(&src);
    hfdir h;
    REQUIRE(hfdir_open(&h, q, &e) == 0);
    snprintf(bad, sizeof bad, "%s/bad", tmpdir);
    const char *w = "model.layers.0.self_attn.o_proj.weight";
    const char *sn = "model.layers.0.self_attn.o_proj.weight_scale_inv";
    const st_tensor *t = hfdir_find(&h, w, NULL), *s = hfdir_find(&h, sn, NULL);
    REQUIRE(t && s && t->dtype == ST_F8_E4M3);

    /* the whole folder rewritten as one file loads */
    rewrite(&h, bad, NULL, NULL);
    dsv3_model m, m2;
    CHECK(model_load(&m, bad, &e) == 0);
    /* and so does one with every scale in another shard than its weight, to the same bits */
    char split[400];
    snprintf(split, sizeof split, "%s/split", tmpdir);
    split_scales(&h, split);
    int rc = model_load(&m2, split, &e);
    CHECKF(rc == 0, "%s", e.msg);
    if (!rc) {
        CHECK(m2.n_params == m.n_params &&
              !memcmp(m.params, m2.params, m.n_params * sizeof *m.params));
        model_free(&m2);
    }
    model_free(&m);

    rewrite(&h, bad, sn, NULL);
    CHECK(fails_with(bad, "bad/model.safetensors: FP8 tensor \"", "o_proj.weight\" has no "
                     "model.layers.0.self_attn.o_proj.weight_scale_inv"));

    /* the scales of a transposed grid: the element count fits, the shape does not */
    st_tensor tr = *s;
    tr.shape[0] = s->shape[1];
    tr.shape[1] = s->shape[0];
    if (tr.shape[0] == tr.shape[1]) {  /* square grid: one block row too few instead */
        tr.shape[0] = s->shape[0] - 1;
        tr.nbytes = (uint64_t)(tr.shape[0] * tr.shape[1]) * 4;
        tr.numel = tr.shape[0] * tr.shape[1];
    }
    rewrite(&h, bad, sn, &tr);
    CHECK(fails_with(bad, "bad/model.safetensors: \"model.layers.0.self_attn.o_proj."
                     "weight_scale_inv\" is F32", "the 128x128 blocks of \"model.layers.0."
                     "self_attn.o_proj.weight\" need F32"));

    /* BF16 scales (half the bytes of the F32 ones) */
    st_tensor b16 = *s;
    b16.dtype = ST_BF16;
    b16.nbytes = s->nbytes / 2;
    rewrite(&h, bad, sn, &b16);
    CHECK(fails_with(bad, "weight_scale_inv\" is BF16", "need F32"));

    /* a scale whose weight is not FP8: an unknown tensor */
    st_tensor orphan = *s;
    orphan.name = "model.layers.0.input_layernorm.weight_scale_inv";
    rewrite(&h, bad, NULL, &orphan);
    CHECK(fails_with(bad, "input_layernorm.weight_scale_inv\" is not part of this model",
                     "bad/model.safetensors"));

    /* a 1-D FP8 tensor (a norm weight's bytes read as FP8) */
    const st_tensor *norm = hfdir_find(&h, "model.norm.weight", NULL);
    REQUIRE(norm != NULL);
    st_tensor n8 = *norm;
    n8.dtype = ST_F8_E4M3;
    n8.nbytes = (uint64_t)norm->numel;
    rewrite(&h, bad, "model.norm.weight", &n8);
    CHECK(fails_with(bad, "FP8 tensor \"model.norm.weight\" is not 2-D", "bad/model.safetensors"));
    hfdir_close(&h);
}

int main(void)
{
    test_seed();
    snprintf(tmpdir, sizeof tmpdir, "/tmp/dsv3-test-fp8load-%d", (int)getpid());
    mkdir(tmpdir, 0777);
    RUN(test_load_exact);
    RUN(test_bad_scales);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd)) {
    }
    TEST_EXIT();
}
