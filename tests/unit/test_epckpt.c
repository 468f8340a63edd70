/* Tests of lib/epckpt's optimizer reassembly: a model's moments (random bits, every
 * trainable tensor) written in the files of every checkpoint layout dsv3-train writes (one
 * process, data-parallel shards, --ep N with one replica, with replica pieces, and the
 * whole-group files of before the pieces) read back into every layout a job may have (one
 * process, data-parallel shards, --ep N shards and pieces, the GPU path's whole parts), bit
 * for bit against the moments by tensor name; and the refusals: a missing piece names its
 * file, a shard of another layout is refused, an --ep that does not split the experts. */
#include <sys/stat.h>
#include <unistd.h>

#include "../../lib/dp.h"
#include "../../lib/ep.h"
#include "../../lib/epckpt.h"
#include "../../lib/optim.h"
#include "../../lib/trainckpt.h"
#include "../test.h"

static char tmpdir[256];

/* Two MoE layers after a dense one and an MTP module (a third MoE block): 8 experts. */
static void small_config(dsv3_config *c)
{
    memset(c, 0, sizeof *c);
    c->vocab_size = 17;
    c->hidden_size = 8;
    c->intermediate_size = 12;
    c->moe_intermediate_size = 6;
    c->num_hidden_layers = 3;
    c->first_k_dense_replace = 1;
    c->num_attention_heads = 2;
    c->q_lora_rank = 6;
    c->kv_lora_rank = 6;
    c->qk_nope_head_dim = 4;
    c->qk_rope_head_dim = 4;
    c->v_head_dim = 4;
    c->n_shared_experts = 1;
    c->n_routed_experts = 8;
    c->n_group = 2;
    c->topk_group = 1;
    c->num_experts_per_tok = 2;
    c->routed_scaling_factor = 2.5;
    c->norm_topk_prob = 1;
    c->rms_norm_eps = 1e-6;
    c->max_position_embeddings = 64;
    c->initializer_range = 0.02;
    c->rope_theta = 10000;
    c->rope_interleave = 1;
    c->num_nextn_predict_layers = 1;
    c->bos_token_id = c->eos_token_id = -1;
}

static dsv3_config cfg;
static dsv3_model full;   /* the whole model: the reference moments' layout */
static optim ref;         /* random bits on trainable tensors, step 7 */

static int model_for(dsv3_model *m, int N, int g)
{
    dsv3_err e;
    return model_init_ep(m, &cfg, N, g, &e);
}

/* o (a range of m's layout) filled from ref by tensor name. */
static void fill_from_ref(optim *o, const dsv3_model *m)
{
    for (int i = 0; i < m->n_t; i++) {
        const model_tensor *t = &m->t[i];
        const model_tensor *f = model_find(&full, t->name);
        for (int64_t j = 0; j < t->numel; j++) {
            size_t at = t->off + (size_t)j;
            if (at < o->lo || at >= o->lo + o->n)
                continue;
            o->m[at - o->lo] = ref.m[f->off + (size_t)j];
            o->v[at - o->lo] = ref.v[f->off + (size_t)j];
        }
    }
    o->t = ref.t;
}

static int save_range(const dsv3_model *m, size_t lo, size_t hi, int rank, int world,
                      const char *dir, const char *name)
{
    optim o;
    optim_params op;
    optim_params_default(&op);
    dsv3_err e;
    char path[700];
    if (optim_init_range(&o, m, &op, lo, hi, &e))
        return -1;
    fill_from_ref(&o, m);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int rc = optim_save_shard(&o, m, rank, world, path, &e);
    optim_free(&o);
    return rc;
}

/* The optimizer files of a job of W ranks with --ep N, as dsv3-train writes them (whole:
 * the expert moments as one file a group even with replicas, as before the pieces). */
