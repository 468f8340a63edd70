/* moe_gemm_common: what the grouped expert GEMMs of kernels/moe_gemm (bf16) and
 * kernels/moe_gemm_fp8 (E4M3) share: cp.async, mbarrier and TMA (bulk tensor copy)
 * wrappers, the lookup of a row tile among the experts' row tiles, and the epilogue that
 * writes a warp's accumulators (the m16n8 fragment layout wgmma and mma.sync both leave:
 * 4 values a thread per 8 columns, rows g and g + 8 of the warp's 16) as bf16 rows or adds
 * them into fp32 d_W. */
#ifndef DSV3_MOE_GEMM_COMMON_CUH
#define DSV3_MOE_GEMM_COMMON_CUH
#include <stdint.h>
#include <cuda_bf16.h>

/* 16 bytes global -> shared, zero-filled when !pred (src must still be a valid address) */
__device__ __forceinline__ void mg_cp16(uint32_t saddr, const void *g, bool pred)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(g),
                 "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void mg_commit()
{
    asm volatile("cp.async.commit_group;\n" ::);
}
template <int N> __device__ __forceinline__ void mg_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

/* mbarriers (CTA scope) for the warp-specialised pipeline. */
__device__ __forceinline__ void mbar_init(uint32_t bar, int count)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar)
{
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
/* arrives on bar once every cp.async this thread issued before has landed; the barrier's
 * count includes this arrival (noinc) */
__device__ __forceinline__ void mbar_cp_async_arrive(uint32_t bar)
{
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
/* waits until the phase of parity `parity` has completed (a fresh barrier: parity 1 passes).
 * A wait past 10 s of GPU time traps: a pipeline bug shows as a launch error, not a hung
 * process (only waits that already failed read the timer). */
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity)
{
    uint32_t done;
    uint64_t t0 = 0;
    for (;;) {
        asm volatile("{\n"
                     ".reg .pred P1;\n"
                     "mbarrier.try_wait.parity.shared::cta.b64 P1, [%1], %2;\n"
                     "selp.u32 %0, 1, 0, P1;\n"
                     "}\n"
                     : "=r"(done)
                     : "r"(bar), "r"(parity)
                     : "memory");
        if (done)
            return;
        uint64_t now;
        asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(now));
        if (t0 == 0)
            t0 = now;
        else if (now - t0 > 10000000000ull)
            __trap();
    }
}

/* The tensor-memory-accelerator (TMA) side of the pipeline (plain sm_90): one thread
 * announces a stage's bytes on its "full" barrier (arrive + expect_tx), then issues the bulk
 * tensor copies that complete those bytes on it; the consumers' wait on that barrier then
 * also makes the copies' shared-memory writes visible to them (no proxy fence needed).
 * Coordinates are in elements, innermost first; boxes out of the tensor are zero-filled
 * and still count their full size. `map` is the generic address of a __grid_constant__
 * CUtensorMap kernel parameter. */
__device__ __forceinline__ void mbar_init_fence()
{ /* makes the initialised barriers visible to the async proxy (the copy engine) */
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_tx(uint32_t bar, uint32_t bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar),
                 "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void tma_prefetch(const void *map)
{
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(map) : "memory");
}
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void *map, uint32_t bar, int c0,
                                            int c1)
{
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%3, %4}], [%2];\n" ::"r"(dst),
                 "l"(map), "r"(bar), "r"(c0), "r"(c1)
                 : "memory");
}
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const void *map, uint32_t bar, int c0,
                                            int c1, int c2)
{
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(dst),
                 "l"(map), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
                 : "memory");
}

/* Forward and dgrad grids count the experts' row tiles of BM in expert order. Which
 * expert's tile is number t: *e, its first row *r0 and the expert's end *r1; false past the
 * last. Warp 0 scans the offsets; the block waits for it (every thread must call). */
template <int BM>
__device__ __forceinline__ bool mg_find_row_tile(const int *off, int E, int t, int *e, int *r0,
                                                 int *r1)
{
    __shared__ int s_e, s_r0, s_r1;
    int lane = threadIdx.x & 31;
    if (threadIdx.x < 32) {
        if (lane == 0)
            s_e = -1;
        __syncwarp();
        int base = 0;
        for (int e0 = 0; e0 < E; e0 += 32) {
            int x = e0 + lane;
            int cnt = x < E ? off[x + 1] - off[x] : 0;
            int nt = (cnt + BM - 1) / BM, inc = nt;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                int v = __shfl_up_sync(0xffffffffu, inc, o);
                if (lane >= o)
                    inc += v;
            }
            int start = base + inc - nt;
            if (x < E && t >= start && t < start + nt) {
                s_e = x;
                s_r0 = off[x] + (t - start) * BM;
                s_r1 = off[x + 1];
            }
            base += __shfl_sync(0xffffffffu, inc, 31);
        }
    }
    __syncthreads();
    *e = s_e, *r0 = s_r0, *r1 = s_r1;
    return s_e >= 0;
}

/* Writes one warp's 16 rows x 8 NJ columns of accumulators: tile rows `row` (fragment row
 * g) and row + 8, columns n0 + 8j + 2t, j < NJ; rows at or past rlim and columns at or past
 * N are left alone. C row-major with ldc elements a row. MODE 0: bf16 stores; 1: fp32
 * read-add-write; 2: fp32 adds by red.global.add (performed in L2: the warp does not wait
 * for a round trip; with one writer per element per call the sum is the same as mode 1). */
enum { MG_OUT_BF16 = 0, MG_OUT_ADD = 1, MG_OUT_RED = 2 };
template <int NJ, int MODE>
__device__ __forceinline__ void mg_store_frag(const float (&acc)[4 * NJ], void *C, int64_t ldc,
                                              int row, int rlim, int n0, int N)
{
    int t = threadIdx.x & 3;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        int r = row + h * 8;
        if (r >= rlim)
            continue;
        if (MODE == MG_OUT_BF16) {
            __nv_bfloat16 *out = (__nv_bfloat16 *)C + (int64_t)r * ldc;
#pragma unroll
            for (int j = 0; j < NJ; j++) {
                int n = n0 + j * 8 + 2 * t;
                if (n < N)
                    *(__nv_bfloat162 *)(out + n) =
                        __floats2bfloat162_rn(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
            }
        } else {
            float *out = (float *)C + (int64_t)r * ldc;
#pragma unroll
            for (int j = 0; j < NJ; j++) {
                int n = n0 + j * 8 + 2 * t;
                if (n >= N)
                    continue;
                if (MODE == MG_OUT_RED) {
                    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(out + n),
                                 "f"(acc[4 * j + 2 * h]), "f"(acc[4 * j + 2 * h + 1])
                                 : "memory");
                } else {
                    float2 v = *(float2 *)(out + n);
                    v.x += acc[4 * j + 2 * h];
                    v.y += acc[4 * j + 2 * h + 1];
                    *(float2 *)(out + n) = v;
                }
            }
        }
    }
}

#endif
