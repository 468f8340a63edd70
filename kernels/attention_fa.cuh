/* attention_fa: the fused Hopper attention backward (DSV3_ATTN_BWD 9 and 10, head dims 96/64;
 * included by kernels/attention.cu after the two-kernel backward, whose pieces it reuses;
 * 10 is the default for document-masked calls on a context set nondet, f3_bwd_pick).
 *
 * FlashAttention-2/3's data flow: one block per 128 keys of one (b, h), two warpgroups of 64
 * keys, over the query tiles of 128 at and below the diagonal (three cp.async stages, two
 * tiles ahead). Each 64-query step computes S^T = K Q^T and dP^T = V dO^T, P^T and dS^T once,
 * and accumulates dV += P^T dO, dK += dS^T Q in registers, as f3_bwd_dkdv_kernel does; dS^T is
 * also stored (bf16, as dS: a query's 128 keys contiguous, 128-byte swizzle) into a 32 KB
 * shared tile. After the tile's two steps both warpgroups meet at a barrier and warpgroup w
 * computes dQ for the tile's queries 64w..64w+63 over all 128 keys (dS from shared memory,
 * K MN-major: m64n96k16 with tnspB), then adds it to an fp32 accumulator in global memory by
 * red.global.add.v4.f32 (lanes pair up by a shuffle so each holds four consecutive columns
 * of one row). A last kernel writes dQ = bf16(scale * accumulator). The second recomputation
 * of Q K^T, dO V^T and P (f3_bwd_dq_kernel) is gone; the price is the accumulator's memset,
 * its read-back, and the reductions in L2 (every key block adds its tile once per query tile),
 * and dQ's summation order varies run to run (atomics: not bit-reproducible, unlike the
 * two-kernel backward).
 * STSM: dS^T goes to shared memory by stmatrix.trans (candidate 9), else by 2-byte stores
 * (candidate 10; the same kernel otherwise, a check on the stmatrix layout).
 * Needs B*T*nh*dk*4 bytes of the context's arena for the accumulator
 * (gpu_attention_bwd_arena_bytes counts them). */

/* Four 8x8 bf16 matrices of a warp's mma fragments stored transposed: lane l gives the row
 * address of matrix l / 8 (row l % 8) */
__device__ __forceinline__ void fa_stsm_x4_t(void *p, uint32_t r0, uint32_t r1, uint32_t r2,
                                             uint32_t r3)
{
#ifdef DSV3_HAVE_WGMMA
    uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(a),
                 "r"(r0), "r"(r1), "r"(r2), "r"(r3)
                 : "memory");
#else
    (void)p, (void)r0, (void)r1, (void)r2, (void)r3;
    __trap();
#endif
}

/* g[0..3] += a..d in L2, one vector reduction (sm_90) */
__device__ __forceinline__ void fa_red_v4(float *g, float a, float b, float c, float d)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(g), "f"(a), "f"(b),
                 "f"(c), "f"(d)
                 : "memory");
#else
    atomicAdd(g, a), atomicAdd(g + 1, b), atomicAdd(g + 2, c), atomicAdd(g + 3, d);
#endif
}

template <int DKP, int DVP>
struct f3f_smem {
    static const int TK = 128, TQ = 128, STAGES = 3;
    static const int KB = TK * DKP * 2, VB = TK * DVP * 2, SB = TQ * TK * 2;
    static const int QB = TQ * DKP * 2, OB = TQ * DVP * 2;
    static const size_t bytes = (size_t)KB + VB + SB + STAGES * (QB + OB + 2 * TQ * 4) + 1024;
};

