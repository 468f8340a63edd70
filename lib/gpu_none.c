/* The GPU modules of a build without nvcc: no devices, and a clear message for any use.
 * Every function of the kernels/ headers is here, so programs and tests link either way. */
#include "../kernels/fp8gemm.h"
#include "../kernels/fp8lin.h"
#include "../kernels/gemm.h"
#include "../kernels/gep.h"
#include "../kernels/gepopt.h"
#include "../kernels/gpu.h"
#include "../kernels/gpuctx.h"
#include "../kernels/layers.h"
#include "../kernels/loss.h"
#include "../kernels/mla.h"
#include "../kernels/moe.h"
#include "../kernels/moe_fp8.h"
#include "../kernels/optim.h"
#include "../kernels/attention.h"
#include "../kernels/sort.h"
#include "../kernels/ginfer.h"
#include "../kernels/ginfer_mtp.h"
#include "../kernels/latency.h"

#include <stdlib.h>

/* The stubs take the real signatures and use none of their arguments. */
#pragma GCC diagnostic ignored "-Wunused-parameter"

int gpu_compiled(void)
{
    return 0;
}

int gpu_count(void)
{
    return 0;
}

static int no_cuda(dsv3_err *e)
{
    return err_set(e, "this dsv3 was built without CUDA (nvcc was not found at build time)");
}

int gpu_describe(int dev, gpu_props *p, dsv3_err *e)
{
    return no_cuda(e);
}

int gpu_copy_roundtrip(int dev, const float *in, float *out, size_t n, dsv3_err *e)
{
    return no_cuda(e);
}

int gpu_copy_bandwidth(int dev, size_t bytes, int iters, double *gbs, dsv3_err *e)
{
    return no_cuda(e);
}

/* gpuctx */
int gpu_ctx_create(gpu_ctx **c, int dev, size_t arena_bytes, dsv3_err *e)
{
    *c = NULL;
    return no_cuda(e);
}
void gpu_ctx_destroy(gpu_ctx *c) {}
void *gpu_ctx_stream(gpu_ctx *c) { return NULL; }
int gpu_sync(gpu_ctx *c, dsv3_err *e) { return no_cuda(e); }
void *gpu_arena_alloc(gpu_ctx *c, size_t bytes, dsv3_err *e)
{
    no_cuda(e);
    return NULL;
}
size_t gpu_arena_mark(const gpu_ctx *c) { return 0; }
void gpu_arena_reset(gpu_ctx *c, size_t mark) {}
size_t gpu_arena_peak(const gpu_ctx *c) { return 0; }
void *gpu_malloc(size_t bytes, dsv3_err *e)
{
    no_cuda(e);
    return NULL;
}
void gpu_free(void *p) {}
int gpu_upload(gpu_ctx *c, void *dst, const void *src, size_t bytes, dsv3_err *e) { return no_cuda(e); }
int gpu_download(gpu_ctx *c, void *dst, const void *src, size_t bytes, dsv3_err *e) { return no_cuda(e); }
int gpu_memset(gpu_ctx *c, void *dst, int v, size_t bytes, dsv3_err *e) { return no_cuda(e); }
int gpu_f32_to_bf16(gpu_ctx *c, gpu_bf16 *dst, const float *src, int64_t n, dsv3_err *e) { return no_cuda(e); }
int gpu_bf16_to_f32(gpu_ctx *c, float *dst, const gpu_bf16 *src, int64_t n, dsv3_err *e) { return no_cuda(e); }
int gpu_timer_start(gpu_ctx *c, gpu_timer *t, dsv3_err *e) { return no_cuda(e); }
int gpu_timer_stop(gpu_ctx *c, gpu_timer *t, float *ms, dsv3_err *e) { return no_cuda(e); }

int gpu_capture_begin(gpu_ctx *c, dsv3_err *e) { return no_cuda(e); }
int gpu_capture_end(gpu_ctx *c, gpu_graph **g, dsv3_err *e)
{
    *g = NULL;
    return no_cuda(e);
}
int gpu_graph_launch(gpu_ctx *c, gpu_graph *g, dsv3_err *e) { return no_cuda(e); }
void gpu_graph_destroy(gpu_graph *g) {}

/* gemm */
int gpu_gemm(gpu_ctx *c, int ta, int tb, int M, int N, int K, float alpha, const gpu_bf16 *A,
             int lda, const gpu_bf16 *B, int ldb, float beta, void *C, int ldc, int c_f32,
             dsv3_err *e) { return no_cuda(e); }
