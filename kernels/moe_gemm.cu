/* moe_gemm: the grouped expert GEMMs (forward, dgrad, wgrad) of kernels/moe.
 *
 * Default: one kernel of our own per call that reads the experts' row offsets on the
 * device, so nothing waits for the host. Each block owns one 128 x 256 output tile of one
 * expert; forward and dgrad launch the worst-case number of row tiles (N*k/128 + E), and a
 * block finds its expert by a prefix sum of the per-expert tile counts (blocks past the
 * last tile exit). Tiles: cp.async (zero-filling rows outside the expert and columns past
 * the edge) into a 4-stage shared-memory ring. On Hopper the products are wgmma
 * m64n256k16 from 128-byte-swizzled shared memory (two warpgroups, operands stored with M
 * or N contiguous through wgmma's transpose bits); elsewhere ldmatrix + mma.sync m16n8k16
 * (8 warps of 64 x 64). wgrad adds the fp32 tile straight into d_W: one owner per (expert,
 * tile), no atomics, no bf16 rounding of the increment. The wgmma kernel on unswizzled
 * core-matrix tiles is kept for comparison (half the speed: docs/KERNELS.md). A
 * warp-specialised persistent version of the swizzled kernel (moe_ws_kernel: a loading
 * warpgroup, two multiplying ones, an mbarrier ring, one block an SM looping over the
 * tiles) is selectable as GPU_MOE_GEMM_WS, and the same with its loads issued by one thread
 * to the copy engine (TMA; moe_wstma_kernel) as GPU_MOE_GEMM_WS_TMA. What they share with
 * kernels/moe_gemm_fp8 (cp.async, mbarriers, TMA and its tensor maps, row-tile lookup, the
 * persistent kernels' tile schedule, epilogue) is in moe_gemm_common.cuh.
 *
 * The previous path, cuBLAS's grouped batched GEMM with host-side sizes (a synchronising
 * read of the offsets), stays selectable for comparison (gpu_moe_set_gemm) and serves the
 * shapes our kernel does not take (sizes not multiples of 8, bases not 16-byte aligned). */
#include "gpuctx_internal.cuh"
#include "moe.h"
#include "moe_gemm_common.cuh"

#include <stdlib.h>

#define MG_BM 128
#define MG_BN 256
#define MG_BK 64
#define MG_STAGES 4
#define MG_THREADS 256
#define MG_SMEM (MG_STAGES * (MG_BM + MG_BN) * MG_BK * 2 + 1024)

enum { FORM_FWD = 0, FORM_DGRAD = 1, FORM_WGRAD = 2 };

/* C = A . B per expert, row-major in the GEMM's own terms:
 *  fwd   : A = in [rows, K] (K contiguous), B(k, n) = W_e[n*K + k], C bf16 [rows, N]
 *  dgrad : A = d_out [rows, K],             B(k, n) = W_e[k*N + n], C bf16 [rows, N]
 *  wgrad : A(m, k) = d_out[k*M + m], B(k, n) = in[k*N + n] (k over the expert's rows),
 *          C fp32 d_W[e][M, N] += */
struct mg_args {
    const bf16 *A, *B;
    void *C;
    const int *off; /* [E+1] device */
    int E, M, N, K;
    int red; /* wgrad (wgmma kernel): add into d_W by fire-and-forget reductions */
    int vec; /* TMA kernel: 16-byte epilogue stores (mg_store_frag_v; its promises hold) */
};

