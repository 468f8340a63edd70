/* fp8_quant: lib/fp8's quantisation rule in device code, one copy for kernels/fp8 and
 * kernels/moe_gemm_fp8, whose codes and scales must be bitwise lib/fp8's.
 *
 * That rests on three things: the amax is exact (a max of absolute values), s = amax / 448
 * and x / s are IEEE float divisions (no fast math: __fdiv_rn spells it out), and the
 * hardware conversion cvt.rn.satfinite.e4m3x2.f32 rounds to nearest even and saturates at
 * 448 like fp8_e4m3_from_f32. A tile of zeros gets scale 1. */
#ifndef DSV3_FP8_QUANT_CUH
#define DSV3_FP8_QUANT_CUH

#include <cuda_fp8.h>
#include <stdint.h>

#include "../lib/fp8.h"

__device__ __forceinline__ float fp8_tile_scale(float amax)
{
    return amax > 0.0f ? __fdiv_rn(amax, FP8_E4M3_MAX) : 1.0f;
}

__device__ __forceinline__ uint8_t fp8_code(float x, float s)
{
    return (uint8_t)__nv_cvt_float_to_fp8(__fdiv_rn(x, s), __NV_SATFINITE, __NV_E4M3);
}

/* Two codes at once, a in the low byte. */
__device__ __forceinline__ uint32_t fp8_code2(float a, float b, float s)
{
    return (uint32_t)__nv_cvt_float2_to_fp8x2(make_float2(__fdiv_rn(a, s), __fdiv_rn(b, s)),
                                              __NV_SATFINITE, __NV_E4M3);
}

/* Four codes, a in the lowest byte. */
__device__ __forceinline__ uint32_t fp8_code4(float a, float b, float c, float d, float s)
{
    return fp8_code2(a, b, s) | (fp8_code2(c, d, s) << 16);
}

/* The amax of a half-warp's 1x128 tile, eight values a lane, in every lane of the half (the
 * shuffles, xor 8 down to 1, stay inside it; all 32 lanes must call). */
__device__ __forceinline__ float fp8_amax_half(const float (&v)[8])
{
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; i++)
        amax = fmaxf(amax, fabsf(v[i]));
    for (int o = 8; o > 0; o >>= 1)
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    return amax;
}

#endif
