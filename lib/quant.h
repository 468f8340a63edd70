/* quant: FP8 checkpoints in DeepSeek-V3's released format, and back.
 *
 * quant_folder with dequant 0 quantizes the linear weights DeepSeek quantizes
 * (layout_is_fp8: attention projections and dense, routed- and shared-expert MLPs, the MTP
 * modules' blocks included) to FP8 E4M3 with one float32 weight_scale_inv per 128x128
 * block (lib/fp8: scale = block amax / 448, round to nearest even, saturate, smaller edge
 * blocks), stored right after its weight; every other tensor is written in BF16 except
 * mlp.gate.e_score_correction_bias, which stays F32 as in DeepSeek's release (it only
 * chooses experts, where a BF16 rounding could change the choice). config.json gains
 * DeepSeek's quantization_config, which transformers reads as fine-grained FP8.
 * With dequant 1, each FP8 weight becomes BF16 by DeepSeek's formula, bf16(f32(q) * s),
 * the scales and quantization_config are dropped and the other tensors are copied as they
 * are. A NaN or infinity in a weight is an error naming the tensor and element. The output
 * keeps the input's files: the same shard names, each with the same tensors in the same
 * order, and an index when the input had one. One tensor at a time (lib/ststream), into a
 * lib/outdir folder; the block quantization runs on all threads. */
#ifndef DSV3_QUANT_H
#define DSV3_QUANT_H

#include <stdint.h>

#include "cli.h"
#include "err.h"

typedef struct quant_opts {
    int dequant;
    int force;      /* replace an existing output folder */
    int threads;    /* <= 0: all processors */
    cli_progress_mode progress;
} quant_opts;

typedef struct quant_stats {
    uint64_t in_bytes, out_bytes;  /* tensor data read and written */
    int n_quant;                   /* weights quantized (or dequantized) */
    int n_tensors;                 /* tensors written */
    int n_files;                   /* safetensors files written */
} quant_stats;

int quant_folder(const char *in, const char *out, const quant_opts *o, quant_stats *st,
                 dsv3_err *e);

#endif