__device__ __forceinline__ void cp_async16(uint32_t saddr, const void *g, bool pred)
{
    mg_cp16(saddr, g, pred);
}
__device__ __forceinline__ void cp_async_commit()
{
    mg_commit();
}
template <int N> __device__ __forceinline__ void cp_async_wait()
{
    mg_wait<N>();
}
__device__ __forceinline__ void ldsm_x4(uint32_t *r, uint32_t addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t *r, uint32_t addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void mma16816(float *d, const uint32_t *a, const uint32_t *b)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

/* Byte offsets inside one stage's tile. K-major tile: R rows of 64 k (128 bytes, 8 chunks),
 * chunk c of row r at c ^ (r & 7). MN-major tile: 64 k-rows of R values (R/8 chunks), chunk
 * c of k-row k at c ^ (k & 7). Either way the 8 rows one ldmatrix reads fall in 8 banks
 * groups, and a warp's cp.async writes are contiguous. */
__device__ __forceinline__ uint32_t km_off(int r, int c)
{
    return (uint32_t)(r * 128 + ((c ^ (r & 7)) << 4));
}
template <int R> __device__ __forceinline__ uint32_t mn_off(int k, int c)
{
    return (uint32_t)(k * (R * 2) + ((c ^ (k & 7)) << 4));
}

/* Loads one operand tile. KMAJ: R rows (row0 + r, valid below rend) of the k-slice
 * [k0, k0+64) (valid below kend), row stride ld. Otherwise: k-rows k0 + k (valid below kend)
 * of the columns x0 .. x0+R (valid below xend), row stride ld. */
template <int R, bool KMAJ>
__device__ __forceinline__ void load_tile(uint32_t sbase, const bf16 *g, int ld, int row0,
                                          int rend, int k0, int kend, int x0, int xend)
{
    int tid = threadIdx.x;
    if (KMAJ) {
#pragma unroll
        for (int i = 0; i < R * 8 / MG_THREADS; i++) {
            int id = tid + i * MG_THREADS, r = id >> 3, c = id & 7;
            int row = row0 + r, k = k0 + c * 8;
            bool ok = row < rend && k < kend;
            const bf16 *src = ok ? g + (int64_t)row * ld + k : g;
            cp_async16(sbase + km_off(r, c), src, ok);
        }
    } else {
        constexpr int CH = R / 8;
#pragma unroll
        for (int i = 0; i < MG_BK * CH / MG_THREADS; i++) {
            int id = tid + i * MG_THREADS, k = id / CH, c = id % CH;
            int row = k0 + k, x = x0 + c * 8;
            bool ok = row < kend && x < xend;
            const bf16 *src = ok ? g + (int64_t)row * ld + x : g;
            cp_async16(sbase + mn_off<R>(k, c), src, ok);
        }
    }
}

template <int FORM>
__global__ void __launch_bounds__(MG_THREADS, 1) moe_gemm_kernel(const mg_args p)
{
    constexpr bool A_KMAJ = FORM != FORM_WGRAD, B_KMAJ = FORM == FORM_FWD;
    extern __shared__ __align__(128) unsigned char smem[];
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int e, m0, n0, kbeg, kend, rbeg, rend;
    if (FORM == FORM_WGRAD) {
        int ntn = (p.N + MG_BN - 1) / MG_BN;
        e = blockIdx.y;
        m0 = (blockIdx.x / ntn) * MG_BM;
        n0 = (blockIdx.x % ntn) * MG_BN;
        kbeg = p.off[e];
        kend = p.off[e + 1];
        if (kbeg == kend)
            return; /* no rows: d_W_e is left as it is */
        rbeg = 0, rend = p.M;
    } else {
        /* blockIdx.y counts row tiles over the experts in order: find this one's */
        if (!mg_find_row_tile<MG_BM>(p.off, p.E, blockIdx.y, &e, &rbeg, &rend))
            return;
        m0 = 0;
        n0 = blockIdx.x * MG_BN;
        kbeg = 0, kend = p.K;
    }
    const bf16 *Ag = p.A, *Bg;
    int lda, ldb;
    if (FORM == FORM_FWD) {
        lda = p.K, ldb = p.K;
        Bg = p.B + (int64_t)e * p.N * p.K;
    } else if (FORM == FORM_DGRAD) {
        lda = p.K, ldb = p.N;
        Bg = p.B + (int64_t)e * p.N * p.K;
    } else {
        lda = p.M, ldb = p.N;
        Bg = p.B;
    }
    uint32_t sb = (uint32_t)__cvta_generic_to_shared(smem);
    constexpr uint32_t A_BYTES = MG_BM * MG_BK * 2, STAGE = (MG_BM + MG_BN) * MG_BK * 2;
    int KT = (kend - kbeg + MG_BK - 1) / MG_BK;

    auto load_stage = [&](int s, int kt) {
        uint32_t sa = sb + s * STAGE, sbb = sa + A_BYTES;
        int k0 = kbeg + kt * MG_BK;
        if (A_KMAJ)
            load_tile<MG_BM, true>(sa, Ag, lda, rbeg, rend, k0, kend, 0, 0);
        else
            load_tile<MG_BM, false>(sa, Ag, lda, 0, 0, k0, kend, m0, p.M);
        if (B_KMAJ)
            load_tile<MG_BN, true>(sbb, Bg, ldb, n0, p.N, k0, kend, 0, 0);
        else
            load_tile<MG_BN, false>(sbb, Bg, ldb, 0, 0, k0, kend, n0, p.N);
    };

    float acc[4][8][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int q = 0; q < 4; q++)
                acc[i][j][q] = 0.0f;

#pragma unroll
    for (int s = 0; s < MG_STAGES - 1; s++) {
        if (s < KT)
            load_stage(s, s);
        cp_async_commit();
    }
    int wm = (warp >> 2) * 64, wn = (warp & 3) * 64;
    for (int kt = 0; kt < KT; kt++) {
        cp_async_wait<MG_STAGES - 2>();
        __syncthreads();
        int nx = kt + MG_STAGES - 1;
        if (nx < KT)
            load_stage(nx % MG_STAGES, nx);
        cp_async_commit();
        uint32_t sa = sb + (kt % MG_STAGES) * STAGE, sbb = sa + A_BYTES;
#pragma unroll
        for (int kk = 0; kk < MG_BK / 16; kk++) {
            uint32_t af[4][4], bfr[8][2];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                int mb = wm + i * 16;
                if (A_KMAJ) {
                    int r = mb + (lane & 7) + ((lane >> 3) & 1) * 8, c = kk * 2 + (lane >> 4);
                    ldsm_x4(af[i], sa + km_off(r, c));
                } else {
                    int k = kk * 16 + (lane & 7) + (lane >> 4) * 8, c = mb / 8 + ((lane >> 3) & 1);
                    ldsm_x4_t(af[i], sa + mn_off<MG_BM>(k, c));
                }
            }
#pragma unroll
            for (int j = 0; j < 4; j++) {
                int nb = wn + j * 16;
                uint32_t r[4];
                if (B_KMAJ) {
                    int rr = nb + (lane & 7) + (lane >> 4) * 8, c = kk * 2 + ((lane >> 3) & 1);
                    ldsm_x4(r, sbb + km_off(rr, c));
                } else {
                    int k = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, c = nb / 8 + (lane >> 4);
                    ldsm_x4_t(r, sbb + mn_off<MG_BN>(k, c));
                }
                bfr[2 * j][0] = r[0], bfr[2 * j][1] = r[1];
                bfr[2 * j + 1][0] = r[2], bfr[2 * j + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 8; j++)
                    mma16816(acc[i][j], af[i], bfr[j]);
        }
    }
    cp_async_wait<0>();

    int g = lane >> 2;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int r = wm + i * 16 + g;
        float f[32];
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int q = 0; q < 4; q++)
                f[4 * j + q] = acc[i][j][q];
        if (FORM == FORM_WGRAD)
            mg_store_frag<8, MG_OUT_ADD>(f, (float *)p.C + (int64_t)e * p.M * p.N, p.N,
                                         m0 + r, p.M, n0 + wn, p.N);
        else
            mg_store_frag<8, MG_OUT_BF16>(f, p.C, p.N, rbeg + r, rend, n0 + wn, p.N);
    }
}

/* d[128] += A . B (shared-memory descriptors), m64n256k16, fp32 accumulators; TA / TB: the
 * operand is stored MN-major (transposed). sm_90a only (the compute_90 PTX pass traps). */
template <int TA, int TB>
__device__ __forceinline__ void wgmma_256(float *d, uint64_t da, uint64_t db)
{
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("{\n"
                 ".reg .pred p;\n"
                 "setp.ne.b32 p, %130, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
                 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}, %128, %129, p, 1, 1, %131, %132;\n"
                 "}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
                 : "l"(da), "l"(db), "r"(1), "n"(TA), "n"(TB));
#else
    (void)d, (void)da, (void)db;
    __trap();
#endif
}

/* The wgmma kernel's tiles, in the canonical no-swizzle layouts wgmma reads: 8 x 16-byte
 * "core matrices" of 128 contiguous bytes. K-major (R rows x 64 k): core (r/8, k/8) at
 * (r/8)*1024 + (k/8)*128. MN-major (64 k-rows x R values): core (x/8, k/8) at
 * (k/8)*(R*16) + (x/8)*128. In both, 8 consecutive threads fill one core matrix. */
template <int R>
__device__ __forceinline__ void wg_load_km(uint32_t sbase, const bf16 *g, int ld, int row0,
                                           int rend, int k0, int kend)
{
#pragma unroll
    for (int i = 0; i < R * 8 / MG_THREADS; i++) {
        int id = threadIdx.x + i * MG_THREADS;
        int r = (id >> 6) * 8 + (id & 7), c = (id >> 3) & 7;
        int row = row0 + r, k = k0 + c * 8;
        bool ok = row < rend && k < kend;
        const bf16 *src = ok ? g + (int64_t)row * ld + k : g;
        cp_async16(sbase + (uint32_t)((r >> 3) * 1024 + c * 128 + (r & 7) * 16), src, ok);
    }
}

template <int R>
__device__ __forceinline__ void wg_load_mn(uint32_t sbase, const bf16 *g, int ld, int k0,
                                           int kend, int x0, int xend)
{
    constexpr int CH = R / 8;
#pragma unroll
    for (int i = 0; i < MG_BK * CH / MG_THREADS; i++) {
        int id = threadIdx.x + i * MG_THREADS;
        int c = (id >> 3) % CH, k = ((id >> 3) / CH) * 8 + (id & 7);
        int row = k0 + k, x = x0 + c * 8;
        bool ok = row < kend && x < xend;
        const bf16 *src = ok ? g + (int64_t)row * ld + x : g;
        cp_async16(sbase + (uint32_t)((k >> 3) * (R * 16) + c * 128 + (k & 7) * 16), src, ok);
    }
}

/* 128-byte swizzled MN-major tile (64 k-rows x R values): atoms of 8 k-rows x 64 values
 * (1 KB), 16-byte chunk c of a 128-byte atom row k at c ^ (k & 7); atoms along MN 1 KB
 * apart, groups of 8 k-rows R*16 bytes apart. (The K-major swizzled tile is km_off's.) */
