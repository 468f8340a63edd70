/* sampler_draw: the pieces of lib/sampler's draw that a GPU runs too, written so that the host
 * (lib/sampler.c, C11) and a CUDA kernel (kernels/ginfer_k.cu) get the same bits.
 *
 * The draw's softmax needs exp; libm's and CUDA's are each within about an ulp but not the
 * same function, so a draw that falls on a probability boundary could differ between them.
 * sampler_exp uses only IEEE double adds and multiplies, each rounded once (on the device
 * through __dadd_rn / __dmul_rn, which nvcc never contracts into an FMA; host C11 in ISO mode
 * does not contract), floor and an exponent built from bits: the same value wherever it runs.
 * The random state is splitmix64's, one step a draw. */
#ifndef DSV3_SAMPLER_DRAW_H
#define DSV3_SAMPLER_DRAW_H

#include <stdint.h>

#include <math.h>
#include <string.h>

#ifdef __CUDACC__
#define SD_FN static __host__ __device__ __forceinline__
#else
#define SD_FN static inline
#endif

#if defined(__CUDA_ARCH__)
#define SD_MUL(a, b) __dmul_rn((a), (b))
#define SD_ADD(a, b) __dadd_rn((a), (b))
#else
#define SD_MUL(a, b) ((a) * (b))
#define SD_ADD(a, b) ((a) + (b))
#endif

/* exp(x) within ~2 ulp for x <= 709, 0 below -708 (where a softmax's terms vanish against its
 * largest, 1), NaN for NaN. k = round(x / ln 2), r = x - k ln 2 in two parts (Cody and Waite:
 * k ln2_hi is exact for |k| < 2^11), exp(r) by its Taylor series to r^13 (|r| <= 0.347: the
 * rest is below 1e-17 of it), times 2^k. */
SD_FN double sampler_exp(double x)
{
    if (x != x)
        return x;
    if (x < -708.0)
        return 0.0;
    if (x > 709.0)
        return (double)INFINITY;
    double k = floor(SD_ADD(SD_MUL(x, 1.4426950408889634), 0.5));
    double r = SD_ADD(SD_ADD(x, -SD_MUL(k, 6.93147180369123816490e-01)),
                      -SD_MUL(k, 1.90821492927058770002e-10));
    /* Horner from 1/13! down to 1/0! */
    double p = 1.6059043836821613e-10;
    p = SD_ADD(SD_MUL(p, r), 2.08767569878681e-09);
    p = SD_ADD(SD_MUL(p, r), 2.505210838544172e-08);
    p = SD_ADD(SD_MUL(p, r), 2.755731922398589e-07);
    p = SD_ADD(SD_MUL(p, r), 2.7557319223985893e-06);
    p = SD_ADD(SD_MUL(p, r), 2.48015873015873e-05);
    p = SD_ADD(SD_MUL(p, r), 0.0001984126984126984);
    p = SD_ADD(SD_MUL(p, r), 0.001388888888888889);
    p = SD_ADD(SD_MUL(p, r), 0.008333333333333333);
    p = SD_ADD(SD_MUL(p, r), 0.041666666666666664);
    p = SD_ADD(SD_MUL(p, r), 0.16666666666666666);
    p = SD_ADD(SD_MUL(p, r), 0.5);
    p = SD_ADD(SD_MUL(p, r), 1.0);
    p = SD_ADD(SD_MUL(p, r), 1.0);
    int64_t bits = ((int64_t)k + 1023) << 52;
    double s;
#if defined(__CUDA_ARCH__)
    s = __longlong_as_double((long long)bits);
#else
    memcpy(&s, &bits, sizeof s);
#endif
    return SD_MUL(p, s);
}

/* A uniform double in [0,1) from splitmix64 state *st, which it advances. */
SD_FN double sampler_splitmix(uint64_t *st)
{
    uint64_t z = (*st += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return (double)((z ^ (z >> 31)) >> 11) * 0x1p-53;
}

/* A sequence's draw as plain numbers (sampler_draw_of), for a draw made away from its
 * sampler: on the device, or queued ahead. Greedy (temp <= 0): the largest candidate. Else
 * lib/sampler's chain after its penalty (none here) over the top_k largest: top-p (top_p <
 * 1), min-p (min_p > 0, its cut from log_min_p = log(min_p), the host's), temperature, the
 * draw from rng. */
typedef struct sampler_draw {
    double temp, top_p, min_p, log_min_p;
    uint64_t rng; /* the state before the draw */
    int32_t top_k; /* 1 .. ; the candidates given */
    int32_t pad;
} sampler_draw;

#endif
