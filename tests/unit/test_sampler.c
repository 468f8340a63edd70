/* Tests of lib/sampler: each transform against distributions worked by hand, the draw's
 * frequencies against the softmax, greedy against argmax, the seed reproducing draws, and the
 * draw from only the largest logits (sampler_sample_top) equal to the full one's. */
#include <math.h>

#include "../../lib/sampler.h"
#include "../test.h"

static sampler_cand buf[16];

static sampler_cands cands(const float *logits, int n)
{
    for (int i = 0; i < n; i++)
        buf[i] = (sampler_cand){i, logits[i], 0};
    return (sampler_cands){buf, n, 0};
}

static int has(const sampler_cands *c, int32_t id)
{
    for (int i = 0; i < c->n; i++)
        if (c->v[i].id == id)
            return 1;
    return 0;
}

/* softmax(1, 2, 3) = (0.0900306, 0.2447285, 0.6652410), sorted descending. */
static void test_softmax(void)
{
    float l[] = {1, 2, 3};
    sampler_cands c = cands(l, 3);
    sampler_softmax(&c);
    CHECK(c.n == 3 && c.v[0].id == 2 && c.v[1].id == 1 && c.v[2].id == 0);
    CHECK(fabs(c.v[0].p - 0.6652410) < 1e-6);
    CHECK(fabs(c.v[1].p - 0.2447285) < 1e-6);
    CHECK(fabs(c.v[2].p - 0.0900306) < 1e-6);
}

static void test_top_k(void)
{
    float l[] = {1, 2, 3, 0, 2};
    sampler_cands c = cands(l, 5);
    sampler_top_k(&c, 2);  /* 3, then the tie at 2 goes to the lower id */
    CHECK(c.n == 2 && c.v[0].id == 2 && c.v[1].id == 1);
    c = cands(l, 5);
    sampler_top_k(&c, 0);
    CHECK(c.n == 5);
}

/* top-k of random logits with many ties equals the first k of a full sort. */
static void test_top_k_random(void)
{
    enum { V = 16 };
    for (int rep = 0; rep < 200; rep++) {
        float l[V];
        for (int i = 0; i < V; i++)
            l[i] = (float)(test_rand() % 5);
        int k = 1 + (int)(test_rand() % (V - 1));
        sampler_cands c = cands(l, V);
        sampler_top_k(&c, k);
        sampler_cand got[V];
        memcpy(got, c.v, sizeof(sampler_cand) * (size_t)k);
        c = cands(l, V);
        sampler_softmax(&c);  /* sorts all */
        for (int i = 0; i < k; i++)
            CHECKF(got[i].id == c.v[i].id, "rep %d k %d at %d: %d vs %d", rep, k, i, got[i].id,
                   c.v[i].id);
    }
}

/* Cumulative 0.665, 0.910, 1: p 0.6 keeps one, 0.7 two, 0.92 three. */
static void test_top_p(void)
{
    float l[] = {1, 2, 3};
    sampler_cands c = cands(l, 3);
    sampler_top_p(&c, 0.6);
    CHECK(c.n == 1 && c.v[0].id == 2);
    c = cands(l, 3);
    sampler_top_p(&c, 0.7);
    CHECK(c.n == 2 && has(&c, 1) && !has(&c, 0));
    c = cands(l, 3);
    sampler_top_p(&c, 0.92);
    CHECK(c.n == 3);
    c = cands(l, 3);
    sampler_top_p(&c, 1.0);
    CHECK(c.n == 3);
}

/* p / p_max = e^(x - 3) = 1, 0.368, 0.135: min_p 0.3 keeps two, 0.1 three, 0.5 one. */
static void test_min_p(void)
{
    float l[] = {1, 2, 3};
    sampler_cands c = cands(l, 3);
    sampler_min_p(&c, 0.3);
    CHECK(c.n == 2 && has(&c, 2) && has(&c, 1));
    c = cands(l, 3);
    sampler_min_p(&c, 0.1);
    CHECK(c.n == 3);
    c = cands(l, 3);
    sampler_min_p(&c, 0.5);
    CHECK(c.n == 1 && c.v[0].id == 2);
}