template <int R>
__device__ __forceinline__ void sw_load_mn(uint32_t sbase, const bf16 *g, int ld, int k0,
                                           int kend, int x0, int xend)
{
    constexpr int CH = R / 8;
#pragma unroll
    for (int i = 0; i < MG_BK * CH / MG_THREADS; i++) {
        int id = threadIdx.x + i * MG_THREADS, k = id / CH, c = id % CH;
        int row = k0 + k, x = x0 + c * 8;
        bool ok = row < kend && x < xend;
        const bf16 *src = ok ? g + (int64_t)row * ld + x : g;
        cp_async16(sbase + (uint32_t)((k >> 3) * (R * 16) + (c >> 3) * 1024 + (k & 7) * 128 +
                                      (((c & 7) ^ (k & 7)) << 4)),
                   src, ok);
    }
}

/* Shared-memory matrix descriptor: start, leading and stride byte offsets, layout (0: no
 * swizzle, 1: 128-byte swizzle). No swizzle: LBO between core matrices along K, SBO along
 * M/N. 128-byte swizzle: K-major SBO between 8-row groups (LBO unused); MN-major LBO
 * between 64-value atoms along M/N, SBO between 8-row groups along K. */
__device__ __forceinline__ uint64_t wg_desc(uint32_t addr, uint32_t lbo, uint32_t sbo,
                                            int sw = 0)
{
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) |
           ((uint64_t)(sbo >> 4) << 32) | ((uint64_t)sw << 62);
}

/* The Hopper kernel: the same tiles and epilogue as moe_gemm_kernel, the products by
 * wgmma (two warpgroups of 64 rows x 256 columns, four k16 steps a stage). PIPE 0: loads
 * 3 stages ahead and every stage's wgmma finished before the next barrier; PIPE 1: loads 2
 * stages ahead and one stage's wgmma left in flight across the barrier. */
template <int FORM, int PIPE, int SW>
__global__ void __launch_bounds__(MG_THREADS, 1) moe_wgmma_kernel(const mg_args p)
{
    constexpr bool A_KMAJ = FORM != FORM_WGRAD, B_KMAJ = FORM == FORM_FWD;
    extern __shared__ __align__(128) unsigned char smem[];
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;
    int e, m0, n0, kbeg, kend, rbeg, rend;
    if (FORM == FORM_WGRAD) {
        int ntn = (p.N + MG_BN - 1) / MG_BN;
        e = blockIdx.y;
        m0 = (blockIdx.x / ntn) * MG_BM;
        n0 = (blockIdx.x % ntn) * MG_BN;
        kbeg = p.off[e];
        kend = p.off[e + 1];
        if (kbeg == kend)
            return;
        rbeg = 0, rend = p.M;
    } else {
        if (!mg_find_row_tile<MG_BM>(p.off, p.E, blockIdx.y, &e, &rbeg, &rend))
            return;
        m0 = 0;
        n0 = blockIdx.x * MG_BN;
        kbeg = 0, kend = p.K;
    }
    const bf16 *Ag = p.A, *Bg;
    int lda, ldb;
    if (FORM == FORM_FWD) {
        lda = p.K, ldb = p.K;
        Bg = p.B + (int64_t)e * p.N * p.K;
    } else if (FORM == FORM_DGRAD) {
        lda = p.K, ldb = p.N;
        Bg = p.B + (int64_t)e * p.N * p.K;
    } else {
        lda = p.M, ldb = p.N;
        Bg = p.B;
    }
    /* the swizzle repeats every 1 KB: stage bases 1 KB-aligned (MG_SMEM has 1 KB spare) */
    uint32_t sb = ((uint32_t)__cvta_generic_to_shared(smem) + 1023) & ~1023u;
    constexpr uint32_t A_BYTES = MG_BM * MG_BK * 2, STAGE = (MG_BM + MG_BN) * MG_BK * 2;
    int KT = (kend - kbeg + MG_BK - 1) / MG_BK;
    auto load_stage = [&](int s, int kt) {
        uint32_t sa = sb + s * STAGE, sbb = sa + A_BYTES;
        int k0 = kbeg + kt * MG_BK;
        if (SW) {
            if (A_KMAJ)
                load_tile<MG_BM, true>(sa, Ag, lda, rbeg, rend, k0, kend, 0, 0);
            else
                sw_load_mn<MG_BM>(sa, Ag, lda, k0, kend, m0, p.M);
            if (B_KMAJ)
                load_tile<MG_BN, true>(sbb, Bg, ldb, n0, p.N, k0, kend, 0, 0);
            else
                sw_load_mn<MG_BN>(sbb, Bg, ldb, k0, kend, n0, p.N);
            return;
        }
        if (A_KMAJ)
            wg_load_km<MG_BM>(sa, Ag, lda, rbeg, rend, k0, kend);
        else
            wg_load_mn<MG_BM>(sa, Ag, lda, k0, kend, m0, p.M);
        if (B_KMAJ)
            wg_load_km<MG_BN>(sbb, Bg, ldb, n0, p.N, k0, kend);
        else
            wg_load_mn<MG_BN>(sbb, Bg, ldb, k0, kend, n0, p.N);
    };
    /* core-matrix offsets (K direction, M/N direction) and the step of one k16 */
    constexpr uint32_t A_LBO = SW ? (A_KMAJ ? 16 : 1024) : (A_KMAJ ? 128 : MG_BM * 16);
    constexpr uint32_t A_SBO = SW ? (A_KMAJ ? 1024 : MG_BM * 16) : (A_KMAJ ? 1024 : 128);
    constexpr uint32_t A_WG = SW ? (A_KMAJ ? 8 * 1024 : 1024) : (A_KMAJ ? 8 * 1024 : 8 * 128);
    constexpr uint32_t A_K16 = SW ? (A_KMAJ ? 32 : 2 * MG_BM * 16)
                                  : (A_KMAJ ? 256 : 2 * MG_BM * 16);
    constexpr uint32_t B_LBO = SW ? (B_KMAJ ? 16 : 1024) : (B_KMAJ ? 128 : MG_BN * 16);
    constexpr uint32_t B_SBO = SW ? (B_KMAJ ? 1024 : MG_BN * 16) : (B_KMAJ ? 1024 : 128);
    constexpr uint32_t B_K16 = SW ? (B_KMAJ ? 32 : 2 * MG_BN * 16)
                                  : (B_KMAJ ? 256 : 2 * MG_BN * 16);

    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; i++)
        acc[i] = 0.0f;
    constexpr int AHEAD = PIPE ? MG_STAGES - 2 : MG_STAGES - 1;
