/* gpuctx: the device state every kernel runs against.
 *
 * One gpu_ctx per device and program: its stream (every kernel of dsv3 is launched on it,
 * so a step is one ordered queue and can be captured into a CUDA graph), the cuBLASLt and
 * cuBLAS handles with their workspace, and the activation arena. The arena is one device
 * allocation made at start-up; a step takes pieces with gpu_arena_alloc and gives all of
 * them back with gpu_arena_reset(mark), so the step loop never calls cudaMalloc.
 * Parameters, gradients and optimizer state live in gpu_malloc buffers of their own.
 *
 * bf16 values cross the C interface as gpu_bf16 (the raw 16 bits). Pointers named d_* or
 * documented "device" are device memory. Every function returns 0, or -1 with a message
 * in e. A CPU-only build links lib/gpu_none.c instead, whose functions all fail. */
#ifndef DSV3_GPUCTX_H
#define DSV3_GPUCTX_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "../lib/err.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef uint16_t gpu_bf16;
typedef struct gpu_ctx gpu_ctx;

/* Round to nearest even, as the device's __float2bfloat16_rn does; NaN stays NaN. */
static inline gpu_bf16 gpu_f2bf(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (gpu_bf16)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1);
    return (gpu_bf16)(u >> 16);
}

static inline float gpu_bf2f(gpu_bf16 h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Makes the context on device dev with an arena of arena_bytes (may be 0). */
int gpu_ctx_create(gpu_ctx **c, int dev, size_t arena_bytes, dsv3_err *e);
void gpu_ctx_destroy(gpu_ctx *c);
/* The context's stream, as a cudaStream_t (void * here so C needs no CUDA headers). */
void *gpu_ctx_stream(gpu_ctx *c);
/* Waits for everything queued on the stream; reports a fault of any kernel before it. */
int gpu_sync(gpu_ctx *c, dsv3_err *e);

/* Arena: 256-byte aligned pieces; fails (no growth) when the arena is full. */
void *gpu_arena_alloc(gpu_ctx *c, size_t bytes, dsv3_err *e);
size_t gpu_arena_mark(const gpu_ctx *c);
void gpu_arena_reset(gpu_ctx *c, size_t mark);
/* Highest offset the arena has reached: the activation memory a step needs. */
size_t gpu_arena_peak(const gpu_ctx *c);

/* Long-lived buffers (parameters, gradients, optimizer state). */
void *gpu_malloc(size_t bytes, dsv3_err *e);
void gpu_free(void *p);

/* Copies on the context's stream; the host side is waited for (blocking). */
int gpu_upload(gpu_ctx *c, void *dst, const void *src, size_t bytes, dsv3_err *e);
int gpu_download(gpu_ctx *c, void *dst, const void *src, size_t bytes, dsv3_err *e);
/* Fills bytes with the byte value v (tests poison outputs with 0xff: bf16/f32 NaN). */
int gpu_memset(gpu_ctx *c, void *dst, int v, size_t bytes, dsv3_err *e);

/* Device conversions, n elements. */
int gpu_f32_to_bf16(gpu_ctx *c, gpu_bf16 *dst, const float *src, int64_t n, dsv3_err *e);
int gpu_bf16_to_f32(gpu_ctx *c, float *dst, const gpu_bf16 *src, int64_t n, dsv3_err *e);

/* Timing with device events on the stream: start, then stop returns milliseconds. */
typedef struct gpu_timer {
    void *start, *stop;
} gpu_timer;
int gpu_timer_start(gpu_ctx *c, gpu_timer *t, dsv3_err *e);
int gpu_timer_stop(gpu_ctx *c, gpu_timer *t, float *ms, dsv3_err *e);

/* CUDA graphs, for steps whose time is mostly launch gaps (small models): everything queued
 * on the context's stream between capture_begin and capture_end is recorded, not run, and
 * gpu_graph_launch replays it with the same pointers and sizes. Nothing that waits for the
 * host may be captured (gpu_upload/download/sync, gpu_moe_plan_make). */
typedef struct gpu_graph gpu_graph;
int gpu_capture_begin(gpu_ctx *c, dsv3_err *e);
int gpu_capture_end(gpu_ctx *c, gpu_graph **g, dsv3_err *e);
int gpu_graph_launch(gpu_ctx *c, gpu_graph *g, dsv3_err *e);
void gpu_graph_destroy(gpu_graph *g);

#ifdef __cplusplus
}
#endif

#endif