int gpu_linear_fwd(gpu_ctx *c, gpu_bf16 *out, const gpu_bf16 *in, const gpu_bf16 *w, int N,
                   int I, int O, float beta, dsv3_err *e) { return no_cuda(e); }
int gpu_linear_dgrad(gpu_ctx *c, gpu_bf16 *d_in, const gpu_bf16 *d_out, const gpu_bf16 *w,
                     int N, int I, int O, float beta, dsv3_err *e) { return no_cuda(e); }
int gpu_linear_wgrad(gpu_ctx *c, float *d_w, const gpu_bf16 *d_out, const gpu_bf16 *in, int N,
                     int I, int O, float beta, dsv3_err *e) { return no_cuda(e); }

/* layers */
int gpu_rmsnorm_fwd(gpu_ctx *c, gpu_bf16 *out, float *rstd, const gpu_bf16 *in,
                    const gpu_bf16 *w, int N, int D, float eps, dsv3_err *e) { return no_cuda(e); }
int gpu_rmsnorm_bwd(gpu_ctx *c, gpu_bf16 *d_in, float beta, float *d_w, const gpu_bf16 *d_out,
                    const gpu_bf16 *in, const gpu_bf16 *w, const float *rstd, int N, int D,
                    float eps, dsv3_err *e) { return no_cuda(e); }
int gpu_rope_fwd(gpu_ctx *c, gpu_bf16 *x, int count, int stride, int per_pos, const int *pos,
                 const float *cos_t, const float *sin_t, int half, int interleave, dsv3_err *e) { return no_cuda(e); }
int gpu_rope_bwd(gpu_ctx *c, gpu_bf16 *dx, int count, int stride, int per_pos, const int *pos,
                 const float *cos_t, const float *sin_t, int half, int interleave, dsv3_err *e) { return no_cuda(e); }
int gpu_swiglu_fwd(gpu_ctx *c, gpu_bf16 *h, const gpu_bf16 *g, const gpu_bf16 *u, int rows,
                   int cols, int ld, dsv3_err *e) { return no_cuda(e); }
int gpu_swiglu_bwd(gpu_ctx *c, gpu_bf16 *d_g, gpu_bf16 *d_u, const gpu_bf16 *d_h,
                   const gpu_bf16 *g, const gpu_bf16 *u, int rows, int cols, int ld,
                   dsv3_err *e) { return no_cuda(e); }
int gpu_embedding_fwd(gpu_ctx *c, gpu_bf16 *out, const gpu_bf16 *table, const int32_t *ids,
                      int N, int H, dsv3_err *e) { return no_cuda(e); }
int gpu_embedding_bwd(gpu_ctx *c, float *d_table, const gpu_bf16 *d_out, const int32_t *ids,
                      int N, int H, int V, dsv3_err *e) { return no_cuda(e); }

/* sort */
int gpu_sort_pairs(gpu_ctx *c, int32_t *keys_out, int32_t *vals_out, const int32_t *keys_in,
                   const int32_t *vals_in, int n, int key_end, dsv3_err *e) { return no_cuda(e); }

/* loss */
int gpu_crossentropy_rows(gpu_ctx *c, float *losses, gpu_bf16 *d_logits, const float *logits,
                          const int32_t *targets, int R, int V, float scale, dsv3_err *e) { return no_cuda(e); }
int gpu_lm_head_loss(gpu_ctx *c, float *losses, gpu_bf16 *d_hidden, float *d_w,
                     const gpu_bf16 *hidden, const gpu_bf16 *w, const int32_t *targets, int N,
                     int H, int V, float scale, int chunk_rows, dsv3_err *e) { return no_cuda(e); }
int gpu_crossentropy_rows_variant(gpu_ctx *c, int variant, float *losses, gpu_bf16 *d_logits,
                                  const float *logits, const int32_t *targets, int R, int V,
                                  float scale, dsv3_err *e) { return no_cuda(e); }
int gpu_lm_head_chunk_rows(int N, int V) { return N < 64 ? N : 64; }

/* mla */
int gpu_add_bf16(gpu_ctx *c, gpu_bf16 *out, const gpu_bf16 *a, const gpu_bf16 *b, int64_t n,
                 dsv3_err *e) { return no_cuda(e); }
