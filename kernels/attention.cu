/* attention: causal flash attention, forward and backward, on mma.sync bf16 tensor-core
 * instructions (m16n8k16, fp32 accumulators) fed by ldmatrix from cp.async-loaded tiles.
 *
 * Tiles of 64 queries x 64 keys; 4 warps, each owning 16 rows. Forward: for each key tile up
 * to the diagonal (double-buffered), S = Q K^T in registers, an online softmax on the
 * accumulators (a row spread over a quad of lanes), P reused in registers as the A operand
 * of P V (FlashAttention-2). Backward: D = rowsum(dO * O); one kernel per key tile
 * accumulates dK, dV over the query tiles; another per query tile accumulates dQ over the
 * key tiles; no atomics, so results are reproducible. Head dims are padded with zeros to
 * the instantiation's DKP / DVP. */
#include "attention.h"
#include "gpuctx_internal.cuh"

#define BM 64
#define BN 64
#define ATT_THREADS 128
#define LOG2E 1.4426950408889634f

/* ---- mma.sync building blocks (sm_80+): fragments whose register layout is known, so
 * the softmax works on the accumulators in registers and P feeds the next product
 * without a trip through shared memory (FlashAttention-2's scheme). ---- */

__device__ __forceinline__ void ldsm_x4(uint32_t &r0, uint32_t &r1, uint32_t &r2, uint32_t &r3,
                                        const bf16 *p)
{
    uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(a));
}

__device__ __forceinline__ void ldsm_x4_t(uint32_t &r0, uint32_t &r1, uint32_t &r2, uint32_t &r3,
                                          const bf16 *p)
{
    uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(a));
}

/* d += a (16x16, row) . b (16x8, col), bf16 in, fp32 accumulate. Accumulator layout: d0,d1
 * at row lane/4, columns 2*(lane%4)+{0,1}; d2,d3 the same columns at row lane/4 + 8. */
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf2(float lo, float hi)
{
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *(uint32_t *)&v;
}

