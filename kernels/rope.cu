/* rope: rotary embedding in place on bf16 vectors, one thread per rotated pair. */
#include "gpuctx_internal.cuh"
#include "layers.h"

__global__ void rope_kernel(bf16 *x, int count, int stride, int per_pos, const int *pos,
                            const float *cos_t, const float *sin_t, int half, int interleave,
                            float sign)
{
    int64_t total = (int64_t)count * half;
    for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        int i = (int)(t / half), j = (int)(t % half);
        bf16 *v = x + (int64_t)i * stride;
        int64_t p = (int64_t)pos[i / per_pos] * half + j;
        float cs = cos_t[p], sn = sign * sin_t[p];
        bf16 *a = interleave ? v + 2 * j : v + j;
        bf16 *b = interleave ? v + 2 * j + 1 : v + j + half;
        float x0 = b2f(*a), x1 = b2f(*b);
        *a = f2b(x0 * cs - x1 * sn);
        *b = f2b(x1 * cs + x0 * sn);
    }
}

static int rope(gpu_ctx *c, gpu_bf16 *x, int count, int stride, int per_pos, const int *pos,
                const float *cos_t, const float *sin_t, int half, int interleave, float sign,
                dsv3_err *e)
{
    if (count <= 0 || half <= 0)
        return 0;
    rope_kernel<<<grid_for((int64_t)count * half, 256), 256, 0, c->stream>>>(
        (bf16 *)x, count, stride, per_pos, pos, cos_t, sin_t, half, interleave, sign);
    LAUNCH_CHECK("rope", e);
    return 0;
}

extern "C" int gpu_rope_fwd(gpu_ctx *c, gpu_bf16 *x, int count, int stride, int per_pos,
                            const int *pos, const float *cos_t, const float *sin_t, int half,
                            int interleave, dsv3_err *e)
{
    return rope(c, x, count, stride, per_pos, pos, cos_t, sin_t, half, interleave, 1.0f, e);
}

extern "C" int gpu_rope_bwd(gpu_ctx *c, gpu_bf16 *dx, int count, int stride, int per_pos,
                            const int *pos, const float *cos_t, const float *sin_t, int half,
                            int interleave, dsv3_err *e)
{
    return rope(c, dx, count, stride, per_pos, pos, cos_t, sin_t, half, interleave, -1.0f, e);
}
