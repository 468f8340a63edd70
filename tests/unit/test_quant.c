/* Tests of lib/quant on random models whose dimensions are not multiples of 128 (edge
 * blocks): which tensors become FP8 (DeepSeek's release: attention and MLP projections,
 * MTP block included) and which stay BF16/F32; each scale is the block's amax / 448 and
 * each FP8 code e4m3(w / s); the error per element is within FP8's bound
 * (|err| <= max(|w| 2^-4, s 2^-10), up to float rounding of w / s); dequantization is
 * bf16(f32(q) * s) bit for bit and drops scales and quantization_config; the output keeps
 * the input's shard files, each tensor in its place; quantizing FP8 again changes nothing;
 * a NaN or infinity is an error naming the tensor, and leaves no folder. */
#include <dirent.h>
#include <jansson.h>
#include <math.h>
#include <sys/stat.h>
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

/* tiny.json with dimensions that cut 128x128 blocks at the edges. */
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

static float f32_at(const st_tensor *t, int64_t i)
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

/* Checks one quantized weight against its source w; returns the worst error/bound ratio. */
static double check_fp8(const st_tensor *src, const st_tensor *q, const st_tensor *s, int *bad)
{
    int64_t R = src->shape[0], C = src->shape[1], nbc = fp8_blocks(C);
    double worst = 0;
    for (int64_t br = 0; br < fp8_blocks(R); br++)
        for (int64_t bc = 0; bc < nbc; bc++) {
            float amax = 0;
            for (int64_t r = br * 128; r < R && r < br * 128 + 128; r++)
                for (int64_t c = bc * 128; c < C && c < bc * 128 + 128; c++)
                    amax = fmaxf(amax, fabsf(f32_at(src, r * C + c)));
            float sc, want = amax > 0 ? amax / 448.0f : 1.0f;
            memcpy(&sc, (const char *)s->data + 4 * (br * nbc + bc), 4);
            if (sc != want)
                *bad = 1;
            for (int64_t r = br * 128; r < R && r < br * 128 + 128; r++)
                for (int64_t c = bc * 128; c < C && c < bc * 128 + 128; c++) {
                    float w = f32_at(src, r * C + c);
                    uint8_t code = ((const uint8_t *)q->data)[r * C + c];
                    if (code != fp8_e4m3_from_f32(w / sc))
                        *bad = 1;
                    double err = fabs((double)fp8_e4m3_to_f32(code) * sc - w);
                    double bound = fmax(fabs(w) * 0x1p-4, sc * 0x1p-10) * (1 + 0x1p-20);
                    worst = fmax(worst, err / bound);
                }
        }
    return worst;
}

