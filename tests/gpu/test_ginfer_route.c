/* GPU test of the decode engine's fused router (kernels/ginfer_k.cu gk_route through
 * ginfer_route_run): the one-cluster kernel of batch-1 decode (route1_k: the router rows in
 * registers, the top-k by ranks, route_row32) against route_k's grid and last block (route_row's
 * rounds of argmax) on fresh random inputs, every output compared bitwise (logits, scores,
 * weights, chosen experts, bucket offsets, order and positions), over shapes of the configs
 * (E 32 in 4 groups of which 2 kept, 20 in 4, 16 in 4; DeepSeek-V2-Lite's 64 in one group over
 * 2048 values, which takes the wide cluster of 8 blocks and two experts a lane) and edge ones (one group, a group per
 * expert, K as large as the kept groups allow, H not a multiple of 256), with and without a
 * bias, a shared expert and normalised weights, and inputs made of ties: router rows repeated
 * (equal logits), biases repeated, x zero (every logit 0). Against an outside reference: the
 * CPU router (lib/ops router_forward_limited) on the GPU's logits chooses the same experts in
 * the same order, with the same weights within 1e-6; the bucketing is a permutation that
 * puts each expert's rows at its offset. And the same kernel with the post-attention add_norm
 * inside ("post" fusion, route1_k<true>) against add_norm_k and the router after it: the new
 * x, the normed row and every router output bitwise the same (H from 8 to 1024). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/ginfer.h"
#include "../../lib/ops.h"
#include "gpu_test.h"

typedef struct {
    int E, G, TG, K, H;
} shape;

/* The last seven take the wide one-cluster forms (more than 32 experts, two a lane, in 8
 * blocks; or rows of more than 1024 values, 8 pieces a lane): DeepSeek-V2-Lite's router
 * first (64 experts in one group, 6 a token, 2048 values). */
static const shape shapes[] = {{32, 4, 2, 4, 1024}, {20, 4, 2, 4, 512},  {16, 4, 2, 3, 64},
                               {32, 1, 1, 8, 1024}, {32, 32, 8, 4, 256}, {8, 4, 2, 4, 64},
                               {32, 8, 3, 12, 1000}, {24, 3, 2, 16, 512}, {1, 1, 1, 1, 8},
                               {64, 1, 1, 6, 2048}, {64, 8, 3, 6, 1536}, {48, 4, 2, 8, 1200},
                               {64, 32, 4, 8, 2048}, {40, 1, 1, 4, 512}, {64, 4, 4, 12, 1024},
                               {32, 4, 2, 4, 2040}};
enum { NSHAPE = sizeof shapes / sizeof *shapes, MODES = 4 };

typedef struct {
    float *logits, *rs, *rw;
    int32_t *idx;
    int *off, *order, *spos;
} outs;

static void outs_alloc(outs *o, const shape *s, int ns)
{
    o->logits = malloc(s->E * sizeof(float));
    o->rs = malloc(s->E * sizeof(float));
    o->rw = malloc(s->K * sizeof(float));
    o->idx = malloc(s->K * sizeof(int32_t));
    o->off = malloc((2 * s->E + 4) * sizeof(int));
    o->order = malloc((s->K + ns) * sizeof(int));
    o->spos = malloc(s->K * sizeof(int));
}

static void outs_free(outs *o)
{
    free(o->logits), free(o->rs), free(o->rw), free(o->idx), free(o->off), free(o->order);
    free(o->spos);
}

static int outs_equal(const outs *a, const outs *b, const shape *s, int ns)
{
    return !memcmp(a->logits, b->logits, s->E * 4) && !memcmp(a->rs, b->rs, s->E * 4) &&
           !memcmp(a->rw, b->rw, s->K * 4) && !memcmp(a->idx, b->idx, s->K * 4) &&
           !memcmp(a->off, b->off, (2 * s->E + 4) * 4) &&
           !memcmp(a->order, b->order, (s->K + ns) * 4) && !memcmp(a->spos, b->spos, s->K * 4);
}

