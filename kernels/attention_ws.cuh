/* attention_ws: the warp-specialised Hopper attention forward (variants 4 and 5 of
 * gpu_attention_set_variant / DSV3_ATTN_FWD), FlashAttention-3's schedule on the tiles,
 * descriptors and softmax of kernels/attention.cu's f3_fwd_kernel. Included by attention.cu
 * (after the Hopper section: swl, kmaj, mnmaj, doc_first, align1024, causal_ntiles, the
 * products wg_abt_ss and wg_ab_rs, and the mask, softmax and epilogue f3_fwd_kernel runs
 * too: f3_softmax, f3_rescale_pack, attn_fwd_store).
 *
 * Block = 128 queries of one (b, h), 384 threads: warpgroup 0 loads (one thread issues TMA
 * bulk tensor copies, the rest exit after giving back their registers), warpgroups 1 and 2
 * each own 64 query rows and multiply. Q arrives once; K and V tiles of 128 keys arrive in
 * two separate rings of ST stages (mbarriers full/empty per stage, the moe_gemm_common
 * scaffolding), so a key tile's K can be refilled once both warpgroups' S = Q K^T is done,
 * before its P V is.
 *
 * The consumers overlap in two ways. Inside a warpgroup: at key tile i it issues S_i = Q K_i^T
 * and O += P_{i-1} V_{i-1} back to back, waits for S_i alone and runs tile i's mask and
 * softmax while P V still runs (P_{i-1} stays in registers, the A operand, until that
 * product is done; O is rescaled by tile i-1's factor before its P V is issued). Across the
 * two: named barriers (bar.sync 1 + w / bar.arrive 1 + other, 256 threads) hand the right to
 * issue products back and forth, so one warpgroup's exponentials run while the other's
 * products occupy the tensor cores (ping-pong). Warpgroup 2 hands warpgroup 1 the first
 * turn, and warpgroup 1 takes warpgroup 2's last hand-over at the end, so both barriers end
 * balanced.
 *
 * Head dims are zero-padded to DKP / DVP by the copies themselves: the tensor maps are 4-D
 * over [B][T][nh][d] with the box's d extent one swizzle atom (64 columns at 128-byte
 * swizzle, 32 at 64-byte), and a box reaching past d or T is zero-filled by TMA; the tiles
 * land in the swizzled layout swz_tile writes (atoms [DP/AW][rows][AW]), which kmaj and
 * mnmaj describe. Variant 4 pads dk <= 128 to 128 (the default kernel's choice), variant 5
 * keeps dk <= 96 at 96 (64-byte swizzle, a quarter fewer Q K^T products); 192/128 alike in
 * both. Documents (seg) as f3_fwd_kernel: key tiles from the block's first document on,
 * a per-element mask on tiles that cross a boundary. */
#ifndef DSV3_ATTENTION_WS_CUH
#define DSV3_ATTENTION_WS_CUH
/* mbarriers, TMA loads, register split, tensor-map encoder; its template parameters are
 * named BM and BN, which attention.cu defines as macros */
#pragma push_macro("BM")
#pragma push_macro("BN")
#undef BM
#undef BN
#include "moe_gemm_common.cuh"
#pragma pop_macro("BN")
#pragma pop_macro("BM")

template <int DKP, int DVP>
struct ws_cfg {
    static const int TM = 128, TN = 128;
    /* stages a ring: what fits 227 KB beside Q at one block an SM */
    static const int ST = DKP + DVP <= 192 ? 3 : 2;
    static const int QB = TM * DKP * 2, KB = TN * DKP * 2, VB = TN * DVP * 2;
    static const size_t bytes = (size_t)QB + ST * (KB + VB) + 1024;
};

/* One 4-D box (d, head, row, sequence) of a [B][T][nh][d] tensor map into shared memory;
 * its bytes complete on bar. */
