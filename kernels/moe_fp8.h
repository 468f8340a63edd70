/* moe_fp8: the routed experts' grouped GEMMs in FP8, as DeepSeek-V3 trains them.
 *
 * Operands E4M3 with DeepSeek-V3's block scaling: activations and gradients one fp32 scale
 * per 1x128 tile along the GEMM's reduction, expert weights one per 128x128 block; the
 * products accumulate each 128-long K block on the tensor cores and are promoted into fp32
 * accumulators with that block's scales (V3's "promotion every K block"). Our own Hopper
 * kernel (kernels/moe_gemm_fp8.cu: wgmma m64n128k32 e4m3, 64x128 tiles, one K block a
 * stage; DSV3_MOE_FP8_KERNEL=0/1/2/3 picks a variant for comparison, 3 the warp-specialised
 * persistent one with TMA loads), grouped like
 * kernels/moe_gemm's bf16 one: experts' row offsets read on the device, worst-case grid, no
 * host synchronisation.
 *
 *   fprop  out[rows_e, O] = in[rows_e, I] . W_e^T   in 1x128 along I (quant_rows), W_e 128x128
 *   dgrad  d_in[rows_e, I] = d_out . W_e           d_out 1x128 along O, W_e^T 128x128 (qt)
 *   wgrad  d_W_e[O, I] += d_out^T . in              both 1x128 along the tokens of expert e
 *
 * wgrad reduces over an expert's rows, whose count is no multiple of 128: its operands are
 * quantised into "token tiles" that start at each expert's first row (no tile straddles two
 * experts), stored transposed [cols x ldk] with tile t in columns 128t .. 128t+127 (rows past
 * the expert's end are zero codes), ldk = 128 * gpu_moe_fp8_tiles(rows, E). Scales of the
 * 1x128 tiles: [blocks x rows] (quant_rows) and [tiles x cols] (token tiles); weights
 * [E][fp8_blocks(O)][fp8_blocks(I)], shared by the codes and their transpose.
 *
 * Quantisation follows lib/fp8 bit for bit (s = amax / 448, RN, saturating). Sizes: I and O
 * multiples of 16, 16-byte aligned buffers; Hopper (sm_90a) only: gpu_moe_fp8_fits. */
#ifndef DSV3_KERNELS_MOE_FP8_H
#define DSV3_KERNELS_MOE_FP8_H

#include "moe.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The most token tiles rows sorted rows over E experts can need. */
static inline int64_t gpu_moe_fp8_tiles(int64_t rows, int64_t E) { return rows / 128 + E; }

/* 1 when the FP8 kernels take this shape on this context's GPU. */
int gpu_moe_fp8_fits(gpu_ctx *c, int I, int O);

/* x [rows x cols] -> q [rows x cols], s [fp8_blocks(cols) x rows]. cols % 16 == 0. */
int gpu_moe_fp8_quant_rows(gpu_ctx *c, uint8_t *q, float *s, const gpu_bf16 *x, int rows,
                           int cols, dsv3_err *e);
/* Both of the above from one read of x [N*k sorted rows x cols]: q, s as quant_rows gives
 * them (for the rows the experts own), qt, st as quant_tokens_t (tstart filled). */
int gpu_moe_fp8_quant_both(gpu_ctx *c, const gpu_moe_plan *p, const int *tstart, uint8_t *q,
                           float *s, uint8_t *qt, float *st, const gpu_bf16 *x, int cols,
                           dsv3_err *e);
/* tstart[E+1]: expert x's token tiles are tstart[x] .. tstart[x+1]-1. */
int gpu_moe_fp8_tile_starts(gpu_ctx *c, const gpu_moe_plan *p, int *tstart, dsv3_err *e);
/* x [N*k sorted rows x cols] -> qt [cols x ldk] and st [tiles x cols] (see above). */
int gpu_moe_fp8_quant_tokens_t(gpu_ctx *c, const gpu_moe_plan *p, const int *tstart,
                               uint8_t *qt, float *st, const gpu_bf16 *x, int cols,
                               dsv3_err *e);
/* W [E, O, I] -> q [E, O, I] and/or qt [E, I, O] (either may be NULL), s as above. */
int gpu_moe_fp8_quant_weights(gpu_ctx *c, uint8_t *q, uint8_t *qt, float *s,
                              const gpu_bf16 *W, int E, int O, int I, dsv3_err *e);