template <int DKP, int DVP, bool SEG, bool FX, bool STSM>
__global__ void __launch_bounds__(256, 1)
    f3_bwd_fused_kernel(float *dq_acc, bf16 *d_k, bf16 *d_v, const bf16 *d_out, const float *lse,
                        const float *D, const bf16 *q, const bf16 *k, const bf16 *v,
                        const int32_t *seg, int T, int nh, int dk, int dv, float scale, int lpt)
{
    typedef f3f_smem<DKP, DVP> L;
    const int TK = L::TK, TQ = L::TQ, HS = 64, ST = L::STAGES;
    static_assert(DKP == 96, "the dQ product is m64n96");
    extern __shared__ unsigned char smem_raw[];
    unsigned char *Ks = align1024(smem_raw), *Vs = Ks + L::KB, *Ss = Vs + L::VB;
    unsigned char *Qs = Ss + L::SB, *dOs = Qs + ST * L::QB;
    float *lse_s = (float *)(dOs + ST * L::OB), *D_s = lse_s + ST * TQ;
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int h = lpt ? blockIdx.x % nh : blockIdx.y, b = lpt ? blockIdx.x / nh : blockIdx.z;
    const int k0 = (lpt ? blockIdx.y : blockIdx.x) * TK;
    const float sl2 = scale * LOG2E;
    const float *lse_bh = lse + ((int64_t)b * nh + h) * T, *D_bh = D + ((int64_t)b * nh + h) * T;
    const int32_t *sg = SEG ? seg + (int64_t)b * T : NULL;
    const int nq = SEG ? (doc_end(sg, min(k0 + TK - 1, T - 1), T) + TQ - 1) / TQ
                       : (T + TQ - 1) / TQ,
              qt0 = k0 / TQ;
    auto prefetch = [&](int qt) {
        const int st = (qt - qt0) % ST, q0 = qt * TQ;
        if (qt < nq) {
            swz_tile<DKP, TQ, 256>(Qs + st * L::QB, q, b, h, q0, T, nh, dk);
            swz_tile<DVP, TQ, 256>(dOs + st * L::OB, d_out, b, h, q0, T, nh, dv);
            if (threadIdx.x < TQ) {
                int qi = q0 + threadIdx.x;
                lse_s[st * TQ + threadIdx.x] = qi < T ? lse_bh[qi] * LOG2E : 0.0f;
                D_s[st * TQ + threadIdx.x] = qi < T ? D_bh[qi] : 0.0f;
            }
        }
        cp_async_commit();
    };
    swz_tile<DKP, TK, 256>(Ks, k, b, h, k0, T, nh, dk);
    swz_tile<DVP, TK, 256>(Vs, v, b, h, k0, T, nh, dv);
    prefetch(qt0);
    prefetch(qt0 + 1);
    float dK[DKP / 2], dV[DVP / 2];
    wg_zero(dK);
    wg_zero(dV);
    const int kr0 = k0 + wg * 64 + warp * 16 + (lane >> 2), kr1 = kr0 + 8;
    const int sk0 = SEG && kr0 < T ? sg[kr0] : 0, sk1 = SEG && kr1 < T ? sg[kr1] : 0;
    const int kfirst = min(k0 + wg * 64, T - 1), skf = SEG ? sg[kfirst] : 0;
    /* the last key's document of each warpgroup: the dQ product of a step needs to know
     * whether either warpgroup's keys were live in it */
    const int skl0 = SEG ? sg[min(k0 + 63, T - 1)] : 0, skl1 = SEG ? sg[min(k0 + 127, T - 1)] : 0;
    /* this warpgroup's 64 keys in the dS tile: the 128-byte line atom wg */
    unsigned char *Sw = Ss + wg * TQ * 128;
    /* stmatrix: da[kk][m] holds keys 8 (m & 1) + 0..7 x queries 16 kk + 8 (m >> 1) + 0..7 of
     * the warp's; lane l stores row l & 7 of matrix m = l >> 3 (query 16 kk + 8 (m >> 1) +
     * (l & 7), whose swizzle is l & 7 as the other terms are multiples of 8) */
    unsigned char *Stsm = Sw + ((lane >> 4) * 8 + (lane & 7)) * 128 +
                          (((warp * 2 + ((lane >> 3) & 1)) ^ (lane & 7)) << 4);
    for (int qt = qt0; qt < nq; qt++) {
        const int buf = (qt - qt0) % ST, q0 = qt * TQ;
        /* into the stage tile qt - 1 used: its products were all waited for before its
         * middle barrier */
        prefetch(qt + 2);
        cp_async_wait<2>();
        fence_proxy_async();
        __syncthreads(); /* also: every dQ product of tile qt - 1 has read the dS tile */
        const unsigned char *Qb = Qs + buf * L::QB, *dOb = dOs + buf * L::OB;
        const float *ls = lse_s + buf * TQ, *Ds = D_s + buf * TQ;
        const int sq = SEG ? sg[q0] : 0;
        const bool live0 = k0 <= q0 + TQ - 1 && (!SEG || skl0 >= sq);
        const bool live1 = k0 + 64 <= q0 + TQ - 1 && (!SEG || skl1 >= sq);
        const bool live = wg ? live1 : live0;
#pragma unroll
        for (int hs = 0; hs < TQ; hs += HS) {
            if (!live || k0 + wg * 64 > q0 + hs + HS - 1) {
                /* nothing visible: zeros in this warpgroup's part of the step's dS rows */
                const int t = threadIdx.x & 127;
#pragma unroll
                for (int p = 0; p < 4; p++)
                    *(uint4 *)(Sw + (hs + (t >> 3) + 16 * p) * 128 + (t & 7) * 16) =
                        make_uint4(0, 0, 0, 0);
                continue;
            }
            float st[HS / 2], dp[HS / 2];
            wg_fence();
            wg_abt_ss<HS, DKP>(st, Ks, TK, wg * 64, Qb, TQ, hs);
            wg_commit();
            wg_abt_ss<HS, DVP>(dp, Vs, TK, wg * 64, dOb, TQ, hs);
            wg_commit();
            wg_wait<1>(); /* S^T, and the last step's dV and dK, are done */
            wg_regs(st);
            wg_regs(dV);
            wg_regs(dK);
            const bool edge = k0 + wg * 64 + 63 > q0 + hs || q0 + hs + HS > T ||
                              (SEG && skf != sg[min(q0 + hs + HS - 1, T - 1)]);
#pragma unroll
            for (int j = 0; j < HS / 8; j++)
#pragma unroll
                for (int x = 0; x < 4; x++) {
                    int ql = hs + j * 8 + (lane & 3) * 2 + (x & 1);
                    float p = exp2x<FX>(fmaf(st[4 * j + x], sl2, -ls[ql]));
                    if (edge) {
                        int qc = q0 + ql, kr = x < 2 ? kr0 : kr1;
                        if (!(qc < T && kr <= qc && (!SEG || sg[qc] == (x < 2 ? sk0 : sk1))))
                            p = 0;
                    }
                    st[4 * j + x] = p;
                }
            uint32_t pa[HS / 16][4], da[HS / 16][4];
            wg_pack_a<HS>(pa, st);
            wg_fence();
            wg_ab_rs<DVP>(dV, pa, dOb, TQ, hs);
            wg_commit();
            wg_wait<1>(); /* dP^T is done */
            wg_regs(dp);
            f3_bwd_dst<HS>(dp, st, Ds, hs, lane); /* its scale also goes on dQ at the end */
            wg_pack_a<HS>(da, dp);
            /* dS (query rows, key columns) into the tile. Element (key kl,
             * query ql) of this warpgroup lies at line ql, chunk kl / 8 ^ (ql & 7). */
            if (STSM) {
#pragma unroll
                for (int kk = 0; kk < HS / 16; kk++)
                    fa_stsm_x4_t(Stsm + (hs + kk * 16) * 128, da[kk][0], da[kk][1], da[kk][2],
                                 da[kk][3]);
            } else {
#pragma unroll
                for (int j = 0; j < HS / 8; j++)
#pragma unroll
                    for (int x = 0; x < 4; x++) {
                        const int ql = hs + j * 8 + (lane & 3) * 2 + (x & 1);
                        const int kl = warp * 16 + (lane >> 2) + (x & 2) * 4;
                        *(bf16 *)(Sw + ql * 128 + (((kl >> 3) ^ (ql & 7)) << 4) + (kl & 7) * 2) =
                            __float2bfloat16_rn(dp[4 * j + x]);
                    }
            }
            wg_fence();
            wg_ab_rs<DKP>(dK, da, Qb, TQ, hs);
            wg_commit();
        }
        wg_wait<0>();
        wg_regs(dV);
        wg_regs(dK);
        fence_proxy_async(); /* the dS stores, before the products that read them */
        __syncthreads();
        /* dQ of queries qw..qw+63: keys k0 + [0, 16 nk) can precede one of them; nothing
         * to add where neither warpgroup ran the step (its dS rows are all zero) */
        const int qw = q0 + wg * 64, nk = min(TK / 16, (qw + 64 - k0) / 16);
        const bool any = (live0 && k0 <= qw + 63) || (live1 && k0 + 64 <= qw + 63);
        if (any && qw < T && nk > 0) {
            float dq[DKP / 2];
            wg_fence();
            wg_mma<96>::ss<0, 1>(dq, kmaj<128>(Ss, TQ, wg * 64, 0), mnmaj<DKP>(Ks, TK, 0));
            /* all 128 keys even where only the first 64 can be visible (the diagonal tile's
             * first warpgroup): those dS entries are zero, and a product under a condition
             * inside the block would make ptxas serialize every wgmma of the kernel */
#pragma unroll
            for (int kk = 1; kk < TK / 16; kk++)
                wg_mma<96>::ss<1, 1>(dq, kmaj<128>(Ss, TQ, wg * 64, kk), mnmaj<DKP>(Ks, TK, kk * 16));
            wg_commit();
            wg_wait<0>();
            wg_regs(dq);
            /* lane pairs (l, l ^ 1) trade halves: the even lane gets row r0's four columns
             * c..c+3, the odd one row r1's (c = the even lane's column) */
            const int odd = lane & 1, r = qw + warp * 16 + (lane >> 2) + 8 * odd;
            float *arow = dq_acc + (((int64_t)b * T + r) * nh + h) * dk;
#pragma unroll
            for (int j = 0; j < DKP / 8; j++) {
                const float s0 = odd ? dq[4 * j] : dq[4 * j + 2];
                const float s1 = odd ? dq[4 * j + 1] : dq[4 * j + 3];
                const float g0 = __shfl_xor_sync(0xffffffffu, s0, 1);
                const float g1 = __shfl_xor_sync(0xffffffffu, s1, 1);
                const int col = j * 8 + (lane & 2) * 2;
                if (r < T && col < dk) {
                    if (odd)
                        fa_red_v4(arow + col, g0, g1, dq[4 * j + 2], dq[4 * j + 3]);
                    else
                        fa_red_v4(arow + col, dq[4 * j], dq[4 * j + 1], g0, g1);
                }
            }
        }
    }
    wg_wait<0>();
    wg_regs(dV);
    wg_regs(dK);
    f3_store_dkdv<DKP, DVP, false>(d_k, d_v, dK, dV, scale, 1.0f, b, T, nh, h, dk, dv, kr0,
                                   kr1, lane);
}