int gpu_mla_assemble(gpu_ctx *c, gpu_bf16 *k, gpu_bf16 *v, const gpu_bf16 *kvb,
                     const gpu_bf16 *kva, int N, int nh, int nope, int rope, int dv, int kv,
                     dsv3_err *e) { return no_cuda(e); }
int gpu_mla_assemble_bwd(gpu_ctx *c, gpu_bf16 *dkvb, gpu_bf16 *dkva, const gpu_bf16 *dk,
                         const gpu_bf16 *dv, int N, int nh, int nope, int rope, int dvd, int kv,
                         dsv3_err *e) { return no_cuda(e); }

/* optim */
int gpu_tensor_list_create(gpu_ctx *c, gpu_tensor_list **out, int n, float *const *param,
                           float *const *grad, gpu_bf16 *const *m, gpu_bf16 *const *v,
                           gpu_bf16 *const *param_bf16, const int64_t *numel, const int *decay,
                           dsv3_err *e)
{
    *out = NULL;
    return no_cuda(e);
}
void gpu_tensor_list_destroy(gpu_tensor_list *l) {}
int gpu_grad_norm(gpu_ctx *c, const gpu_tensor_list *l, float *d_norm, dsv3_err *e) { return no_cuda(e); }
int gpu_adamw_step(gpu_ctx *c, const gpu_tensor_list *l, const gpu_adamw_hp *hp,
                   const float *d_norm, dsv3_err *e) { return no_cuda(e); }

/* moe */
int gpu_router_fwd(gpu_ctx *c, int32_t *idx, float *w, float *s, const float *logits,
                   const float *bias, int N, int E, int n_group, int topk_group, int k,
                   int norm, float scale, dsv3_err *e) { return no_cuda(e); }
int gpu_router_bwd(gpu_ctx *c, float *d_logits, const float *d_w, const int32_t *idx,
                   const float *s, int N, int E, int k, int norm, float scale, dsv3_err *e) { return no_cuda(e); }
int gpu_moe_plan_make(gpu_ctx *c, gpu_moe_plan *p, const int32_t *idx, int N, int k, int E,
                      dsv3_err *e)
{
    memset(p, 0, sizeof *p);
    return no_cuda(e);
}
int gpu_moe_plan_offsets(gpu_ctx *c, const gpu_moe_plan *p, int *offsets, dsv3_err *e) { return no_cuda(e); }
void gpu_moe_plan_free(gpu_moe_plan *p) {}
void gpu_moe_set_gemm(gpu_ctx *c, int variant) {}
int gpu_moe_gather(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *x_perm, const gpu_bf16 *x,
                   int H, dsv3_err *e) { return no_cuda(e); }
int gpu_moe_gather_bwd(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *d_x, float beta,
                       const gpu_bf16 *d_x_perm, int H, dsv3_err *e) { return no_cuda(e); }
int gpu_moe_combine(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *out, float beta,
                    const gpu_bf16 *y_perm, const float *w, int H, dsv3_err *e) { return no_cuda(e); }
int gpu_moe_combine_bwd(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *d_y_perm, float *d_w,
                        const gpu_bf16 *d_out, const gpu_bf16 *y_perm, const float *w, int H,
                        dsv3_err *e) { return no_cuda(e); }
int gpu_moe_linear_fwd(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *out, const gpu_bf16 *in,
                       const gpu_bf16 *W, int I, int O, dsv3_err *e) { return no_cuda(e); }
int gpu_moe_linear_dgrad(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *d_in,
                         const gpu_bf16 *d_out, const gpu_bf16 *W, int I, int O, dsv3_err *e) { return no_cuda(e); }
int gpu_moe_linear_wgrad(gpu_ctx *c, const gpu_moe_plan *p, float *d_W, const gpu_bf16 *d_out,
                         const gpu_bf16 *in, int I, int O, dsv3_err *e) { return no_cuda(e); }

/* attention */
int gpu_attention_fwd(gpu_ctx *c, gpu_bf16 *out, float *lse, const gpu_bf16 *q,
                      const gpu_bf16 *k, const gpu_bf16 *v, int B, int T, int nh, int dk,
                      int dv, float scale, dsv3_err *e) { return no_cuda(e); }
int gpu_attention_bwd(gpu_ctx *c, gpu_bf16 *d_q, gpu_bf16 *d_k, gpu_bf16 *d_v,
                      const gpu_bf16 *d_out, const gpu_bf16 *out, const float *lse,
                      const gpu_bf16 *q, const gpu_bf16 *k, const gpu_bf16 *v, int B, int T,
                      int nh, int dk, int dv, float scale, dsv3_err *e) { return no_cuda(e); }
