/* optim: multi-tensor AdamW and gradient norm over a chunk table built once. */
#include "gpuctx_internal.cuh"
#include "optim.h"

#include <math.h>
#include <stdlib.h>

#define CHUNK 16384
#define OPT_THREADS 512

struct chunk {
    int tensor, len;
    int64_t offset;
};

struct gpu_tensor_list {
    int n, nchunks;
    /* device arrays */
    float **param, **grad;
    bf16 **m, **v, **pbf;
    int *decay;
    chunk *chunks;
    float *partial; /* [nchunks] sums of squares */
    void *block;    /* the one allocation all of the above live in */
};

extern "C" int gpu_tensor_list_create(gpu_ctx *c, gpu_tensor_list **out, int n,
                                      float *const *param, float *const *grad,
                                      gpu_bf16 *const *m, gpu_bf16 *const *v,
                                      gpu_bf16 *const *param_bf16, const int64_t *numel,
                                      const int *decay, dsv3_err *e)
{
    *out = NULL;
    int64_t nch = 0;
    for (int i = 0; i < n; i++)
        nch += (numel[i] + CHUNK - 1) / CHUNK;
    if (nch > INT32_MAX / 2)
        return err_set(e, "optim: too many parameters");
    size_t ptr_bytes = 5 * (size_t)n * sizeof(void *), dec_bytes = (size_t)n * sizeof(int);
    size_t ch_bytes = (size_t)nch * sizeof(chunk), part_bytes = (size_t)nch * sizeof(float);
    size_t total = ptr_bytes + dec_bytes + ch_bytes + part_bytes + 64;
    char *host = (char *)calloc(1, total);
    gpu_tensor_list *l = (gpu_tensor_list *)calloc(1, sizeof *l);
    if (!host || !l) {
        free(host);
        free(l);
        return err_set(e, "optim: out of host memory");
    }
    void **hp = (void **)host;
    for (int i = 0; i < n; i++) {
        hp[i] = param[i];
        hp[n + i] = grad[i];
        hp[2 * n + i] = m[i];
        hp[3 * n + i] = v[i];
        hp[4 * n + i] = param_bf16 ? param_bf16[i] : NULL;
    }
    int *hd = (int *)(host + ptr_bytes);
    size_t ch_off = (ptr_bytes + dec_bytes + 15) & ~(size_t)15;
    chunk *hc = (chunk *)(host + ch_off);
    int64_t k = 0;
    for (int i = 0; i < n; i++) {
        hd[i] = decay ? decay[i] : 1;
        for (int64_t o = 0; o < numel[i]; o += CHUNK, k++) {
            hc[k].tensor = i;
            hc[k].offset = o;
            hc[k].len = (int)(numel[i] - o < CHUNK ? numel[i] - o : CHUNK);
        }
    }
    char *dev = (char *)gpu_malloc(total, e);
    if (!dev || gpu_upload(c, dev, host, total, e)) {
        gpu_free(dev);
        free(host);
        free(l);
        return -1;
    }
    free(host);
    l->n = n;
    l->nchunks = (int)nch;
    l->block = dev;
    l->param = (float **)dev;
    l->grad = (float **)dev + n;
    l->m = (bf16 **)dev + 2 * n;
    l->v = (bf16 **)dev + 3 * n;
    l->pbf = (bf16 **)dev + 4 * n;
    l->decay = (int *)(dev + ptr_bytes);
    l->chunks = (chunk *)(dev + ch_off);
    l->partial = (float *)(dev + ((ch_off + ch_bytes + 15) & ~(size_t)15));
    *out = l;
    return 0;
}

extern "C" void gpu_tensor_list_destroy(gpu_tensor_list *l)
{
    if (!l)
        return;
    gpu_free(l->block);
    free(l);
}

__global__ void sumsq_kernel(float *partial, float *const *grad, const chunk *chunks)
{
    __shared__ float red[32];
    chunk ch = chunks[blockIdx.x];
    const float *g = grad[ch.tensor] + ch.offset;
    float s = 0;
    int i0 = 0;
    if (((uintptr_t)g & 15) == 0) { /* 16-byte loads for the bulk, scalars for the tail */
        i0 = ch.len & ~3;
        for (int i = threadIdx.x * 4; i < i0; i += blockDim.x * 4) {
            float4 q = *(const float4 *)(g + i);
            s += q.x * q.x + q.y * q.y + q.z * q.z + q.w * q.w;
        }
    }
    for (int i = i0 + threadIdx.x; i < ch.len; i += blockDim.x)
        s += g[i] * g[i];
    s = block_sum(s, red);
    if (threadIdx.x == 0)
        partial[blockIdx.x] = s;
}

/* One block: each thread sums a strided share in double, then a fixed tree. */
__global__ void norm_final_kernel(float *d_norm, const float *partial, int n)
{
    __shared__ double sh[1024];
    double s = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        s += partial[i];
    sh[threadIdx.x] = s;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w >>= 1) {
        if ((int)threadIdx.x < w)
            sh[threadIdx.x] += sh[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0)
        *d_norm = (float)sqrt(sh[0]);
}

extern "C" int gpu_grad_norm(gpu_ctx *c, const gpu_tensor_list *l, float *d_norm, dsv3_err *e)
{
    if (l->nchunks == 0)
        return gpu_memset(c, d_norm, 0, sizeof(float), e);
    sumsq_kernel<<<l->nchunks, OPT_THREADS, 0, c->stream>>>(l->partial, l->grad, l->chunks);
    LAUNCH_CHECK("grad_norm sumsq", e);
    norm_final_kernel<<<1, 1024, 0, c->stream>>>(d_norm, l->partial, l->nchunks);
    LAUNCH_CHECK("grad_norm final", e);
    return 0;
}

