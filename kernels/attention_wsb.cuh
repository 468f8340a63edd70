/* attention_wsb: the warp-specialised dQ kernel of the Hopper attention backward (candidate
 * 18 of DSV3_ATTN_BWD: candidate 17's dK/dV kernel, then this one). Included by attention.cu
 * after attention_ws.cuh, whose tensor maps (ws_map, ws_aligned), TMA tile loads
 * (ws_load_tile), barriers and K/V loader ring (ws_init_kv_bars, ws_load_kv), ping-pong
 * barriers (ws_sched_sync / ws_sched_arrive), consumer waits (ws_wait) and register split
 * (mg_tma_producer, mg_regs_consumer) it reuses.
 *
 * Why: the cp.async dQ kernel (f3_bwd_dq_kernel) loads in the warps that multiply and meets
 * at a __syncthreads every key tile, so its two warpgroups run in step: both compute their
 * exponentials and dS at the same time while the tensor cores idle, then both queue their
 * products (~45% of the backward at 326 TFLOP/s of the FLOPs it runs, 1B-MoE shape). Here,
 * as in ws_fwd_kernel: block = 128 queries of one (b, h), 384 threads; warpgroup 0 loads
 * (one thread issues TMA copies: Q and dO once, then K and V tiles of 128 keys into two
 * rings of ST stages), warpgroups 1 and 2 own 64 query rows each and hand the right to issue
 * products back and forth (named barriers), so one's softmax-side work runs under the
 * other's products. A key tile takes two turns of a warpgroup: S = Q K^T and dP = dO V^T
 * (then P = exp(S - lse) masked, dS = P (dP - D), V's stage released), and dQ += dS K (then
 * K's stage released). Waiting for each turn's products before the next turn keeps the
 * registers to S, dP and dQ (no spill at 232).
 *
 * The products, their shapes and order, the exponential (ex2.approx) and the dS rounding are
 * those of candidate 17's dQ kernel (f3_bwd_dq_kernel with 128-key steps, Q and dO from
 * shared memory), so its dQ should have 17's bits; test_attention checks it against 17 and
 * the CPU. Causal and document-masked (key tiles from the block's first document on). Head
 * dims 96/64 only (192/128's Q, dO and two K/V stages do not fit beside each other), 16-byte
 * aligned tensors, head dims of at least 64 (one TMA box is a swizzle atom wide); else the
 * caller runs 17. A consumer wait past 2 s of GPU time (ws_wait) writes NaN rows. */
#ifndef DSV3_ATTENTION_WSB_CUH
#define DSV3_ATTENTION_WSB_CUH

template <int DKP, int DVP>
struct wsq_cfg {
    static const int TM = 128, TN = 128, ST = 4; /* 4 stages of K and V beside Q and dO */
    static const int QB = TM * DKP * 2, OB = TM * DVP * 2, KB = TN * DKP * 2, VB = TN * DVP * 2;
    static const size_t bytes = (size_t)QB + OB + ST * (KB + VB) + 1024;
};

/* The register split of OV (one turn a tile: dS, S, dP and dQ live together): the loader at
 * 24, the consumers at 240 (24 x 128 + 240 x 256 = 64512 of 65536); else
 * mg_tma_producer's 40 and mg_regs_consumer's 232. */
template <bool OV>
__device__ __forceinline__ bool ws_producer(const void *ta, const void *tb)
{
    if constexpr (!OV) {
        return mg_tma_producer(ta, tb);
    } else {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
#endif
        if (threadIdx.x != 0)
            return false;
        tma_prefetch(ta);
        tma_prefetch(tb);
        return true;
    }
}
template <bool OV>
__device__ __forceinline__ void ws_regs_consumer()
{
    if constexpr (!OV)
        mg_regs_consumer();
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    else
        asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
#endif
}

