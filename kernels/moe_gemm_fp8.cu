/* moe_gemm_fp8: the routed experts' FP8 grouped GEMMs and their quantisers. See moe_fp8.h.
 *
 * GEMM: one block per BM x 128 output tile of one expert, one warpgroup per 64 rows (BM 64,
 * two blocks an SM: the default; or BM 128 with two warpgroups, one block an SM). A stage
 * holds one K block of 128 (the scaling granule): A and B tiles of BM and 128 rows x 128
 * E4M3 codes, K-major with the 128-byte swizzle (wgmma reads 8-bit operands K-major only),
 * and the stage's scales, all loaded with cp.async (rows outside the expert and columns past
 * the edge zero-filled) into a ring of 4 or 6 stages. Per stage each warpgroup issues four
 * wgmma m64n128k32 into a fresh fp32 partial, waits, and adds partial x scale(A row) x
 * scale(B) into the fp32 accumulators: the promotion DeepSeek-V3 describes, once per 128 K.
 * (Overlapping the promotion with the next stage's products, variant 1, measured no faster:
 * ptxas serialises wgmma when other instructions read an accumulator set mid-pipeline.) fprop and
 * dgrad find their expert like kernels/moe_gemm (worst-case grid of row tiles, prefix sum of
 * per-expert tile counts); wgrad owns one (expert, tile) and runs over the expert's token
 * tiles, adding the fp32 result into d_W (one owner, no atomics).
 *
 * The B operand of fprop/dgrad has one scale per stage (BN = 128 = the weight block); wgrad's
 * B has one per column and token tile, so its promotion multiplies by a row and a column
 * scale.
 *
 * Variant 3 (moe_fp8_tma_kernel, the default; DSV3_MOE_FP8_KERNEL=0..2 pick the others: on an
 * H100, 2026-11-28, 1.01-1.41x variant 2 on every 1b-moe and V3 shape of test_moe_fp8's
 * bench) is kernels/moe_gemm's warp-specialised TMA kernel for FP8: persistent (one block an
 * SM over the 128 x 128 tiles), one thread issuing bulk tensor copies of the code tiles into
 * a 6-stage mbarrier ring, two multiplying warpgroups that read their scales from global
 * memory; the same products and promotions, so the same bits as variants 0 and 2. Its
 * schedule and tensor maps are moe_gemm_common.cuh's, shared with the bf16 kernels. */
#include <cuda_fp8.h>
#include <stdlib.h>
#include <string.h>

#include "../lib/fp8.h"
#include "fp8_quant.cuh"
#include "gpuctx_internal.cuh"
#include "moe_fp8.h"
#include "moe_gemm_common.cuh"
#include "scratch.cuh"
#include "wgmma.cuh"

#define MF_BN 128
#define MF_BK 128
#define MF_TILE (128 * 128)
/* WGS warpgroups a block: BM = 64 WGS rows; 6 stages with two (one block an SM), 4 with one
 * (two blocks an SM, so one's promotion and barriers overlap the other's products). */
template <int WGS> struct mf_cfg {
    static constexpr int BM = 64 * WGS, THREADS = 128 * WGS, STAGES = WGS == 2 ? 6 : 4;
    static constexpr uint32_t ATILE = BM * 128, STAGE = ATILE + MF_TILE;
    static constexpr int SMEM = STAGES * STAGE + STAGES * 1024 + 1024;
};

enum { MF_FWD = 0, MF_WGRAD = 1 };

/* fwd form (fprop, dgrad): A = activation codes [rows, K] (1x128 scales sa [K/128 x rows]),
 * B = expert e's codes at B + e*b_es, [N, K], one scale a 128x128 block at
 * sb[e*sb_es + nb*sb_ns + kb*sb_ks]; C bf16 [rows, N].
 * wgrad form: A = [M, lda] token-tile codes, sa [tiles x M]; B = [N, ldb], sb [tiles x N];
 * C fp32 [E, M, N] +=. */
struct mf_args {
    const uint8_t *A, *B;
    const float *sa, *sb;
    void *C;
    const int *off, *tstart;
    int E, M, N, K, rows;
    int64_t lda, ldb, b_es;
    int sb_es, sb_ns, sb_ks;
    int red; /* wgrad: add into d_W by red.global.add (DSV3_MOE_WGRAD_RED=0: read-add-write) */
};

__device__ __forceinline__ void mf_cp16(uint32_t saddr, const void *g, bool pred)
{
    mg_cp16(saddr, g, pred);
}
__device__ __forceinline__ void mf_cp4(uint32_t saddr, const void *g, bool pred)
{
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(saddr), "l"(g),
                 "r"(pred ? 4 : 0));
}
__device__ __forceinline__ void mf_commit()
{
    mg_commit();
}
template <int N> __device__ __forceinline__ void mf_wait()
{
    mg_wait<N>();
}

/* K-major 128-byte-swizzled tile: row r at r*128, 16-byte chunk c at (c ^ (r & 7)). The
 * descriptor: SBO 1024 between 8-row groups, LBO unused (16), swizzle mode 1. */
__device__ __forceinline__ uint64_t mf_desc(uint32_t addr)
{
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)64 << 32) |
           ((uint64_t)1 << 62);
}

/* part = one stage's 64 x 128 product of a warpgroup (A's 64 rows at sa, B's 128 at sb, 128
 * k each): four wgmma m64n128k32 issued and committed, left in flight. */
__device__ __forceinline__ void mf_products(float (&part)[64], uint32_t sa, uint32_t sb)
{
    wg_fence();
    wg_ss_e4m3_n128<0>(part, mf_desc(sa), mf_desc(sb));
    wg_ss_e4m3_n128<1>(part, mf_desc(sa + 32), mf_desc(sb + 32));
    wg_ss_e4m3_n128<1>(part, mf_desc(sa + 64), mf_desc(sb + 64));
    wg_ss_e4m3_n128<1>(part, mf_desc(sa + 96), mf_desc(sb + 96));
    wg_commit();
}

/* acc += part x scales, the promotion of one 128-K block: a0 and a1 the A scales of the
 * thread's rows g and g + 8; B's scales: fprop/dgrad b[0].x, the stage's one weight block;
 * wgrad b[j], those of the thread's columns 8j + 2t and + 1. */
template <int FORM>
__device__ __forceinline__ void mf_promote(float (&acc)[64], const float (&part)[64], float a0,
                                           float a1, const float2 (&b)[16])
{
    if (FORM == MF_WGRAD) {
#pragma unroll
        for (int j = 0; j < 16; j++) {
            float2 bj = b[j];
            acc[4 * j] += part[4 * j] * (a0 * bj.x);
            acc[4 * j + 1] += part[4 * j + 1] * (a0 * bj.y);
            acc[4 * j + 2] += part[4 * j + 2] * (a1 * bj.x);
            acc[4 * j + 3] += part[4 * j + 3] * (a1 * bj.y);
        }
    } else {
        float x0 = a0 * b[0].x, x1 = a1 * b[0].x;
#pragma unroll
        for (int j = 0; j < 16; j++) {
            acc[4 * j] += part[4 * j] * x0;
            acc[4 * j + 1] += part[4 * j + 1] * x0;
            acc[4 * j + 2] += part[4 * j + 2] * x1;
            acc[4 * j + 3] += part[4 * j + 3] * x1;
        }
    }
}

/* A warp's 16 rows x 128 columns of results at row `row` (fragment row g) and column n0:
 * fprop/dgrad bf16 rows below rend; wgrad added into d_W_e (rows below M). red (default):
 * the adds are performed in L2 and the block need not wait for them; one owner per element
 * and call, so the same sums as a read-modify-write. */
