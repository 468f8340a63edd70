/* fp8: the FP8 E4M3 number format and DeepSeek-V3's block-scaled quantization, on the CPU.
 *
 * E4M3 as DeepSeek and HF use it ("e4m3fn"): 1 sign, 4 exponent (bias 7), 3 mantissa bits,
 * no infinities, 0x7F/0xFF NaN, largest finite 448, smallest subnormal 2^-9. Conversion
 * from float rounds to nearest, ties to even, and saturates at ±448.
 *
 * Weights are quantized in 128x128 blocks (edge blocks smaller where a dimension is not a
 * multiple of 128) with one float32 per block, `weight_scale_inv` = block amax / 448 as in
 * DeepSeek's released checkpoints: q = e4m3(w / s), w ≈ f32(q) · s. Activations use 1x128
 * tiles along a row with the same rule. A block of zeros gets scale 1 (DeepSeek's formula
 * would divide by zero). This module is the reference the GPU quantization kernels and
 * dsv3-quant are checked against. */
#ifndef DSV3_FP8_H
#define DSV3_FP8_H

#include <stddef.h>
#include <stdint.h>

#define FP8_E4M3_MAX 448.0f
#define FP8_BLOCK 128

uint8_t fp8_e4m3_from_f32(float x);
float fp8_e4m3_to_f32(uint8_t q);

/* Number of blocks along a dimension of n elements. */
static inline int64_t fp8_blocks(int64_t n) { return (n + FP8_BLOCK - 1) / FP8_BLOCK; }

/* w [rows x cols] row-major float32 → q [rows x cols] and scale_inv
 * [fp8_blocks(rows) x fp8_blocks(cols)]. Returns -1 (and *bad_index) if w holds a NaN or
 * infinity, which no scale can represent. threads <= 0: all processors. */
int fp8_quant_weight(const float *w, int64_t rows, int64_t cols, uint8_t *q, float *scale_inv,
                     int threads, int64_t *bad_index);

/* q and scale_inv as above → w float32 (each element f32(q) · its block's scale). */
void fp8_dequant_weight(const uint8_t *q, const float *scale_inv, int64_t rows, int64_t cols,
                        float *w, int threads);

/* Activations: x [rows x cols] → q and scale_inv [rows x fp8_blocks(cols)], one scale per
 * 1x128 tile of a row (V3's online activation scaling). */
int fp8_quant_act(const float *x, int64_t rows, int64_t cols, uint8_t *q, float *scale_inv,
                  int threads, int64_t *bad_index);
void fp8_dequant_act(const uint8_t *q, const float *scale_inv, int64_t rows, int64_t cols,
                     float *x, int threads);

#endif
