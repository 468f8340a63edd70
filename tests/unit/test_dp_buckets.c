/* lib/dp's bucketed layout for data parallelism on device buffers: the bucket plan's rules
 * on random ready points and sizes, and the bucket collectives (reduce-scatter per bucket,
 * all-gather in place and from the shard) run through lib/comm's TCP backend with ranks as
 * threads on host buffers, checked element by element against sums computed here. The same
 * calls run on NCCL with device buffers in dsv3-train. */
#include <pthread.h>
#include <unistd.h>

#include "../test.h"
#include "../../lib/dp.h"

static uint64_t rnd(void)
{
    return test_rand();
}

/* k descending ready points in [0, n], the last 0 (the first may be n: nothing after the
 * blocks, as a model whose head is tied). */
static void make_points(size_t n, size_t *pts, int k)
{
    for (int i = 0; i < k - 1; i++)
        pts[i] = rnd() % (n + 1);
    pts[k - 1] = 0;
    for (int i = 0; i < k; i++)   /* sort descending */
        for (int j = i + 1; j < k; j++)
            if (pts[j] > pts[i]) {
                size_t x = pts[i];
                pts[i] = pts[j], pts[j] = x;
            }
}

/* The plan's rules: buckets tile [0, n_pad) from the top down, each a multiple of world,
 * starting at or above its ready point (every gradient in it final by then), on 16-byte
 * boundaries, ready points in launch order, all but the lowest at least the target;
 * shards tile dn_pad / world. */
static void plan_rules(void)
{
    const int worlds[] = {1, 2, 3, 4, 7, 8};
    for (int trial = 0; trial < 300; trial++) {
        int W = worlds[rnd() % 6];
        size_t n = 1 + rnd() % 5000;
        int k = 1 + (int)(rnd() % 12);
        size_t pts[12], target = rnd() % 3 ? 1 + rnd() % 2000 : 1;
        make_points(n, pts, k);
        for (int r = 0; r < W; r++) {
            dp d;
            dsv3_err e;
            memset(&d, 0, sizeof d);
            d.rank = r, d.world = W;   /* no comm: the layout alone */
            d.n = n;
            d.shard = (n + W - 1) / W;
            d.n_pad = d.shard * W;
            REQUIRE(dp_plan_buckets(&d, NULL, pts, k, target, &e) == 0);
            REQUIRE(d.nbk >= 1);
            CHECK(d.bk[0].hi == d.dn_pad && d.bk[d.nbk - 1].lo == 0);
            CHECK(d.dn_pad >= n && d.dn_pad < n + 4 * (size_t)W && d.dn_pad % (4 * (size_t)W) == 0);
            CHECK(d.bshard * (size_t)W == d.dn_pad);
            size_t sum = 0;
            for (int b = 0; b < d.nbk; b++) {
                const dp_bucket *x = &d.bk[b];
                CHECKF(x->hi > x->lo && x->lo % (4 * (size_t)W) == 0 && x->piece % 4 == 0, "W %d bucket %d", W, b);
                CHECK(x->piece * (size_t)W == x->hi - x->lo);
                CHECKF(x->lo >= pts[x->ready], "bucket %d starts below its ready point", b);
                if (b > 0) {
                    CHECK(x->hi == d.bk[b - 1].lo);
                    CHECK(x->ready > d.bk[b - 1].ready);
                }
                if (b < d.nbk - 1)
                    CHECKF(x->hi - x->lo >= target, "bucket %d of %zu < target %zu", b,
                           x->hi - x->lo, target);
                CHECK(x->shard_off == (b == d.nbk - 1 ? 0 : d.bk[b + 1].shard_off + d.bk[b + 1].piece));
                sum += x->piece;
            }
            CHECK(sum == d.bshard);
            free(d.bk);
        }
    }
    dp d;
    dsv3_err e;
    memset(&d, 0, sizeof d);
    d.world = 2, d.n = 10, d.shard = 5, d.n_pad = 10;
    size_t bad[2] = {4, 3};
    CHECK(dp_plan_buckets(&d, NULL, bad, 2, 1, &e) < 0 && strstr(e.msg, "last ready point"));
    size_t up[3] = {4, 6, 0};
    CHECK(dp_plan_buckets(&d, NULL, up, 3, 1, &e) < 0 && strstr(e.msg, "descend"));
    free(d.bk);
}

/* Every rank's spans together cover [0, n) exactly once. */
static void spans_cover(void)
{
    for (int trial = 0; trial < 100; trial++) {
        int W = 1 + (int)(rnd() % 6);
        size_t n = 1 + rnd() % 3000, pts[8];
        int k = 1 + (int)(rnd() % 8);
        make_points(n, pts, k);
        size_t target = 1 + rnd() % 500;   /* the same plan on every rank */
        unsigned char *seen = calloc(n, 1);
        for (int r = 0; r < W; r++) {
            dp d;
            dsv3_err e;
            memset(&d, 0, sizeof d);
            d.rank = r, d.world = W, d.n = n, d.shard = (n + W - 1) / W;
            d.n_pad = d.shard * W;
            REQUIRE(dp_plan_buckets(&d, NULL, pts, k, target, &e) == 0);
            size_t dev[8], sh[8], len[8];
            int ns = dp_shard_spans(&d, dev, sh, len);
            for (int s = 0; s < ns; s++) {
                CHECK(sh[s] + len[s] <= d.bshard && dev[s] + len[s] <= n);
                for (size_t i = 0; i < len[s]; i++)
                    seen[dev[s] + i]++;
            }
            free(d.bk);
        }
        size_t bad = 0;
        for (size_t i = 0; i < n; i++)
            bad += seen[i] != 1;
        CHECKF(bad == 0, "%zu of %zu elements not covered once (W %d)", bad, n, W);
        free(seen);
    }
}