int gpu_attention_fwd_seg(gpu_ctx *c, gpu_bf16 *out, float *lse, const gpu_bf16 *q,
                          const gpu_bf16 *k, const gpu_bf16 *v, const int32_t *seg, int B,
                          int T, int nh, int dk, int dv, float scale, dsv3_err *e)
{
    return no_cuda(e);
}
int gpu_attention_bwd_seg(gpu_ctx *c, gpu_bf16 *d_q, gpu_bf16 *d_k, gpu_bf16 *d_v,
                          const gpu_bf16 *d_out, const gpu_bf16 *out, const float *lse,
                          const gpu_bf16 *q, const gpu_bf16 *k, const gpu_bf16 *v,
                          const int32_t *seg, int B, int T, int nh, int dk, int dv, float scale,
                          dsv3_err *e)
{
    return no_cuda(e);
}
void gpu_attention_set_variant(gpu_ctx *c, int fwd_variant) {}
void gpu_attention_set_nondet(gpu_ctx *c, int nondet) {}
size_t gpu_attention_bwd_arena_bytes(int B, int T, int nh, int dk, int dv, int nondet) { return 0; }

/* kernels/gmodel.h */
/* FP8 grouped expert GEMMs (kernels/moe_fp8.h) */
int gpu_moe_fp8_fits(gpu_ctx *c, int I, int O) { return 0; }
int gpu_moe_fp8_quant_rows(gpu_ctx *c, uint8_t *q, float *s, const gpu_bf16 *x, int rows,
                           int cols, dsv3_err *e) { return no_cuda(e); }
int gpu_moe_fp8_tile_starts(gpu_ctx *c, const gpu_moe_plan *p, int *tstart, dsv3_err *e)
{
    return no_cuda(e);
}
int gpu_moe_fp8_quant_tokens_t(gpu_ctx *c, const gpu_moe_plan *p, const int *tstart,
                               uint8_t *qt, float *st, const gpu_bf16 *x, int cols,
                               dsv3_err *e) { return no_cuda(e); }
int gpu_moe_fp8_quant_both(gpu_ctx *c, const gpu_moe_plan *p, const int *tstart, uint8_t *q,
                           float *s, uint8_t *qt, float *st, const gpu_bf16 *x, int cols,
                           dsv3_err *e) { return no_cuda(e); }
int gpu_moe_fp8_quant_weights(gpu_ctx *c, uint8_t *q, uint8_t *qt, float *s,
                              const gpu_bf16 *W, int E, int O, int I, dsv3_err *e)
{
    return no_cuda(e);
}
int gpu_moe_fp8_gemm_fwd(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *out, const uint8_t *xq,
                         const float *xs, const uint8_t *wq, const float *ws, int I, int O,
                         dsv3_err *e) { return no_cuda(e); }
int gpu_moe_fp8_gemm_dgrad(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *d_in,
                           const uint8_t *dyq, const float *dys, const uint8_t *wtq,
                           const float *ws, int I, int O, dsv3_err *e) { return no_cuda(e); }
int gpu_moe_fp8_gemm_wgrad(gpu_ctx *c, const gpu_moe_plan *p, const int *tstart, float *d_W,
                           const uint8_t *dytq, const float *dyts, const uint8_t *xtq,
                           const float *xts, int I, int O, dsv3_err *e) { return no_cuda(e); }
int gpu_moe_fp8_init(gpu_moe_fp8 *m, int64_t max_rows, int E, int64_t max_dim, dsv3_err *e)
{
    return no_cuda(e);
}
void gpu_moe_fp8_free(gpu_moe_fp8 *m) {}
void gpu_moe_fp8_weights_changed(gpu_moe_fp8 *m) {}
void gpu_moe_fp8_new_pass(gpu_moe_fp8 *m, int backward) {}
int gpu_moe_fp8_fwd(gpu_ctx *c, gpu_moe_fp8 *m, const gpu_moe_plan *p, gpu_bf16 *out,
                    const gpu_bf16 *in, const gpu_bf16 *W, int I, int O, dsv3_err *e)
{
    return no_cuda(e);
}
int gpu_moe_fp8_dgrad(gpu_ctx *c, gpu_moe_fp8 *m, const gpu_moe_plan *p, gpu_bf16 *d_in,
                      const gpu_bf16 *d_out, const gpu_bf16 *W, int I, int O, dsv3_err *e)
{
    return no_cuda(e);
}
int gpu_moe_fp8_wgrad(gpu_ctx *c, gpu_moe_fp8 *m, const gpu_moe_plan *p, float *d_W,
                      const gpu_bf16 *d_out, const gpu_bf16 *in, int I, int O, dsv3_err *e)
{
    return no_cuda(e);
}

