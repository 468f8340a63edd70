/* scratch: host helpers for the device scratch buffers of kernels/fp8lin and
 * kernels/moe_gemm_fp8 (quantised operands and their scales, carved from one allocation). */
#ifndef DSV3_SCRATCH_CUH
#define DSV3_SCRATCH_CUH

#include <stdint.h>

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

#endif