template <int FORM>
__device__ __forceinline__ void mf_store(const mf_args &p, const float (&acc)[64], int e,
                                         int row, int rend, int n0)
{
    if (FORM == MF_WGRAD) {
        float *dw = (float *)p.C + (int64_t)e * p.M * p.N;
        if (p.red)
            mg_store_frag<16, MG_OUT_RED>(acc, dw, p.N, row, p.M, n0, p.N);
        else
            mg_store_frag<16, MG_OUT_ADD>(acc, dw, p.N, row, p.M, n0, p.N);
    } else {
        mg_store_frag<16, MG_OUT_BF16>(acc, p.C, p.N, row, rend, n0, p.N);
    }
}

/* PIPE 0: each stage's products finished and promoted before the next barrier (loads 5
 * stages ahead); PIPE 1: two partials in turn, stage kt's products left in flight while
 * stage kt-1's are promoted (loads 4 stages ahead, so a slot is refilled only after every
 * warpgroup's products on it are done). */
template <int FORM, int PIPE, int WGS>
__global__ void __launch_bounds__(128 * WGS, 3 - WGS) moe_fp8_kernel(const mf_args p)
{
    typedef mf_cfg<WGS> C;
    constexpr int MF_BM = C::BM, MF_THREADS = C::THREADS, MF_STAGES = C::STAGES;
    constexpr uint32_t MF_STAGE = C::STAGE;
    extern __shared__ __align__(1024) unsigned char smem[];
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;
    int e, m0 = 0, n0, rbeg = 0, rend = 0, kt0, KT;
    if (FORM == MF_WGRAD) {
        int ntn = (p.N + MF_BN - 1) / MF_BN;
        e = blockIdx.y;
        m0 = (blockIdx.x / ntn) * MF_BM;
        n0 = (blockIdx.x % ntn) * MF_BN;
        kt0 = p.tstart[e];
        KT = p.tstart[e + 1] - kt0;
        if (KT == 0)
            return; /* no rows: d_W_e is left as it is */
    } else {
        if (!mg_find_row_tile<MF_BM>(p.off, p.E, blockIdx.y, &e, &rbeg, &rend))
            return;
        n0 = blockIdx.x * MF_BN;
        kt0 = 0;
        KT = (p.K + MF_BK - 1) / MF_BK;
    }
    /* the swizzle repeats every 1 KB: stage bases 1 KB-aligned (C::SMEM has 1 KB spare) */
    uint32_t s0 = (uint32_t)__cvta_generic_to_shared(smem);
    uint32_t sbase = (s0 + 1023) & ~1023u, sscale = sbase + MF_STAGES * MF_STAGE;
    const float *scl = (const float *)(smem + (sscale - s0));
    const uint8_t *Bg = FORM == MF_WGRAD ? p.B : p.B + (int64_t)e * p.b_es;

    auto load_stage = [&](int s, int kt) {
        uint32_t sa = sbase + s * MF_STAGE, sb = sa + C::ATILE, ss = sscale + s * 1024;
        int kb = kt0 + kt;
        int64_t k0 = (int64_t)kb * MF_BK;
#pragma unroll
        for (int i = 0; i < MF_BM * 8 / MF_THREADS; i++) { /* A: BM rows of 8 chunks */
            int id = tid + i * MF_THREADS, r = id >> 3, c = id & 7;
            int64_t k = k0 + c * 16;
            bool ok;
            const uint8_t *src;
            if (FORM == MF_WGRAD) {
                ok = m0 + r < p.M;
                src = p.A + (int64_t)(m0 + r) * p.lda + k;
            } else {
                ok = rbeg + r < rend && k < p.K;
                src = p.A + (int64_t)(rbeg + r) * p.lda + k;
            }
            mf_cp16(sa + (uint32_t)(r * 128 + ((c ^ (r & 7)) << 4)), ok ? src : p.A, ok);
        }
#pragma unroll
        for (int i = 0; i < 128 * 8 / MF_THREADS; i++) { /* B: 128 rows of 8 chunks */
            int id = tid + i * MF_THREADS, r = id >> 3, c = id & 7;
            int64_t k = k0 + c * 16;
            bool ok = n0 + r < p.N && (FORM == MF_WGRAD || k < p.K);
            const uint8_t *src = Bg + (int64_t)(n0 + r) * p.ldb + k;
            mf_cp16(sb + (uint32_t)(r * 128 + ((c ^ (r & 7)) << 4)), ok ? src : p.B, ok);
        }
        /* scales: BM of A's rows at ss, then B's (wgrad: 128 columns; else the one weight
         * block this stage reads) at ss + 512 */
        for (int i = tid; i < MF_BM + (FORM == MF_WGRAD ? 128 : 1); i += MF_THREADS) {
            bool ok;
            const float *src;
            uint32_t dst;
            if (i < MF_BM) {
                dst = ss + i * 4;
                if (FORM == MF_WGRAD) {
                    ok = m0 + i < p.M;
                    src = p.sa + (int64_t)kb * p.M + m0 + i;
                } else {
                    ok = rbeg + i < rend;
                    src = p.sa + (int64_t)kb * p.rows + rbeg + i;
                }
            } else {
                int n = i - MF_BM;
                dst = ss + 512 + n * 4;
                if (FORM == MF_WGRAD) {
                    ok = n0 + n < p.N;
                    src = p.sb + (int64_t)kb * p.N + n0 + n;
                } else {
                    ok = true;
                    src = p.sb + (int64_t)e * p.sb_es + (n0 / 128) * p.sb_ns +
                          (int64_t)kb * p.sb_ks;
                }
            }
            mf_cp4(dst, ok ? src : p.sa, ok);
        }
    };

    float acc[64], pa[64], pb[64];
#pragma unroll
    for (int i = 0; i < 64; i++)
        acc[i] = 0.0f, pa[i] = 0.0f, pb[i] = 0.0f;
    constexpr int AHEAD = PIPE ? MF_STAGES - 2 : MF_STAGES - 1;
#pragma unroll
    for (int s = 0; s < AHEAD; s++) {
        if (s < KT)
            load_stage(s, s);
        mf_commit();
    }
    int g = lane >> 2, t4 = lane & 3, rl = wg * 64 + (warp & 3) * 16 + g;
    /* stage kt: wait for its tiles, refill the slot freed AHEAD stages back, issue the four
     * k32 products into part (left in flight) */
    auto issue = [&](float(&part)[64], int kt) {
        mf_wait<AHEAD - 1>();
        /* cp.async wrote through the generic proxy; wgmma reads through the async one */
        fence_proxy_async();
        __syncthreads(); /* also: every thread's reads of the slot refilled below are done */
        int nx = kt + AHEAD;
        if (nx < KT)
            load_stage(nx % MF_STAGES, nx);
        mf_commit();
        int s = kt % MF_STAGES;
        uint32_t sa = sbase + s * MF_STAGE + wg * 64 * 128, sb = sbase + s * MF_STAGE + C::ATILE;
        mf_products(part, sa, sb);
    };
    /* acc += part x scales of stage kt (part's products complete) */
    auto promote = [&](float(&part)[64], int kt) {
        wg_regs(part);
        const float *sc = scl + (kt % MF_STAGES) * 256;
        float2 b[16];
#pragma unroll
        for (int j = 0; j < (FORM == MF_WGRAD ? 16 : 1); j++)
            b[j] = FORM == MF_WGRAD ? *(const float2 *)(sc + 128 + j * 8 + 2 * t4)
                                    : make_float2(sc[128], 0.0f);
        mf_promote<FORM>(acc, part, sc[rl], sc[rl + 8], b);
    };
    if (!PIPE) {
        for (int kt = 0; kt < KT; kt++) {
            issue(pa, kt);
            wg_wait<0>();
            promote(pa, kt);
        }
    } else {
        for (int kt = 0; kt < KT; kt += 2) {
            issue(pa, kt);
            if (kt > 0) {
                wg_wait<1>();
                promote(pb, kt - 1);
            }
            if (kt + 1 < KT) {
                issue(pb, kt + 1);
                wg_wait<1>();
                promote(pa, kt);
            }
        }
        wg_wait<0>();
        if ((KT - 1) % 2 == 0)
            promote(pa, KT - 1);
        else
            promote(pb, KT - 1);
    }
    mf_wait<0>();
    mf_store<FORM>(p, acc, e, FORM == MF_WGRAD ? m0 + rl : rbeg + rl, rend, n0);
}

