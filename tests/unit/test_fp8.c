/* lib/fp8: E4M3 decoding of every code against the format's definition, encoding against a
 * brute-force nearest-value search (ties to even, saturation), and the block quantization
 * on ragged shapes: scales from the block amax, the error bound of E4M3 rounding, the same
 * bytes on any number of threads, NaN/Inf refused with the first bad index. */
#include <math.h>

#include "../../lib/fp8.h"
#include "../../lib/safetensors.h"
#include "../test.h"

static double by_definition(int c)
{
    int s = c >> 7, e = (c >> 3) & 15, m = c & 7;
    double v = e == 0 ? ldexp(m / 8.0, -6) : ldexp(1 + m / 8.0, e - 7);
    return s ? -v : v;
}

static void decodes_every_code(void)
{
    for (int c = 0; c < 256; c++) {
        float v = fp8_e4m3_to_f32((uint8_t)c);
        if ((c & 0x7F) == 0x7F)
            CHECKF(isnan(v), "code %#x should be NaN", c);
        else
            CHECKF(v == (float)by_definition(c) && !!signbit(v) == (c >= 128), "code %#x: %g", c, v);
    }
    CHECK(fp8_e4m3_to_f32(0x7E) == 448.0f && fp8_e4m3_to_f32(0x01) == 0x1p-9f);
}

static void encodes_every_value_back(void)
{
    for (int c = 0; c < 256; c++)
        if ((c & 0x7F) != 0x7F)
            CHECKF(fp8_e4m3_from_f32(fp8_e4m3_to_f32((uint8_t)c)) == c, "code %#x", c);
    CHECK(fp8_e4m3_from_f32(NAN) == 0x7F);
    CHECK(fp8_e4m3_from_f32(INFINITY) == 0x7E && fp8_e4m3_from_f32(-INFINITY) == 0xFE);
    CHECK(fp8_e4m3_from_f32(1e30f) == 0x7E && fp8_e4m3_from_f32(-500.0f) == 0xFE);
}

/* The nearest finite E4M3 value to x, ties to the even code, beyond 448 saturated. */
static int brute_nearest(double x)
{
    int best = -1;
    double bd = INFINITY;
    for (int c = 0; c < 0x7F; c++) {   /* magnitudes; the sign is applied after */
        double d = fabs(fabs(x) - by_definition(c));
        if (d < bd || (d == bd && !(c & 1)))
            bd = d, best = c;
    }
    return best | (signbit(x) ? 0x80 : 0);
}

static void rounds_to_nearest_even(void)
{
    int bad = 0;
    for (int i = 0; i < 200000 && bad < 5; i++) {
        /* log-uniform over the whole range, below the smallest subnormal to past 448 */
        double mag = ldexp(1.0 + (double)(test_rand() >> 11) * 0x1p-53, (int)(test_rand() % 24) - 14);
        float x = (float)((test_rand() & 1) ? -mag : mag);
        int want = brute_nearest(x), got = fp8_e4m3_from_f32(x);
        if (want != got) {
            CHECKF(0, "x=%a: got %#x want %#x", x, got, want);
            bad++;
        }
    }
    /* every midpoint between neighbours is a tie and must go to the even code */
    for (int c = 0; c < 0x7E; c++) {
        float mid = (float)((by_definition(c) + by_definition(c + 1)) / 2);
        int want = (c & 1) ? c + 1 : c;
        CHECKF(fp8_e4m3_from_f32(mid) == want, "midpoint of %#x,%#x", c, c + 1);
        CHECKF(fp8_e4m3_from_f32(-mid) == (want | 0x80), "-midpoint of %#x", c);
    }
}

static float frand(void)
{
    return (float)((double)(test_rand() >> 11) * 0x1p-53 * 2 - 1);
}