/* Temperature 2: softmax(0.5, 1, 1.5) = (0.186324, 0.307196, 0.506480). */
static void test_temp(void)
{
    float l[] = {1, 2, 3};
    sampler_cands c = cands(l, 3);
    sampler_temp(&c, 2);
    sampler_softmax(&c);
    CHECK(fabs(c.v[0].p - 0.506480) < 1e-6);
    CHECK(fabs(c.v[1].p - 0.307196) < 1e-6);
    CHECK(fabs(c.v[2].p - 0.186324) < 1e-6);
}

/* llama.cpp's rule: positive logits divided, others multiplied, each seen token once. */
static void test_penalty(void)
{
    float l[] = {2, -1, 3, 0.5f};
    int32_t hist[] = {0, 1, 0, 3};
    sampler_cands c = cands(l, 4);
    sampler_penalty(&c, hist, 4, 64, 2);
    CHECK(c.v[0].logit == 1 && c.v[1].logit == -2 && c.v[2].logit == 3 &&
          c.v[3].logit == 0.25f);
    c = cands(l, 4);
    sampler_penalty(&c, hist, 4, 2, 2);  /* window: 0, 3 */
    CHECK(c.v[0].logit == 1 && c.v[1].logit == -1 && c.v[3].logit == 0.25f);
    c = cands(l, 4);
    sampler_penalty(&c, hist, 4, 0, 2);  /* off */
    CHECK(c.v[0].logit == 2);
}

static void test_pick(void)
{
    float l[] = {1, 2, 3};
    sampler_cands c = cands(l, 3);
    CHECK(sampler_pick(&c, 0.5) == 2);
    CHECK(sampler_pick(&c, 0.7) == 1);
    CHECK(sampler_pick(&c, 0.95) == 0);
}

/* 40000 draws at temperature 1 with every filter off: frequencies within 0.01 of the
 * softmax; with top-k 2, the third token never comes. */
static void test_frequencies(void)
{
    enum { V = 4, DRAWS = 40000 };
    float l[V] = {0.3f, -1, 1.2f, 0};
    double z = 0, want[V];
    for (int v = 0; v < V; v++)
        z += exp(l[v]);
    for (int v = 0; v < V; v++)
        want[v] = exp(l[v]) / z;
    sampler_params p;
    sampler_params_default(&p);
    p.temp = 1;
    p.top_k = 0;
    p.top_p = 1;
    p.min_p = 0;
    p.seed = test_rand();
    sampler s;
    REQUIRE(sampler_init(&s, &p, V, NULL) == 0);
    int cnt[V] = {0};
    for (int i = 0; i < DRAWS; i++)
        cnt[sampler_sample(&s, l, NULL, 0)]++;
    for (int v = 0; v < V; v++)
        CHECKF(fabs((double)cnt[v] / DRAWS - want[v]) < 0.01, "token %d: %g vs %g", v,
               (double)cnt[v] / DRAWS, want[v]);
    sampler_free(&s);
    p.top_k = 2;
    REQUIRE(sampler_init(&s, &p, V, NULL) == 0);
    int other = 0;
    for (int i = 0; i < 2000; i++) {
        int32_t t = sampler_sample(&s, l, NULL, 0);
        other += t != 2 && t != 0;
    }
    CHECK(other == 0);
    sampler_free(&s);
}