template <int DKP, int DVP, bool SEG, bool OV>
__global__ void __launch_bounds__(384, 1)
    ws_dq_kernel(bf16 *d_q, const float *lse, const float *D, const int32_t *seg, int T, int nh,
                 int dk, float scale, int lpt, const __grid_constant__ CUtensorMap tq,
                 const __grid_constant__ CUtensorMap tdo, const __grid_constant__ CUtensorMap tk,
                 const __grid_constant__ CUtensorMap tv)
{
    typedef wsq_cfg<DKP, DVP> L;
    const int TM = L::TM, TN = L::TN, ST = L::ST;
    extern __shared__ unsigned char smem_raw[];
    /* qbar (Q and dO), then fullK[ST], emptyK[ST], fullV[ST], emptyV[ST] */
    __shared__ __align__(8) uint64_t bars[1 + 4 * ST];
    unsigned char *Qs = align1024(smem_raw), *dOs = Qs + L::QB, *Ks = dOs + L::OB;
    unsigned char *Vs = Ks + ST * L::KB;
    const uint32_t qbar = (uint32_t)__cvta_generic_to_shared(bars), fk0 = qbar + 8,
                   ek0 = fk0 + 8 * ST, fv0 = ek0 + 8 * ST, ev0 = fv0 + 8 * ST;
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    /* lpt: grid (nh B, tiles), else (tiles, nh, B); the last queries (the most keys) first */
    const int qt = lpt ? gridDim.y - 1 - blockIdx.y : gridDim.x - 1 - blockIdx.x;
    const int h = lpt ? blockIdx.x % nh : blockIdx.y, b = lpt ? blockIdx.x / nh : blockIdx.z;
    const int q0 = qt * TM;
    const int ntiles = causal_ntiles(q0, TM, TN, T);
    const int32_t *sg = SEG ? seg + (int64_t)b * T : NULL;
    const int kt0 = SEG ? doc_first(sg, q0) / TN : 0, N = ntiles - kt0;
    ws_init_kv_bars<ST>(qbar, fk0, ek0, fv0, ev0);

    if (wg == 0) { /* the loader */
        if (!ws_producer<OV>(&tk, &tv)) /* thread 0 goes on */
            return;
        tma_prefetch(&tq);
        tma_prefetch(&tdo);
        const uint32_t q_s = (uint32_t)__cvta_generic_to_shared(Qs);
        const uint32_t o_s = (uint32_t)__cvta_generic_to_shared(dOs);
        const uint32_t k_s = (uint32_t)__cvta_generic_to_shared(Ks);
        const uint32_t v_s = (uint32_t)__cvta_generic_to_shared(Vs);
        mbar_arrive_tx(qbar, L::QB + L::OB);
        ws_load_tile<DKP, TM>(q_s, &tq, qbar, b, h, q0);
        ws_load_tile<DVP, TM>(o_s, &tdo, qbar, b, h, q0);
        ws_load_kv<L, DKP, DVP>(k_s, v_s, tk, tv, fk0, ek0, fv0, ev0, b, h, kt0, N);
        return;
    }

    ws_regs_consumer<OV>();
    const int cw = wg - 1, other = cw ^ 1;
    const float sl2 = scale * LOG2E;
    const int wrow = q0 + cw * 64, qr0 = wrow + warp * 16 + (lane >> 2), qr1 = qr0 + 8;
    const float *lse_bh = lse + ((int64_t)b * nh + h) * T, *D_bh = D + ((int64_t)b * nh + h) * T;
    const float lse0 = qr0 < T ? lse_bh[qr0] * LOG2E : 0.0f;
    const float lse1 = qr1 < T ? lse_bh[qr1] * LOG2E : 0.0f;
    const float D0 = qr0 < T ? D_bh[qr0] : 0.0f, D1 = qr1 < T ? D_bh[qr1] : 0.0f;
    const int sq0 = SEG && qr0 < T ? sg[qr0] : 0, sq1 = SEG && qr1 < T ? sg[qr1] : 0;
    const int slast = SEG ? sg[min(wrow + 63, T - 1)] : 0;
    float dQ[DKP / 2];
    wg_zero(dQ);
    float sc[TN / 2], dp[TN / 2]; /* the first k-step of S and dP overwrites them */
    uint32_t da[TN / 16][4];
    bool stuck = false;
    auto release = [&](uint32_t bar0, int i) { /* this warp is done with tile i's stage */
        if (lane == 0)
            mbar_arrive(bar0 + 8 * (i % ST));
    };
    auto full = [&](uint32_t bar0, int i) { ws_wait(bar0 + 8 * (i % ST), (i / ST) & 1, stuck); };
    auto issue_sdp = [&](int i) { /* S = Q K_i^T, dP = dO V_i^T: two groups */
        const unsigned char *Kb = Ks + (i % ST) * L::KB, *Vb = Vs + (i % ST) * L::VB;
        wg_abt_ss<TN, DKP>(sc, Qs, TM, cw * 64, Kb, TN, 0);
        wg_commit();
        wg_abt_ss<TN, DVP>(dp, dOs, TM, cw * 64, Vb, TN, 0);
        wg_commit();
    };
    auto issue_dq = [&](int i) { /* dQ += dS_i K_i: one group */
        wg_ab_rs<DKP>(dQ, da, Ks + (i % ST) * L::KB, TN, 0);
        wg_commit();
    };
    /* with S done (dP may run): P, masked on the diagonal tile, past T and across documents;
     * then with dP done: V_i's stage released, dS / scale packed into da (scale goes on dQ at
     * the end; masked entries have P = 0) */
    auto p_ds = [&](int i) {
        const int s0 = (kt0 + i) * TN; /* the tile's first key */
        const bool edge = s0 + TN - 1 > wrow || s0 + TN > T || (SEG && sg[s0] != slast);
#pragma unroll
        for (int j = 0; j < TN / 8; j++)
#pragma unroll
            for (int x = 0; x < 4; x++) {
                float p = exp2x<true>(fmaf(sc[4 * j + x], sl2, -(x < 2 ? lse0 : lse1)));
                if (edge) {
                    int kc = s0 + j * 8 + (lane & 3) * 2 + (x & 1), qr = x < 2 ? qr0 : qr1;
                    if (!(qr < T && kc <= qr && (!SEG || sg[kc] == (x < 2 ? sq0 : sq1))))
                        p = 0;
                }
                sc[4 * j + x] = p;
            }
        wg_wait<0>();
        wg_regs(dp);
        release(ev0, i); /* V_i: dP was its only reader */
        f3_dq_pack_ds<TN>(da, sc, dp, D0, D1);
    };

    ws_wait(qbar, 0, stuck);
    if (cw == 1)
        ws_sched_arrive(0); /* warpgroup 1 issues first */
    if constexpr (!OV) {
        for (int i = 0; i < N; i++) {
            full(fk0, i);
            full(fv0, i);
            ws_sched_sync(cw); /* turn 1: S, dP */
            wg_fence();
            issue_sdp(i);
            ws_sched_arrive(other);
            wg_wait<1>();
            wg_regs(sc);
            p_ds(i);
            ws_sched_sync(cw); /* turn 2: dQ */
            wg_regs(dQ);
            ws_keep(da);
            wg_fence();
            issue_dq(i);
            ws_sched_arrive(other);
            wg_wait<0>();
            wg_regs(dQ);
            ws_keep(da);
            release(ek0, i); /* K_i: S and dQ are done */
        }
    } else {
        /* one turn a tile: dQ of tile i - 1, S and dP of tile i */
        full(fk0, 0);
        full(fv0, 0);
        ws_sched_sync(cw);
        wg_fence();
        issue_sdp(0);
        ws_sched_arrive(other);
        wg_wait<1>();
        wg_regs(sc);
        p_ds(0);
        for (int i = 1; i < N; i++) {
            full(fk0, i);
            full(fv0, i);
            ws_sched_sync(cw);
            wg_regs(dQ);
            ws_keep(da);
            wg_fence();
            issue_dq(i - 1);
            issue_sdp(i);
            ws_sched_arrive(other);
            wg_wait<1>(); /* dQ of tile i - 1 and S of tile i */
            wg_regs(dQ);
            wg_regs(sc);
            ws_keep(da);
            release(ek0, i - 1);
            p_ds(i);
        }
        ws_sched_sync(cw);
        wg_regs(dQ);
        ws_keep(da);
        wg_fence();
        issue_dq(N - 1);
        ws_sched_arrive(other);
        wg_wait<0>();
        wg_regs(dQ);
        ws_keep(da);
        release(ek0, N - 1);
    }
    if (cw == 0)
        ws_sched_sync(0); /* warpgroup 2's last hand-over: both barriers end balanced */

    /* a broken pipeline must not pass for a result: NaN rows */
    const float sc_out = stuck ? __int_as_float(0x7fffffff) : scale;
    store_rows_bf16<DKP, true>(d_q, dQ, sc_out, sc_out, qr0, qr1, b, h, T, nh, dk, lane);
}