#pragma unroll
    for (int s = 0; s < AHEAD; s++) {
        if (s < KT)
            load_stage(s, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < KT; kt++) {
        cp_async_wait<AHEAD - 1>();
        /* cp.async wrote through the generic proxy; wgmma reads through the async one */
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads(); /* PIPE: also every warpgroup's wgmma of stage kt-2 is done */
        int nx = kt + AHEAD;
        if (nx < KT)
            load_stage(nx % MG_STAGES, nx);
        cp_async_commit();
        uint32_t sa = sb + (kt % MG_STAGES) * STAGE, sbb = sa + A_BYTES;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
#pragma unroll
        for (int kk = 0; kk < MG_BK / 16; kk++)
            wgmma_256<A_KMAJ ? 0 : 1, B_KMAJ ? 0 : 1>(
                acc, wg_desc(sa + wg * A_WG + kk * A_K16, A_LBO, A_SBO, SW),
                wg_desc(sbb + kk * B_K16, B_LBO, B_SBO, SW));
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        if (PIPE)
            asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
        else
            asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
    }
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
    cp_async_wait<0>();

    int r = wg * 64 + (warp & 3) * 16 + (lane >> 2);
    if (FORM == FORM_WGRAD) {
        float *dw = (float *)p.C + (int64_t)e * p.M * p.N;
        /* red: the adds go to L2 without a round trip, so the block can leave while they
         * land (the read-modify-write held every SM's tensor cores idle for its length);
         * each element gets one add per call, so the result is the same either way */
        if (p.red)
            mg_store_frag<32, MG_OUT_RED>(acc, dw, p.N, m0 + r, p.M, n0, p.N);
        else
            mg_store_frag<32, MG_OUT_ADD>(acc, dw, p.N, m0 + r, p.M, n0, p.N);
    } else {
        mg_store_frag<32, MG_OUT_BF16>(acc, p.C, p.N, rbeg + r, rend, n0, p.N);
    }
}

/* ---- the warp-specialised persistent kernel (GPU_MOE_GEMM_WS; not yet the default: not
 * yet run on a GPU, see docs/PERF.md "Warp-specialised grouped expert GEMM") ----
 *
 * The same 128 x 256 tiles, swizzled layouts and wgmma products as moe_wgmma_kernel<.., 1,
 * 1>, with the roles split: warpgroup 0 only loads (cp.async into a 4-stage ring, each
 * thread's copies of a stage signalled on the stage's "full" mbarrier as they land), and
 * warpgroups 1 and 2 only multiply (64 rows each) and write. Consumers release a stage on
 * its "empty" mbarrier once their wgmma on it is complete, so no block-wide barrier stands
 * between the loads and the products. One block an SM loops over the tiles (tile t, then
 * t + grid): the loads of a block's next tile run while its consumers write the last one,
 * and nobody pays a block's start (offsets scan, first loads) per tile. Forward/dgrad
 * tiles are numbered by row tile, then column tile (neighbouring blocks share A rows and
 * the expert's weights); wgrad tiles by expert, then tile of d_W_e. */
#define WS_STAGES 4
#define WS_THREADS 384
#define WS_STAGE_BYTES ((MG_BM + MG_BN) * MG_BK * 2)

static size_t ws_smem(int E)
{
    return 1024 + (size_t)WS_STAGES * WS_STAGE_BYTES + 2 * ((size_t)E + 1) * sizeof(int);
}

/* K-major swizzled tile of R rows x 64 k (layout of km_off), NT threads, thread tid */
template <int R, int NT>
__device__ __forceinline__ void ws_load_km(uint32_t sbase, const bf16 *g, int ld, int row0,
                                           int rend, int k0, int kend, int tid)
{
    /* opaque per call: keeps ptxas from hoisting every chunk's address out of the k loop
     * into registers the producer does not have (it spilled them) */
    asm volatile("" : "+l"(g), "+r"(k0), "+r"(tid));
#pragma unroll
    for (int i = 0; i < R * 8 / NT; i++) {
        int id = tid + i * NT, r = id >> 3, c = id & 7;
        int row = row0 + r, k = k0 + c * 8;
        bool ok = row < rend && k < kend;
        const bf16 *src = ok ? g + (int64_t)row * ld + k : g;
        mg_cp16(sbase + km_off(r, c), src, ok);
    }
}

/* MN-major swizzled tile of 64 k-rows x R values (layout of sw_load_mn) */
template <int R, int NT>
__device__ __forceinline__ void ws_load_mn(uint32_t sbase, const bf16 *g, int ld, int k0,
                                           int kend, int x0, int xend, int tid)
{
    asm volatile("" : "+l"(g), "+r"(k0), "+r"(tid));
    constexpr int CH = R / 8;
#pragma unroll
    for (int i = 0; i < MG_BK * CH / NT; i++) {
        int id = tid + i * NT, k = id / CH, c = id % CH;
        int row = k0 + k, x = x0 + c * 8;
        bool ok = row < kend && x < xend;
        const bf16 *src = ok ? g + (int64_t)row * ld + x : g;
        mg_cp16(sbase + (uint32_t)((k >> 3) * (R * 16) + (c >> 3) * 1024 + (k & 7) * 128 +
                                   (((c & 7) ^ (k & 7)) << 4)),
                src, ok);
    }
}

/* Tile t of the persistent kernels (mg_sched_tile): expert e, its rows [rbeg, rend) from
 * rbeg on (fwd/dgrad; wgrad: 0, M), output corner (m0, n0), reduction range [kbeg, kend)
 * (wgrad: the expert's rows). */
template <int FORM>
__device__ __forceinline__ void ws_tile(const mg_args &p, const int *s_off, const int *s_ts,
                                        int ntm, int ntn, int t, int &e, int &rbeg, int &rend,
                                        int &m0, int &n0, int &kbeg, int &kend)
{
    mg_tile x =
        mg_sched_tile<MG_BM, MG_BN, FORM == FORM_WGRAD>(s_off, s_ts, p.E, ntm, ntn, t);
    e = x.e, m0 = x.m0, n0 = x.n0;
    rbeg = FORM == FORM_WGRAD ? 0 : x.r0, rend = FORM == FORM_WGRAD ? p.M : x.r1;
    kbeg = FORM == FORM_WGRAD ? x.r0 : 0, kend = FORM == FORM_WGRAD ? x.r1 : p.K;
}

#define WT_BOX (64 * 64 * 2) /* bytes of one 64 x 64 box */

/* wgrad's last k-tile of an expert holds only kv of its 64 k-rows: the 256 consumer threads
 * (ct) zero k-rows kv..63 of the stage's six MN-major boxes (A's 2, then B's 4), make the
 * stores visible to wgmma (async proxy) and wait for each other (named barrier 1). */
__device__ __forceinline__ void wt_zero_tail(uint32_t sa, int kv, int ct)
{
    int n = (MG_BK - kv) * 8; /* 16-byte pieces a box */
    for (int i = ct; i < (MG_BM + MG_BN) / 64 * n; i += 256) {
        int j = i / n, q = i - j * n;
        asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(
                         sa + (uint32_t)(j * WT_BOX + kv * 128 + q * 16)),
                     "r"(0)
                     : "memory");
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    asm volatile("bar.sync 1, 256;\n" ::: "memory");
}

/* Both persistent kernels in one (TMA: moe_wstma_kernel, maps ta and tb; else
 * moe_ws_kernel): the ring and schedule, warpgroup 0 loading, the other two multiplying.
 * The consumers differ only in where the loads put the MN-major operands (TMA: 64 x 64
 * boxes, WT_BOX apart), what a full stage still needs (cp.async: a proxy fence; TMA's wgrad:
 * the tail zeroed) and the TMA kernel's 16-byte epilogue stores (p.vec). One body rather
 * than a shared consumer function: inlined that way, the kernels compile to the PTX they had
 * as two bodies. */