/* ---- the warp-specialised persistent kernel with TMA loads (variant 3) ----
 *
 * kernels/moe_gemm's moe_wstma_kernel for FP8: one block an SM loops over the 128 x 128
 * output tiles (tile t, t + grid, ...; mg_sched_tile's order, row tiles of 128). Thread 0 of
 * warpgroup 0 waits for a free slot of a 6-stage ring, announces the stage's 32 KB on its
 * "full" mbarrier and issues two bulk tensor copies (tensor maps made on the host, 128-byte
 * swizzle): 128 rows of A and 128 rows of B, 128 E4M3 codes (128 bytes, the swizzle's row)
 * a row, which land exactly as load_stage's cp.async writes them (row r at 128 r, 16-byte
 * chunk c at c ^ (r & 7)). Warpgroups 1 and 2 multiply rows 0-63 and 64-127: per stage four
 * wgmma m64n128k32 into a fresh partial, wait, release the slot ("empty", one arrival a
 * warp), promote partial x scales into acc (mf_promote): moe_fp8_kernel's products in the
 * same order, so the outputs are bitwise those of variants 0 and 2. While one warpgroup
 * promotes, the other's products run.
 * Scales are read by the consumers with plain loads from global memory, issued before the
 * stage's barrier wait so their latency hides behind it: the activations' [blocks x rows]
 * scales have a row stride of `rows` floats, in general no multiple of the 16 bytes a
 * tensor map needs, and a thread needs few (its two rows' and fprop/dgrad's one weight
 * block; wgrad's 16 column pairs, the same for the 8 threads of a column group, L1 hits).
 * Ragged experts (as moe_wstma_kernel): A's map covers all rows; a fprop/dgrad row tile that
 * runs past its expert's end reads the next expert's rows (or zeros past the last) and those
 * output rows are not written; tails of K, N and M past the tensors' edges come zero-filled;
 * wgrad's token tiles are zero codes past an expert's rows already. */
#define MT_STAGES 6
#define MT_THREADS 384
#define MT_STAGE (2 * MF_TILE) /* A then B, 128 x 128 codes each */

static size_t mt_smem(int E)
{
    return 1024 + (size_t)MT_STAGES * MT_STAGE + 2 * ((size_t)E + 1) * sizeof(int);
}

template <int FORM>
__global__ void __launch_bounds__(MT_THREADS, 1)
    moe_fp8_tma_kernel(const mf_args p, const __grid_constant__ CUtensorMap ta,
                       const __grid_constant__ CUtensorMap tb)
{
    constexpr bool WGRAD = FORM == MF_WGRAD;
    extern __shared__ __align__(1024) unsigned char smem[];
    __shared__ __align__(8) uint64_t bars[2 * MT_STAGES]; /* full[s], then empty[s] */
    int tid = threadIdx.x, lane = tid & 31, wg = tid >> 7;
    /* full: the issuing thread's arrive (+ the bytes). With row tiles of 128, s_ts is also
     * wgrad's token-tile starts (p.tstart). */
    mg_ring rg = mg_ring_init<MT_STAGES, 128>(smem, bars, MT_STAGE, 1, p.off, p.E);
    uint32_t sbase = rg.base, full0 = rg.full0, empty0 = rg.empty0;
    const int *s_off = rg.s_off, *s_ts = rg.s_ts;
    int ntn = (p.N + MF_BN - 1) / MF_BN, ntm = (p.M + 127) / 128;
    int T = mg_sched_count<WGRAD>(s_ts, p.E, ntm, ntn);
    /* tile t; its K blocks kb0 .. kb0 + KT - 1 (wgrad: the expert's token tiles) */
    auto tile = [&](int t, int &kb0, int &KT) {
        mg_tile x = mg_sched_tile<128, MF_BN, WGRAD>(s_off, s_ts, p.E, ntm, ntn, t);
        kb0 = WGRAD ? s_ts[x.e] : 0;
        KT = WGRAD ? s_ts[x.e + 1] - kb0 : (p.K + MF_BK - 1) / MF_BK;
        return x;
    };
    if (wg == 0) { /* producer: thread 0 alone */
        if (!mg_tma_producer(&ta, &tb))
            return;
        uint32_t it = 0;
        for (int t = blockIdx.x; t < T; t += gridDim.x) {
            int kb0, KT;
            mg_tile x = tile(t, kb0, KT);
            for (int kt = 0; kt < KT; kt++, it++) {
                int s = it % MT_STAGES;
                uint32_t full = full0 + 8 * s, sa = sbase + s * MT_STAGE;
                mbar_wait(empty0 + 8 * s, ((it / MT_STAGES) & 1) ^ 1);
                mbar_arrive_tx(full, MT_STAGE);
                int k0 = (kb0 + kt) * MF_BK;
                /* A [rows, K] (wgrad [M, ldk]); B E x [N, K] (wgrad 1 x [N, ldk]) */
                tma_load_2d(sa, &ta, full, k0, WGRAD ? x.m0 : x.r0);
                tma_load_3d(sa + MF_TILE, &tb, full, k0, x.n0, WGRAD ? 0 : x.e);
            }
        }
    } else { /* consumers: warpgroup cw owns rows 64 cw .. 64 cw + 63 of each tile */
        mg_regs_consumer();
        int cw = wg - 1, warp = tid >> 5, t4 = lane & 3;
        int rl = cw * 64 + (warp & 3) * 16 + (lane >> 2); /* fragment row g */
        uint32_t it = 0;
        float acc[64], part[64];
#pragma unroll
        for (int i = 0; i < 64; i++)
            part[i] = 0.0f; /* each stage's first wgmma overwrites it (scale-d 0) */
        for (int t = blockIdx.x; t < T; t += gridDim.x) {
            int kb0, KT;
            mg_tile x = tile(t, kb0, KT);
            if (KT == 0)
                continue; /* wgrad of an expert without rows: d_W_e is left as it is */
#pragma unroll
            for (int i = 0; i < 64; i++)
                acc[i] = 0.0f;
            /* the thread's rows and their scales' row stride; past the end: scale 0 */
            int ra = (WGRAD ? x.m0 : x.r0) + rl, rlim = WGRAD ? p.M : x.r1;
            int64_t sld = WGRAD ? p.M : p.rows;
            const float *sbw = p.sb + (int64_t)x.e * p.sb_es + (x.n0 / 128) * p.sb_ns;
            for (int kt = 0; kt < KT; kt++, it++) {
                int s = it % MT_STAGES, kb = kb0 + kt;
                const float *sak = p.sa + (int64_t)kb * sld + ra;
                float a0 = ra < rlim ? sak[0] : 0.0f, a1 = ra + 8 < rlim ? sak[8] : 0.0f;
                float2 b[16];
#pragma unroll
                for (int j = 0; j < (WGRAD ? 16 : 1); j++) {
                    int n = x.n0 + j * 8 + 2 * t4;
                    b[j] = !WGRAD    ? make_float2(sbw[(int64_t)kb * p.sb_ks], 0.0f)
                           : n < p.N ? *(const float2 *)(p.sb + (int64_t)kb * p.N + n)
                                     : make_float2(0.0f, 0.0f);
                }
                mbar_wait(full0 + 8 * s, (it / MT_STAGES) & 1);
                uint32_t st = sbase + s * MT_STAGE, sa = st + cw * 64 * 128, sb = st + MF_TILE;
                mf_products(part, sa, sb);
                wg_wait<0>();
                wg_regs(part);
                if (lane == 0)
                    mbar_arrive(empty0 + 8 * s); /* this warp is done with the slot */
                mf_promote<FORM>(acc, part, a0, a1, b);
            }
            mf_store<FORM>(p, acc, x.e, WGRAD ? x.m0 + rl : x.r0 + rl, x.r1, x.n0);
        }
    }
}

