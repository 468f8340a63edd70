/* comm_check.h: the collective checks every lib/comm backend must pass, written once for
 * host and device memory (the caller supplies how to allocate and copy). Each rank builds
 * the inputs of every rank from the same seed, so it knows the exact expected result; the
 * values are small integers, exact in every type and in any order of summation. */
#ifndef DSV3_COMM_CHECK_H
#define DSV3_COMM_CHECK_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../lib/comm.h"

typedef struct comm_mem {
    void *(*alloc)(size_t bytes);
    void (*release)(void *p);
    void (*upload)(void *dev, const void *host, size_t bytes);
    void (*download)(void *host, const void *dev, size_t bytes);
    void (*sync)(void);   /* waits for queued collectives (GPU); NULL on the CPU */
} comm_mem;

static uint64_t cc_mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* Rank r's i-th input of test `t`: an integer in [-8, 8]. */
static int cc_val(uint64_t seed, int t, int r, size_t i)
{
    return (int)(cc_mix(seed ^ ((uint64_t)t << 56) ^ ((uint64_t)r << 40) ^ i) % 17) - 8;
}

static void cc_sync(const comm_mem *m)
{
    if (m->sync)
        m->sync();
}

#define CC_FAIL(...)                                                                       \
    do {                                                                                   \
        snprintf(why, why_n, __VA_ARGS__);                                                 \
        goto out;                                                                          \
    } while (0)