static int write_layout(const char *dir, int W, int N, int whole)
{
    char name[96], path[700];
    dsv3_err e;
    mkdir(dir, 0777);
    if (W == 1) {
        snprintf(path, sizeof path, "%s/optim.safetensors", dir);
        return optim_save(&ref, &full, path, &e);
    }
    int D = W / N, rc = 0;
    for (int r = 0; r < W && !rc; r++) {
        dsv3_model m;
        if (model_for(&m, N, r % N))
            return -1;
        size_t lo, hi;
        dp_shard_range(m.n_dense, W, r, &lo, &hi);
        trainckpt_shard_name(name, sizeof name, r, W);
        rc = save_range(&m, lo, hi, r, W, dir, name);
        if (!rc && N > 1 && r / N < (whole ? 1 : D)) {
            int me = r / N, g = r % N;
            ep q = {.replicas = whole ? 1 : D};
            ep_piece(&q, m.n_params - m.n_dense, me, &lo, &hi);
            epckpt_optim_piece_name(name, sizeof name, g, N, me, whole ? 1 : D);
            rc = save_range(&m, m.n_dense + lo, m.n_dense + hi, whole || D == 1 ? g : g * D + me,
                            whole || D == 1 ? N : N * D, dir, name);
        }
        model_free(&m);
    }
    return rc;
}

/* o's moments (range of m's layout) equal ref's by name; other elements zero. */
static int same_as_ref(const optim *o, const dsv3_model *m)
{
    size_t seen = 0;
    for (int i = 0; i < m->n_t; i++) {
        const model_tensor *t = &m->t[i];
        const model_tensor *f = model_find(&full, t->name);
        for (int64_t j = 0; j < t->numel; j++) {
            size_t at = t->off + (size_t)j;
            if (at < o->lo || at >= o->lo + o->n)
                continue;
            uint16_t wm = t->trainable ? ref.m[f->off + (size_t)j] : 0;
            uint16_t wv = t->trainable ? ref.v[f->off + (size_t)j] : 0;
            if (o->m[at - o->lo] != wm || o->v[at - o->lo] != wv) {
                fprintf(stderr, "    %s[%lld] differs\n", t->name, (long long)j);
                return 0;
            }
            seen++;
        }
    }
    return seen == o->n && o->t == ref.t;
}

/* Every rank of a job of W ranks with --ep N (gpu: the whole replicated part and the whole
 * held experts a rank, as on device buffers) reads checkpoint dir of Wo ranks, --ep No. */
static void read_all(const char *dir, int Wo, int No, int W, int N, int gpu)
{
    optim_params op;
    optim_params_default(&op);
    int D = W / N;
    for (int r = 0; r < W; r++) {
        dsv3_model m;
        dsv3_err e;
        REQUIRE(model_for(&m, N, N > 1 ? r % N : 0) == 0);
        size_t lo, hi;
        if (gpu) {
            lo = 0;
            hi = m.n_dense;
        } else {
            dp_shard_range(m.n_dense, W, r, &lo, &hi);
        }
        optim o;
        REQUIRE(optim_init_range(&o, &m, &op, lo, hi, &e) == 0);
        CHECKF(epckpt_load_optim(dir, (uint32_t)Wo, (uint32_t)No, &o, &m, &e) == 0,
               "%d/%d -> %d/%d rank %d: %s", Wo, No, W, N, r, e.msg);
        CHECKF(same_as_ref(&o, &m), "%d ranks --ep %d -> rank %d of %d --ep %d%s: moments differ",
               Wo, No, r, W, N, gpu ? " (whole parts)" : "");
        optim_free(&o);
        if (N > 1) {
            ep q = {.replicas = D};
            ep_piece(&q, m.n_params - m.n_dense, r / N, &lo, &hi);
            if (gpu) {
                lo = 0;
                hi = m.n_params - m.n_dense;
            }
            REQUIRE(optim_init_range(&o, &m, &op, m.n_dense + lo, m.n_dense + hi, &e) == 0);
            CHECKF(epckpt_load_optim(dir, (uint32_t)Wo, (uint32_t)No, &o, &m, &e) == 0,
                   "%d/%d -> %d/%d rank %d experts: %s", Wo, No, W, N, r, e.msg);
            CHECKF(same_as_ref(&o, &m), "%d ranks --ep %d -> rank %d of %d --ep %d experts: "
                   "moments differ", Wo, No, r, W, N);
            optim_free(&o);
        }
        model_free(&m);
    }
}

