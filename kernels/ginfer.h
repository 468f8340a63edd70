/* ginfer: lib/infer's inference engine on the GPU (what sits behind infer_new_gpu).
 *
 * The same model and the same algorithm as lib/infer: per layer and token the cache holds only
 * the normalised latent c_kv (kv_lora_rank) and the rotated k_pe (qk_rope_head_dim); W_kvb is
 * absorbed into the query side (q_nope -> latent space, per head) and the output side (the
 * softmax-weighted latent through W_uv). Weights are bf16 on the device (fp32 with exact, for
 * tests) and every product accumulates in fp32; activations and the residual stream are fp32,
 * the cache bf16 (fp32 with exact). Norm weights and the router stay fp32 so that expert
 * choices match lib/infer's.
 *
 * Kernels (kernels/ginfer_k.cu, kernels/decode_attn.cu): the linear layers of a decode step
 * are warp-per-output-row GEMVs that read each weight row once for all the call's rows (bf16
 * 16-byte loads, fp32 sums); the MoE buckets the (row, k) assignments by expert on the device
 * and runs grouped GEMVs over the experts that have rows, so a step reads only the activated
 * experts' weights and never waits for the host; attention over the latent cache is split
 * over the sequence (flash-decoding: partial softmax per split, then a combine), all heads of
 * a group reading each cached latent once. Every output element is summed in an order that
 * does not depend on the other rows of the call or on the batch size, so a sequence's logits
 * are bitwise the same alone or batched.
 *
 * Launches are few where that was measured to matter (docs/PERF.md, batch-1 decode): q_a and
 * kv_a are one GEMV, a single shared expert is one more group of the grouped expert GEMVs
 * (which run only over the groups that have rows), the MoE output is summed inside the next
 * norm, and every decode graph ends with each row's greedy argmax (ginfer_forward_greedy
 * copies only the ids back). DSV3_GINFER_PROFILE prints each launch kind's device time;
 * DSV3_GINFER_NSPLIT=P (1..64) cuts each sequence's attention into P parts instead of
 * n_ctx / 32 (for timings: the parts' sums depend on P).
 * Decode-sized calls fuse further (DSV3_GINFER_FUSE, read at creation: 1 all, 0 none, else a
 * list of norm, attn, router, kvw, post, uvc, msum, qa; unset: router,kvw,uvc,qa, the ones
 * measured faster): the input and q_a norms computed inside the GEMVs
 * that read them (every block recomputes its rows' norm; the residual sum then happens in the
 * post-attention norm), the attention combine in the split kernel's last block, router GEMV +
 * top-k + bucketing in one launch (its last block), and the cache write in the q_lat GEMV's
 * launch: 16 launches a MoE layer become 10, each with the sums of before in their order;
 * "post": the post-attention norm inside the router's launch (every block normalises, the last
 * writes x and xn), "uvc": the attention combine inside the uv GEMV's blocks (each combines
 * its head; no block combines many heads), 9 a MoE layer at batch 1; "msum": the MoE
 * down-projection of decode-sized calls (at most 4 rows) adds each row's weighted expert
 * outputs to x itself (gk_down_sum, the sums of the unfused add_norm in its order), so no
 * MoE output is left pending for the next norm (which then reads one row, not K + 2);
 * "qa": the q_a norm alone inside q_b's GEMV at one row (each warp forms the norm itself).
 * On compute capability 9.0 and up the kernels are launched with programmatic dependent
 * launch (DSV3_GINFER_PDL=0 turns it off; "; PDL" in the description when on): each starts
 * while the one before runs, prefetches its weights into L2, and waits for that one before
 * reading its outputs (kernels/ginfer_k.cuh); the results are bitwise those without.
 *
 * A call's rows are (slot, pos, token); the caller (lib/infer) keeps the slot lengths. A call
 * of at most `max_batch` rows that wants every row's logits (a decode step) replays a CUDA
 * graph captured once per batch-size bucket (1, 2, 4, ... rows; the padding rows write into a
 * spare slot); other calls (prefill) run the kernels directly, in chunks of rows. */
#ifndef DSV3_GINFER_H
#define DSV3_GINFER_H

#include <stddef.h>
#include <stdint.h>

