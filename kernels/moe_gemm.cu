/* moe_gemm: the grouped expert GEMMs (forward, dgrad, wgrad) of kernels/moe.
 *
 * Default: one kernel of our own per call that reads the experts' row offsets on the
 * device, so nothing waits for the host. Each block owns one 128 x 256 output tile of one
 * expert; forward and dgrad launch the worst-case number of row tiles (N*k/128 + E), and a
 * block finds its expert by a prefix sum of the per-expert tile counts (blocks past the
 * last tile exit). Tiles: cp.async (zero-filling rows outside the expert and columns past
 * the edge) into a 4-stage shared-memory ring, XOR-swizzled by 16-byte chunks, ldmatrix
 * (.trans for operands stored with M or N contiguous), mma.sync m16n8k16 bf16 with fp32
 * accumulators, 8 warps of 64 x 64. wgrad adds the fp32 tile straight into d_W: one owner
 * per (expert, tile), no atomics, no bf16 rounding of the increment.
 *
 * The previous path, cuBLAS's grouped batched GEMM with host-side sizes (a synchronising
 * read of the offsets), stays selectable for comparison (gpu_moe_set_gemm) and serves the
 * shapes our kernel does not take (sizes not multiples of 8, bases not 16-byte aligned). */
#include "gpuctx_internal.cuh"
#include "moe.h"

#include <stdlib.h>

#define MG_BM 128
#define MG_BN 256
#define MG_BK 64
#define MG_STAGES 4
#define MG_THREADS 256
#define MG_SMEM (MG_STAGES * (MG_BM + MG_BN) * MG_BK * 2)

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
};

__device__ __forceinline__ void cp_async16(uint32_t saddr, const void *g, bool pred)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(g),
                 "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit()
{
    asm volatile("cp.async.commit_group;\n" ::);
}
template <int N> __device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
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
    __shared__ int s_e, s_r0, s_r1;
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
        if (warp == 0) {
            if (lane == 0)
                s_e = -1;
            __syncwarp();
            int t = blockIdx.y, base = 0;
            for (int e0 = 0; e0 < p.E; e0 += 32) {
                int x = e0 + lane;
                int cnt = x < p.E ? p.off[x + 1] - p.off[x] : 0;
                int nt = (cnt + MG_BM - 1) / MG_BM, inc = nt;
#pragma unroll
                for (int o = 1; o < 32; o <<= 1) {
                    int v = __shfl_up_sync(0xffffffffu, inc, o);
                    if (lane >= o)
                        inc += v;
                }
                int start = base + inc - nt;
                if (x < p.E && t >= start && t < start + nt) {
                    s_e = x;
                    s_r0 = p.off[x] + (t - start) * MG_BM;
                    s_r1 = p.off[x + 1];
                }
                base += __shfl_sync(0xffffffffu, inc, 31);
            }
        }
        __syncthreads();
        if (s_e < 0)
            return;
        e = s_e;
        rbeg = s_r0, rend = s_r1;
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

    int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            int r = wm + i * 16 + g + h * 8;
            if (FORM == FORM_WGRAD) {
                int m = m0 + r;
                if (m >= p.M)
                    continue;
                float *row = (float *)p.C + ((int64_t)e * p.M + m) * p.N;
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    int n = n0 + wn + j * 8 + 2 * t;
                    if (n < p.N) {
                        float2 v = *(float2 *)(row + n);
                        v.x += acc[i][j][2 * h];
                        v.y += acc[i][j][2 * h + 1];
                        *(float2 *)(row + n) = v;
                    }
                }
            } else {
                int row = rbeg + r;
                if (row >= rend)
                    continue;
                bf16 *out = (bf16 *)p.C + (int64_t)row * p.N;
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    int n = n0 + wn + j * 8 + 2 * t;
                    if (n < p.N)
                        *(__nv_bfloat162 *)(out + n) =
                            __floats2bfloat162_rn(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
                }
            }
        }
}

static int aligned16p(const void *p)
{
    return ((uintptr_t)p & 15) == 0;
}

/* fwd/dgrad: C[rows, N] per expert; wgrad: d_W[E, M, N] +=. */
template <int FORM>
static int moe_gemm_run(gpu_ctx *c, const gpu_moe_plan *pl, const bf16 *A, const bf16 *B,
                        void *C, int M, int N, int K, dsv3_err *e)
{
    int nk = pl->N * pl->k, E = pl->E;
    if (nk == 0 || N <= 0 || (FORM == FORM_WGRAD ? M <= 0 : K <= 0))
        return 0;
    CUDA_TRY(cudaFuncSetAttribute(moe_gemm_kernel<FORM>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, MG_SMEM),
             e);
    mg_args a = {A, B, C, pl->offsets, E, M, N, K};
    dim3 grid;
    if (FORM == FORM_WGRAD)
        grid = dim3(((M + MG_BM - 1) / MG_BM) * ((N + MG_BN - 1) / MG_BN), E);
    else
        grid = dim3((N + MG_BN - 1) / MG_BN, (nk + MG_BM - 1) / MG_BM + E);
    moe_gemm_kernel<FORM><<<grid, MG_THREADS, MG_SMEM, c->stream>>>(a);
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

extern "C" int gpu_moe_linear_fwd(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *out,
                                  const gpu_bf16 *in, const gpu_bf16 *W, int I, int O,
                                  dsv3_err *e)
{
    if (c->moe_gemm_cublas || !kernel_fits(0, O, I, in, W, out)) {
        grouped_args g = {0, 1, 0, O, I, 0, I, I, O, 0, 0.0f, (const bf16 *)in,
                          (const bf16 *)W, out, I, 0, 0, (int64_t)O * I, O, 0};
        return cublas_path(c, p, &g, e);
    }
    return moe_gemm_run<FORM_FWD>(c, p, (const bf16 *)in, (const bf16 *)W, out, 0, O, I, e);
}

extern "C" int gpu_moe_linear_dgrad(gpu_ctx *c, const gpu_moe_plan *p, gpu_bf16 *d_in,
                                    const gpu_bf16 *d_out, const gpu_bf16 *W, int I, int O,
                                    dsv3_err *e)
{
    if (c->moe_gemm_cublas || !kernel_fits(0, I, O, d_out, W, d_in)) {
        grouped_args g = {0, 0, 0, I, O, 0, O, I, I, 0, 0.0f, (const bf16 *)d_out,
                          (const bf16 *)W, d_in, O, 0, 0, (int64_t)O * I, I, 0};
        return cublas_path(c, p, &g, e);
    }
    return moe_gemm_run<FORM_DGRAD>(c, p, (const bf16 *)d_out, (const bf16 *)W, d_in, 0, I, O,
                                    e);
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
    if (c->moe_gemm_cublas || !kernel_fits(O, I, 0, d_out, in, d_W))
        return wgrad_cublas(c, p, d_W, d_out, in, I, O, e);
    return moe_gemm_run<FORM_WGRAD>(c, p, (const bf16 *)d_out, (const bf16 *)in, d_W, O, I, 0,
                                    e);
}

extern "C" void gpu_moe_set_gemm(gpu_ctx *c, int cublas)
{
    c->moe_gemm_cublas = cublas;
}
