/* gpuctx: context, stream, library handles, arena, copies, conversions, timers. */
#include "gpuctx_internal.cuh"

#include <stdlib.h>

#define WORKSPACE_BYTES ((size_t)64 << 20) /* what cuBLASLt's docs advise for Hopper */

extern "C" int gpu_ctx_create(gpu_ctx **out, int dev, size_t arena_bytes, dsv3_err *e)
{
    *out = NULL;
    gpu_ctx *c = (gpu_ctx *)calloc(1, sizeof *c);
    if (!c)
        return err_set(e, "gpu: out of host memory");
    c->dev = dev;
    int rc = -1;
    do {
        cudaError_t st = cudaSetDevice(dev);
        if (st != cudaSuccess) {
            err_set(e, "gpu: cannot use device %d: %s", dev, cudaGetErrorString(st));
            break;
        }
        if (cudaDeviceGetAttribute(&c->sm_count, cudaDevAttrMultiProcessorCount, dev) !=
                cudaSuccess ||
            cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking) != cudaSuccess) {
            err_set(e, "gpu: cannot create a stream on device %d", dev);
            break;
        }
        if (cublasLtCreate(&c->lt) != CUBLAS_STATUS_SUCCESS ||
            cublasCreate(&c->blas) != CUBLAS_STATUS_SUCCESS) {
            err_set(e, "gpu: cannot create the cuBLAS handles");
            break;
        }
        c->workspace_bytes = WORKSPACE_BYTES;
        if (cudaMalloc(&c->workspace, c->workspace_bytes) != cudaSuccess) {
            err_set(e, "gpu: cannot allocate the %zu-byte cuBLAS workspace", c->workspace_bytes);
            break;
        }
        if (cublasSetStream(c->blas, c->stream) != CUBLAS_STATUS_SUCCESS ||
            cublasSetWorkspace(c->blas, c->workspace, c->workspace_bytes) !=
                CUBLAS_STATUS_SUCCESS) {
            err_set(e, "gpu: cannot configure the cuBLAS handle");
            break;
        }
        if (arena_bytes && cudaMalloc(&c->arena, arena_bytes) != cudaSuccess) {
            err_set(e, "gpu: cannot allocate a %zu-byte activation arena", arena_bytes);
            break;
        }
        c->arena_bytes = arena_bytes;
        const char *mg = getenv("DSV3_MOE_GEMM"); /* moe.h gpu_moe_set_gemm, for benchmarks */
        c->moe_gemm = mg ? atoi(mg) : 0;
        rc = 0;
    } while (0);
    cudaGetLastError();
    if (rc) {
        gpu_ctx_destroy(c);
        return -1;
    }
    *out = c;
    return 0;
}

extern "C" void gpu_ctx_destroy(gpu_ctx *c)
{
    if (!c)
        return;
    if (c->stream)
        cudaStreamSynchronize(c->stream);
    cudaFree(c->arena);
    cudaFree(c->workspace);
    if (c->blas)
        cublasDestroy(c->blas);
    if (c->lt)
        cublasLtDestroy(c->lt);
    if (c->stream)
        cudaStreamDestroy(c->stream);
    free(c);
}

extern "C" void *gpu_ctx_stream(gpu_ctx *c)
{
    return (void *)c->stream;
}

extern "C" int gpu_sync(gpu_ctx *c, dsv3_err *e)
{
    CUDA_TRY(cudaStreamSynchronize(c->stream), e);
    CUDA_TRY(cudaGetLastError(), e);
    return 0;
}

extern "C" void *gpu_arena_alloc(gpu_ctx *c, size_t bytes, dsv3_err *e)
{
    size_t at = (c->arena_used + 255) & ~(size_t)255;
    if (at + bytes > c->arena_bytes || at + bytes < at) {
        err_set(e, "gpu: activation arena full: %zu bytes wanted at offset %zu of %zu", bytes,
                at, c->arena_bytes);
        return NULL;
    }
    c->arena_used = at + bytes;
    if (c->arena_used > c->arena_peak)
        c->arena_peak = c->arena_used;
    return c->arena + at;
}

extern "C" size_t gpu_arena_mark(const gpu_ctx *c)
{
    return c->arena_used;
}

extern "C" void gpu_arena_reset(gpu_ctx *c, size_t mark)
{
    if (mark <= c->arena_used)
        c->arena_used = mark;
}

extern "C" size_t gpu_arena_peak(const gpu_ctx *c)
{
    return c->arena_peak;
}

