/* mla: the element-wise data movement around MLA attention and the residual add of the
 * training model (kernels/gmodel), 16-byte accesses where the sizes allow. All pointers
 * are device memory; every call is queued on the context's stream. */
#ifndef DSV3_MLA_H
#define DSV3_MLA_H

#include "gpuctx.h"

#ifdef __cplusplus
extern "C" {
#endif

/* out[n] = a[n] + b[n] (bf16, fp32 sum; out may be a or b). */
int gpu_add_bf16(gpu_ctx *c, gpu_bf16 *out, const gpu_bf16 *a, const gpu_bf16 *b, int64_t n,
                 dsv3_err *e);

/* The keys and values of MLA from the up-projection: for token n and head h,
 * k[n,h] = [kvb[n,h,:nope], kva[n, kv:kv+rope]] (the shared rope key), v[n,h] =
 * kvb[n,h,nope:nope+dv]; kvb rows nh*(nope+dv), kva rows kv+rope. */
int gpu_mla_assemble(gpu_ctx *c, gpu_bf16 *k, gpu_bf16 *v, const gpu_bf16 *kvb,
                     const gpu_bf16 *kva, int N, int nh, int nope, int rope, int dv, int kv,
                     dsv3_err *e);

/* Its transpose: dkvb[n,h] = [dk[n,h,:nope], dv[n,h]]; dkva[n, kv + r] = sum over heads of
 * dk[n,h,nope+r] (written; dkva[n, :kv] untouched). */
int gpu_mla_assemble_bwd(gpu_ctx *c, gpu_bf16 *dkvb, gpu_bf16 *dkva, const gpu_bf16 *dk,
                         const gpu_bf16 *dv, int N, int nh, int nope, int rope, int dvd, int kv,
                         dsv3_err *e);

#ifdef __cplusplus
}
#endif

#endif