/* ---- quantisers (lib/fp8's rule, fp8_quant.cuh: s = amax / 448, a zero tile 1; q =
 * e4m3(x / s)) ---- */

/* A half-warp per 1x128 tile of a row, eight values a lane: one 16-byte load, one 8-byte
 * store of codes (cols % 16 == 0, so a lane's eight values are all in or all out). */
__global__ void mf_quant_rows_kernel(uint8_t *q, float *s, const bf16 *x, int rows, int cols)
{
    int lane = threadIdx.x & 31, hl = lane & 15, nb = (cols + 127) / 128;
    int64_t tiles = (int64_t)rows * nb;
    int64_t half = ((blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 4);
    int64_t nhalf = ((int64_t)gridDim.x * blockDim.x) >> 4;
    /* the loop bound is the same for both halves of a warp: the shuffles never diverge */
    for (int64_t t0 = half - (lane >> 4); t0 < tiles; t0 += nhalf) {
        int64_t t = t0 + (lane >> 4), r = t / nb;
        int cb = (int)(t % nb), c = cb * 128 + hl * 8;
        bool ok = t < tiles && c < cols;
        float v[8];
        if (ok) {
            uint4 u = *(const uint4 *)(x + r * cols + c);
            const __nv_bfloat162 *h = (const __nv_bfloat162 *)&u;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                float2 f = __bfloat1622float2(h[i]);
                v[2 * i] = f.x, v[2 * i + 1] = f.y;
            }
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++)
                v[i] = 0.0f;
        }
        float sc = fp8_tile_scale(fp8_amax_half(v));
        if (ok) {
            uint2 w;
            w.x = fp8_code4(v[0], v[1], v[2], v[3], sc);
            w.y = fp8_code4(v[4], v[5], v[6], v[7], sc);
            *(uint2 *)(q + r * cols + c) = w;
            if (hl == 0)
                s[(int64_t)cb * rows + r] = sc;
        }
    }
}

/* Prefix sum of the experts' token-tile counts (one warp). */
__global__ void mf_tile_starts_kernel(int *ts, const int *off, int E)
{
    mg_tile_starts<128>(ts, off, E, threadIdx.x);
}

/* The sorted rows of token tile t (tiles numbered over the experts: expert x's are
 * ts[x] .. ts[x+1]-1, each of 128 rows from the expert's first): [*r0, *r1), or *r0 = -1 past
 * the last tile. */
__device__ __forceinline__ void token_tile_rows(const int *ts, const int *off, int E, int t,
                                                int *r0, int *r1)
{
    *r0 = -1;
    if (t < ts[E]) { /* the expert whose tiles hold t: ts[lo] <= t < ts[hi] */
        int lo = 0, hi = E;
        while (hi - lo > 1) {
            int mid = (lo + hi) / 2;
            if (ts[mid] <= t)
                lo = mid;
            else
                hi = mid;
        }
        *r0 = off[lo] + (t - ts[lo]) * 128;
        *r1 = min(*r0 + 128, off[lo + 1]);
    }
}

/* The column-wise quantisers' share of a 128-row tile: v = the 32 values of column col in
 * rows 32 q4 .. 32 q4 + 31 (each column is read by four threads), returning their amax. */
template <int W>
__device__ __forceinline__ float mf_col32(const bf16 (&tile)[128][W], int col, int q4,
                                          float (&v)[32])
{
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 32; i++) {
        v[i] = b2f(tile[q4 * 32 + i][col]);
        amax = fmaxf(amax, fabsf(v[i]));
    }
    return amax;
}

/* The 32 codes of v at scale sc (rows 32 q4 .. 32 q4 + 31 of token tile t, column c0 +
 * col) into qt's row c0 + col (ldk codes a row), 32 bytes. */
__device__ __forceinline__ void mf_codes32(uint8_t *qt, int c0, int col, int64_t ldk, int t,
                                           int q4, const float (&v)[32], float sc)
{
    uint32_t w[8];
#pragma unroll
    for (int i = 0; i < 8; i++)
        w[i] = fp8_code4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3], sc);
    uint4 *dst = (uint4 *)(qt + (int64_t)(c0 + col) * ldk + (int64_t)t * 128 + q4 * 32);
    dst[0] = make_uint4(w[0], w[1], w[2], w[3]);
    dst[1] = make_uint4(w[4], w[5], w[6], w[7]);
}

/* Block (token tile t, 64 columns): the tile's rows through shared memory, each column's
 * 1x128 amax over four quarter-columns, codes written 32 bytes a thread down qt's row. */
__global__ void __launch_bounds__(256) mf_quant_tokens_t_kernel(uint8_t *qt, float *st,
                                                                const bf16 *x, const int *off,
                                                                const int *ts, int E, int cols,
                                                                int64_t ldk)
{
    __shared__ __align__(16) bf16 tile[128][64];
    __shared__ float red[4][64];
    __shared__ int s_r0, s_r1;
    int t = blockIdx.x, c0 = blockIdx.y * 64, tid = threadIdx.x;
    if (tid == 0)
        token_tile_rows(ts, off, E, t, &s_r0, &s_r1);
    __syncthreads();
    int r0 = s_r0, r1 = s_r1;
    if (r0 < 0)
        return;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int id = tid + i * 256, r = id >> 3, ch = id & 7, col = c0 + ch * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r0 + r < r1 && col < cols)
            v = *(const uint4 *)(x + (int64_t)(r0 + r) * cols + col);
        *(uint4 *)&tile[r][ch * 8] = v;
    }
    __syncthreads();
    int col = tid & 63, q4 = tid >> 6;
    float v[32];
    red[q4][col] = mf_col32(tile, col, q4, v);
    __syncthreads();
    float sc = fp8_tile_scale(fmaxf(fmaxf(red[0][col], red[1][col]), fmaxf(red[2][col], red[3][col])));
    if (c0 + col >= cols)
        return;
    if (q4 == 0)
        st[(int64_t)t * cols + c0 + col] = sc;
    mf_codes32(qt, c0, col, ldk, t, q4, v, sc);
}

/* Both quantisations of sorted rows in one read (the operand of a product and of the wgrad
 * that follows): block (token tile t, 128 columns), the tile's rows through shared memory;
 * row-wise, a warp a row: each row's 1x128 amax over the block's columns, codes into
 * q [rows x cols], scales s [blocks x rows] (mf_quant_rows_kernel's); column-wise, each
 * column's amax over the tile's rows, codes into qt [cols x ldk] (rows past the expert's end
 * zero codes), st [tiles x cols] (mf_quant_tokens_t_kernel's). Every row of an expert lies in
 * one of its tiles, so every row the products read gets its codes. */
