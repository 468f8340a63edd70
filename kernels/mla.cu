/* mla: MLA key/value assembly and its transpose, the bf16 residual add. Where every
 * segment (nope, rope, dv, kv) is a multiple of 8 values and the bases are 16-byte aligned,
 * a thread moves one 8-value chunk (each chunk lies inside one segment); otherwise one value
 * a thread. The head sum of the rope key's gradient runs a thread per (token, value), heads
 * in order (deterministic). */
#include "gpuctx_internal.cuh"
#include "mla.h"

static unsigned nblocks(int64_t n)
{
    return (unsigned)((n + 255) / 256);
}

__global__ void add_bf16_kernel(bf16 *out, const bf16 *a, const bf16 *b, int64_t n)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        out[i] = f2b(b2f(a[i]) + b2f(b[i]));
}

__global__ void add_bf16_vec_kernel(bf16 *out, const bf16 *a, const bf16 *b, int64_t n8)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8)
        return;
    float x[8], y[8];
    load8(a + 8 * i, x);
    load8(b + 8 * i, y);
#pragma unroll
    for (int j = 0; j < 8; j++)
        x[j] += y[j];
    store8(out + 8 * i, x);
}

extern "C" int gpu_add_bf16(gpu_ctx *c, gpu_bf16 *out, const gpu_bf16 *a, const gpu_bf16 *b,
                            int64_t n, dsv3_err *e)
{
    if (n <= 0)
        return 0;
    if (n % 8 == 0 && aligned16(out) && aligned16(a) && aligned16(b))
        add_bf16_vec_kernel<<<nblocks(n / 8), 256, 0, c->stream>>>((bf16 *)out, (const bf16 *)a,
                                                                  (const bf16 *)b, n / 8);
    else
        add_bf16_kernel<<<nblocks(n), 256, 0, c->stream>>>((bf16 *)out, (const bf16 *)a,
                                                          (const bf16 *)b, n);
    LAUNCH_CHECK("add_bf16", e);
    return 0;
}

/* S = 1: one value a thread; S = 8: one 16-byte chunk a thread (segments multiples of 8). */
template <int S>
__global__ void mla_assemble_kernel(bf16 *k, bf16 *v, const bf16 *kvb, const bf16 *kva, int N,
                                    int nh, int nope, int rope, int dv, int kv)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int qk = nope + rope, w = (qk + dv) / S;
    if (i >= (int64_t)N * nh * w)
        return;
    int j = (int)(i % w) * S;
    int64_t nhh = i / w, n = nhh / nh;
    const bf16 *src;
    bf16 *dst;
    if (j < nope)
        src = kvb + nhh * (nope + dv) + j, dst = k + nhh * qk + j;
    else if (j < qk)
        src = kva + n * (kv + rope) + kv + (j - nope), dst = k + nhh * qk + j;
    else
        src = kvb + nhh * (nope + dv) + nope + (j - qk), dst = v + nhh * dv + (j - qk);
    if (S == 8)
        *(uint4 *)dst = *(const uint4 *)src;
    else
        *dst = *src;
}

template <int S>
__global__ void mla_assemble_bwd_kernel(bf16 *dkvb, bf16 *dkva, const bf16 *dk, const bf16 *dv_,
                                        int N, int nh, int nope, int rope, int dv, int kv)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int qk = nope + rope, w = (nope + dv) / S;
    int64_t n1 = (int64_t)N * nh * w;
    if (i < n1) {
        int j = (int)(i % w) * S;
        int64_t nhh = i / w;
        const bf16 *src = j < nope ? dk + nhh * qk + j : dv_ + nhh * dv + (j - nope);
        if (S == 8)
            *(uint4 *)(dkvb + nhh * (nope + dv) + j) = *(const uint4 *)src;
        else
            dkvb[nhh * (nope + dv) + j] = *src;
        return;
    }
    i -= n1;
    if (i >= (int64_t)N * rope)
        return;
    int64_t n = i / rope;
    int r = (int)(i % rope);
    float s = 0;
    for (int h = 0; h < nh; h++)
        s += b2f(dk[(n * nh + h) * qk + nope + r]);
    dkva[n * (kv + rope) + kv + r] = f2b(s);
}

static bool chunks8(int nope, int rope, int dv, int kv, const void *a, const void *b,
                    const void *c, const void *d)
{
    return nope % 8 == 0 && rope % 8 == 0 && dv % 8 == 0 && kv % 8 == 0 && aligned16(a) &&
           aligned16(b) && aligned16(c) && aligned16(d);
}

extern "C" int gpu_mla_assemble(gpu_ctx *c, gpu_bf16 *k, gpu_bf16 *v, const gpu_bf16 *kvb,
                                const gpu_bf16 *kva, int N, int nh, int nope, int rope, int dv,
                                int kv, dsv3_err *e)
{
    int64_t n = (int64_t)N * nh * (nope + rope + dv);
    if (n <= 0)
        return 0;
    if (chunks8(nope, rope, dv, kv, k, v, kvb, kva))
        mla_assemble_kernel<8><<<nblocks(n / 8), 256, 0, c->stream>>>(
            (bf16 *)k, (bf16 *)v, (const bf16 *)kvb, (const bf16 *)kva, N, nh, nope, rope, dv, kv);
    else
        mla_assemble_kernel<1><<<nblocks(n), 256, 0, c->stream>>>(
            (bf16 *)k, (bf16 *)v, (const bf16 *)kvb, (const bf16 *)kva, N, nh, nope, rope, dv, kv);
    LAUNCH_CHECK("mla_assemble", e);
    return 0;
}

extern "C" int gpu_mla_assemble_bwd(gpu_ctx *c, gpu_bf16 *dkvb, gpu_bf16 *dkva,
                                    const gpu_bf16 *dk, const gpu_bf16 *dv, int N, int nh,
                                    int nope, int rope, int dvd, int kv, dsv3_err *e)
{
    if (N <= 0)
        return 0;
    bool vec = chunks8(nope, rope, dvd, kv, dkvb, dkva, dk, dv);
    int64_t n = (int64_t)N * nh * (nope + dvd) / (vec ? 8 : 1) + (int64_t)N * rope;
    if (vec)
        mla_assemble_bwd_kernel<8><<<nblocks(n), 256, 0, c->stream>>>(
            (bf16 *)dkvb, (bf16 *)dkva, (const bf16 *)dk, (const bf16 *)dv, N, nh, nope, rope, dvd,
            kv);
    else
        mla_assemble_bwd_kernel<1><<<nblocks(n), 256, 0, c->stream>>>(
            (bf16 *)dkvb, (bf16 *)dkva, (const bf16 *)dk, (const bf16 *)dv, N, nh, nope, rope, dvd,
            kv);
    LAUNCH_CHECK("mla_assemble_bwd", e);
    return 0;
}
