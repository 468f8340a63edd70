/* infer: the DeepSeek-V3 model at inference, on the CPU: a latent KV cache and a forward over
 * any set of new tokens of any set of sequences (prefill and batched decode are the same call).
 *
 * Multi-head latent attention as DeepSeek's inference runs it (V2 report, section 2.1.2; V3's
 * inference/model.py, attn_impl "absorb"): per layer and token the cache holds only the
 * normalised latent c_kv (kv_lora_rank values, after kv_a_layernorm) and the rotated k_pe
 * (qk_rope_head_dim values), never per-head keys or values. W_kvb is absorbed on both sides:
 * each head's q_nope is mapped into latent space (q_nope . W_uk), scores are taken against
 * the cached latents (plus q_pe . k_pe), the softmax-weighted sum of latents is mapped out
 * through W_uv, then o_proj. Routing is the model's (correction bias for selection only).
 *
 * MTP module 1 drafts tokens for speculative decoding (infer_use_mtp): it runs as a second
 * stream over the same positions, with its own latent cache (one more layer). Stream
 * position p takes the main model's hidden state at p (before the final norm) and the token
 * at p + 1 and predicts the token at p + 2, as lib/model's MTP forward does in training; its
 * block attends over the stream's positions 0..p. The GPU engine runs the same stream
 * (kernels/ginfer_mtp) when made by infer_new_gpu_mtp.
 *
 * The weights are the dsv3_model's (read, never written). A sequence lives in a slot of the
 * cache; rows of one call are (slot, token) pairs, each at the slot's next position, so a
 * prompt is one call with all its tokens (prefill) and a decode step is one call with a row
 * per running sequence. Every output row is computed in the same order whatever the other
 * rows of the call are, so a sequence's logits do not depend on what it is batched with.
 * A GPU engine can sit behind the same functions. */
#ifndef DSV3_INFER_H
#define DSV3_INFER_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "model.h"
#include "sampler_draw.h"

typedef struct infer infer;

/* A cache of n_slots sequences of up to n_ctx tokens each. */
int infer_new(infer **out, const dsv3_model *m, int n_ctx, int n_slots, dsv3_err *e);
/* The same on GPU dev (kernels/ginfer: bf16 weights and cache, fp32 sums; exact: fp32
 * weights and cache, for tests). The weights are copied to the device: m may be freed after
 * (infer_vocab etc. keep working). */
int infer_new_gpu(infer **out, const dsv3_model *m, int n_ctx, int n_slots, int dev, int exact,
                  dsv3_err *e);
/* The GPU engine straight from a checkpoint folder (bf16; memory-mapped shards, FP8
 * dequantised: ginfer_create_dir), without a host copy of the model. */
int infer_new_gpu_dir(infer **out, const char *dir, int n_ctx, int n_slots, int dev,
                      dsv3_err *e);
/* A GPU engine with the MTP module on the device too, for infer_use_mtp (kernels/ginfer_mtp:
 * one more cache layer, the main model's hidden states kept on the device, decode steps of up
 * to two rows a slot): from m (loaded with its MTP modules) or, m NULL, from folder dir
 * (bf16 then). Fails when the model has no MTP module. */
int infer_new_gpu_mtp(infer **out, const dsv3_model *m, const char *dir, int n_ctx, int n_slots,
                      int dev, int exact, dsv3_err *e);
void infer_free(infer *f);

/* "cpu" or the GPU engine's description ("cuda:0 (NVIDIA H200, bf16)"). */
const char *infer_device(const infer *f);
/* Decode steps replayed from CUDA graphs (0 on the CPU). */
long infer_graph_replays(const infer *f);
/* The device time of those replays, seconds (0 on the CPU). */
double infer_graph_seconds(const infer *f);

int infer_n_ctx(const infer *f);
int infer_n_slots(const infer *f);
int infer_vocab(const infer *f);
/* Bytes of the latent cache: layers x slots x n_ctx x (kv_lora_rank + qk_rope_head_dim) x 4
 * (on the GPU: x 2 in bf16, and one spare slot that padding rows of a graph write to). */
size_t infer_cache_bytes(const infer *f);
/* Bytes of cache one token adds (all layers). */
size_t infer_cache_bytes_per_token(const infer *f);
/* Tokens held by slot. */
int infer_slot_len(const infer *f, int slot);
/* Empties a slot (its next token is at position 0). */
void infer_slot_clear(infer *f, int slot);

/* Cuts slot to its first n tokens (n <= its length), as when a drafted token is rejected.
 * With the MTP stream on, n must be 0 or pass the stream's cached positions. */
int infer_slot_truncate(infer *f, int slot, int n, dsv3_err *e);

