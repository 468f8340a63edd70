/* Tests of lib/ops: every backward against central finite differences of its forward, on
 * fresh random inputs. The probe is L = sum(r . out) for a random r, so d_out = r; each
 * input entry x gets (L(x+h) - L(x-h)) / 2h with h = 1e-2 and L summed in double. Pass:
 * |fd - analytic| <= 2e-2 |analytic| + 2e-3 (float32 forward; a wrong formula misses by
 * far more: the tests fail when a sign or a factor is changed). Also the router's choice
 * against a brute-force enumeration of the V3 rule. */
#include <math.h>

#include "../../lib/ops.h"
#include "../test.h"

static double urand(void)
{
    return (test_rand() >> 11) * 0x1p-53;
}

static void fill(float *x, int64_t n, double scale)
{
    for (int64_t i = 0; i < n; i++) {
        double u1 = urand() + 1e-12, u2 = urand();
        x[i] = (float)(scale * sqrt(-2 * log(u1)) * cos(2 * M_PI * u2));
    }
}

static double dot(const float *a, const float *b, int64_t n)
{
    double s = 0;
    for (int64_t i = 0; i < n; i++)
        s += (double)a[i] * b[i];
    return s;
}

typedef double (*probe_fn)(void *ctx);

/* Compares analytic gradient g of x against finite differences of probe, for up to `max`
 * entries chosen at random. Returns the number of mismatches. */
static int fd_check(const char *what, float *x, const float *g, int64_t n, probe_fn probe,
                    void *ctx, int max)
{
    int bad = 0;
    const float h = 1e-2f;
    for (int c = 0; c < max && c < n; c++) {
        int64_t i = n <= max ? c : (int64_t)(test_rand() % (uint64_t)n);
        float x0 = x[i];
        x[i] = x0 + h;
        double lp = probe(ctx);
        x[i] = x0 - h;
        double lm = probe(ctx);
        x[i] = x0;
        double fd = (lp - lm) / (2.0 * ((double)(x0 + h) - (double)x0));
        double an = g[i];
        if (fabs(fd - an) > 2e-2 * fabs(an) + 2e-3) {
            if (bad < 5)
                fprintf(stderr, "    %s[%lld]: analytic %.6g, finite difference %.6g\n", what,
                        (long long)i, an, fd);
            bad++;
        }
    }
    return bad;
}

/* ---- matmul ---- */
typedef struct {
    float *out, *in, *w, *r;
    int N, I, O;
} mm_ctx;

static double mm_probe(void *p)
{
    mm_ctx *c = p;
    matmul_forward(c->out, c->in, c->w, c->N, c->I, c->O);
    return dot(c->out, c->r, (int64_t)c->N * c->O);
}

static void test_matmul(void)
{
    mm_ctx c = {.N = 1 + (int)(test_rand() % 5), .I = 1 + (int)(test_rand() % 9),
                .O = 1 + (int)(test_rand() % 7)};
    c.out = malloc(sizeof(float) * c.N * c.O);
    c.in = malloc(sizeof(float) * c.N * c.I);
    c.w = malloc(sizeof(float) * c.O * c.I);
    c.r = malloc(sizeof(float) * c.N * c.O);
    float *din = calloc((size_t)c.N * c.I, 4), *dw = calloc((size_t)c.O * c.I, 4);
    fill(c.in, c.N * c.I, 1);
    fill(c.w, c.O * c.I, 1);
    fill(c.r, c.N * c.O, 1);
    matmul_backward(din, dw, c.r, c.in, c.w, c.N, c.I, c.O);
    CHECK(fd_check("d_in", c.in, din, c.N * c.I, mm_probe, &c, 50) == 0);
    CHECK(fd_check("d_w", c.w, dw, c.O * c.I, mm_probe, &c, 50) == 0);
    free(c.out), free(c.in), free(c.w), free(c.r), free(din), free(dw);
}

/* ---- rmsnorm ---- */
typedef struct {
    float *out, *rstd, *in, *w, *r;
    int N, D;
} rn_ctx;

static double rn_probe(void *p)
{
    rn_ctx *c = p;
    rmsnorm_forward(c->out, c->rstd, c->in, c->w, c->N, c->D, 1e-6f);
    return dot(c->out, c->r, (int64_t)c->N * c->D);
}