/* Inputs of a mode: 0 random; 1 router rows and biases repeated in pairs (ties in every
 * choice); 2 x zero (every logit 0, the choices decided by the biases' ties and indices);
 * 3 biases from four values. */
static void draw(int mode, const shape *s, float *x, float *w, float *b)
{
    for (int i = 0; i < s->H; i++)
        x[i] = mode == 2 ? 0.0f : gt_uniform(1.0f);
    for (int r = 0; r < s->E; r++)
        for (int i = 0; i < s->H; i++)
            w[(size_t)r * s->H + i] = mode == 1 && (r & 1) ? w[(size_t)(r - 1) * s->H + i]
                                                           : gt_uniform(0.05f);
    for (int r = 0; r < s->E; r++)
        b[r] = mode == 1 && (r & 1) ? b[r - 1]
               : mode == 3          ? 0.01f * (float)(test_rand() % 4)
                                    : gt_uniform(0.02f);
}

/* The bucketing of one row's K choices (ns shared rows after): order is a permutation of the
 * choices, grouped by expert at the offsets, spos its inverse. */
static int bucket_ok(const outs *o, const shape *s, int ns)
{
    for (int a = 0; a < s->K; a++) {
        int p = o->spos[a];
        if (p < 0 || p >= s->K || o->order[p] != a)
            return 0;
        int x = o->idx[a];
        if (p < o->off[x] || p >= o->off[x + 1])
            return 0;
    }
    return o->off[s->E] == s->K && (!ns || (o->off[s->E + 1] == s->K + ns && o->order[s->K] == 0));
}

static void test_one_block_equals_grid(void)
{
    GT_NEED_GPU();
    int cases = 0, equal = 0, cpu_same = 0, buckets = 0;
    double wmax = 0;
    for (int si = 0; si < NSHAPE; si++)
        for (int mode = 0; mode < MODES; mode++)
            for (int v = 0; v < 4; v++) {
                const shape *s = &shapes[si];
                int ns = v & 1, norm = (v >> 1) & 1, hasb = mode != 0 || v != 0;
                float scale = 1.0f + (float)(test_rand() % 5) * 0.5f;
                float *x = malloc(s->H * sizeof(float));
                float *w = malloc((size_t)s->E * s->H * sizeof(float));
                float *b = malloc(s->E * sizeof(float));
                draw(mode, s, x, w, b);
                outs o1, o0;
                outs_alloc(&o1, s, ns);
                outs_alloc(&o0, s, ns);
                dsv3_err e;
                int rc = ginfer_route_run(x, w, hasb ? b : NULL, 1, s->H, s->E, s->G, s->TG,
                                          s->K, norm, scale, ns, 1, o1.logits, o1.rs, o1.rw,
                                          o1.idx, o1.off, o1.order, o1.spos, &e) ||
                         ginfer_route_run(x, w, hasb ? b : NULL, 1, s->H, s->E, s->G, s->TG,
                                          s->K, norm, scale, ns, 0, o0.logits, o0.rs, o0.rw,
                                          o0.idx, o0.off, o0.order, o0.spos, &e);
                CHECKF(!rc, "%s", rc ? e.msg : "");
                if (!rc) {
                    cases++;
                    int eq = outs_equal(&o1, &o0, s, ns);
                    equal += eq;
                    CHECKF(eq, "E %d G %d TG %d K %d H %d mode %d ns %d norm %d: the one-cluster "
                           "router differs from the grid's", s->E, s->G, s->TG, s->K, s->H,
                           mode, ns, norm);
                    int ci[64];
                    float cw[64], cs[64];
                    router_forward_limited(ci, cw, cs, o1.logits, hasb ? b : NULL, s->E, s->G,
                                           s->TG, 2, s->K, norm, scale);
                    int same = !memcmp(ci, o1.idx, s->K * sizeof(int));
                    for (int k = 0; k < s->K; k++) {
                        double d = fabs(cw[k] - o1.rw[k]) / (fabs(cw[k]) + 1e-30);
                        wmax = d > wmax ? d : wmax;
                    }
                    cpu_same += same;
                    CHECKF(same, "E %d G %d TG %d K %d mode %d: experts differ from the CPU "
                           "router's", s->E, s->G, s->TG, s->K, mode);
                    int bk = bucket_ok(&o1, s, ns);
                    buckets += bk;
                    CHECKF(bk, "E %d K %d ns %d: the bucketing is not a grouping by expert", s->E,
                           s->K, ns);
                }
                outs_free(&o1);
                outs_free(&o0);
                free(x), free(w), free(b);
            }
    CHECKF(wmax <= 1e-6, "weights %.3g from the CPU router's", wmax);
    printf("# stat route1: %d of %d cases bitwise the grid's; CPU router: %d same experts, "
           "weights within %.2g; buckets %d\n", equal, cases, cpu_same, wmax, buckets);
}