static void weight_blocks_on_ragged_shapes(void)
{
    int64_t shapes[][2] = {{1, 1}, {128, 128}, {127, 129}, {300, 257}, {129, 1}, {5, 640}};
    for (size_t k = 0; k < sizeof shapes / sizeof *shapes; k++) {
        int64_t R = shapes[k][0], C = shapes[k][1], nb = fp8_blocks(R) * fp8_blocks(C);
        float *w = malloc(R * C * sizeof *w), *back = malloc(R * C * sizeof *back);
        float *s1 = malloc(nb * sizeof *s1), *s3 = malloc(nb * sizeof *s3);
        uint8_t *q1 = malloc(R * C), *q3 = malloc(R * C);
        /* blocks of very different magnitudes, one block all zeros */
        for (int64_t i = 0; i < R * C; i++) {
            int64_t blk = (i / C / 128) * fp8_blocks(C) + (i % C) / 128;
            w[i] = blk == 1 ? 0 : frand() * ldexpf(1, (int)(blk % 7) * 3 - 9);
        }
        int64_t badi;
        REQUIRE(fp8_quant_weight(w, R, C, q1, s1, 1, &badi) == 0 && badi == -1);
        REQUIRE(fp8_quant_weight(w, R, C, q3, s3, 3, &badi) == 0);
        CHECKF(!memcmp(q1, q3, R * C) && !memcmp(s1, s3, nb * sizeof *s1), "threads differ");
        for (int64_t b = 0; b < nb; b++) {   /* the scale is the block amax / 448 */
            int64_t br = b / fp8_blocks(C), bc = b % fp8_blocks(C);
            float amax = 0;
            for (int64_t r = br * 128; r < R && r < br * 128 + 128; r++)
                for (int64_t c = bc * 128; c < C && c < bc * 128 + 128; c++)
                    amax = fmaxf(amax, fabsf(w[r * C + c]));
            CHECKF(s1[b] == (amax > 0 ? amax / 448.0f : 1.0f), "block %lld scale", (long long)b);
        }
        fp8_dequant_weight(q1, s1, R, C, back, 2);
        for (int64_t i = 0; i < R * C; i++) {
            float s = s1[(i / C / 128) * fp8_blocks(C) + (i % C) / 128];
            /* half an ulp of 3 mantissa bits, or half the smallest subnormal step, times s */
            double bound = fmax(fabs(w[i]) * 0x1p-4, s * 0x1p-10) * (1 + 1e-6);
            CHECKF(fabs((double)back[i] - w[i]) <= bound, "%lldx%lld i=%lld: %g vs %g",
                   (long long)R, (long long)C, (long long)i, back[i], w[i]);
            /* dequantization is exactly DeepSeek's formula: f32(q) * scale_inv */
            CHECKF(back[i] == fp8_e4m3_to_f32(q1[i]) * s, "formula");
            if (test_failed_)
                break;
        }
        free(w), free(back), free(s1), free(s3), free(q1), free(q3);
    }
}

static void activation_tiles_per_row(void)
{
    int64_t R = 7, C = 300, nb = R * fp8_blocks(C);
    float x[7 * 300], back[7 * 300], s[7 * 3];
    uint8_t q[7 * 300];
    for (int64_t i = 0; i < R * C; i++)
        x[i] = frand() * (float)(1 + i / C * 100);
    int64_t bad;
    REQUIRE(fp8_quant_act(x, R, C, q, s, 2, &bad) == 0);
    for (int64_t t = 0; t < nb; t++) {
        int64_t r = t / 3, c0 = (t % 3) * 128;
        float amax = 0;
        for (int64_t c = c0; c < C && c < c0 + 128; c++)
            amax = fmaxf(amax, fabsf(x[r * C + c]));
        CHECK(s[t] == amax / 448.0f);
    }
    fp8_dequant_act(q, s, R, C, back, 1);
    for (int64_t i = 0; i < R * C; i++)
        CHECK(back[i] == fp8_e4m3_to_f32(q[i]) * s[(i / C) * 3 + (i % C) / 128]);
}