__device__ __forceinline__ void ws_tma_load_4d(uint32_t dst, const void *map, uint32_t bar, int d0,
                                               int h, int r0, int b)
{
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(dst),
                 "l"(map), "r"(bar), "r"(d0), "r"(h), "r"(r0), "r"(b)
                 : "memory");
}

/* Rows [r0, r0 + ROWS) of head h of sequence b, head dim padded to DP, as the swizzled tile
 * at dst: one box an atom column. */
template <int DP, int ROWS>
__device__ __forceinline__ void ws_load_tile(uint32_t dst, const void *map, uint32_t bar, int b,
                                             int h, int r0)
{
    typedef swl<DP> S;
#pragma unroll
    for (int c = 0; c < DP / S::AW; c++)
        ws_tma_load_4d(dst + c * ROWS * S::SW, map, bar, c * S::AW, h, r0, b);
}

/* The ping-pong's named barriers: ids 1 and 2 (0 is __syncthreads), both consumer
 * warpgroups counted. */
__device__ __forceinline__ void ws_sched_sync(int cw)
{
    asm volatile("bar.sync %0, 256;\n" ::"r"(1 + cw) : "memory");
}
__device__ __forceinline__ void ws_sched_arrive(int cw)
{
    asm volatile("bar.arrive %0, 256;\n" ::"r"(1 + cw) : "memory");
}

/* The consumers' wait on an mbarrier phase: mbar_wait without its trap (a trap path in the
 * consumer region makes ptxas hold it to the launch's 168 registers and spill 192/128).
 * A wait past 2 s of GPU time (a whole launch takes milliseconds) sets stuck and returns,
 * and every later wait of the thread returns at once; the thread then writes NaN for its rows
 * and their lse, so a pipeline bug shows within seconds as a NaN loss (the loader's own waits
 * still trap, after 10 s), never as a hung process or as plausible numbers. */
__device__ __forceinline__ void ws_wait(uint32_t bar, uint32_t parity, bool &stuck)
{
    uint64_t t0 = 0;
    while (!stuck) {
        uint32_t done;
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
        else if (now - t0 > 2000000000ull)
            stuck = true;
    }
}

/* Keeps P's A fragments live (and unmoved) until the product reading them has completed. */
template <int N>
__device__ __forceinline__ void ws_keep(uint32_t (&p)[N][4])
{
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int x = 0; x < 4; x++)
            asm volatile("" : "+r"(p[i][x])::"memory");
}

/* The barriers of ws_fwd_kernel and ws_dq_kernel, set up by thread 0 before any thread
 * uses them: qbar (the loader's one arrival with the bytes of Q, and dO), the K and V
 * rings' full barriers (the same) and empty ones (one arrival a consumer warp), ST stages. */
template <int ST>
__device__ __forceinline__ void ws_init_kv_bars(uint32_t qbar, uint32_t fk0, uint32_t ek0,
                                                uint32_t fv0, uint32_t ev0)
{
    if (threadIdx.x == 0) {
        mbar_init(qbar, 1);
        for (int s = 0; s < ST; s++) {
            mbar_init(fk0 + 8 * s, 1);
            mbar_init(ek0 + 8 * s, 8); /* each consumer warp */
            mbar_init(fv0 + 8 * s, 1);
            mbar_init(ev0 + 8 * s, 8);
        }
        mbar_init_fence();
    }
    __syncthreads();
}

/* The loader's K and V rings (tiles of L::TN keys, L::ST stages): key tile kt0 + i into
 * stage i % ST of each, once the consumers have released the tile the stage held. */