/* 16-byte asynchronous copy global -> shared; src_bytes 0 fills zeros (rows past T). */
__device__ __forceinline__ void cp_async16(void *sm, const void *g, int src_bytes)
{
    uint32_t a = (uint32_t)__cvta_generic_to_shared(sm);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(g),
                 "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit()
{
    asm volatile("cp.async.commit_group;\n" ::);
}

template <int N>
__device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

/* Rows [r0, r0+64) of head h of sequence b of a [B,T,nh,d] tensor into sm[64][ld] by
 * 16-byte asynchronous copies (d % 8 == 0), zeros past T
 * and past d. */
template <int DP, int ROWS = 64>
__device__ __forceinline__ void async_tile(bf16 *sm, int ld, const bf16 *g, int b, int h, int r0,
                                           int T, int nh, int d)
{
    const int chunks = DP / 8;
    for (int t = threadIdx.x; t < ROWS * chunks; t += blockDim.x) {
        int r = t / chunks, cc = (t % chunks) * 8;
        bool in = r0 + r < T && cc < d;
        const bf16 *src = in ? g + (((int64_t)b * T + r0 + r) * nh + h) * d + cc : g;
        cp_async16(sm + r * ld + cc, src, in ? 16 : 0);
    }
}

template <int DKP, int DVP, int WARPS, int STAGES>
struct fa_smem {
    static const int LQ = DKP + 8, LV = DVP + 8, QM = 16 * WARPS;
    static const size_t bytes = (size_t)(QM * LQ + STAGES * 64 * LQ + STAGES * 64 * LV) * 2;
};

/* Forward: block = 16*WARPS queries of one (b, h), 16 rows a warp; the K/V tiles (64 keys,
 * double-buffered with cp.async) are shared by the block's warps; S, P and O live in
 * registers. FlashAttention-2 takes 8 warps for head dim 192, 4 for smaller ones. */
/* QREG: Q's fragments stay in registers (else re-read from shared memory each tile, which
 * frees 48 registers at head dim 192); STAGES: K/V buffers (2: the next tile loads while
 * this one is used); MINB: blocks per SM the register allocation must allow. */
template <int DKP, int DVP, int WARPS, bool QREG, int STAGES, int MINB, bool SEG>
__global__ void __launch_bounds__(32 * WARPS, MINB)
    fa_fwd_kernel(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v,
                  const int32_t *seg, int T, int nh, int dk, int dv, float scale)
{
    typedef fa_smem<DKP, DVP, WARPS, STAGES> L;
    const int QM = L::QM;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *Qs = (bf16 *)smem, *Ks = Qs + QM * L::LQ, *Vs = Ks + STAGES * 64 * L::LQ;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z, q0 = qt * QM;
    int ntiles = (q0 + QM - 1) / BN + 1;
    if (ntiles * BN > T)
        ntiles = (T + BN - 1) / BN;
    const int32_t *sg = SEG ? seg + (int64_t)b * T : NULL;
    async_tile<DKP, QM>(Qs, L::LQ, q, b, h, q0, T, nh, dk);
    async_tile<DKP>(Ks, L::LQ, k, b, h, 0, T, nh, dk);
    async_tile<DVP>(Vs, L::LV, v, b, h, 0, T, nh, dv);
    cp_async_commit();

    uint32_t qf[QREG ? DKP / 16 : 1][4];
    float o[DVP / 8][4];
#pragma unroll
    for (int j = 0; j < DVP / 8; j++)
        o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0, l1 = 0;
    const float sl2 = scale * LOG2E;
    const int row0 = q0 + warp * 16 + (lane >> 2), row1 = row0 + 8;
    /* documents (seg): a key of another document is masked like one past the diagonal */
    const int sr0 = SEG && row0 < T ? sg[row0] : 0, sr1 = SEG && row1 < T ? sg[row1] : 0;

    for (int kt = 0; kt < ntiles; kt++) {
        const int buf = STAGES == 2 ? kt & 1 : 0, k0 = kt * BN;
        if (STAGES == 1) {
            if (kt > 0) { /* the trailing barrier of the last tile freed the buffer */
                async_tile<DKP>(Ks, L::LQ, k, b, h, k0, T, nh, dk);
                async_tile<DVP>(Vs, L::LV, v, b, h, k0, T, nh, dv);
                cp_async_commit();
            }
            cp_async_wait<0>();
        } else if (kt + 1 < ntiles) {
            async_tile<DKP>(Ks + (buf ^ 1) * 64 * L::LQ, L::LQ, k, b, h, k0 + BN, T, nh, dk);
            async_tile<DVP>(Vs + (buf ^ 1) * 64 * L::LV, L::LV, v, b, h, k0 + BN, T, nh, dv);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bf16 *Kb = Ks + buf * 64 * L::LQ, *Vb = Vs + buf * 64 * L::LV;
        if (QREG && kt == 0) {
#pragma unroll
            for (int kk = 0; kk < DKP / 16; kk++)
                ldsm_x4(qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3],
                        Qs + (warp * 16 + (lane & 15)) * L::LQ + kk * 16 + (lane >> 4) * 8);
        }
        float s[BN / 8][4];
#pragma unroll
        for (int j = 0; j < BN / 8; j++)
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0;
#pragma unroll
        for (int kk = 0; kk < DKP / 16; kk++) {
            const int qk = QREG ? kk : 0;
            if (!QREG)
                ldsm_x4(qf[qk][0], qf[qk][1], qf[qk][2], qf[qk][3],
                        Qs + (warp * 16 + (lane & 15)) * L::LQ + kk * 16 + (lane >> 4) * 8);
#pragma unroll
            for (int jj = 0; jj < BN / 16; jj++) {
                uint32_t b0, b1, b2, b3;
                ldsm_x4(b0, b1, b2, b3,
                        Kb + (jj * 16 + (lane & 7) + ((lane >> 4) << 3)) * L::LQ + kk * 16 +
                            ((lane >> 3) & 1) * 8);
                mma16816(s[2 * jj], qf[qk], b0, b1);
                mma16816(s[2 * jj + 1], qf[qk], b2, b3);
            }
        }
        /* scale to log2 units; mask the causal triangle and keys past T */
        const bool edge = SEG || k0 + BN > q0 || k0 + BN > T;
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < BN / 8; j++) {
            int col = k0 + j * 8 + (lane & 3) * 2;
#pragma unroll
            for (int x = 0; x < 4; x++) {
                int cc = col + (x & 1), rr = x < 2 ? row0 : row1;
                float val = s[j][x] * sl2;
                if (edge && (cc > rr || cc >= T || (SEG && sg[cc] != (x < 2 ? sr0 : sr1))))
                    val = -INFINITY;
                s[j][x] = val;
            }
            mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
            mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        /* a row with nothing seen yet keeps m = -inf; guard the -inf - -inf */
        float a0 = mn0 == -INFINITY ? 1.0f : exp2f(m0 - mn0);
        float a1 = mn1 == -INFINITY ? 1.0f : exp2f(m1 - mn1);
        float base0 = mn0 == -INFINITY ? 0.0f : mn0, base1 = mn1 == -INFINITY ? 0.0f : mn1;
        float rs0 = 0, rs1 = 0;
#pragma unroll
        for (int j = 0; j < BN / 8; j++) {
            s[j][0] = exp2f(s[j][0] - base0);
            s[j][1] = exp2f(s[j][1] - base0);
            s[j][2] = exp2f(s[j][2] - base1);
            s[j][3] = exp2f(s[j][3] - base1);
            rs0 += s[j][0] + s[j][1];
            rs1 += s[j][2] + s[j][3];
        }
        l0 = l0 * a0 + rs0;
        l1 = l1 * a1 + rs1;
        m0 = mn0;
        m1 = mn1;
#pragma unroll
        for (int j = 0; j < DVP / 8; j++) {
            o[j][0] *= a0;
            o[j][1] *= a0;
            o[j][2] *= a1;
            o[j][3] *= a1;
        }
        /* O += P V: the S accumulators of n-tiles 2kk, 2kk+1 are P's A fragment for keys
         * 16kk .. 16kk+15 */
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            uint32_t pa[4] = {pack_bf2(s[2 * kk][0], s[2 * kk][1]),
                              pack_bf2(s[2 * kk][2], s[2 * kk][3]),
                              pack_bf2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack_bf2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int jj = 0; jj < DVP / 16; jj++) {
                uint32_t b0, b1, b2, b3;
                ldsm_x4_t(b0, b1, b2, b3,
                          Vb + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * L::LV + jj * 16 +
                              (lane >> 4) * 8);
                mma16816(o[2 * jj], pa, b0, b1);
                mma16816(o[2 * jj + 1], pa, b2, b3);
            }
        }
        __syncthreads(); /* the next prefetch overwrites the buffer just read */
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    float i0 = 1.0f / l0, i1 = 1.0f / l1;
#pragma unroll
    for (int j = 0; j < DVP / 8; j++) {
        int col = j * 8 + (lane & 3) * 2;
        if (col < dv) {
            if (row0 < T)
                *(uint32_t *)(out + (((int64_t)b * T + row0) * nh + h) * dv + col) =
                    pack_bf2(o[j][0] * i0, o[j][1] * i0);
            if (row1 < T)
                *(uint32_t *)(out + (((int64_t)b * T + row1) * nh + h) * dv + col) =
                    pack_bf2(o[j][2] * i1, o[j][3] * i1);
        }
    }
    if ((lane & 3) == 0) {
        if (row0 < T)
            lse[((int64_t)b * nh + h) * T + row0] = (m0 + log2f(l0)) / LOG2E;
        if (row1 < T)
            lse[((int64_t)b * nh + h) * T + row1] = (m1 + log2f(l1)) / LOG2E;
    }
}

/* ---- backward ---- */

/* D[b,h,i] = sum_d dO * O, one warp per row. */
__global__ void attn_bwd_dot_kernel(float *D, const bf16 *d_out, const bf16 *out, int B, int T,
                                    int nh, int dv)
{
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (row >= B * T * nh)
        return;
    /* row enumerates (b, t, h) as the tensor does */
    const bf16 *a = d_out + (int64_t)row * dv, *o = out + (int64_t)row * dv;
    float s = 0;
    for (int d = lane; d < dv; d += 32)
        s += b2f(a[d]) * b2f(o[d]);
    s = warp_sum(s);
    if (lane == 0) {
        int h = row % nh, bt = row / nh, t = bt % T, b = bt / T;
        D[((int64_t)b * nh + h) * T + t] = s;
    }
}

template <int DKP, int DVP>
struct fb_smem {
    static const int LQ = DKP + 8, LV = DVP + 8;
    static const size_t bytes = (size_t)(2 * 64 * LQ + 2 * 64 * LV) * 2 + 2 * 64 * 4;
};

/* dK, dV: block = 64 keys of one (b, h), 4 warps x 16 keys, over the query tiles at and
 * below the diagonal, 32 queries at a time: S^T = K Q^T, dP^T = V dO^T in registers,
 * P^T = exp(S^T - lse), dS^T = P^T (dP^T - D) * scale; dV += P^T dO, dK += dS^T Q. */
template <int DKP, int DVP, bool SEG>
__global__ void __launch_bounds__(ATT_THREADS)
    fa_bwd_dkdv_kernel(bf16 *d_k, bf16 *d_v, const bf16 *d_out, const float *lse,
                       const float *D, const bf16 *q, const bf16 *k, const bf16 *v,
                       const int32_t *seg, int T, int nh, int dk, int dv, float scale)
{
    typedef fb_smem<DKP, DVP> L;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *Ks = (bf16 *)smem, *Qs = Ks + 64 * L::LQ, *Vs = Qs + 64 * L::LQ, *dOs = Vs + 64 * L::LV;
    float *lse_s = (float *)(dOs + 64 * L::LV), *D_s = lse_s + 64;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kt = blockIdx.x, h = blockIdx.y, b = blockIdx.z, k0 = kt * BN;
    const float sl2 = scale * LOG2E;
    const float *lse_bh = lse + ((int64_t)b * nh + h) * T, *D_bh = D + ((int64_t)b * nh + h) * T;
    async_tile<DKP>(Ks, L::LQ, k, b, h, k0, T, nh, dk);
    async_tile<DVP>(Vs, L::LV, v, b, h, k0, T, nh, dv);
    float dK[DKP / 8][4], dV[DVP / 8][4];
#pragma unroll
    for (int j = 0; j < DKP / 8; j++)
        dK[j][0] = dK[j][1] = dK[j][2] = dK[j][3] = 0;
#pragma unroll
    for (int j = 0; j < DVP / 8; j++)
        dV[j][0] = dV[j][1] = dV[j][2] = dV[j][3] = 0;
    const int kr0 = k0 + warp * 16 + (lane >> 2), kr1 = kr0 + 8;
    const int32_t *sg = SEG ? seg + (int64_t)b * T : NULL;
    const int sk0 = SEG && kr0 < T ? sg[kr0] : 0, sk1 = SEG && kr1 < T ? sg[kr1] : 0;
    const int nq = (T + BM - 1) / BM;
    for (int qt = k0 / BM; qt < nq; qt++) {
        const int q0 = qt * BM;
        __syncthreads(); /* the previous tile's readers are done */
        async_tile<DKP>(Qs, L::LQ, q, b, h, q0, T, nh, dk);
        async_tile<DVP>(dOs, L::LV, d_out, b, h, q0, T, nh, dv);
        cp_async_commit();
        if (threadIdx.x < 64) {
            int qi = q0 + threadIdx.x;
            lse_s[threadIdx.x] = qi < T ? lse_bh[qi] * LOG2E : 0.0f;
            D_s[threadIdx.x] = qi < T ? D_bh[qi] : 0.0f;
        }
        cp_async_wait<0>();
        __syncthreads();
#pragma unroll
        for (int qs = 0; qs < BM; qs += 32) {
            float st[4][4], dp[4][4];
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int x = 0; x < 4; x++)
                    st[j][x] = dp[j][x] = 0;
#pragma unroll
            for (int kk = 0; kk < DKP / 16; kk++) {
                uint32_t a[4];
                ldsm_x4(a[0], a[1], a[2], a[3],
                        Ks + (warp * 16 + (lane & 15)) * L::LQ + kk * 16 + (lane >> 4) * 8);
#pragma unroll
                for (int jj = 0; jj < 2; jj++) {
                    uint32_t b0, b1, b2, b3;
                    ldsm_x4(b0, b1, b2, b3,
                            Qs + (qs + jj * 16 + (lane & 7) + ((lane >> 4) << 3)) * L::LQ +
                                kk * 16 + ((lane >> 3) & 1) * 8);
                    mma16816(st[2 * jj], a, b0, b1);
                    mma16816(st[2 * jj + 1], a, b2, b3);
                }
            }
#pragma unroll
            for (int kk = 0; kk < DVP / 16; kk++) {
                uint32_t a[4];
                ldsm_x4(a[0], a[1], a[2], a[3],
                        Vs + (warp * 16 + (lane & 15)) * L::LV + kk * 16 + (lane >> 4) * 8);
#pragma unroll
                for (int jj = 0; jj < 2; jj++) {
                    uint32_t b0, b1, b2, b3;
                    ldsm_x4(b0, b1, b2, b3,
                            dOs + (qs + jj * 16 + (lane & 7) + ((lane >> 4) << 3)) * L::LV +
                                kk * 16 + ((lane >> 3) & 1) * 8);
                    mma16816(dp[2 * jj], a, b0, b1);
                    mma16816(dp[2 * jj + 1], a, b2, b3);
                }
            }
            /* P^T and dS^T in place of st and dp */
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int x = 0; x < 4; x++) {
                    int ql = qs + j * 8 + (lane & 3) * 2 + (x & 1), qc = q0 + ql;
                    int kr = x < 2 ? kr0 : kr1;
                    float p = 0, ds = 0;
                    if (qc < T && kr <= qc && (!SEG || sg[qc] == (x < 2 ? sk0 : sk1))) {
                        p = exp2f(st[j][x] * sl2 - lse_s[ql]);
                        ds = p * (dp[j][x] - D_s[ql]) * scale;
                    }
                    st[j][x] = p;
                    dp[j][x] = ds;
                }
#pragma unroll
            for (int kk = 0; kk < 2; kk++) {
                uint32_t pa[4] = {pack_bf2(st[2 * kk][0], st[2 * kk][1]),
                                  pack_bf2(st[2 * kk][2], st[2 * kk][3]),
                                  pack_bf2(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                                  pack_bf2(st[2 * kk + 1][2], st[2 * kk + 1][3])};
                uint32_t da[4] = {pack_bf2(dp[2 * kk][0], dp[2 * kk][1]),
                                  pack_bf2(dp[2 * kk][2], dp[2 * kk][3]),
                                  pack_bf2(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                                  pack_bf2(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
                const int qrow = qs + kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
                for (int jj = 0; jj < DVP / 16; jj++) {
                    uint32_t b0, b1, b2, b3;
                    ldsm_x4_t(b0, b1, b2, b3, dOs + qrow * L::LV + jj * 16 + (lane >> 4) * 8);
                    mma16816(dV[2 * jj], pa, b0, b1);
                    mma16816(dV[2 * jj + 1], pa, b2, b3);
                }
#pragma unroll
                for (int jj = 0; jj < DKP / 16; jj++) {
                    uint32_t b0, b1, b2, b3;
                    ldsm_x4_t(b0, b1, b2, b3, Qs + qrow * L::LQ + jj * 16 + (lane >> 4) * 8);
                    mma16816(dK[2 * jj], da, b0, b1);
                    mma16816(dK[2 * jj + 1], da, b2, b3);
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < DKP / 8; j++) {
        int col = j * 8 + (lane & 3) * 2;
        if (col < dk) {
            if (kr0 < T)
                *(uint32_t *)(d_k + (((int64_t)b * T + kr0) * nh + h) * dk + col) =
                    pack_bf2(dK[j][0], dK[j][1]);
            if (kr1 < T)
                *(uint32_t *)(d_k + (((int64_t)b * T + kr1) * nh + h) * dk + col) =
                    pack_bf2(dK[j][2], dK[j][3]);
        }
    }
#pragma unroll
    for (int j = 0; j < DVP / 8; j++) {
        int col = j * 8 + (lane & 3) * 2;
        if (col < dv) {
            if (kr0 < T)
                *(uint32_t *)(d_v + (((int64_t)b * T + kr0) * nh + h) * dv + col) =
                    pack_bf2(dV[j][0], dV[j][1]);
            if (kr1 < T)
                *(uint32_t *)(d_v + (((int64_t)b * T + kr1) * nh + h) * dv + col) =
                    pack_bf2(dV[j][2], dV[j][3]);
        }
    }
}

/* dQ: block = 64 queries, 4 warps x 16 queries, over the key tiles up to the diagonal, 32
 * keys at a time: S = Q K^T, dP = dO V^T, dS = P (dP - D) * scale, dQ += dS K. */
template <int DKP, int DVP, bool SEG>
__global__ void __launch_bounds__(ATT_THREADS)
    fa_bwd_dq_kernel(bf16 *d_q, const bf16 *d_out, const float *lse, const float *D,
                     const bf16 *q, const bf16 *k, const bf16 *v, const int32_t *seg, int T,
                     int nh, int dk, int dv, float scale)
{
    typedef fb_smem<DKP, DVP> L;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *Qs = (bf16 *)smem, *Ks = Qs + 64 * L::LQ, *dOs = Ks + 64 * L::LQ, *Vs = dOs + 64 * L::LV;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z, q0 = qt * BM;
    const float sl2 = scale * LOG2E;
    const int qr0 = q0 + warp * 16 + (lane >> 2), qr1 = qr0 + 8;
    const float *lse_bh = lse + ((int64_t)b * nh + h) * T, *D_bh = D + ((int64_t)b * nh + h) * T;
    const float lse0 = qr0 < T ? lse_bh[qr0] * LOG2E : 0.0f, lse1 = qr1 < T ? lse_bh[qr1] * LOG2E : 0.0f;
    const float D0 = qr0 < T ? D_bh[qr0] : 0.0f, D1 = qr1 < T ? D_bh[qr1] : 0.0f;
    const int32_t *sg = SEG ? seg + (int64_t)b * T : NULL;
    const int sq0 = SEG && qr0 < T ? sg[qr0] : 0, sq1 = SEG && qr1 < T ? sg[qr1] : 0;
    async_tile<DKP>(Qs, L::LQ, q, b, h, q0, T, nh, dk);
    async_tile<DVP>(dOs, L::LV, d_out, b, h, q0, T, nh, dv);
    float dQ[DKP / 8][4];
#pragma unroll
    for (int j = 0; j < DKP / 8; j++)
        dQ[j][0] = dQ[j][1] = dQ[j][2] = dQ[j][3] = 0;
    int ntiles = (q0 + BM - 1) / BN + 1;
    if (ntiles * BN > T)
        ntiles = (T + BN - 1) / BN;
    for (int kt = 0; kt < ntiles; kt++) {
        const int k0 = kt * BN;
        __syncthreads();
        async_tile<DKP>(Ks, L::LQ, k, b, h, k0, T, nh, dk);
        async_tile<DVP>(Vs, L::LV, v, b, h, k0, T, nh, dv);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
#pragma unroll
        for (int ks = 0; ks < BN; ks += 32) {
            float sc[4][4], dp[4][4];
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int x = 0; x < 4; x++)
                    sc[j][x] = dp[j][x] = 0;
#pragma unroll
            for (int kk = 0; kk < DKP / 16; kk++) {
                uint32_t a[4];
                ldsm_x4(a[0], a[1], a[2], a[3],
                        Qs + (warp * 16 + (lane & 15)) * L::LQ + kk * 16 + (lane >> 4) * 8);
#pragma unroll
                for (int jj = 0; jj < 2; jj++) {
                    uint32_t b0, b1, b2, b3;
                    ldsm_x4(b0, b1, b2, b3,
                            Ks + (ks + jj * 16 + (lane & 7) + ((lane >> 4) << 3)) * L::LQ +
                                kk * 16 + ((lane >> 3) & 1) * 8);
                    mma16816(sc[2 * jj], a, b0, b1);
                    mma16816(sc[2 * jj + 1], a, b2, b3);
                }
            }
#pragma unroll
            for (int kk = 0; kk < DVP / 16; kk++) {
                uint32_t a[4];
                ldsm_x4(a[0], a[1], a[2], a[3],
                        dOs + (warp * 16 + (lane & 15)) * L::LV + kk * 16 + (lane >> 4) * 8);
#pragma unroll
                for (int jj = 0; jj < 2; jj++) {
                    uint32_t b0, b1, b2, b3;
                    ldsm_x4(b0, b1, b2, b3,
                            Vs + (ks + jj * 16 + (lane & 7) + ((lane >> 4) << 3)) * L::LV +
                                kk * 16 + ((lane >> 3) & 1) * 8);
                    mma16816(dp[2 * jj], a, b0, b1);
                    mma16816(dp[2 * jj + 1], a, b2, b3);
                }
            }
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int x = 0; x < 4; x++) {
                    int kc = k0 + ks + j * 8 + (lane & 3) * 2 + (x & 1);
                    int qr = x < 2 ? qr0 : qr1;
                    float ds = 0;
                    if (qr < T && kc <= qr && (!SEG || sg[kc] == (x < 2 ? sq0 : sq1))) {
                        float p = exp2f(sc[j][x] * sl2 - (x < 2 ? lse0 : lse1));
                        ds = p * (dp[j][x] - (x < 2 ? D0 : D1)) * scale;
                    }
                    dp[j][x] = ds;
                }
#pragma unroll
            for (int kk = 0; kk < 2; kk++) {
                uint32_t da[4] = {pack_bf2(dp[2 * kk][0], dp[2 * kk][1]),
                                  pack_bf2(dp[2 * kk][2], dp[2 * kk][3]),
                                  pack_bf2(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                                  pack_bf2(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
                const int krow = ks + kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
                for (int jj = 0; jj < DKP / 16; jj++) {
                    uint32_t b0, b1, b2, b3;
                    ldsm_x4_t(b0, b1, b2, b3, Ks + krow * L::LQ + jj * 16 + (lane >> 4) * 8);
                    mma16816(dQ[2 * jj], da, b0, b1);
                    mma16816(dQ[2 * jj + 1], da, b2, b3);
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < DKP / 8; j++) {
        int col = j * 8 + (lane & 3) * 2;
        if (col < dk) {
            if (qr0 < T)
                *(uint32_t *)(d_q + (((int64_t)b * T + qr0) * nh + h) * dk + col) =
                    pack_bf2(dQ[j][0], dQ[j][1]);
            if (qr1 < T)
                *(uint32_t *)(d_q + (((int64_t)b * T + qr1) * nh + h) * dk + col) =
                    pack_bf2(dQ[j][2], dQ[j][3]);
        }
    }
}

/* ---- dispatch over the instantiated head dims ---- */

template <int DKP, int DVP, int W, bool QREG, int STAGES, int MINB, bool SEG>
static int fwd_launch_t(gpu_ctx *c, bf16 *out, float *lse, const bf16 *q, const bf16 *k,
                      const bf16 *v, const int32_t *seg, int B, int T, int nh, int dk, int dv,
                      float scale, dsv3_err *e)
{
    const int QM = 16 * W;
    size_t smem = fa_smem<DKP, DVP, W, STAGES>::bytes;
    CUDA_TRY(cudaFuncSetAttribute(fa_fwd_kernel<DKP, DVP, W, QREG, STAGES, MINB, SEG>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
             e);
    dim3 grid((T + QM - 1) / QM, nh, B);
    fa_fwd_kernel<DKP, DVP, W, QREG, STAGES, MINB, SEG><<<grid, 32 * W, smem, c->stream>>>(
        out, lse, q, k, v, seg, T, nh, dk, dv, scale);
    LAUNCH_CHECK("attention_fwd", e);
    return 0;
}

/* Documents (seg) get kernels of their own: the extra registers of the mask would make the
 * plain causal kernels spill. */
template <int DKP, int DVP, int W, bool QREG, int STAGES, int MINB>
static int fwd_launch(gpu_ctx *c, bf16 *out, float *lse, const bf16 *q, const bf16 *k,
                      const bf16 *v, const int32_t *seg, int B, int T, int nh, int dk, int dv,
                      float scale, dsv3_err *e)
{
    if (seg)
        return fwd_launch_t<DKP, DVP, W, QREG, STAGES, MINB, true>(c, out, lse, q, k, v, seg, B,
                                                                   T, nh, dk, dv, scale, e);
    return fwd_launch_t<DKP, DVP, W, QREG, STAGES, MINB, false>(c, out, lse, q, k, v, seg, B, T,
                                                                nh, dk, dv, scale, e);
}

template <int DKP, int DVP, bool SEG>
static int bwd_launch_t(gpu_ctx *c, bf16 *d_q, bf16 *d_k, bf16 *d_v, const bf16 *d_out,
                      const float *lse, const float *D, const bf16 *q, const bf16 *k,
                      const bf16 *v, const int32_t *seg, int B, int T, int nh, int dk, int dv,
                      float scale, dsv3_err *e)
{
    size_t smem = fb_smem<DKP, DVP>::bytes;
    CUDA_TRY(cudaFuncSetAttribute(fa_bwd_dkdv_kernel<DKP, DVP, SEG>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
             e);
    CUDA_TRY(cudaFuncSetAttribute(fa_bwd_dq_kernel<DKP, DVP, SEG>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
             e);
    dim3 grid((T + BM - 1) / BM, nh, B);
    fa_bwd_dkdv_kernel<DKP, DVP, SEG><<<grid, ATT_THREADS, smem, c->stream>>>(
        d_k, d_v, d_out, lse, D, q, k, v, seg, T, nh, dk, dv, scale);
    LAUNCH_CHECK("attention_bwd dk dv", e);
    fa_bwd_dq_kernel<DKP, DVP, SEG><<<grid, ATT_THREADS, smem, c->stream>>>(
        d_q, d_out, lse, D, q, k, v, seg, T, nh, dk, dv, scale);
    LAUNCH_CHECK("attention_bwd dq", e);
    return 0;
}

template <int DKP, int DVP>
static int bwd_launch(gpu_ctx *c, bf16 *d_q, bf16 *d_k, bf16 *d_v, const bf16 *d_out,
                      const float *lse, const float *D, const bf16 *q, const bf16 *k,
                      const bf16 *v, const int32_t *seg, int B, int T, int nh, int dk, int dv,
                      float scale, dsv3_err *e)
{
    if (seg)
        return bwd_launch_t<DKP, DVP, true>(c, d_q, d_k, d_v, d_out, lse, D, q, k, v, seg, B, T,
                                            nh, dk, dv, scale, e);
    return bwd_launch_t<DKP, DVP, false>(c, d_q, d_k, d_v, d_out, lse, D, q, k, v, seg, B, T, nh,
                                         dk, dv, scale, e);
}

static int check_dims(int dk, int dv, dsv3_err *e)
{
    if (dk % 8 || dv % 8 || dk <= 0 || dv <= 0 || dk > 192 || dv > 128)
        return err_set(e, "attention: head dims dk=%d dv=%d unsupported (multiples of 8, "
                          "dk <= 192, dv <= 128)", dk, dv);
    return 0;
}

extern "C" int gpu_attention_fwd(gpu_ctx *c, gpu_bf16 *out, float *lse, const gpu_bf16 *q,
                                 const gpu_bf16 *k, const gpu_bf16 *v, int B, int T, int nh,
                                 int dk, int dv, float scale, dsv3_err *e)
{
    return gpu_attention_fwd_seg(c, out, lse, q, k, v, NULL, B, T, nh, dk, dv, scale, e);
}

extern "C" int gpu_attention_bwd(gpu_ctx *c, gpu_bf16 *d_q, gpu_bf16 *d_k, gpu_bf16 *d_v,
                                 const gpu_bf16 *d_out, const gpu_bf16 *out, const float *lse,
                                 const gpu_bf16 *q, const gpu_bf16 *k, const gpu_bf16 *v, int B,
                                 int T, int nh, int dk, int dv, float scale, dsv3_err *e)
{
    return gpu_attention_bwd_seg(c, d_q, d_k, d_v, d_out, out, lse, q, k, v, NULL, B, T, nh, dk,
                                 dv, scale, e);
}

extern "C" int gpu_attention_fwd_seg(gpu_ctx *c, gpu_bf16 *out, float *lse, const gpu_bf16 *q,
                                     const gpu_bf16 *k, const gpu_bf16 *v, const int32_t *seg,
                                     int B, int T, int nh, int dk, int dv, float scale,
                                     dsv3_err *e)
{
    if (check_dims(dk, dv, e))
        return -1;
    if (B <= 0 || T <= 0 || nh <= 0)
        return 0;
    bf16 *o = (bf16 *)out;
    const bf16 *Q = (const bf16 *)q, *K = (const bf16 *)k, *V = (const bf16 *)v;
    if (dk <= 32 && dv <= 32)
        return fwd_launch<32, 32, 4, true, 2, 1>(c, o, lse, Q, K, V, seg, B, T, nh, dk, dv, scale, e);
    if (dk <= 96 && dv <= 64) {
        if (c->attn_fwd_variant != 0) /* one 4-warp block per 64 queries, up to 3 an SM */
            return fwd_launch<96, 64, 4, true, 2, 1>(c, o, lse, Q, K, V, seg, B, T, nh, dk, dv,
                                                     scale, e);
        /* two 8-warp blocks an SM: 16 warps, Q in registers, K/V double-buffered */
        return fwd_launch<96, 64, 8, true, 2, 2>(c, o, lse, Q, K, V, seg, B, T, nh, dk, dv, scale, e);
    }
    if (c->attn_fwd_variant == 2) /* 3 blocks of 4 warps an SM: Q in registers, 1 stage */
        return fwd_launch<192, 128, 4, true, 1, 3>(c, o, lse, Q, K, V, seg, B, T, nh, dk, dv, scale,
                                                   e);
    if (c->attn_fwd_variant == 1) /* 1 block of 8 warps an SM: Q in registers, 2 stages */
        return fwd_launch<192, 128, 8, true, 2, 1>(c, o, lse, Q, K, V, seg, B, T, nh, dk, dv, scale,
                                                   e);
    /* the fastest measured (docs/KERNELS.md): 2 blocks of 8 warps an SM, Q re-read from
     * shared memory to fit 128 registers, one K/V stage to fit two blocks' shared memory */
    return fwd_launch<192, 128, 8, false, 1, 2>(c, o, lse, Q, K, V, seg, B, T, nh, dk, dv, scale, e);
}

extern "C" int gpu_attention_bwd_seg(gpu_ctx *c, gpu_bf16 *d_q, gpu_bf16 *d_k, gpu_bf16 *d_v,
                                     const gpu_bf16 *d_out, const gpu_bf16 *out, const float *lse,
                                     const gpu_bf16 *q, const gpu_bf16 *k, const gpu_bf16 *v,
                                     const int32_t *seg, int B, int T, int nh, int dk, int dv,
                                     float scale, dsv3_err *e)
{
    if (check_dims(dk, dv, e))
        return -1;
    if (B <= 0 || T <= 0 || nh <= 0)
        return 0;
    size_t mark = gpu_arena_mark(c);
    int64_t rows = (int64_t)B * T * nh;
    float *D = (float *)gpu_arena_alloc(c, (size_t)rows * sizeof(float), e);
    if (!D)
        return -1;
    attn_bwd_dot_kernel<<<(unsigned)((rows + 7) / 8), 256, 0, c->stream>>>(
        D, (const bf16 *)d_out, (const bf16 *)out, B, T, nh, dv);
    LAUNCH_CHECK("attention_bwd dot", e);
    bf16 *dq = (bf16 *)d_q, *dk_ = (bf16 *)d_k, *dv_ = (bf16 *)d_v;
    const bf16 *dO = (const bf16 *)d_out, *Q = (const bf16 *)q, *K = (const bf16 *)k,
               *V = (const bf16 *)v;
    int rc;
    if (dk <= 32 && dv <= 32)
        rc = bwd_launch<32, 32>(c, dq, dk_, dv_, dO, lse, D, Q, K, V, seg, B, T, nh, dk, dv, scale, e);
    else if (dk <= 96 && dv <= 64)
        rc = bwd_launch<96, 64>(c, dq, dk_, dv_, dO, lse, D, Q, K, V, seg, B, T, nh, dk, dv, scale, e);
    else
        rc = bwd_launch<192, 128>(c, dq, dk_, dv_, dO, lse, D, Q, K, V, seg, B, T, nh, dk, dv, scale,
                                  e);
    gpu_arena_reset(c, mark);
    return rc;
}

extern "C" void gpu_attention_set_variant(gpu_ctx *c, int fwd_variant)
{
    c->attn_fwd_variant = fwd_variant;
}