/* Turns the MTP stream on (CPU engine: the model loaded with its MTP modules, of which the
 * first is used; GPU engine: made by infer_new_gpu_mtp); empties every slot. Fails when the
 * model has none. */
int infer_use_mtp(infer *f, dsv3_err *e);
int infer_mtp_on(const infer *f);

/* The MTP module's draft for each of n distinct slots: runs the stream over every position
 * of the slot it has not seen (those infer_forward cached since), the newest with next[i]
 * (the token sampled there, not yet fed) as the token after it, and writes the newest row's
 * vocab_size logits, which predict the token after next[i], to logits + i * vocab. */
int infer_mtp_draft(infer *f, int n, const int *slot, const int32_t *next, float *logits,
                    dsv3_err *e);
/* The same, giving each slot's greedy draft instead: out[i] = the id of the largest of those
 * logits, banned ids left out, ties to the lowest (infer_forward_greedy's choice). On the
 * GPU only the ids leave the device. */
int infer_mtp_draft_greedy(infer *f, int n, const int *slot, const int32_t *next, int32_t *out,
                           dsv3_err *e);

/* Runs n new rows: row r appends token ids[r] to slot[r] (rows of one slot in order, at
 * consecutive positions). For each row with want[r] != 0 (want NULL: every row) one row of
 * vocab_size logits is written to logits, in row order. Fails, changing nothing, when a slot
 * would pass n_ctx or an id is outside the vocabulary. With the MTP stream on, every row's
 * hidden state (before the final norm) and id wait there for the stream's next draft. */
int infer_forward(infer *f, int n, const int *slot, const int32_t *ids, const uint8_t *want,
                  float *logits, dsv3_err *e);

/* The ids greedy steps never choose (ban[v] != 0, vocab values, copied; NULL: none). */
int infer_set_banned(infer *f, const uint8_t *ban, dsv3_err *e);
/* A decode step as infer_forward with every row's logits wanted, that returns instead each
 * row's greedy token: out[r] = the id of row r's largest logit, banned ids left out, ties to
 * the lowest id (lib/sampler at temperature 0 without a penalty). On the GPU only the ids
 * leave the device; on the CPU, infer_forward then the scan. */
int infer_forward_greedy(infer *f, int n, const int *slot, const int32_t *ids, int32_t *out,
                         dsv3_err *e);
/* Greedy steps queued ahead, at most two: infer_greedy_submit is infer_forward_greedy without
 * waiting for the tokens (the slots' lengths grow at once); with ids NULL it continues the
 * step submitted just before: the same n rows and slots, each fed the token that step
 * chooses. infer_greedy_collect gives the oldest queued step's n ids. On the GPU engine
 * without the MTP stream the device runs a continuation while the caller takes the tokens of
 * the step before (ginfer_greedy_submit: the device feeds itself); elsewhere submit runs the
 * step at once. New rows (ids given) only when no step is queued; between a submit and the
 * collect that takes it only these two, infer_slot_len, _truncate and _clear (the host's
 * lengths) may be called on f. A continuation must fit n_ctx (checked, as infer_forward). */
int infer_greedy_submit(infer *f, int n, const int *slot, const int32_t *ids, dsv3_err *e);
int infer_greedy_collect(infer *f, int32_t *out, dsv3_err *e);
/* infer_greedy_submit's steps with each row's own draw (lib/sampler_draw: greedy, or sampled
 * from its top_k <= infer_top_max largest logits; draw NULL: all greedy), bit for bit
 * sampler_draw_top's on those logits; a continuation (ids NULL, draw unread) goes on with
 * the random states each draw moved on. On the GPU engine without the MTP stream the device
 * draws (ginfer_draw_submit); elsewhere infer_forward_top and the host's sampler_draw_top.
 * Collected by infer_greedy_collect. */
int infer_draw_submit(infer *f, int n, const int *slot, const int32_t *ids,
                      const sampler_draw *draw, dsv3_err *e);
/* A decode step as infer_forward with every row's logits wanted, that returns instead each
 * row's K largest (1 <= K <= infer_top_max), banned ids as -inf, largest first, ties to the
 * lower id (lib/sampler's candidate order): top_id[r][K], top_logit[r][K], what
 * sampler_sample_top draws from. On the GPU only those leave the device (ginfer_forward_top). */
enum { INFER_TOP_MAX = 256 };  /* infer_top_max's bound */
int infer_top_max(const infer *f);
int infer_forward_top(infer *f, int n, const int *slot, const int32_t *ids, int K,
                      int32_t *top_id, float *top_logit, dsv3_err *e);
/* The prompt ids[0..n) appended to slot in one pass; logits of its last token. */
int infer_prefill(infer *f, int slot, const int32_t *ids, int n, float *logits, dsv3_err *e);

#endif