/* The GEMMs on quantised operands (layouts above). */
int gpu_moe_fp8_gemm_fwd(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *out, const uint8_t *xq,
                         const float *xs, const uint8_t *wq, const float *ws, int I, int O,
                         dsv3_err *e);
int gpu_moe_fp8_gemm_dgrad(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *d_in,
                           const uint8_t *dyq, const float *dys, const uint8_t *wtq,
                           const float *ws, int I, int O, dsv3_err *e);
int gpu_moe_fp8_gemm_wgrad(gpu_ctx *c, const gpu_moe_plan *p, const int *tstart, float *d_W,
                           const uint8_t *dytq, const float *dyts, const uint8_t *xtq,
                           const float *xts, int I, int O, dsv3_err *e);

/* The three products from bf16 operands, gpu_moe_linear_*'s arguments: each call quantises
 * what it reads into a scratch buffer of its own (sized by gpu_moe_fp8_init for up to
 * max_rows sorted rows, E experts and I, O up to max_dim) and runs the FP8 GEMM; shapes the
 * kernels or the scratch do not take go to the bf16 grouped GEMM. */
typedef struct gpu_moe_fp8_w gpu_moe_fp8_w; /* one weight's kept codes (moe_gemm_fp8.cu) */

typedef struct gpu_moe_fp8 {
    int on;
    uint8_t *buf;
    size_t bytes;
    int64_t max_rows, max_dim;
    int E;
    /* Shapes with min(I, O) below min_dim take the bf16 grouped GEMM (0: none do): where
     * the FP8 GEMM and its quantisations cost more than the bf16 product (gmodel's policy). */
    int min_dim;
    /* keep (gmodel's choice; 0, the default: every call quantises what it reads afresh):
     * - each weight's codes (both layouts) are kept, keyed by its pointer and shape, and
     *   made again only after gpu_moe_fp8_weights_changed (the caller promises to call it
     *   whenever the bf16 weights are written);
     * - a forward that a backward follows (gpu_moe_fp8_new_pass) quantises its input in
     *   one read both ways (gpu_moe_fp8_quant_both): rows for the product, token tiles for
     *   the wgrad, which are kept with the weight's entry until that wgrad reads them (same
     *   input pointer, rows and pass);
     * - a dgrad quantises d_out both ways likewise, and a wgrad that directly follows it
     *   with the same d_out and shape reads the token tiles from the scratch.
     * Every code is the one the uncached calls compute, so no result changes. */
    int keep;
    unsigned wgen, pass;
    int keep_inputs;
    gpu_moe_fp8_w *w;
    int n_w, cap_w;
    const void *last_dy; /* dgrad's d_out, its token tiles in buf, until the next call ... */
    int64_t last_rows;
    int last_O, last_w;  /* ... its shape and weight's entry */
} gpu_moe_fp8;

/* Sizes the scratch; min_dim, keep and the kept codes are left as they are. */
int gpu_moe_fp8_init(gpu_moe_fp8 *m, int64_t max_rows, int E, int64_t max_dim, dsv3_err *e);
void gpu_moe_fp8_free(gpu_moe_fp8 *m);
/* The bf16 expert weights were written: kept codes are made again on next use. */
void gpu_moe_fp8_weights_changed(gpu_moe_fp8 *m);
/* A new forward begins (new inputs); backward: whether a backward will follow it. */
void gpu_moe_fp8_new_pass(gpu_moe_fp8 *m, int backward);
/* 1 when a product of this shape runs in FP8 (on, Hopper, multiples of 16, min_dim). */
int gpu_moe_fp8_takes(gpu_ctx *c, const gpu_moe_fp8 *m, int I, int O);
int gpu_moe_fp8_fwd(gpu_ctx *c, gpu_moe_fp8 *m, const gpu_moe_plan *p, gpu_bf16 *out,
                    const gpu_bf16 *in, const gpu_bf16 *W, int I, int O, dsv3_err *e);
int gpu_moe_fp8_dgrad(gpu_ctx *c, gpu_moe_fp8 *m, const gpu_moe_plan *p, gpu_bf16 *d_in,
                      const gpu_bf16 *d_out, const gpu_bf16 *W, int I, int O, dsv3_err *e);
int gpu_moe_fp8_wgrad(gpu_ctx *c, gpu_moe_fp8 *m, const gpu_moe_plan *p, float *d_W,
                      const gpu_bf16 *d_out, const gpu_bf16 *in, int I, int O, dsv3_err *e);

#ifdef __cplusplus
}
#endif

#endif
