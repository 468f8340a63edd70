/* route_row.cuh: the DeepSeek-V3 router for one token by one warp (sigmoid scores, bias for
 * the choice only, group-limited top-k with a group scored by its two best, weights
 * normalised and scaled), shared by training's router_kernel (kernels/moe.cu) and the decode
 * engine's fused router (kernels/ginfer_k.cu): one copy, so both make the same choices with
 * the same operations in the same order as lib/ops. */
#ifndef DSV3_ROUTE_ROW_CUH
#define DSV3_ROUTE_ROW_CUH

#include <math.h>
#include <stdint.h>

/* Warp-wide argmax over (valid, value, index): larger value wins, equal values go to the
 * lower index, invalid entries lose; every lane gets the winner. */
__device__ __forceinline__ void route_argmax(int &valid, float &v, int &i)
{
    for (int o = 16; o > 0; o >>= 1) {
        int ov = __shfl_xor_sync(0xffffffffu, valid, o);
        float ovl = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ov && (!valid || ovl > v || (ovl == v && oi < i))) {
            valid = 1;
            v = ovl;
            i = oi;
        }
    }
}

/* Row n's top-k experts (idx) and weights (w) from its router logits, the sigmoid scores kept
 * in s (the backward's); choice and taken: the warp's [E] shared scratch. The logits are read
 * through L2 (in the decode engine other blocks of the same grid wrote them). */
static __device__ void route_row(int32_t *idx, float *w, float *s, const float *logits,
                                 const float *bias, int n, int E, int G, int TG, int K,
                                 int norm, float scale, float *choice, unsigned char *taken)
{
    int lane = threadIdx.x & 31;
    const float *l = logits + (long)n * E;
    float *sr = s + (long)n * E;
    for (int x = lane; x < E; x += 32) {
        float sv = 1.0f / (1.0f + expf(-__ldcg(l + x)));
        sr[x] = sv;
        choice[x] = sv + (bias ? bias[x] : 0.0f);
        taken[x] = 0;
    }
    __syncwarp();
    int per = E / G;
    float gs = 0;
    if (lane < G) { /* a group scores the sum of its two best, as lib/ops does */
        float b1 = -INFINITY, b2 = -INFINITY;
        for (int x = lane * per; x < (lane + 1) * per; x++) {
            if (choice[x] > b1) {
                b2 = b1;
                b1 = choice[x];
            } else if (choice[x] > b2) {
                b2 = choice[x];
            }
        }
        gs = b1 + b2;
    }
    unsigned keep = 0;
    for (int r = 0; r < TG; r++) {
        int valid = lane < G && !((keep >> lane) & 1);
        float v = gs;
        int i = lane;
        route_argmax(valid, v, i);
        keep |= 1u << i;
    }
    float wsum = 0, mine = 0;
    for (int r = 0; r < K; r++) {
        int valid = 0, i = 0;
        float v = -INFINITY;
        for (int x = lane; x < E; x += 32)
            if (((keep >> (x / per)) & 1) && !taken[x] && (!valid || choice[x] > v)) {
                valid = 1;
                v = choice[x];
                i = x;
            }
        route_argmax(valid, v, i);
        if (lane == 0)
            taken[i] = 1;
        __syncwarp();
        float sv = sr[i];
        wsum += sv;
        if (lane == r) {
            mine = sv;
            idx[(long)n * K + r] = i;
        }
    }
    if (lane < K)
        w[(long)n * K + lane] = norm ? mine / (wsum + 1e-20f) * scale : mine * scale;
    __syncwarp();
}

#endif
