/* gpu: the CUDA device as the rest of dsv3 sees it.
 *
 * Whether a GPU is there, what it is, and the memory-bandwidth ceiling measured on it (the
 * floor every memory-bound kernel is judged against). Every function works in a build
 * without CUDA too: gpu_count() is then 0 and the others fail with a message saying so. */
#ifndef DSV3_GPU_H
#define DSV3_GPU_H

#include <stddef.h>

#include "../lib/err.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct gpu_props {
    char name[256];
    int major, minor;          /* compute capability */
    int sm_count;
    size_t global_mem;         /* bytes */
    size_t l2_bytes;
    double peak_bw_gbs;        /* from the memory clock and bus width, GB/s (10^9) */
} gpu_props;

/* 1 if this build has CUDA code, 0 if it is the CPU-only build. */
int gpu_compiled(void);

/* Number of usable devices; 0 with no driver, no device or a CPU-only build. */
int gpu_count(void);

int gpu_describe(int dev, gpu_props *p, dsv3_err *e);

/* Copies n floats host -> device -> (device copy kernel) -> host, for tests of the path. */
int gpu_copy_roundtrip(int dev, const float *in, float *out, size_t n, dsv3_err *e);

/* Measured device-memory bandwidth of a device-to-device copy of `bytes` bytes, counting
 * bytes read plus bytes written, median of `iters` timed runs, GB/s (10^9). */
int gpu_copy_bandwidth(int dev, size_t bytes, int iters, double *gbs, dsv3_err *e);

#ifdef __cplusplus
}
#endif

#endif
