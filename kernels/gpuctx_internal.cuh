/* gpuctx_internal: the gpu_ctx structure, for the .cu files of kernels/ only. */
#ifndef DSV3_GPUCTX_INTERNAL_CUH
#define DSV3_GPUCTX_INTERNAL_CUH

#include <cublasLt.h>
#include <cublas_v2.h>

#include "cuda_util.cuh"
#include "gpuctx.h"

/* One cached cuBLASLt algorithm choice: the heuristic query costs far more than a small
 * matmul, so it runs once per shape and context. */
struct algo_entry {
    int ta, tb, m, n, k, lda, ldb, ldc, c_f32, beta0;
    cublasLtMatmulAlgo_t algo;
};
#define GPU_ALGO_CACHE 256

struct gpu_ctx {
    int dev;
    int sm_count;
    cudaStream_t stream;
    cublasLtHandle_t lt;
    cublasHandle_t blas;
    void *workspace; /* cuBLAS(Lt) workspace */
    size_t workspace_bytes;
    char *arena;
    size_t arena_bytes, arena_used, arena_peak;
    algo_entry algos[GPU_ALGO_CACHE];
    int algos_used, algos_next; /* filled, then replaced round-robin */
    int attn_fwd_variant;       /* gpu_attention_set_variant: kernel choice for timing */
    int attn_nondet;            /* gpu_attention_set_nondet: the fused backward for documents */
    int moe_gemm;               /* gpu_moe_set_gemm: grouped GEMM kernel choice, for timing */
};

#endif