/* dK, dV (candidate 20, with ws_dq_kernel after it): f3_bwd_dkdv_kernel's products (17's:
 * 64-query steps, K and V held in registers as the A operands of S^T and dP^T) on the
 * same schedule as ws_dq_kernel (KVR; else, candidate 21, K and V read from shared memory
 * by every product). Block = 128 keys of one (b, h), 384 threads: warp 0 of
 * warpgroup 0 loads (lane 0 issues the TMA copies of K and V once, and of each query tile's
 * Q and dO into a ring of ST stages; the 32 lanes write the tile's lse (times log2 e) and D
 * rows into the stage, zeros past T, before arriving on its barrier); warpgroups 1 and 2
 * own 64 keys each and take turns: S^T = K Q^T with dP^T = V dO^T, then dV += P^T dO with
 * dK += dS^T Q, two turns a step; a warpgroup whose keys all follow a step's queries (or,
 * with documents, a tile's) takes its turns empty, so the hand-overs stay paired. OV
 * (candidate 22, KVR only): one turn a step instead (ws_dkdv_ov). */
template <int DKP, int DVP>
struct wsk_cfg {
    static const int TK = 128, TQ = 128, HS = 64, ST = 4;
    static const int KB = TK * DKP * 2, VB = TK * DVP * 2, QB = TQ * DKP * 2, OB = TQ * DVP * 2;
    static const int SB = QB + OB + 2 * TQ * 4; /* a stage: Q, dO, lse, D */
    static const size_t bytes = (size_t)KB + VB + ST * SB + 1024;
};

