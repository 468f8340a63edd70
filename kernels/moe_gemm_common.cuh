/* moe_gemm_common: what the grouped expert GEMMs of kernels/moe_gemm (bf16) and
 * kernels/moe_gemm_fp8 (E4M3) share: cp.async, mbarrier and TMA (bulk tensor copy)
 * wrappers, the lookup of a row tile among the experts' row tiles, and the epilogue that
 * writes a warp's accumulators (the m16n8 fragment layout wgmma and mma.sync both leave:
 * 4 values a thread per 8 columns, rows g and g + 8 of the warp's 16) as bf16 rows or adds
 * them into fp32 d_W; the persistent kernels' tile schedule; and, host side, the tensor maps
 * of the TMA kernels (cuTensorMapEncodeTiled through the runtime). */
#ifndef DSV3_MOE_GEMM_COMMON_CUH
#define DSV3_MOE_GEMM_COMMON_CUH
#include <stdint.h>
#include <cuda.h> /* CUtensorMap and its encoder's types only: no libcuda link (see tma_encoder) */
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "../lib/err.h"

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

/* ts[x] = the number of expert x's first row tile of BM, counting each expert's rows
 * off[x + 1] - off[x] in tiles of BM; ts[E]: all of them (one warp, lane `lane`). With BM
 * 128 these are the FP8 path's token-tile starts. */
template <int BM>
__device__ __forceinline__ void mg_tile_starts(int *ts, const int *off, int E, int lane)
{
    int base = 0;
    for (int e0 = 0; e0 < E; e0 += 32) {
        int x = e0 + lane;
        int nt = x < E ? (off[x + 1] - off[x] + BM - 1) / BM : 0, inc = nt;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            int v = __shfl_up_sync(0xffffffffu, inc, o);
            if (lane >= o)
                inc += v;
        }
        if (x < E)
            ts[x] = base + inc - nt;
        base += __shfl_sync(0xffffffffu, inc, 31);
    }
    if (lane == 0)
        ts[E] = base;
}

/* The persistent (one block an SM) warp-specialised kernels' shared memory and schedule:
 * STAGES stages of stage_bytes from smem's first 1 KB boundary (the 128-byte swizzle repeats
 * every 1 KB; smem needs 1 KB spare), then the experts' offsets s_off[E+1] and first row
 * tiles s_ts[E+1] (mg_tile_starts<BM>); mbarriers full[s] (full_count arrivals) and empty[s]
 * (8: each consumer warp) in bars[2 STAGES], made visible to the copy engine. Every thread
 * calls; the block is synchronised on return. */
struct mg_ring {
    uint32_t base, full0, empty0; /* shared-memory addresses */
    int *s_off, *s_ts;
};
template <int STAGES, int BM>
__device__ __forceinline__ mg_ring mg_ring_init(unsigned char *smem, uint64_t *bars,
                                                uint32_t stage_bytes, int full_count,
                                                const int *off, int E)
{
    mg_ring r;
    uint32_t s0 = (uint32_t)__cvta_generic_to_shared(smem);
    r.base = (s0 + 1023) & ~1023u;
    r.s_off = (int *)(smem + (r.base - s0) + STAGES * stage_bytes);
    r.s_ts = r.s_off + E + 1;
    r.full0 = (uint32_t)__cvta_generic_to_shared(bars), r.empty0 = r.full0 + 8 * STAGES;
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; s++) {
            mbar_init(r.full0 + 8 * s, full_count);
            mbar_init(r.empty0 + 8 * s, 8);
        }
        mbar_init_fence();
    }
    if (threadIdx.x < 32) {
        for (int x = threadIdx.x; x <= E; x += 32)
            r.s_off[x] = off[x];
        __syncwarp();
        mg_tile_starts<BM>(r.s_ts, r.s_off, E, threadIdx.x);
    }
    __syncthreads();
    return r;
}

/* Their register split (384 threads at 168 registers each at launch): the loading
 * warpgroup gives back down to 40 a thread, the two multiplying ones take 232: 40 x 128 +
 * 232 x 256 = 168 x 384. (More than the pool holds and setmaxnreg.inc waits forever.) */