extern "C" void *gpu_malloc(size_t bytes, dsv3_err *e)
{
    void *p = NULL;
    cudaError_t st = cudaMalloc(&p, bytes ? bytes : 1);
    if (st != cudaSuccess) {
        cudaGetLastError();
        err_set(e, "gpu: cannot allocate %zu bytes: %s", bytes, cudaGetErrorString(st));
        return NULL;
    }
    return p;
}

extern "C" void gpu_free(void *p)
{
    cudaFree(p);
}

extern "C" int gpu_upload(gpu_ctx *c, void *dst, const void *src, size_t bytes, dsv3_err *e)
{
    CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->stream), e);
    return gpu_sync(c, e);
}

extern "C" int gpu_download(gpu_ctx *c, void *dst, const void *src, size_t bytes, dsv3_err *e)
{
    CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, c->stream), e);
    return gpu_sync(c, e);
}

extern "C" int gpu_memset(gpu_ctx *c, void *dst, int v, size_t bytes, dsv3_err *e)
{
    CUDA_TRY(cudaMemsetAsync(dst, v, bytes, c->stream), e);
    return 0;
}

__global__ void f32_to_bf16_kernel(bf16 *dst, const float *src, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = f2b(src[i]);
}

__global__ void bf16_to_f32_kernel(float *dst, const bf16 *src, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = b2f(src[i]);
}

extern "C" int gpu_f32_to_bf16(gpu_ctx *c, gpu_bf16 *dst, const float *src, int64_t n,
                               dsv3_err *e)
{
    if (n <= 0)
        return 0;
    f32_to_bf16_kernel<<<grid_for(n, 256), 256, 0, c->stream>>>((bf16 *)dst, src, n);
    LAUNCH_CHECK("f32_to_bf16", e);
    return 0;
}

extern "C" int gpu_bf16_to_f32(gpu_ctx *c, float *dst, const gpu_bf16 *src, int64_t n,
                               dsv3_err *e)
{
    if (n <= 0)
        return 0;
    bf16_to_f32_kernel<<<grid_for(n, 256), 256, 0, c->stream>>>(dst, (const bf16 *)src, n);
    LAUNCH_CHECK("bf16_to_f32", e);
    return 0;
}

extern "C" int gpu_timer_start(gpu_ctx *c, gpu_timer *t, dsv3_err *e)
{
    cudaEvent_t a, b;
    CUDA_TRY(cudaEventCreate(&a), e);
    CUDA_TRY(cudaEventCreate(&b), e);
    t->start = a;
    t->stop = b;
    CUDA_TRY(cudaEventRecord(a, c->stream), e);
    return 0;
}

extern "C" int gpu_timer_stop(gpu_ctx *c, gpu_timer *t, float *ms, dsv3_err *e)
{
    cudaEvent_t a = (cudaEvent_t)t->start, b = (cudaEvent_t)t->stop;
    CUDA_TRY(cudaEventRecord(b, c->stream), e);
    CUDA_TRY(cudaEventSynchronize(b), e);
    CUDA_TRY(cudaEventElapsedTime(ms, a, b), e);
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return 0;
}

struct gpu_graph {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
};

/* Relaxed: the launchers' cudaFuncSetAttribute calls may happen inside a capture. */
extern "C" int gpu_capture_begin(gpu_ctx *c, dsv3_err *e)
{
    CUDA_TRY(cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeRelaxed), e);
    return 0;
}

extern "C" int gpu_capture_end(gpu_ctx *c, gpu_graph **out, dsv3_err *e)
{
    *out = NULL;
    gpu_graph *g = (gpu_graph *)calloc(1, sizeof *g);
    if (!g)
        return err_set(e, "gpu: out of host memory");
    cudaError_t st = cudaStreamEndCapture(c->stream, &g->graph);
    if (st == cudaSuccess)
        st = cudaGraphInstantiate(&g->exec, g->graph, 0);
    if (st != cudaSuccess) {
        cudaGetLastError();
        gpu_graph_destroy(g);
        return err_set(e, "gpu: graph capture failed: %s", cudaGetErrorString(st));
    }
    *out = g;
    return 0;
}

extern "C" int gpu_graph_launch(gpu_ctx *c, gpu_graph *g, dsv3_err *e)
{
    CUDA_TRY(cudaGraphLaunch(g->exec, c->stream), e);
    return 0;
}

extern "C" void gpu_graph_destroy(gpu_graph *g)
{
    if (!g)
        return;
    if (g->exec)
        cudaGraphExecDestroy(g->exec);
    if (g->graph)
        cudaGraphDestroy(g->graph);
    free(g);
}