/* A consumer lane hands a Q/dO/lse/D stage back: every consumer lane arrives after its own
 * reads (the stage's empty barrier counts all 256 consumer threads). The loader fills lse and
 * D with plain stores (Q and dO come by TMA), so each lane's reads of them must be ordered
 * before the loader's next writes, and a lane's own arrival (release semantics) orders them.
 * One arrival a warp (lane 0's, even after __syncwarp) left compute-sanitizer racecheck
 * reporting the read / next-write pairs of the other lanes (312 hazards, H100 and H200). */
__device__ __forceinline__ void ws_release_stage(uint32_t empty_bar)
{
    mbar_arrive(empty_bar);
}

/* Candidate 22: ws_dkdv_kernel's consumer loop with one turn a 64-query step (K and V in
 * registers). A turn issues the previous step's dV and dK (its P^T and dS^T packed in pa,
 * da), then this step's S^T, waits for dV and dK (S^T keeps the tensor cores busy) and
 * issues dP^T before handing over: the step's exponentials run under its own dP^T and the
 * other warpgroup's products, and a turn carries ~2.6 MFLOP against 20's ~1.3 (half the
 * hand-overs). With all four in flight at once (dK, dV, S^T, dP^T, pa, da, K, V: 216
 * registers) ptxas serialised the products (C7512) and spilled, even at 240 registers; this
 * way at most 184 are in flight, as in 20's first turn: no spill at 232, no C7512/C7515.
 * The pending products are always those of the step just before (a step not live leaves
 * nothing pending), so each accumulator sees 20's (and 17's) products in 20's order: the
 * same bits. Every turn waits for all it issued, so no product is in flight across a
 * branch, a hand-over or a stage release; tile i - 1's stage is released after tile i's
 * first turn (its last step's dV, dK), the last tile's after a final turn that issues the
 * last pending step. Turns a warpgroup: 2 N + 1, the same for both, so the hand-overs stay
 * paired. */