template <int FORM, bool TMA>
__device__ __forceinline__ void ws_body(const mg_args p, const CUtensorMap *ta,
                                        const CUtensorMap *tb, uint64_t *bars)
{
    constexpr bool A_KMAJ = FORM != FORM_WGRAD, B_KMAJ = FORM == FORM_FWD;
    constexpr uint32_t A_BYTES = MG_BM * MG_BK * 2, STAGE = WS_STAGE_BYTES;
    extern __shared__ __align__(128) unsigned char smem[];
    int tid = threadIdx.x, lane = tid & 31, wg = tid >> 7;
    /* full: each producer thread's copies (TMA: the issuing thread's arrive + the bytes) */
    mg_ring rg = mg_ring_init<WS_STAGES, MG_BM>(smem, bars, STAGE, TMA ? 1 : 128, p.off, p.E);
    uint32_t sb = rg.base, full0 = rg.full0, empty0 = rg.empty0;
    const int *s_off = rg.s_off, *s_ts = rg.s_ts;
    int ntn = (p.N + MG_BN - 1) / MG_BN, ntm = (p.M + MG_BM - 1) / MG_BM;
    int T = mg_sched_count<FORM == FORM_WGRAD>(s_ts, p.E, ntm, ntn);
    if (wg == 0 && TMA) { /* producer: one thread */
        if (!mg_tma_producer(ta, tb))
            return;
        uint32_t it = 0;
        for (int t = blockIdx.x; t < T; t += gridDim.x) {
            int e, rbeg, rend, m0, n0, kbeg, kend;
            ws_tile<FORM>(p, s_off, s_ts, ntm, ntn, t, e, rbeg, rend, m0, n0, kbeg, kend);
            int KT = (kend - kbeg + MG_BK - 1) / MG_BK;
            for (int kt = 0; kt < KT; kt++, it++) {
                int s = it % WS_STAGES;
                uint32_t full = full0 + 8 * s;
                mbar_wait(empty0 + 8 * s, ((it / WS_STAGES) & 1) ^ 1);
                mbar_arrive_tx(full, STAGE);
                uint32_t sa = sb + s * STAGE, sbb = sa + A_BYTES;
                int k0 = kbeg + kt * MG_BK;
                if (FORM == FORM_FWD) { /* A in[nk, K]; B W[E][N, K] */
                    tma_load_2d(sa, ta, full, k0, rbeg);
                    tma_load_3d(sbb, tb, full, k0, n0, e);
                } else if (FORM == FORM_DGRAD) { /* A d_out[nk, K]; B W[E][K, N] */
                    tma_load_2d(sa, ta, full, k0, rbeg);
#pragma unroll
                    for (int j = 0; j < MG_BN / 64; j++)
                        tma_load_3d(sbb + j * WT_BOX, tb, full, n0 + 64 * j, k0, e);
                } else { /* A d_out[nk, M]; B in[nk, N]; k over the expert's rows */
#pragma unroll
                    for (int j = 0; j < MG_BM / 64; j++)
                        tma_load_2d(sa + j * WT_BOX, ta, full, m0 + 64 * j, k0);
#pragma unroll
                    for (int j = 0; j < MG_BN / 64; j++)
                        tma_load_2d(sbb + j * WT_BOX, tb, full, n0 + 64 * j, k0);
                }
            }
        }
    } else if (wg == 0) { /* producer: cp.async (registers: mg_regs_producer) */
        mg_regs_producer();
        uint32_t it = 0;
        for (int t = blockIdx.x; t < T; t += gridDim.x) {
            int e, rbeg, rend, m0, n0, kbeg, kend;
            ws_tile<FORM>(p, s_off, s_ts, ntm, ntn, t, e, rbeg, rend, m0, n0, kbeg, kend);
            const bf16 *Bg = FORM == FORM_WGRAD ? p.B : p.B + (int64_t)e * p.N * p.K;
            int lda = FORM == FORM_WGRAD ? p.M : p.K, ldb = FORM == FORM_FWD ? p.K : p.N;
            int KT = (kend - kbeg + MG_BK - 1) / MG_BK;
            for (int kt = 0; kt < KT; kt++, it++) {
                int s = it % WS_STAGES;
                mbar_wait(empty0 + 8 * s, ((it / WS_STAGES) & 1) ^ 1);
                uint32_t sa = sb + s * STAGE, sbb = sa + A_BYTES;
                int k0 = kbeg + kt * MG_BK;
                if (A_KMAJ)
                    ws_load_km<MG_BM, 128>(sa, p.A, lda, rbeg, rend, k0, kend, tid);
                else
                    ws_load_mn<MG_BM, 128>(sa, p.A, lda, k0, kend, m0, p.M, tid);
                if (B_KMAJ)
                    ws_load_km<MG_BN, 128>(sbb, Bg, ldb, n0, p.N, k0, kend, tid);
                else
                    ws_load_mn<MG_BN, 128>(sbb, Bg, ldb, k0, kend, n0, p.N, tid);
                mbar_cp_async_arrive(full0 + 8 * s);
            }
        }
        asm volatile("cp.async.wait_all;\n" ::: "memory");
    } else { /* consumers: warpgroup cw owns rows 64 cw .. 64 cw + 63 of each tile */
        /* descriptors of the 128-byte swizzled tiles (cp.async: as moe_wgmma_kernel with SW;
         * TMA: see moe_wstma_kernel) */
        constexpr uint32_t A_LBO = A_KMAJ ? 16 : TMA ? WT_BOX : 1024;
        constexpr uint32_t A_SBO = A_KMAJ || TMA ? 1024 : MG_BM * 16;
        constexpr uint32_t A_WG = A_KMAJ ? 8 * 1024 : TMA ? WT_BOX : 1024;
        constexpr uint32_t A_K16 = A_KMAJ ? 32 : TMA ? 2 * 1024 : 2 * MG_BM * 16;
        constexpr uint32_t B_LBO = B_KMAJ ? 16 : TMA ? WT_BOX : 1024;
        constexpr uint32_t B_SBO = B_KMAJ || TMA ? 1024 : MG_BN * 16;
        constexpr uint32_t B_K16 = B_KMAJ ? 32 : TMA ? 2 * 1024 : 2 * MG_BN * 16;
        mg_regs_consumer();
        int cw = wg - 1, warp = tid >> 5;
        uint32_t it = 0;
        float acc[128];
        for (int t = blockIdx.x; t < T; t += gridDim.x) {
            int e, rbeg, rend, m0, n0, kbeg, kend;
            ws_tile<FORM>(p, s_off, s_ts, ntm, ntn, t, e, rbeg, rend, m0, n0, kbeg, kend);
            int KT = (kend - kbeg + MG_BK - 1) / MG_BK;
            if (KT == 0)
                continue; /* wgrad of an expert without rows: d_W_e is left as it is */
#pragma unroll
            for (int i = 0; i < 128; i++)
                acc[i] = 0.0f;
            int prev = 0;
            for (int kt = 0; kt < KT; kt++, it++) {
                int s = it % WS_STAGES;
                mbar_wait(full0 + 8 * s, (it / WS_STAGES) & 1);
                /* cp.async wrote through the generic proxy; wgmma reads through the async one */
                if (!TMA)
                    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
                uint32_t sa = sb + s * STAGE, sbb = sa + A_BYTES;
                if (TMA && FORM == FORM_WGRAD && kend - kbeg - kt * MG_BK < MG_BK)
                    wt_zero_tail(sa, kend - kbeg - kt * MG_BK, tid - 128);
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
                asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
#pragma unroll
                for (int kk = 0; kk < MG_BK / 16; kk++)
                    wgmma_256<A_KMAJ ? 0 : 1, B_KMAJ ? 0 : 1>(
                        acc, wg_desc(sa + cw * A_WG + kk * A_K16, A_LBO, A_SBO, 1),
                        wg_desc(sbb + kk * B_K16, B_LBO, B_SBO, 1));
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
                asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
                /* the previous stage's products are done: its slot may be refilled */
                asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
#endif
                if (kt > 0 && lane == 0)
                    mbar_arrive(empty0 + 8 * prev);
                prev = s;
            }
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
            asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
#pragma unroll
            for (int i = 0; i < 128; i++)
                asm volatile("" : "+f"(acc[i])::"memory");
            if (lane == 0)
                mbar_arrive(empty0 + 8 * prev);
            int r = cw * 64 + (warp & 3) * 16 + (lane >> 2);
            if (FORM == FORM_WGRAD) {
                float *dw = (float *)p.C + (int64_t)e * p.M * p.N;
                if (TMA && p.red && p.vec)
                    mg_store_frag_v<32, MG_OUT_RED>(acc, dw, p.N, m0 + r, p.M, n0, p.N);
                else if (p.red)
                    mg_store_frag<32, MG_OUT_RED>(acc, dw, p.N, m0 + r, p.M, n0, p.N);
                else
                    mg_store_frag<32, MG_OUT_ADD>(acc, dw, p.N, m0 + r, p.M, n0, p.N);
            } else if (TMA && p.vec) {
                mg_store_frag_v<32, MG_OUT_BF16>(acc, p.C, p.N, rbeg + r, rend, n0, p.N);
            } else {
                mg_store_frag<32, MG_OUT_BF16>(acc, p.C, p.N, rbeg + r, rend, n0, p.N);
            }
        }
    }
}

