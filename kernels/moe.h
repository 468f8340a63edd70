/* moe: the DeepSeekMoE layer's routing and expert dispatch on the GPU.
 *
 * Router (one kernel): lib/ops router_forward for every token. Dispatch: the N*k
 * (token, slot) assignments are sorted by expert (stable, so each expert's rows keep token
 * order), rows gathered into that order, each expert's contiguous rows multiplied by its
 * weights in one grouped GEMM launch (kernels/moe_gemm.cu: never one launch per expert), and
 * the outputs combined back per token with the router weights in slot order (no atomics:
 * bitwise reproducible).
 *
 * The grouped GEMM reads each expert's row offsets on the device: nothing in the layer waits
 * for the host (gpu_moe_plan_offsets reads them back when the host wants them); backward
 * reuses the plan. */
#ifndef DSV3_MOE_H
#define DSV3_MOE_H

#include "gpuctx.h"

#ifdef __cplusplus
extern "C" {
#endif

/* logits[N,E] fp32 -> idx[N,k] (int32), w[N,k] fp32, s[N,E] fp32 (sigmoid, for backward).
 * Limits: E <= 1024, n_group <= 32, k <= 32, E divisible by n_group. */
int gpu_router_fwd(gpu_ctx *c, int32_t *idx, float *w, float *s, const float *logits,
                   const float *bias, int N, int E, int n_group, int topk_group, int k,
                   int norm, float scale, dsv3_err *e);
/* d_logits[N,E] += from d_w[N,k], routing held fixed. */
int gpu_router_bwd(gpu_ctx *c, float *d_logits, const float *d_w, const int32_t *idx,
                   const float *s, int N, int E, int k, int norm, float scale, dsv3_err *e);

/* The dispatch order of one layer's N*k assignments. Device arrays from the arena of the
 * caller's step. */
typedef struct gpu_moe_plan {
    int N, k, E;
    int32_t *order; /* [N*k] sorted position -> assignment a = n*k + slot */
    int32_t *pos;   /* [N*k] assignment -> sorted position */
    int *offsets;   /* [E+1] expert e owns sorted rows offsets[e] .. offsets[e+1]-1 */
    int *offsets_host; /* a host copy, made (synchronising) only for the cuBLAS path */
} gpu_moe_plan;

/* Fills p from idx[N,k], queued on the stream (no wait for the host, unless the cuBLAS
 * path is selected: gpu_moe_set_gemm). */
int gpu_moe_plan_make(gpu_ctx *c, gpu_moe_plan *p, const int32_t *idx, int N, int k, int E,
                      dsv3_err *e);
/* Copies the E+1 offsets to the host (synchronising). */
int gpu_moe_plan_offsets(gpu_ctx *c, const gpu_moe_plan *p, int *offsets, dsv3_err *e);
void gpu_moe_plan_free(gpu_moe_plan *p);

/* x_perm[N*k, H] = x[order[i] / k]: each token's row once per chosen expert. */
int gpu_moe_gather(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *x_perm, const gpu_bf16 *x,
                   int H, dsv3_err *e);
/* d_x[n] = beta * d_x[n] + sum over slots of d_x_perm[pos[n*k + slot]] (slot order). */
int gpu_moe_gather_bwd(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *d_x, float beta,
                       const gpu_bf16 *d_x_perm, int H, dsv3_err *e);
/* out[n] = beta * out[n] + sum over slots of w[n, slot] * y_perm[pos[n*k + slot]]. */
int gpu_moe_combine(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *out, float beta,
                    const gpu_bf16 *y_perm, const float *w, int H, dsv3_err *e);
/* d_y_perm[i] = w[a] * d_out[a / k], d_w[a] = d_out[a / k] . y_perm[i] (a = order[i]). */
int gpu_moe_combine_bwd(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *d_y_perm, float *d_w,
                        const gpu_bf16 *d_out, const gpu_bf16 *y_perm, const float *w, int H,
                        dsv3_err *e);

/* Grouped linear over the sorted rows, expert weights W[E, O, I] (row-major per expert):
 * fwd: out[rows_e, O] = in[rows_e, I] . W_e^T;  dgrad: d_in = d_out . W_e;
 * wgrad: d_W_e (fp32) += d_out^T . in (experts with no rows are left as they are), the fp32
 * sum added as it is. Our kernel needs I and O multiples of 8 and 16-byte aligned bases;
 * other shapes go through the cuBLAS path below. */
int gpu_moe_linear_fwd(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *out, const gpu_bf16 *in,
                       const gpu_bf16 *W, int I, int O, dsv3_err *e);
int gpu_moe_linear_dgrad(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *d_in,
                         const gpu_bf16 *d_out, const gpu_bf16 *W, int I, int O, dsv3_err *e);
int gpu_moe_linear_wgrad(gpu_ctx *c, const gpu_moe_plan *p, float *d_W, const gpu_bf16 *d_out,
                         const gpu_bf16 *in, int I, int O, dsv3_err *e);
/* The grouped GEMM's implementation, for comparison (a context starts with DEFAULT, or
 * with the number in the environment variable DSV3_MOE_GEMM):
 * DEFAULT: WS_TMA on Hopper (the fastest in scripts/bench-moe.sh, docs/PERF.md), MMA elsewhere; WGMMA: our Hopper kernel (wgmma) on
 * unswizzled tiles; MMA: our mma.sync kernel; CUBLAS: cuBLAS's grouped batched GEMM (host-side sizes: one synchronising
 * read of the offsets per layer; wgrad's increment rounded to bf16 once, since it has no
 * fp32 output for bf16 operands; arena E*O*I*2 bytes); WGMMA_PIPE: the wgmma kernel with
 * one stage's products left in flight across the next barrier; WGMMA_SW: that with
 * 128-byte swizzled tiles; WS: those tiles in a persistent, warp-specialised kernel (a
 * loading warpgroup, two multiplying ones, mbarrier pipeline); WS_TMA: that kernel with its
 * loads issued by one thread to the copy engine (TMA, tensor maps made per call). */
enum { GPU_MOE_GEMM_DEFAULT = 0, GPU_MOE_GEMM_CUBLAS = 1, GPU_MOE_GEMM_MMA = 2,
       GPU_MOE_GEMM_WGMMA = 3, GPU_MOE_GEMM_WGMMA_PIPE = 4, GPU_MOE_GEMM_WGMMA_SW = 5,
       GPU_MOE_GEMM_WS = 6, GPU_MOE_GEMM_WS_TMA = 7 };
void gpu_moe_set_gemm(gpu_ctx *c, int variant);

#ifdef __cplusplus
}
#endif

#endif
