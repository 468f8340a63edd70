/* attention: causal flash attention, forward and backward, in two implementations.
 *
 * Hopper (sm_90a, the default on compute capability 9.x; head dims above 32): wgmma
 * warpgroup products with both operands in swizzled shared memory (or P / dS from
 * registers), FlashAttention-3's data flow without its warp specialisation; see the
 * section "Hopper" below.
 *
 * mma.sync (sm_80+, and head dims up to 32): m16n8k16 bf16 instructions (fp32 accumulators)
 * fed by ldmatrix from cp.async-loaded tiles. Tiles of 64 queries x 64 keys; 4 warps, each
 * owning 16 rows. Forward: for each key tile up
 * to the diagonal (double-buffered), S = Q K^T in registers, an online softmax on the
 * accumulators (a row spread over a quad of lanes), P reused in registers as the A operand
 * of P V (FlashAttention-2). Backward: D = rowsum(dO * O); one kernel per key tile
 * accumulates dK, dV over the query tiles; another per query tile accumulates dQ over the
 * key tiles; no atomics, so results are reproducible (both implementations; the fused
 * Hopper backward, attention_fa.cuh, excepted: taken only when asked for, by
 * gpu_attention_set_nondet for documents or DSV3_ATTN_BWD 9 and 10). Head dims are
 * padded with zeros to the instantiation's DKP / DVP. */
#include "attention.h"
#include "gpuctx_internal.cuh"
#include "wgmma.cuh"
#include <stdlib.h>

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

/* 2^x by the special-function unit alone (flush-to-zero: exp2f's extra instructions only
 * keep results below 2^-126 denormal, and a probability that small is zero to bf16 and
 * to the sums it enters). FX selects it in the Hopper backward, exp2f otherwise. */