__global__ void __launch_bounds__(256) mf_quant_both_kernel(uint8_t *q, float *s, uint8_t *qt,
                                                            float *st, const bf16 *x,
                                                            const int *off, const int *ts,
                                                            int E, int rows, int cols,
                                                            int64_t ldk)
{
    __shared__ __align__(16) bf16 tile[128][128 + 8];
    __shared__ float red[4][128];
    __shared__ int s_r0, s_r1;
    int t = blockIdx.x, cb = blockIdx.y, c0 = cb * 128, tid = threadIdx.x;
    if (tid == 0)
        token_tile_rows(ts, off, E, t, &s_r0, &s_r1);
    __syncthreads();
    int r0 = s_r0, r1 = s_r1;
    if (r0 < 0)
        return;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        int id = tid + i * 256, r = id >> 4, ch = id & 15, col = c0 + ch * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r0 + r < r1 && col < cols)
            v = *(const uint4 *)(x + (int64_t)(r0 + r) * cols + col);
        *(uint4 *)&tile[r][ch * 8] = v;
    }
    __syncthreads();
    /* row-wise: warp w rows w, w + 8, ...; lane four columns (cols % 16 == 0: all in or out) */
    int lane = tid & 31, wp = tid >> 5, cl = c0 + lane * 4;
    for (int r = wp; r < r1 - r0; r += 8) {
        float v[4], amax = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            v[i] = b2f(tile[r][lane * 4 + i]);
            amax = fmaxf(amax, fabsf(v[i]));
        }
        amax = warp_max(amax);
        float sc = fp8_tile_scale(amax);
        if (cl < cols)
            *(uint32_t *)(q + (int64_t)(r0 + r) * cols + cl) =
                fp8_code4(v[0], v[1], v[2], v[3], sc);
        if (lane == 0)
            s[(int64_t)cb * rows + r0 + r] = sc;
    }
    /* column-wise: two halves of 64 columns, each as mf_quant_tokens_t_kernel */
    int q4 = tid >> 6;
#pragma unroll 1
    for (int h = 0; h < 2; h++) {
        int col = h * 64 + (tid & 63);
        float v[32];
        red[q4][col] = mf_col32(tile, col, q4, v);
        __syncthreads();
        float sc = fp8_tile_scale(fmaxf(fmaxf(red[0][col], red[1][col]), fmaxf(red[2][col], red[3][col])));
        if (c0 + col < cols) {
            if (q4 == 0)
                st[(int64_t)t * cols + c0 + col] = sc;
            mf_codes32(qt, c0, col, ldk, t, q4, v, sc);
        }
    }
}

/* Block (128x128 block, expert): the block in shared memory (rows padded to 130 values so the
 * transposed reads fall in distinct banks), its amax, then the codes row-wise and transposed,
 * four a thread (O and I multiples of 16: a group of four is all in or all out). */
__global__ void __launch_bounds__(256) mf_quant_w_kernel(uint8_t *q, uint8_t *qt, float *s,
                                                         const bf16 *W, int O, int I)
{
    __shared__ bf16 tile[128][130];
    __shared__ float red[8];
    int ib = blockIdx.x, ob = blockIdx.y, ex = blockIdx.z, tid = threadIdx.x;
    int nbo = (O + 127) / 128, nbi = (I + 127) / 128;
    int64_t base = (int64_t)ex * O * I;
    float amax = 0.0f;
    for (int id = tid; id < 128 * 32; id += 256) {
        int r = id >> 5, c = (id & 31) * 4, o = ob * 128 + r, i = ib * 128 + c;
        __nv_bfloat162 v[2];
        if (o < O && i < I) {
            uint2 u = *(const uint2 *)(W + base + (int64_t)o * I + i);
            v[0] = *(__nv_bfloat162 *)&u.x, v[1] = *(__nv_bfloat162 *)&u.y;
        } else {
            v[0] = v[1] = __floats2bfloat162_rn(0.0f, 0.0f);
        }
        tile[r][c] = v[0].x, tile[r][c + 1] = v[0].y, tile[r][c + 2] = v[1].x,
        tile[r][c + 3] = v[1].y;
        amax = fmaxf(amax, fmaxf(fmaxf(fabsf(b2f(v[0].x)), fabsf(b2f(v[0].y))),
                                 fmaxf(fabsf(b2f(v[1].x)), fabsf(b2f(v[1].y)))));
    }
    amax = warp_max(amax);
    if ((tid & 31) == 0)
        red[tid >> 5] = amax;
    __syncthreads();
    amax = red[0];
    for (int i = 1; i < 8; i++)
        amax = fmaxf(amax, red[i]);
    float sc = fp8_tile_scale(amax);
    if (tid == 0)
        s[((int64_t)ex * nbo + ob) * nbi + ib] = sc;
    if (q)
        for (int id = tid; id < 128 * 32; id += 256) {
            int r = id >> 5, c = (id & 31) * 4, o = ob * 128 + r, i = ib * 128 + c;
            if (o < O && i < I)
                *(uint32_t *)(q + base + (int64_t)o * I + i) =
                    fp8_code2(b2f(tile[r][c]), b2f(tile[r][c + 1]), sc) |
                    (fp8_code2(b2f(tile[r][c + 2]), b2f(tile[r][c + 3]), sc) << 16);
        }
    if (qt) /* a warp writes 128 contiguous bytes of one qt row (its column reads: 4-way) */
        for (int id = tid; id < 128 * 32; id += 256) {
            int r = id >> 5, c = (id & 31) * 4, i = ib * 128 + r, o = ob * 128 + c;
            if (o < O && i < I)
                *(uint32_t *)(qt + base + (int64_t)i * O + o) =
                    fp8_code2(b2f(tile[c][r]), b2f(tile[c + 1][r]), sc) |
                    (fp8_code2(b2f(tile[c + 2][r]), b2f(tile[c + 3][r]), sc) << 16);
        }
}

/* ---- host side ---- */

static int hopper(gpu_ctx *c)
{
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, c->dev) != cudaSuccess)
        return 0;
    return major == 9;
}

extern "C" int gpu_moe_fp8_fits(gpu_ctx *c, int I, int O)
{
    return I > 0 && O > 0 && I % 16 == 0 && O % 16 == 0 && hopper(c);
}

static int bad_shape(dsv3_err *e, const char *what, int I, int O)
{
    return err_set(e, "moe fp8 %s: I=%d O=%d not multiples of 16, or not a Hopper GPU", what,
                   I, O);
}

extern "C" int gpu_moe_fp8_quant_rows(gpu_ctx *c, uint8_t *q, float *s, const gpu_bf16 *x,
                                      int rows, int cols, dsv3_err *e)
{
    if (rows <= 0 || cols <= 0)
        return 0;
    if (cols % 16)
        return err_set(e, "moe fp8 quant: cols %d not a multiple of 16", cols);
    int64_t halves = (int64_t)rows * fp8_blocks(cols);
    mf_quant_rows_kernel<<<grid_for(halves * 16, 256), 256, 0, c->stream>>>(
        q, s, (const bf16 *)x, rows, cols);
    LAUNCH_CHECK("mf_quant_rows", e);
    return 0;
}

extern "C" int gpu_moe_fp8_tile_starts(gpu_ctx *c, const gpu_moe_plan *p, int *tstart,
                                       dsv3_err *e)
{
    mf_tile_starts_kernel<<<1, 32, 0, c->stream>>>(tstart, p->offsets, p->E);
    LAUNCH_CHECK("mf_tile_starts", e);
    return 0;
}

extern "C" int gpu_moe_fp8_quant_tokens_t(gpu_ctx *c, const gpu_moe_plan *p, const int *tstart,
                                          uint8_t *qt, float *st, const gpu_bf16 *x, int cols,
                                          dsv3_err *e)
{
    int64_t nk = (int64_t)p->N * p->k, T = gpu_moe_fp8_tiles(nk, p->E);
    if (nk == 0 || cols <= 0)
        return 0;
    if (cols % 16)
        return err_set(e, "moe fp8 quant: cols %d not a multiple of 16", cols);
    dim3 grid((unsigned)T, (unsigned)((cols + 63) / 64));
    mf_quant_tokens_t_kernel<<<grid, 256, 0, c->stream>>>(qt, st, (const bf16 *)x, p->offsets,
                                                          tstart, p->E, cols, T * 128);
    LAUNCH_CHECK("mf_quant_tokens_t", e);
    return 0;
}

