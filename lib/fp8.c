/* fp8: E4M3 conversion and block-scaled quantization. See fp8.h. */
#include "fp8.h"

#include <math.h>
#include <pthread.h>
#include <string.h>
#include <unistd.h>

/* Rounds |x| (finite, not above 448 after saturation) to the nearest E4M3 magnitude code,
 * ties to even, working on the float's bits so no rounding happens in float arithmetic. */
static uint8_t e4m3_magnitude(float ax)
{
    uint32_t u;
    memcpy(&u, &ax, sizeof u);
    int e = (int)(u >> 23) - 127;          /* unbiased exponent of ax */
    uint32_t m = u & 0x7FFFFF;             /* 23 mantissa bits */
    if (ax == 0.0f)
        return 0;
    if (e < -6) {                          /* subnormal in E4M3: units of 2^-9 */
        if (e < -10)                       /* below half the smallest subnormal: 0 */
            return 0;
        uint32_t full = (m | 0x800000);    /* 24-bit significand, value full * 2^(e-23) */
        int shift = (-9) - (e - 23);       /* to units of 2^-9 */
        uint32_t q = full >> shift, rem = full & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1)))
            q++;
        return (uint8_t)q;                 /* q == 8 is the smallest normal, code 0x08 */
    }
    uint32_t q = m >> 20, rem = m & 0xFFFFF, half = 0x80000;
    uint32_t code = ((uint32_t)(e + 7) << 3) | q;
    if (rem > half || (rem == half && (q & 1)))
        code++;                            /* a mantissa carry moves into the exponent */
    return code > 0x7E ? 0x7E : (uint8_t)code;
}

uint8_t fp8_e4m3_from_f32(float x)
{
    if (isnan(x))
        return 0x7F;
    uint8_t sign = signbit(x) ? 0x80 : 0;
    float ax = fabsf(x);
    if (ax >= FP8_E4M3_MAX)
        return sign | 0x7E;
    return sign | e4m3_magnitude(ax);
}

float fp8_e4m3_to_f32(uint8_t q)
{
    int s = q >> 7, e = (q >> 3) & 0xF, m = q & 7;
    float v;
    if (e == 0xF && m == 7)
        return NAN;
    if (e == 0)
        v = ldexpf((float)m, -9);
    else
        v = ldexpf((float)(8 + m), e - 10);
    return s ? -v : v;
}

/* ---- blocks ----------------------------------------------------------------------------- */

typedef struct quant_job {
    const float *x;
    uint8_t *q;
    float *scale;
    const uint8_t *qin;
    const float *sin;
    float *out;
    int64_t rows, cols, br;      /* br: rows per block (128 weights, 1 activations) */
    int64_t first, last;         /* block rows of this thread */
    int64_t bad;                 /* first non-finite index, or -1 */
} quant_job;

static void quant_block(quant_job *j, int64_t r0, int64_t c0)
{
    int64_t r1 = r0 + j->br < j->rows ? r0 + j->br : j->rows;
    int64_t c1 = c0 + FP8_BLOCK < j->cols ? c0 + FP8_BLOCK : j->cols;
    float amax = 0;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t c = c0; c < c1; c++) {
            float v = j->x[r * j->cols + c];
            if (!isfinite(v)) {
                if (j->bad < 0 || r * j->cols + c < j->bad)
                    j->bad = r * j->cols + c;
                return;
            }
            amax = fabsf(v) > amax ? fabsf(v) : amax;
        }
    float s = amax > 0 ? amax / FP8_E4M3_MAX : 1.0f;
    j->scale[(r0 / j->br) * fp8_blocks(j->cols) + c0 / FP8_BLOCK] = s;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t c = c0; c < c1; c++)
            j->q[r * j->cols + c] = fp8_e4m3_from_f32(j->x[r * j->cols + c] / s);
}

static void *quant_rows(void *arg)
{
    quant_job *j = arg;
    for (int64_t b = j->first; b < j->last; b++)
        for (int64_t c0 = 0; c0 < j->cols; c0 += FP8_BLOCK)
            quant_block(j, b * j->br, c0);
    return NULL;
}

static void *dequant_rows(void *arg)
{
    quant_job *j = arg;
    int64_t nbc = fp8_blocks(j->cols);
    for (int64_t r = j->first * j->br; r < j->last * j->br && r < j->rows; r++)
        for (int64_t c = 0; c < j->cols; c++)
            j->out[r * j->cols + c] = fp8_e4m3_to_f32(j->qin[r * j->cols + c]) *
                                      j->sin[(r / j->br) * nbc + c / FP8_BLOCK];
    return NULL;
}

/* Runs fn over the block rows on up to `threads` threads; returns the smallest bad index. */
static int64_t run_blocks(quant_job proto, int threads, void *(*fn)(void *))
{
    int64_t nbr = (proto.rows + proto.br - 1) / proto.br;
    if (threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        threads = n > 0 ? (int)n : 1;
    }
    if (threads > 64)
        threads = 64;
    if (threads > nbr)
        threads = nbr > 0 ? (int)nbr : 1;
    quant_job job[64];
    pthread_t th[64];
    int started[64] = {0};
    for (int t = 0; t < threads; t++) {
        job[t] = proto;
        job[t].first = nbr * t / threads, job[t].last = nbr * (t + 1) / threads;
        job[t].bad = -1;
        started[t] = t > 0 && pthread_create(&th[t], NULL, fn, &job[t]) == 0;
    }
    for (int t = 0; t < threads; t++)
        if (!started[t])
            fn(&job[t]);   /* thread 0, and any thread that could not be started */
    int64_t bad = -1;
    for (int t = 0; t < threads; t++) {
        if (started[t])
            pthread_join(th[t], NULL);
        if (job[t].bad >= 0 && (bad < 0 || job[t].bad < bad))
            bad = job[t].bad;
    }
    return bad;
}

static int quant(const float *x, int64_t rows, int64_t cols, int64_t br, uint8_t *q,
                 float *scale, int threads, int64_t *bad_index)
{
    quant_job p = {.x = x, .q = q, .scale = scale, .rows = rows, .cols = cols, .br = br};
    int64_t bad = run_blocks(p, threads, quant_rows);
    if (bad_index)
        *bad_index = bad;
    return bad >= 0 ? -1 : 0;
}

int fp8_quant_weight(const float *w, int64_t rows, int64_t cols, uint8_t *q, float *scale_inv,
                     int threads, int64_t *bad_index)
{
    return quant(w, rows, cols, FP8_BLOCK, q, scale_inv, threads, bad_index);
}

int fp8_quant_act(const float *x, int64_t rows, int64_t cols, uint8_t *q, float *scale_inv,
                  int threads, int64_t *bad_index)
{
    return quant(x, rows, cols, 1, q, scale_inv, threads, bad_index);
}

void fp8_dequant_weight(const uint8_t *q, const float *scale_inv, int64_t rows, int64_t cols,
                        float *w, int threads)
{
    quant_job p = {.qin = q, .sin = scale_inv, .out = w, .rows = rows, .cols = cols,
                   .br = FP8_BLOCK};
    run_blocks(p, threads, dequant_rows);
}

void fp8_dequant_act(const uint8_t *q, const float *scale_inv, int64_t rows, int64_t cols,
                     float *x, int threads)
{
    quant_job p = {.qin = q, .sin = scale_inv, .out = x, .rows = rows, .cols = cols, .br = 1};
    run_blocks(p, threads, dequant_rows);
}
