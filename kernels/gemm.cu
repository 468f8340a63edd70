/* gemm: cuBLASLt matmuls in row-major terms, with a per-context cache of chosen algorithms.
 *
 * A row-major C = op(A) op(B) is the column-major C^T = op(B)^T op(A)^T, so each call
 * hands cuBLASLt the operands swapped; no data moves. */
#include "gemm.h"
#include "gemm_internal.cuh"
#include "gpuctx_internal.cuh"

int gemm_find_algo(gpu_ctx *c, cublasLtMatmulDesc_t op, cublasLtMatrixLayout_t la,
                   cublasLtMatrixLayout_t lb, cublasLtMatrixLayout_t lc, const algo_entry *key,
                   cublasLtMatmulAlgo_t *algo, dsv3_err *e)
{
    for (int i = 0; i < c->algos_used; i++) {
        const algo_entry *x = &c->algos[i];
        if (x->ta == key->ta && x->tb == key->tb && x->m == key->m &&
            x->n == key->n && x->k == key->k && x->lda == key->lda && x->ldb == key->ldb &&
            x->ldc == key->ldc && x->c_f32 == key->c_f32 && x->beta0 == key->beta0) {
            *algo = x->algo;
            return 0;
        }
    }
    cublasLtMatmulPreference_t pref;
    CUBLAS_TRY(cublasLtMatmulPreferenceCreate(&pref), e);
    size_t ws = c->workspace_bytes;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                         sizeof ws);
    if (key->ta >= 2 && key->ta < 16) { /* a bf16 GEMM on operands below 16-byte alignment */
        uint32_t al = 16u >> (key->ta >> 1);
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                             &al, sizeof al);
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                             &al, sizeof al);
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                             &al, sizeof al);
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                             &al, sizeof al);
    }
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    cublasStatus_t st =
        cublasLtMatmulAlgoGetHeuristic(c->lt, op, la, lb, lc, lc, pref, 1, &res, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    if (st != CUBLAS_STATUS_SUCCESS || found == 0)
        return err_set(e, "cuBLASLt has no algorithm for m=%d n=%d k=%d (status %d)",
                       key->m, key->n, key->k, (int)st);
    *algo = res.algo;
    algo_entry ent = *key;
    ent.algo = res.algo;
    if (c->algos_used < GPU_ALGO_CACHE) {
        c->algos[c->algos_used++] = ent;
    } else {
        c->algos[c->algos_next] = ent;
        c->algos_next = (c->algos_next + 1) % GPU_ALGO_CACHE;
    }
    return 0;
}

int gemm_lt_run(gpu_ctx *c, const char *what, int described, cublasLtMatmulDesc_t op,
                cublasLtMatrixLayout_t la, cublasLtMatrixLayout_t lb, cublasLtMatrixLayout_t lc,
                const algo_entry *key, float alpha, const void *first, const void *second,
                float beta, void *C, dsv3_err *e)
{
    int rc = -1;
    cublasLtMatmulAlgo_t algo;
    if (!described)
        err_set(e, "%s: cannot describe the product to cuBLASLt", what);
    else if (gemm_find_algo(c, op, la, lb, lc, key, &algo, e)) {
        char why[sizeof e->msg];
        snprintf(why, sizeof why, "%s", e->msg);
        err_set(e, "%s: %s", what, why);
    } else {
        cublasStatus_t st = cublasLtMatmul(c->lt, op, &alpha, first, la, second, lb, &beta, C, lc,
                                           C, lc, &algo, c->workspace, c->workspace_bytes,
                                           c->stream);
        if (st != CUBLAS_STATUS_SUCCESS)
            err_set(e, "%s: cublasLtMatmul failed: status %d", what, (int)st);
        else
            rc = 0;
    }
    if (lc)
        cublasLtMatrixLayoutDestroy(lc);
    if (lb)
        cublasLtMatrixLayoutDestroy(lb);
    if (la)
        cublasLtMatrixLayoutDestroy(la);
    if (op)
        cublasLtMatmulDescDestroy(op);
    if (rc == 0)
        LAUNCH_CHECK("cublasLtMatmul", e);
    return rc;
}