/* Runs every collective on c; returns 0 or -1 with the first failure in why. */
static inline int comm_check_all(comm *c, const comm_mem *m, uint64_t seed, char *why,
                                 size_t why_n)
{
    int R = comm_world(c), me = comm_rank(c), rc = -1;
    size_t n = 1000 + cc_mix(seed) % 3000;   /* ragged, the same on every rank */
    dsv3_err e;
    float *h = malloc((size_t)R * n * sizeof(double) + 64);
    float *want = malloc((size_t)R * n * sizeof(double) + 64);
    void *d = m->alloc((size_t)R * n * sizeof(double) + 64);
    void *d2 = m->alloc((size_t)R * n * sizeof(double) + 64);
    size_t *cnt = calloc(4 * (size_t)R, sizeof *cnt);
    why[0] = 0;
    if (!h || !want || !d || !d2 || !cnt)
        CC_FAIL("out of memory");

    /* allreduce, f32 sum and max, in place */
    for (int op = COMM_SUM; op <= COMM_MAX; op++) {
        for (size_t i = 0; i < n; i++) {
            h[i] = (float)cc_val(seed, 1, me, i);
            float w = op == COMM_SUM ? 0 : -1e9f;
            for (int r = 0; r < R; r++) {
                float v = (float)cc_val(seed, 1, r, i);
                w = op == COMM_SUM ? w + v : (v > w ? v : w);
            }
            want[i] = w;
        }
        m->upload(d, h, n * sizeof *h);
        if (comm_allreduce(c, d, n, COMM_F32, op, &e))
            CC_FAIL("%s", e.msg);
        cc_sync(m);
        m->download(h, d, n * sizeof *h);
        if (memcmp(h, want, n * sizeof *h))
            CC_FAIL("allreduce f32 %s differs", op == COMM_SUM ? "sum" : "max");
    }

    /* allreduce, i64 min */
    {
        int64_t *hi = (int64_t *)h, *wi = (int64_t *)want;
        for (size_t i = 0; i < n; i++) {
            hi[i] = cc_val(seed, 2, me, i) * ((int64_t)1 << 40);
            wi[i] = INT64_MAX;
            for (int r = 0; r < R; r++) {
                int64_t v = cc_val(seed, 2, r, i) * ((int64_t)1 << 40);
                wi[i] = v < wi[i] ? v : wi[i];
            }
        }
        m->upload(d, hi, n * sizeof *hi);
        if (comm_allreduce(c, d, n, COMM_I64, COMM_MIN, &e))
            CC_FAIL("%s", e.msg);
        cc_sync(m);
        m->download(hi, d, n * sizeof *hi);
        if (memcmp(hi, wi, n * sizeof *hi))
            CC_FAIL("allreduce i64 min differs");
    }

    /* reduce_scatter: R blocks of n; this rank gets the sum of block `me` */
    for (size_t i = 0; i < (size_t)R * n; i++)
        h[i] = (float)cc_val(seed, 3, me, i);
    for (size_t i = 0; i < n; i++) {
        want[i] = 0;
        for (int r = 0; r < R; r++)
            want[i] += (float)cc_val(seed, 3, r, (size_t)me * n + i);
    }
    m->upload(d, h, (size_t)R * n * sizeof *h);
    if (comm_reduce_scatter(c, d, d2, n, COMM_F32, COMM_SUM, &e))
        CC_FAIL("%s", e.msg);
    cc_sync(m);
    m->download(h, d2, n * sizeof *h);
    if (memcmp(h, want, n * sizeof *h))
        CC_FAIL("reduce_scatter differs");

    /* allgather of bf16-sized values (moved, not reduced) */
    {
        uint16_t *hs = (uint16_t *)h, *ws = (uint16_t *)want;
        for (size_t i = 0; i < n; i++)
            hs[i] = (uint16_t)(cc_mix(seed ^ 4 ^ ((uint64_t)me << 32) ^ i));
        for (int r = 0; r < R; r++)
            for (size_t i = 0; i < n; i++)
                ws[(size_t)r * n + i] = (uint16_t)(cc_mix(seed ^ 4 ^ ((uint64_t)r << 32) ^ i));
        m->upload(d, hs, n * 2);
        if (comm_allgather(c, d, d2, n, COMM_BF16, &e))
            CC_FAIL("%s", e.msg);
        cc_sync(m);
        m->download(hs, d2, (size_t)R * n * 2);
        if (memcmp(hs, ws, (size_t)R * n * 2))
            CC_FAIL("allgather differs");
    }

    /* broadcast from the last rank */
    for (size_t i = 0; i < n; i++)
        h[i] = (float)cc_val(seed, 5, me, i), want[i] = (float)cc_val(seed, 5, R - 1, i);
    m->upload(d, h, n * sizeof *h);
    if (comm_broadcast(c, d, n, COMM_F32, R - 1, &e))
        CC_FAIL("%s", e.msg);
    cc_sync(m);
    m->download(h, d, n * sizeof *h);
    if (memcmp(h, want, n * sizeof *h))
        CC_FAIL("broadcast from rank %d differs", R - 1);

    /* alltoallv with ragged counts (some zero): count s->d = mix(seed,s,d) % 50 */
    {
        int32_t *hi = (int32_t *)h, *wi = (int32_t *)want;
        size_t *sn = cnt, *so = cnt + R, *rn = cnt + 2 * R, *ro = cnt + 3 * R, at = 0, rat = 0;
        for (int p = 0; p < R; p++) {
            sn[p] = cc_mix(seed ^ 6 ^ ((uint64_t)me << 20) ^ (uint64_t)p) % 50;
            rn[p] = cc_mix(seed ^ 6 ^ ((uint64_t)p << 20) ^ (uint64_t)me) % 50;
            so[p] = at, ro[p] = rat;
            for (size_t i = 0; i < sn[p]; i++)
                hi[at + i] = me * 1000000 + p * 1000 + (int)i;
            for (size_t i = 0; i < rn[p]; i++)
                wi[rat + i] = p * 1000000 + me * 1000 + (int)i;
            at += sn[p], rat += rn[p];
        }
        m->upload(d, hi, at * 4 + 4);
        if (comm_alltoallv(c, d, sn, so, d2, rn, ro, COMM_I32, &e))
            CC_FAIL("%s", e.msg);
        cc_sync(m);
        m->download(hi, d2, rat * 4 + 4);
        if (memcmp(hi, wi, rat * 4))
            CC_FAIL("alltoallv differs");
    }

    if (comm_barrier(c, &e))
        CC_FAIL("%s", e.msg);
    rc = 0;
out:
    if (d)
        m->release(d);
    if (d2)
        m->release(d2);
    free(h);
    free(want);
    free(cnt);
    return rc;
}

#undef CC_FAIL
#endif
