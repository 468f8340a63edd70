/* attention: causal flash attention, forward and backward, on WMMA bf16 tensor-core tiles.
 *
 * Tiles of 64 queries x 64 keys; 4 warps, each owning 16 rows of the tile. Forward: for each
 * key tile up to the diagonal, S = Q K^T (fp32 in shared memory), an online softmax per row
 * (two lanes a row), P (bf16) V into registers rescaled per row. Backward (FlashAttention-2
 * order): D = rowsum(dO * O); one kernel per key tile accumulates dK, dV over the query
 * tiles; another per query tile accumulates dQ over the key tiles; no atomics, so results
 * are reproducible. Head dims are padded to the instantiation's DKP / DVP with zeros. */
#include <mma.h>

#include "attention.h"
#include "gpuctx_internal.cuh"

using namespace nvcuda;

#define BM 64
#define BN 64
#define ATT_THREADS 128
#define LOG2E 1.4426950408889634f

typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> frag_a;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> frag_b_row;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> frag_b_col;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> frag_c;

/* Copies rows [r0, r0+64) of a [B,T,nh,d] tensor (head h of sequence b) into smem[64][ld],
 * zero-filling rows >= T and columns >= d up to DP. 16-byte moves (d % 8 == 0). */
template <int DP>
__device__ __forceinline__ void load_tile(bf16 *sm, int ld, const bf16 *g, int b, int h, int r0,
                                          int T, int nh, int d)
{
    const int chunks = DP / 8;
    for (int t = threadIdx.x; t < 64 * chunks; t += blockDim.x) {
        int r = t / chunks, cc = (t % chunks) * 8;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (r0 + r < T && cc < d)
            val = *(const uint4 *)(g + (((int64_t)b * T + r0 + r) * nh + h) * d + cc);
        *(uint4 *)(sm + r * ld + cc) = val;
    }
}

template <int DKP, int DVP>
struct fwd_smem {
    static const int LQ = DKP + 8, LV = DVP + 8, LS = (BN > DVP ? BN : DVP) + 4, LP = BN + 8;
    static const size_t bytes = (size_t)(2 * 64 * LQ + 64 * LV) * 2 + 4 * 16 * LS * 4 +
                                4 * 16 * LP * 2;
};

