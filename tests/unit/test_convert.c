/* Tests of lib/layout and lib/convert: the layout from a config is lib/model's checkpoint
 * order exactly; HF conversions (F32 -> BF16 rounds each value to nearest even, BF16 ->
 * F32 is exact, F32 -> F32 is bitwise, shards and index consistent, --no-mtp drops the MTP
 * layer, the output loads with model_load); FP8 input is dequantized as bf16(f32(q) * s);
 * the DeepSeek export renames as its convert.py and its model-parallel parts put back
 * together are the input; a folder whose tensors do not match the config (shape, missing,
 * extra) and an existing output folder without force are refused, leaving no folder. */
#include <dirent.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../../lib/ckpt.h"
#include "../../lib/convert.h"
#include "../../lib/fp8.h"
#include "../../lib/quant.h"
#include "../test.h"

static char tmpdir[256];

static int exists(const char *p)
{
    struct stat sb;
    return stat(p, &sb) == 0;
}

/* No hidden .NAME.tmp.PID folders left in tmpdir. */
static int leftovers(void)
{
    DIR *d = opendir(tmpdir);
    int n = 0;
    struct dirent *de;
    while (d && (de = readdir(d)))
        n += de->d_name[0] == '.' && strstr(de->d_name, ".tmp.") != NULL;
    if (d)
        closedir(d);
    return n;
}

static int load_cfg(dsv3_config *c, const char *path)
{
    dsv3_err e;
    return config_load(c, path, &e);
}

static int make_model(dsv3_model *m, const char *cfg)
{
    dsv3_config c;
    dsv3_err e;
    if (load_cfg(&c, cfg))
        return -1;
    int rc = model_init(m, &c, &e);
    config_free(&c);
    if (!rc)
        model_init_random(m, test_rand(), 0.5);
    return rc;
}

typedef struct walk {
    const layout *L;
    int i, bad;
} walk;

static int cmp_layout(void *ctx, const char *name, int ndim, const int64_t *shape,
                      const float *data)
{
    (void)data;
    walk *w = ctx;
    const layout_tensor *t = w->i < w->L->n ? &w->L->t[w->i] : NULL;
    if (!t || strcmp(t->name, name) || t->ndim != ndim || t->shape[0] != shape[0] ||
        (ndim == 2 && t->shape[1] != shape[1])) {
        fprintf(stderr, "    layout %d: %s, model %s\n", w->i, t ? t->name : "(end)", name);
        w->bad = 1;
        return 1;
    }
    w->i++;
    return 0;
}

static void test_layout_is_model_order(void)
{
    static const char *cfgs[] = {"configs/tiny.json", "configs/small.json",
                                 "tests/fixtures/hf/noq_plain/config.json",
                                 "tests/fixtures/hf/qlora_yarn/config.json"};
    for (size_t k = 0; k < sizeof cfgs / sizeof *cfgs; k++)
        for (int tie = 0; tie < 2; tie++) {
            dsv3_config c;
            dsv3_err e;
            REQUIRE(load_cfg(&c, cfgs[k]) == 0);
            c.tie_word_embeddings = tie;
            if (k == 0 && tie)
                c.num_nextn_predict_layers = 2;
            dsv3_model m;
            REQUIRE(model_init(&m, &c, &e) == 0);
            layout L;
            REQUIRE(layout_build(&L, &c, c.num_nextn_predict_layers, &e) == 0);
            walk w = {&L, 0, 0};
            model_each_saved(&m, cmp_layout, &w);
            CHECKF(!w.bad && w.i == L.n, "%s tie %d: %d of %d", cfgs[k], tie, w.i, L.n);
            layout_free(&L);
            model_free(&m);
            config_free(&c);
        }
    /* the FP8 rule: DeepSeek's release */
    CHECK(layout_is_fp8("model.layers.0.self_attn.q_a_proj.weight"));
    CHECK(layout_is_fp8("model.layers.61.self_attn.kv_a_proj_with_mqa.weight"));
    CHECK(layout_is_fp8("model.layers.5.mlp.experts.17.down_proj.weight"));
    CHECK(layout_is_fp8("model.layers.5.mlp.shared_experts.up_proj.weight"));
    CHECK(layout_is_fp8("model.layers.0.mlp.gate_proj.weight"));
    CHECK(!layout_is_fp8("model.layers.5.mlp.gate.weight"));
    CHECK(!layout_is_fp8("model.layers.5.mlp.gate.e_score_correction_bias"));
    CHECK(!layout_is_fp8("model.layers.61.eh_proj.weight"));
    CHECK(!layout_is_fp8("model.layers.61.shared_head.head.weight"));
    CHECK(!layout_is_fp8("model.embed_tokens.weight"));
    CHECK(!layout_is_fp8("lm_head.weight"));
    CHECK(!layout_is_fp8("model.layers.0.self_attn.q_a_layernorm.weight"));
}