/* The post-attention add_norm fused into the one-row router (route1_k<true>, the "post"
 * fusion at batch 1) against the add_norm launch and the router after it, on the same
 * shapes and inputs: the new x, xn and every router output bitwise the same. */
static void test_norm_fused_equals_two_launches(void)
{
    GT_NEED_GPU();
    int cases = 0, equal = 0;
    for (int si = 0; si < NSHAPE; si++)
        for (int mode = 0; mode < MODES; mode++)
            for (int v = 0; v < 4; v++) {
                const shape *s = &shapes[si];
                if (s->E > 32 || s->H > 1024)  /* the norm's form takes the narrow shapes */
                    continue;
                int ns = v & 1, norm = (v >> 1) & 1, hasb = mode != 0 || v != 0;
                float scale = 1.0f + (float)(test_rand() % 5) * 0.5f;
                float *x = malloc(s->H * sizeof(float)), *d = malloc(s->H * sizeof(float));
                float *nw = malloc(s->H * sizeof(float));
                float *w = malloc((size_t)s->E * s->H * sizeof(float));
                float *b = malloc(s->E * sizeof(float));
                float *xo[2], *xn[2];
                draw(mode, s, x, w, b);
                for (int i = 0; i < s->H; i++) {
                    x[i] = gt_uniform(4.0f);
                    d[i] = mode == 2 ? -x[i] : gt_uniform(1.0f);  /* mode 2: x + d = 0 */
                    nw[i] = 1.0f + gt_uniform(0.5f);
                }
                outs o[2];
                int rc = 0;
                dsv3_err e;
                for (int f = 0; f < 2; f++) {
                    outs_alloc(&o[f], s, ns);
                    xo[f] = malloc(s->H * sizeof(float));
                    xn[f] = malloc(s->H * sizeof(float));
                    rc = rc || ginfer_route1_norm_run(x, d, nw, 1e-6f, w, hasb ? b : NULL, s->H,
                                                      s->E, s->G, s->TG, s->K, norm, scale, ns,
                                                      f, xo[f], xn[f], o[f].logits, o[f].rs,
                                                      o[f].rw, o[f].idx, o[f].off, o[f].order,
                                                      o[f].spos, &e);
                }
                CHECKF(!rc, "%s", rc ? e.msg : "");
                if (!rc) {
                    cases++;
                    int eq = !memcmp(xo[0], xo[1], s->H * 4) && !memcmp(xn[0], xn[1], s->H * 4) &&
                             outs_equal(&o[0], &o[1], s, ns);
                    equal += eq;
                    CHECKF(eq, "E %d G %d K %d H %d mode %d ns %d norm %d: the router with the "
                           "norm differs from add_norm and the router", s->E, s->G, s->K, s->H,
                           mode, ns, norm);
                }
                for (int f = 0; f < 2; f++) {
                    outs_free(&o[f]);
                    free(xo[f]), free(xn[f]);
                }
                free(x), free(d), free(nw), free(w), free(b);
            }
    printf("# stat route1 norm: %d of %d cases bitwise add_norm and the router\n", equal, cases);
}

int main(void)
{
    test_seed();
    RUN(test_one_block_equals_grid);
    RUN(test_norm_fused_equals_two_launches);
    TEST_EXIT();
}