template <int DKP, int DVP>
__global__ void __launch_bounds__(ATT_THREADS)
    attn_fwd_kernel(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v, int T,
                    int nh, int dk, int dv, float scale)
{
    typedef fwd_smem<DKP, DVP> L;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *Qs = (bf16 *)smem, *Ks = Qs + 64 * L::LQ, *Vs = Ks + 64 * L::LQ;
    float *Sall = (float *)(Vs + 64 * L::LV);
    bf16 *Pall = (bf16 *)(Sall + 4 * 16 * L::LS);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *Sw = Sall + warp * 16 * L::LS;
    bf16 *Pw = Pall + warp * 16 * L::LP;
    int qt = gridDim.x - 1 - blockIdx.x; /* the longest rows first */
    int h = blockIdx.y, b = blockIdx.z, q0 = qt * BM;
    load_tile<DKP>(Qs, L::LQ, q, b, h, q0, T, nh, dk);

    const int r = lane >> 1, half = lane & 1, HV = DVP / 2;
    const int qi = q0 + warp * 16 + r; /* this lane's query row */
    float o[HV];
#pragma unroll
    for (int i = 0; i < HV; i++)
        o[i] = 0;
    float m_i = -INFINITY, l_i = 0;
    const float sl2 = scale * LOG2E;
    int ntiles = (q0 + BM - 1) / BN + 1;
    if (ntiles * BN > T)
        ntiles = (T + BN - 1) / BN;
    for (int kt = 0; kt < ntiles; kt++) {
        int k0 = kt * BN;
        __syncthreads();
        load_tile<DKP>(Ks, L::LQ, k, b, h, k0, T, nh, dk);
        load_tile<DVP>(Vs, L::LV, v, b, h, k0, T, nh, dv);
        __syncthreads();
        /* S = Q_w K^T: 16 x 64 */
#pragma unroll
        for (int j = 0; j < BN / 16; j++) {
            frag_c acc;
            wmma::fill_fragment(acc, 0.0f);
#pragma unroll
            for (int kk = 0; kk < DKP / 16; kk++) {
                frag_a a;
                frag_b_col bt;
                wmma::load_matrix_sync(a, Qs + warp * 16 * L::LQ + kk * 16, L::LQ);
                wmma::load_matrix_sync(bt, Ks + j * 16 * L::LQ + kk * 16, L::LQ);
                wmma::mma_sync(acc, a, bt, acc);
            }
            wmma::store_matrix_sync(Sw + j * 16, acc, L::LS, wmma::mem_row_major);
        }
        __syncwarp();
        /* online softmax: this lane has row r, columns half*32 .. +32 */
        float sv[32], mloc = -INFINITY;
#pragma unroll
        for (int c = 0; c < 32; c++) {
            int kj = k0 + half * 32 + c;
            float s = (kj <= qi && kj < T) ? Sw[r * L::LS + half * 32 + c] * sl2 : -INFINITY;
            sv[c] = s;
            mloc = fmaxf(mloc, s);
        }
        mloc = fmaxf(mloc, __shfl_xor_sync(0xffffffffu, mloc, 1));
        float m_new = fmaxf(m_i, mloc);
        float alpha = m_new == -INFINITY ? 1.0f : exp2f(m_i - m_new);
        float rs = 0;
#pragma unroll
        for (int c = 0; c < 32; c++) {
            float p = m_new == -INFINITY ? 0.0f : exp2f(sv[c] - m_new);
            rs += p;
            Pw[r * L::LP + half * 32 + c] = f2b(p);
        }
        rs += __shfl_xor_sync(0xffffffffu, rs, 1);
        l_i = l_i * alpha + rs;
        m_i = m_new;
#pragma unroll
        for (int i = 0; i < HV; i++)
            o[i] *= alpha;
        __syncwarp();
        /* O_w += P_w V: 16 x DVP, through the (now free) S scratch */
#pragma unroll
        for (int j = 0; j < DVP / 16; j++) {
            frag_c acc;
            wmma::fill_fragment(acc, 0.0f);
#pragma unroll
            for (int kk = 0; kk < BN / 16; kk++) {
                frag_a a;
                frag_b_row bv;
                wmma::load_matrix_sync(a, Pw + kk * 16, L::LP);
                wmma::load_matrix_sync(bv, Vs + kk * 16 * L::LV + j * 16, L::LV);
                wmma::mma_sync(acc, a, bv, acc);
            }
            wmma::store_matrix_sync(Sw + j * 16, acc, L::LS, wmma::mem_row_major);
        }
        __syncwarp();
#pragma unroll
        for (int i = 0; i < HV; i++)
            o[i] += Sw[r * L::LS + half * HV + i];
        __syncwarp();
    }
    if (qi < T) {
        float inv = 1.0f / l_i;
        bf16 *dst = out + (((int64_t)b * T + qi) * nh + h) * dv;
        for (int i = 0; i < HV; i++) {
            int col = half * HV + i;
            if (col < dv)
                dst[col] = f2b(o[i] * inv);
        }
        if (half == 0)
            lse[((int64_t)b * nh + h) * T + qi] = (m_i + log2f(l_i)) / LOG2E;
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

/* Writes a warp's 16 x (NF*16) fp32 accumulators as bf16 rows row0.. of a [B,T,nh,d]
 * tensor through the warp's scratch (ld floats a row); rows >= T and columns >= d skipped.
 * The fragment index is a compile-time constant, so the array stays in registers. */
template <int NF>
__device__ __forceinline__ void store_rows(frag_c (&f)[NF], float *scratch, int ld, bf16 *dst,
                                           int b, int h, int row0, int T, int nh, int d)
{
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int j = 0; j < NF; j++) {
        wmma::store_matrix_sync(scratch, f[j], ld, wmma::mem_row_major);
        __syncwarp();
        for (int t = lane; t < 256; t += 32) {
            int rr = t / 16, cc = j * 16 + t % 16, row = row0 + rr;
            if (row < T && cc < d)
                dst[(((int64_t)b * T + row) * nh + h) * d + cc] = f2b(scratch[rr * ld + t % 16]);
        }
        __syncwarp();
    }
}

template <int DKP, int DVP>
struct bwd_smem {
    static const int LQ = DKP + 8, LV = DVP + 8, LS = BN + 4, LP = BN + 8;
    static const size_t bytes =
        (size_t)(2 * 64 * LQ + 2 * 64 * LV) * 2 + 4 * 16 * LS * 4 * 2 + 4 * 16 * LP * 2 * 2;
};

/* One block per 64 keys: dV = sum P^T dO, dK = scale * sum dS^T Q over query tiles. */
template <int DKP, int DVP>
__global__ void __launch_bounds__(ATT_THREADS)
    attn_bwd_dkdv_kernel(bf16 *d_k, bf16 *d_v, const bf16 *d_out, const float *lse,
                         const float *D, const bf16 *q, const bf16 *k, const bf16 *v, int T,
                         int nh, int dk, int dv, float scale)
{
    typedef bwd_smem<DKP, DVP> L;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *Ks = (bf16 *)smem, *Qs = Ks + 64 * L::LQ, *Vs = Qs + 64 * L::LQ, *dOs = Vs + 64 * L::LV;
    float *S1 = (float *)(dOs + 64 * L::LV), *S2 = S1 + 4 * 16 * L::LS;
    bf16 *P1 = (bf16 *)(S2 + 4 * 16 * L::LS), *P2 = P1 + 4 * 16 * L::LP;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *Sw = S1 + warp * 16 * L::LS, *dPw = S2 + warp * 16 * L::LS;
    bf16 *Pw = P1 + warp * 16 * L::LP, *dSw = P2 + warp * 16 * L::LP;
    int kt = blockIdx.x, h = blockIdx.y, b = blockIdx.z, k0 = kt * BN;
    load_tile<DKP>(Ks, L::LQ, k, b, h, k0, T, nh, dk);
    load_tile<DVP>(Vs, L::LV, v, b, h, k0, T, nh, dv);
    frag_c dV[DVP / 16], dK[DKP / 16];
#pragma unroll
    for (int j = 0; j < DVP / 16; j++)
        wmma::fill_fragment(dV[j], 0.0f);
#pragma unroll
    for (int j = 0; j < DKP / 16; j++)
        wmma::fill_fragment(dK[j], 0.0f);
    const float sl2 = scale * LOG2E;
    const int r = lane >> 1, half = lane & 1;
    const int kj = k0 + warp * 16 + r; /* this lane's key row */
    const float *lse_bh = lse + ((int64_t)b * nh + h) * T, *D_bh = D + ((int64_t)b * nh + h) * T;
    int nq = (T + BM - 1) / BM;
    for (int qt = kt * BN / BM; qt < nq; qt++) {
        int q0 = qt * BM;
        __syncthreads();
        load_tile<DKP>(Qs, L::LQ, q, b, h, q0, T, nh, dk);
        load_tile<DVP>(dOs, L::LV, d_out, b, h, q0, T, nh, dv);
        __syncthreads();
        /* S^T = K_w Q^T and dP^T = V_w dO^T: 16 keys x 64 queries */
#pragma unroll
        for (int j = 0; j < BM / 16; j++) {
            frag_c acc;
            wmma::fill_fragment(acc, 0.0f);
#pragma unroll
            for (int kk = 0; kk < DKP / 16; kk++) {
                frag_a a;
                frag_b_col bt;
                wmma::load_matrix_sync(a, Ks + warp * 16 * L::LQ + kk * 16, L::LQ);
                wmma::load_matrix_sync(bt, Qs + j * 16 * L::LQ + kk * 16, L::LQ);
                wmma::mma_sync(acc, a, bt, acc);
            }
            wmma::store_matrix_sync(Sw + j * 16, acc, L::LS, wmma::mem_row_major);
            wmma::fill_fragment(acc, 0.0f);
#pragma unroll
            for (int kk = 0; kk < DVP / 16; kk++) {
                frag_a a;
                frag_b_col bt;
                wmma::load_matrix_sync(a, Vs + warp * 16 * L::LV + kk * 16, L::LV);
                wmma::load_matrix_sync(bt, dOs + j * 16 * L::LV + kk * 16, L::LV);
                wmma::mma_sync(acc, a, bt, acc);
            }
            wmma::store_matrix_sync(dPw + j * 16, acc, L::LS, wmma::mem_row_major);
        }
        __syncwarp();
#pragma unroll 8
        for (int c = 0; c < 32; c++) {
            int col = half * 32 + c, qi = q0 + col;
            float p = 0, ds = 0;
            if (qi < T && kj <= qi && kj < T) {
                p = exp2f(Sw[r * L::LS + col] * sl2 - lse_bh[qi] * LOG2E);
                ds = p * (dPw[r * L::LS + col] - D_bh[qi]);
            }
            Pw[r * L::LP + col] = f2b(p);
            dSw[r * L::LP + col] = f2b(ds * scale);
        }
        __syncwarp();
        /* dV_w += P^T dO; dK_w += dS^T Q (scale folded into dS) */
#pragma unroll
        for (int kk = 0; kk < BM / 16; kk++) {
            frag_a ap, ad;
            wmma::load_matrix_sync(ap, Pw + kk * 16, L::LP);
            wmma::load_matrix_sync(ad, dSw + kk * 16, L::LP);
#pragma unroll
            for (int j = 0; j < DVP / 16; j++) {
                frag_b_row bo;
                wmma::load_matrix_sync(bo, dOs + kk * 16 * L::LV + j * 16, L::LV);
                wmma::mma_sync(dV[j], ap, bo, dV[j]);
            }
#pragma unroll
            for (int j = 0; j < DKP / 16; j++) {
                frag_b_row bq;
                wmma::load_matrix_sync(bq, Qs + kk * 16 * L::LQ + j * 16, L::LQ);
                wmma::mma_sync(dK[j], ad, bq, dK[j]);
            }
        }
    }
    /* out through the warp's scratch, 16 columns at a time */
    __syncwarp();
    store_rows<DVP / 16>(dV, Sw, L::LS, d_v, b, h, k0 + warp * 16, T, nh, dv);
    store_rows<DKP / 16>(dK, Sw, L::LS, d_k, b, h, k0 + warp * 16, T, nh, dk);
}

/* One block per 64 queries: dQ = scale * sum dS K over key tiles up to the diagonal. */
template <int DKP, int DVP>
__global__ void __launch_bounds__(ATT_THREADS)
    attn_bwd_dq_kernel(bf16 *d_q, const bf16 *d_out, const float *lse, const float *D,
                       const bf16 *q, const bf16 *k, const bf16 *v, int T, int nh, int dk,
                       int dv, float scale)
{
    typedef bwd_smem<DKP, DVP> L;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *Qs = (bf16 *)smem, *Ks = Qs + 64 * L::LQ, *dOs = Ks + 64 * L::LQ, *Vs = dOs + 64 * L::LV;
    float *S1 = (float *)(Vs + 64 * L::LV), *S2 = S1 + 4 * 16 * L::LS;
    bf16 *P1 = (bf16 *)(S2 + 4 * 16 * L::LS);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *Sw = S1 + warp * 16 * L::LS, *dPw = S2 + warp * 16 * L::LS;
    bf16 *dSw = P1 + warp * 16 * L::LP;
    int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z, q0 = qt * BM;
    load_tile<DKP>(Qs, L::LQ, q, b, h, q0, T, nh, dk);
    load_tile<DVP>(dOs, L::LV, d_out, b, h, q0, T, nh, dv);
    frag_c dQ[DKP / 16];
#pragma unroll
    for (int j = 0; j < DKP / 16; j++)
        wmma::fill_fragment(dQ[j], 0.0f);
    const float sl2 = scale * LOG2E;
    const int r = lane >> 1, half = lane & 1, qi = q0 + warp * 16 + r;
    const float *lse_bh = lse + ((int64_t)b * nh + h) * T, *D_bh = D + ((int64_t)b * nh + h) * T;
    float lse_i = qi < T ? lse_bh[qi] * LOG2E : 0.0f, D_i = qi < T ? D_bh[qi] : 0.0f;
    int ntiles = (q0 + BM - 1) / BN + 1;
    if (ntiles * BN > T)
        ntiles = (T + BN - 1) / BN;
    for (int kt = 0; kt < ntiles; kt++) {
        int k0 = kt * BN;
        __syncthreads();
        load_tile<DKP>(Ks, L::LQ, k, b, h, k0, T, nh, dk);
        load_tile<DVP>(Vs, L::LV, v, b, h, k0, T, nh, dv);
        __syncthreads();
#pragma unroll
        for (int j = 0; j < BN / 16; j++) {
            frag_c acc;
            wmma::fill_fragment(acc, 0.0f);
#pragma unroll
            for (int kk = 0; kk < DKP / 16; kk++) {
                frag_a a;
                frag_b_col bt;
                wmma::load_matrix_sync(a, Qs + warp * 16 * L::LQ + kk * 16, L::LQ);
                wmma::load_matrix_sync(bt, Ks + j * 16 * L::LQ + kk * 16, L::LQ);
                wmma::mma_sync(acc, a, bt, acc);
            }
            wmma::store_matrix_sync(Sw + j * 16, acc, L::LS, wmma::mem_row_major);
            wmma::fill_fragment(acc, 0.0f);
#pragma unroll
            for (int kk = 0; kk < DVP / 16; kk++) {
                frag_a a;
                frag_b_col bt;
                wmma::load_matrix_sync(a, dOs + warp * 16 * L::LV + kk * 16, L::LV);
                wmma::load_matrix_sync(bt, Vs + j * 16 * L::LV + kk * 16, L::LV);
                wmma::mma_sync(acc, a, bt, acc);
            }
            wmma::store_matrix_sync(dPw + j * 16, acc, L::LS, wmma::mem_row_major);
        }
        __syncwarp();
#pragma unroll 8
        for (int c = 0; c < 32; c++) {
            int col = half * 32 + c, kj = k0 + col;
            float ds = 0;
            if (qi < T && kj <= qi) {
                float p = exp2f(Sw[r * L::LS + col] * sl2 - lse_i);
                ds = p * (dPw[r * L::LS + col] - D_i);
            }
            dSw[r * L::LP + col] = f2b(ds * scale);
        }
        __syncwarp();
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            frag_a ad;
            wmma::load_matrix_sync(ad, dSw + kk * 16, L::LP);
#pragma unroll
            for (int j = 0; j < DKP / 16; j++) {
                frag_b_row bk;
                wmma::load_matrix_sync(bk, Ks + kk * 16 * L::LQ + j * 16, L::LQ);
                wmma::mma_sync(dQ[j], ad, bk, dQ[j]);
            }
        }
    }
    __syncwarp();
    store_rows<DKP / 16>(dQ, Sw, L::LS, d_q, b, h, q0 + warp * 16, T, nh, dk);
}