/* dQ = bf16(scale * accumulator), four elements a thread a pass (n % 4 == 0) */
__global__ void f3_dq_convert_kernel(bf16 *d_q, const float *acc, int64_t n4, float scale)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n4;
         i += (int64_t)gridDim.x * blockDim.x) {
        const float4 a = ((const float4 *)acc)[i];
        uint2 o;
        o.x = pack_bf2(a.x * scale, a.y * scale);
        o.y = pack_bf2(a.z * scale, a.w * scale);
        ((uint2 *)d_q)[i] = o;
    }
}

template <int DKP, int DVP, bool SEG, bool STSM>
static int f3_fused_launch_t(gpu_ctx *c, bf16 *d_q, bf16 *d_k, bf16 *d_v, const bf16 *d_out,
                             const float *lse, const float *D, const bf16 *q, const bf16 *k,
                             const bf16 *v, const int32_t *seg, int B, int T, int nh, int dk,
                             int dv, float scale, int lpt, dsv3_err *e)
{
    typedef f3f_smem<DKP, DVP> L;
    static_assert(L::bytes <= 227 * 1024, "shared memory");
    const size_t n = (size_t)B * T * nh * dk;
    float *acc = (float *)gpu_arena_alloc(c, n * sizeof(float), e); /* the caller resets */
    if (!acc)
        return -1;
    CUDA_TRY(cudaMemsetAsync(acc, 0, n * sizeof(float), c->stream), e);
    CUDA_TRY(cudaFuncSetAttribute(f3_bwd_fused_kernel<DKP, DVP, SEG, true, STSM>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, (int)L::bytes),
             e);
    const int nk = (T + L::TK - 1) / L::TK;
    dim3 g = lpt ? dim3(nh * B, nk) : dim3(nk, nh, B);
    f3_bwd_fused_kernel<DKP, DVP, SEG, true, STSM><<<g, 256, L::bytes, c->stream>>>(
        acc, d_k, d_v, d_out, lse, D, q, k, v, seg, T, nh, dk, dv, scale, lpt);
    LAUNCH_CHECK("attention_bwd fused (sm90)", e);
    const int64_t n4 = (int64_t)(n / 4);
    const unsigned blocks = (unsigned)((n4 + 255) / 256 < 65536 ? (n4 + 255) / 256 : 65536);
    f3_dq_convert_kernel<<<blocks, 256, 0, c->stream>>>(d_q, acc, n4, scale);
    LAUNCH_CHECK("attention_bwd dq convert", e);
    return 0;
}

template <bool STSM>
static int f3_fused_launch(gpu_ctx *c, bf16 *d_q, bf16 *d_k, bf16 *d_v, const bf16 *d_out,
                           const float *lse, const float *D, const bf16 *q, const bf16 *k,
                           const bf16 *v, const int32_t *seg, int B, int T, int nh, int dk, int dv,
                           float scale, int lpt, dsv3_err *e)
{
    if (seg)
        return f3_fused_launch_t<96, 64, true, STSM>(c, d_q, d_k, d_v, d_out, lse, D, q, k, v,
                                                     seg, B, T, nh, dk, dv, scale, lpt, e);
    return f3_fused_launch_t<96, 64, false, STSM>(c, d_q, d_k, d_v, d_out, lse, D, q, k, v, seg,
                                                  B, T, nh, dk, dv, scale, lpt, e);
}