extern "C" int gpu_moe_fp8_quant_both(gpu_ctx *c, const gpu_moe_plan *p, const int *tstart,
                                      uint8_t *q, float *s, uint8_t *qt, float *st,
                                      const gpu_bf16 *x, int cols, dsv3_err *e)
{
    int64_t nk = (int64_t)p->N * p->k, T = gpu_moe_fp8_tiles(nk, p->E);
    if (nk == 0 || cols <= 0)
        return 0;
    if (cols % 16)
        return err_set(e, "moe fp8 quant: cols %d not a multiple of 16", cols);
    dim3 grid((unsigned)T, (unsigned)fp8_blocks(cols));
    mf_quant_both_kernel<<<grid, 256, 0, c->stream>>>(q, s, qt, st, (const bf16 *)x, p->offsets,
                                                      tstart, p->E, (int)nk, cols, T * 128);
    LAUNCH_CHECK("mf_quant_both", e);
    return 0;
}

extern "C" int gpu_moe_fp8_quant_weights(gpu_ctx *c, uint8_t *q, uint8_t *qt, float *s,
                                         const gpu_bf16 *W, int E, int O, int I, dsv3_err *e)
{
    if (E <= 0 || O <= 0 || I <= 0)
        return 0;
    dim3 grid((unsigned)fp8_blocks(I), (unsigned)fp8_blocks(O), (unsigned)E);
    mf_quant_w_kernel<<<grid, 256, 0, c->stream>>>(q, qt, s, (const bf16 *)W, O, I);
    LAUNCH_CHECK("mf_quant_w", e);
    return 0;
}

/* The kernel variant, DSV3_MOE_FP8_KERNEL in the environment (for comparison), else
 * MF_KERNEL_DEFAULT: 0 two warpgroups (128 x 128 tiles), promotion after each stage; 1 the
 * same with the promotion overlapped (PIPE); 2 one warpgroup (64 x 128 tiles, two blocks an
 * SM); 3 warp-specialised and persistent with TMA loads (moe_fp8_tma_kernel; operands whose
 * bases are not 16-byte aligned, which a tensor map cannot take, run variant 2). */
#define MF_KERNEL_TMA 3
#define MF_KERNEL_DEFAULT MF_KERNEL_TMA
static int mf_variant(void)
{
    const char *v = getenv("DSV3_MOE_FP8_KERNEL");
    return v && *v >= '0' && *v <= '3' ? *v - '0' : MF_KERNEL_DEFAULT;
}

static int mf_aligned(const void *p, uintptr_t a)
{
    return ((uintptr_t)p & (a - 1)) == 0;
}

/* moe_fp8_tma_kernel's two maps: A [rows, K] (wgrad [M, ldk]), B E x [N, K] (wgrad 1 x [N,
 * ldk]), boxes of 128 codes x 128 rows. Row strides K or ldk: multiples of 16 bytes. */
static int mt_maps(int form, const mf_args *a, CUtensorMap *ta, CUtensorMap *tb, dsv3_err *e)
{
    tma_encode_fn enc = NULL;
    if (tma_encoder(&enc, e))
        return -1;
    const CUtensorMapDataType U8 = CU_TENSOR_MAP_DATA_TYPE_UINT8;
    int w = form == MF_WGRAD;
    int64_t da[2] = {w ? a->lda : a->K, w ? a->M : a->rows}, sa[1] = {a->lda};
    int64_t db[3] = {w ? a->ldb : a->K, a->N, w ? 1 : a->E};
    int64_t sbb[2] = {a->ldb, w ? a->ldb * a->N : a->b_es};
    return tma_map(enc, ta, U8, 1, a->A, 2, da, sa, MF_BK, 128, e) ||
                   tma_map(enc, tb, U8, 1, a->B, 3, db, sbb, MF_BK, MF_BN, e)
               ? -1
               : 0;
}

/* Persistent: one block an SM at most (DSV3_MOE_WS_GRID=n: at most n, as kernels/moe_gemm,
 * for tests of many tiles a block), over at most `tiles` tiles. */
template <int FORM>
static int mt_launch(gpu_ctx *c, const mf_args &a, int64_t tiles, dsv3_err *e)
{
    CUtensorMap ta, tb;
    if (mt_maps(FORM, &a, &ta, &tb, e))
        return -1;
    size_t smem = mt_smem(a.E);
    CUDA_TRY(cudaFuncSetAttribute(moe_fp8_tma_kernel<FORM>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
             e);
    int grid = c->sm_count > 0 && tiles > c->sm_count ? c->sm_count : (int)tiles;
    const char *cap = getenv("DSV3_MOE_WS_GRID");
    if (cap && atoi(cap) > 0 && atoi(cap) < grid)
        grid = atoi(cap);
    moe_fp8_tma_kernel<FORM><<<grid, MT_THREADS, smem, c->stream>>>(a, ta, tb);
    LAUNCH_CHECK("moe_fp8_tma_kernel", e);
    return 0;
}

/* fwd form: a.rows rows over the experts; wgrad: a.M x a.N tiles per expert. */
template <int FORM>
static int mf_launch(gpu_ctx *c, const mf_args &a, dsv3_err *e)
{
    int v = mf_variant();
    mf_args b = a;
    const char *red = getenv("DSV3_MOE_WGRAD_RED"); /* 0: read-modify-write, for timings */
    b.red = !(red && *red == '0');
    if (v == MF_KERNEL_TMA && !(mf_aligned(a.A, 16) && mf_aligned(a.B, 16)))
        v = 2; /* a tensor map needs 16-byte bases; 2 gives the same bits */
    int bm = v == 2 ? 64 : 128, ntn = (a.N + MF_BN - 1) / MF_BN;
    int rt = FORM == MF_WGRAD ? (a.M + bm - 1) / bm : (a.rows + bm - 1) / bm + a.E;
    if (v == MF_KERNEL_TMA) /* fwd form: at most rt row tiles */
        return mt_launch<FORM>(c, b, (int64_t)rt * ntn * (FORM == MF_WGRAD ? a.E : 1), e);
    dim3 grid = FORM == MF_WGRAD ? dim3((unsigned)(rt * ntn), (unsigned)a.E)
                                 : dim3((unsigned)ntn, (unsigned)rt);
    void (*kern)(const mf_args) = v == 1   ? moe_fp8_kernel<FORM, 1, 2>
                                  : v == 2 ? moe_fp8_kernel<FORM, 0, 1>
                                           : moe_fp8_kernel<FORM, 0, 2>;
    int smem = v == 2 ? mf_cfg<1>::SMEM : mf_cfg<2>::SMEM, threads = v == 2 ? 128 : 256;
    CUDA_TRY(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), e);
    kern<<<grid, threads, smem, c->stream>>>(b);
    LAUNCH_CHECK("moe_fp8_kernel", e);
    return 0;
}

/* fprop and dgrad: rows x K codes times expert blocks [N, K]. */
static int mf_rows_gemm(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *C, const uint8_t *A,
                        const float *sa, const uint8_t *B, const float *sb, int N, int K,
                        int sb_ns, int sb_ks, int sb_es, dsv3_err *e)
{
    int nk = p->N * p->k;
    if (nk == 0)
        return 0;
    mf_args a = {A, B, sa, sb, C, p->offsets, NULL, p->E, 0, N, K, nk,
                 K, K, (int64_t)N * K, sb_es, sb_ns, sb_ks, 0};
    return mf_launch<MF_FWD>(c, a, e);
}