/* cuBLASLt's heuristic assumes 256-byte aligned operands unless told otherwise, and its
 * kernels then fault ("misaligned address") on pointers that are not 16-byte aligned. The
 * flat parameter layout puts tensors at any 4-byte float offset, so a bf16 weight can sit at
 * an 8-byte boundary (configs/small: 20 routed experts, so every tensor after a router bias
 * of 20 floats). The alignment class of a call (0: all operands 16-byte aligned, as before;
 * 1, 2, 3: 8, 4, 2 bytes) goes into its cache key's ta (ta + 2 * class, below 16, apart
 * from fp8gemm's keys) and, when not 0, into the heuristic's minimum alignments. */
static int align_class(const void *a, const void *b, const void *c)
{
    uintptr_t x = (uintptr_t)a | (uintptr_t)b | (uintptr_t)c;
    return !(x & 15) ? 0 : !(x & 7) ? 1 : !(x & 3) ? 2 : 3;
}

extern "C" int gpu_gemm(gpu_ctx *c, int ta, int tb, int M, int N, int K, float alpha,
                        const gpu_bf16 *A, int lda, const gpu_bf16 *B, int ldb, float beta,
                        void *C, int ldc, int c_f32, dsv3_err *e)
{
    if (M <= 0 || N <= 0)
        return 0;
    if (K <= 0) /* an empty sum: C = beta * C, which cuBLASLt may refuse */
        return beta == 1.0f ? 0 : err_set(e, "gemm: K=0 with beta != 1 is not supported");
    /* Column-major view: C^T[N,M] = op(B)^T[N,K] . op(A)^T[K,M]. First operand B. */
    int m = N, n = M, k = K;
    cublasOperation_t opa = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasOperation_t opb = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    /* Stored (column-major) shapes: first operand is m x k (N) or k x m (T). */
    int a_rows = tb ? k : m, a_cols = tb ? m : k;
    int b_rows = ta ? n : k, b_cols = ta ? k : n;
    cudaDataType_t ct = c_f32 ? CUDA_R_32F : CUDA_R_16BF;
    cublasLtMatmulDesc_t op = NULL;
    cublasLtMatrixLayout_t la = NULL, lb = NULL, lc = NULL;
    int described =
        !(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F) ||
          cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa) ||
          cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb) ||
          cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, a_rows, a_cols, ldb) ||
          cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, b_rows, b_cols, lda) ||
          cublasLtMatrixLayoutCreate(&lc, ct, m, n, ldc));
    algo_entry key = {ta + 2 * align_class(A, B, C), tb, m, n, k, lda, ldb, ldc, c_f32,
                      beta == 0.0f, {}};
    char what[64];
    snprintf(what, sizeof what, "gemm m=%d n=%d k=%d", m, n, k);
    return gemm_lt_run(c, what, described, op, la, lb, lc, &key, alpha, B, A, beta, C, e);
}

extern "C" int gpu_linear_fwd(gpu_ctx *c, gpu_bf16 *out, const gpu_bf16 *in, const gpu_bf16 *w,
                              int N, int I, int O, float beta, dsv3_err *e)
{
    return gpu_gemm(c, 0, 1, N, O, I, 1.0f, in, I, w, I, beta, out, O, 0, e);
}

extern "C" int gpu_linear_dgrad(gpu_ctx *c, gpu_bf16 *d_in, const gpu_bf16 *d_out,
                                const gpu_bf16 *w, int N, int I, int O, float beta, dsv3_err *e)
{
    return gpu_gemm(c, 0, 0, N, I, O, 1.0f, d_out, O, w, I, beta, d_in, I, 0, e);
}

extern "C" int gpu_linear_wgrad(gpu_ctx *c, float *d_w, const gpu_bf16 *d_out,
                                const gpu_bf16 *in, int N, int I, int O, float beta, dsv3_err *e)
{
    return gpu_gemm(c, 1, 0, O, I, N, 1.0f, d_out, O, in, I, beta, d_w, I, 1, e);
}