#include "../lib/err.h"

#ifdef __cplusplus
extern "C" {
#endif

#include "../lib/model.h"
#include "../lib/sampler_draw.h"

typedef struct ginfer ginfer;

/* An engine for model m (read at creation only) on device dev: n_slots sequences of up to
 * n_ctx tokens. exact: fp32 weights and cache (tests), else bf16. */
int ginfer_create(ginfer **out, const dsv3_model *m, int n_ctx, int n_slots, int dev, int exact,
                  dsv3_err *e);
/* The same from a checkpoint folder (lib/hfdir: config.json, safetensors, sharded or not),
 * bf16: the shards are memory-mapped and BF16 tensors copied to the device straight from the
 * mapping; F32 and F16 tensors are rounded to bf16, FP8 E4M3 ones with 128x128 block scales
 * (weight_scale_inv, as DeepSeek releases them and dsv3-quant writes them) dequantised to
 * bf16 on the way. MTP layers and other extra tensors are not read. With DSV3_GINFER_FP8=1 the
 * FP8 ones stay FP8 on the device instead and the GEMVs dequantise them in registers
 * (kernels/ginfer_fp8.cuh says which). */
int ginfer_create_dir(ginfer **out, const char *dir, int n_ctx, int n_slots, int dev,
                      dsv3_err *e);
void ginfer_destroy(ginfer *g);

/* The model's vocabulary size, layer count and cache width (kv_lora_rank + rope). */
void ginfer_dims(const ginfer *g, int *vocab, int *layers, int *width);
/* Bytes of the cache of the n_slots sequences, and one token's (all layers). */
size_t ginfer_cache_bytes(const ginfer *g);
size_t ginfer_cache_bytes_per_token(const ginfer *g);
/* Bytes of the weights on the device. */
size_t ginfer_weight_bytes(const ginfer *g);
/* "cuda:0 (NVIDIA H200, bf16)". */
const char *ginfer_describe(const ginfer *g);

/* n rows: row r appends ids[r] at position pos[r] of slot[r] (checked by the caller: slots in
 * range, positions < n_ctx and consecutive per slot, ids in the vocabulary). For each row with
 * want[r] (want NULL: all) one row of vocab_size fp32 logits goes to logits, in row order. */
int ginfer_forward(ginfer *g, int n, const int *slot, const int *pos, const int32_t *ids,
                   const uint8_t *want, float *logits, dsv3_err *e);

/* A decode step as ginfer_forward with every row wanted (n <= n_slots rows) that returns
 * only each row's greedy token: out[r] = the id of row r's largest logit, banned ids left
 * out, ties to the lowest id (lib/sampler's greedy choice); the logits stay on the device. */
int ginfer_forward_greedy(ginfer *g, int n, const int *slot, const int *pos,
                          const int32_t *ids, int32_t *out, dsv3_err *e);
/* Greedy decode steps queued without waiting, so that the device never waits for the host
 * between steps: ginfer_greedy_submit queues a step as ginfer_forward_greedy's (n rows, at most
 * two steps queued); with ids NULL, the rows of the step submitted just before (n the same;
 * slot and pos unread), each fed the token that step chooses and at the next position, both
 * left in the device's input rows by its argmax, so that no upload waits for it. New rows
 * (ids given) only when no step is queued. ginfer_greedy_collect waits for the oldest queued
 * step and gives its n greedy ids. Every other call on the engine fails while a step is
 * queued. The caller keeps the slot lengths: a queued continuation writes the cache at its
 * rows' next positions, which must be inside n_ctx. */
int ginfer_greedy_submit(ginfer *g, int n, const int *slot, const int *pos, const int32_t *ids,
                         dsv3_err *e);
int ginfer_greedy_collect(ginfer *g, int32_t *out, dsv3_err *e);
/* ginfer_greedy_submit's steps with each row drawn on the device (lib/sampler_draw: greedy
 * or sampled from its top_k <= ginfer_top_max largest logits, bit for bit
 * sampler_draw_top's; draw NULL: every row greedy): after the decode graph gk_topk_draw
 * replaces the graph's argmax choice, so a continuation (ids NULL; draw unread) goes on
 * drawing with the random states the device moved on. Collected by ginfer_greedy_collect. */
int ginfer_draw_submit(ginfer *g, int n, const int *slot, const int *pos, const int32_t *ids,
                       const sampler_draw *draw, dsv3_err *e);
/* A decode step as ginfer_forward with every row wanted (n <= n_slots rows) that returns only
 * each row's K largest logits (K <= ginfer_top_max, a sampled step's candidates: lib/sampler's
 * sampler_sample_top), largest first, ties to the lower id, banned ids as -inf: top_id[r][K]
 * and top_logit[r][K]; the rest stays on the device. */
int ginfer_top_max(const ginfer *g);  /* 256, less for vocabularies past 524288 */
int ginfer_forward_top(ginfer *g, int n, const int *slot, const int *pos, const int32_t *ids,
                       int K, int32_t *top_id, float *top_logit, dsv3_err *e);
/* The ids greedy steps never choose: ban[v] != 0 (vocab values; NULL: none, the default). */
int ginfer_set_banned(ginfer *g, const uint8_t *ban, dsv3_err *e);

/* A ginfer_forward call of at least 64 rows (DSV3_GINFER_PREFILL, read at creation:
 * "gemm:N" N rows; "gemv" never) that are one slot's positions 0 .. n-1 (a prompt) on the
 * bf16 engine without MTP runs in one pass on the tensor cores (kernels/ginfer_prefill.cuh),
 * else as above. The passes run so (tests, statistics). */
long ginfer_prefill_passes(const ginfer *g);
/* Cache rows pos0 .. pos0+n-1 of a layer and slot as fp32 (n x width values; tests). */
int ginfer_read_cache(ginfer *g, int layer, int slot, int pos0, int n, float *out, dsv3_err *e);

/* Decode steps replayed from CUDA graphs so far (for tests and statistics). */
long ginfer_graph_replays(const ginfer *g);
/* Their device time (events around each replay), seconds: a decode step's time less the
 * host's part (copying the logits out, sampling). */
double ginfer_graph_seconds(const ginfer *g);

/* For tests: the decode attention (kernels/decode_attn.cu) on host arrays, on the current
 * device. Row r (of N) of head h has the query qlat[r, h, kv] . c_kv + qpe[r, h, rope] . k_pe
 * over positions 0..pos[r] of slot[r] of cache [n_slots, n_ctx, kv + rope] (stored as bf16
 * unless cf32), split into nsplit parts; olat[N, nh, kv] gets the softmax-weighted latents.
 * warp_dot: the warp-split scores (the default), else the serial dot; fused: the parts
 * combined by the split kernel's last block, else by the combine launch. */
int ginfer_attn_run(const float *qlat, const float *qpe, const float *cache, int cf32,
                    const int *slot, const int *pos, int N, int nh, int kv, int rope, int n_ctx,
                    int n_slots, int nsplit, float scale, int warp_dot, int fused, float *olat,
                    dsv3_err *e);

/* For tests: the decode engine's fused router (gk_route: router GEMV, top-k, bucketing) on
 * host arrays, on the current device: x[N, H], router[E, H], bias[E] or NULL; one: the
 * one-cluster kernel where it takes the shape (N = 1, E <= 32, H <= 1024), else route_k's grid
 * and last block. Out: logits[N, E], rs[N, E], rw[N, K], idx[N, K], off[2E + 4], order[N K + ns],
 * spos[N K] (each output's device buffer poisoned with 0xff bytes first). */
int ginfer_route_run(const float *x, const float *router, const float *bias, int N, int H, int E,
                     int G, int TG, int K, int norm, float scale, int ns, int one, float *logits,
                     float *rs, float *rw, int32_t *idx, int *off, int *order, int *spos,
                     dsv3_err *e);

/* For tests: the post-attention add_norm and the one-row router of its output (x[H] +=
 * delta[H], xn = norm(x) with weight nw, eps; then ginfer_route_run's outputs for that row),
 * fused: one route1_k launch (gk_route1_norm); else gk_add_norm then gk_route's one-cluster
 * router. Out: xo (the new x), xn, and the router's outputs as ginfer_route_run's. */
int ginfer_route1_norm_run(const float *x, const float *delta, const float *nw, float eps,
                           const float *router, const float *bias, int H, int E, int G, int TG,
                           int K, int norm, float scale, int ns, int fused, float *xo, float *xn,
                           float *logits, float *rs, float *rw, int32_t *idx, int *off,
                           int *order, int *spos, dsv3_err *e);

/* For tests: the greedy choice of the decode graphs (gk_argmax) on host arrays, on the current
 * device: out[r] = the id of the largest of x[r, V] with ban[v] != 0 left out (ban NULL: none),
 * ties to the lowest id, -0 equal to +0. Runs twice on the same scratch (its counters must
 * come back to zero); out is the second run's. */
int ginfer_argmax_run(const float *x, int N, int V, const uint8_t *ban, int32_t *out,
                      dsv3_err *e);

/* For tests: the K largest logits of each row (gk_topk: a sampled step's candidates) on host
 * arrays x[N, V], on the current device: ids[r][K], logits[r][K], largest first, ties to the
 * lowest id, banned ids (ban NULL: none) as -inf. Runs twice (its counters must come back to
 * zero); the second run's. us (or NULL): then the mean time of 20 more calls back to back,
 * microseconds. */
int ginfer_topk_run(const float *x, int N, int V, const uint8_t *ban, int K, int32_t *ids,
                    float *logits, double *us, dsv3_err *e);

/* For tests: gk_topk_draw on host arrays x[N, V], on the current device: each row's draw
 * (draw[n], lib/sampler_draw; its random state moved on) from its K largest logits (ban
 * NULL: none banned) into ids[n], and checked to be fed as the next step's input. */
int ginfer_draw_run(const float *x, int N, int V, const uint8_t *ban, int K, sampler_draw *draw,
                    int32_t *ids, dsv3_err *e);

/* One row through the engine's add_norm (gk_add_norm, for tests): x [D] += the pending MoE
 * output (K routed rows ye [K][D] at positions spos weighted by rw, plus the shared row ys;
 * K 0 and ys NULL: none) + delta (NULL: none), written back; out = w * x * rstd(x). */
int ginfer_add_norm_run(float *x, const float *delta, const float *ye, const float *rw,
                        const int *spos, const float *ys, const float *w, int D, int K, float eps,
                        float *out, dsv3_err *e);
/* For tests: gk_gemv of one row of x [batch][I] with bf16 weights w [batch][O][I] (given as
 * fp32 values) into y [batch][O]; with 0 < O1 < O (batch 1) gk_gemv_two, its first O1
 * outputs then the rest. */
int ginfer_gemv_run(const float *x, const float *w, int I, int O, int batch, int O1, float *y,
                    dsv3_err *e);
/* For tests: gk_gemv_lat on one row x [I] with bf16 weights w [nh qk + W][I] and ukT
 * [nh][kv][nope] (given as fp32 values) into q [nh qk], kva [W] and qlat [nh kv] (lat 1);
 * lat 0: the launches it replaces, gk_gemv_two (q, kva) then gk_gemv of the heads' q_nope
 * parts (qlat). */
int ginfer_lat_run(const float *x, const float *w, const float *ukT, int I, int nh, int qk,
                   int nope, int W, int kv, int lat, float *q, float *kva, float *qlat,
                   dsv3_err *e);
/* For tests: batch-1 decode's expert GEMVs on one row x [H]: gk_moe_bucket of the row's K
 * experts idx (and the shared group E when sh), then gk_ffn_up into h [K + sh, F] (the
 * groups' rows in bucket order: routed ascending, the shared last) and gk_ffn_down of h into
 * y [K + sh, H], with weights w1 [E + sh][2F][H] (gate rows, up rows) and w2 [E + sh][H][F]
 * given as fp32 values and stored as bf16 unless wf32; one: the one-row kernel (grouped1_k)
 * for the up-projection (1) or both (2), else grouped_k's (0). K = 0 (with sh): a dense
 * MLP's one row, one group without the bucketing. */
int ginfer_grouped_run(const float *x, const float *w1, const float *w2, const int32_t *idx,
                       int E, int K, int sh, int H, int F, int wf32, int one, float *h, float *y,
                       dsv3_err *e);

#ifdef __cplusplus
}
#endif

#endif