template <bool FX>
__device__ __forceinline__ float exp2x(float x)
{
    if (!FX)
        return exp2f(x);
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
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

/* The key tiles of tn keys that a block of `rows` queries from q0 needs: those up to its
 * last query's diagonal, none past T. */
__device__ __forceinline__ int causal_ntiles(int q0, int rows, int tn, int T)
{
    int ntiles = (q0 + rows - 1) / tn + 1;
    if (ntiles * tn > T)
        ntiles = (T + tn - 1) / tn;
    return ntiles;
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

/* The max and the sum over a quad of lanes: the four that hold a row of an m16n8
 * accumulator tile. */
__device__ __forceinline__ float quad_max(float v)
{
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v)
{
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

/* Accumulator element x (0-3) of 8-column group j: the mma.sync kernels keep [DP/8][4],
 * the wgmma kernels [DP/2], the same m16n8 layout. */
template <int N>
__device__ __forceinline__ float acc_at(const float (&a)[N][4], int j, int x)
{
    return a[j][x];
}
template <int N>
__device__ __forceinline__ float acc_at(const float (&a)[N], int j, int x)
{
    return a[4 * j + x];
}
template <int N>
__device__ __forceinline__ float &acc_at(float (&a)[N][4], int j, int x)
{
    return a[j][x];
}
template <int N>
__device__ __forceinline__ float &acc_at(float (&a)[N], int j, int x)
{
    return a[4 * j + x];
}

/* O *= a0 in the thread's row r0, a1 in r1 (DP columns): the online softmax's rescaling to
 * a new running max. */
template <int DP, typename Acc>
__device__ __forceinline__ void acc_scale_rows(Acc &o, float a0, float a1)
{
#pragma unroll
    for (int j = 0; j < DP / 8; j++) {
        acc_at(o, j, 0) *= a0;
        acc_at(o, j, 1) *= a0;
        acc_at(o, j, 2) *= a1;
        acc_at(o, j, 3) *= a1;
    }
}

/* A thread's two rows r0 and r1 of accumulators (times m0 and m1 with MUL) as bf16 into
 * rows of (b, h) of a [B][T][nh][d] tensor; rows past T and columns past d are not
 * written. */
template <int DP, bool MUL, typename Acc>
__device__ __forceinline__ void store_rows_bf16(bf16 *dst, const Acc &acc, float m0, float m1,
                                                int r0, int r1, int b, int h, int T, int nh,
                                                int d, int lane)
{
#pragma unroll
    for (int j = 0; j < DP / 8; j++) {
        int col = j * 8 + (lane & 3) * 2;
        if (col < d) {
            if (r0 < T)
                *(uint32_t *)(dst + (((int64_t)b * T + r0) * nh + h) * d + col) =
                    MUL ? pack_bf2(acc_at(acc, j, 0) * m0, acc_at(acc, j, 1) * m0)
                        : pack_bf2(acc_at(acc, j, 0), acc_at(acc, j, 1));
            if (r1 < T)
                *(uint32_t *)(dst + (((int64_t)b * T + r1) * nh + h) * d + col) =
                    MUL ? pack_bf2(acc_at(acc, j, 2) * m1, acc_at(acc, j, 3) * m1)
                        : pack_bf2(acc_at(acc, j, 2), acc_at(acc, j, 3));
        }
    }
}

/* A warp's m16n8 accumulator tiles set to zero. */
template <int N>
__device__ __forceinline__ void mma_zero(float (&d)[N][4])
{
#pragma unroll
    for (int j = 0; j < N; j++)
        d[j][0] = d[j][1] = d[j][2] = d[j][3] = 0;
}

/* d += A B^T for 32 columns: A the warp's 16 rows (16 warp + 0..15) of the [rows][LD] tile
 * a, B rows [brow, brow + 32) of the [rows][LD] tile bt, over DP columns; d[4] holds the
 * four 8-column tiles. */
template <int DP, int LD>
__device__ __forceinline__ void mma_abt32(float (&d)[4][4], const bf16 *a, const bf16 *bt,
                                          int brow, int warp, int lane)
{
#pragma unroll
    for (int kk = 0; kk < DP / 16; kk++) {
        uint32_t f[4];
        ldsm_x4(f[0], f[1], f[2], f[3],
                a + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int jj = 0; jj < 2; jj++) {
            uint32_t b0, b1, b2, b3;
            ldsm_x4(b0, b1, b2, b3,
                    bt + (brow + jj * 16 + (lane & 7) + ((lane >> 4) << 3)) * LD + kk * 16 +
                        ((lane >> 3) & 1) * 8);
            mma16816(d[2 * jj], f, b0, b1);
            mma16816(d[2 * jj + 1], f, b2, b3);
        }
    }
}

/* The backward's two products of a warp's 16 rows and 32 columns, from zero: s = A1 B1^T
 * (S or S^T, over DKP columns of the [rows][LQ] tiles) and dp = A2 B2^T (dP or dP^T, DVP
 * columns of the [rows][LV] tiles); B rows from brow. */
template <int DKP, int DVP, int LQ, int LV>
__device__ __forceinline__ void mma_sdp32(float (&s)[4][4], float (&dp)[4][4], const bf16 *a1,
                                          const bf16 *b1, const bf16 *a2, const bf16 *b2,
                                          int brow, int warp, int lane)
{
    mma_zero(s);
    mma_zero(dp);
    mma_abt32<DKP, LQ>(s, a1, b1, brow, warp, lane);
    mma_abt32<DVP, LV>(dp, a2, b2, brow, warp, lane);
}

/* The accumulator tiles 2kk, 2kk+1 (16 columns) packed as bf16: the A fragment of the next
 * product for those 16 columns as its k-step. */
template <int N>
__device__ __forceinline__ void mma_pack_a(uint32_t (&a)[4], const float (&s)[N][4], int kk)
{
    a[0] = pack_bf2(s[2 * kk][0], s[2 * kk][1]);
    a[1] = pack_bf2(s[2 * kk][2], s[2 * kk][3]);
    a[2] = pack_bf2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = pack_bf2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

/* d += A B for one k-step: A the fragment a, B the 16 rows from `row` (this lane's row
 * address, as ldmatrix.trans takes it) of the [rows][LD] tile bt, all DP columns. */
template <int DP, int LD>
__device__ __forceinline__ void mma_ab_t(float (&d)[DP / 8][4], const uint32_t (&a)[4],
                                         const bf16 *bt, int row, int lane)
{
#pragma unroll
    for (int jj = 0; jj < DP / 16; jj++) {
        uint32_t b0, b1, b2, b3;
        ldsm_x4_t(b0, b1, b2, b3, bt + row * LD + jj * 16 + (lane >> 4) * 8);
        mma16816(d[2 * jj], a, b0, b1);
        mma16816(d[2 * jj + 1], a, b2, b3);
    }
}

/* The forward's epilogue: the row sums l over the quad, O / l into out (rows row0, row1 of
 * (b, h), the columns below dv) and the rows' lse (natural log). poison: NaN rows and lse
 * (the ws kernel's stuck pipeline). Every forward kernel's, the mma.sync one's too. */
template <int DVP, typename Acc>
__device__ __forceinline__ void attn_fwd_store(bf16 *out, float *lse, const Acc &o, float m0,
                                               float m1, float l0, float l1, bool poison, int row0,
                                               int row1, int b, int h, int T, int nh, int dv)
{
    const int lane = threadIdx.x & 31;
    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    if (poison)
        l0 = l1 = __int_as_float(0x7fffffff);
    const float i0 = 1.0f / l0, i1 = 1.0f / l1;
    store_rows_bf16<DVP, true>(out, o, i0, i1, row0, row1, b, h, T, nh, dv, lane);
    if ((lane & 3) == 0) {
        if (row0 < T)
            lse[((int64_t)b * nh + h) * T + row0] = (m0 + log2f(l0)) / LOG2E;
        if (row1 < T)
            lse[((int64_t)b * nh + h) * T + row1] = (m1 + log2f(l1)) / LOG2E;
    }
}

/* The tiles a pair of products reads: rows [r0, r0+64) of a (head dim dk padded to DKP,
 * lines of LQ) into sa and of c (dv, DVP, LV) into sc: K and V, or Q and dO. */
template <int DKP, int DVP, int LQ, int LV>
__device__ __forceinline__ void async_tile_pair(bf16 *sa, const bf16 *a, bf16 *sc, const bf16 *c,
                                                int b, int h, int r0, int T, int nh, int dk,
                                                int dv)
{
    async_tile<DKP>(sa, LQ, a, b, h, r0, T, nh, dk);
    async_tile<DVP>(sc, LV, c, b, h, r0, T, nh, dv);
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
    const int ntiles = causal_ntiles(q0, QM, BN, T);
    const int32_t *sg = SEG ? seg + (int64_t)b * T : NULL;
    async_tile<DKP, QM>(Qs, L::LQ, q, b, h, q0, T, nh, dk);
    async_tile_pair<DKP, DVP, L::LQ, L::LV>(Ks, k, Vs, v, b, h, 0, T, nh, dk, dv);
    cp_async_commit();

    uint32_t qf[QREG ? DKP / 16 : 1][4];
    float o[DVP / 8][4];
    mma_zero(o);
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0, l1 = 0;
    const float sl2 = scale * LOG2E;
    const int row0 = q0 + warp * 16 + (lane >> 2), row1 = row0 + 8;
    /* documents (seg): a key of another document is masked like one past the diagonal */
    const int sr0 = SEG && row0 < T ? sg[row0] : 0, sr1 = SEG && row1 < T ? sg[row1] : 0;

    for (int kt = 0; kt < ntiles; kt++) {
        const int buf = STAGES == 2 ? kt & 1 : 0, k0 = kt * BN;
        if (STAGES == 1) {
            if (kt > 0) { /* the trailing barrier of the last tile freed the buffer */
                async_tile_pair<DKP, DVP, L::LQ, L::LV>(Ks, k, Vs, v, b, h, k0, T, nh, dk, dv);
                cp_async_commit();
            }
            cp_async_wait<0>();
        } else if (kt + 1 < ntiles) {
            async_tile_pair<DKP, DVP, L::LQ, L::LV>(Ks + (buf ^ 1) * 64 * L::LQ, k,
                                                    Vs + (buf ^ 1) * 64 * L::LV, v, b, h, k0 + BN,
                                                    T, nh, dk, dv);
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
        mma_zero(s);
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
        mx0 = quad_max(mx0);
        mx1 = quad_max(mx1);
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
        acc_scale_rows<DVP>(o, a0, a1);
        /* O += P V: the S accumulators of n-tiles 2kk, 2kk+1 are P's A fragment for keys
         * 16kk .. 16kk+15 */
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            uint32_t pa[4];
            mma_pack_a(pa, s, kk);
            mma_ab_t<DVP, L::LV>(o, pa, Vb, kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, lane);
        }
        __syncthreads(); /* the next prefetch overwrites the buffer just read */
    }
    attn_fwd_store<DVP>(out, lse, o, m0, m1, l0, l1, false, row0, row1, b, h, T, nh, dv);
}

/* ---- backward ---- */

/* 8 bf16 values from p: one 16-byte load where p is aligned (vec), else 8 two-byte ones. */
__device__ __forceinline__ uint4 load8_bf16(const bf16 *p, bool vec)
{
    if (vec)
        return *(const uint4 *)p;
    const unsigned short *u = (const unsigned short *)p;
    return make_uint4(u[0] | (unsigned)u[1] << 16, u[2] | (unsigned)u[3] << 16,
                      u[4] | (unsigned)u[5] << 16, u[6] | (unsigned)u[7] << 16);
}

/* D[b,h,i] = sum_d dO * O. A row is dv <= 128 values (dv % 8 == 0): G = 16 lanes take 8
 * values each with one 16-byte load of dO and of O (lanes past dv / 8 add nothing), so a
 * warp covers two rows and every load is a full sector: a warp a row with two-byte loads
 * ran at a tenth of the copy rate. Each lane sums its 8 products in order, then the 16
 * lanes' sums are combined by a butterfly (deterministic). */
__global__ void attn_bwd_dot_kernel(float *D, const bf16 *d_out, const bf16 *out, int B, int T,
                                    int nh, int dv, bool vec)
{
    const int G = 16;
    int64_t row = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / G;
    int lane = threadIdx.x % G;
    bool live = row < (int64_t)B * T * nh;
    float s = 0;
    if (live && lane * 8 < dv) {
        /* row enumerates (b, t, h) as the tensor does */
        uint4 a = load8_bf16(d_out + row * dv + lane * 8, vec),
              o = load8_bf16(out + row * dv + lane * 8, vec);
        const bf16 *pa = (const bf16 *)&a, *po = (const bf16 *)&o;
#pragma unroll
        for (int j = 0; j < 8; j++)
            s += b2f(pa[j]) * b2f(po[j]);
    }
#pragma unroll
    for (int m = G / 2; m > 0; m /= 2)
        s += __shfl_xor_sync(0xffffffffu, s, m);
    if (live && lane == 0) {
        int h = (int)(row % nh);
        int64_t bt = row / nh;
        int t = (int)(bt % T), b = (int)(bt / T);
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
    async_tile_pair<DKP, DVP, L::LQ, L::LV>(Ks, k, Vs, v, b, h, k0, T, nh, dk, dv);
    float dK[DKP / 8][4], dV[DVP / 8][4];
    mma_zero(dK);
    mma_zero(dV);
    const int kr0 = k0 + warp * 16 + (lane >> 2), kr1 = kr0 + 8;
    const int32_t *sg = SEG ? seg + (int64_t)b * T : NULL;
    const int sk0 = SEG && kr0 < T ? sg[kr0] : 0, sk1 = SEG && kr1 < T ? sg[kr1] : 0;
    const int nq = (T + BM - 1) / BM;
    for (int qt = k0 / BM; qt < nq; qt++) {
        const int q0 = qt * BM;
        __syncthreads(); /* the previous tile's readers are done */
        async_tile_pair<DKP, DVP, L::LQ, L::LV>(Qs, q, dOs, d_out, b, h, q0, T, nh, dk, dv);
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
            mma_sdp32<DKP, DVP, L::LQ, L::LV>(st, dp, Ks, Qs, Vs, dOs, qs, warp, lane);
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
                uint32_t pa[4], da[4];
                mma_pack_a(pa, st, kk);
                mma_pack_a(da, dp, kk);
                const int qrow = qs + kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                mma_ab_t<DVP, L::LV>(dV, pa, dOs, qrow, lane);
                mma_ab_t<DKP, L::LQ>(dK, da, Qs, qrow, lane);
            }
        }
    }
    store_rows_bf16<DKP, false>(d_k, dK, 1.0f, 1.0f, kr0, kr1, b, h, T, nh, dk, lane);
    store_rows_bf16<DVP, false>(d_v, dV, 1.0f, 1.0f, kr0, kr1, b, h, T, nh, dv, lane);
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
    async_tile_pair<DKP, DVP, L::LQ, L::LV>(Qs, q, dOs, d_out, b, h, q0, T, nh, dk, dv);
    float dQ[DKP / 8][4];
    mma_zero(dQ);
    const int ntiles = causal_ntiles(q0, BM, BN, T);
    for (int kt = 0; kt < ntiles; kt++) {
        const int k0 = kt * BN;
        __syncthreads();
        async_tile_pair<DKP, DVP, L::LQ, L::LV>(Ks, k, Vs, v, b, h, k0, T, nh, dk, dv);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
#pragma unroll
        for (int ks = 0; ks < BN; ks += 32) {
            float sc[4][4], dp[4][4];
            mma_sdp32<DKP, DVP, L::LQ, L::LV>(sc, dp, Qs, Ks, dOs, Vs, ks, warp, lane);
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
                uint32_t da[4];
                mma_pack_a(da, dp, kk);
                const int krow = ks + kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                mma_ab_t<DKP, L::LQ>(dQ, da, Ks, krow, lane);
            }
        }
    }
    store_rows_bf16<DKP, false>(d_q, dQ, 1.0f, 1.0f, qr0, qr1, b, h, T, nh, dk, lane);
}

/* ---- Hopper (sm_90a): the same algorithm on wgmma, FlashAttention-3 style ----
 *
 * A warpgroup (4 warps) owns 64 rows of the product; its operands come straight from shared
 * memory through matrix descriptors (tiles stored swizzled, see swl), so
 * no ldmatrix traffic goes through the register file and a 64-row tile's B operand is read
 * once per warpgroup instead of once per warp. S and dP accumulate in registers in the
 * m16n8 layout of the mma.sync kernels above, so the softmax code is the same; P and dS
 * feed the next product from registers (wgmma's A-in-registers form), and the B operand of
 * those products (V, dO, Q, K with the head dim contiguous) is read MN-major from the same
 * swizzled tiles. Tiles arrive by cp.async issued by all threads, two stages deep in the
 * forward, three in the backward.
 * Head dims are zero-padded: forward to 128/64 or 192/128, backward to 96/64 or 192/128. */

/* Tile layout for a head dim padded to DP: lines of SW bytes (AW columns), [DP/AW][rows][AW],
 * the 16-byte chunks of a line permuted by the row (the hardware's swizzle, which the
 * descriptors name): 128-byte lines (64 columns) when DP is a multiple of 64, else 64-byte
 * lines (32 columns; head dim 96 without padding to 128). */
template <int DP>
struct swl {
    static const int SW = DP % 64 == 0 ? 128 : 64, AW = SW / 2, CH = SW / 16;
    static const uint32_t MODE = SW == 128 ? 1 : 2;
    static __device__ __forceinline__ int xr(int r) { return SW == 128 ? r & 7 : (r >> 1) & 3; }
};

/* Rows [r0, r0+ROWS) of head h of sequence b of a [B,T,nh,d] tensor into a swizzled tile,
 * zeros past T and past d. Thread t copies chunk t % CH of rows t / CH + (NT / CH) p of
 * every atom: its permuted chunk (the row's swizzle bits are the same on every pass) and
 * both addresses are fixed strides from one base, so a copy costs an add, not an index
 * computation. */
template <int DP, int ROWS, int NT>
__device__ __forceinline__ void swz_tile(unsigned char *sm, const bf16 *g, int b, int h, int r0,
                                         int T, int nh, int d)
{
    typedef swl<DP> S;
    const int RP = NT / S::CH; /* rows a pass */
    static_assert(RP % 8 == 0 && ROWS % RP == 0 && DP % S::AW == 0, "tile shape");
    const int gc = threadIdx.x % S::CH, rg = (threadIdx.x % NT) / S::CH;
    const int64_t rs = (int64_t)nh * d;
    const bf16 *base = g + ((int64_t)b * T + r0 + rg) * rs + (int64_t)h * d + gc * 8;
    unsigned char *sb = sm + rg * S::SW + ((gc ^ S::xr(rg)) << 4);
#pragma unroll
    for (int p = 0; p < ROWS / RP; p++) {
        const int r = p * RP;
        const bool rin = r0 + rg + r < T;
#pragma unroll
        for (int c = 0; c < DP / S::AW; c++) {
            const bool in = rin && c * S::AW + gc * 8 < d;
            cp_async16(sb + (c * ROWS + r) * S::SW, in ? base + r * rs + c * S::AW : g,
                       in ? 16 : 0);
        }
    }
}

__device__ __forceinline__ unsigned char *align1024(unsigned char *p)
{
    uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    return p + ((1024 - (a & 1023)) & 1023);
}

/* K-major operand rows [row, row+64 or N) at k-step kk (16 columns) of a swizzled tile of
 * `rows` rows: the atom of AW columns, then 32 bytes a k-step inside the line; 8-row
 * groups 8 lines apart. */
template <int DP>
__device__ __forceinline__ uint64_t kmaj(const unsigned char *t, int rows, int row, int kk)
{
    typedef swl<DP> S;
    const int KS = S::AW / 16;
    return wg_desc(t + ((kk / KS) * rows + row) * S::SW + (kk % KS) * 32, 16, 8 * S::SW, S::MODE);
}

/* MN-major B operand: k rows [k0, k0+16) of a swizzled tile of `rows` rows (the head dim
 * is N: AW columns an atom, atoms `rows` lines apart; 8-row groups 8 lines apart). */
template <int DP>
__device__ __forceinline__ uint64_t mnmaj(const unsigned char *t, int rows, int k0)
{
    typedef swl<DP> S;
    return wg_desc(t + k0 * S::SW, rows * S::SW, 8 * S::SW, S::MODE);
}

/* A operand fragments (the m16n8k16 layout wgmma's register form takes) of rows
 * [row0 + 16 warp, +16) of a swizzled tile of `rows` rows, every k-step of DP columns, by
 * ldmatrix: lanes 0-15 name rows 0-15 at the k-step's first 8 columns, lanes 16-31 the
 * same rows at the next 8; a 16-byte chunk's place in its line is the one swz_tile wrote. */
template <int DP>
__device__ __forceinline__ void afrag(uint32_t (&a)[DP / 16][4], const unsigned char *t, int rows,
                                      int row0)
{
    typedef swl<DP> S;
    const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3;
    const int r = row0 + warp * 16 + (lane & 15);
#pragma unroll
    for (int kk = 0; kk < DP / 16; kk++) {
        const int c = kk * 16 + (lane >> 4) * 8;
        const unsigned char *p =
            t + ((c / S::AW) * rows + r) * S::SW + ((((c % S::AW) >> 3) ^ S::xr(r)) << 4);
        ldsm_x4(a[kk][0], a[kk][1], a[kk][2], a[kk][3], (const bf16 *)p);
    }
}

/* Documents (seg, non-decreasing along a sequence): the first position of i's document, and
 * one past its last, by binary search (every thread alike; a dozen cached loads). Key tiles
 * before a query tile's first document, and query tiles after a key tile's last one, hold
 * no visible pair and are skipped; a tile whose first key and last query share a document
 * needs only the causal mask (everything between them is that document too). */
__device__ __forceinline__ int doc_first(const int32_t *sg, int i)
{
    const int d = sg[i];
    int lo = 0, hi = i;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (sg[mid] < d)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

__device__ __forceinline__ int doc_end(const int32_t *sg, int i, int T)
{
    const int d = sg[i];
    int lo = i + 1, hi = T;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (sg[mid] <= d)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* ---- the pieces the wgmma kernels share (here and in attention_fa/ws/wsb.cuh) ----
 * The P / P^T exponential-and-mask loops stay written out in each kernel: as one function
 * they compiled to other (equivalent, but never timed or bit-checked) PTX for the document-
 * masked kernels. */

/* wgmma accumulators set to zero (the products that add to them start with ACC 1). */
template <int R>
__device__ __forceinline__ void wg_zero(float (&d)[R])
{
#pragma unroll
    for (int j = 0; j < R; j++)
        d[j] = 0;
}

/* The backward kernels' AR (bits 1, 2): the A operands they hold in registers, rows
 * [row0, row0 + 64) of the tiles t1 (DKP columns) and t2 (DVP) of `rows` rows, read once
 * the first cp.async group (which carried those tiles) has landed. */
template <int AR, int DKP, int DVP, int N1, int N2>
__device__ __forceinline__ void f3_afrags(uint32_t (&a1)[N1][4], uint32_t (&a2)[N2][4],
                                          const unsigned char *t1, const unsigned char *t2,
                                          int rows, int row0)
{
    if constexpr (AR != 0) {
        cp_async_wait<1>();
        __syncthreads();
        if constexpr ((AR & 1) != 0)
            afrag<DKP>(a1, t1, rows, row0);
        if constexpr ((AR & 2) != 0)
            afrag<DVP>(a2, t2, rows, row0);
    }
}

/* d = A B^T over every k-step of DP columns (the first ignores d's old values): A the 64
 * rows [arow, +64) of the K-major tile a of `arows` rows, B the N rows [brow, +N) of the
 * K-major tile bt of `brows` rows. */
template <int N, int DP>
__device__ __forceinline__ void wg_abt_ss(float (&d)[N / 2], const unsigned char *a, int arows,
                                          int arow, const unsigned char *bt, int brows, int brow)
{
    wg_mma<N>::template ss<0>(d, kmaj<DP>(a, arows, arow, 0), kmaj<DP>(bt, brows, brow, 0));
#pragma unroll
    for (int kk = 1; kk < DP / 16; kk++)
        wg_mma<N>::ss(d, kmaj<DP>(a, arows, arow, kk), kmaj<DP>(bt, brows, brow, kk));
}

/* wg_abt_ss, or (AREG) with A's rows as the register fragments ar */
template <int N, int DP, bool AREG, int NA>
__device__ __forceinline__ void wg_abt(float (&d)[N / 2], const uint32_t (&ar)[NA][4],
                                       const unsigned char *a, int arows, int arow,
                                       const unsigned char *bt, int brows, int brow)
{
    if constexpr (AREG) {
        wg_mma<N>::template rsk<0>(d, ar[0], kmaj<DP>(bt, brows, brow, 0));
#pragma unroll
        for (int kk = 1; kk < DP / 16; kk++)
            wg_mma<N>::rsk(d, ar[kk], kmaj<DP>(bt, brows, brow, kk));
    } else {
        wg_abt_ss<N, DP>(d, a, arows, arow, bt, brows, brow);
    }
}

/* d += A B: A the register fragments of KS k-steps (P or dS), B k rows [k0, k0 + 16 KS) of
 * the MN-major tile bt of `rows` rows (its DP columns are N). */
template <int DP, int KS>
__device__ __forceinline__ void wg_ab_rs(float (&d)[DP / 2], const uint32_t (&a)[KS][4],
                                         const unsigned char *bt, int rows, int k0)
{
#pragma unroll
    for (int kk = 0; kk < KS; kk++)
        wg_mma<DP>::rs(d, a[kk], mnmaj<DP>(bt, rows, k0 + kk * 16));
}

/* Accumulators of N columns packed as bf16: those of columns 16kk .. 16kk+15 are the A
 * fragment kk of the next product (P of P V, dS of dS K). */
template <int N>
__device__ __forceinline__ void wg_pack_a(uint32_t (&a)[N / 16][4], const float (&s)[N / 2])
{
#pragma unroll
    for (int kk = 0; kk < N / 16; kk++)
#pragma unroll
        for (int x = 0; x < 4; x++)
            a[kk][x] = pack_bf2(s[8 * kk + 2 * x], s[8 * kk + 2 * x + 1]);
}

/* dS^T / scale of the step in dp, from P^T (st) and dP^T (dp); Ds: the query tile's D. The
 * scale goes on dK at the end; masked entries have P = 0. */
template <int HS>
__device__ __forceinline__ void f3_bwd_dst(float (&dp)[HS / 2], const float (&st)[HS / 2],
                                           const float *Ds, int hs, int lane)
{
#pragma unroll
    for (int j = 0; j < HS / 8; j++)
#pragma unroll
        for (int x = 0; x < 4; x++) {
            int ql = hs + j * 8 + (lane & 3) * 2 + (x & 1);
            dp[4 * j + x] = st[4 * j + x] * (dp[4 * j + x] - Ds[ql]);
        }
}

/* dS / scale = P (dP - D) of the step packed as dQ's A fragments (D0, D1: the thread's rows'
 * D). The scale goes on dQ at the end; masked entries have P = 0. */
template <int KS>
__device__ __forceinline__ void f3_dq_pack_ds(uint32_t (&da)[KS / 16][4], const float (&sc)[KS / 2],
                                              const float (&dp)[KS / 2], float D0, float D1)
{
#pragma unroll
    for (int kk = 0; kk < KS / 16; kk++)
#pragma unroll
        for (int x = 0; x < 4; x++) {
            const int j0 = 8 * kk + 2 * x;
            const float d = x & 1 ? D1 : D0;
            da[kk][x] = pack_bf2(sc[j0] * (dp[j0] - d), sc[j0 + 1] * (dp[j0 + 1] - d));
        }
}

/* The forward's mask and online-softmax step on a 64-row warpgroup's S accumulators of key
 * tile k0 (rows row0, row1 of this thread), shared by f3_fwd_kernel, f3_fwd_pipe_kernel and
 * attention_ws.cuh's ws_fwd_kernel: masks the causal triangle, keys past T (diagonal and
 * last tiles only) and (SEG) keys of other documents where the tile reaches across a document boundary; updates
 * the running max m (log2 units; the raw scores are scaled inside the exp's FMA) and sum l;
 * leaves P = 2^(s sl2 - m) in s and O's rescaling factor in a0, a1. FX: the exponential by
 * ex2.approx.ftz (the ws kernel) or exp2f (f3_fwd_kernel and f3_fwd_pipe_kernel; they differ
 * only below 2^-126, and test_attention finds the ws kernel's bits those of f3_fwd_kernel). */
template <int TN, bool SEG, bool FX>
__device__ __forceinline__ void f3_softmax(float (&s)[TN / 2], int k0, int wrow, int row0,
                                           int row1, int T, const int32_t *sg, int sr0, int sr1,
                                           int slast, float sl2, float &m0, float &m1, float &l0,
                                           float &l1, float &a0, float &a1)
{
    const int lane = threadIdx.x & 31;
    if (k0 + TN - 1 > wrow || k0 + TN > T || (SEG && sg[k0] != slast)) {
#pragma unroll
        for (int j = 0; j < TN / 8; j++) {
            int col = k0 + j * 8 + (lane & 3) * 2;
#pragma unroll
            for (int x = 0; x < 4; x++) {
                int cc = col + (x & 1), rr = x < 2 ? row0 : row1;
                if (cc > rr || cc >= T || (SEG && sg[cc] != (x < 2 ? sr0 : sr1)))
                    s[4 * j + x] = -INFINITY;
            }
        }
    }
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < TN / 8; j++) {
        mx0 = fmaxf(mx0, fmaxf(s[4 * j], s[4 * j + 1]));
        mx1 = fmaxf(mx1, fmaxf(s[4 * j + 2], s[4 * j + 3]));
    }
    mx0 = quad_max(mx0);
    mx1 = quad_max(mx1);
    const float mn0 = fmaxf(m0, mx0 * sl2), mn1 = fmaxf(m1, mx1 * sl2);
    a0 = mn0 == -INFINITY ? 1.0f : exp2x<FX>(m0 - mn0);
    a1 = mn1 == -INFINITY ? 1.0f : exp2x<FX>(m1 - mn1);
    const float base0 = mn0 == -INFINITY ? 0.0f : mn0, base1 = mn1 == -INFINITY ? 0.0f : mn1;
    float rs0 = 0, rs1 = 0;
#pragma unroll
    for (int j = 0; j < TN / 8; j++) {
        s[4 * j] = exp2x<FX>(fmaf(s[4 * j], sl2, -base0));
        s[4 * j + 1] = exp2x<FX>(fmaf(s[4 * j + 1], sl2, -base0));
        s[4 * j + 2] = exp2x<FX>(fmaf(s[4 * j + 2], sl2, -base1));
        s[4 * j + 3] = exp2x<FX>(fmaf(s[4 * j + 3], sl2, -base1));
        rs0 += s[4 * j] + s[4 * j + 1];
        rs1 += s[4 * j + 2] + s[4 * j + 3];
    }
    l0 = l0 * a0 + rs0;
    l1 = l1 * a1 + rs1;
    m0 = mn0;
    m1 = mn1;
}

/* O *= a (per row), then P (the floats in s) packed as bf16: the S accumulators of keys
 * 16kk .. 16kk+15 are P's A fragment kk of O += P V. */
template <int TN, int DVP>
__device__ __forceinline__ void f3_rescale_pack(float (&o)[DVP / 2], uint32_t (&pa)[TN / 16][4],
                                                const float (&s)[TN / 2], float a0, float a1)
{
    acc_scale_rows<DVP>(o, a0, a1);
    wg_pack_a<TN>(pa, s);
}

template <int DKP, int DVP>
struct f3_smem {
    static const int TM = 128, TN = 128;
    static const int QB = TM * DKP * 2, KB = TN * DKP * 2, VB = TN * DVP * 2;
    static const size_t bytes = (size_t)QB + 2 * KB + 2 * VB + 1024;
};

/* Forward: block = 128 queries of one (b, h), two warpgroups of 64; key tiles of 128.
 * SEG: masked by document (seg [B,T]); the key tiles start at the block's first document. */
template <int DKP, int DVP, bool SEG>
__global__ void __launch_bounds__(256, 1)
    f3_fwd_kernel(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v,
                  const int32_t *seg, int T, int nh, int dk, int dv, float scale)
{
    typedef f3_smem<DKP, DVP> L;
    const int TM = L::TM, TN = L::TN;
    extern __shared__ unsigned char smem_raw[];
    unsigned char *Qs = align1024(smem_raw), *Ks = Qs + L::QB, *Vs = Ks + 2 * L::KB;
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z, q0 = qt * TM;
    const int ntiles = causal_ntiles(q0, TM, TN, T);
    const int32_t *sg = SEG ? seg + (int64_t)b * T : NULL;
    const int kt0 = SEG ? doc_first(sg, q0) / TN : 0;
    swz_tile<DKP, TM, 256>(Qs, q, b, h, q0, T, nh, dk);
    swz_tile<DKP, TN, 256>(Ks, k, b, h, kt0 * TN, T, nh, dk);
    swz_tile<DVP, TN, 256>(Vs, v, b, h, kt0 * TN, T, nh, dv);
    cp_async_commit();

    float o[DVP / 2];
    wg_zero(o);
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0, l1 = 0;
    const float sl2 = scale * LOG2E;
    const int wrow = q0 + wg * 64, row0 = wrow + warp * 16 + (lane >> 2), row1 = row0 + 8;
    const int sr0 = SEG && row0 < T ? sg[row0] : 0, sr1 = SEG && row1 < T ? sg[row1] : 0;
    const int slast = SEG ? sg[min(wrow + 63, T - 1)] : 0;

    for (int kt = kt0; kt < ntiles; kt++) {
        const int buf = (kt - kt0) & 1, k0 = kt * TN;
        if (kt + 1 < ntiles) {
            swz_tile<DKP, TN, 256>(Ks + (buf ^ 1) * L::KB, k, b, h, k0 + TN, T, nh, dk);
            swz_tile<DVP, TN, 256>(Vs + (buf ^ 1) * L::VB, v, b, h, k0 + TN, T, nh, dv);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        fence_proxy_async();
        __syncthreads();
        const unsigned char *Kb = Ks + buf * L::KB, *Vb = Vs + buf * L::VB;
        float s[TN / 2];
        wg_zero(s);
        wg_regs(s);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < DKP / 16; kk++)
            wg_mma<TN>::ss(s, kmaj<DKP>(Qs, TM, wg * 64, kk), kmaj<DKP>(Kb, TN, 0, kk));
        wg_commit();
        wg_wait<0>();
        wg_regs(s);
        float a0, a1;
        f3_softmax<TN, SEG, false>(s, k0, wrow, row0, row1, T, sg, sr0, sr1, slast, sl2, m0, m1,
                                   l0, l1, a0, a1);
        /* O to this tile's max, then O += P V */
        uint32_t pa[TN / 16][4];
        f3_rescale_pack<TN, DVP>(o, pa, s, a0, a1);
        wg_regs(o);
        wg_fence();
        wg_ab_rs<DVP>(o, pa, Vb, TN, 0);
        wg_commit();
        wg_wait<0>();
        wg_regs(o);
        __syncthreads(); /* the next prefetch overwrites the buffer just read */
    }
    attn_fwd_store<DVP>(out, lse, o, m0, m1, l0, l1, false, row0, row1, b, h, T, nh, dv);
}

template <int DKP, int DVP, int ST = 3, int TQ_ = 64>
struct f3b_smem {
    static const int TK = 128, TQ = TQ_;
    static const int KB = TK * DKP * 2, VB = TK * DVP * 2, QB = TQ * DKP * 2, OB = TQ * DVP * 2;
    static const int STAGES = ST;
    static const size_t bytes = (size_t)KB + VB + STAGES * (QB + OB + 2 * TQ * 4) + 1024;
};

/* A dK/dV kernel's result: the thread's rows kr0 and kr1 (of key tile fragments dK, dV, as
 * wgmma's accumulator layout leaves them) times ks (the softmax scale) and, with VS, vs,
 * into [B][T][nh][d] bf16; rows past T and columns past dk / dv are not written. */
template <int DKP, int DVP, bool VS>
__device__ __forceinline__ void f3_store_dkdv(bf16 *d_k, bf16 *d_v, const float (&dK)[DKP / 2],
                                              const float (&dV)[DVP / 2], float ks, float vs,
                                              int b, int T, int nh, int h, int dk, int dv,
                                              int kr0, int kr1, int lane)
{
    store_rows_bf16<DKP, true>(d_k, dK, ks, ks, kr0, kr1, b, h, T, nh, dk, lane);
    store_rows_bf16<DVP, VS>(d_v, dV, vs, vs, kr0, kr1, b, h, T, nh, dv, lane);
}

/* dK, dV: block = 128 keys of one (b, h), two warpgroups of 64 keys, over the query tiles
 * of TQ (64, or 128) at and below the diagonal, HS queries a step (32; 64 where the registers allow it,
 * 96/64, for twice the work per product): S^T = K Q^T, dP^T = V dO^T,
 * P^T = exp(S^T - lse), dS^T = P^T (dP^T - D) scale; dV += P^T dO, dK += dS^T Q.
 * ST stages of query tiles, loaded two tiles ahead: with 3 the stage refilled is the last
 * tile's, so each tile's products drain before the barrier; with 4 (96/64) it is the tile
 * two back, which every warpgroup has waited for before the barrier, so a tile's dV and dK
 * run on across the next tile's barrier and loads. FX: exp by ex2.approx.ftz. AR (bits):
 * 1 the warpgroup's K rows, 2 its V rows, held in registers as the A operand of S^T, dP^T
 * (read from shared memory once, not at every product). DR (bits): 1 with ST 4 too, wait
 * for a tile's products at its end; 2 the tile loop without a zero-trip path (every block
 * has a tile). Either keeps ptxas from serialising every wgmma of the ST 4 kernels (warning
 * C7515): with the zero-trip path, the accumulators' zeros (a mov) reach the loop's exit
 * where a product can still be in flight. */
template <int DKP, int DVP, bool SEG, int HS, int ST, bool FX, int TQ_, int MINB, int AR = 0,
          int DR = 0>
__global__ void __launch_bounds__(256, MINB)
    f3_bwd_dkdv_kernel(bf16 *d_k, bf16 *d_v, const bf16 *d_out, const float *lse,
                       const float *D, const bf16 *q, const bf16 *k, const bf16 *v,
                       const int32_t *seg, int T, int nh, int dk, int dv, float scale, int lpt)
{
    typedef f3b_smem<DKP, DVP, ST, TQ_> L;
    const int TK = L::TK, TQ = L::TQ;
    static_assert(TQ % HS == 0 && (ST == 3 || ST == 4), "steps and stages");
    extern __shared__ unsigned char smem_raw[];
    unsigned char *Ks = align1024(smem_raw), *Vs = Ks + L::KB, *Qs = Vs + L::VB;
    unsigned char *dOs = Qs + L::STAGES * L::QB;
    float *lse_s = (float *)(dOs + L::STAGES * L::OB), *D_s = lse_s + L::STAGES * TQ;
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    /* lpt: grid (nh B, tiles), the costliest tiles (the first keys: the most queries) of
     * every head first, so the cheap ones fill the last wave; else (tiles, nh, B) */
    const int h = lpt ? blockIdx.x % nh : blockIdx.y, b = lpt ? blockIdx.x / nh : blockIdx.z;
    const int k0 = (lpt ? blockIdx.y : blockIdx.x) * TK;
    const float sl2 = scale * LOG2E;
    const float *lse_bh = lse + ((int64_t)b * nh + h) * T, *D_bh = D + ((int64_t)b * nh + h) * T;
    const int32_t *sg = SEG ? seg + (int64_t)b * T : NULL;
    /* documents: no query past the end of the block's last key's document sees its keys */
    const int nq = SEG ? (doc_end(sg, min(k0 + TK - 1, T - 1), T) + TQ - 1) / TQ
                       : (T + TQ - 1) / TQ,
              qt0 = k0 / TQ;
    /* query tile qt goes to stage (qt - qt0) % ST, two tiles ahead of its use; every tile
     * (also past the last) commits one cp.async group, so the counts stay uniform */
    auto prefetch = [&](int qt) {
        const int st = (qt - qt0) % L::STAGES, q0 = qt * TQ;
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
    uint32_t ka[AR & 1 ? DKP / 16 : 1][4], va[AR & 2 ? DVP / 16 : 1][4];
    f3_afrags<AR, DKP, DVP>(ka, va, Ks, Vs, TK, wg * 64); /* K and V: the first group */
    float dK[DKP / 2], dV[DVP / 2];
    wg_zero(dK);
    wg_zero(dV);
    const int kr0 = k0 + wg * 64 + warp * 16 + (lane >> 2), kr1 = kr0 + 8;
    const int sk0 = SEG && kr0 < T ? sg[kr0] : 0, sk1 = SEG && kr1 < T ? sg[kr1] : 0;
    const int kfirst = min(k0 + wg * 64, T - 1), skf = SEG ? sg[kfirst] : 0;
    const int skl = SEG ? sg[min(k0 + wg * 64 + 63, T - 1)] : 0;
    for (int qt = qt0; (DR & 2) || qt < nq; qt++) { /* DR 2: qt0 < nq always */
        const int buf = (qt - qt0) % L::STAGES, q0 = qt * TQ;
        if (ST == 3) {
            prefetch(qt + 2); /* into the stage tile qt - 1 used: drained, behind a barrier */
            cp_async_wait<2>();
            fence_proxy_async();
            __syncthreads();
        } else {
            cp_async_wait<1>(); /* tile qt has landed (qt + 1 may be in flight) */
            fence_proxy_async();
            __syncthreads();
            /* into tile qt - 2's stage: each warpgroup waited for its products in tile
             * qt - 1 (the first step's wait, or the wait of a skipped tile) */
            prefetch(qt + 2);
        }
        const unsigned char *Qb = Qs + buf * L::QB, *dOb = dOs + buf * L::OB;
        const float *ls = lse_s + buf * TQ, *Ds = D_s + buf * TQ;
        /* a warpgroup whose keys all lie past this tile's last query skips it, and one whose
         * keys all belong to documents before this tile's first query's */
        const bool live = k0 + wg * 64 <= q0 + TQ - 1 && (!SEG || skl >= sg[q0]);
        /* the groups S^T, dP^T, dV, dK are in flight together: P is computed while dP^T
         * runs, dS while dV runs, and the next step's S^T and dP^T queue behind dK */
        if (live) {
#pragma unroll
            for (int hs = 0; hs < TQ; hs += HS) {
                if (k0 + wg * 64 > q0 + hs + HS - 1)
                    continue; /* (TQ 128) every key of the warpgroup follows every query */
                float st[HS / 2], dp[HS / 2]; /* the first k-step overwrites them */
                wg_fence();
                wg_abt<HS, DKP, (AR & 1) != 0>(st, ka, Ks, TK, wg * 64, Qb, TQ, hs);
                wg_commit();
                wg_abt<HS, DVP, (AR & 2) != 0>(dp, va, Vs, TK, wg * 64, dOb, TQ, hs);
                wg_commit();
                wg_wait<1>(); /* S^T, and the last step's dV and dK, are done */
                wg_regs(st);
                wg_regs(dV);
                wg_regs(dK);
                /* P^T, masked only where a key of this warpgroup can pass a query of this
                 * step, or past T */
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
                f3_bwd_dst<HS>(dp, st, Ds, hs, lane);
                wg_pack_a<HS>(da, dp);
                wg_fence();
                wg_ab_rs<DKP>(dK, da, Qb, TQ, hs);
                wg_commit();
            }
        }
        if (ST == 3 || (DR & 1) || !live) {
            wg_wait<0>();
            wg_regs(dV);
            wg_regs(dK);
        }
        if (ST == 3)
            __syncthreads(); /* a later prefetch overwrites the stage just read */
        if ((DR & 2) && qt + 1 >= nq)
            break;
    }
    wg_wait<0>();
    wg_regs(dV);
    wg_regs(dK);
    f3_store_dkdv<DKP, DVP, false>(d_k, d_v, dK, dV, scale, 1.0f, b, T, nh, h, dk, dv, kr0,
                                   kr1, lane);
}

template <int DKP, int DVP, int ST = 3, int TN_ = 64>
struct f3q_smem {
    static const int TM = 128, TN = TN_;
    static const int QB = TM * DKP * 2, OB = TM * DVP * 2, KB = TN * DKP * 2, VB = TN * DVP * 2;
    static const int STAGES = ST;
    static const size_t bytes = (size_t)QB + OB + STAGES * (KB + VB) + 1024;
};

/* dQ: block = 128 queries, two warpgroups of 64, over the key tiles (TN: 64, or 128;
 * loaded two ahead) up to the diagonal, 64 keys a step: S = Q K^T, dP = dO V^T,
 * dS = P (dP - D) scale, dQ += dS K; a warpgroup skips the steps whose keys all follow its
 * queries. ST 3: each tile's last dQ product drains before the next tile's barrier (the
 * next load refills the stage it reads); ST 4 (96/64): the refilled stage is two tiles
 * back, so dQ runs on under the next tile's barrier, loads and S, and is waited for with
 * S. FX: exp by ex2.approx. KS_: keys a step (64; 128 with TN 128: S and dP as m64n128
 * products, half the A-operand reads and wgmma issues, one step a tile). AR (bits): 1 the
 * warpgroup's Q rows, 2 its dO rows, held in registers as the A operand of S, dP. DR
 * (bits), as in the dK/dV kernel: 1 the last dQ product of a tile waited for at its end
 * with ST 4 too, 2 the tile loop without a zero-trip path (kt0 < ntiles always); either
 * keeps ptxas from serialising every wgmma of the ST 4 kernel (warning C7515). */
template <int DKP, int DVP, bool SEG, int ST, bool FX, int TN_, int MINB, int KS_ = 64,
          int AR = 0, int DR = 0>
__global__ void __launch_bounds__(256, MINB)
    f3_bwd_dq_kernel(bf16 *d_q, const bf16 *d_out, const float *lse, const float *D,
                     const bf16 *q, const bf16 *k, const bf16 *v, const int32_t *seg, int T,
                     int nh, int dk, int dv, float scale, int lpt)
{
    typedef f3q_smem<DKP, DVP, ST, TN_> L;
    const int TM = L::TM, TN = L::TN, KS = KS_; /* keys a step */
    static_assert((ST == 3 || ST == 4) && TN % KS == 0, "stages and steps");
    extern __shared__ unsigned char smem_raw[];
    unsigned char *Qs = align1024(smem_raw), *dOs = Qs + L::QB, *Ks = dOs + L::OB;
    unsigned char *Vs = Ks + L::STAGES * L::KB;
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    /* lpt: as in the dK/dV kernel, the last queries (the most keys) of every head first */
    const int qt = lpt ? gridDim.y - 1 - blockIdx.y : gridDim.x - 1 - blockIdx.x;
    const int h = lpt ? blockIdx.x % nh : blockIdx.y, b = lpt ? blockIdx.x / nh : blockIdx.z;
    const int q0 = qt * TM;
    const float sl2 = scale * LOG2E;
    const int wrow = q0 + wg * 64, qr0 = wrow + warp * 16 + (lane >> 2), qr1 = qr0 + 8;
    const float *lse_bh = lse + ((int64_t)b * nh + h) * T, *D_bh = D + ((int64_t)b * nh + h) * T;
    const float lse0 = qr0 < T ? lse_bh[qr0] * LOG2E : 0.0f;
    const float lse1 = qr1 < T ? lse_bh[qr1] * LOG2E : 0.0f;
    const float D0 = qr0 < T ? D_bh[qr0] : 0.0f, D1 = qr1 < T ? D_bh[qr1] : 0.0f;
    const int ntiles = causal_ntiles(q0, TM, TN, T);
    const int32_t *sg = SEG ? seg + (int64_t)b * T : NULL;
    const int kt0 = SEG ? doc_first(sg, q0) / TN : 0; /* documents: the first visible tile */
    const int sq0 = SEG && qr0 < T ? sg[qr0] : 0, sq1 = SEG && qr1 < T ? sg[qr1] : 0;
    const int slast = SEG ? sg[min(wrow + 63, T - 1)] : 0;
    /* key tile kt goes to stage (kt - kt0) % ST, two tiles ahead of its use; every tile
     * (also past the last) commits one cp.async group, so the counts stay uniform */
    auto prefetch = [&](int kt) {
        const int st = (kt - kt0) % L::STAGES;
        if (kt < ntiles) {
            swz_tile<DKP, TN, 256>(Ks + st * L::KB, k, b, h, kt * TN, T, nh, dk);
            swz_tile<DVP, TN, 256>(Vs + st * L::VB, v, b, h, kt * TN, T, nh, dv);
        }
        cp_async_commit();
    };
    swz_tile<DKP, TM, 256>(Qs, q, b, h, q0, T, nh, dk);
    swz_tile<DVP, TM, 256>(dOs, d_out, b, h, q0, T, nh, dv);
    prefetch(kt0);
    prefetch(kt0 + 1);
    uint32_t qa[AR & 1 ? DKP / 16 : 1][4], oa[AR & 2 ? DVP / 16 : 1][4];
    f3_afrags<AR, DKP, DVP>(qa, oa, Qs, dOs, TM, wg * 64); /* Q and dO: the first group */
    float dQ[DKP / 2];
    wg_zero(dQ);
    for (int kt = kt0; (DR & 2) || kt < ntiles; kt++) { /* DR 2: kt0 < ntiles always */
        const int buf = (kt - kt0) % L::STAGES, k0 = kt * TN;
        cp_async_wait<1>(); /* tile kt has landed (kt + 1 may be in flight) */
        fence_proxy_async();
        __syncthreads();
        /* every warpgroup is done with the stage refilled here: tile kt - 1's (ST 3: its
         * dQ was waited for at its end) or kt - 2's (ST 4: waited for with tile kt - 1's S) */
        prefetch(kt + 2);
        const unsigned char *Kb = Ks + buf * L::KB, *Vb = Vs + buf * L::VB;
#pragma unroll
        for (int ks = 0; ks < TN; ks += KS) {
            const int s0 = k0 + ks; /* this step's first key */
            /* (TN 128) every key follows every query, or lies past T: nothing to add; with
             * TN 64, warpgroup 0's last tile is computed anyway, all masked, as before */
            if (TN > KS && (s0 > wrow + 63 || s0 >= T)) {
                wg_wait<0>();
                wg_regs(dQ);
                continue;
            }
            float sc[KS / 2], dp[KS / 2]; /* the first k-step overwrites them */
            wg_fence();
            wg_abt<KS, DKP, (AR & 1) != 0>(sc, qa, Qs, TM, wg * 64, Kb, TN, ks);
            wg_commit();
            wg_abt<KS, DVP, (AR & 2) != 0>(dp, oa, dOs, TM, wg * 64, Vb, TN, ks);
            wg_commit();
            wg_wait<1>(); /* S is done (and the last step's dQ); dP may still run */
            wg_regs(sc);
            const bool edge = s0 + KS - 1 > wrow || s0 + KS > T || (SEG && sg[s0] != slast);
#pragma unroll
            for (int j = 0; j < KS / 8; j++)
#pragma unroll
                for (int x = 0; x < 4; x++) {
                    float p = exp2x<FX>(fmaf(sc[4 * j + x], sl2, -(x < 2 ? lse0 : lse1)));
                    if (edge) {
                        int kc = s0 + j * 8 + (lane & 3) * 2 + (x & 1), qr = x < 2 ? qr0 : qr1;
                        if (!(qr < T && kc <= qr && (!SEG || sg[kc] == (x < 2 ? sq0 : sq1))))
                            p = 0;
                    }
                    sc[4 * j + x] = p;
                }
            wg_wait<0>();
            wg_regs(dp);
            uint32_t da[KS / 16][4];
            f3_dq_pack_ds<KS>(da, sc, dp, D0, D1);
            wg_regs(dQ);
            wg_fence();
            wg_ab_rs<DKP>(dQ, da, Kb, TN, ks);
            wg_commit();
            if ((ST == 3 || (DR & 1)) && ks + KS == TN) { /* the next barrier frees this stage */
                wg_wait<0>();
                wg_regs(dQ);
            }
        }
        if ((DR & 2) && kt + 1 >= ntiles)
            break;
    }
    wg_wait<0>();
    wg_regs(dQ);
    store_rows_bf16<DKP, true>(d_q, dQ, scale, scale, qr0, qr1, b, h, T, nh, dk, lane);
}

#include "attention_fa.cuh" /* the fused backward, DSV3_ATTN_BWD 9 and 10 */

template <int DKP, int DVP, bool SEG>
static int f3_fwd_launch_t(gpu_ctx *c, bf16 *out, float *lse, const bf16 *q, const bf16 *k,
                           const bf16 *v, const int32_t *seg, int B, int T, int nh, int dk,
                           int dv, float scale, dsv3_err *e)
{
    typedef f3_smem<DKP, DVP> L;
    CUDA_TRY(cudaFuncSetAttribute(f3_fwd_kernel<DKP, DVP, SEG>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, (int)L::bytes),
             e);
    dim3 grid((T + L::TM - 1) / L::TM, nh, B);
    f3_fwd_kernel<DKP, DVP, SEG><<<grid, 256, L::bytes, c->stream>>>(out, lse, q, k, v, seg, T,
                                                                       nh, dk, dv, scale);
    LAUNCH_CHECK("attention_fwd (sm90)", e);
    return 0;
}

template <int DKP, int DVP>
static int f3_fwd_launch(gpu_ctx *c, bf16 *out, float *lse, const bf16 *q, const bf16 *k,
                         const bf16 *v, const int32_t *seg, int B, int T, int nh, int dk, int dv,
                         float scale, dsv3_err *e)
{
    if (seg)
        return f3_fwd_launch_t<DKP, DVP, true>(c, out, lse, q, k, v, seg, B, T, nh, dk, dv,
                                               scale, e);
    return f3_fwd_launch_t<DKP, DVP, false>(c, out, lse, q, k, v, seg, B, T, nh, dk, dv, scale,
                                            e);
}

template <int DKP, int DVP>
struct f3p_smem {
    static const int TM = 128, TN = 64, STAGES = 3;
    static const int QB = TM * DKP * 2, KB = TN * DKP * 2, VB = TN * DVP * 2;
    static const size_t bytes = (size_t)QB + STAGES * (KB + VB) + 1024;
};

/* Forward, pipelined (variant 3): as f3_fwd_kernel, with key tiles of 64 in three stages,
 * and the next tile's S = Q K^T issued before this tile's softmax, so the exponentials run
 * while the tensor cores compute (FlashAttention-3's intra-warpgroup overlap). */
template <int DKP, int DVP>
__global__ void __launch_bounds__(256, 1)
    f3_fwd_pipe_kernel(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v,
                       int T, int nh, int dk, int dv, float scale)
{
    typedef f3p_smem<DKP, DVP> L;
    const int TM = L::TM, TN = L::TN;
    extern __shared__ unsigned char smem_raw[];
    unsigned char *Qs = align1024(smem_raw), *Ks = Qs + L::QB, *Vs = Ks + L::STAGES * L::KB;
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z, q0 = qt * TM;
    const int ntiles = causal_ntiles(q0, TM, TN, T);
    auto prefetch = [&](int kt) {
        const int st = kt % L::STAGES;
        if (kt < ntiles) {
            swz_tile<DKP, TN, 256>(Ks + st * L::KB, k, b, h, kt * TN, T, nh, dk);
            swz_tile<DVP, TN, 256>(Vs + st * L::VB, v, b, h, kt * TN, T, nh, dv);
        }
        cp_async_commit();
    };
    swz_tile<DKP, TM, 256>(Qs, q, b, h, q0, T, nh, dk);
    prefetch(0);
    prefetch(1);
    float o[DVP / 2];
    wg_zero(o);
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0, l1 = 0;
    const float sl2 = scale * LOG2E;
    const int wrow = q0 + wg * 64, row0 = wrow + warp * 16 + (lane >> 2), row1 = row0 + 8;
    float s[TN / 2];
    cp_async_wait<1>();
    fence_proxy_async();
    __syncthreads();
    wg_fence();
    wg_abt_ss<TN, DKP>(s, Qs, TM, wg * 64, Ks, TN, 0);
    wg_commit();
    wg_wait<0>();
    wg_regs(s);

    for (int kt = 0; kt < ntiles; kt++) {
        const int buf = kt % L::STAGES, k0 = kt * TN;
        const bool more = kt + 1 < ntiles;
        if (more)
            cp_async_wait<0>(); /* tile kt + 1 */
        fence_proxy_async();
        __syncthreads(); /* tile kt + 1 visible; every warpgroup is past P V of tile kt - 1 */
        prefetch(kt + 2); /* into tile kt - 1's stage */
        float sn[TN / 2];
        if (more) {
            const unsigned char *Kn = Ks + ((kt + 1) % L::STAGES) * L::KB;
            wg_fence();
            wg_abt_ss<TN, DKP>(sn, Qs, TM, wg * 64, Kn, TN, 0);
            wg_commit();
        }
        /* softmax of tile kt while the next S runs */
        float a0, a1;
        f3_softmax<TN, false, false>(s, k0, wrow, row0, row1, T, NULL, 0, 0, 0, sl2, m0, m1, l0,
                                     l1, a0, a1);
        uint32_t pa[TN / 16][4];
        f3_rescale_pack<TN, DVP>(o, pa, s, a0, a1);
        wg_regs(o);
        wg_fence();
        wg_ab_rs<DVP>(o, pa, Vs + buf * L::VB, TN, 0);
        wg_commit();
        wg_wait<0>();
        wg_regs(o);
        if (more) {
            wg_regs(sn);
#pragma unroll
            for (int j = 0; j < TN / 2; j++)
                s[j] = sn[j];
        }
    }
    attn_fwd_store<DVP>(out, lse, o, m0, m1, l0, l1, false, row0, row1, b, h, T, nh, dv);
}

template <int DKP, int DVP>
static int f3_fwdp_launch(gpu_ctx *c, bf16 *out, float *lse, const bf16 *q, const bf16 *k,
                          const bf16 *v, int B, int T, int nh, int dk, int dv, float scale,
                          dsv3_err *e)
{
    typedef f3p_smem<DKP, DVP> L;
    CUDA_TRY(cudaFuncSetAttribute(f3_fwd_pipe_kernel<DKP, DVP>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, (int)L::bytes),
             e);
    dim3 grid((T + L::TM - 1) / L::TM, nh, B);
    f3_fwd_pipe_kernel<DKP, DVP><<<grid, 256, L::bytes, c->stream>>>(out, lse, q, k, v, T, nh,
                                                                       dk, dv, scale);
    LAUNCH_CHECK("attention_fwd (sm90, pipelined)", e);
    return 0;
}

#include "attention_ws.cuh" /* the warp-specialised TMA forward, variants 4 and 5 */
#include "attention_wsb.cuh" /* the warp-specialised TMA dQ kernel, backward candidate 18 */

/* Backward kernel shapes (f3_bwd_dkdv_kernel, f3_bwd_dq_kernel): HS queries a dK/dV step,
 * SK and SQ stages of the two kernels, FX the ex2.approx exponential; KSQ keys a dQ step,
 * ARK and ARQ the operands each kernel holds in registers (its AR), DR (bits) the kernels
 * that drain their products at every tile's end (1 dK/dV, 2 dQ, 4 dK/dV on documents
 * only), 8 the tile loops of the others without a zero-trip path (kernel DR 1 or 2). */
template <int DKP, int DVP, bool SEG, int HS, int SK, int SQ, bool FX, int TQ, int TN, int MB,
          int KSQ, int ARK, int ARQ, int DR, int WSQ>
static int f3_bwd_launch_t(gpu_ctx *c, bf16 *d_q, bf16 *d_k, bf16 *d_v, const bf16 *d_out,
                           const float *lse, const float *D, const bf16 *q, const bf16 *k,
                           const bf16 *v, const int32_t *seg, int B, int T, int nh, int dk,
                           int dv, float scale, int lpt, dsv3_err *e)
{
    typedef f3b_smem<DKP, DVP, SK, TQ> LB;
    typedef f3q_smem<DKP, DVP, SQ, TN> LQ;
    static_assert(LB::bytes <= 227 * 1024 && LQ::bytes <= 227 * 1024, "shared memory");
    /* the kernels' DR: drain (1), else the loop without a zero-trip path where asked (2) */
    constexpr int DK = (DR & (SEG ? 5 : 1)) ? 1 : (DR & 8) ? 2 : 0;
    constexpr int DQ = (DR & 2) ? 1 : (DR & 8) ? 2 : 0;
    CUDA_TRY(cudaFuncSetAttribute(f3_bwd_dkdv_kernel<DKP, DVP, SEG, HS, SK, FX, TQ, MB / 10, ARK,
                                                     DK>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, (int)LB::bytes),
             e);
    if constexpr (WSQ >= 3) { /* the warp-specialised dK/dV and dQ kernels */
        return ws_dkdv_launch<DKP, DVP, SEG, WSQ != 4, WSQ == 5>(c, d_k, d_v, d_out, lse, D, q, k, v, seg, B, T, nh,
                                             dk, dv, scale, e) ||
                       ws_dq_launch<DKP, DVP, SEG, false>(c, d_q, d_out, lse, D, q, k, v, seg, B,
                                                          T, nh, dk, dv, scale, lpt, e)
                   ? -1
                   : 0;
    }
    const int nk = (T + LB::TK - 1) / LB::TK, nqt = (T + LQ::TM - 1) / LQ::TM;
    dim3 gk = lpt ? dim3(nh * B, nk) : dim3(nk, nh, B), gq = lpt ? dim3(nh * B, nqt) : dim3(nqt, nh, B);
    f3_bwd_dkdv_kernel<DKP, DVP, SEG, HS, SK, FX, TQ, MB / 10, ARK, DK><<<gk, 256, LB::bytes,
                                                                         c->stream>>>(
        d_k, d_v, d_out, lse, D, q, k, v, seg, T, nh, dk, dv, scale, lpt);
    LAUNCH_CHECK("attention_bwd dk dv (sm90)", e);
    if constexpr (WSQ != 0) { /* the warp-specialised dQ kernel (attention_wsb.cuh) */
        (void)gq;
        return ws_dq_launch<DKP, DVP, SEG, WSQ == 2>(c, d_q, d_out, lse, D, q, k, v, seg, B, T, nh, dk, dv,
                                           scale, lpt, e);
    } else {
        CUDA_TRY(cudaFuncSetAttribute(f3_bwd_dq_kernel<DKP, DVP, SEG, SQ, FX, TN, MB % 10, KSQ,
                                                       ARQ, DQ>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      (int)LQ::bytes),
                 e);
        f3_bwd_dq_kernel<DKP, DVP, SEG, SQ, FX, TN, MB % 10, KSQ, ARQ, DQ><<<gq, 256, LQ::bytes,
                                                                         c->stream>>>(
            d_q, d_out, lse, D, q, k, v, seg, T, nh, dk, dv, scale, lpt);
        LAUNCH_CHECK("attention_bwd dq (sm90)", e);
        return 0;
    }
}

/* MB: blocks an SM each kernel's registers must allow, 10 x dK/dV's + dQ's */
template <int DKP, int DVP, int HS, int SK, int SQ, bool FX, int TQ = 64, int TN = 64,
          int MB = 11, int KSQ = 64, int ARK = 0, int ARQ = 0, int DR = 0, int WSQ = 0>
static int f3_bwd_launch(gpu_ctx *c, bf16 *d_q, bf16 *d_k, bf16 *d_v, const bf16 *d_out,
                         const float *lse, const float *D, const bf16 *q, const bf16 *k,
                         const bf16 *v, const int32_t *seg, int B, int T, int nh, int dk, int dv,
                         float scale, int lpt, dsv3_err *e)
{
    if (seg)
        return f3_bwd_launch_t<DKP, DVP, true, HS, SK, SQ, FX, TQ, TN, MB, KSQ, ARK, ARQ, DR,
                               WSQ>(c, d_q, d_k, d_v, d_out, lse, D, q, k, v, seg, B, T, nh, dk,
                                    dv, scale, lpt, e);
    return f3_bwd_launch_t<DKP, DVP, false, HS, SK, SQ, FX, TQ, TN, MB, KSQ, ARK, ARQ, DR, WSQ>(
        c, d_q, d_k, d_v, d_out, lse, D, q, k, v, seg, B, T, nh, dk, dv, scale, lpt, e);
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

/* Head dims the fused backward (attention_fa.cuh, 96/64 tiles) takes: those above the
 * mma.sync-only 32/32 that fit its tiles. */
static bool fused_bwd_fits(int dk, int dv)
{
    return dk <= 96 && dv <= 64 && (dk > 32 || dv > 32);
}

/* The Hopper backward's kernel shapes (f3_bwd_launch: HS, SK, SQ, FX, TQ, TN, MB, KSQ, ARK,
 * ARQ, DR), chosen by DSV3_ATTN_BWD for timings (as DSV3_CE_KERNEL elsewhere;
 * scripts/bench-attn.sh BWD_SWEEP runs each; a value not listed takes the default);
 * DSV3_ATTN_LPT=1 orders the grid costliest tiles first. The default: 10 for document-masked
 * calls on a context set nondet (gpu_attention_set_nondet: 2.165 ms against 5's 2.766 on the
 * 1B-MoE shape with packed documents, but not bit-reproducible), else the fastest
 * deterministic ones of the H100 sweep of 2026-11-28 (docs/PERF.md, "Calls 4 and 5"; 1B-MoE
 * shape B=8): 17 on causal rows (3.117 ms against 5's 3.594), 16 on documents (2.239 against
 * 2.629); at 192/128 both are 5's kernels without the serialisation (5.58 against 5.66 ms).
 * Since branch dqws, 20 on causal rows (both kernels warp-specialised, 17's bits; H200
 * 2026-11-28, same call: 2.465 ms against 18's 2.575 and 17's 3.127; docs/KERNELS.md "The
 * warp-specialised backward kernels"), 17 where they do not fit; documents keep 16 (2.269
 * against 20's 2.466, 21's 2.305, 19's 2.283 in another call).
 * Candidates 0-4, 6-8, 11 and 13-15 lost those sweeps and are retired (docs/KERNELS.md). 96/64:
 *   5  4-stage rings without a drain at tile ends, 64-query dK/dV steps, tiles of 128,
 *      ex2.approx (the default before 16 and 17; the tests' bitwise reference for 12)
 *   9  one fused kernel (dQ by fp32 reductions, attention_fa.cuh), dS by stmatrix
 *  10  as 9, dS by 2-byte stores
 * 12, 16, 17 (deterministic, no atomics): 5 without the wgmma serialisation ptxas puts on its
 * 4-stage dQ kernel (and on its dK/dV kernel for documents; warning C7515: it then waits
 * after every wgmma of the kernel): tile loops without the zero-trip path (DR 2), where a
 * tile's last products stay in flight at the loop's exit
 *  12  5 with those loops: 5's overlap kept, 5's bits
 *  16  12, K and V in registers (the A operand of the dK/dV kernel's S^T and dP^T; on
 *      documents that dK/dV kernel drains at tile ends, where 12's loop would spill), Q and
 *      dO in registers (the A operand of the dQ kernel's S and dP)
 *  17  16's dK/dV kernel, dQ steps of 128 keys (S and dP as m64n128 products)
 *  18  17's dK/dV kernel, then the warp-specialised TMA dQ kernel (attention_wsb.cuh:
 *      a loader warpgroup, two consumer warpgroups taking turns to issue 17's products;
 *      two turns a key tile: S and dP, then dQ); 17 where it does not fit (head dims
 *      below 64, 192/128, tensors not 16-byte aligned)
 *  19  18 with one turn a key tile (the last tile's dQ issued with this tile's S and dP)
 *  20  18's dQ kernel after the warp-specialised dK/dV kernel (attention_wsb.cuh: 17's
 *      dK/dV products, two turns a 64-query step, K and V in registers)
 *  21  20 with K and V read from shared memory by each product
 *  22  20 with one turn a 64-query step in the dK/dV kernel (the step's S^T, dP^T issued
 *      with the previous step's dV, dK; ws_dkdv_ov)
 * 192/128 (no room for a fourth stage or 64-query steps): ex2.approx (also for 9 and 10: the
 * fused kernel is 96/64 only; 12 and 17 too: 3-stage kernels are not serialised), but 16
 * with Q in registers in the dQ kernel (K/V do not fit the dK/dV kernel's registers). */
static int f3_bwd_pick(gpu_ctx *c, bf16 *dq, bf16 *dk_, bf16 *dv_, const bf16 *dO,
                       const float *lse, const float *D, const bf16 *Q, const bf16 *K,
                       const bf16 *V, const int32_t *seg, int B, int T, int nh, int dk, int dv,
                       float scale, dsv3_err *e)
{
    const char *ev = getenv("DSV3_ATTN_BWD"), *el = getenv("DSV3_ATTN_LPT");
    const int fused = seg && c->attn_nondet && fused_bwd_fits(dk, dv);
    const int def = fused ? 10 : seg ? 16 : 20, lpt = el ? atoi(el) : 0;
    int bv = ev ? atoi(ev) : def;
    if (bv != 5 && bv != 9 && bv != 10 && bv != 12 && bv != 16 && bv != 17 && bv != 18 &&
        bv != 19 && bv != 20 && bv != 21 && bv != 22)
        bv = def;
    if (bv >= 18 && bv <= 22 && !ws_dq_fits(Q, K, V, dO, dk, dv))
        bv = 17;
#define F3B(...) f3_bwd_launch<__VA_ARGS__>(c, dq, dk_, dv_, dO, lse, D, Q, K, V, seg, B, T, nh, \
                                            dk, dv, scale, lpt, e)
    if (dk <= 96 && dv <= 64) {
        switch (bv) {
        case 5: return F3B(96, 64, 64, 4, 4, true, 128, 128);
        case 9:
            return f3_fused_launch<true>(c, dq, dk_, dv_, dO, lse, D, Q, K, V, seg, B, T, nh, dk,
                                         dv, scale, lpt, e);
        case 10:
            return f3_fused_launch<false>(c, dq, dk_, dv_, dO, lse, D, Q, K, V, seg, B, T, nh, dk,
                                          dv, scale, lpt, e);
        case 12: return F3B(96, 64, 64, 4, 4, true, 128, 128, 11, 64, 0, 0, 8);
        case 16: return F3B(96, 64, 64, 4, 4, true, 128, 128, 11, 64, 3, 3, 12);
        case 18: return F3B(96, 64, 64, 4, 4, true, 128, 128, 11, 128, 3, 0, 12, 1);
        case 19: return F3B(96, 64, 64, 4, 4, true, 128, 128, 11, 128, 3, 0, 12, 2);
        case 20: return F3B(96, 64, 64, 4, 4, true, 128, 128, 11, 128, 3, 0, 12, 3);
        case 21: return F3B(96, 64, 64, 4, 4, true, 128, 128, 11, 128, 3, 0, 12, 4);
        case 22: return F3B(96, 64, 64, 4, 4, true, 128, 128, 11, 128, 3, 0, 12, 5);
        default: return F3B(96, 64, 64, 4, 4, true, 128, 128, 11, 128, 3, 0, 12); /* 17 */
        }
    }
    if (bv == 16)
        return F3B(192, 128, 32, 3, 3, true, 64, 64, 11, 64, 0, 1);
    return F3B(192, 128, 32, 3, 3, true);
#undef F3B
}

/* The wgmma kernels exist in the sm_90a build only: use them on compute capability 9.x. */
static bool use_sm90(gpu_ctx *c)
{
    int major = 0;
    return cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, c->dev) ==
               cudaSuccess &&
           major == 9;
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
    int var = c->attn_fwd_variant;
    const char *fv = getenv("DSV3_ATTN_FWD"); /* a forward variant for timings */
    if (fv && *fv)
        var = atoi(fv);
    if (dk <= 32 && dv <= 32)
        return fwd_launch<32, 32, 4, true, 2, 1>(c, o, lse, Q, K, V, seg, B, T, nh, dk, dv, scale, e);
    /* 0 (the default), 4, 5: warp-specialised, TMA, ping-pong (attention_ws.cuh; 0 and 5
     * keep head dim 96; the same bits as variant 6, 1.2-2.8 ms less a 1b-moe step on an H100,
     * docs/PERF.md "The sixth session's device runs") */
    if ((var == 0 || var == 4 || var == 5) && use_sm90(c))
        return ws_fwd_launch(c, o, lse, Q, K, V, seg, B, T, nh, dk, dv, scale, var != 4, e);
    /* documents (seg): the wgmma forward of variant 0 (the pipelined one has no mask) */
    if (var == 3 && use_sm90(c) && !seg) {
        if (dk <= 128 && dv <= 64)
            return f3_fwdp_launch<128, 64>(c, o, lse, Q, K, V, B, T, nh, dk, dv, scale, e);
        return f3_fwdp_launch<192, 128>(c, o, lse, Q, K, V, B, T, nh, dk, dv, scale, e);
    }
    if ((var == 6 || (var == 3 && seg)) && use_sm90(c)) { /* 6: the default before the ws */
        /* 96/64 runs padded to 128/64: the 64-byte-swizzled 96 measured slower here
         * (1B-MoE shape, H200: 1.36 ms against 1.18), unlike in the backward */
        if (dk <= 128 && dv <= 64)
            return f3_fwd_launch<128, 64>(c, o, lse, Q, K, V, seg, B, T, nh, dk, dv, scale, e);
        return f3_fwd_launch<192, 128>(c, o, lse, Q, K, V, seg, B, T, nh, dk, dv, scale, e);
    }
    if (dk <= 96 && dv <= 64) {
        if (var == 2) /* one 4-warp block per 64 queries, up to 3 an SM */
            return fwd_launch<96, 64, 4, true, 2, 1>(c, o, lse, Q, K, V, seg, B, T, nh, dk, dv,
                                                     scale, e);
        /* two 8-warp blocks an SM: 16 warps, Q in registers, K/V double-buffered */
        return fwd_launch<96, 64, 8, true, 2, 2>(c, o, lse, Q, K, V, seg, B, T, nh, dk, dv, scale, e);
    }
    if (var == 2) /* 3 blocks of 4 warps an SM: Q in registers, 1 stage */
        return fwd_launch<192, 128, 4, true, 1, 3>(c, o, lse, Q, K, V, seg, B, T, nh, dk, dv,
                                                   scale, e);
    /* the fastest mma.sync variant measured (docs/KERNELS.md): 2 blocks of 8 warps an SM, Q
     * re-read from shared memory to fit 128 registers, one K/V stage to fit two blocks'
     * shared memory */
    return fwd_launch<192, 128, 8, false, 1, 2>(c, o, lse, Q, K, V, seg, B, T, nh, dk, dv, scale,
                                                e);
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
    bool vec = (((uintptr_t)d_out | (uintptr_t)out) & 15) == 0;
    attn_bwd_dot_kernel<<<(unsigned)((rows + 15) / 16), 256, 0, c->stream>>>(
        D, (const bf16 *)d_out, (const bf16 *)out, B, T, nh, dv, vec);
    LAUNCH_CHECK("attention_bwd dot", e);
    bf16 *dq = (bf16 *)d_q, *dk_ = (bf16 *)d_k, *dv_ = (bf16 *)d_v;
    const bf16 *dO = (const bf16 *)d_out, *Q = (const bf16 *)q, *K = (const bf16 *)k,
               *V = (const bf16 *)v;
    int rc;
    if (dk <= 32 && dv <= 32)
        rc = bwd_launch<32, 32>(c, dq, dk_, dv_, dO, lse, D, Q, K, V, seg, B, T, nh, dk, dv, scale,
                                e);
    else if ((c->attn_fwd_variant == 0 || c->attn_fwd_variant >= 3) && use_sm90(c))
        rc = f3_bwd_pick(c, dq, dk_, dv_, dO, lse, D, Q, K, V, seg, B, T, nh, dk, dv, scale, e);
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

extern "C" void gpu_attention_set_nondet(gpu_ctx *c, int nondet)
{
    c->attn_nondet = nondet;
}

extern "C" size_t gpu_attention_bwd_arena_bytes(int B, int T, int nh, int dk, int dv, int nondet)
{
    const size_t rows = (size_t)B * T * nh, pad = 255;
    size_t bytes = (rows * sizeof(float) + pad) & ~pad; /* D */
    if (nondet && fused_bwd_fits(dk, dv))
        bytes += (rows * dk * sizeof(float) + pad) & ~pad; /* the fused dQ accumulator */
    return bytes;
}
