/* GPU test of the decode graphs' greedy choice (kernels/ginfer_k.cu gk_argmax through
 * ginfer_argmax_run) against the host's rule (lib/sampler's: the largest logit, banned ids
 * left out, ties to the lowest id) on fresh random rows: vocabularies of the configs
 * (129280) and edge sizes (1, fewer than the blocks a row, not a multiple of anything, more
 * than one pass of a block's loads), 1 to 8 rows, logits random, drawn from three values
 * (ties everywhere, the lowest id must win), zeros of both signs, with no ban, a random third
 * banned, all but one banned and all banned (id 0, as the host's rule).
 * And of a sampled step's candidates (gk_topk through ginfer_topk_run): each row's K largest
 * (K 1 to 256), bitwise the host's sort (logit descending, ties to the lower id) on the same
 * kinds of rows. And of a sampled step's draw on the device (gk_topk_draw through
 * ginfer_draw_run) against lib/sampler's on the host. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/ginfer.h"
#include "../../lib/sampler.h"
#include "gpu_test.h"

static int32_t host_argmax(const float *x, int V, const uint8_t *ban)
{
    int32_t b = 0;
    float bv = ban && ban[0] ? -INFINITY : x[0];
    for (int v = 1; v < V; v++)
        if (!(ban && ban[v]) && x[v] > bv) {
            bv = x[v];
            b = v;
        }
    return b;
}

/* mode 0 random, 1 three levels (ties), 2 zeros of both signs with a few -1 */
static float draw(int mode)
{
    if (mode == 0)
        return gt_uniform(8.0f);
    if (mode == 1)
        return (float)(test_rand() % 3);
    return test_rand() % 7 == 0 ? -1.0f : (test_rand() & 1 ? -0.0f : 0.0f);
}

static void test_argmax_equals_host(void)
{
    GT_NEED_GPU();
    static const int Vs[] = {129280, 1, 5, 127, 1000, 32771, 131075, 300001};
    static const int Ns[] = {1, 3, 8};
    int cases = 0, same = 0;
    for (size_t vi = 0; vi < sizeof Vs / sizeof *Vs; vi++)
        for (size_t ni = 0; ni < sizeof Ns / sizeof *Ns; ni++)
            for (int mode = 0; mode < 3; mode++)
                for (int bm = 0; bm < 4; bm++) {
                    int V = Vs[vi], N = Ns[ni];
                    float *x = malloc((size_t)N * V * sizeof(float));
                    uint8_t *ban = malloc((size_t)V);
                    int32_t *out = malloc((size_t)N * sizeof(int32_t));
                    for (size_t i = 0; i < (size_t)N * V; i++)
                        x[i] = draw(mode);
                    int keep = (int)(test_rand() % (unsigned)V);
                    for (int v = 0; v < V; v++)
                        ban[v] = bm == 1 ? test_rand() % 3 == 0 : bm == 2 ? v != keep : bm == 3;
                    dsv3_err e;
                    int rc = ginfer_argmax_run(x, N, V, bm ? ban : NULL, out, &e);
                    CHECKF(!rc, "%s", rc ? e.msg : "");
                    for (int r = 0; r < N && !rc; r++) {
                        int32_t h = host_argmax(x + (size_t)r * V, V, bm ? ban : NULL);
                        cases++;
                        same += out[r] == h;
                        CHECKF(out[r] == h, "V %d N %d row %d mode %d ban %d: device id %d, host %d",
                               V, N, r, mode, bm, out[r], h);
                    }
                    free(x), free(ban), free(out);
                }
    printf("# stat argmax: %d of %d rows the host's id\n", same, cases);
}

static int by_rank(const void *a, const void *b)
{
    const float *x = a, *y = b;  /* (logit, id) pairs */
    if (x[0] != y[0])
        return x[0] > y[0] ? -1 : 1;
    return (x[1] > y[1]) - (x[1] < y[1]);
}

static void test_topk_equals_host(void)
{
    GT_NEED_GPU();
    static const int Vs[] = {129280, 300, 2049, 32768, 300001};
    static const int Ks[] = {1, 40, 104, 256};
    static const int Ns[] = {1, 3};
    int cases = 0, same = 0;
    for (size_t vi = 0; vi < sizeof Vs / sizeof *Vs; vi++)
        for (size_t ki = 0; ki < sizeof Ks / sizeof *Ks; ki++)
            for (int mode = 0; mode < 3; mode++) {
                int V = Vs[vi], K = Ks[ki], N = Ns[test_rand() % 2], bm = (int)(test_rand() % 2);
                float *x = malloc((size_t)N * V * sizeof(float)), *lg = malloc((size_t)N * K * 4);
                float *srt = malloc((size_t)V * 2 * sizeof(float));
                uint8_t *ban = malloc((size_t)V);
                int32_t *ids = malloc((size_t)N * K * sizeof(int32_t));
                for (size_t i = 0; i < (size_t)N * V; i++)
                    x[i] = draw(mode);
                for (int v = 0; v < V; v++)
                    ban[v] = test_rand() % 3 == 0;
                dsv3_err e;
                double us = 0;
                int rc = ginfer_topk_run(x, N, V, bm ? ban : NULL, K, ids, lg, &us, &e);
                if (!rc && mode == 0 && (V == 129280 || V == 32768))
                    printf("# topk time: V %d K %d N %d: %.1f us a call\n", V, K, N, us);
                CHECKF(!rc, "%s", rc ? e.msg : "");
                for (int r = 0; r < N && !rc; r++) {
                    for (int v = 0; v < V; v++) {  /* ids below 2^24 are exact as floats */
                        float l = x[(size_t)r * V + v];
                        srt[2 * v] = bm && ban[v] ? -INFINITY : l == 0.0f ? 0.0f : l;
                        srt[2 * v + 1] = (float)v;
                    }
                    qsort(srt, (size_t)V, 2 * sizeof(float), by_rank);
                    int ok = 1;
                    for (int i = 0; i < K && ok; i++)
                        ok = ids[(size_t)r * K + i] == (int32_t)srt[2 * i + 1] &&
                             (lg[(size_t)r * K + i] == srt[2 * i] ||
                              (lg[(size_t)r * K + i] == 0 && srt[2 * i] == 0));
                    cases++;
                    same += ok;
                    CHECKF(ok, "V %d K %d N %d row %d mode %d ban %d: not the host's", V, K, N, r,
                           mode, bm);
                }
                free(x), free(lg), free(srt), free(ban), free(ids);
            }
    printf("# stat topk: %d of %d rows' candidates the host's\n", same, cases);
}