template <int DKP, int DVP, bool SEG>
__device__ __forceinline__ void
    ws_dkdv_ov(float (&dK)[DKP / 2], float (&dV)[DVP / 2], const uint32_t (&ka)[DKP / 16][4],
               const uint32_t (&va)[DVP / 16][4], float (&st)[32], float (&dp)[32],
               uint32_t (&pa)[4][4], uint32_t (&da)[4][4], const unsigned char *S0,
               uint32_t fq0, uint32_t eq0, int qt0, int N, int T, int kw, int kr0, int kr1,
               int sk0, int sk1, int skf, int skl, const int32_t *sg, float sl2, int cw, int lane,
               bool &stuck)
{
    typedef wsk_cfg<DKP, DVP> L;
    const int TQ = L::TQ, HS = L::HS, ST = L::ST, other = cw ^ 1;
    static_assert(L::HS == 64, "pa, da, st, dp are one 64-query step");
    auto stage = [&](int i) { return S0 + (i % ST) * L::SB; };
    auto issue_s = [&](const unsigned char *Qb, int hs) { /* S^T: one group */
        wg_abt<HS, DKP, true>(st, ka, NULL, 0, 0, Qb, TQ, hs);
        wg_commit();
    };
    auto issue_dp = [&](const unsigned char *Qb, int hs) { /* dP^T: one group */
        wg_abt<HS, DVP, true>(dp, va, NULL, 0, 0, Qb + L::QB, TQ, hs);
        wg_commit();
    };
    auto issue_dkv = [&](const unsigned char *Qb, int hs) { /* dV, dK: two groups */
        wg_ab_rs<DVP>(dV, pa, Qb + L::QB, TQ, hs);
        wg_commit();
        wg_ab_rs<DKP>(dK, da, Qb, TQ, hs);
        wg_commit();
    };
    /* with S^T done: P^T in st (20's exponential and masks) */
    auto p_exp = [&](const unsigned char *Qb, int q0, int hs) {
        const float *ls = (const float *)(Qb + L::QB + L::OB);
        const bool edge = kw + 63 > q0 + hs || q0 + hs + HS > T ||
                          (SEG && skf != sg[min(q0 + hs + HS - 1, T - 1)]);
#pragma unroll
        for (int j = 0; j < HS / 8; j++)
#pragma unroll
            for (int x = 0; x < 4; x++) {
                int ql = hs + j * 8 + (lane & 3) * 2 + (x & 1);
                float p = exp2x<true>(fmaf(st[4 * j + x], sl2, -ls[ql]));
                if (edge) {
                    int qc = q0 + ql, kr = x < 2 ? kr0 : kr1;
                    if (!(qc < T && kr <= qc && (!SEG || sg[qc] == (x < 2 ? sk0 : sk1))))
                        p = 0;
                }
                st[4 * j + x] = p;
            }
    };
    auto pack_p = [&]() { wg_pack_a<HS>(pa, st); };
    /* with dP^T done: dS^T / scale in dp (scale goes on dK at the end) */
    auto ds = [&](const unsigned char *Qb, int hs) {
        f3_bwd_dst<HS>(dp, st, (const float *)(Qb + L::QB + L::OB) + TQ, hs, lane);
    };
    auto pack_ds = [&]() { wg_pack_a<HS>(da, dp); };
    auto release = [&](int i) { /* this lane is done with tile i's stage */
        ws_release_stage(eq0 + 8 * (i % ST));
    };
    /* the turn of step (Qb, hs) after the pending step (Pb, phs) */
    auto turn_both = [&](const unsigned char *Qb, int q0, int hs, const unsigned char *Pb,
                         int phs) {
        wg_regs(dV);
        wg_regs(dK);
        ws_keep(pa);
        ws_keep(da);
        wg_fence();
        issue_dkv(Pb, phs);
        issue_s(Qb, hs);
        /* dP^T once dV and dK are done (S^T keeps the tensor cores busy meanwhile): at most
         * 20's registers in flight (with all four at once ptxas serialises them, C7512) */
        wg_wait<1>();
        wg_regs(dV);
        wg_regs(dK);
        ws_keep(pa);
        ws_keep(da);
        wg_fence();
        issue_dp(Qb, hs);
        ws_sched_arrive(other);
        wg_wait<1>(); /* S^T; dP^T still running */
        wg_regs(st);
        p_exp(Qb, q0, hs);
        pack_p();
        wg_wait<0>();
        wg_regs(dp);
        ds(Qb, hs);
        pack_ds();
    };
    auto turn_sdp = [&](const unsigned char *Qb, int q0, int hs) { /* nothing pending */
        wg_fence();
        issue_s(Qb, hs);
        issue_dp(Qb, hs);
        ws_sched_arrive(other);
        wg_wait<1>();
        wg_regs(st);
        p_exp(Qb, q0, hs);
        pack_p();
        wg_wait<0>();
        wg_regs(dp);
        ds(Qb, hs);
        pack_ds();
    };
    auto turn_dkv = [&](const unsigned char *Pb, int phs) { /* the pending step alone */
        wg_regs(dV);
        wg_regs(dK);
        ws_keep(pa);
        ws_keep(da);
        wg_fence();
        issue_dkv(Pb, phs);
        ws_sched_arrive(other);
        wg_wait<0>();
        wg_regs(dV);
        wg_regs(dK);
        ws_keep(pa);
        ws_keep(da);
    };
    bool pend = false; /* pa, da hold the previous step's P^T, dS^T */
    for (int i = 0; i < N; i++) {
        const int q0 = (qt0 + i) * TQ;
        const unsigned char *Qb = stage(i);
        ws_wait(fq0 + 8 * (i % ST), (i / ST) & 1, stuck);
        /* keys all past this tile's last query, or all of documents before its first */
        const bool tlive = kw <= q0 + TQ - 1 && (!SEG || skl >= sg[q0]);
#pragma unroll
        for (int hs = 0; hs < TQ; hs += HS) {
            const bool live = tlive && kw <= q0 + hs + HS - 1;
            /* the pending step: the previous tile's last, or this tile's first */
            const unsigned char *Pb = hs == 0 ? stage(i + ST - 1) : Qb;
            const int phs = hs == 0 ? TQ - HS : hs - HS;
            ws_sched_sync(cw); /* one turn: S^T, dP^T of this step, dV, dK of the last */
            if (live && pend)
                turn_both(Qb, q0, hs, Pb, phs);
            else if (live)
                turn_sdp(Qb, q0, hs);
            else if (pend)
                turn_dkv(Pb, phs);
            else
                ws_sched_arrive(other); /* an empty turn */
            pend = live;
            if (hs == 0 && i > 0)
                release(i - 1); /* its last step's dV, dK are done */
        }
    }
    ws_sched_sync(cw); /* the last turn: the last step's dV, dK */
    if (pend)
        turn_dkv(stage(N + ST - 1), TQ - HS);
    else
        ws_sched_arrive(other);
    if (N > 0)
        release(N - 1);
}

