/* bench.h: timing for the GPU tests' benchmarks (DSV3_GPU_BENCH=1): device events around
 * each run, warm-up first, the median of the timed runs (METHOD.md); inputs are random
 * (zeros run faster than real data). */
#ifndef DSV3_GPU_BENCH_H
#define DSV3_GPU_BENCH_H

#include "gpu_test.h"

/* A long-lived device buffer of n bf16 random values in [-a, a] (a random 1M block
 * repeated: enough for timing, cheap to make). */
static __attribute__((unused)) gpu_bf16 *gb_random_bf(size_t n, float a)
{
    dsv3_err e;
    gpu_bf16 *d = gpu_malloc(n * 2, &e);
    if (!d)
        return NULL;
    size_t blk = n < ((size_t)1 << 20) ? n : ((size_t)1 << 20);
    gpu_bf16 *h = malloc(blk * 2);
    for (size_t i = 0; i < blk; i++)
        h[i] = gpu_f2bf(gt_uniform(a));
    for (size_t o = 0; o < n; o += blk)
        if (gpu_upload(gt_ctx_, d + o, h, (n - o < blk ? n - o : blk) * 2, &e)) {
            free(h);
            gpu_free(d);
            return NULL;
        }
    free(h);
    return d;
}

static __attribute__((unused)) int gb_cmpf(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* Median milliseconds of `iters` timed calls of fn(arg) after 3 warm-ups; -1 on error. */
static __attribute__((unused)) float gb_time(int (*fn)(void *arg, dsv3_err *e), void *arg, int iters)
{
    dsv3_err e;
    float ms[64];
    if (iters > 64)
        iters = 64;
    for (int i = -3; i < iters; i++) {
        gpu_timer t;
        float x;
        if (gpu_timer_start(gt_ctx_, &t, &e) || fn(arg, &e) ||
            gpu_timer_stop(gt_ctx_, &t, &x, &e)) {
            fprintf(stderr, "    bench: %s\n", e.msg);
            return -1;
        }
        if (i >= 0)
            ms[i] = x;
    }
    qsort(ms, (size_t)iters, sizeof *ms, gb_cmpf);
    return ms[iters / 2];
}

#endif