static void test_rmsnorm(void)
{
    rn_ctx c = {.N = 1 + (int)(test_rand() % 4), .D = 2 + (int)(test_rand() % 30)};
    int64_t n = (int64_t)c.N * c.D;
    c.out = malloc(4 * n), c.rstd = malloc(4 * c.N), c.in = malloc(4 * n);
    c.w = malloc(4 * c.D), c.r = malloc(4 * n);
    float *din = calloc(n, 4), *dw = calloc(c.D, 4);
    fill(c.in, n, 1);
    fill(c.w, c.D, 1);
    fill(c.r, n, 1);
    rn_probe(&c);
    rmsnorm_backward(din, dw, c.r, c.in, c.w, c.rstd, c.N, c.D);
    CHECK(fd_check("d_in", c.in, din, n, rn_probe, &c, 60) == 0);
    CHECK(fd_check("d_w", c.w, dw, c.D, rn_probe, &c, 60) == 0);
    free(c.out), free(c.rstd), free(c.in), free(c.w), free(c.r), free(din), free(dw);
}

/* ---- rope ---- */
typedef struct {
    float *x, *y, *cos_t, *sin_t, *r;
    int *pos;
    int count, stride, per_pos, half, inter;
} rp_ctx;

static double rp_probe(void *p)
{
    rp_ctx *c = p;
    memcpy(c->y, c->x, sizeof(float) * c->count * c->stride);
    rope_forward(c->y, c->count, c->stride, c->per_pos, c->pos, c->cos_t, c->sin_t, c->half,
                 c->inter);
    return dot(c->y, c->r, (int64_t)c->count * c->stride);
}

static void test_rope(void)
{
    for (int inter = 0; inter < 2; inter++) {
        rp_ctx c = {.half = 1 + (int)(test_rand() % 4), .per_pos = 1 + (int)(test_rand() % 3),
                    .inter = inter};
        int T = 2 + (int)(test_rand() % 6);
        c.count = T * c.per_pos;
        c.stride = 2 * c.half;
        int64_t n = (int64_t)c.count * c.stride;
        c.x = malloc(4 * n), c.y = malloc(4 * n), c.r = malloc(4 * n);
        c.cos_t = malloc(4 * T * c.half), c.sin_t = malloc(4 * T * c.half);
        c.pos = malloc(sizeof(int) * T);
        double f[8];
        for (int j = 0; j < c.half; j++)
            f[j] = pow(10000.0, -2.0 * j / (2 * c.half));
        rope_tables(c.cos_t, c.sin_t, f, T, c.half, 1.0 + urand());
        for (int t = 0; t < T; t++)
            c.pos[t] = t;
        fill(c.x, n, 1);
        fill(c.r, n, 1);
        float *g = malloc(4 * n);
        memcpy(g, c.r, 4 * n);
        rope_backward(g, c.count, c.stride, c.per_pos, c.pos, c.cos_t, c.sin_t, c.half, inter);
        CHECK(fd_check(inter ? "rope interleaved" : "rope half", c.x, g, n, rp_probe, &c, 60) ==
              0);
        /* A rotation keeps the norm (up to the attention factor, 1 here): */
        rope_tables(c.cos_t, c.sin_t, f, T, c.half, 1.0);
        rp_probe(&c);
        CHECK(fabs(dot(c.y, c.y, n) - dot(c.x, c.x, n)) < 1e-4 * dot(c.x, c.x, n));
        free(c.x), free(c.y), free(c.r), free(c.cos_t), free(c.sin_t), free(c.pos), free(g);
    }
}

/* ---- swiglu ---- */
typedef struct {
    float *h, *g, *u, *r;
    int n;
} sw_ctx;

static double sw_probe(void *p)
{
    sw_ctx *c = p;
    swiglu_forward(c->h, c->g, c->u, c->n);
    return dot(c->h, c->r, c->n);
}

static void test_swiglu(void)
{
    sw_ctx c = {.n = 1 + (int)(test_rand() % 40)};
    c.h = malloc(4 * c.n), c.g = malloc(4 * c.n), c.u = malloc(4 * c.n), c.r = malloc(4 * c.n);
    float *dg = calloc(c.n, 4), *du = calloc(c.n, 4);
    fill(c.g, c.n, 2);
    fill(c.u, c.n, 1);
    fill(c.r, c.n, 1);
    swiglu_backward(dg, du, c.r, c.g, c.u, c.n);
    CHECK(fd_check("d_g", c.g, dg, c.n, sw_probe, &c, 40) == 0);
    CHECK(fd_check("d_u", c.u, du, c.n, sw_probe, &c, 40) == 0);
    free(c.h), free(c.g), free(c.u), free(c.r), free(dg), free(du);
}

