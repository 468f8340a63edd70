/* gemm_internal: what the cuBLASLt callers of kernels/ share (C++ only). */
#ifndef DSV3_GEMM_INTERNAL_CUH
#define DSV3_GEMM_INTERNAL_CUH

#include "gpuctx_internal.cuh"

/* The algorithm for a described matmul: from the context's cache by key, or from the
 * heuristic (then cached). D is described like C. Keys of bf16 GEMMs have ta in 0..7 (the
 * transpose plus twice the operands' alignment class, gemm.cu) and tb in {0, 1}; other
 * callers use values from 16 so the entries never mix. */
int gemm_find_algo(gpu_ctx *c, cublasLtMatmulDesc_t op, cublasLtMatrixLayout_t la,
                   cublasLtMatrixLayout_t lb, cublasLtMatrixLayout_t lc, const algo_entry *key,
                   cublasLtMatmulAlgo_t *algo, dsv3_err *e);

/* Runs a described matmul C = alpha * (first op) (second op) + beta * C on the context's
 * stream (D is C) with the algorithm for key, then destroys the descriptors, whichever way
 * it went (so a caller whose description failed passes what it made, NULLs included, with
 * described = 0). what names the call in errors ("fp8 gemm: M=.. N=.. K=.."). */
int gemm_lt_run(gpu_ctx *c, const char *what, int described, cublasLtMatmulDesc_t op,
                cublasLtMatrixLayout_t la, cublasLtMatrixLayout_t lb, cublasLtMatrixLayout_t lc,
                const algo_entry *key, float alpha, const void *first, const void *second,
                float beta, void *C, dsv3_err *e);

#endif
