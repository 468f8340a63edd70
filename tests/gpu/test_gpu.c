/* GPU test of kernels/gpu: the copy path against the host data it came from, on fresh
 * random inputs of ragged sizes, and the measured bandwidth against the datasheet figure.
 * Skipped where there is no GPU. */
#include <math.h>

#include "../../kernels/gpu.h"
#include "../test.h"

static void device_is_described(void)
{
    if (gpu_count() == 0)
        SKIP("no GPU%s", gpu_compiled() ? "" : " (CPU-only build)");
    gpu_props p;
    dsv3_err e;
    REQUIRE(gpu_describe(0, &p, &e) == 0);
    printf("# %s, sm_%d%d, %d SMs, %.1f GiB, L2 %.0f MiB, datasheet %.0f GB/s\n", p.name,
           p.major, p.minor, p.sm_count, p.global_mem / 1073741824.0, p.l2_bytes / 1048576.0,
           p.peak_bw_gbs);
    CHECK(p.sm_count > 0 && p.global_mem > 0);
}

static void copy_roundtrip_is_exact(void)
{
    if (gpu_count() == 0)
        SKIP("no GPU");
    size_t sizes[] = {0, 1, 3, 4, 5, 1023, 4097, 1000003, (size_t)(test_rand() % 3000000)};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        size_t n = sizes[k];
        float *in = malloc((n + 1) * sizeof *in), *out = malloc((n + 1) * sizeof *out);
        for (size_t i = 0; i < n; i++)
            in[i] = (float)((double)(test_rand() >> 11) * 0x1p-53 * 2.0 - 1.0);
        dsv3_err e;
        CHECKF(gpu_copy_roundtrip(0, in, out, n, &e) == 0, "%s", e.msg);
        CHECKF(n == 0 || memcmp(in, out, n * sizeof *in) == 0, "n=%zu", n);
        free(in);
        free(out);
    }
}

static void bandwidth_is_near_the_datasheet(void)
{
    if (gpu_count() == 0)
        SKIP("no GPU");
    gpu_props p;
    dsv3_err e;
    double gbs;
    REQUIRE(gpu_describe(0, &p, &e) == 0);
    REQUIRE(gpu_copy_bandwidth(0, (size_t)1 << 30, 20, &gbs, &e) == 0);
    printf("# copy bandwidth %.0f GB/s (read+write), %.0f%% of datasheet %.0f GB/s\n", gbs,
           100 * gbs / p.peak_bw_gbs, p.peak_bw_gbs);
    /* A plain vectorised copy reaches well over half the datasheet rate on any recent GPU;
     * less means the kernel or the measurement is broken. */
    CHECK(gbs > 0.5 * p.peak_bw_gbs && gbs < 1.05 * p.peak_bw_gbs);
}

int main(void)
{
    test_seed();
    RUN(device_is_described);
    RUN(copy_roundtrip_is_exact);
    RUN(bandwidth_is_near_the_datasheet);
    TEST_EXIT();
}