template <typename L, int DKP, int DVP>
__device__ __forceinline__ void ws_load_kv(uint32_t k_s, uint32_t v_s, const CUtensorMap &tk,
                                           const CUtensorMap &tv, uint32_t fk0, uint32_t ek0,
                                           uint32_t fv0, uint32_t ev0, int b, int h, int kt0,
                                           int N)
{
    const int TN = L::TN, ST = L::ST;
    for (int i = 0; i < N; i++) {
        const int s = i % ST, k0 = (kt0 + i) * TN;
        const uint32_t ph = ((i / ST) & 1) ^ 1;
        mbar_wait(ek0 + 8 * s, ph);
        mbar_arrive_tx(fk0 + 8 * s, L::KB);
        ws_load_tile<DKP, TN>(k_s + s * L::KB, &tk, fk0 + 8 * s, b, h, k0);
        mbar_wait(ev0 + 8 * s, ph);
        mbar_arrive_tx(fv0 + 8 * s, L::VB);
        ws_load_tile<DVP, TN>(v_s + s * L::VB, &tv, fv0 + 8 * s, b, h, k0);
    }
}

template <int DKP, int DVP, bool SEG>
__global__ void __launch_bounds__(384, 1)
    ws_fwd_kernel(bf16 *out, float *lse, const int32_t *seg, int T, int nh, int dv, float scale,
                  const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tk,
                  const __grid_constant__ CUtensorMap tv)
{
    typedef ws_cfg<DKP, DVP> L;
    const int TM = L::TM, TN = L::TN, ST = L::ST;
    extern __shared__ unsigned char smem_raw[];
    /* qbar, then fullK[ST], emptyK[ST], fullV[ST], emptyV[ST] */
    __shared__ __align__(8) uint64_t bars[1 + 4 * ST];
    unsigned char *Qs = align1024(smem_raw), *Ks = Qs + L::QB, *Vs = Ks + ST * L::KB;
    const uint32_t qbar = (uint32_t)__cvta_generic_to_shared(bars), fk0 = qbar + 8,
                   ek0 = fk0 + 8 * ST, fv0 = ek0 + 8 * ST, ev0 = fv0 + 8 * ST;
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z, q0 = qt * TM;
    const int ntiles = causal_ntiles(q0, TM, TN, T);
    const int32_t *sg = SEG ? seg + (int64_t)b * T : NULL;
    const int kt0 = SEG ? doc_first(sg, q0) / TN : 0, N = ntiles - kt0;
    ws_init_kv_bars<ST>(qbar, fk0, ek0, fv0, ev0);

    if (wg == 0) { /* the loader */
        if (!mg_tma_producer(&tk, &tv)) /* 40 registers; thread 0 goes on */
            return;
        tma_prefetch(&tq);
        const uint32_t q_s = (uint32_t)__cvta_generic_to_shared(Qs);
        const uint32_t k_s = (uint32_t)__cvta_generic_to_shared(Ks);
        const uint32_t v_s = (uint32_t)__cvta_generic_to_shared(Vs);
        mbar_arrive_tx(qbar, L::QB);
        ws_load_tile<DKP, TM>(q_s, &tq, qbar, b, h, q0);
        ws_load_kv<L, DKP, DVP>(k_s, v_s, tk, tv, fk0, ek0, fv0, ev0, b, h, kt0, N);
        return;
    }

    mg_regs_consumer(); /* 232 registers (192/128 needs about 210) */
    const int cw = wg - 1, other = cw ^ 1;
    float o[DVP / 2];
#pragma unroll
    for (int j = 0; j < DVP / 2; j++) /* not wg_zero: the PTX of this kernel moves */
        o[j] = 0;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0, l1 = 0, a0 = 1, a1 = 1;
    const float sl2 = scale * LOG2E;
    const int wrow = q0 + cw * 64, row0 = wrow + warp * 16 + (lane >> 2), row1 = row0 + 8;
    const int sr0 = SEG && row0 < T ? sg[row0] : 0, sr1 = SEG && row1 < T ? sg[row1] : 0;
    const int slast = SEG ? sg[min(wrow + 63, T - 1)] : 0;
    float s[TN / 2];
    uint32_t pa[TN / 16][4];
    auto issue_s = [&](int i) { /* S_i = Q K_i^T */
        wg_abt_ss<TN, DKP>(s, Qs, TM, cw * 64, Ks + (i % ST) * L::KB, TN, 0);
        wg_commit();
    };
    auto issue_pv = [&](int i) { /* O += P_i V_i */
        wg_ab_rs<DVP>(o, pa, Vs + (i % ST) * L::VB, TN, 0);
        wg_commit();
    };
    auto release = [&](uint32_t bar0, int i) { /* this warp is done with tile i's stage */
        if (lane == 0)
            mbar_arrive(bar0 + 8 * (i % ST));
    };
    bool stuck = false;
    auto full = [&](uint32_t bar0, int i) { ws_wait(bar0 + 8 * (i % ST), (i / ST) & 1, stuck); };

    ws_wait(qbar, 0, stuck);
    if (cw == 1)
        ws_sched_arrive(0); /* warpgroup 1 issues first (FlashAttention-3's start) */
    /* tile 0: S alone */
    full(fk0, 0);
    ws_sched_sync(cw);
    wg_fence();
    issue_s(0);
    ws_sched_arrive(other);
    wg_wait<0>();
    wg_regs(s);
    release(ek0, 0);
    f3_softmax<TN, SEG, true>(s, kt0 * TN, wrow, row0, row1, T, sg, sr0, sr1, slast, sl2, m0, m1,
                              l0, l1, a0, a1);
    for (int i = 1; i < N; i++) {
        f3_rescale_pack<TN, DVP>(o, pa, s, a0, a1); /* O to tile i-1's max; P_{i-1} */
        /* waits and hand-overs outside the products' flight (a divergent wait between two
         * issues would make ptxas serialise them) */
        full(fk0, i);
        full(fv0, i - 1);
        ws_sched_sync(cw);
        wg_regs(o); /* the rescale and the packing done before the fence */
        wg_regs(s);
        ws_keep(pa);
        wg_fence();
        issue_s(i);
        issue_pv(i - 1);
        ws_sched_arrive(other);
        wg_wait<1>(); /* S_i; P_{i-1} V_{i-1} still running */
        wg_regs(s);
        release(ek0, i);
        f3_softmax<TN, SEG, true>(s, (kt0 + i) * TN, wrow, row0, row1, T, sg, sr0, sr1, slast,
                                  sl2, m0, m1, l0, l1, a0, a1);
        wg_wait<0>();
        wg_regs(o);
        ws_keep(pa);
        release(ev0, i - 1);
    }
    f3_rescale_pack<TN, DVP>(o, pa, s, a0, a1);
    full(fv0, N - 1);
    wg_regs(o);
    ws_keep(pa);
    wg_fence();
    issue_pv(N - 1);
    wg_wait<0>();
    wg_regs(o);
    ws_keep(pa);
    release(ev0, N - 1);
    if (cw == 0)
        ws_sched_sync(0); /* warpgroup 2's last hand-over: both barriers end balanced */

    /* a broken pipeline must not pass for a result: NaN rows, NaN lse */
    attn_fwd_store<DVP>(out, lse, o, m0, m1, l0, l1, stuck, row0, row1, b, h, T, nh, dv);
}