#include "../kernels/gmodel.h"

int gmodel_create(gmodel **out, const dsv3_model *m, int B, int T, int dev, dsv3_err *e)
{
    *out = NULL;
    return no_cuda(e);
}

int gmodel_create_opt(gmodel **out, const dsv3_model *m, int B, int T, int dev, unsigned flags,
                      dsv3_err *e)
{
    *out = NULL;
    return no_cuda(e);
}

void gmodel_destroy(gmodel *g)
{
}

gpu_ctx *gmodel_ctx(gmodel *g)
{
    return NULL;
}

int gmodel_set_params(gmodel *g, const float *params, dsv3_err *e)
{
    return no_cuda(e);
}

int gmodel_forward(gmodel *g, const int32_t *ids, const int32_t *targets, int grad,
                   float *loss, dsv3_err *e)
{
    return no_cuda(e);
}

int gmodel_backward(gmodel *g, dsv3_err *e)
{
    return no_cuda(e);
}

int gmodel_zero_grad(gmodel *g, dsv3_err *e)
{
    return no_cuda(e);
}

int gmodel_scale_grads(gmodel *g, float f, dsv3_err *e)
{
    return no_cuda(e);
}

int gmodel_get_grads(gmodel *g, float *grads, dsv3_err *e)
{
    return no_cuda(e);
}

int gmodel_expert_load(const gmodel *g, int l, int64_t *counts)
{
    return -1;
}
int gmodel_take_stats(gmodel *g, double *loss_sum, int64_t *loads, dsv3_err *e)
{
    return no_cuda(e);
}

size_t gmodel_arena_peak(const gmodel *g)
{
    return 0;
}

int gmodel_set_range(gmodel *g, const float *params, size_t off, size_t n, dsv3_err *e)
{
    return no_cuda(e);
}

int gmodel_optim_init(gmodel *g, const uint16_t *m, const uint16_t *v, dsv3_err *e)
{
    return no_cuda(e);
}

int gmodel_grad_norm(gmodel *g, float *norm, dsv3_err *e)
{
    return no_cuda(e);
}

int gmodel_adamw(gmodel *g, float lr, float beta1, float beta2, float eps, float weight_decay,
                 float clip, int step, dsv3_err *e)
{
    return no_cuda(e);
}

int gmodel_sync_host(gmodel *g, float *params, uint16_t *m, uint16_t *v, dsv3_err *e)
{
    return no_cuda(e);
}

int gmodel_row_losses(const gmodel *g, float *out)
{
    return -1;
}

int gmodel_ep_attach(gmodel *g, struct ep *p, struct comm *dev, dsv3_err *e)
{
    return no_cuda(e);
}

int gmodel_ep_idle(gmodel *g, int mtp, int backward, dsv3_err *e)
{
    return no_cuda(e);
}

int64_t gmodel_ep_rows(const gmodel *g, int blk)
{
    return 0;
}

int gmodel_ep_take_time(gmodel *g, int64_t *n, double *ms, double *bytes, dsv3_err *e)
{
    return no_cuda(e);
}

int gmodel_moe_fp8(const gmodel *g)
{
    return 0;
}

/* ---- gep ---- */

int gep_create(gep **out, struct ep *p, struct comm *dev, gpu_ctx *c, int n_blocks, int H,
               int mi, dsv3_err *e)
{
    *out = NULL;
    return no_cuda(e);
}

void gep_destroy(gep *q)
{
}

void gep_set_fp8(gep *q, struct gpu_moe_fp8 *m)
{
}

int gep_forward(gep *q, int blk, const gpu_moe_plan *plan, const gpu_bf16 *xp, gpu_bf16 *yp,
                const gpu_bf16 *W1, const gpu_bf16 *W2, dsv3_err *e)
{
    return no_cuda(e);
}

int gep_backward(gep *q, int blk, const gpu_bf16 *dyp, gpu_bf16 *dxp, const gpu_bf16 *W1,
                 const gpu_bf16 *W2, float *dW1, float *dW2, dsv3_err *e)
{
    return no_cuda(e);
}