__device__ __forceinline__ void mg_regs_producer()
{
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void mg_regs_consumer()
{
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
#endif
}

/* The loading warpgroup of a TMA kernel: gives back its registers; true for the one thread
 * that issues the copies (thread 0), once it has prefetched the two tensor maps. */
__device__ __forceinline__ bool mg_tma_producer(const void *ta, const void *tb)
{
    mg_regs_producer();
    if (threadIdx.x != 0)
        return false;
    tma_prefetch(ta);
    tma_prefetch(tb);
    return true;
}

/* Tile t of the schedule. Forward/dgrad (!WGRAD): row tile t / ntn (neighbouring blocks
 * share A rows and the expert's weights), column tile t % ntn; expert e, its rows [r0, r1)
 * from r0 on, m0 = 0. wgrad: expert t / (ntm ntn), then tile (m0, n0) of d_W_e; [r0, r1) =
 * the expert's rows (the reduction). The number of tiles: mg_sched_count. */
struct mg_tile {
    int e, r0, r1, m0, n0;
};
template <int BM, int BN, bool WGRAD>
__device__ __forceinline__ mg_tile mg_sched_tile(const int *s_off, const int *s_ts, int E,
                                                 int ntm, int ntn, int t)
{
    mg_tile x;
    if (WGRAD) {
        int per = ntm * ntn, r = t % per;
        x.e = t / per;
        x.m0 = (r / ntn) * BM, x.n0 = (r % ntn) * BN;
        x.r0 = s_off[x.e], x.r1 = s_off[x.e + 1];
    } else {
        int rt = t / ntn, lo = 0, hi = E - 1;
        while (lo < hi) { /* the last expert whose first row tile is <= rt: non-empty */
            int mid = (lo + hi + 1) >> 1;
            if (s_ts[mid] <= rt)
                lo = mid;
            else
                hi = mid - 1;
        }
        x.e = lo;
        x.r0 = s_off[lo] + (rt - s_ts[lo]) * BM, x.r1 = s_off[lo + 1];
        x.m0 = 0, x.n0 = (t % ntn) * BN;
    }
    return x;
}
template <bool WGRAD>
__device__ __forceinline__ int mg_sched_count(const int *s_ts, int E, int ntm, int ntn)
{
    return WGRAD ? E * ntm * ntn : s_ts[E] * ntn;
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

/* mg_store_frag with 16-byte stores (the Hopper TMA kernel's epilogue): the four threads of
 * a quad hold 2 columns each of every 8-column group; a 4 x 4 transpose through shuffles
 * (bf16) gives each thread one whole group of 8 columns, a pair exchange (fp32 reductions)
 * 4 columns, so a warp's store covers 64 (bf16) or 32 (fp32) contiguous bytes of each of its
 * 8 rows instead of 16: half the L2 transactions and a quarter (bf16) or half (fp32) the
 * store instructions. Same values, same bits as mg_store_frag. Caller's promise: C 16-byte
 * aligned, ldc and N multiples of 8 (bf16) or 4 (fp32), n0 a multiple of 32, NJ a multiple
 * of 4. Every lane of the warp must call it (shuffles); rows past rlim only skip stores. */
__device__ __forceinline__ uint32_t mg_pack_bf16(float a, float b)
{
    __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *(uint32_t *)&v;
}

__device__ __forceinline__ uint32_t mg_pick4(const uint32_t (&v)[4], int i)
{
    return i == 0 ? v[0] : i == 1 ? v[1] : i == 2 ? v[2] : v[3];
}

template <int NJ, int MODE>
__device__ __forceinline__ void mg_store_frag_v(const float (&acc)[4 * NJ], void *C, int64_t ldc,
                                                int row, int rlim, int n0, int N)
{
    static_assert(NJ % 4 == 0, "groups of four");
    static_assert(MODE == MG_OUT_BF16 || MODE == MG_OUT_RED, "bf16 stores or fp32 reductions");
    int t = threadIdx.x & 3, lane = threadIdx.x & 31;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        int r = row + h * 8;
        bool live = r < rlim;
        if (MODE == MG_OUT_BF16) {
            __nv_bfloat16 *out = (__nv_bfloat16 *)C + (int64_t)r * ldc;
#pragma unroll
            for (int m = 0; m < NJ / 4; m++) {
                uint32_t v[4], o[4] = {0, 0, 0, 0};
#pragma unroll
                for (int q = 0; q < 4; q++)
                    v[q] = mg_pack_bf16(acc[4 * (4 * m + q) + 2 * h], acc[4 * (4 * m + q) + 2 * h + 1]);
                /* round k: thread s sends its pair of group 4m + (s + k) % 4; thread t gets
                 * that of group 4m + t from thread (t - k) % 4 */
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    uint32_t got = __shfl_sync(0xffffffffu, mg_pick4(v, (t + k) & 3),
                                               (lane & ~3) | ((t - k) & 3));
                    int at = (t - k) & 3;
                    o[0] = at == 0 ? got : o[0];
                    o[1] = at == 1 ? got : o[1];
                    o[2] = at == 2 ? got : o[2];
                    o[3] = at == 3 ? got : o[3];
                }
                int n = n0 + (4 * m + t) * 8;
                if (live && n < N)
                    *(uint4 *)(out + n) = make_uint4(o[0], o[1], o[2], o[3]);
            }
        } else {
            float *out = (float *)C + (int64_t)r * ldc;
            bool odd = t & 1;
#pragma unroll
            for (int j = 0; j < NJ; j += 2) {
                /* the even thread of a pair writes group j's 4 columns, the odd one group
                 * j + 1's: each gives the other the pair it lacks */
                float sx = odd ? acc[4 * j + 2 * h] : acc[4 * (j + 1) + 2 * h];
                float sy = odd ? acc[4 * j + 2 * h + 1] : acc[4 * (j + 1) + 2 * h + 1];
                float gx = __shfl_xor_sync(0xffffffffu, sx, 1);
                float gy = __shfl_xor_sync(0xffffffffu, sy, 1);
                float4 w = odd ? make_float4(gx, gy, acc[4 * (j + 1) + 2 * h],
                                             acc[4 * (j + 1) + 2 * h + 1])
                               : make_float4(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1], gx, gy);
                int n = n0 + (j + odd) * 8 + 4 * (t >> 1);
                if (live && n < N)
                    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(out + n),
                                 "f"(w.x), "f"(w.y), "f"(w.z), "f"(w.w)
                                 : "memory");
            }
        }
    }
}