/* The map of a [B][T][nh][d] bf16 tensor whose boxes are one swizzle atom of a tile padded
 * to DP (AW columns) by `rows` rows of one head; zero fill past d and T. */
template <int DP>
static int ws_map(tma_encode_fn enc, CUtensorMap *m, const bf16 *base, int B, int T, int nh,
                  int d, int rows, dsv3_err *e)
{
    typedef swl<DP> S;
    const cuuint64_t gd[4] = {(cuuint64_t)d, (cuuint64_t)nh, (cuuint64_t)T, (cuuint64_t)B};
    const cuuint64_t gs[3] = {(cuuint64_t)d * 2, (cuuint64_t)nh * d * 2,
                              (cuuint64_t)T * nh * d * 2};
    const cuuint32_t box[4] = {(cuuint32_t)S::AW, 1, (cuuint32_t)rows, 1}, es[4] = {1, 1, 1, 1};
    CUresult r = enc(m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, (void *)base, gd, gs, box, es,
                     CU_TENSOR_MAP_INTERLEAVE_NONE,
                     S::SW == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B,
                     CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS)
        return err_set(e, "attention: cuTensorMapEncodeTiled failed (%d): B=%d T=%d nh=%d d=%d",
                       (int)r, B, T, nh, d);
    return 0;
}