int64_t gep_rows(const gep *q, int blk)
{
    return 0;
}

int gep_take_time(gep *q, int64_t *n, double *ms, double *bytes, dsv3_err *e)
{
    return no_cuda(e);
}

/* ---- fp8, fp8gemm ---- */

int gpu_fp8_quant_act(gpu_ctx *c, uint8_t *q, float *s, const gpu_bf16 *x, int rows, int cols,
                      dsv3_err *e)
{
    return no_cuda(e);
}

int gpu_fp8_quant_act_t(gpu_ctx *c, uint8_t *qt, float *st, const gpu_bf16 *x, int rows,
                        int cols, dsv3_err *e)
{
    return no_cuda(e);
}

int gpu_fp8_quant_act_both(gpu_ctx *c, uint8_t *q, float *s, uint8_t *qt, float *st,
                           const gpu_bf16 *x, int rows, int cols, dsv3_err *e)
{
    return no_cuda(e);
}

int gpu_fp8_swiglu_quant(gpu_ctx *c, gpu_bf16 *h, uint8_t *q, float *s, uint8_t *qt, float *st,
                         const gpu_bf16 *g, const gpu_bf16 *u, int rows, int cols, int ld,
                         dsv3_err *e)
{
    return no_cuda(e);
}

int gpu_fp8_quant_weight(gpu_ctx *c, uint8_t *q, float *s, uint8_t *qt, float *st,
                         const float *w, int rows, int cols, dsv3_err *e)
{
    return no_cuda(e);
}

int gpu_fp8_quant_weight_bf16(gpu_ctx *c, uint8_t *q, float *s, uint8_t *qt, float *st,
                              const gpu_bf16 *w, int rows, int cols, dsv3_err *e)
{
    return no_cuda(e);
}

int gpu_fp8_gemm(gpu_ctx *c, int M, int N, int K, const uint8_t *A, const float *sa, int a_mode,
                 const uint8_t *B, const float *sb, int b_mode, float beta, void *C, int c_f32,
                 int flags, dsv3_err *e)
{
    return no_cuda(e);
}

int gpu_fp8_linear_fwd(gpu_ctx *c, gpu_bf16 *out, const uint8_t *xq, const float *xs,
                       const uint8_t *wq, const float *ws, int N, int I, int O, float beta,
                       dsv3_err *e)
{
    return no_cuda(e);
}

int gpu_fp8_linear_dgrad(gpu_ctx *c, gpu_bf16 *d_in, const uint8_t *dyq, const float *dys,
                         const uint8_t *wtq, const float *wts, int N, int I, int O, float beta,
                         dsv3_err *e)
{
    return no_cuda(e);
}

int gpu_fp8_linear_wgrad(gpu_ctx *c, float *d_w, const uint8_t *dytq, const float *dyts,
                         const uint8_t *xtq, const float *xts, int N, int I, int O, float beta,
                         dsv3_err *e)
{
    return no_cuda(e);
}

int gmodel_set_fp8(gmodel *g, int on, dsv3_err *e)
{
    return no_cuda(e);
}

int gmodel_fp8_min_dim(const gmodel *g)
{
    return -1;
}

int gmodel_set_fp8_min_dim(gmodel *g, int min_dim)
{
    (void)g, (void)min_dim;
    return -1;
}

int gpu_lin_fp8_on(gpu_lin *L, int64_t max_tokens, int64_t max_dim, dsv3_err *e)
{
    return no_cuda(e);
}

void gpu_lin_free(gpu_lin *L)
{
}

int gpu_lin_fwd(gpu_lin *L, gpu_bf16 *out, const gpu_bf16 *in, const gpu_bf16 *w, int N, int I,
                int O, float beta, dsv3_err *e)
{
    return no_cuda(e);
}

void gpu_lin_weights_changed(gpu_lin *L) {}
void gpu_lin_new_pass(gpu_lin *L, int backward) {}

int gpu_lin_swiglu_fwd(gpu_lin *L, gpu_bf16 *out, gpu_bf16 *h, const gpu_bf16 *g,
                       const gpu_bf16 *u, int ld, const gpu_bf16 *w, int N, int I, int O,
                       float beta, dsv3_err *e)
{
    return no_cuda(e);
}