/* ---- attention ---- */
typedef struct {
    float *out, *att, *q, *k, *v, *r;
    const int32_t *seg;
    int B, T, nh, dk, dv;
    float scale;
} at_ctx;

static double at_probe(void *p)
{
    at_ctx *c = p;
    attention_forward_seg(c->out, c->att, c->q, c->k, c->v, c->seg, c->B, c->T, c->nh, c->dk,
                          c->dv, c->scale);
    return dot(c->out, c->r, (int64_t)c->B * c->T * c->nh * c->dv);
}

static void test_attention(void)
{
    at_ctx c = {.B = 1 + (int)(test_rand() % 2), .T = 1 + (int)(test_rand() % 6),
                .nh = 1 + (int)(test_rand() % 3), .dk = 1 + (int)(test_rand() % 6),
                .dv = 1 + (int)(test_rand() % 5)};
    c.scale = (float)(0.3 + urand());
    int64_t nq = (int64_t)c.B * c.T * c.nh * c.dk, nv = (int64_t)c.B * c.T * c.nh * c.dv;
    c.out = malloc(4 * nv), c.att = malloc(4 * c.B * c.nh * c.T * c.T);
    c.q = malloc(4 * nq), c.k = malloc(4 * nq), c.v = malloc(4 * nv), c.r = malloc(4 * nv);
    float *dq = calloc(nq, 4), *dk = calloc(nq, 4), *dv = calloc(nv, 4);
    fill(c.q, nq, 1), fill(c.k, nq, 1), fill(c.v, nv, 1), fill(c.r, nv, 1);
    at_probe(&c);
    /* Causality: the first token attends only to itself. */
    for (int b = 0; b < c.B; b++)
        for (int h = 0; h < c.nh; h++)
            CHECK(fabsf(c.att[(((int64_t)b * c.nh + h) * c.T) * c.T] - 1) < 1e-6);
    attention_backward(dq, dk, dv, c.r, c.att, c.q, c.k, c.v, c.B, c.T, c.nh, c.dk, c.dv,
                       c.scale);
    CHECK(fd_check("d_q", c.q, dq, nq, at_probe, &c, 60) == 0);
    CHECK(fd_check("d_k", c.k, dk, nq, at_probe, &c, 60) == 0);
    CHECK(fd_check("d_v", c.v, dv, nv, at_probe, &c, 60) == 0);
    free(c.out), free(c.att), free(c.q), free(c.k), free(c.v), free(c.r);
    free(dq), free(dk), free(dv);
}

/* Document masking: finite differences through the masked op, and each document of a
 * packed sequence gives bit for bit what it gives as a sequence of its own. */