template <int FORM>
__global__ void __launch_bounds__(WS_THREADS, 1) moe_ws_kernel(const mg_args p)
{
    __shared__ __align__(8) uint64_t bars[2 * WS_STAGES]; /* full[s], then empty[s] */
    ws_body<FORM, false>(p, NULL, NULL, bars);
}

/* ---- the warp-specialised kernel with TMA loads (GPU_MOE_GEMM_WS_TMA) ----
 *
 * moe_ws_kernel's tiles, ring, roles and epilogue, with the producer's per-thread cp.async
 * replaced by the copy engine: one thread of the loading warpgroup waits for a free slot,
 * announces the stage's 48 KB on its "full" barrier and issues the bulk tensor copies
 * (tensor maps made on the host, 128-byte swizzle; the other 127 loading threads leave).
 * Layouts: a K-major box (R rows x 64 k, 128 bytes a row) lands exactly as km_off's tile;
 * an MN-major operand comes as boxes of 64 values x 64 k-rows (8 KB each, a k-row 128
 * bytes), so its 64-value atoms are 8 KB apart (descriptor LBO) and its groups of 8
 * k-rows 1 KB apart (SBO): not sw_load_mn's order, the same swizzle.
 * Ragged experts: the A map covers all nk rows; a forward/dgrad row tile that runs past its
 * expert's end reads the next expert's rows (or zeros past nk) and those output rows are
 * not written (rows of C depend only on their own row of A). Tails of K, N and M past the
 * tensor's edge come zero-filled. wgrad reduces over an expert's rows, so there the rows
 * past the expert's end in its last k-tile would add in: the consumers zero those rows of
 * the stage (A and B) before multiplying (one tile an expert; a named barrier among the
 * 256 multiplying threads and a proxy fence). */
template <int FORM>
__global__ void __launch_bounds__(WS_THREADS, 1)
    moe_wstma_kernel(const mg_args p, const __grid_constant__ CUtensorMap ta,
                     const __grid_constant__ CUtensorMap tb)
{
    __shared__ __align__(8) uint64_t bars[2 * WS_STAGES]; /* full[s], then empty[s] */
    ws_body<FORM, true>(p, &ta, &tb, bars);
}

static int aligned16p(const void *p)
{
    return ((uintptr_t)p & 15) == 0;
}

/* The two operands' maps of moe_wstma_kernel<FORM> (nk rows in all; see its comment). */
static int wstma_maps(int form, const mg_args *a, int nk, CUtensorMap *ta, CUtensorMap *tb,
                      dsv3_err *e)
{
    tma_encode_fn enc = NULL;
    if (tma_encoder(&enc, e))
        return -1;
    const CUtensorMapDataType BF = CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    int64_t M = a->M, N = a->N, K = a->K, E = a->E;
    if (form == FORM_FWD) { /* A in[nk, K]; B W[E][N, K] */
        int64_t da[2] = {K, nk}, sa[1] = {K}, db[3] = {K, N, E}, sbb[2] = {K, N * K};
        return tma_map(enc, ta, BF, 2, a->A, 2, da, sa, MG_BK, MG_BM, e) ||
                       tma_map(enc, tb, BF, 2, a->B, 3, db, sbb, MG_BK, MG_BN, e)
                   ? -1
                   : 0;
    }
    if (form == FORM_DGRAD) { /* A d_out[nk, K]; B W[E][K, N] */
        int64_t da[2] = {K, nk}, sa[1] = {K}, db[3] = {N, K, E}, sbb[2] = {N, N * K};
        return tma_map(enc, ta, BF, 2, a->A, 2, da, sa, MG_BK, MG_BM, e) ||
                       tma_map(enc, tb, BF, 2, a->B, 3, db, sbb, 64, MG_BK, e)
                   ? -1
                   : 0;
    }
    int64_t da[2] = {M, nk}, sa[1] = {M}, db[2] = {N, nk}, sbb[1] = {N}; /* wgrad */
    return tma_map(enc, ta, BF, 2, a->A, 2, da, sa, 64, MG_BK, e) ||
                   tma_map(enc, tb, BF, 2, a->B, 2, db, sbb, 64, MG_BK, e)
               ? -1
               : 0;
}