static float value(const st_tensor *t, int64_t i)
{
    if (t->dtype == ST_F32) {
        float x;
        memcpy(&x, (const char *)t->data + 4 * i, 4);
        return x;
    }
    uint16_t h;
    memcpy(&h, (const char *)t->data + 2 * i, 2);
    return st_bf16_to_f32(h);
}

static void test_hf_roundtrips(void)
{
    dsv3_model m;
    dsv3_err e;
    REQUIRE(make_model(&m, "configs/tiny.json") == 0);
    char src[400], b16[400], f32[400], f32b[400];
    snprintf(src, sizeof src, "%s/src", tmpdir);
    snprintf(b16, sizeof b16, "%s/bf16", tmpdir);
    snprintf(f32, sizeof f32, "%s/f32", tmpdir);
    snprintf(f32b, sizeof f32b, "%s/f32b", tmpdir);
    REQUIRE(ckpt_save(&m, src, NULL, &e) == 0);
    conv_opts o = {.dtype = ST_BF16, .max_shard_bytes = 40000 + test_rand() % 40000};
    conv_stats st;
    REQUIRE(convert_hf(src, b16, &o, &st, &e) == 0);
    CHECK(st.n_files > 2 && st.mtp_layers == 1);
    o.dtype = ST_F32;
    o.max_shard_bytes = 0;
    REQUIRE(convert_hf(b16, f32, &o, &st, &e) == 0);
    REQUIRE(convert_hf(src, f32b, &o, &st, &e) == 0);
    hfdir hb, hf, hs, hf2;
    REQUIRE(hfdir_open(&hb, b16, &e) == 0);
    REQUIRE(hfdir_open(&hf, f32, &e) == 0);
    REQUIRE(hfdir_open(&hs, src, &e) == 0);
    REQUIRE(hfdir_open(&hf2, f32b, &e) == 0);
    CHECK(hb.indexed && !hf.indexed && hb.n_ent == hs.n_ent && hf.n_ent == hs.n_ent);
    int bad = 0;
    for (int i = 0; i < hs.n_ent && !bad; i++) {
        const st_tensor *s = hs.ent[i].t, *b = hfdir_find(&hb, s->name, NULL),
                        *f = hfdir_find(&hf, s->name, NULL), *f2 = hfdir_find(&hf2, s->name, NULL);
        int bias = strstr(s->name, "e_score_correction_bias") != NULL;
        REQUIRE(b && f && f2 && b->dtype == (bias ? ST_F32 : ST_BF16) && f->dtype == ST_F32);
        CHECKF(f2->nbytes == s->nbytes && !memcmp(f2->data, s->data, s->nbytes), "%s", s->name);
        if (bias) {  /* kept F32 */
            CHECKF(!memcmp(b->data, s->data, s->nbytes), "%s", s->name);
            continue;
        }
        for (int64_t j = 0; j < s->numel && !bad; j++) {
            float x = value(s, j);
            uint16_t want = st_f32_to_bf16(x), got;
            memcpy(&got, (const char *)b->data + 2 * j, 2);
            bad = got != want || value(f, j) != st_bf16_to_f32(want);
            if (bad)
                fprintf(stderr, "    %s[%lld]\n", s->name, (long long)j);
        }
    }
    CHECK(!bad);
    hfdir_close(&hb);
    hfdir_close(&hf);
    hfdir_close(&hs);
    hfdir_close(&hf2);
    /* the converted folders load as models; --no-mtp drops layer num_hidden_layers */
    dsv3_model m2;
    REQUIRE(model_load(&m2, f32b, &e) == 0);
    CHECK(m2.n_params == m.n_params && !memcmp(m2.params, m.params, m.n_params * 4));
    model_free(&m2);
    char nomtp[400];
    snprintf(nomtp, sizeof nomtp, "%s/nomtp", tmpdir);
    o.no_mtp = 1;
    REQUIRE(convert_hf(src, nomtp, &o, &st, &e) == 0);
    REQUIRE(model_load(&m2, nomtp, &e) == 0);
    CHECK(m2.cfg.num_nextn_predict_layers == 0 && m2.n_t < m.n_t);
    CHECK(!memcmp(m2.params, m.params, m2.n_params * 4));  /* MTP comes last */
    model_free(&m2);
    CHECK(convert_verify(nomtp, NULL, 1, &st, &e) == 0 && st.mtp_layers == 0);
    CHECK(leftovers() == 0);
    model_free(&m);
}