static void test_attention_segments(void)
{
    at_ctx c = {.B = 1 + (int)(test_rand() % 2), .T = 2 + (int)(test_rand() % 8),
                .nh = 1 + (int)(test_rand() % 3), .dk = 1 + (int)(test_rand() % 6),
                .dv = 1 + (int)(test_rand() % 5)};
    c.scale = (float)(0.3 + urand());
    int B = c.B, T = c.T, nh = c.nh, dk = c.dk, dv = c.dv;
    int64_t nq = (int64_t)B * T * nh * dk, nv = (int64_t)B * T * nh * dv;
    int32_t *seg = malloc(4 * (size_t)B * T);
    for (int b = 0; b < B; b++) {
        int s = 0;
        for (int i = 0; i < T; i++) {
            if (i && test_rand() % 3 == 0)
                s++;
            seg[b * T + i] = s;
        }
    }
    c.seg = seg;
    c.out = malloc(4 * nv), c.att = malloc(4 * B * nh * T * T);
    c.q = malloc(4 * nq), c.k = malloc(4 * nq), c.v = malloc(4 * nv), c.r = malloc(4 * nv);
    float *dq = calloc(nq, 4), *dk_ = calloc(nq, 4), *dv_ = calloc(nv, 4);
    fill(c.q, nq, 1), fill(c.k, nq, 1), fill(c.v, nv, 1), fill(c.r, nv, 1);
    at_probe(&c);
    /* No probability crosses a document boundary. */
    for (int b = 0; b < B; b++)
        for (int h = 0; h < nh; h++)
            for (int i = 0; i < T; i++)
                for (int j = 0; j < T; j++)
                    if (j > i || seg[b * T + j] != seg[b * T + i])
                        CHECK(c.att[(((int64_t)b * nh + h) * T + i) * T + j] == 0);
    attention_backward_seg(dq, dk_, dv_, c.r, c.att, c.q, c.k, c.v, seg, B, T, nh, dk, dv,
                           c.scale);
    CHECK(fd_check("d_q", c.q, dq, nq, at_probe, &c, 60) == 0);
    CHECK(fd_check("d_k", c.k, dk_, nq, at_probe, &c, 60) == 0);
    CHECK(fd_check("d_v", c.v, dv_, nv, at_probe, &c, 60) == 0);
    /* Each document alone, as a sequence of B = 1: outputs and gradients identical (the
     * probes above left out and att at perturbed inputs: recompute). */
    at_probe(&c);
    for (int b = 0; b < B; b++)
        for (int a = 0; a < T;) {
            int e = a + 1;
            while (e < T && seg[b * T + e] == seg[b * T + a])
                e++;
            int n = e - a;
            int64_t o = (int64_t)b * T + a;
            float *out1 = malloc(4 * (size_t)n * nh * dv), *att1 = malloc(4 * (size_t)nh * n * n);
            float *gq = calloc((size_t)n * nh * dk, 4), *gk = calloc((size_t)n * nh * dk, 4);
            float *gv = calloc((size_t)n * nh * dv, 4);
            attention_forward(out1, att1, c.q + o * nh * dk, c.k + o * nh * dk,
                              c.v + o * nh * dv, 1, n, nh, dk, dv, c.scale);
            attention_backward(gq, gk, gv, c.r + o * nh * dv, att1, c.q + o * nh * dk,
                               c.k + o * nh * dk, c.v + o * nh * dv, 1, n, nh, dk, dv, c.scale);
            CHECK(memcmp(out1, c.out + o * nh * dv, 4 * (size_t)n * nh * dv) == 0);
            CHECK(memcmp(gq, dq + o * nh * dk, 4 * (size_t)n * nh * dk) == 0);
            CHECK(memcmp(gk, dk_ + o * nh * dk, 4 * (size_t)n * nh * dk) == 0);
            CHECK(memcmp(gv, dv_ + o * nh * dv, 4 * (size_t)n * nh * dv) == 0);
            free(out1), free(att1), free(gq), free(gk), free(gv);
            a = e;
        }
    free(c.out), free(c.att), free(c.q), free(c.k), free(c.v), free(c.r);
    free(dq), free(dk_), free(dv_), free(seg);
}

/* ---- router ---- */

/* The V3 rule by enumeration: among all group subsets of size topk_group, the one with the
 * best sum of group scores is kept (equivalent to taking the best groups one by one). */
static void router_brute(int *chosen, const float *logits, const float *bias, int E, int G,
                         int TG, int K)
{
    int per = E / G;
    float sc[64], gs[16];
    for (int e = 0; e < E; e++)
        sc[e] = 1 / (1 + expf(-logits[e])) + bias[e];
    for (int g = 0; g < G; g++) {
        float b1 = -INFINITY, b2 = -INFINITY;
        for (int e = g * per; e < (g + 1) * per; e++)
            if (sc[e] > b1)
                b2 = b1, b1 = sc[e];
            else if (sc[e] > b2)
                b2 = sc[e];
        gs[g] = b1 + b2;
    }
    int best_mask = 0;
    double best = -INFINITY;
    for (int mask = 0; mask < (1 << G); mask++) {
        if (__builtin_popcount(mask) != TG)
            continue;
        double s = 0;
        for (int g = 0; g < G; g++)
            if (mask >> g & 1)
                s += gs[g];
        if (s > best)
            best = s, best_mask = mask;
    }
    memset(chosen, 0, sizeof(int) * E);
    for (int k = 0; k < K; k++) {
        int b = -1;
        for (int e = 0; e < E; e++)
            if ((best_mask >> (e / per) & 1) && !chosen[e] && (b < 0 || sc[e] > sc[b]))
                b = e;
        chosen[b] = 1;
    }
}

typedef struct {
    float *logits, *bias, *s, *w, *r;
    int *idx;
    int E, G, TG, K, norm;
    float scale;
} ro_ctx;