static void test_quant_dequant(void)
{
    dsv3_model m;
    dsv3_err e;
    REQUIRE(make_model(&m) == 0);
    char src[400], q[400], dq[400], q2[400];
    snprintf(src, sizeof src, "%s/src", tmpdir);
    snprintf(q, sizeof q, "%s/q", tmpdir);
    snprintf(dq, sizeof dq, "%s/dq", tmpdir);
    snprintf(q2, sizeof q2, "%s/q2", tmpdir);
    ckpt_opts co = {.dtype = test_rand() % 2 ? ST_BF16 : ST_F32,
                    .max_shard_bytes = 100000 + test_rand() % 100000};
    REQUIRE(ckpt_save(&m, src, &co, &e) == 0);
    quant_opts o = {.threads = 1 + (int)(test_rand() % 3)};
    quant_stats st;
    REQUIRE(quant_folder(src, q, &o, &st, &e) == 0);
    hfdir hs, hq;
    REQUIRE(hfdir_open(&hs, src, &e) == 0);
    REQUIRE(hfdir_open(&hq, q, &e) == 0);
    /* the same files, each with the input's tensors in order, a scale after each FP8 */
    REQUIRE(hq.n_files == hs.n_files && hq.indexed);
    int bad = 0, n8 = 0;
    double worst = 0;
    for (int f = 0; f < hs.n_files; f++) {
        CHECK(!strcmp(hs.file_names[f], hq.file_names[f]));
        int j = 0;
        for (int i = 0; i < hs.files[f].n && j < hq.files[f].n; i++) {
            const st_tensor *a = &hs.files[f].t[i], *b = &hq.files[f].t[j++];
            if (strcmp(a->name, b->name)) {
                bad = 1;
                break;
            }
            if (layout_is_fp8(a->name)) {
                const st_tensor *s = &hq.files[f].t[j++];
                char sn[200];
                snprintf(sn, sizeof sn, "%s_scale_inv", a->name);
                REQUIRE(b->dtype == ST_F8_E4M3 && !strcmp(s->name, sn) && s->dtype == ST_F32 &&
                        s->shape[0] == fp8_blocks(a->shape[0]) &&
                        s->shape[1] == fp8_blocks(a->shape[1]));
                worst = fmax(worst, check_fp8(a, b, s, &bad));
                n8++;
                continue;
            }
            int bias = strstr(a->name, "e_score_correction_bias") != NULL;
            CHECKF(b->dtype == (bias ? ST_F32 : ST_BF16), "%s", a->name);
            for (int64_t k = 0; k < a->numel; k++)
                bad |= bias ? f32_at(b, k) != f32_at(a, k)
                            : f32_at(b, k) != st_bf16_to_f32(st_f32_to_bf16(f32_at(a, k)));
        }
        CHECK(j == hq.files[f].n);
    }
    CHECKF(!bad && worst <= 1.0 && worst > 0.5, "worst error %.3f of the bound", worst);
    if (getenv("DSV3_TEST_VERBOSE"))
        fprintf(stderr, "    worst error %.4f of the bound\n", worst);
    CHECKF(n8 == st.n_quant && n8 > 20, "%d FP8 weights", n8);
    json_t *qc = json_object_get(hq.cfg.json, "quantization_config");
    char *qs = qc ? json_dumps(qc, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    CHECKF(qs && !strcmp(qs, "{\"activation_scheme\":\"dynamic\",\"fmt\":\"e4m3\","
                             "\"quant_method\":\"fp8\",\"weight_block_size\":[128,128]}"),
           "%s", qs ? qs : "(none)");
    free(qs);
    CHECK(convert_verify(q, NULL, 1, NULL, &e) == 0);
    /* dequant: bf16(f32(q) * s) */
    o.dequant = 1;
    REQUIRE(quant_folder(q, dq, &o, &st, &e) == 0);
    hfdir hd;
    REQUIRE(hfdir_open(&hd, dq, &e) == 0);
    CHECK(hd.n_ent == hs.n_ent && !json_object_get(hd.cfg.json, "quantization_config"));
    for (int i = 0; i < hq.n_ent && !bad; i++) {
        const st_tensor *t = hq.ent[i].t, *d = hfdir_find(&hd, t->name, NULL);
        if (strstr(t->name, "_scale_inv")) {
            bad |= d != NULL;
            continue;
        }
        if (!d) {
            bad = 1;
            break;
        }
        if (t->dtype != ST_F8_E4M3) {
            bad |= d->nbytes != t->nbytes || memcmp(d->data, t->data, t->nbytes);
            continue;
        }
        char sn[200];
        snprintf(sn, sizeof sn, "%s_scale_inv", t->name);
        const st_tensor *s = hfdir_find(&hq, sn, NULL);
        int64_t C = t->shape[1], nbc = fp8_blocks(C);
        for (int64_t k = 0; k < t->numel; k++) {
            float sc;
            memcpy(&sc, (const char *)s->data + 4 * ((k / C / 128) * nbc + k % C / 128), 4);
            uint16_t want = st_f32_to_bf16(fp8_e4m3_to_f32(((const uint8_t *)t->data)[k]) * sc),
                     got;
            memcpy(&got, (const char *)d->data + 2 * k, 2);
            bad |= got != want;
        }
        if (bad)
            fprintf(stderr, "    %s\n", t->name);
    }
    CHECK(!bad);
    /* FP8 in, FP8 out unchanged */
    o.dequant = 0;
    REQUIRE(quant_folder(q, q2, &o, &st, &e) == 0);
    hfdir h2;
    REQUIRE(hfdir_open(&h2, q2, &e) == 0);
    CHECK(h2.n_ent == hq.n_ent);
    for (int i = 0; i < hq.n_ent; i++) {
        const st_tensor *a = hq.ent[i].t, *b = hfdir_find(&h2, a->name, NULL);
        CHECKF(b && b->dtype == a->dtype && !memcmp(a->data, b->data, a->nbytes), "%s", a->name);
    }
    hfdir_close(&h2);
    hfdir_close(&hd);
    hfdir_close(&hs);
    hfdir_close(&hq);
    CHECK(leftovers() == 0);
    model_free(&m);
}

static void test_nonfinite(void)
{
    dsv3_model m;
    dsv3_err e;
    REQUIRE(make_model(&m) == 0);
    const char *targets[] = {"model.layers.2.mlp.experts.5.down_proj.weight",
                             "model.layers.0.post_attention_layernorm.weight",
                             "model.layers.3.self_attn.kv_b_proj.weight"};
    for (int k = 0; k < 3; k++) {
        const model_tensor *t = model_find(&m, targets[k]);
        REQUIRE(t);
        int64_t at = (int64_t)(test_rand() % (uint64_t)t->numel);
        float old = m.params[t->off + at];
        m.params[t->off + at] = k == 1 ? INFINITY : NAN;
        char src[400], out[400];
        snprintf(src, sizeof src, "%s/nan%d", tmpdir, k);
        snprintf(out, sizeof out, "%s/nanq%d", tmpdir, k);
        REQUIRE(ckpt_save(&m, src, NULL, &e) == 0);
        quant_opts o = {0};
        CHECKF(quant_folder(src, out, &o, NULL, &e) == -1 && strstr(e.msg, targets[k]) &&
               strstr(e.msg, k == 1 ? "infinity" : "NaN"), "%s", e.msg);
        CHECK(!exists(out));
        m.params[t->off + at] = old;
    }
    /* an existing output folder without force */
    char src[400], out[400];
    snprintf(src, sizeof src, "%s/ok", tmpdir);
    snprintf(out, sizeof out, "%s/exists", tmpdir);
    REQUIRE(ckpt_save(&m, src, NULL, &e) == 0);
    REQUIRE(mkdir(out, 0777) == 0);
    quant_opts o = {0};
    CHECKF(quant_folder(src, out, &o, NULL, &e) == -1 && strstr(e.msg, "exists"), "%s", e.msg);
    o.force = 1;
    CHECK(quant_folder(src, out, &o, NULL, &e) == 0);
    CHECK(leftovers() == 0);
    model_free(&m);
}

static void test_dequant_table(void)
{
    /* convert_dequant equals lib/fp8's dequantization bit for bit, every code, edge blocks */
    int64_t r = 1 + (int64_t)(test_rand() % 300), c = 1 + (int64_t)(test_rand() % 300);
    uint8_t *q = malloc((size_t)(r * c));
    float *s = malloc((size_t)(fp8_blocks(r) * fp8_blocks(c)) * 4);
    float *a = malloc((size_t)(r * c) * 4), *b = malloc((size_t)(r * c) * 4);
    for (int64_t i = 0; i < r * c; i++)
        q[i] = (uint8_t)(i < 256 ? (uint64_t)i : test_rand());
    for (int64_t i = 0; i < fp8_blocks(r) * fp8_blocks(c); i++)
        s[i] = ldexpf(1.0f + (float)(test_rand() % 1000) / 1000, (int)(test_rand() % 40) - 30);
    fp8_dequant_weight(q, s, r, c, a, 1);
    convert_dequant(q, s, r, c, b, 2);
    CHECKF(!memcmp(a, b, (size_t)(r * c) * 4), "[%lld, %lld]", (long long)r, (long long)c);
    free(q);
    free(s);
    free(a);
    free(b);
}

int main(void)
{
    test_seed();
    snprintf(tmpdir, sizeof tmpdir, "/tmp/dsv3-test-quant-%d", (int)getpid());
    mkdir(tmpdir, 0777);
    RUN(test_dequant_table);
    RUN(test_quant_dequant);
    RUN(test_nonfinite);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd)) {
    }
    TEST_EXIT();
}