typedef struct job {
    comm_launch l;
    size_t n, pts[6];
    int k;
    size_t target;
    char why[1200];
    int rc;
} job;

/* An integer-valued gradient: exact in F32 in any summation order. */
static float grad_of(int rank, size_t i)
{
    return (float)((int)((i * 7 + (size_t)rank * 13) % 97) - 48);
}

#define FAIL(...) do { snprintf(j->why, sizeof j->why, __VA_ARGS__); goto out; } while (0)

static void *run_rank(void *arg)
{
    job *j = arg;
    comm *c = NULL;
    dp d;
    dsv3_err e;
    float *g = NULL, *gs = NULL, *full = NULL;
    uint16_t *ms = NULL, *mf = NULL;
    j->rc = -1;
    memset(&d, 0, sizeof d);
    if (comm_open_launch(&c, COMM_CPU, &j->l, &e) < 0)
        FAIL("open: %s", e.msg);
    dp_open(&d, c);
    if (dp_layout(&d, j->n, &e) || dp_plan_buckets(&d, c, j->pts, j->k, j->target, &e))
        FAIL("layout: %s", e.msg);
    int W = d.world, r = d.rank;
    g = calloc(d.dn_pad, sizeof *g), gs = calloc(d.bshard, sizeof *gs);
    full = calloc(d.dn_pad, sizeof *full);
    ms = calloc(d.bshard, sizeof *ms), mf = calloc(d.dn_pad, sizeof *mf);
    if (!g || !gs || !full || !ms || !mf)
        FAIL("out of memory");
    for (size_t i = 0; i < d.n; i++)
        g[i] = grad_of(r, i);
    for (int b = 0; b < d.nbk; b++)   /* in launch order, as the backward does */
        if (dp_dev_reduce_bucket(&d, b, g, gs, NULL, &e))
            FAIL("reduce-scatter: %s", e.msg);
    size_t dev[6], sh[6], len[6];
    int ns = dp_shard_spans(&d, dev, sh, len);
    for (int s = 0; s < ns; s++)
        for (size_t i = 0; i < len[s]; i++) {
            float want = 0;
            for (int q = 0; q < W; q++)
                want += grad_of(q, dev[s] + i);
            if (gs[sh[s] + i] != want)
                FAIL("rank %d: shard element %zu (device %zu) is %g, want %g", r, sh[s] + i,
                     dev[s] + i, gs[sh[s] + i], want);
            /* this rank's update of its elements, in place, and its moment in the shard */
            full[dev[s] + i] = (float)(dev[s] + i) * 0.5f;
            ms[sh[s] + i] = (uint16_t)((dev[s] + i) % 65521);
        }
    if (dp_dev_gather(&d, NULL, full, COMM_F32, NULL, &e) ||
        dp_dev_gather(&d, ms, mf, COMM_BF16, NULL, &e))
        FAIL("all-gather: %s", e.msg);
    for (size_t i = 0; i < d.n; i++)
        if (full[i] != (float)i * 0.5f || mf[i] != (uint16_t)(i % 65521))
            FAIL("rank %d: gathered element %zu is %g / %u", r, i, full[i], mf[i]);
    j->rc = 0;
out:
    free(g), free(gs), free(full), free(ms), free(mf);
    dp_free(&d);
    comm_close(c);
    return NULL;
}

static void collectives_over_tcp(void)
{
    for (int W = 2; W <= 3; W++) {
        job jb[3];
        pthread_t th[3];
        size_t n = 1000 + rnd() % 3000;
        for (int r = 0; r < W; r++) {
            memset(&jb[r], 0, sizeof jb[r]);
            jb[r].l.rank = r, jb[r].l.world = W;
            strcpy(jb[r].l.launcher, "torchrun");
            strcpy(jb[r].l.master_addr, "localhost");
            jb[r].l.master_port = 20000 + (int)((getpid() * 11 + W * 977) % 20000);
            jb[r].n = n, jb[r].k = 5, jb[r].target = 300;
            size_t p[5] = {n - n / 10, n / 2 + 1, n / 3, 17, 0};  /* odd: not multiples of W */
            memcpy(jb[r].pts, p, sizeof p);
        }
        for (int r = 0; r < W; r++)
            pthread_create(&th[r], NULL, run_rank, &jb[r]);
        for (int r = 0; r < W; r++) {
            pthread_join(th[r], NULL);
            CHECKF(jb[r].rc == 0, "W %d rank %d: %s", W, r, jb[r].why);
        }
    }
}

int main(void)
{
    test_seed();
    RUN(plan_rules);
    RUN(spans_cover);
    RUN(collectives_over_tcp);
    return test_any_failed_;
}