static void test_fp8_input(void)
{
    dsv3_model m;
    dsv3_err e;
    REQUIRE(make_model(&m, "configs/tiny.json") == 0);
    char src[400], q[400], out[400];
    snprintf(src, sizeof src, "%s/fsrc", tmpdir);
    snprintf(q, sizeof q, "%s/fq", tmpdir);
    snprintf(out, sizeof out, "%s/fout", tmpdir);
    ckpt_opts co = {.dtype = ST_BF16};
    REQUIRE(ckpt_save(&m, src, &co, &e) == 0);
    quant_opts qo = {0};
    REQUIRE(quant_folder(src, q, &qo, NULL, &e) == 0);
    conv_opts o = {.dtype = ST_BF16};
    REQUIRE(convert_hf(q, out, &o, NULL, &e) == 0);
    hfdir hq, ho;
    REQUIRE(hfdir_open(&hq, q, &e) == 0);
    REQUIRE(hfdir_open(&ho, out, &e) == 0);
    int n8 = 0, bad = 0;
    for (int i = 0; i < hq.n_ent && !bad; i++) {
        const st_tensor *t = hq.ent[i].t;
        if (t->dtype != ST_F8_E4M3)
            continue;
        n8++;
        char sn[200];
        snprintf(sn, sizeof sn, "%s_scale_inv", t->name);
        const st_tensor *s = hfdir_find(&hq, sn, NULL), *b = hfdir_find(&ho, t->name, NULL);
        REQUIRE(s && b && b->dtype == ST_BF16);
        int64_t cols = t->shape[1], nbc = fp8_blocks(cols);
        for (int64_t j = 0; j < t->numel && !bad; j++) {
            float sc;
            memcpy(&sc, (const char *)s->data + 4 * ((j / cols / 128) * nbc + j % cols / 128), 4);
            uint16_t want = st_f32_to_bf16(fp8_e4m3_to_f32(((const uint8_t *)t->data)[j]) * sc);
            uint16_t got;
            memcpy(&got, (const char *)b->data + 2 * j, 2);
            bad = got != want;
        }
    }
    CHECK(n8 > 10 && !bad);
    for (int i = 0; i < ho.n_ent; i++)  /* no FP8 and no scales left */
        CHECKF(ho.ent[i].t->dtype ==
                   (strstr(ho.ent[i].name, "correction_bias") ? ST_F32 : ST_BF16),
               "%s", ho.ent[i].name);
    CHECK(json_object_get(ho.cfg.json, "quantization_config") == NULL);
    hfdir_close(&hq);
    hfdir_close(&ho);
    model_free(&m);
}

