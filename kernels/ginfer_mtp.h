/* ginfer_mtp: speculative decoding with the MTP module on the GPU engine (kernels/ginfer).
 *
 * The same stream as lib/infer's on the CPU (infer.h): MTP module 1 runs over the positions
 * of a slot, stream position p taking the main model's hidden state at p (before the final
 * norm) and the token at p + 1, and predicting the token at p + 2: x = eh_proj [enorm(embed
 * (token)); hnorm(h_p)], then the module's transformer block over a cache layer of its own
 * (its rows attend over the stream's positions 0..p of the slot), then the shared head
 * (head norm, the main model's lm_head). The embedding and head are the main model's on the
 * device (the checkpoint's MTP copies are not read).
 *
 * An engine made with the module (ginfer_create_mtp) differs from a plain one in three ways
 * only: every pass of the main model (prefill chunks and decode graphs) also stores each
 * row's hidden state at (slot, position) in a device buffer of n_slots x n_ctx x hidden fp32
 * values (one launch a pass); the cache has one more layer (ginfer_cache_bytes counts it); and
 * decode steps take up to two rows a slot (a token and its draft), through graphs of twice as
 * many rows. The main model's kernels and sums are untouched, so its logits are bitwise those
 * of a plain engine whatever the drafts: speculative decoding changes no output. */
#ifndef DSV3_GINFER_MTP_H
#define DSV3_GINFER_MTP_H

#include <stdint.h>

#include "ginfer.h"

#ifdef __cplusplus
extern "C" {
#endif

/* An engine as ginfer_create (m) or, with m NULL, ginfer_create_dir (folder dir; exact
 * allowed), with MTP module 1 loaded too. Fails with "the model has no MTP module ..." when
 * the config has none or the model / folder holds no MTP tensors. */
int ginfer_create_mtp(ginfer **out, const dsv3_model *m, const char *dir, int n_ctx,
                      int n_slots, int dev, int exact, dsv3_err *e);
/* Whether g was made with the MTP module. */
int ginfer_has_mtp(const ginfer *g);
/* The most rows a decode step (a graph) takes: n_slots, twice that with the MTP module;
 * ginfer_forward calls of more rows run as prefill passes. */
int ginfer_decode_rows(const ginfer *g);

/* The MTP stream over n rows: row r is stream position pos[r] of slot[r] (the main model has
 * passed that position: its hidden state is stored) with next[r] the token at pos[r] + 1;
 * appends to the module's cache (rows of one slot in order, consecutive positions, checked by
 * the caller). For each row with want[r] (NULL: all), in row order: vocab_size logits to
 * logits, or (logits NULL) the greedy choice to out (banned ids left out, ties to the lowest
 * id: ginfer_forward_greedy's choice). */
int ginfer_mtp_forward(ginfer *g, int n, const int *slot, const int *pos, const int32_t *next,
                       const uint8_t *want, float *logits, int32_t *out, dsv3_err *e);

#ifdef __cplusplus
}
#endif

#endif