/* The bulk tensor copies want 16-byte aligned tensors (the rows are: d % 8 == 0). */
static bool ws_aligned(const void *q, const void *k, const void *v)
{
    return (((uintptr_t)q | (uintptr_t)k | (uintptr_t)v) & 15) == 0;
}

template <int DKP, int DVP, bool SEG>
static int ws_fwd_launch_t(gpu_ctx *c, bf16 *out, float *lse, const bf16 *q, const bf16 *k,
                           const bf16 *v, const int32_t *seg, int B, int T, int nh, int dk,
                           int dv, float scale, dsv3_err *e)
{
    typedef ws_cfg<DKP, DVP> L;
    tma_encode_fn enc = NULL;
    CUtensorMap tq, tk, tv;
    if (tma_encoder(&enc, e) || ws_map<DKP>(enc, &tq, q, B, T, nh, dk, L::TM, e) ||
        ws_map<DKP>(enc, &tk, k, B, T, nh, dk, L::TN, e) ||
        ws_map<DVP>(enc, &tv, v, B, T, nh, dv, L::TN, e))
        return -1;
    CUDA_TRY(cudaFuncSetAttribute(ws_fwd_kernel<DKP, DVP, SEG>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, (int)L::bytes),
             e);
    dim3 grid((T + L::TM - 1) / L::TM, nh, B);
    ws_fwd_kernel<DKP, DVP, SEG><<<grid, 384, L::bytes, c->stream>>>(out, lse, seg, T, nh, dv,
                                                                       scale, tq, tk, tv);
    LAUNCH_CHECK("attention_fwd (sm90, warp-specialised)", e);
    return 0;
}

/* Variant 4 (pad96 false: dk <= 128 padded to 128) or 5 (pad96 true: dk <= 96 kept at 96);
 * larger head dims at 192/128. Tensors that are not 16-byte aligned, and head dims below 64,
 * take f3_fwd_kernel. */
static int ws_fwd_launch(gpu_ctx *c, bf16 *out, float *lse, const bf16 *q, const bf16 *k,
                         const bf16 *v, const int32_t *seg, int B, int T, int nh, int dk, int dv,
                         float scale, bool pad96, dsv3_err *e)
{
#define WS_L(DK, DV)                                                                             \
    (seg ? ws_fwd_launch_t<DK, DV, true>(c, out, lse, q, k, v, seg, B, T, nh, dk, dv, scale, e)  \
         : ws_fwd_launch_t<DK, DV, false>(c, out, lse, q, k, v, seg, B, T, nh, dk, dv, scale, e))
    const bool small = dk <= 128 && dv <= 64;
    /* a box wider than the head dim itself (dv 48: 64 columns) is left to f3_fwd_kernel */
    if (!ws_aligned(q, k, v) || dv < 64 || dk < 64)
        return small ? f3_fwd_launch<128, 64>(c, out, lse, q, k, v, seg, B, T, nh, dk, dv, scale, e)
                     : f3_fwd_launch<192, 128>(c, out, lse, q, k, v, seg, B, T, nh, dk, dv, scale,
                                               e);
    if (pad96 && dk <= 96 && dv <= 64)
        return WS_L(96, 64);
    if (small)
        return WS_L(128, 64);
    return WS_L(192, 128);
#undef WS_L
}

#endif
