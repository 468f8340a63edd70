/* scratch: host bookkeeping of the FP8 paths' device buffers (kernels/fp8lin,
 * kernels/moe_gemm_fp8, kernels/ginfer's FP8 slots): growing a scratch buffer and carving
 * it (quantised operands and their scales from one allocation), the growing arrays that
 * list kept buffers, and the generation counters that say when kept codes are stale. */
#ifndef DSV3_SCRATCH_CUH
#define DSV3_SCRATCH_CUH

#include <stdint.h>
#include <stdlib.h>

#include "../lib/err.h"
#include "gpuctx.h"

/* Device buffer *buf of *cap bytes made at least need bytes long (what it held is dropped
 * when it grows); -1 with e set, prefixed what, when it cannot be. */
static inline int scratch_room(uint8_t **buf, size_t *cap, size_t need, const char *what,
                               dsv3_err *e)
{
    if (*cap >= need)
        return 0;
    gpu_free(*buf);
    *cap = 0;
    if (!(*buf = (uint8_t *)gpu_malloc(need, e)))
        return err_prefix(e, "%s", what);
    *cap = need;
    return 0;
}

/* Carves 256-byte aligned pieces off a buffer; NULL once they no longer fit. */
typedef struct carver {
    uint8_t *base;
    size_t used, cap;
} carver;

static inline void *carve(carver *k, size_t bytes)
{
    size_t at = (k->used + 255) / 256 * 256;
    k->used = at + bytes;
    return k->used <= k->cap ? k->base + at : NULL;
}

/* Room for element n of the array *a of *cap elements (n <= *cap): doubled when full, first
 * elements the first time; false when out of host memory (*a left as it was). */
template <typename T> static inline bool grow_for(T **a, int n, int *cap, int first)
{
    if (n != *cap)
        return true;
    int c = *cap ? 2 * *cap : first;
    T *p = (T *)realloc(*a, (size_t)c * sizeof *p);
    if (!p)
        return false;
    *a = p, *cap = c;
    return true;
}

/* The generation after g: never 0, which means "never" (codes never quantised). */
static inline unsigned next_gen(unsigned g)
{
    return g + 1 ? g + 1 : 1;
}

#endif
