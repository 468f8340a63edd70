/* layout: the tensors a config implies (HF names, shapes, order), without allocating them.
 *
 * The same list, in the same order, as lib/model's parameter table followed through
 * model_each_saved (the MTP modules' copies of the embedding and head after each module's
 * shared_head.norm), computed from the config alone so that a converter or a checker can
 * walk a 671B checkpoint without the memory for its parameters. tests/unit/test_convert.c
 * checks it against lib/model's table. Also the rule for which tensors DeepSeek's released
 * V3 checkpoint stores in FP8 with a weight_scale_inv. */
#ifndef DSV3_LAYOUT_H
#define DSV3_LAYOUT_H

#include <stdint.h>

#include "config.h"
#include "err.h"

typedef struct layout_tensor {
    char name[96];
    int ndim;
    int64_t shape[2];
    int mtp_copy;     /* 1: an MTP layer's copy of model.embed_tokens or lm_head */
    int layer;        /* decoder layer index (MTP modules at num_hidden_layers + k), or -1 */
} layout_tensor;

typedef struct layout {
    layout_tensor *t;
    int n;
} layout;

/* The tensors of c with mtp_layers MTP modules (0 drops them; pass
 * c->num_nextn_predict_layers to keep them). */
int layout_build(layout *L, const dsv3_config *c, int mtp_layers, dsv3_err *e);
void layout_free(layout *L);

/* The entry of that name, or NULL (linear search: layouts are walked, rarely searched). */
const layout_tensor *layout_find(const layout *L, const char *name);

/* 1 if DeepSeek quantizes this tensor to FP8 in its release: the .weight of an attention
 * projection (q_proj, q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj) or of a
 * dense, routed-expert or shared-expert MLP (gate_proj, up_proj, down_proj), in any
 * decoder layer including the MTP modules' blocks. Not the embedding, norms, router
 * (mlp.gate.weight), its correction bias, lm_head, eh_proj or shared_head. */
int layout_is_fp8(const char *name);

/* The decoder layer index of a "model.layers.N." name, or -1. */
int layout_layer_of(const char *name);

#endif
