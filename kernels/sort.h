/* sort: stable device sort of (key, value) int32 pairs by key, through CUB's radix sort.
 * Stable: equal keys keep their input order, which the deterministic scatter-free sums of
 * the embedding gradient and the MoE permutation rely on. Scratch from the arena. */
#ifndef DSV3_SORT_H
#define DSV3_SORT_H

#include "gpuctx.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Keys must lie in [0, key_end). Device pointers; outputs must not alias inputs. */
int gpu_sort_pairs(gpu_ctx *c, int32_t *keys_out, int32_t *vals_out, const int32_t *keys_in,
                   const int32_t *vals_in, int n, int key_end, dsv3_err *e);

#ifdef __cplusplus
}
#endif

#endif
