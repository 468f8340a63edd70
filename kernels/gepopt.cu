/* gepopt: the expert-parallel optimizer's device pieces (see gepopt.h). */
#include <stdint.h>

#include "cuda_util.cuh"
#include "gepopt.h"

__global__ void k_sum_replicas(float *dst, const float *src, int64_t n, int R)
{
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < n;
         j += (int64_t)gridDim.x * blockDim.x) {
        float s = src[j];
        for (int i = 1; i < R; i++)  /* replica order: lib/ep's ep_scatter_experts */
            s += src[(int64_t)i * n + j];
        dst[j] = s;
    }
}

extern "C" int gepopt_sum_replicas(float *dst, const float *src, size_t n, int R, void *stream,
                                   dsv3_err *e)
{
    if (!n)
        return 0;
    int64_t b = ((int64_t)n + 255) / 256;
    k_sum_replicas<<<(unsigned)(b < 65536 ? b : 65536), 256, 0, (cudaStream_t)stream>>>(
        dst, src, (int64_t)n, R);
    LAUNCH_CHECK("k_sum_replicas", e);
    return 0;
}

extern "C" int gepopt_copy(void *dst, const void *src, size_t bytes, void *stream, dsv3_err *e)
{
    if (!bytes)
        return 0;
    CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, (cudaStream_t)stream),
             e);
    return 0;
}