/* Probe with the choice held (it is piecewise constant): recompute weights for idx. */
static double ro_probe(void *p)
{
    ro_ctx *c = p;
    double sum = 0, out = 0;
    for (int k = 0; k < c->K; k++)
        sum += 1 / (1 + exp(-(double)c->logits[c->idx[k]]));
    for (int k = 0; k < c->K; k++) {
        double s = 1 / (1 + exp(-(double)c->logits[c->idx[k]]));
        out += c->r[k] * (c->norm ? s / sum : s) * c->scale;
    }
    return out;
}

static void test_router(void)
{
    for (int trial = 0; trial < 50; trial++) {
        ro_ctx c;
        int Gs[] = {1, 2, 4, 8};
        c.G = Gs[test_rand() % 4];
        int per = 2 + (int)(test_rand() % 4);
        c.E = c.G * per;
        c.TG = 1 + (int)(test_rand() % c.G);
        c.K = 1 + (int)(test_rand() % (c.TG * per));
        c.norm = (int)(test_rand() & 1);
        c.scale = (float)(0.5 + 2 * urand());
        c.logits = malloc(4 * c.E), c.bias = malloc(4 * c.E), c.s = malloc(4 * c.E);
        c.w = malloc(4 * c.K), c.r = malloc(4 * c.K), c.idx = malloc(sizeof(int) * c.K);
        fill(c.logits, c.E, 2);
        fill(c.bias, c.E, 0.3);
        fill(c.r, c.K, 1);
        router_forward(c.idx, c.w, c.s, c.logits, c.bias, c.E, c.G, c.TG, c.K, c.norm, c.scale);
        int want[64], got[64] = {0};
        router_brute(want, c.logits, c.bias, c.E, c.G, c.TG, c.K);
        for (int k = 0; k < c.K; k++)
            got[c.idx[k]] = 1;
        CHECK(memcmp(want, got, sizeof(int) * c.E) == 0);
        double wsum = 0;
        for (int k = 0; k < c.K; k++)
            wsum += c.w[k];
        if (c.norm)
            CHECKF(fabs(wsum - c.scale) < 1e-5 * c.scale, "weights sum %g, scale %g", wsum,
                   c.scale);
        float *dl = calloc(c.E, 4);
        router_backward(dl, c.r, c.idx, c.s, c.E, c.K, c.norm, c.scale);
        CHECK(fd_check("d_logits", c.logits, dl, c.E, ro_probe, &c, 64) == 0);
        free(c.logits), free(c.bias), free(c.s), free(c.w), free(c.r), free(c.idx), free(dl);
    }
}

/* ---- cross-entropy ---- */
typedef struct {
    float *logits;
    int32_t *tg;
    int N, V;
} ce_ctx;

static double ce_probe(void *p)
{
    ce_ctx *c = p;
    double sum;
    int count;
    crossentropy_forward(&sum, &count, NULL, c->logits, c->tg, c->N, c->V);
    return count ? sum / count : 0;
}

static void test_crossentropy(void)
{
    ce_ctx c = {.N = 2 + (int)(test_rand() % 5), .V = 2 + (int)(test_rand() % 20)};
    c.logits = malloc(4 * c.N * c.V);
    c.tg = malloc(4 * c.N);
    fill(c.logits, c.N * c.V, 2);
    int count = 0;
    for (int n = 0; n < c.N; n++) {
        c.tg[n] = n == 0 ? -100 : (int32_t)(test_rand() % c.V);
        count += c.tg[n] >= 0;
    }
    float *d = malloc(4 * c.N * c.V);
    crossentropy_backward(d, c.logits, c.tg, c.N, c.V, 1.0f / count);
    for (int v = 0; v < c.V; v++)
        CHECK(d[v] == 0);  /* the ignored row */
    CHECK(fd_check("d_logits", c.logits, d, c.N * c.V, ce_probe, &c, 80) == 0);
    /* Uniform logits: the loss is log V. */
    for (int i = 0; i < c.N * c.V; i++)
        c.logits[i] = 0.5f;
    CHECK(fabs(ce_probe(&c) - log(c.V)) < 1e-6);
    free(c.logits), free(c.tg), free(d);
}

int main(void)
{
    test_seed();
    RUN(test_matmul);
    RUN(test_rmsnorm);
    RUN(test_rope);
    RUN(test_swiglu);
    RUN(test_attention);
    RUN(test_attention_segments);
    RUN(test_router);
    RUN(test_crossentropy);
    TEST_EXIT();
}