static void test_greedy_and_seed(void)
{
    enum { V = 50 };
    float l[V];
    sampler_params p;
    sampler_params_default(&p);
    p.seed = test_rand();
    sampler a, b, c, g;
    REQUIRE(sampler_init(&a, &p, V, NULL) == 0);
    REQUIRE(sampler_init(&b, &p, V, NULL) == 0);
    p.seed++;
    REQUIRE(sampler_init(&c, &p, V, NULL) == 0);
    p.temp = 0;
    p.repeat_penalty = 100;  /* large enough to move the argmax off a repeated token */
    REQUIRE(sampler_init(&g, &p, V, NULL) == 0);
    int same = 1, differ = 0;
    int32_t hist[64];
    for (int i = 0; i < 64; i++) {
        int best = 0;
        for (int v = 0; v < V; v++) {
            l[v] = (float)((test_rand() >> 11) * 0x1p-53 * 4);
            if (l[v] > l[best])
                best = v;
        }
        int32_t x = sampler_sample(&a, l, NULL, 0), y = sampler_sample(&b, l, NULL, 0);
        same &= x == y;
        differ |= x != sampler_sample(&c, l, NULL, 0);
        hist[0] = best;
        int32_t gt = sampler_sample(&g, l, hist, 0);  /* no history: the argmax */
        CHECK(gt == best);
        CHECK(sampler_sample(&g, l, hist, 1) != best);  /* penalised away */
    }
    CHECK(same);
    CHECK(differ);
    sampler_free(&a);
    sampler_free(&b);
    sampler_free(&c);
    sampler_free(&g);
}