static void non_finite_is_refused(void)
{
    float w[300 * 200];
    for (int i = 0; i < 300 * 200; i++)
        w[i] = frand();
    w[250 * 200 + 7] = NAN;
    w[260 * 200 + 1] = INFINITY;
    uint8_t q[300 * 200];
    float s[3 * 2];
    int64_t bad;
    CHECK(fp8_quant_weight(w, 300, 200, q, s, 3, &bad) == -1 && bad == 250 * 200 + 7);
    w[250 * 200 + 7] = 0;
    CHECK(fp8_quant_weight(w, 300, 200, q, s, 1, &bad) == -1 && bad == 260 * 200 + 1);
}

/* tests/fixtures/fp8/torch_ref.bin, made by scripts/ref-fp8.py with PyTorch on the device:
 * torch's float8_e4m3fn conversion and DeepSeek's block formula, compared bit for bit. */
static void matches_torch_and_deepseeks_formula(void)
{
    FILE *f = fopen("tests/fixtures/fp8/torch_ref.bin", "rb");
    if (!f)
        SKIP("no tests/fixtures/fp8/torch_ref.bin (scripts/ref-fp8.py makes it)");
    char magic[8];
    uint32_t n = 0, R = 0, C = 0;
    REQUIRE(fread(magic, 8, 1, f) == 1 && !memcmp(magic, "FP8REF1", 8));
    REQUIRE(fread(&n, 4, 1, f) == 1 && n > 0 && n < 10000000);
    float *x = malloc(n * sizeof *x);
    uint8_t *q = malloc(n);
    REQUIRE(fread(x, sizeof *x, n, f) == n && fread(q, 1, n, f) == n);
    int bad = 0;
    for (uint32_t i = 0; i < n && bad < 5; i++)
        if (fp8_e4m3_from_f32(x[i]) != q[i]) {
            CHECKF(0, "x=%a: ours %#x, torch %#x", x[i], fp8_e4m3_from_f32(x[i]), q[i]);
            bad++;
        }
    REQUIRE(fread(&R, 4, 1, f) == 1 && fread(&C, 4, 1, f) == 1 && R * C < 10000000);
    int64_t nb = fp8_blocks(R) * fp8_blocks(C);
    float *w = malloc((size_t)R * C * 4), *s = malloc(nb * 4), *ours_s = malloc(nb * 4);
    float *back = malloc((size_t)R * C * 4);
    uint8_t *qw = malloc((size_t)R * C), *ours_q = malloc((size_t)R * C);
    uint16_t *deq = malloc((size_t)R * C * 2);
    REQUIRE(fread(w, 4, (size_t)R * C, f) == (size_t)R * C &&
            fread(qw, 1, (size_t)R * C, f) == (size_t)R * C &&
            fread(s, 4, nb, f) == (size_t)nb && fread(deq, 2, (size_t)R * C, f) == (size_t)R * C);
    int64_t badi;
    REQUIRE(fp8_quant_weight(w, R, C, ours_q, ours_s, 2, &badi) == 0);
    CHECK(!memcmp(ours_s, s, nb * 4));
    CHECK(!memcmp(ours_q, qw, (size_t)R * C));
    fp8_dequant_weight(qw, s, R, C, back, 2);
    size_t diff = 0;
    for (size_t i = 0; i < (size_t)R * C; i++)
        diff += st_f32_to_bf16(back[i]) != deq[i];
    CHECKF(diff == 0, "%zu of %u dequantized bf16 values differ from DeepSeek's formula", diff,
           R * C);
    printf("# %u conversions and a %ux%u block quantization equal torch's\n", n, R, C);
    free(x), free(q), free(w), free(s), free(ours_s), free(back), free(qw), free(ours_q), free(deq);
    fclose(f);
}

int main(void)
{
    test_seed();
    RUN(decodes_every_code);
    RUN(encodes_every_value_back);
    RUN(rounds_to_nearest_even);
    RUN(weight_blocks_on_ragged_shapes);
    RUN(activation_tiles_per_row);
    RUN(non_finite_is_refused);
    RUN(matches_torch_and_deepseeks_formula);
    TEST_EXIT();
}