int gpu_lin_dgrad(gpu_lin *L, gpu_bf16 *d_in, const gpu_bf16 *d_out, const gpu_bf16 *w, int N,
                  int I, int O, float beta, dsv3_err *e)
{
    return no_cuda(e);
}

int gpu_lin_wgrad(gpu_lin *L, float *d_w, const gpu_bf16 *d_out, const gpu_bf16 *in, int N,
                  int I, int O, float beta, dsv3_err *e)
{
    return no_cuda(e);
}

/* kernels/gmodel.h: data parallelism on device buffers */
void gmodel_set_bwd_hook(gmodel *g, gmodel_bwd_hook fn, void *ctx) {}
int gmodel_ready_points(const gmodel *g, size_t *pts) { return 0; }
int gmodel_dp_init(gmodel *g, size_t n_pad, size_t shard, int ns, const size_t *dev,
                   const size_t *sh, const size_t *len, const uint16_t *m, const uint16_t *v,
                   dsv3_err *e)
{
    return no_cuda(e);
}
void *gmodel_stream(gmodel *g) { return NULL; }
void *gmodel_dp_stream(gmodel *g) { return NULL; }
float *gmodel_dev_grads(gmodel *g) { return NULL; }
float *gmodel_dev_master(gmodel *g) { return NULL; }
float *gmodel_dp_gshard(gmodel *g) { return NULL; }
void *gmodel_dp_moment(gmodel *g, int which) { return NULL; }
int gmodel_scale_range(gmodel *g, size_t lo, size_t hi, float f, dsv3_err *e) { return no_cuda(e); }
int gmodel_dp_fence(gmodel *g, dsv3_err *e) { return no_cuda(e); }
int gmodel_dp_join(gmodel *g, dsv3_err *e) { return no_cuda(e); }
int gmodel_set_grad_norm(gmodel *g, float norm, dsv3_err *e) { return no_cuda(e); }
int gmodel_refresh_bf16(gmodel *g, dsv3_err *e) { return no_cuda(e); }
int gmodel_download_flat(gmodel *g, void *host, const void *dev, size_t es, dsv3_err *e)
{
    return no_cuda(e);
}
void *gmodel_dev_alloc(size_t bytes, dsv3_err *e)
{
    no_cuda(e);
    return NULL;
}

