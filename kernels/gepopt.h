/* gepopt: the device pieces of the expert-parallel optimizer (lib/ep's ep_dev_* calls,
 * lib/train's device optimizer under --ep): the sum over a group's replicas of their
 * pieces of the expert gradients, in replica order as lib/ep's host sum (the same bits
 * for the same inputs), and asynchronous device-to-device copies on a given stream. */
#ifndef DSV3_GEPOPT_H
#define DSV3_GEPOPT_H

#include <stddef.h>

#include "../lib/err.h"

#ifdef __cplusplus
extern "C" {
#endif

/* dst[j] = src[j] + src[n + j] + ... + src[(R - 1) n + j], left to right in fp32, queued
 * on stream (a cudaStream_t; NULL: the default stream). dst may not overlap src. */
int gepopt_sum_replicas(float *dst, const float *src, size_t n, int R, void *stream,
                        dsv3_err *e);
/* bytes from src to dst (device buffers, not overlapping), queued on stream. */
int gepopt_copy(void *dst, const void *src, size_t bytes, void *stream, dsv3_err *e);

#ifdef __cplusplus
}
#endif

#endif