/* A sampled step's draw on the device (gk_topk_draw through ginfer_draw_run): each row's own
 * parameters (greedy, or temperature, top-k up to K, top-p, min-p) and random state, against
 * lib/sampler's sampler_draw_top on the host's sort of the same row: the same id and the same
 * random state after, for rows of random logits, of three levels (every candidate tied) and
 * of peaked ones, with and without banned ids. */
static void test_draw_equals_host(void)
{
    GT_NEED_GPU();
    static const int Vs[] = {129280, 300, 32768};
    static const double temps[] = {0, 0.3, 0.8, 1.5}, tps[] = {0.5, 0.9, 0.95, 1},
                        mps[] = {0, 0.05, 0.3};
    enum { N = 64, REPS = 4 };
    int cases = 0, same = 0, drawn = 0;
    sampler_cand *c = malloc(256 * sizeof *c);
    for (size_t vi = 0; vi < sizeof Vs / sizeof *Vs; vi++)
        for (int rep = 0; rep < REPS; rep++) {
            int V = Vs[vi], mode = rep % 3, bm = rep == 3, K = rep == 1 ? 40 : 1 + (int)(test_rand() % 256);
            float *x = malloc((size_t)N * V * sizeof(float)), *srt = malloc((size_t)V * 2 * 4);
            uint8_t *ban = malloc((size_t)V);
            int32_t ids[N];
            sampler_draw d[N], h[N];
            for (size_t i = 0; i < (size_t)N * V; i++) {
                double u = (double)(test_rand() >> 11) * 0x1p-53;
                x[i] = mode == 2 ? (float)(16 * pow(u, 12)) : draw(mode);
            }
            for (int v = 0; v < V; v++)
                ban[v] = test_rand() % 3 == 0;
            for (int r = 0; r < N; r++) {
                sampler_draw *a = &d[r];
                *a = (sampler_draw){0};
                a->temp = temps[test_rand() % 4];
                a->top_k = a->temp > 0 ? 1 + (int)(test_rand() % (unsigned)K) : 1;
                a->top_p = tps[test_rand() % 4];
                a->min_p = mps[test_rand() % 3];
                a->log_min_p = a->min_p > 0 ? log(a->min_p) : 0;
                a->rng = test_rand();
                h[r] = *a;
            }
            dsv3_err e;
            int rc = ginfer_draw_run(x, N, V, bm ? ban : NULL, K, d, ids, &e);
            CHECKF(!rc, "%s", rc ? e.msg : "");
            for (int r = 0; r < N && !rc; r++) {
                for (int v = 0; v < V; v++) {
                    float l = x[(size_t)r * V + v];
                    srt[2 * v] = bm && ban[v] ? -INFINITY : l == 0.0f ? 0.0f : l;
                    srt[2 * v + 1] = (float)v;
                }
                qsort(srt, (size_t)V, 2 * sizeof(float), by_rank);
                int n = K < V ? K : V;
                for (int i = 0; i < n; i++)
                    c[i] = (sampler_cand){(int32_t)srt[2 * i + 1], srt[2 * i], 0};
                int32_t want = sampler_draw_top(&h[r], c, n, &e);
                int ok = ids[r] == want && d[r].rng == h[r].rng;
                cases++;
                same += ok;
                drawn += h[r].temp > 0;
                CHECKF(ok, "V %d K %d row %d mode %d ban %d (temp %g top_k %d top_p %g min_p %g): "
                       "device %d, host %d%s", V, K, r, mode, bm, h[r].temp, h[r].top_k,
                       h[r].top_p, h[r].min_p, ids[r], want,
                       d[r].rng == h[r].rng ? "" : ", random states differ");
            }
            free(x), free(srt), free(ban);
        }
    free(c);
    printf("# stat draw: %d of %d rows' draws the host's (%d sampled)\n", same, cases, drawn);
}

int main(void)
{
    test_seed();
    RUN(test_argmax_equals_host);
    RUN(test_topk_equals_host);
    RUN(test_draw_equals_host);
    TEST_EXIT();
}