/* ginfer */
int ginfer_attn_run(const float *qlat, const float *qpe, const float *cache, int cf32,
                    const int *slot, const int *pos, int N, int nh, int kv, int rope, int n_ctx,
                    int n_slots, int nsplit, float scale, int warp_dot, int fused, float *olat,
                    dsv3_err *e)
{
    return no_cuda(e);
}
int ginfer_route_run(const float *x, const float *router, const float *bias, int N, int H, int E,
                     int G, int TG, int K, int norm, float scale, int ns, int one, float *logits,
                     float *rs, float *rw, int32_t *idx, int *off, int *order, int *spos,
                     dsv3_err *e)
{
    return no_cuda(e);
}
int ginfer_route1_norm_run(const float *x, const float *delta, const float *nw, float eps,
                           const float *router, const float *bias, int H, int E, int G, int TG,
                           int K, int norm, float scale, int ns, int fused, float *xo, float *xn,
                           float *logits, float *rs, float *rw, int32_t *idx, int *off,
                           int *order, int *spos, dsv3_err *e)
{
    return no_cuda(e);
}
int ginfer_argmax_run(const float *x, int N, int V, const uint8_t *ban, int32_t *out,
                      dsv3_err *e)
{
    return no_cuda(e);
}
int ginfer_draw_run(const float *x, int N, int V, const uint8_t *ban, int K, sampler_draw *draw,
                    int32_t *ids, dsv3_err *e)
{
    return no_cuda(e);
}
int ginfer_topk_run(const float *x, int N, int V, const uint8_t *ban, int K, int32_t *ids,
                    float *logits, double *us, dsv3_err *e)
{
    return no_cuda(e);
}
int ginfer_add_norm_run(float *x, const float *delta, const float *ye, const float *rw,
                        const int *spos, const float *ys, const float *w, int D, int K, float eps,
                        float *out, dsv3_err *e)
{
    return no_cuda(e);
}
int ginfer_gemv_run(const float *x, const float *w, int I, int O, int batch, int O1, float *y,
                    dsv3_err *e)
{
    return no_cuda(e);
}
int ginfer_lat_run(const float *x, const float *w, const float *ukT, int I, int nh, int qk,
                   int nope, int W, int kv, int lat, float *q, float *kva, float *qlat,
                   dsv3_err *e)
{
    return no_cuda(e);
}
int ginfer_grouped_run(const float *x, const float *w1, const float *w2, const int32_t *idx,
                       int E, int K, int sh, int H, int F, int wf32, int one, float *h, float *y,
                       dsv3_err *e)
{
    return no_cuda(e);
}
int ginfer_create(ginfer **out, const dsv3_model *m, int n_ctx, int n_slots, int dev, int exact,
                  dsv3_err *e)
{
    *out = NULL;
    return no_cuda(e);
}
int ginfer_create_dir(ginfer **out, const char *dir, int n_ctx, int n_slots, int dev,
                      dsv3_err *e)
{
    *out = NULL;
    return no_cuda(e);
}
void ginfer_destroy(ginfer *g) {}
void ginfer_dims(const ginfer *g, int *vocab, int *layers, int *width) {}
size_t ginfer_cache_bytes(const ginfer *g) { return 0; }
size_t ginfer_cache_bytes_per_token(const ginfer *g) { return 0; }
size_t ginfer_weight_bytes(const ginfer *g) { return 0; }
const char *ginfer_describe(const ginfer *g) { return "none"; }
int ginfer_forward(ginfer *g, int n, const int *slot, const int *pos, const int32_t *ids,
                   const uint8_t *want, float *logits, dsv3_err *e)
{
    return no_cuda(e);
}
int ginfer_forward_greedy(ginfer *g, int n, const int *slot, const int *pos,
                          const int32_t *ids, int32_t *out, dsv3_err *e)
{
    return no_cuda(e);
}
int ginfer_greedy_submit(ginfer *g, int n, const int *slot, const int *pos, const int32_t *ids,
                         dsv3_err *e)
{
    return no_cuda(e);
}
int ginfer_draw_submit(ginfer *g, int n, const int *slot, const int *pos, const int32_t *ids,
                       const sampler_draw *draw, dsv3_err *e)
{
    return no_cuda(e);
}
int ginfer_greedy_collect(ginfer *g, int32_t *out, dsv3_err *e) { return no_cuda(e); }
int ginfer_top_max(const ginfer *g) { return 0; }
int ginfer_forward_top(ginfer *g, int n, const int *slot, const int *pos, const int32_t *ids,
                       int K, int32_t *top_id, float *top_logit, dsv3_err *e)
{
    return no_cuda(e);
}
int ginfer_set_banned(ginfer *g, const uint8_t *ban, dsv3_err *e) { return no_cuda(e); }
long ginfer_graph_replays(const ginfer *g) { return 0; }
double ginfer_graph_seconds(const ginfer *g) { return 0; }
long ginfer_prefill_passes(const ginfer *g) { return 0; }
int ginfer_read_cache(ginfer *g, int layer, int slot, int pos0, int n, float *out, dsv3_err *e)
{
    return no_cuda(e);
}

/* ginfer_mtp */
int ginfer_create_mtp(ginfer **out, const dsv3_model *m, const char *dir, int n_ctx,
                      int n_slots, int dev, int exact, dsv3_err *e)
{
    *out = NULL;
    return no_cuda(e);
}
int ginfer_has_mtp(const ginfer *g) { return 0; }
int ginfer_decode_rows(const ginfer *g) { return 0; }
int ginfer_mtp_forward(ginfer *g, int n, const int *slot, const int *pos, const int32_t *next,
                       const uint8_t *want, float *logits, int32_t *out, dsv3_err *e)
{
    return no_cuda(e);
}

int gmodel_set_segments(gmodel *g, const int32_t *segment, const int32_t *position,
                        dsv3_err *e)
{
    return no_cuda(e);
}

void gmodel_losses(const gmodel *g, model_losses *out)
{
    memset(out, 0, sizeof *out);
}

int gmodel_mtp_expert_load(gmodel *g, int k, int64_t *counts, int64_t *slots, dsv3_err *e)
{
    return 1;
}

/* ---- gepopt ---- */

int gepopt_sum_replicas(float *dst, const float *src, size_t n, int R, void *stream,
                        dsv3_err *e)
{
    return no_cuda(e);
}

int gepopt_copy(void *dst, const void *src, size_t bytes, void *stream, dsv3_err *e)
{
    return no_cuda(e);
}

/* latency */
int gk_latency_probe(int n, gk_latency *out, dsv3_err *e)
{
    return no_cuda(e);
}