template <int DKP, int DVP, bool SEG, bool KVR, bool OV>
__global__ void __launch_bounds__(384, 1)
    ws_dkdv_kernel(bf16 *d_k, bf16 *d_v, const float *lse, const float *D, const int32_t *seg,
                   int T, int nh, int dk, int dv, float scale,
                   const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tdo,
                   const __grid_constant__ CUtensorMap tk, const __grid_constant__ CUtensorMap tv)
{
    typedef wsk_cfg<DKP, DVP> L;
    static_assert(KVR || !OV, "one turn a step holds K and V in registers");
    const int TK = L::TK, TQ = L::TQ, HS = L::HS, ST = L::ST;
    extern __shared__ unsigned char smem_raw[];
    /* kbar (K and V), then full[ST], empty[ST] */
    __shared__ __align__(8) uint64_t bars[1 + 2 * ST];
    unsigned char *Ks = align1024(smem_raw), *Vs = Ks + L::KB, *S0 = Vs + L::VB;
    const uint32_t kbar = (uint32_t)__cvta_generic_to_shared(bars), fq0 = kbar + 8,
                   eq0 = fq0 + 8 * ST;
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int k0 = blockIdx.x * TK, h = blockIdx.y, b = blockIdx.z;
    const int32_t *sg = SEG ? seg + (int64_t)b * T : NULL;
    /* documents: no query past the end of the block's last key's document sees its keys */
    const int nq = SEG ? (doc_end(sg, min(k0 + TK - 1, T - 1), T) + TQ - 1) / TQ
                       : (T + TQ - 1) / TQ,
              qt0 = k0 / TQ, N = nq - qt0;
    if (threadIdx.x == 0) {
        mbar_init(kbar, 1);
        for (int s = 0; s < ST; s++) {
            mbar_init(fq0 + 8 * s, 32); /* the loading warp's lanes (lane 0 with the bytes) */
            mbar_init(eq0 + 8 * s, 256); /* each consumer thread (ws_release_stage) */
        }
        mbar_init_fence();
    }
    __syncthreads();

    if (wg == 0) { /* the loader: warp 0 */
        mg_regs_producer();
        if (warp != 0)
            return;
        const float *lse_bh = lse + ((int64_t)b * nh + h) * T;
        const float *D_bh = D + ((int64_t)b * nh + h) * T;
        if (lane == 0) {
            tma_prefetch(&tq);
            tma_prefetch(&tdo);
            tma_prefetch(&tk);
            tma_prefetch(&tv);
            mbar_arrive_tx(kbar, L::KB + L::VB);
            ws_load_tile<DKP, TK>((uint32_t)__cvta_generic_to_shared(Ks), &tk, kbar, b, h, k0);
            ws_load_tile<DVP, TK>((uint32_t)__cvta_generic_to_shared(Vs), &tv, kbar, b, h, k0);
        }
        for (int i = 0; i < N; i++) {
            const int s = i % ST, q0 = (qt0 + i) * TQ;
            unsigned char *st = S0 + s * L::SB;
            float *ls = (float *)(st + L::QB + L::OB), *ds = ls + TQ;
            mbar_wait(eq0 + 8 * s, ((i / ST) & 1) ^ 1);
#pragma unroll
            for (int r = lane; r < TQ; r += 32) {
                const int qi = q0 + r;
                ls[r] = qi < T ? lse_bh[qi] * LOG2E : 0.0f;
                ds[r] = qi < T ? D_bh[qi] : 0.0f;
            }
            if (lane == 0) { /* after its own stores: the arrival releases them */
                const uint32_t q_s = (uint32_t)__cvta_generic_to_shared(st);
                mbar_arrive_tx(fq0 + 8 * s, L::QB + L::OB);
                ws_load_tile<DKP, TQ>(q_s, &tq, fq0 + 8 * s, b, h, q0);
                ws_load_tile<DVP, TQ>(q_s + L::QB, &tdo, fq0 + 8 * s, b, h, q0);
            } else {
                mbar_arrive(fq0 + 8 * s);
            }
        }
        return;
    }

    mg_regs_consumer(); /* 232 registers */
    const int cw = wg - 1, other = cw ^ 1;
    const float sl2 = scale * LOG2E;
    const int kw = k0 + cw * 64; /* the warpgroup's first key */
    const int kr0 = kw + warp * 16 + (lane >> 2), kr1 = kr0 + 8;
    const int sk0 = SEG && kr0 < T ? sg[kr0] : 0, sk1 = SEG && kr1 < T ? sg[kr1] : 0;
    const int skf = SEG ? sg[min(kw, T - 1)] : 0, skl = SEG ? sg[min(kw + 63, T - 1)] : 0;
    bool stuck = false;
    ws_wait(kbar, 0, stuck);
    uint32_t ka[KVR ? DKP / 16 : 1][4], va[KVR ? DVP / 16 : 1][4];
    if constexpr (KVR) {
        afrag<DKP>(ka, Ks, TK, cw * 64);
        afrag<DVP>(va, Vs, TK, cw * 64);
    }
    float dK[DKP / 2], dV[DVP / 2];
    wg_zero(dK);
    wg_zero(dV);
    float st[HS / 2], dp[HS / 2]; /* the first k-step overwrites them */
    uint32_t pa[HS / 16][4], da[HS / 16][4];
    if (cw == 1)
        ws_sched_arrive(0); /* warpgroup 1 issues first */
    if constexpr (OV) {
        ws_dkdv_ov<DKP, DVP, SEG>(dK, dV, ka, va, st, dp, pa, da, S0, fq0, eq0, qt0, N, T, kw,
                                  kr0, kr1, sk0, sk1, skf, skl, sg, sl2, cw, lane, stuck);
    } else /* two turns a step (candidates 20, 21) */
    for (int i = 0; i < N; i++) {
        const int q0 = (qt0 + i) * TQ;
        const unsigned char *Qb = S0 + (i % ST) * L::SB, *dOb = Qb + L::QB;
        const float *ls = (const float *)(dOb + L::OB), *Ds = ls + TQ;
        ws_wait(fq0 + 8 * (i % ST), (i / ST) & 1, stuck);
        /* keys all past this tile's last query, or all of documents before its first */
        const bool tlive = kw <= q0 + TQ - 1 && (!SEG || skl >= sg[q0]);
#pragma unroll
        for (int hs = 0; hs < TQ; hs += HS) {
            const bool live = tlive && kw <= q0 + hs + HS - 1;
            ws_sched_sync(cw); /* turn 1: S^T, dP^T (an empty turn where not live) */
            if (!live) {
                ws_sched_arrive(other);
            } else {
                wg_fence();
                wg_abt<HS, DKP, KVR>(st, ka, Ks, TK, cw * 64, Qb, TQ, hs);
                wg_commit();
                wg_abt<HS, DVP, KVR>(dp, va, Vs, TK, cw * 64, dOb, TQ, hs);
                wg_commit();
                ws_sched_arrive(other);
                wg_wait<1>(); /* S^T is done */
                wg_regs(st);
                const bool edge = kw + 63 > q0 + hs || q0 + hs + HS > T ||
                                  (SEG && skf != sg[min(q0 + hs + HS - 1, T - 1)]);
#pragma unroll
                for (int j = 0; j < HS / 8; j++)
#pragma unroll
                    for (int x = 0; x < 4; x++) {
                        int ql = hs + j * 8 + (lane & 3) * 2 + (x & 1);
                        float p = exp2x<true>(fmaf(st[4 * j + x], sl2, -ls[ql]));
                        if (edge) {
                            int qc = q0 + ql, kr = x < 2 ? kr0 : kr1;
                            if (!(qc < T && kr <= qc && (!SEG || sg[qc] == (x < 2 ? sk0 : sk1))))
                                p = 0;
                        }
                        st[4 * j + x] = p;
                    }
                wg_pack_a<HS>(pa, st);
                wg_wait<0>(); /* dP^T is done */
                wg_regs(dp);
                f3_bwd_dst<HS>(dp, st, Ds, hs, lane);
                wg_pack_a<HS>(da, dp);
            }
            ws_sched_sync(cw); /* turn 2: dV, dK */
            if (!live) {
                ws_sched_arrive(other);
            } else {
                wg_regs(dV);
                wg_regs(dK);
                ws_keep(pa);
                ws_keep(da);
                wg_fence();
                wg_ab_rs<DVP>(dV, pa, dOb, TQ, hs);
                wg_commit();
                wg_ab_rs<DKP>(dK, da, Qb, TQ, hs);
                wg_commit();
                ws_sched_arrive(other);
                wg_wait<0>();
                wg_regs(dV);
                wg_regs(dK);
                ws_keep(pa);
                ws_keep(da);
            }
        }
        ws_release_stage(eq0 + 8 * (i % ST)); /* this lane is done with the stage */
    }
    if (cw == 0)
        ws_sched_sync(0); /* warpgroup 2's last hand-over: both barriers end balanced */

    /* a broken pipeline must not pass for a result: NaN rows */
    const float qnan = __int_as_float(0x7fffffff);
    const float ks = stuck ? qnan : scale, vs = stuck ? qnan : 1.0f;
    f3_store_dkdv<DKP, DVP, true>(d_k, d_v, dK, dV, ks, vs, b, T, nh, h, dk, dv, kr0, kr1,
                                  lane);
}