/* fwd/dgrad: C[rows, N] per expert; wgrad: d_W[E, M, N] +=. */
template <int FORM>
static int moe_gemm_run(gpu_ctx *c, const gpu_moe_plan *pl, const bf16 *A, const bf16 *B,
                        void *C, int M, int N, int K, dsv3_err *e)
{
    int nk = pl->N * pl->k, E = pl->E;
    if (nk == 0 || N <= 0 || (FORM == FORM_WGRAD ? M <= 0 : K <= 0))
        return 0;
    int major = 0;
    CUDA_TRY(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, c->dev), e);
    /* wgmma needs the sm_90a machine code: Hopper itself, not a later GPU running PTX */
    int v = c->moe_gemm == GPU_MOE_GEMM_DEFAULT ? (major == 9 ? GPU_MOE_GEMM_WS_TMA
                                                              : GPU_MOE_GEMM_MMA)
                                                : c->moe_gemm;
    const char *red = getenv("DSV3_MOE_WGRAD_RED"); /* 0: read-modify-write, for timings */
    mg_args a = {A, B, C, pl->offsets, E, M, N, K, !(red && *red == '0'), 0};
    /* DSV3_MOE_EPI_VEC=0: the TMA kernel's epilogue with 4- and 8-byte stores (for timings) */
    const char *ev = getenv("DSV3_MOE_EPI_VEC");
    a.vec = !(ev && *ev == '0') && ((uintptr_t)C & 15) == 0 &&
            (FORM == FORM_WGRAD ? N % 4 == 0 : N % 8 == 0);
    if (v == GPU_MOE_GEMM_WS || v == GPU_MOE_GEMM_WS_TMA) {
        size_t smem = ws_smem(E);
        CUtensorMap ta, tb;
        if (v == GPU_MOE_GEMM_WS_TMA && wstma_maps(FORM, &a, nk, &ta, &tb, e))
            return -1;
        CUDA_TRY(cudaFuncSetAttribute(v == GPU_MOE_GEMM_WS ? (const void *)moe_ws_kernel<FORM>
                                                           : (const void *)moe_wstma_kernel<FORM>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                 e);
        int64_t ntn = (N + MG_BN - 1) / MG_BN, tiles;
        if (FORM == FORM_WGRAD)
            tiles = (int64_t)E * ((M + MG_BM - 1) / MG_BM) * ntn;
        else
            tiles = ((int64_t)(nk + MG_BM - 1) / MG_BM + E) * ntn; /* at most */
        int grid = c->sm_count > 0 && tiles > c->sm_count ? c->sm_count : (int)tiles;
        /* DSV3_MOE_WS_GRID=n: at most n blocks (tests: many tiles a block on small shapes) */
        const char *cap = getenv("DSV3_MOE_WS_GRID");
        if (cap && atoi(cap) > 0 && atoi(cap) < grid)
            grid = atoi(cap);
        if (v == GPU_MOE_GEMM_WS)
            moe_ws_kernel<FORM><<<grid, WS_THREADS, smem, c->stream>>>(a);
        else
            moe_wstma_kernel<FORM><<<grid, WS_THREADS, smem, c->stream>>>(a, ta, tb);
        LAUNCH_CHECK("moe_gemm", e);
        return 0;
    }
    void (*kern)(const mg_args) = v == GPU_MOE_GEMM_WGMMA        ? moe_wgmma_kernel<FORM, 0, 0>
                                  : v == GPU_MOE_GEMM_WGMMA_PIPE ? moe_wgmma_kernel<FORM, 1, 0>
                                  : v == GPU_MOE_GEMM_WGMMA_SW   ? moe_wgmma_kernel<FORM, 1, 1>
                                                                 : moe_gemm_kernel<FORM>;
    CUDA_TRY(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, MG_SMEM),
             e);
    dim3 grid;
    if (FORM == FORM_WGRAD)
        grid = dim3(((M + MG_BM - 1) / MG_BM) * ((N + MG_BN - 1) / MG_BN), E);
    else
        grid = dim3((N + MG_BN - 1) / MG_BN, (nk + MG_BM - 1) / MG_BM + E);
    kern<<<grid, MG_THREADS, MG_SMEM, c->stream>>>(a);
    LAUNCH_CHECK("moe_gemm", e);
    return 0;
}

/* Our kernel moves 16-byte pieces: sizes multiples of 8, bases 16-byte aligned. */
static int kernel_fits(int M, int N, int K, const void *A, const void *B, const void *C)
{
    return M % 8 == 0 && N % 8 == 0 && K % 8 == 0 && aligned16p(A) && aligned16p(B) &&
           aligned16p(C);
}

/* ---- the cuBLAS grouped GEMM path (host-side sizes) ---- */

/* Row-major C_g[M_g, Nn_g] = op(A_g) op(B_g) (+ beta C_g) for the non-empty experts, in one
 * cuBLAS call; `rows_dim` says which of M (0), N (1) or K (2) is the expert's row count.
 * Each expert's matrices: A at a_base + a_row_stride * r0 + a_exp_stride * g, likewise B, C. */
struct grouped_args {
    int ta, tb, M, N, K, rows_dim, lda, ldb, ldc, c_f32;
    float beta;
    const bf16 *A, *B;
    void *C;
    int64_t a_row, a_exp, b_row, b_exp, c_row, c_exp; /* element strides */
};

static int grouped_gemm(gpu_ctx *c, const gpu_moe_plan *p, const int *offs,
                        const grouped_args *g, dsv3_err *e)
{
    int E = p->E, ng = 0;
    size_t bytes = (size_t)E * (3 * sizeof(void *) + 9 * sizeof(int) + 2 * sizeof(float));
    char *host = (char *)malloc(bytes);
    if (!host)
        return err_set(e, "moe: out of host memory");
    const void **pa = (const void **)host, **pb = pa + E;
    void **pc = (void **)(pb + E);
    cublasOperation_t *tra = (cublasOperation_t *)(pc + E), *trb = tra + E;
    int *m = (int *)(trb + E), *n = m + E, *k = n + E, *lda = k + E, *ldb = lda + E,
        *ldc = ldb + E, *gsize = ldc + E;
    float *alpha = (float *)(gsize + E), *beta = alpha + E;
    size_t esz = g->c_f32 ? 4 : 2;
    for (int x = 0; x < E; x++) {
        int r0 = offs[x], rows = offs[x + 1] - r0;
        if (rows == 0)
            continue;
        int M = g->rows_dim == 0 ? rows : g->M, N = g->rows_dim == 1 ? rows : g->N,
            K = g->rows_dim == 2 ? rows : g->K;
        /* column-major: C^T = op(B)^T op(A)^T, first operand B */
        pa[ng] = g->B + g->b_row * r0 + g->b_exp * x;
        pb[ng] = g->A + g->a_row * r0 + g->a_exp * x;
        pc[ng] = (char *)g->C + (g->c_row * r0 + g->c_exp * x) * esz;
        tra[ng] = g->tb ? CUBLAS_OP_T : CUBLAS_OP_N;
        trb[ng] = g->ta ? CUBLAS_OP_T : CUBLAS_OP_N;
        m[ng] = N;
        n[ng] = M;
        k[ng] = K;
        lda[ng] = g->ldb;
        ldb[ng] = g->lda;
        ldc[ng] = g->ldc;
        gsize[ng] = 1;
        alpha[ng] = 1.0f;
        beta[ng] = g->beta;
        ng++;
    }
    int rc = 0;
    if (ng > 0) {
        size_t mark = gpu_arena_mark(c);
        void **dptr = (void **)gpu_arena_alloc(c, 3 * (size_t)E * sizeof(void *), e);
        if (!dptr) {
            free(host);
            return -1;
        }
        /* A pageable source is staged before cudaMemcpyAsync returns: host may be freed. */
        cudaError_t st = cudaMemcpyAsync(dptr, host, 3 * (size_t)E * sizeof(void *),
                                         cudaMemcpyHostToDevice, c->stream);
        if (st != cudaSuccess)
            rc = err_set(e, "moe: pointer upload failed: %s", cudaGetErrorString(st));
        if (rc == 0) {
            cublasStatus_t bs = cublasGemmGroupedBatchedEx(
                c->blas, tra, trb, m, n, k, alpha, (const void *const *)dptr, CUDA_R_16BF, lda,
                (const void *const *)(dptr + E), CUDA_R_16BF, ldb, beta, dptr + 2 * E,
                g->c_f32 ? CUDA_R_32F : CUDA_R_16BF, ldc, ng, gsize, CUBLAS_COMPUTE_32F);
            if (bs != CUBLAS_STATUS_SUCCESS)
                rc = err_set(e, "moe: cublasGemmGroupedBatchedEx failed: status %d", (int)bs);
        }
        if (rc == 0 && cudaGetLastError() != cudaSuccess)
            rc = err_set(e, "moe: grouped GEMM launch failed");
        gpu_arena_reset(c, mark);
    }
    free(host);
    return rc;
}