extern "C" int gpu_moe_fp8_gemm_fwd(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *out,
                                    const uint8_t *xq, const float *xs, const uint8_t *wq,
                                    const float *ws, int I, int O, dsv3_err *e)
{
    if (!gpu_moe_fp8_fits(c, I, O))
        return bad_shape(e, "fprop", I, O);
    int nbi = (int)fp8_blocks(I), nbo = (int)fp8_blocks(O);
    return mf_rows_gemm(c, p, out, xq, xs, wq, ws, O, I, nbi, 1, nbo * nbi, e);
}

extern "C" int gpu_moe_fp8_gemm_dgrad(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *d_in,
                                      const uint8_t *dyq, const float *dys, const uint8_t *wtq,
                                      const float *ws, int I, int O, dsv3_err *e)
{
    if (!gpu_moe_fp8_fits(c, I, O))
        return bad_shape(e, "dgrad", I, O);
    int nbi = (int)fp8_blocks(I), nbo = (int)fp8_blocks(O);
    return mf_rows_gemm(c, p, d_in, dyq, dys, wtq, ws, I, O, 1, nbi, nbo * nbi, e);
}

extern "C" int gpu_moe_fp8_gemm_wgrad(gpu_ctx *c, const gpu_moe_plan *p, const int *tstart,
                                      float *d_W, const uint8_t *dytq, const float *dyts,
                                      const uint8_t *xtq, const float *xts, int I, int O,
                                      dsv3_err *e)
{
    if (!gpu_moe_fp8_fits(c, I, O))
        return bad_shape(e, "wgrad", I, O);
    int64_t nk = (int64_t)p->N * p->k, ldk = 128 * gpu_moe_fp8_tiles(nk, p->E);
    if (nk == 0)
        return 0;
    mf_args a = {dytq, xtq, dyts, xts, d_W, p->offsets, tstart, p->E, O, I, 0, (int)nk,
                 ldk, ldk, 0, 0, 0, 0, 0};
    return mf_launch<MF_WGRAD>(c, a, e);
}

/* ---- from bf16 operands, through the scratch buffer ---- */

/* Activation codes + scales of rows x D, and the weights' codes + scales. */
static size_t rows_need(int64_t rows, int E, int64_t D)
{
    return (size_t)(rows * D + fp8_blocks(D) * rows * 4 + (int64_t)E * D * D +
                    (int64_t)E * fp8_blocks(D) * fp8_blocks(D) * 4 + 4 * 256);
}

/* One token-tiled operand of up to D columns. */
static size_t tiles_need(int64_t rows, int E, int64_t D)
{
    int64_t T = gpu_moe_fp8_tiles(rows, E);
    return (size_t)(D * T * 128 + T * D * 4 + 2 * 256);
}

/* The scratch: the tile starts and two token-tiled operands (wgrad; dgrad keeps d_out's in
 * the first), then rows codes (fprop, dgrad) after them. */
static size_t scratch_need(int64_t rows, int E, int64_t D)
{
    return (size_t)(E + 1) * 4 + 256 + 2 * tiles_need(rows, E, D) + rows_need(rows, E, D);
}

extern "C" int gpu_moe_fp8_init(gpu_moe_fp8 *m, int64_t max_rows, int E, int64_t max_dim,
                                dsv3_err *e)
{
    if (scratch_room(&m->buf, &m->bytes, scratch_need(max_rows, E, max_dim), "moe fp8 scratch",
                     e))
        return -1;
    m->max_rows = max_rows, m->max_dim = max_dim, m->E = E;
    m->on = 1;
    m->last_dy = NULL;
    return 0;
}

/* One expert weight's kept codes: q [E, O, I], qt [E, I, O], scales s; valid for
 * generation done. Its last forward input's token tiles: xt, xts (cols I), for pass xdone. */
struct gpu_moe_fp8_w {
    const gpu_bf16 *W;
    int E, O, I;
    uint8_t *buf, *q, *qt;
    float *s;
    unsigned done;
    uint8_t *xbuf, *xt;
    float *xts;
    size_t xcap;
    const gpu_bf16 *x;
    int64_t rows;
    unsigned xdone;
};

extern "C" void gpu_moe_fp8_free(gpu_moe_fp8 *m)
{
    gpu_free(m->buf);
    m->buf = NULL;
    m->bytes = 0;
    m->on = 0;
    for (int i = 0; i < m->n_w; i++) {
        gpu_free(m->w[i].buf);
        gpu_free(m->w[i].xbuf);
    }
    free(m->w);
    m->w = NULL;
    m->n_w = m->cap_w = 0;
    m->last_dy = NULL;
}

extern "C" void gpu_moe_fp8_weights_changed(gpu_moe_fp8 *m)
{
    m->wgen = next_gen(m->wgen);
}

extern "C" void gpu_moe_fp8_new_pass(gpu_moe_fp8 *m, int backward)
{
    m->pass = next_gen(m->pass);
    m->keep_inputs = backward;
    m->last_dy = NULL;
}

/* The entry of W [E, O, I] with its codes (both layouts, one pass) of the current weight
 * generation, made on first use and after gpu_moe_fp8_weights_changed: the same codes a
 * call's own quantisation gives. */
static gpu_moe_fp8_w *mf_kept(gpu_ctx *c, gpu_moe_fp8 *m, const gpu_bf16 *W, int E, int O,
                              int I, dsv3_err *e)
{
    gpu_moe_fp8_w *t = NULL;
    for (int i = 0; i < m->n_w && !t; i++)
        if (m->w[i].W == W && m->w[i].E == E && m->w[i].O == O && m->w[i].I == I)
            t = &m->w[i];
    if (!t) {
        if (!grow_for(&m->w, m->n_w, &m->cap_w, 64)) {
            err_set(e, "moe fp8: out of memory");
            return NULL;
        }
        int64_t n = (int64_t)E * O * I, ns = (int64_t)E * fp8_blocks(O) * fp8_blocks(I);
        size_t bytes = (size_t)(2 * n + ns * 4 + 3 * 256);
        t = &m->w[m->n_w];
        memset(t, 0, sizeof *t);
        if (!(t->buf = (uint8_t *)gpu_malloc(bytes, e))) {
            err_prefix(e, "moe fp8 weight codes");
            return NULL;
        }
        carver k = {t->buf, 0, bytes};
        t->q = (uint8_t *)carve(&k, (size_t)n);
        t->qt = (uint8_t *)carve(&k, (size_t)n);
        t->s = (float *)carve(&k, (size_t)ns * 4);
        t->W = W, t->E = E, t->O = O, t->I = I;
        m->n_w++;
    }
    if (t->done != m->wgen || m->wgen == 0) {
        if (gpu_moe_fp8_quant_weights(c, t->q, t->qt, t->s, W, E, O, I, e))
            return NULL;
        t->done = m->wgen;
    }
    return t;
}

extern "C" int gpu_moe_fp8_takes(gpu_ctx *c, const gpu_moe_fp8 *m, int I, int O)
{
    return m->on && gpu_moe_fp8_fits(c, I, O) && (I < O ? I : O) >= m->min_dim;
}

/* 1: FP8 path; 0: bf16 fallback (off, a shape or an operand the kernels do not take: they
 * read activations 16 bytes and write outputs 8 bytes at a time; or more rows, experts or
 * width than the scratch was sized for at gpu_moe_fp8_init). */
static int mf_use(gpu_ctx *c, const gpu_moe_fp8 *m, const gpu_moe_plan *p, int I, int O,
                  const void *act1, const void *act2, const void *out)
{
    return gpu_moe_fp8_takes(c, m, I, O) && mf_aligned(act1, 16) &&
           mf_aligned(act2, 16) && mf_aligned(out, 8) && (int64_t)p->N * p->k <= m->max_rows &&
           p->E <= m->E && I <= m->max_dim && O <= m->max_dim;
}

/* The scratch's first pieces, the same in dgrad and wgrad: tile starts, a token-tiled
 * operand of `cols` columns (d_out's: dgrad writes it, the wgrad after it reads it). */