/* dK, dV by ws_dkdv_kernel (D and lse as f3_bwd_dkdv_kernel reads them); grid (key tiles,
 * nh, B), the first keys (the most queries) first. */
template <int DKP, int DVP, bool SEG, bool KVR, bool OV>
static int ws_dkdv_launch(gpu_ctx *c, bf16 *d_k, bf16 *d_v, const bf16 *d_out,
                          const float *lse, const float *D, const bf16 *q, const bf16 *k,
                          const bf16 *v, const int32_t *seg, int B, int T, int nh, int dk,
                          int dv, float scale, dsv3_err *e)
{
    typedef wsk_cfg<DKP, DVP> L;
    static_assert(L::bytes <= 227 * 1024, "shared memory");
    tma_encode_fn enc = NULL;
    CUtensorMap tq, tdo, tk, tv;
    if (tma_encoder(&enc, e) || ws_map<DKP>(enc, &tq, q, B, T, nh, dk, L::TQ, e) ||
        ws_map<DVP>(enc, &tdo, d_out, B, T, nh, dv, L::TQ, e) ||
        ws_map<DKP>(enc, &tk, k, B, T, nh, dk, L::TK, e) ||
        ws_map<DVP>(enc, &tv, v, B, T, nh, dv, L::TK, e))
        return -1;
    CUDA_TRY(cudaFuncSetAttribute(ws_dkdv_kernel<DKP, DVP, SEG, KVR, OV>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, (int)L::bytes),
             e);
    dim3 grid((T + L::TK - 1) / L::TK, nh, B);
    ws_dkdv_kernel<DKP, DVP, SEG, KVR, OV><<<grid, 384, L::bytes, c->stream>>>(
        d_k, d_v, lse, D, seg, T, nh, dk, dv, scale, tq, tdo, tk, tv);
    LAUNCH_CHECK("attention_bwd dk dv (sm90, warp-specialised)", e);
    return 0;
}