/* The cuBLAS path reads the offsets on the host: one synchronising copy per call. */
static int host_offsets(gpu_ctx *c, const gpu_moe_plan *p, int **out, dsv3_err *e)
{
    *out = (int *)malloc(((size_t)p->E + 1) * sizeof(int));
    if (!*out)
        return err_set(e, "moe: out of host memory");
    if (gpu_moe_plan_offsets(c, p, *out, e)) {
        free(*out);
        return -1;
    }
    return 0;
}

static int cublas_path(gpu_ctx *c, const gpu_moe_plan *p, const grouped_args *g, dsv3_err *e)
{
    int *offs;
    if (p->N * p->k == 0)
        return 0;
    if (p->offsets_host) /* read when the plan was made */
        return grouped_gemm(c, p, p->offsets_host, g, e);
    if (host_offsets(c, p, &offs, e))
        return -1;
    int rc = grouped_gemm(c, p, offs, g, e);
    free(offs);
    return rc;
}

/* Expert weights at an 8-byte boundary (a model whose flat layout puts a router bias of,
 * say, 20 floats before them: configs/small) would send the call to cuBLAS's grouped GEMM,
 * whose align8 kernels then fault on them (compute-sanitizer, H100): they are copied to an
 * aligned arena buffer instead (E*O*I bf16, a few MB, microseconds at copy bandwidth; the
 * arena keeps room for it, gmodel's scratch_bytes), freed by the caller at *mark. */
static const bf16 *aligned_weights(gpu_ctx *c, const gpu_moe_plan *p, const gpu_bf16 *W,
                                   int I, int O, size_t *mark, dsv3_err *e)
{
    *mark = gpu_arena_mark(c);
    if (aligned16p(W))
        return (const bf16 *)W;
    size_t bytes = (size_t)p->E * (size_t)O * (size_t)I * 2;
    bf16 *w = (bf16 *)gpu_arena_alloc(c, bytes, e);
    if (w && cudaMemcpyAsync(w, W, bytes, cudaMemcpyDeviceToDevice, c->stream) != cudaSuccess) {
        err_set(e, "moe: copying misaligned expert weights: %s",
                cudaGetErrorString(cudaGetLastError()));
        return NULL;
    }
    return w;
}

extern "C" int gpu_moe_linear_fwd(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *out,
                                  const gpu_bf16 *in, const gpu_bf16 *W, int I, int O,
                                  dsv3_err *e)
{
    if (c->moe_gemm == GPU_MOE_GEMM_CUBLAS || !kernel_fits(0, O, I, in, in, out)) {
        grouped_args g = {0, 1, 0, O, I, 0, I, I, O, 0, 0.0f, (const bf16 *)in,
                          (const bf16 *)W, out, I, 0, 0, (int64_t)O * I, O, 0};
        return cublas_path(c, p, &g, e);
    }
    size_t mark;
    const bf16 *w = aligned_weights(c, p, W, I, O, &mark, e);
    int rc = !w || moe_gemm_run<FORM_FWD>(c, p, (const bf16 *)in, w, out, 0, O, I, e) ? -1 : 0;
    gpu_arena_reset(c, mark);
    return rc;
}

extern "C" int gpu_moe_linear_dgrad(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *d_in,
                                    const gpu_bf16 *d_out, const gpu_bf16 *W, int I, int O,
                                    dsv3_err *e)
{
    if (c->moe_gemm == GPU_MOE_GEMM_CUBLAS || !kernel_fits(0, I, O, d_out, d_out, d_in)) {
        grouped_args g = {0, 0, 0, I, O, 0, O, I, I, 0, 0.0f, (const bf16 *)d_out,
                          (const bf16 *)W, d_in, O, 0, 0, (int64_t)O * I, I, 0};
        return cublas_path(c, p, &g, e);
    }
    size_t mark;
    const bf16 *w = aligned_weights(c, p, W, I, O, &mark, e);
    int rc = !w || moe_gemm_run<FORM_DGRAD>(c, p, (const bf16 *)d_out, w, d_in, 0, I, O, e)
                 ? -1
                 : 0;
    gpu_arena_reset(c, mark);
    return rc;
}

/* d_W[e] += part[e] for the experts that had rows (the others' part was never written). */
__global__ void add_bf16_to_f32_kernel(float *dst, const bf16 *src, const int *offsets_dev,
                                       int64_t per_expert)
{
    int x = blockIdx.y;
    if (offsets_dev[x + 1] == offsets_dev[x])
        return;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < per_expert;
         i += (int64_t)gridDim.x * blockDim.x)
        dst[x * per_expert + i] += b2f(src[x * per_expert + i]);
}

/* cuBLAS's grouped GEMM refuses an fp32 C with bf16 operands (status 15, seen on an H200
 * with CUDA 13.0), so on that path each expert's weight gradient of this call is formed in
 * bf16 and then added into the fp32 accumulator: one bf16 rounding per call and expert. */
static int wgrad_cublas(gpu_ctx *c, const gpu_moe_plan *p, float *d_W, const gpu_bf16 *d_out,
                        const gpu_bf16 *in, int I, int O, dsv3_err *e)
{
    int E = p->E;
    int64_t per = (int64_t)O * I;
    if (p->N * p->k == 0)
        return 0;
    size_t mark = gpu_arena_mark(c);
    bf16 *part = (bf16 *)gpu_arena_alloc(c, (size_t)E * per * 2, e);
    if (!part)
        return -1;
    grouped_args g = {1, 0, O, I, 0, 2, O, I, I, 0, 0.0f, (const bf16 *)d_out, (const bf16 *)in,
                      part, O, 0, I, 0, 0, per};
    if (cublas_path(c, p, &g, e))
        return -1;
    dim3 grid(grid_for(per, 256, 1024), E);
    add_bf16_to_f32_kernel<<<grid, 256, 0, c->stream>>>(d_W, part, p->offsets, per);
    LAUNCH_CHECK("moe wgrad add", e);
    gpu_arena_reset(c, mark);
    return 0;
}

extern "C" int gpu_moe_linear_wgrad(gpu_ctx *c, const gpu_moe_plan *p, float *d_W,
                                    const gpu_bf16 *d_out, const gpu_bf16 *in, int I, int O,
                                    dsv3_err *e)
{
    if (c->moe_gemm == GPU_MOE_GEMM_CUBLAS || !kernel_fits(O, I, 0, d_out, in, d_W))
        return wgrad_cublas(c, p, d_W, d_out, in, I, O, e);
    return moe_gemm_run<FORM_WGRAD>(c, p, (const bf16 *)d_out, (const bf16 *)in, d_W, O, I, 0,
                                    e);
}

extern "C" void gpu_moe_set_gemm(gpu_ctx *c, int variant)
{
    c->moe_gemm = variant;
}