/* ---- dispatch over the instantiated head dims ---- */

template <int DKP, int DVP>
static int fwd_launch(gpu_ctx *c, bf16 *out, float *lse, const bf16 *q, const bf16 *k,
                      const bf16 *v, int B, int T, int nh, int dk, int dv, float scale,
                      dsv3_err *e)
{
    size_t smem = fwd_smem<DKP, DVP>::bytes;
    CUDA_TRY(cudaFuncSetAttribute(attn_fwd_kernel<DKP, DVP>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
             e);
    dim3 grid((T + BM - 1) / BM, nh, B);
    attn_fwd_kernel<DKP, DVP><<<grid, ATT_THREADS, smem, c->stream>>>(out, lse, q, k, v, T, nh,
                                                                      dk, dv, scale);
    LAUNCH_CHECK("attention_fwd", e);
    return 0;
}

template <int DKP, int DVP>
static int bwd_launch(gpu_ctx *c, bf16 *d_q, bf16 *d_k, bf16 *d_v, const bf16 *d_out,
                      const float *lse, const float *D, const bf16 *q, const bf16 *k,
                      const bf16 *v, int B, int T, int nh, int dk, int dv, float scale,
                      dsv3_err *e)
{
    size_t smem = bwd_smem<DKP, DVP>::bytes;
    CUDA_TRY(cudaFuncSetAttribute(attn_bwd_dkdv_kernel<DKP, DVP>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
             e);
    CUDA_TRY(cudaFuncSetAttribute(attn_bwd_dq_kernel<DKP, DVP>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
             e);
    dim3 grid((T + BM - 1) / BM, nh, B);
    attn_bwd_dkdv_kernel<DKP, DVP><<<grid, ATT_THREADS, smem, c->stream>>>(
        d_k, d_v, d_out, lse, D, q, k, v, T, nh, dk, dv, scale);
    LAUNCH_CHECK("attention_bwd dk dv", e);
    attn_bwd_dq_kernel<DKP, DVP><<<grid, ATT_THREADS, smem, c->stream>>>(
        d_q, d_out, lse, D, q, k, v, T, nh, dk, dv, scale);
    LAUNCH_CHECK("attention_bwd dq", e);
    return 0;
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
    if (check_dims(dk, dv, e))
        return -1;
    if (B <= 0 || T <= 0 || nh <= 0)
        return 0;
    bf16 *o = (bf16 *)out;
    const bf16 *Q = (const bf16 *)q, *K = (const bf16 *)k, *V = (const bf16 *)v;
    if (dk <= 32 && dv <= 32)
        return fwd_launch<32, 32>(c, o, lse, Q, K, V, B, T, nh, dk, dv, scale, e);
    if (dk <= 96 && dv <= 64)
        return fwd_launch<96, 64>(c, o, lse, Q, K, V, B, T, nh, dk, dv, scale, e);
    return fwd_launch<192, 128>(c, o, lse, Q, K, V, B, T, nh, dk, dv, scale, e);
}

extern "C" int gpu_attention_bwd(gpu_ctx *c, gpu_bf16 *d_q, gpu_bf16 *d_k, gpu_bf16 *d_v,
                                 const gpu_bf16 *d_out, const gpu_bf16 *out, const float *lse,
                                 const gpu_bf16 *q, const gpu_bf16 *k, const gpu_bf16 *v, int B,
                                 int T, int nh, int dk, int dv, float scale, dsv3_err *e)
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
        rc = bwd_launch<32, 32>(c, dq, dk_, dv_, dO, lse, D, Q, K, V, B, T, nh, dk, dv, scale, e);
    else if (dk <= 96 && dv <= 64)
        rc = bwd_launch<96, 64>(c, dq, dk_, dv_, dO, lse, D, Q, K, V, B, T, nh, dk, dv, scale, e);
    else
        rc = bwd_launch<192, 128>(c, dq, dk_, dv_, dO, lse, D, Q, K, V, B, T, nh, dk, dv, scale,
                                  e);
    gpu_arena_reset(c, mark);
    return rc;
}