/* Whether ws_dq_kernel takes a call: 96/64 tiles, head dims of at least a box (64), 16-byte
 * aligned tensors (the bulk copies). */
static bool ws_dq_fits(const void *q, const void *k, const void *v, const void *d_out, int dk,
                       int dv)
{
    return dk >= 64 && dk <= 96 && dv >= 64 && dv <= 64 && ws_aligned(q, k, v) &&
           ws_aligned(d_out, d_out, d_out);
}

/* dQ by ws_dq_kernel (after the dK/dV kernel: D and lse as f3_bwd_dq_kernel reads them);
 * the grid as f3_bwd_dq_kernel's (lpt: costliest tiles first). */
template <int DKP, int DVP, bool SEG, bool OV>
static int ws_dq_launch(gpu_ctx *c, bf16 *d_q, const bf16 *d_out, const float *lse,
                        const float *D, const bf16 *q, const bf16 *k, const bf16 *v,
                        const int32_t *seg, int B, int T, int nh, int dk, int dv, float scale,
                        int lpt, dsv3_err *e)
{
    typedef wsq_cfg<DKP, DVP> L;
    static_assert(L::bytes <= 227 * 1024, "shared memory");
    tma_encode_fn enc = NULL;
    CUtensorMap tq, tdo, tk, tv;
    if (tma_encoder(&enc, e) || ws_map<DKP>(enc, &tq, q, B, T, nh, dk, L::TM, e) ||
        ws_map<DVP>(enc, &tdo, d_out, B, T, nh, dv, L::TM, e) ||
        ws_map<DKP>(enc, &tk, k, B, T, nh, dk, L::TN, e) ||
        ws_map<DVP>(enc, &tv, v, B, T, nh, dv, L::TN, e))
        return -1;
    CUDA_TRY(cudaFuncSetAttribute(ws_dq_kernel<DKP, DVP, SEG, OV>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, (int)L::bytes),
             e);
    const int nqt = (T + L::TM - 1) / L::TM;
    dim3 grid = lpt ? dim3(nh * B, nqt) : dim3(nqt, nh, B);
    ws_dq_kernel<DKP, DVP, SEG, OV><<<grid, 384, L::bytes, c->stream>>>(d_q, lse, D, seg, T, nh, dk,
                                                                      scale, lpt, tq, tdo, tk, tv);
    LAUNCH_CHECK("attention_bwd dq (sm90, warp-specialised)", e);
    return 0;
}

#endif
