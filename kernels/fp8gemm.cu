/* fp8gemm: block-scaled FP8 GEMMs through cuBLASLt. See fp8gemm.h.
 *
 * Row-major C[M,N] = A B^T is column-major C^T[N,M] = B A^T: cuBLASLt's first operand is our
 * B (stored K x N column-major, transposed by the op), its second our A (K x M, as is): TN,
 * with each scale handed over with its operand. */
#include <stdio.h>

#include "fp8gemm.h"
#include "gemm_internal.cuh"

static cublasLtMatmulMatrixScale_t scale_mode(int mode)
{
    switch (mode) {
    case GPU_FP8_VEC128: return CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    case GPU_FP8_BLK128: return CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
    default: return CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F;
    }
}

static int set_attr(cublasLtMatmulDesc_t op, cublasLtMatmulDescAttributes_t a, const void *v,
                    size_t n)
{
    return cublasLtMatmulDescSetAttribute(op, a, v, n) != CUBLAS_STATUS_SUCCESS;
}

extern "C" int gpu_fp8_gemm(gpu_ctx *c, int M, int N, int K, const uint8_t *A, const float *sa,
                            int a_mode, const uint8_t *B, const float *sb, int b_mode, float beta,
                            void *C, int c_f32, int flags, dsv3_err *e)
{
    if (M <= 0 || N <= 0)
        return 0;
    if (K <= 0)
        return beta == 1.0f ? 0 : err_set(e, "fp8 gemm: K=0 with beta != 1 is not supported");
    if (K % 16 || N % 16)
        return err_set(e, "fp8 gemm: M=%d N=%d K=%d: K and N must be multiples of 16", M, N, K);
    int m = N, n = M, k = K;
    cublasOperation_t opa = CUBLAS_OP_T, opb = CUBLAS_OP_N;
    int32_t ma = scale_mode(b_mode), mb = scale_mode(a_mode); /* cuBLASLt's A is our B */
    int8_t fast = (flags & GPU_FP8_FAST_ACCUM) ? 1 : 0;
    cudaDataType_t ct = c_f32 ? CUDA_R_32F : CUDA_R_16BF;
    cublasLtMatmulDesc_t op = NULL;
    cublasLtMatrixLayout_t la = NULL, lb = NULL, lc = NULL;
    int described = !(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F) ||
                      set_attr(op, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa) ||
                      set_attr(op, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb) ||
                      set_attr(op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &ma, sizeof ma) ||
                      set_attr(op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mb, sizeof mb) ||
                      set_attr(op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sb, sizeof sb) ||
                      set_attr(op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sa, sizeof sa) ||
                      set_attr(op, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof fast) ||
                      cublasLtMatrixLayoutCreate(&la, CUDA_R_8F_E4M3, k, m, K) ||
                      cublasLtMatrixLayoutCreate(&lb, CUDA_R_8F_E4M3, k, n, K) ||
                      cublasLtMatrixLayoutCreate(&lc, ct, m, n, N));
    /* ta/tb >= 16 mark FP8 entries in the shared algorithm cache (bf16 uses 0/1). */
    algo_entry key = {16 + a_mode * 4 + fast, 16 + b_mode, m, n, k, K, K, N, c_f32,
                      beta == 0.0f, {}};
    char what[96];
    snprintf(what, sizeof what, "fp8 gemm M=%d N=%d K=%d, scaling %d x %d, %s out", M, N, K,
             a_mode, b_mode, c_f32 ? "fp32" : "bf16");
    return gemm_lt_run(c, what, described, op, la, lb, lc, &key, 1.0f, B, A, beta, C, e);
}

extern "C" int gpu_fp8_linear_fwd(gpu_ctx *c, gpu_bf16 *out, const uint8_t *xq, const float *xs,
                                  const uint8_t *wq, const float *ws, int N, int I, int O,
                                  float beta, dsv3_err *e)
{
    return gpu_fp8_gemm(c, N, O, I, xq, xs, GPU_FP8_VEC128, wq, ws, GPU_FP8_BLK128, beta, out, 0,
                        0, e);
}

extern "C" int gpu_fp8_linear_dgrad(gpu_ctx *c, gpu_bf16 *d_in, const uint8_t *dyq,
                                    const float *dys, const uint8_t *wtq, const float *wts,
                                    int N, int I, int O, float beta, dsv3_err *e)
{
    return gpu_fp8_gemm(c, N, I, O, dyq, dys, GPU_FP8_VEC128, wtq, wts, GPU_FP8_BLK128, beta,
                        d_in, 0, 0, e);
}

extern "C" int gpu_fp8_linear_wgrad(gpu_ctx *c, float *d_w, const uint8_t *dytq,
                                    const float *dyts, const uint8_t *xtq, const float *xts,
                                    int N, int I, int O, float beta, dsv3_err *e)
{
    return gpu_fp8_gemm(c, O, I, N, dytq, dyts, GPU_FP8_VEC128, xtq, xts, GPU_FP8_VEC128, beta,
                        d_w, 1, 0, e);
}