/* Rewrites DIR/model.safetensors with tensor NAME replaced by one of shape [d0] (or
 * dropped when d0 < 0), or with an extra tensor NAME when it is not there. */
static void damage(const char *dir, const char *name, int64_t d0)
{
    char p[500];
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    st_file f;
    dsv3_err e;
    if (st_open(&f, p, &e))
        return;
    st_writer w = {0};
    static float junk[64];
    int found = 0;
    for (int i = 0; i < f.n; i++) {
        if (!strcmp(f.t[i].name, name)) {
            found = 1;
            if (d0 >= 0)
                st_add(&w, name, ST_F32, 1, &d0, junk);
            continue;
        }
        st_add(&w, f.t[i].name, f.t[i].dtype, f.t[i].ndim, f.t[i].shape, f.t[i].data);
    }
    if (!found)
        st_add(&w, name, ST_F32, 1, &d0, junk);
    st_write(&w, p, &e);
    st_writer_free(&w);
    st_close(&f);
}

static void test_mismatch(void)
{
    dsv3_model m;
    dsv3_err e;
    REQUIRE(make_model(&m, "configs/tiny.json") == 0);
    struct {
        const char *tensor;
        int64_t d0;
        const char *want;
    } cases[] = {
        {"model.norm.weight", 63, "has shape [63], the config needs [64]"},
        {"model.layers.1.mlp.experts.3.up_proj.weight", -1, "is missing"},
        {"model.layers.0.mlp.experts.0.up_proj.weight", 8, "not part of the config's layout"},
        {"model.layers.9.input_layernorm.weight", 64, "beyond num_hidden_layers"},
    };
    char dir[400], out[400];
    snprintf(out, sizeof out, "%s/never", tmpdir);
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        snprintf(dir, sizeof dir, "%s/bad%zu", tmpdir, i);
        REQUIRE(ckpt_save(&m, dir, NULL, &e) == 0);
        damage(dir, cases[i].tensor, cases[i].d0);
        conv_stats st;
        CHECKF(convert_verify(dir, NULL, 1, &st, &e) == -1 && strstr(e.msg, cases[i].tensor) &&
               strstr(e.msg, cases[i].want), "%s", e.msg);
        conv_opts o = {.dtype = ST_BF16};
        CHECK(convert_hf(dir, out, &o, &st, &e) == -1 && strstr(e.msg, cases[i].tensor));
        quant_opts qo = {0};
        CHECK(quant_folder(dir, out, &qo, NULL, &e) == -1 && strstr(e.msg, cases[i].tensor));
        CHECK(!exists(out));
    }
    /* an existing output folder: refused, untouched; with force, replaced */
    snprintf(dir, sizeof dir, "%s/good", tmpdir);
    REQUIRE(ckpt_save(&m, dir, NULL, &e) == 0);
    REQUIRE(mkdir(out, 0777) == 0);
    conv_opts o = {.dtype = ST_BF16};
    CHECKF(convert_hf(dir, out, &o, NULL, &e) == -1 && strstr(e.msg, "--force"), "%s", e.msg);
    char p[500];
    snprintf(p, sizeof p, "%s/config.json", out);
    CHECK(!exists(p));
    o.force = 1;
    CHECK(convert_hf(dir, out, &o, NULL, &e) == 0 && exists(p));
    CHECK(convert_verify(out, NULL, 1, NULL, &e) == 0);
    CHECK(leftovers() == 0);
    model_free(&m);
}

