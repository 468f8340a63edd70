/* gpu_test.h: what the GPU tests share: one context, bf16 inputs drawn fresh each run,
 * uploads and downloads through bf16, the relative error ||out - ref|| / ||ref|| (NaN or an
 * unwritten, poisoned element makes it infinite), and the "# stat" / "# bench" lines that
 * scripts/gpu-check.sh gathers into its table. */
#ifndef DSV3_GPU_TEST_H
#define DSV3_GPU_TEST_H

#include <math.h>

#include "../../kernels/gpu.h"
#include "../../kernels/gpuctx.h"
#include "../test.h"

/* bf16 operands: a relative error between 1e-3 and 1e-2 is rounding (METHOD.md). */
#define BF16_BOUND 1e-2
/* fp32 arithmetic on the same bf16 inputs as the reference. */
#define F32_BOUND 1e-4

static __attribute__((unused)) gpu_ctx *gt_ctx_;

/* Skips the test without a GPU; makes the context once (1 GiB arena). */
#define GT_NEED_GPU()                                                                      \
    do {                                                                                   \
        if (gpu_count() == 0)                                                              \
            SKIP("no GPU%s", gpu_compiled() ? "" : " (CPU-only build)");                   \
        if (!gt_ctx_) {                                                                    \
            dsv3_err ce_;                                                                  \
            if (gpu_ctx_create(&gt_ctx_, 0, (size_t)1 << 30, &ce_)) {                      \
                CHECKF(0, "%s", ce_.msg);                                                  \
                return;                                                                    \
            }                                                                              \
        }                                                                                  \
    } while (0)

static __attribute__((unused)) int gt_bench(void)
{
    const char *s = getenv("DSV3_GPU_BENCH");
    return s && *s && *s != '0';
}

static __attribute__((unused)) float gt_uniform(float a)
{
    return (float)(((double)(test_rand() >> 11) * 0x1p-53 * 2.0 - 1.0) * a);
}

/* n values uniform in [-a, a], rounded to bf16 so CPU and GPU see the same numbers. */
static __attribute__((unused)) float *gt_rand_bf(size_t n, float a)
{
    float *x = malloc((n ? n : 1) * sizeof *x);
    for (size_t i = 0; i < n; i++)
        x[i] = gpu_bf2f(gpu_f2bf(gt_uniform(a)));
    return x;
}

static __attribute__((unused)) float *gt_zeros(size_t n)
{
    return calloc(n ? n : 1, sizeof(float));
}

/* A device copy of x as bf16 (arena). */
static __attribute__((unused)) gpu_bf16 *gt_up_bf(const float *x, size_t n)
{
    dsv3_err e;
    gpu_bf16 *h = malloc((n ? n : 1) * 2), *d = gpu_arena_alloc(gt_ctx_, n * 2 + 2, &e);
    for (size_t i = 0; i < n; i++)
        h[i] = gpu_f2bf(x[i]);
    if (!d || gpu_upload(gt_ctx_, d, h, n * 2, &e)) {
        fprintf(stderr, "    upload: %s\n", e.msg);
        free(h);
        return NULL;
    }
    free(h);
    return d;
}

/* A device copy of n bytes (fp32, int32). */
static __attribute__((unused)) void *gt_up(const void *x, size_t bytes)
{
    dsv3_err e;
    void *d = gpu_arena_alloc(gt_ctx_, bytes + 4, &e);
    if (!d || gpu_upload(gt_ctx_, d, x, bytes, &e)) {
        fprintf(stderr, "    upload: %s\n", e.msg);
        return NULL;
    }
    return d;
}

/* A device buffer of bytes, every byte 0xff (NaN as bf16 and fp32): unwritten shows. */
static __attribute__((unused)) void *gt_poisoned(size_t bytes)
{
    dsv3_err e;
    void *d = gpu_arena_alloc(gt_ctx_, bytes + 4, &e);
    if (!d || gpu_memset(gt_ctx_, d, 0xff, bytes, &e))
        return NULL;
    return d;
}

static __attribute__((unused)) float *gt_down_bf(const gpu_bf16 *d, size_t n)
{
    dsv3_err e;
    gpu_bf16 *h = malloc((n ? n : 1) * 2);
    float *x = malloc((n ? n : 1) * sizeof *x);
    if (gpu_download(gt_ctx_, h, d, n * 2, &e))
        fprintf(stderr, "    download: %s\n", e.msg);
    for (size_t i = 0; i < n; i++)
        x[i] = gpu_bf2f(h[i]);
    free(h);
    return x;
}

static __attribute__((unused)) float *gt_down_f(const float *d, size_t n)
{
    dsv3_err e;
    float *x = malloc((n ? n : 1) * sizeof *x);
    if (gpu_download(gt_ctx_, x, d, n * 4, &e))
        fprintf(stderr, "    download: %s\n", e.msg);
    return x;
}

static __attribute__((unused)) double gt_relerr(const float *out, const float *ref, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        if (isnan(out[i]) || isinf(out[i]))
            return INFINITY;
        double d = (double)out[i] - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* The worst error a test saw per name, for the gpu-check table. */
static __attribute__((unused)) void gt_stat(const char *name, double err, double bound)
{
    printf("# stat %-30s %9.2e %9.0e %s\n", name, err, bound, err <= bound ? "pass" : "FAIL");
    CHECKF(err <= bound, "%s: relative error %.3e over the bound %.0e", name, err, bound);
}

static __attribute__((unused)) void gt_reset(size_t mark)
{
    gpu_arena_reset(gt_ctx_, mark);
}

#endif