static const int layouts[][3] = {  /* world, --ep, whole-group expert files */
    {1, 1, 0}, {3, 1, 0}, {2, 2, 0}, {4, 2, 0}, {4, 2, 1}, {4, 4, 0}, {8, 4, 0}, {8, 8, 0},
};
#define N_LAYOUTS (int)(sizeof layouts / sizeof *layouts)

static void test_every_layout_to_every_layout(void)
{
    char dir[600];
    for (int a = 0; a < N_LAYOUTS; a++) {
        snprintf(dir, sizeof dir, "%s/from-%d-%d-%d", tmpdir, layouts[a][0], layouts[a][1],
                 layouts[a][2]);
        REQUIRE(write_layout(dir, layouts[a][0], layouts[a][1], layouts[a][2]) == 0);
        for (int b = 0; b < N_LAYOUTS; b++) {
            if (layouts[b][2])
                continue;
            read_all(dir, layouts[a][0], layouts[a][1], layouts[b][0], layouts[b][1], 0);
            if (layouts[b][1] > 1)
                read_all(dir, layouts[a][0], layouts[a][1], layouts[b][0], layouts[b][1], 1);
        }
    }
}

static void test_refusals(void)
{
    char dir[600], path[700], name[96];
    snprintf(dir, sizeof dir, "%s/bad", tmpdir);
    REQUIRE(write_layout(dir, 4, 2, 0) == 0);
    dsv3_model m;
    optim o;
    optim_params op;
    optim_params_default(&op);
    dsv3_err e;
    REQUIRE(model_init(&m, &cfg, &e) == 0);
    REQUIRE(optim_init(&o, &m, &op, &e) == 0);
    /* a missing piece: named */
    epckpt_optim_piece_name(name, sizeof name, 1, 2, 1, 2);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    char keep[720];
    snprintf(keep, sizeof keep, "%s.keep", path);
    REQUIRE(rename(path, keep) == 0);
    CHECK(epckpt_load_optim(dir, 4, 2, &o, &m, &e) == -1);
    CHECKF(strstr(e.msg, "optim-experts-00001-of-00002-part00001-of-00002"), "%s", e.msg);
    /* another piece in its place: its header says so */
    char other[700];
    epckpt_optim_piece_name(name, sizeof name, 1, 2, 0, 2);
    snprintf(other, sizeof other, "%s/%s", dir, name);
    REQUIRE(link(other, path) == 0);
    CHECK(epckpt_load_optim(dir, 4, 2, &o, &m, &e) == -1);
    CHECKF(strstr(e.msg, "shard 2 of 4") && strstr(e.msg, "expected shard 3 of 4"), "%s", e.msg);
    /* a state claiming another layout than the files */
    CHECK(epckpt_load_optim(dir, 4, 4, &o, &m, &e) == -1);
    CHECK(epckpt_load_optim(dir, 4, 3, &o, &m, &e) == -1);
    CHECKF(strstr(e.msg, "does not split"), "%s", e.msg);
    optim_free(&o);
    model_free(&m);
}

int main(void)
{
    test_seed();
    snprintf(tmpdir, sizeof tmpdir, "/tmp/dsv3-test-epckpt-%d", (int)getpid());
    mkdir(tmpdir, 0777);
    small_config(&cfg);
    dsv3_err e;
    optim_params op;
    optim_params_default(&op);
    if (model_init(&full, &cfg, &e) || optim_init(&ref, &full, &op, &e)) {
        fprintf(stderr, "setup: %s\n", e.msg);
        return 1;
    }
    for (int i = 0; i < full.n_t; i++)
        if (full.t[i].trainable)
            for (int64_t j = 0; j < full.t[i].numel; j++) {
                ref.m[full.t[i].off + (size_t)j] = (uint16_t)(test_rand() | 1);
                ref.v[full.t[i].off + (size_t)j] = (uint16_t)(test_rand() | 1);
            }
    ref.t = 7;
    RUN(test_every_layout_to_every_layout);
    RUN(test_refusals);
    optim_free(&ref);
    model_free(&full);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd)) {
    }
    TEST_EXIT();
}