static void test_deepseek_export(void)
{
    dsv3_model m;
    dsv3_err e;
    REQUIRE(make_model(&m, "configs/tiny.json") == 0);
    char src[400], out[400], p[600];
    snprintf(src, sizeof src, "%s/dsrc", tmpdir);
    snprintf(out, sizeof out, "%s/dsout", tmpdir);
    REQUIRE(ckpt_save(&m, src, NULL, &e) == 0);
    int mp = 2;
    conv_opts o = {.dtype = ST_F32, .mp = mp};
    REQUIRE(convert_deepseek(src, out, &o, NULL, &e) == 0);
    st_file f[2];
    for (int r = 0; r < mp; r++) {
        snprintf(p, sizeof p, "%s/model%d-mp%d.safetensors", out, r, mp);
        REQUIRE(st_open(&f[r], p, &e) == 0);
    }
    /* convert.py's names */
    char dn[128];
    int dim;
    struct { const char *hf, *ds; int dim; } names[] = {
        {"model.embed_tokens.weight", "embed.weight", 0},
        {"model.layers.0.self_attn.q_b_proj.weight_scale_inv", "layers.0.attn.wq_b.scale", 0},
        {"model.layers.1.mlp.gate.e_score_correction_bias", "layers.1.ffn.gate.bias", -1},
        {"model.layers.1.mlp.experts.5.down_proj.weight", "layers.1.ffn.experts.5.w2.weight", 1},
        {"model.layers.1.mlp.shared_experts.up_proj.weight", "layers.1.ffn.shared_experts.w3.weight", 0},
        {"model.layers.0.self_attn.kv_a_layernorm.weight", "layers.0.attn.kv_norm.weight", -1},
        {"model.layers.0.self_attn.o_proj.weight", "layers.0.attn.wo.weight", 1},
        {"model.norm.weight", "norm.weight", -1},
        {"lm_head.weight", "head.weight", 0},
    };
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        CHECKF(convert_ds_name(names[i].hf, dn, sizeof dn, &dim) == 0 &&
               !strcmp(dn, names[i].ds) && dim == names[i].dim, "%s -> %s", names[i].hf, dn);
    /* every main-model tensor put back together from the parts; no MTP layer */
    int n_local = m.cfg.n_routed_experts / mp, bad = 0, total = 0;
    for (int i = 0; i < m.n_t && !bad; i++) {
        const model_tensor *t = &m.t[i];
        if (layout_layer_of(t->name) >= m.cfg.num_hidden_layers)
            continue;
        REQUIRE(convert_ds_name(t->name, dn, sizeof dn, &dim) == 0);
        const char *x = strstr(t->name, ".experts.");
        int expert = x && !strstr(t->name, "shared") ? atoi(x + 9) : -1;
        const float *want = m.params + t->off;
        int64_t r = t->shape[0], c = t->ndim == 2 ? t->shape[1] : 1;
        for (int k = 0; k < mp; k++) {
            const st_tensor *s = st_find(&f[k], dn);
            if (expert >= 0) {
                bad |= (s != NULL) != (expert / n_local == k);
                if (s)
                    bad |= memcmp(s->data, want, (size_t)t->numel * 4) != 0;
                continue;
            }
            if (!s) {
                bad = 1;
                break;
            }
            total++;
            for (int64_t j = 0; j < s->numel && !bad; j++) {
                int64_t row, col;
                if (dim == 0)
                    row = j / c + k * (r / mp), col = j % c;
                else if (dim == 1)
                    row = j / (c / mp), col = j % (c / mp) + k * (c / mp);
                else
                    row = j / c, col = j % c;
                float got;
                memcpy(&got, (const char *)s->data + 4 * j, 4);
                bad |= got != want[row * c + col];
            }
            if (bad)
                fprintf(stderr, "    %s (%s) rank %d\n", t->name, dn, k);
        }
    }
    CHECK(!bad && total > 20);
    for (int k = 0; k < mp; k++)
        for (int i = 0; i < f[k].n; i++)
            CHECKF(strncmp(f[k].t[i].name, "layers.3.", 9), "%s", f[k].t[i].name);
    for (int r = 0; r < mp; r++)
        st_close(&f[r]);
    snprintf(p, sizeof p, "%s/inference-config.json", out);
    json_t *j = json_load_file(p, 0, NULL);
    CHECK(j && json_integer_value(json_object_get(j, "n_layers")) == 3 &&
          json_integer_value(json_object_get(j, "dim")) == 64);
    json_decref(j);
    /* an mp that does not divide the experts is refused */
    o.mp = 3;
    snprintf(out, sizeof out, "%s/dsout3", tmpdir);
    CHECK(convert_deepseek(src, out, &o, NULL, &e) == -1 && !exists(out));
    model_free(&m);
}