struct adamw_args {
    float lr, beta1, beta2, eps, wd, clip, bc1, bc2_sqrt;
};

__global__ void adamw_kernel(gpu_tensor_list l, adamw_args a, const float *d_norm)
{
    chunk ch = l.chunks[blockIdx.x];
    float gscale = 1.0f;
    if (d_norm && a.clip > 0) {
        float coef = a.clip / (*d_norm + 1e-6f);
        gscale = coef < 1.0f ? coef : 1.0f;
    }
    float *p = l.param[ch.tensor] + ch.offset;
    const float *g = l.grad[ch.tensor] + ch.offset;
    bf16 *m = l.m[ch.tensor] + ch.offset, *v = l.v[ch.tensor] + ch.offset;
    bf16 *pb = l.pbf[ch.tensor] ? l.pbf[ch.tensor] + ch.offset : NULL;
    float decay = l.decay[ch.tensor] ? 1.0f - a.lr * a.wd : 1.0f;
    float step = a.lr / a.bc1;
    int i0 = 0;
    if ((((uintptr_t)p | (uintptr_t)g) & 15) == 0 && (((uintptr_t)m | (uintptr_t)v) & 7) == 0 &&
        (!pb || ((uintptr_t)pb & 7) == 0)) {
        /* four elements a thread: 16-byte fp32 and 8-byte bf16 accesses */
        i0 = ch.len & ~3;
        for (int i = threadIdx.x * 4; i < i0; i += blockDim.x * 4) {
            float4 pq = *(const float4 *)(p + i), gq = *(const float4 *)(g + i);
            uint2 mu = *(const uint2 *)(m + i), vu = *(const uint2 *)(v + i);
            const __nv_bfloat162 *mh = (const __nv_bfloat162 *)&mu, *vh = (const __nv_bfloat162 *)&vu;
            float pv[4] = {pq.x, pq.y, pq.z, pq.w}, gv[4] = {gq.x, gq.y, gq.z, gq.w};
            float2 m01 = __bfloat1622float2(mh[0]), m23 = __bfloat1622float2(mh[1]);
            float2 v01 = __bfloat1622float2(vh[0]), v23 = __bfloat1622float2(vh[1]);
            float mv[4] = {m01.x, m01.y, m23.x, m23.y}, vv[4] = {v01.x, v01.y, v23.x, v23.y};
#pragma unroll
            for (int j = 0; j < 4; j++) {
                float gi = gv[j] * gscale;
                mv[j] = a.beta1 * mv[j] + (1.0f - a.beta1) * gi;
                vv[j] = a.beta2 * vv[j] + (1.0f - a.beta2) * gi * gi;
                pv[j] = pv[j] * decay - step * mv[j] / (sqrtf(vv[j]) / a.bc2_sqrt + a.eps);
            }
            *(float4 *)(p + i) = make_float4(pv[0], pv[1], pv[2], pv[3]);
            __nv_bfloat162 o[2] = {__floats2bfloat162_rn(mv[0], mv[1]),
                                   __floats2bfloat162_rn(mv[2], mv[3])};
            *(uint2 *)(m + i) = *(uint2 *)o;
            o[0] = __floats2bfloat162_rn(vv[0], vv[1]);
            o[1] = __floats2bfloat162_rn(vv[2], vv[3]);
            *(uint2 *)(v + i) = *(uint2 *)o;
            if (pb) {
                o[0] = __floats2bfloat162_rn(pv[0], pv[1]);
                o[1] = __floats2bfloat162_rn(pv[2], pv[3]);
                *(uint2 *)(pb + i) = *(uint2 *)o;
            }
        }
    }
    for (int i = i0 + threadIdx.x; i < ch.len; i += blockDim.x) {
        float gi = g[i] * gscale;
        float mi = a.beta1 * b2f(m[i]) + (1.0f - a.beta1) * gi;
        float vi = a.beta2 * b2f(v[i]) + (1.0f - a.beta2) * gi * gi;
        float pi = p[i] * decay;
        pi -= step * mi / (sqrtf(vi) / a.bc2_sqrt + a.eps);
        p[i] = pi;
        m[i] = f2b(mi);
        v[i] = f2b(vi);
        if (pb)
            pb[i] = f2b(pi);
    }
}

extern "C" int gpu_adamw_step(gpu_ctx *c, const gpu_tensor_list *l, const gpu_adamw_hp *hp,
                              const float *d_norm, dsv3_err *e)
{
    if (hp->step < 1)
        return err_set(e, "adamw: step must start at 1");
    if (l->nchunks == 0)
        return 0;
    adamw_args a;
    a.lr = hp->lr;
    a.beta1 = hp->beta1;
    a.beta2 = hp->beta2;
    a.eps = hp->eps;
    a.wd = hp->weight_decay;
    a.clip = hp->clip;
    a.bc1 = (float)(1.0 - pow(hp->beta1, hp->step));
    a.bc2_sqrt = (float)sqrt(1.0 - pow(hp->beta2, hp->step));
    adamw_kernel<<<l->nchunks, OPT_THREADS, 0, c->stream>>>(*l, a, d_norm);
    LAUNCH_CHECK("adamw", e);
    return 0;
}
