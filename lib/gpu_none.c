/* The gpu module of a build without nvcc: no devices, and a clear message for any use. */
#include "../kernels/gpu.h"

int gpu_compiled(void)
{
    return 0;
}

int gpu_count(void)
{
    return 0;
}

static int no_cuda(dsv3_err *e)
{
    return err_set(e, "this dsv3 was built without CUDA (nvcc was not found at build time)");
}

int gpu_describe(int dev, gpu_props *p, dsv3_err *e)
{
    (void)dev;
    (void)p;
    return no_cuda(e);
}

int gpu_copy_roundtrip(int dev, const float *in, float *out, size_t n, dsv3_err *e)
{
    (void)dev;
    (void)in;
    (void)out;
    (void)n;
    return no_cuda(e);
}

int gpu_copy_bandwidth(int dev, size_t bytes, int iters, double *gbs, dsv3_err *e)
{
    (void)dev;
    (void)bytes;
    (void)iters;
    (void)gbs;
    return no_cuda(e);
}