/* DeepSeek-V3's released checkpoint (a listing of deepseek-ai/DeepSeek-V3's headers,
 * simpx/model-inspect's README: 91991 tensors, 688574839360 bytes) is what our layout of
 * configs/v3-671b.json, with dsv3-quant's choices (FP8 + an F32 scale per 128x128 block for
 * layout_is_fp8, F32 correction bias, BF16 for the rest), adds up to. */
static void test_v3_release_inventory(void)
{
    dsv3_config c;
    dsv3_err e;
    REQUIRE(load_cfg(&c, "configs/v3-671b.json") == 0);
    layout L;
    REQUIRE(layout_build(&L, &c, c.num_nextn_predict_layers, &e) == 0);
    int64_t tensors = L.n, bytes = 0;
    for (int i = 0; i < L.n; i++) {
        const layout_tensor *t = &L.t[i];
        int64_t n = t->shape[0] * (t->ndim == 2 ? t->shape[1] : 1);
        if (layout_is_fp8(t->name)) {
            tensors++;
            bytes += n + 4 * fp8_blocks(t->shape[0]) * fp8_blocks(t->shape[1]);
        } else {
            bytes += n * (strstr(t->name, "e_score_correction_bias") ? 4 : 2);
        }
    }
    CHECKF(tensors == 91991 && bytes == 688574839360LL, "%lld tensors, %lld bytes",
           (long long)tensors, (long long)bytes);
    layout_free(&L);
    config_free(&c);
}

/* A conversion killed midway leaves no OUT, only its hidden folder, which the next run
 * for OUT removes. */
static void test_killed(void)
{
    dsv3_model m;
    dsv3_err e;
    REQUIRE(make_model(&m, "configs/tiny.json") == 0);
    char src[400], out[400], tmp[500];
    snprintf(src, sizeof src, "%s/ksrc", tmpdir);
    snprintf(out, sizeof out, "%s/killed", tmpdir);
    REQUIRE(ckpt_save(&m, src, NULL, &e) == 0);
    model_free(&m);
    fflush(NULL);
    pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {  /* many small fsynced shards: slow enough to be caught midway */
        conv_opts o = {.dtype = ST_F32, .max_shard_bytes = 4000};
        _exit(convert_hf(src, out, &o, NULL, &e) ? 1 : 0);
    }
    snprintf(tmp, sizeof tmp, "%s/.killed.tmp.%ld", tmpdir, (long)pid);
    int seen = 0;
    for (int i = 0; i < 20000 && !seen; i++) {
        DIR *d = opendir(tmp);
        struct dirent *de;
        while (d && (de = readdir(d)))
            seen |= !strncmp(de->d_name, "model-00003-of-", 15);
        if (d)
            closedir(d);
        if (!seen)
            usleep(100);
    }
    kill(pid, SIGKILL);
    int status;
    waitpid(pid, &status, 0);
    if (!seen || !WIFSIGNALED(status))
        SKIP("the conversion ended before it could be killed");
    CHECK(!exists(out) && exists(tmp));
    conv_opts o = {.dtype = ST_BF16};
    CHECK(convert_hf(src, out, &o, NULL, &e) == 0 && exists(out));
    CHECK(!exists(tmp) && leftovers() == 0);
}

int main(void)
{
    test_seed();
    snprintf(tmpdir, sizeof tmpdir, "/tmp/dsv3-test-convert-%d", (int)getpid());
    mkdir(tmpdir, 0777);
    RUN(test_layout_is_model_order);
    RUN(test_v3_release_inventory);
    RUN(test_hf_roundtrips);
    RUN(test_fp8_input);
    RUN(test_mismatch);
    RUN(test_deepseek_export);
    RUN(test_killed);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd)) {
    }
    TEST_EXIT();
}