typedef struct mf_tiles {
    int *ts;
    uint8_t *q;
    float *s;
} mf_tiles;

static int mf_carve_tiles(carver *k, const gpu_moe_plan *p, int cols, mf_tiles *t)
{
    int64_t T = gpu_moe_fp8_tiles((int64_t)p->N * p->k, p->E);
    t->ts = (int *)carve(k, ((size_t)p->E + 1) * 4);
    t->q = (uint8_t *)carve(k, (size_t)cols * T * 128);
    t->s = (float *)carve(k, (size_t)T * cols * 4);
    return t->s ? 0 : -1;
}

/* Room in t for the token tiles of rows x I. */
static int mf_input_room(gpu_moe_fp8_w *t, int64_t rows, int E, dsv3_err *e)
{
    if (scratch_room(&t->xbuf, &t->xcap, tiles_need(rows, E, t->I), "moe fp8 input codes", e))
        return -1;
    int64_t T = gpu_moe_fp8_tiles(rows, E);
    carver k = {t->xbuf, 0, t->xcap};
    t->xt = (uint8_t *)carve(&k, (size_t)t->I * T * 128);
    t->xts = (float *)carve(&k, (size_t)T * t->I * 4);
    return 0;
}

extern "C" int gpu_moe_fp8_fwd(gpu_ctx *c, gpu_moe_fp8 *m, const gpu_moe_plan *p,
                               gpu_bf16 *out, const gpu_bf16 *in, const gpu_bf16 *W, int I,
                               int O, dsv3_err *e)
{
    if (!mf_use(c, m, p, I, O, in, in, out))
        return gpu_moe_linear_fwd(c, p, out, in, W, I, O, e);
    m->last_dy = NULL;
    int64_t nk = (int64_t)p->N * p->k;
    carver k = {m->buf, 0, m->bytes};
    int *ts = (int *)carve(&k, ((size_t)p->E + 1) * 4);
    uint8_t *xq = (uint8_t *)carve(&k, nk * I);
    float *xs = (float *)carve(&k, fp8_blocks(I) * nk * 4);
    uint8_t *wq = (uint8_t *)carve(&k, (size_t)p->E * O * I);
    float *ws = (float *)carve(&k, p->E * fp8_blocks(O) * fp8_blocks(I) * 4);
    if (!ws)
        return err_set(e, "moe fp8 fprop: scratch too small");
    if (!m->keep)
        return gpu_moe_fp8_quant_rows(c, xq, xs, in, (int)nk, I, e) ||
               gpu_moe_fp8_quant_weights(c, wq, NULL, ws, W, p->E, O, I, e) ||
               gpu_moe_fp8_gemm_fwd(c, p, out, xq, xs, wq, ws, I, O, e);
    gpu_moe_fp8_w *t = mf_kept(c, m, W, p->E, O, I, e);
    if (!t)
        return -1;
    if (!m->keep_inputs)
        return gpu_moe_fp8_quant_rows(c, xq, xs, in, (int)nk, I, e) ||
               gpu_moe_fp8_gemm_fwd(c, p, out, xq, xs, t->q, t->s, I, O, e);
    if (mf_input_room(t, nk, p->E, e) || gpu_moe_fp8_tile_starts(c, p, ts, e) ||
        gpu_moe_fp8_quant_both(c, p, ts, xq, xs, t->xt, t->xts, in, I, e))
        return -1;
    t->x = in, t->rows = nk, t->xdone = m->pass;
    return gpu_moe_fp8_gemm_fwd(c, p, out, xq, xs, t->q, t->s, I, O, e);
}

extern "C" int gpu_moe_fp8_dgrad(gpu_ctx *c, gpu_moe_fp8 *m, const gpu_moe_plan *p,
                                 gpu_bf16 *d_in, const gpu_bf16 *d_out, const gpu_bf16 *W,
                                 int I, int O, dsv3_err *e)
{
    if (!mf_use(c, m, p, I, O, d_out, d_out, d_in))
        return gpu_moe_linear_dgrad(c, p, d_in, d_out, W, I, O, e);
    m->last_dy = NULL;
    int64_t nk = (int64_t)p->N * p->k;
    carver k = {m->buf, 0, m->bytes};
    mf_tiles dt;
    int fail = mf_carve_tiles(&k, p, O, &dt);
    uint8_t *dq = (uint8_t *)carve(&k, nk * O);
    float *ds = (float *)carve(&k, fp8_blocks(O) * nk * 4);
    uint8_t *wtq = (uint8_t *)carve(&k, (size_t)p->E * O * I);
    float *ws = (float *)carve(&k, p->E * fp8_blocks(O) * fp8_blocks(I) * 4);
    if (fail || !ws)
        return err_set(e, "moe fp8 dgrad: scratch too small");
    if (!m->keep)
        return gpu_moe_fp8_quant_rows(c, dq, ds, d_out, (int)nk, O, e) ||
               gpu_moe_fp8_quant_weights(c, NULL, wtq, ws, W, p->E, O, I, e) ||
               gpu_moe_fp8_gemm_dgrad(c, p, d_in, dq, ds, wtq, ws, I, O, e);
    gpu_moe_fp8_w *t = mf_kept(c, m, W, p->E, O, I, e);
    if (!t || gpu_moe_fp8_tile_starts(c, p, dt.ts, e) ||
        gpu_moe_fp8_quant_both(c, p, dt.ts, dq, ds, dt.q, dt.s, d_out, O, e) ||
        gpu_moe_fp8_gemm_dgrad(c, p, d_in, dq, ds, t->qt, t->s, I, O, e))
        return -1;
    m->last_dy = d_out, m->last_rows = nk, m->last_O = O, m->last_w = (int)(t - m->w);
    return 0;
}

extern "C" int gpu_moe_fp8_wgrad(gpu_ctx *c, gpu_moe_fp8 *m, const gpu_moe_plan *p, float *d_W,
                                 const gpu_bf16 *d_out, const gpu_bf16 *in, int I, int O,
                                 dsv3_err *e)
{
    if (!mf_use(c, m, p, I, O, d_out, in, d_W))
        return gpu_moe_linear_wgrad(c, p, d_W, d_out, in, I, O, e);
    int64_t nk = (int64_t)p->N * p->k, T = gpu_moe_fp8_tiles(nk, p->E);
    int dy_kept = m->keep && m->last_dy == d_out && m->last_rows == nk && m->last_O == O;
    m->last_dy = NULL;
    carver k = {m->buf, 0, m->bytes};
    mf_tiles dt;
    int fail = mf_carve_tiles(&k, p, O, &dt);
    uint8_t *xq = (uint8_t *)carve(&k, (size_t)I * T * 128);
    float *xs = (float *)carve(&k, (size_t)T * I * 4);
    if (fail || !xs)
        return err_set(e, "moe fp8 wgrad: scratch too small");
    /* the weight is the one of the dgrad just before, whose forward kept its input */
    const gpu_moe_fp8_w *t = dy_kept ? &m->w[m->last_w] : NULL;
    int x_kept = t && t->I == I && t->x == in && t->rows == nk && t->xdone == m->pass &&
                 m->keep_inputs;
    if (x_kept)
        xq = t->xt, xs = t->xts;
    return gpu_moe_fp8_tile_starts(c, p, dt.ts, e) ||
           (!dy_kept && gpu_moe_fp8_quant_tokens_t(c, p, dt.ts, dt.q, dt.s, d_out, O, e)) ||
           (!x_kept && gpu_moe_fp8_quant_tokens_t(c, p, dt.ts, xq, xs, in, I, e)) ||
           gpu_moe_fp8_gemm_wgrad(c, p, dt.ts, d_W, dt.q, dt.s, xq, xs, I, O, e);
}
