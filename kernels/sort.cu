/* sort: CUB radix sort of int32 pairs on the context's stream, scratch in the arena. */
#include <cub/device/device_radix_sort.cuh>

#include "gpuctx_internal.cuh"
#include "sort.h"

extern "C" int gpu_sort_pairs(gpu_ctx *c, int32_t *keys_out, int32_t *vals_out,
                              const int32_t *keys_in, const int32_t *vals_in, int n, int key_end,
                              dsv3_err *e)
{
    if (n <= 0)
        return 0;
    int bits = 1;
    while (bits < 31 && (1 << bits) < key_end)
        bits++;
    size_t tmp_bytes = 0;
    CUDA_TRY(cub::DeviceRadixSort::SortPairs(NULL, tmp_bytes, keys_in, keys_out, vals_in,
                                             vals_out, n, 0, bits, c->stream),
             e);
    size_t mark = gpu_arena_mark(c);
    void *tmp = gpu_arena_alloc(c, tmp_bytes, e);
    if (!tmp)
        return -1;
    CUDA_TRY(cub::DeviceRadixSort::SortPairs(tmp, tmp_bytes, keys_in, keys_out, vals_in,
                                             vals_out, n, 0, bits, c->stream),
             e);
    LAUNCH_CHECK("radix sort", e);
    gpu_arena_reset(c, mark);
    return 0;
}