/* ---- host side: the TMA kernels' tensor maps ---- */

/* cuTensorMapEncodeTiled from the driver, through the runtime's entry-point lookup: the
 * programs keep linking only the static runtime (no -lcuda). */
typedef CUresult (*tma_encode_fn)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *,
                                  const cuuint64_t *, const cuuint64_t *, const cuuint32_t *,
                                  const cuuint32_t *, CUtensorMapInterleave, CUtensorMapSwizzle,
                                  CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

static inline int tma_encoder(tma_encode_fn *fn, dsv3_err *e)
{
    void *f = NULL;
    cudaDriverEntryPointQueryResult q;
    cudaError_t st = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000,
                                                      cudaEnableDefault, &q);
    if (st != cudaSuccess || q != cudaDriverEntryPointSuccess || !f)
        return err_set(e, "moe: cuTensorMapEncodeTiled not available from the driver");
    *fn = (tma_encode_fn)f;
    return 0;
}

/* A tensor of rank 2 or 3 of `type` (esize bytes an element; dims innermost first, row
 * strides in elements), 128-byte swizzled boxes of box0 x box1 (x 1), zero fill out of
 * bounds. The swizzle wants box0 x esize = 128 bytes: one shared-memory row a box row. */
static inline int tma_map(tma_encode_fn enc, CUtensorMap *m, CUtensorMapDataType type,
                          int esize, const void *base, int rank, const int64_t *dims,
                          const int64_t *strides, int box0, int box1, dsv3_err *e)
{
    cuuint64_t gd[3], gs[2];
    cuuint32_t bx[3] = {(cuuint32_t)box0, (cuuint32_t)box1, 1}, es[3] = {1, 1, 1};
    for (int i = 0; i < rank; i++)
        gd[i] = (cuuint64_t)dims[i];
    for (int i = 0; i + 1 < rank; i++)
        gs[i] = (cuuint64_t)strides[i] * esize;
    CUresult r = enc(m, type, (cuuint32_t)rank, (void *)base, gd, gs, bx, es,
                     CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                     CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS)
        return err_set(e, "moe: cuTensorMapEncodeTiled failed (%d): rank %d, dims %lld x %lld",
                       (int)r, rank, (long long)dims[0], (long long)dims[1]);
    return 0;
}

#endif