static int by_rank(const void *a, const void *b)
{
    const sampler_cand *x = a, *y = b;
    if (x->logit != y->logit)
        return x->logit > y->logit ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* Random parameters (penalties above and below 1, greedy with a penalty, top-k from 1 to
 * past the vocabulary) on logits with many ties and a history drawn from the top tokens:
 * wherever sampler_top_need allows, the draw from that many largest logits is the full
 * draw's id, and the random states stay together. */
static void test_sample_top(void)
{
    enum { V = 300, REPS = 3000 };
    static float l[V];
    static sampler_cand all[V];
    static const double temps[] = {0, 0.3, 0.8, 1.5}, tps[] = {0.5, 0.95, 1}, mps[] = {0, 0.05, 0.3},
                        pens[] = {1, 1.3, 3, 0.7};
    static const int tks[] = {1, 5, 40, 0, 400}, lns[] = {0, 8, 64, -1};
    int ran = 0, same = 0, none = 0;
    for (int rep = 0; rep < REPS; rep++) {
        sampler_params p;
        sampler_params_default(&p);
        p.temp = temps[test_rand() % 4];
        p.top_k = tks[test_rand() % 5];
        p.top_p = tps[test_rand() % 3];
        p.min_p = mps[test_rand() % 3];
        p.repeat_penalty = pens[test_rand() % 4];
        p.repeat_last_n = lns[test_rand() % 4];
        p.seed = test_rand();
        for (int v = 0; v < V; v++) {
            l[v] = (float)((int)(test_rand() % 41) - 20) * 0.25f;
            all[v] = (sampler_cand){v, l[v], 0};
        }
        qsort(all, V, sizeof *all, by_rank);
        int32_t hist[100];
        int nh = 1 + (int)(test_rand() % 100);
        for (int i = 0; i < nh; i++)  /* mostly tokens near the top */
            hist[i] = all[test_rand() % (test_rand() % 2 ? 20 : V)].id;
        sampler a, b;
        REQUIRE(sampler_init(&a, &p, V, NULL) == 0 && sampler_init(&b, &p, V, NULL) == 0);
        int need = sampler_top_need(&a, nh);
        if (!need || need > V) {
            none++;
        } else {
            int32_t x = sampler_sample(&a, l, hist, nh);
            int32_t y = sampler_sample_top(&b, all, need, hist, nh);
            int ok = x == y && sampler_uniform(&a) == sampler_uniform(&b);
            same += ok;
            ran++;
            CHECKF(ok, "temp %g top_k %d top_p %g min_p %g penalty %g last %d hist %d: full %d, "
                   "top %d of %d: %d", p.temp, p.top_k, p.top_p, p.min_p, p.repeat_penalty,
                   p.repeat_last_n, nh, x, need, V, y);
        }
        sampler_free(&a);
        sampler_free(&b);
    }
    CHECKF(ran > REPS / 3, "only %d draws compared", ran);
    printf("# sample_top: %d of %d draws the full draw's (%d with no bound)\n", same, ran, none);
}

/* sampler_exp against libm's exp: within 4e-16 relative over the softmax's range (x <= 0)
 * and past it, exactly 1 at 0, 0 at -inf and below -708, NaN at NaN. */
static void test_exp(void)
{
    double worst = 0;
    int bad = 0;
    for (int i = 0; i < 200000; i++) {
        double x = i < 100000 ? -(double)(test_rand() % 1000000) * 7.08e-4
                              : ((double)(test_rand() % 2000000) - 1000000) * 1e-5;
        double a = sampler_exp(x), b = exp(x), rel = fabs(a - b) / b;
        worst = rel > worst ? rel : worst;
        bad += !(rel < 4e-16);
    }
    CHECKF(!bad, "%d values off by more than 4e-16 (worst %g)", bad, worst);
    CHECK(sampler_exp(0) == 1.0 && sampler_exp(-INFINITY) == 0 && sampler_exp(-709) == 0);
    CHECK(isnan(sampler_exp(NAN)));
    printf("# sampler_exp: worst relative error %.3g against libm\n", worst);
}

/* sampler_draw_of / sampler_draw_top / sampler_draw_taken (a draw queued away from the
 * sampler) give sampler_sample_top's ids and random state, draw after draw; refused with a
 * penalty, top-k off or above the bound. */
static void test_draw_of(void)
{
    enum { V = 300, STEPS = 20 };
    static float l[V];
    static sampler_cand all[V];
    static const double temps[] = {0, 0.3, 0.8, 1.5}, tps[] = {0.5, 0.95, 1}, mps[] = {0, 0.05, 0.3};
    static const int tks[] = {1, 5, 40, 256};
    int ran = 0, same = 0;
    for (int rep = 0; rep < 400; rep++) {
        sampler_params p;
        sampler_params_default(&p);
        p.temp = temps[test_rand() % 4];
        p.top_k = tks[test_rand() % 4];
        p.top_p = tps[test_rand() % 3];
        p.min_p = mps[test_rand() % 3];
        p.seed = test_rand();
        sampler a, b;
        REQUIRE(sampler_init(&a, &p, V, NULL) == 0 && sampler_init(&b, &p, V, NULL) == 0);
        int ok = 1;
        for (int t = 0; t < STEPS && ok; t++) {
            for (int v = 0; v < V; v++) {
                l[v] = (float)((int)(test_rand() % 41) - 20) * 0.25f;
                all[v] = (sampler_cand){v, l[v], 0};
            }
            qsort(all, V, sizeof *all, by_rank);
            sampler_draw d;
            ok = sampler_draw_of(&b, 256, &d);
            int32_t x = sampler_sample(&a, l, NULL, 0), y = sampler_draw_top(&d, all, d.top_k, NULL);
            sampler_draw_taken(&b);
            ok = ok && x == y && d.rng == b.rng && a.rng == b.rng;
        }
        same += ok;
        ran++;
        CHECKF(ok, "temp %g top_k %d top_p %g min_p %g: a queued draw is not the sampler's",
               p.temp, p.top_k, p.top_p, p.min_p);
        sampler_free(&a);
        sampler_free(&b);
    }
    sampler_params p;
    sampler_params_default(&p);
    sampler s;
    sampler_draw d;
    REQUIRE(sampler_init(&s, &p, V, NULL) == 0);
    CHECK(sampler_draw_of(&s, 40, &d) && d.top_k == 40 && !sampler_draw_of(&s, 39, &d));
    s.p.repeat_penalty = 1.1;
    CHECK(!sampler_draw_of(&s, 256, &d));
    s.p.repeat_penalty = 1;
    s.p.top_k = 0;
    CHECK(!sampler_draw_of(&s, 256, &d));
    s.p.temp = 0;
    CHECK(sampler_draw_of(&s, 256, &d) && d.top_k == 1);
    sampler_free(&s);
    printf("# draw_of: %d of %d sequences of %d queued draws the sampler's\n", same, ran, STEPS);
}

/* top-p and min-p over many unsorted candidates (top-k off: they sort only what they keep)
 * against sorting every candidate first: min-p the same list bit for bit (p above 1 too:
 * the largest alone); top-p the prefix whose mass, by the softmax's sum in the list's first
 * order, reaches p, for peaked and flat logits with ties. */
static void test_top_p_min_p_unsorted(void)
{
    enum { N = 5000 };
    static sampler_cand a[N], b[N];
    static const double ps[] = {0.05, 0.5, 0.9, 0.999, 1.5};
    int cases = 0, same = 0;
    for (int rep = 0; rep < 60; rep++) {
        int peaked = rep % 2, n = 1100 + (int)(test_rand() % (N - 1100));
        double p = ps[test_rand() % 5];
        for (int i = 0; i < n; i++) {
            double u = (test_rand() >> 11) * 0x1p-53;
            float l = peaked ? (float)(12 * pow(u, 16) - 2) : (float)((int)(u * 64) * 0.0625);
            a[i] = (sampler_cand){(int32_t)((i * 7919) % n), l, 0};  /* ids not in order */
        }
        /* min-p */
        memcpy(b, a, sizeof(sampler_cand) * (size_t)n);
        sampler_cands ca = {a, n, 0}, cb = {b, n, 0};
        qsort(b, (size_t)n, sizeof *b, by_rank);
        cb.sorted = 1;
        sampler_min_p(&ca, p < 1 ? p / 4 : p);
        sampler_min_p(&cb, p < 1 ? p / 4 : p);
        int ok = ca.n == cb.n;
        for (int i = 0; ok && i < ca.n; i++)
            ok = a[i].id == b[i].id && a[i].logit == b[i].logit;
        /* top-p (p < 1), from the same unsorted start */
        for (int i = 0; i < n; i++)
            a[i] = (sampler_cand){(int32_t)((i * 7919) % n), 0, 0};
        if (p < 1) {
            uint64_t seed = test_rand();
            for (int i = 0; i < n; i++) {
                seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
                double u = (seed >> 11) * 0x1p-53;
                a[i].logit = peaked ? (float)(12 * pow(u, 16) - 2) : (float)((int)(u * 64) * 0.0625);
            }
            double mx = a[0].logit, sum = 0;
            for (int i = 1; i < n; i++)
                mx = a[i].logit > mx ? a[i].logit : mx;
            for (int i = 0; i < n; i++)
                sum += exp((double)a[i].logit - mx);
            memcpy(b, a, sizeof(sampler_cand) * (size_t)n);
            qsort(b, (size_t)n, sizeof *b, by_rank);
            int want = n;
            double cum = 0;
            for (int i = 0; i < n; i++) {
                cum += (float)(exp((double)b[i].logit - mx) / sum);
                if (cum >= p) {
                    want = i + 1;
                    break;
                }
            }
            ca = (sampler_cands){a, n, 0};
            sampler_top_p(&ca, p);
            ok = ok && ca.n == want && ca.sorted;
            for (int i = 0; ok && i < want; i++)
                ok = a[i].id == b[i].id;
        }
        cases++;
        same += ok;
        CHECKF(ok, "rep %d: n %d, p %g, %s logits: not as sorting every candidate", rep, n, p,
               peaked ? "peaked" : "flat");
    }
    printf("# unsorted top-p / min-p: %d of %d lists as sorting every candidate\n", same, cases);
}

int main(void)
{
    test_seed();
    RUN(test_softmax);
    RUN(test_top_k);
    RUN(test_top_k_random);
    RUN(test_top_p);
    RUN(test_min_p);
    RUN(test_temp);
    RUN(test_penalty);
    RUN(test_pick);
    RUN(test_frequencies);
    RUN(test_greedy_and_seed);
    RUN(test_sample_top);
    RUN(test_top_p_min_p_unsorted);
    RUN(test_exp);
    RUN(test_draw_of);
    TEST_EXIT();
}
